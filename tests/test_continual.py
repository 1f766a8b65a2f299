"""Continual personalization (``peft_ortho.continual``): update rules against direct computations, the orthogonal
init, bit-identical save/resume, constant memory, refusals, and the task-matrix metrics on hand-made numbers."""

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import MLP
from peft import LoraConfig

from peft_ortho import OrthoLoraConfig, bases
from peft_ortho.continual import (
    STATE_JSON,
    STATE_TENSORS,
    STRATEGIES,
    ContinualLearner,
    ContinualStateError,
    format_metrics_table,
    orthogonal_init,
    run_continual,
    task_matrix_metrics,
)
from peft_ortho.errors import AdapterFileError, BasisError, UnsupportedLayerError

MLP_TARGETS = ["lin0", "lin1", "conv", "conv1x1"]


def make_config(strategy, r=4, alpha=8, targets=MLP_TARGETS, **kw):
    cls = OrthoLoraConfig if strategy == "orthogonal" else LoraConfig
    return cls(r=r, lora_alpha=alpha, target_modules=list(targets), **kw)


def base_mlp():
    torch.manual_seed(0)
    return MLP()


def fake_train(peft_model, seed):
    """Stand-in for training: overwrite every trainable adapter tensor with seeded N(0, 0.5²) values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def factors(peft_model):
    """{layer: (A, B, scaling)} of the "default" adapter, cloned."""
    out = {}
    for name, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out[name] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
                module.scaling["default"],
            )
    return out


def product(a, b, s, weight_shape):
    """s · B A reshaped to the weight's layout: (out, r) @ (r, in) for Linear, flattened kernels for Conv2d."""
    return (s * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))).reshape(weight_shape)


def weights(model, names=MLP_TARGETS):
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def run_fake(strategy, n_tasks, **config_kw):
    """A learner over ``n_tasks`` fake-trained tasks; returns it, W0 and each task's factors."""
    model = base_mlp()
    w0 = weights(model)
    learner = ContinualLearner(model, strategy, make_config(strategy, **config_kw))
    per_task = []
    for t in range(n_tasks):
        pm = learner.begin_task()
        fake_train(pm, seed=100 + t)
        per_task.append(factors(pm))
        learner.end_task()
    return learner, w0, per_task


# ---------------------------------------------------------------------------------------------- update rules
@pytest.mark.parametrize("strategy", ["merge_and_init", "merge_and_orthogonal_init", "orthogonal"])
def test_merge_strategies_fuse_products(strategy):
    """After two tasks the targeted weights are W0 + s·B1A1 + s·B2A2 — products, not (B1+B2)(A1+A2)."""
    learner, w0, per_task = run_fake(strategy, 2, r=2)
    model = learner.model
    assert not any(hasattr(m, "lora_A") for m in model.modules()), "no adapter may remain between tasks"
    for name in MLP_TARGETS:
        (a1, b1, s), (a2, b2, _) = per_task[0][name], per_task[1][name]
        shape = w0[name].shape
        expected = w0[name] + product(a1, b1, s, shape) + product(a2, b2, s, shape)
        torch.testing.assert_close(model.get_submodule(name).weight, expected, rtol=1e-5, atol=1e-5)
        factor_sum = w0[name] + product(a1 + a2, b1 + b2, s, shape)  # the released code's merge
        assert (model.get_submodule(name).weight - factor_sum).abs().max() > 0.1
    # untargeted parameters are untouched
    torch.testing.assert_close(model.lin0.bias, base_mlp().lin0.bias, rtol=0, atol=0)


def test_naive_keeps_training_one_adapter():
    """naive: the same peft model comes back with the adapter as the previous task left it; base weights stay W0."""
    model = base_mlp()
    w0 = weights(model)
    learner = ContinualLearner(model, "naive", make_config("naive"))
    pm0 = learner.begin_task()
    fake_train(pm0, 1)
    after_task0 = factors(pm0)
    learner.end_task()
    pm1 = learner.begin_task()
    assert pm1 is pm0
    for name, (a, b, _) in factors(pm1).items():
        assert torch.equal(a, after_task0[name][0]) and torch.equal(b, after_task0[name][1])
    fake_train(pm1, 2)
    learner.end_task()
    x = torch.randn(3, 32)
    expected = torch.nn.functional.linear(x, w0["lin0"] + product(*factors(pm1)["lin0"], w0["lin0"].shape))
    with torch.no_grad():
        got = learner.model.get_base_model().lin0(x) - learner.model.get_base_model().lin0.base_layer.bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name in MLP_TARGETS:
        assert torch.equal(learner.model.get_base_model().get_submodule(name).base_layer.weight, w0[name])


def test_magnitude_selects_per_element():
    """magnitude: W_t = W0 + where(|τ_t| ≥ |τ_{t-1}|, τ_t, τ_{t-1}) element by element, over three tasks."""
    learner, w0, per_task = run_fake("magnitude", 3)
    for name in MLP_TARGETS:
        shape = w0[name].shape
        taus = [product(*per_task[t][name], shape) for t in range(3)]
        running = taus[0]
        for tau in taus[1:]:
            new_wins = tau.abs() >= running.abs()
            assert 0.1 < new_wins.float().mean() < 0.9, "both tasks must win some elements for the test to bite"
            running = torch.where(new_wins, tau, running)
        torch.testing.assert_close(learner.model.get_submodule(name).weight, w0[name] + running, rtol=1e-5, atol=1e-5)
        summed = w0[name] + sum(taus)
        assert (learner.model.get_submodule(name).weight - summed).abs().max() > 0.1
        # the kept state is W0 itself
        assert torch.equal(learner.extra_state()[name], w0[name])


def test_magnitude_hand_made_element_choice():
    """Ties go to the new task; a larger |τ| wins whatever its sign."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[10.0, 20.0]]))
    learner = ContinualLearner(model, "magnitude", LoraConfig(r=1, lora_alpha=1, target_modules=["0"]))
    for a, b in (([1.0, 2.0], 1.0), ([-3.0, 2.0], 1.0)):  # τ1 = [1, 2]; τ2 = [-3, 2]
        pm = learner.begin_task()
        layer = pm.get_base_model()[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.tensor([a]))
            layer.lora_B["default"].weight.copy_(torch.tensor([[b]]))
        learner.end_task()
    assert learner.model[0].weight.tolist() == [[7.0, 22.0]]  # W0 + [-3 (|-3| > 1), 2 (tie: new)]


def test_orthogonal_init_is_orthogonal_to_previous_sum():
    """The fresh A_t of merge_and_orthogonal_init: each column ⟂ the same column of Σ_{s<t} A_s, it is the
    projection of peft's fresh init (the same seed without the rule) rescaled to the init's norm, and B_t = 0."""
    learner, _, per_task = run_fake("merge_and_orthogonal_init", 2)
    plain, _, _ = run_fake("merge_and_init", 2)  # same seed: its task-2 adapter is the pre-projection init
    pm = learner.begin_task()
    pre = factors(plain.begin_task())
    sum_a = {name: per_task[0][name][0] + per_task[1][name][0] for name in MLP_TARGETS}
    for name, (a, b, _) in factors(pm).items():
        assert torch.equal(learner.extra_state()[name], sum_a[name])
        a2, s2 = a.reshape(a.shape[0], -1).double(), sum_a[name].reshape(a.shape[0], -1).double()
        cosines = (a2 * s2).sum(0) / (a2.norm(dim=0) * s2.norm(dim=0))
        assert cosines.abs().max() < 1e-6
        p = pre[name][0].reshape(a.shape[0], -1).double()
        assert (p * s2).sum(0).abs().max() > 1e-2, "the plain init is not orthogonal by itself"
        projected = p - ((p * s2).sum(0) / (s2 * s2).sum(0)) * s2
        expected = projected * (p.norm(dim=0) / projected.norm(dim=0))
        torch.testing.assert_close(a2, expected, rtol=1e-6, atol=1e-7)
        assert torch.count_nonzero(b) == 0


def test_orthogonal_init_function_edge_cases():
    a = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    s = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # column 0 of S is zero: untouched; column 1 along e0
    out = orthogonal_init(a, s)
    assert out[:, 0].tolist() == [1.0, 2.0]
    assert out[0, 1].item() == 0.0 and out[1, 1].item() == pytest.approx(5.0)  # ‖(3, 4)‖ kept, moved onto e1


def test_orthogonal_strategy_takes_disjoint_slots():
    """strategy 'orthogonal': task t's frozen A is slot first+t of the shared basis; slots overflow is refused."""
    model = base_mlp()
    learner = ContinualLearner(model, "orthogonal", make_config("orthogonal", r=2, slot=1))
    seen = []
    for t in range(2):
        pm = learner.begin_task()
        for a, _, _ in factors(pm).values():
            n = a[0].numel()
            expected = bases.basis_rows("orthogonal", 0, n, bases.slot_rows(1 + t, 2)).reshape(a.shape)
            assert torch.equal(a, expected.to(a.dtype))
        seen.append(factors(pm))
        fake_train(pm, t)
        learner.end_task()
    a0, a1 = seen[0]["lin0"][0], seen[1]["lin0"][0]
    assert (a0 @ a1.T).abs().max() < 1e-6
    # conv1x1 has input width 8: 4 slots at rank 2, so first slot 1 leaves room for 3 tasks
    learner.begin_task()
    learner.end_task()
    before = weights(learner.model)
    with pytest.raises(BasisError, match=r"layer 'conv1x1'.*needs orthogonal slot 4.*4 disjoint slots"):
        learner.begin_task()
    assert not any(hasattr(m, "lora_A") for m in learner.model.modules()), "refused before touching the model"
    assert all(torch.equal(before[n], w) for n, w in weights(learner.model).items())


def test_gpt2_conv1d_merge_and_orthogonal_init(tiny_gpt2):
    """Works on transformers' Conv1D (weights stored in × out, peft's fan_in_fan_out)."""
    w0 = tiny_gpt2.transformer.h[0].attn.c_attn.weight.detach().clone()
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    learner = ContinualLearner(tiny_gpt2, "merge_and_orthogonal_init", config)
    deltas = []
    for t in range(2):
        pm = learner.begin_task()
        fake_train(pm, t)
        a, b, s = factors(pm)["transformer.h.0.attn.c_attn"]
        deltas.append((s * (b @ a)).T)  # Conv1D weight is (in, out)
        learner.end_task()
    torch.testing.assert_close(learner.model.transformer.h[0].attn.c_attn.weight, w0 + deltas[0] + deltas[1])
    ids = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(learner.model(ids).logits).all()


def test_embedding_layers_fuse_products_and_refuse_orthogonal_init():
    """nn.Embedding LoRA (lora_embedding_A/B): product merge; orthogonal init is refused (peft inits A = 0 there)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 4))
    w0 = model[0].weight.detach().clone()
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["0"])
    with pytest.raises(UnsupportedLayerError, match=r"layer '0'.*embedding LoRAs with A = 0"):
        ContinualLearner(model, "merge_and_orthogonal_init", config)
    assert type(model[0]) is torch.nn.Embedding, "the refusal left the model as it was"
    learner = ContinualLearner(model, "merge_and_init", config)
    deltas = []
    for t in range(2):
        pm = learner.begin_task()
        fake_train(pm, t)
        layer = pm.get_base_model()[0]
        a, b = layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach()
        deltas.append((2.0 * (b @ a)).T)  # peft stores the embedding delta as (num_embeddings, dim)
        learner.end_task()
    torch.testing.assert_close(learner.model[0].weight, w0 + deltas[0] + deltas[1])


# ---------------------------------------------------------------------------------------------- save / resume
def train_task(peft_model, task):
    """A real (tiny) training loop: SGD on a regression task, deterministic given the task seed."""
    g = torch.Generator().manual_seed(task)
    x, img = torch.randn(16, 32, generator=g), torch.randn(4, 16, 5, 5, generator=g)
    target, target_img = torch.randn(16, 32, generator=g), torch.randn(4, 8, 5, 5, generator=g)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(5):
        y, z = peft_model(x, img)
        loss = torch.nn.functional.mse_loss(y, target) + torch.nn.functional.mse_loss(z, target_img)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_resume_is_bit_identical(strategy, tmp_path):
    """Tasks 0-2 in one go == tasks 0-1, save, resume on a fresh base model, task 2: every tensor bit for bit."""
    r = 2 if strategy == "orthogonal" else 4
    straight = ContinualLearner(base_mlp(), strategy, make_config(strategy, r=r))
    for t in range(3):
        train_task(straight.begin_task(), t)
        straight.end_task()

    first = ContinualLearner(base_mlp(), strategy, make_config(strategy, r=r))
    for t in range(2):
        train_task(first.begin_task(), t)
        first.end_task()
    first.save(tmp_path / "state")
    torch.manual_seed(1234)  # the global RNG state must not matter
    resumed = ContinualLearner.resume(tmp_path / "state", base_mlp())
    assert resumed.tasks_done == 2 and resumed.strategy == strategy
    train_task(resumed.begin_task(), 2)
    resumed.end_task()

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    ea, eb = straight.extra_state(), resumed.extra_state()
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert (resumed.model(x) - base_mlp()(x)).abs().max() > 1e-3, "training must have changed the model"


def test_save_replaces_previous_state_and_protects_other_folders(tmp_path):
    learner, _, _ = run_fake("merge_and_init", 1)
    learner.save(tmp_path / "s")
    learner.begin_task()
    with pytest.raises(ContinualStateError, match="call end_task"):
        learner.save(tmp_path / "s")
    learner.end_task()
    learner.save(tmp_path / "s")  # same folder again: replaces the previous state
    assert json.loads((tmp_path / "s" / STATE_JSON).read_text())["tasks_done"] == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        learner.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_resume_refuses_other_strategy_config_or_base(tmp_path):
    learner, _, _ = run_fake("merge_and_orthogonal_init", 1)
    learner.save(tmp_path / "s")
    with pytest.raises(ContinualStateError, match=r"holds a 'merge_and_orthogonal_init' state.*strategy 'magnitude'"):
        ContinualLearner.resume(tmp_path / "s", base_mlp(), strategy="magnitude")
    with pytest.raises(ContinualStateError, match=r"another adapter config \(r: saved 4, given 8"):
        ContinualLearner.resume(tmp_path / "s", base_mlp(), lora_config=make_config("x", r=8))
    torch.manual_seed(1)
    with pytest.raises(ContinualStateError, match="not the base model"):
        ContinualLearner.resume(tmp_path / "s", MLP())
    with pytest.raises(ContinualStateError, match="not the base model"):
        ContinualLearner.resume(tmp_path / "s", learner.model)  # the fused model is not the base
    # an equal config passed explicitly is accepted
    resumed = ContinualLearner.resume(tmp_path / "s", base_mlp(), lora_config=make_config("x"))
    assert resumed.tasks_done == 1


def test_saved_config_is_the_adapter_file_layout(tmp_path):
    """The state's ``lora_config`` is what peft's own ``save_pretrained`` writes (lora_format's layout), patterns and
    sets included, and a resume given the same config (nested dicts, a set of targets) accepts it."""
    config = make_config(
        "merge_and_init", rank_pattern={"lin1": 2}, alpha_pattern={"lin1": 3}, layers_to_transform=None
    )
    config.target_modules = set(MLP_TARGETS)
    learner = ContinualLearner(base_mlp(), "merge_and_init", config)
    fake_train(learner.begin_task(), seed=1)
    learner.end_task()
    learner.save(tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "continual_state.json").read_text())["lora_config"]
    config.save_pretrained(tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"lin1": 2} and saved["target_modules"] == sorted(MLP_TARGETS)
    written["target_modules"] = sorted(written["target_modules"])  # peft writes a set in set order
    differ = {k for k in set(saved) | set(written) if saved.get(k) != written.get(k)}
    assert differ <= {"revision", "base_model_name_or_path"}, differ
    resumed = ContinualLearner.resume(tmp_path / "s", base_mlp(), lora_config=config)
    assert resumed.tasks_done == 1


def test_resume_refuses_broken_folders(tmp_path):
    learner, _, _ = run_fake("merge_and_init", 1)
    state = learner.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / STATE_JSON).read_text())
    (tmp_path / "s" / STATE_JSON).write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(ContinualStateError, match="reads 'peft_ortho.continual/1'"):
        ContinualLearner.resume(state, base_mlp())
    os.remove(tmp_path / "s" / STATE_TENSORS)
    (tmp_path / "s" / "state.pt").write_bytes(b"pickle")
    with pytest.raises(AdapterFileError, match="never unpickles"):
        ContinualLearner.resume(state, base_mlp())


# ---------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_memory_between_tasks_does_not_grow(strategy, tmp_path):
    """Kept state after 1 and after 3 tasks: same parameters in the model, same extra tensors, same file sizes."""
    r = 2 if strategy == "orthogonal" else 4
    sizes = []
    for n in (1, 3):
        learner, _, _ = run_fake(strategy, n, r=r)
        model_numel = sum(p.numel() for p in learner.model.parameters())
        extra = sum(t.numel() for t in learner.extra_state().values())
        learner.save(tmp_path / f"s{n}")
        sizes.append((model_numel, extra, os.path.getsize(tmp_path / f"s{n}" / STATE_TENSORS)))
    assert sizes[0] == sizes[1]
    base = sum(p.numel() for p in base_mlp().parameters())
    targeted = sum(w.numel() for w in weights(base_mlp()).values())
    adapter = sum(r * (w.shape[0] + w[0].numel()) for w in weights(base_mlp()).values())
    model_numel, extra, _ = sizes[0]
    assert model_numel == base + (adapter if strategy == "naive" else 0)
    expected_extra = {
        "magnitude": targeted,
        "merge_and_orthogonal_init": sum(r * w[0].numel() for w in weights(base_mlp()).values()),
    }
    assert extra == expected_extra.get(strategy, 0)


# ---------------------------------------------------------------------------------------------- refusals
def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown continual strategy 'ewc'"):
        ContinualLearner(base_mlp(), "ewc", make_config("x"))
    with pytest.raises(ValueError, match="'orthogonal' needs an OrthoLoraConfig"):
        ContinualLearner(base_mlp(), "orthogonal", make_config("x"))
    with pytest.raises(ValueError, match="re-initialises lora_A, which OrthoLoraConfig freezes"):
        ContinualLearner(base_mlp(), "merge_and_orthogonal_init", make_config("orthogonal"))
    with pytest.raises(ValueError, match=r"slot='random'.*could not be resumed bit-identically"):
        ContinualLearner(base_mlp(), "magnitude", OrthoLoraConfig(r=2, target_modules=MLP_TARGETS))
    with pytest.raises(ValueError, match="use_dora is not supported"):
        ContinualLearner(base_mlp(), "merge_and_init", make_config("x", use_dora=True))
    with pytest.raises(ValueError, match="rank >= 2"):
        ContinualLearner(base_mlp(), "merge_and_orthogonal_init", make_config("x", r=1))
    with pytest.raises(ValueError, match="not found in the base model"):  # peft's own message
        ContinualLearner(base_mlp(), "merge_and_init", make_config("x", targets=["nothing_here"]))
    learner, _, _ = run_fake("merge_and_init", 1)
    with pytest.raises(ValueError, match="already carries peft adapters"):
        ContinualLearner(learner.begin_task(), "naive", make_config("x"))
    with pytest.raises(ContinualStateError, match="already open"):
        learner.begin_task()
    learner.end_task()
    with pytest.raises(ContinualStateError, match="no task is open"):
        learner.end_task()


def test_requires_grad_flags_are_handed_back():
    model = base_mlp()
    learner = ContinualLearner(model, "merge_and_init", make_config("x"))
    pm = learner.begin_task()
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {
        n for n, _ in pm.named_parameters() if "lora_" in n
    }
    learner.end_task()
    assert all(p.requires_grad for p in learner.model.parameters())


# ---------------------------------------------------------------------------------------------- metrics
HAND = [  # M[s, t]: score of task s after task t (NaN: not learned yet)
    [0.9, 0.6, 0.7],
    [math.nan, 0.8, 0.5],
    [math.nan, math.nan, 0.6],
]


def test_metrics_on_hand_made_matrix():
    m = task_matrix_metrics(HAND)
    # average score: (0.7 + 0.5 + 0.6) / 3 = 0.6
    assert m.average_score == pytest.approx(0.6)
    # forgetting: task 0: max(0.9, 0.6) - 0.7 = 0.2; task 1: 0.8 - 0.5 = 0.3; mean 0.25
    assert m.forgetting == pytest.approx((0.2, 0.3))
    assert m.average_forgetting == pytest.approx(0.25)
    assert m.final_scores == pytest.approx((0.7, 0.5, 0.6))
    code = task_matrix_metrics(HAND, convention="released_code")
    # mean over t of the mean over seen tasks: (0.9 + (0.6+0.8)/2 + (0.7+0.5+0.6)/3) / 3 = (0.9 + 0.7 + 0.6) / 3
    assert code.average_score == pytest.approx(2.2 / 3)
    # largest drop from just after learning: task 0: max(0.9-0.6, 0.9-0.7) = 0.3; task 1: 0.3
    assert code.average_forgetting == pytest.approx(0.3)
    assert math.isnan(task_matrix_metrics([[0.5]]).average_forgetting)
    with pytest.raises(ValueError, match="square"):
        task_matrix_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN/Inf where a learned task"):
        task_matrix_metrics([[0.5, math.nan], [math.nan, 0.5]])
    table = format_metrics_table({"naive": m})
    assert "| naive | 0.600 | 0.250 | 0.700 0.500 0.600 |" in table


def test_run_continual_fills_the_matrix_and_resumes(tmp_path):
    """run_continual scores every learned task after each task, saves, and continues a resumed run to the same M."""
    tasks = [0, 1, 2]

    def score(model, task):  # a deterministic function of the current weights and the task
        return float(model.get_submodule("lin0").weight.sum()) + task

    full = run_continual(ContinualLearner(base_mlp(), "magnitude", make_config("x")), tasks, train_task, score)
    assert np.isnan(full[np.tril_indices(3, -1)]).all() and np.isfinite(full[np.triu_indices(3)]).all()
    learner = ContinualLearner(base_mlp(), "magnitude", make_config("x"))
    part = run_continual(learner, tasks[:2], train_task, score, save_dir=tmp_path / "s")
    resumed = ContinualLearner.resume(tmp_path / "s", base_mlp())
    rest = run_continual(resumed, tasks, train_task, score, matrix=part)
    np.testing.assert_array_equal(rest, full)
    with pytest.raises(ValueError, match=r"expected \(k, k\) with k <= 3"):
        run_continual(resumed, tasks, train_task, score, matrix=np.zeros((4, 4)))


def test_example_runs_and_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    """examples/continual.py end to end (3 tasks, short): it exits non-zero if its resumed run differs."""
    import sys

    from conftest import load_script

    example = load_script("examples", "continual")
    argv = ["continual.py", "--tasks", "3", "--steps", "20", "--state", str(tmp_path / "state")]
    monkeypatch.setattr(sys, "argv", argv)
    example.main()
    out = capsys.readouterr().out
    assert "bit-identical to the uninterrupted run: True" in out
    for strategy in STRATEGIES:
        assert f"| {strategy} |" in out
    assert sorted(os.listdir(tmp_path / "state")) == [STATE_JSON, STATE_TENSORS]
