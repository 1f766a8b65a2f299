"""``peft_ortho.merging.sequential``: layer-by-layer output matching through the partly merged model.

References are computed independently: adapters' deltas from peft's own LoRA layers (``get_delta_weight``), layer
inputs by hand in float64, and the least squares with ``torch.linalg.lstsq`` on stacked, weighted rows (not the
normal equations the merge solves).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from peft_ortho import IncompatibleAdaptersError, PeftOrthoError, UnsupportedLayerError
from peft_ortho.merging import MergedAdapter
from peft_ortho.merging.load import load_adapter
from peft_ortho.merging.resolve import resolve
from peft_ortho.merging.sequential import sequential_merge


class TwoLayer(nn.Module):
    """``fc2(tanh(fc1(x)))``: the second layer's input depends on the first layer's merged weight."""

    def __init__(self, width: int = 6, hidden: int = 8, out: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class Shared(TwoLayer):
    """Calls ``fc1`` twice per forward: its second input depends on its own merged weight."""

    def __init__(self):
        super().__init__(width=6, hidden=6)

    def forward(self, x):
        return self.fc2(self.fc1(torch.tanh(self.fc1(x))))


def save_adapter(base: nn.Module, targets: list[str], path, seed: int, scale: float = 0.5):
    """A LoRA with random ``lora_A`` and ``lora_B`` saved to ``path``; returns ``(loaded Adapter, peft model)``."""
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * scale)
    model.save_pretrained(str(path))
    return load_adapter(resolve(str(path))), model.eval()


def peft_delta(model, name: str) -> torch.Tensor:
    return model.base_model.model.get_submodule(name).get_delta_weight("default").double()


def fused(base: nn.Module, layers) -> nn.Module:
    model = copy.deepcopy(base)
    with torch.no_grad():
        for (_, name), layer in layers.items():
            module = model.get_submodule(name)
            module.weight += layer.delta.reshape(module.weight.shape)
    return model


@pytest.fixture
def base():
    torch.manual_seed(0)
    return TwoLayer().eval()


def test_one_adapter_reproduces_its_layer_outputs_on_the_calibration_inputs(base, tmp_path):
    adapter, single = save_adapter(base, ["fc1", "fc2"], tmp_path / "a", seed=1)
    batches = [torch.randn(16, 6, generator=torch.Generator().manual_seed(s)) for s in range(3)]  # 48 rows ≥ in
    layers = sequential_merge([adapter], [1.0], base, [batches], lam=0.0)
    merged = fused(base, layers)
    x = torch.cat(batches)
    with torch.no_grad():
        torch.testing.assert_close(merged.fc1(x), single.base_model.model.fc1(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(x), single(x), atol=1e-5, rtol=1e-5)
        assert (merged(x) - base(x)).abs().max() > 0.1  # the adapter does something the merge kept


def test_one_adapter_with_convolutions_reproduces_the_single_model(mlp, tmp_path):
    adapter, single = save_adapter(mlp, ["lin0", "conv", "conv1x1"], tmp_path / "a", seed=2, scale=0.2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(40, 32, generator=g), torch.randn(8, 16, 6, 6, generator=g)) for _ in range(2)]
    layers = sequential_merge([adapter], [1.0], mlp, [batches], lam=0.0)
    assert layers[(None, "conv")].delta.shape == (8, 16 * 9)  # unfolded C_in·kh·kw patches
    merged = fused(mlp, layers)
    with torch.no_grad():
        for batch in batches:
            for got, want in zip(merged(*batch), single(*batch)):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def reference(base: TwoLayer, models, weights, xs, prior, mu: float, lam: float) -> dict[str, torch.Tensor]:
    """The sequential least squares in float64, rows stacked and weighted, solved by ``lstsq`` layer by layer."""
    W1, b1 = base.fc1.weight.double(), base.fc1.bias.double()
    W2 = base.fc2.weight.double()
    d1 = [w * peft_delta(m, "fc1") for m, w in zip(models, weights)]
    d2 = [w * peft_delta(m, "fc2") for m, w in zip(models, weights)]
    sets = [(x.double(), a, b, 1.0) for x, a, b in zip(xs, d1, d2)] + [(prior.double(), 0 * W1, 0 * W2, mu)]

    def solve(W, inputs):  # inputs: (X_single, X_merged, ΔW_i, weight) per set
        rows, targets, gram = [], [], 0
        for xs_, xm, d, w in inputs:
            alpha = w / xm.shape[0]
            rows.append(alpha**0.5 * xm)
            targets.append(alpha**0.5 * (xs_ @ (W + d).T - xm @ W.T))
            gram = gram + alpha * xm.T @ xm
        ridge = lam * torch.trace(gram) / W.shape[1]
        rows.append(ridge**0.5 * torch.eye(W.shape[1], dtype=torch.float64))
        targets.append(torch.zeros(W.shape[1], W.shape[0], dtype=torch.float64))
        return torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T

    D1 = solve(W1, [(x, x, a, w) for x, a, _, w in sets])
    # Layer 2's inputs: through each single model (its own ΔW_1) and through the merged first layer (D1), both
    # rounded to float32 as the model computes them.
    merged_w1 = (W1 + D1).float().double()
    second = []
    for x, a, b, w in sets:
        hs = torch.tanh(x @ (W1 + a).float().double().T + b1)
        hm = torch.tanh(x @ merged_w1.T + b1)
        second.append((hs, hm, b, w))
    return {"fc1": D1, "fc2": solve(W2, second)}


@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_two_adapters_equal_an_independent_float64_least_squares(base, tmp_path, lam):
    a, ma = save_adapter(base, ["fc1", "fc2"], tmp_path / "a", seed=1)
    b, mb = save_adapter(base, ["fc1", "fc2"], tmp_path / "b", seed=2)
    g = torch.Generator().manual_seed(3)
    xa, xb, x0 = torch.randn(30, 6, generator=g), torch.randn(20, 6, generator=g) + 1, torch.randn(25, 6, generator=g)
    weights, mu = [0.7, 1.2], 0.5
    layers = sequential_merge(
        [a, b], weights, base, {b.name: [xb[:10], xb[10:]], a.name: [xa]}, prior=[x0], mu=mu, lam=lam
    )
    want = reference(base, [ma, mb], weights, [xa, xb], x0, mu, lam)
    for name in ("fc1", "fc2"):
        got = layers[(None, name)].delta.double()
        torch.testing.assert_close(got, want[name], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(want["fc2"], sum(w * peft_delta(m, "fc2") for m, w in zip([ma, mb], weights)))


def test_cache_and_no_cache_agree_and_the_model_is_left_unchanged(base, tmp_path):
    a, _ = save_adapter(base, ["fc1", "fc2"], tmp_path / "a", seed=1)
    b, _ = save_adapter(base, ["fc2"], tmp_path / "b", seed=2)  # an adapter on one layer only
    before = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    inputs = [[torch.randn(12, 6, generator=g)], [torch.randn(12, 6, generator=g)]]
    cached = sequential_merge([a, b], [1.0, 1.0], base, inputs)
    fresh = sequential_merge([a, b], [1.0, 1.0], base, inputs, cache=False)
    assert cached.keys() == fresh.keys() == {(None, "fc1"), (None, "fc2")}
    for key in cached:
        torch.testing.assert_close(cached[key].delta, fresh[key].delta)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fused_and_svd_exported_merges_load(base, tmp_path):
    a, ma = save_adapter(base, ["fc1", "fc2"], tmp_path / "a", seed=1)
    b, mb = save_adapter(base, ["fc1", "fc2"], tmp_path / "b", seed=2)
    g = torch.Generator().manual_seed(5)
    inputs = [[torch.randn(20, 6, generator=g)], [torch.randn(20, 6, generator=g)]]
    merged = MergedAdapter([a, b], [1.0, 1.0], "sequential", svd_rank=2)
    merged.kept_layers = sequential_merge([a, b], [1.0, 1.0], base, inputs)
    assert not merged.exact
    x = torch.randn(7, 6, generator=g)
    model = merged.fuse(copy.deepcopy(base))
    with torch.no_grad():
        expected = fused(base, merged.layers)(x)
        torch.testing.assert_close(model(x), expected)
    # A rank-2 SVD of each dense ΔW, whose error the card records...
    out = merged.save_pretrained(str(tmp_path / "merged"))
    card = open(os.path.join(out, "README.md")).read()
    assert "SVD of the merged deltas" in card and "`fc1`" in card
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    for name in ("fc1", "fc2"):
        delta = merged.layers[(None, name)].delta.double()
        U, S, Vh = torch.linalg.svd(delta)
        best = (U[:, :2] * S[:2]) @ Vh[:2]  # Eckart–Young: the best rank-2 approximation
        torch.testing.assert_close(peft_delta(loaded, name), best, atol=1e-5, rtol=1e-4)
        err = (S[2:].square().sum() / S.square().sum()).sqrt().item()
        assert merged.layers[(None, name)].svd_error == pytest.approx(err, rel=1e-4) and err > 1e-3
    # ...and at full rank the exported file reproduces the fused model.
    full = MergedAdapter([a, b], [1.0, 1.0], "sequential", svd_rank=8)
    full.kept_layers = merged.layers
    out = full.save_pretrained(str(tmp_path / "full"))
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(copy.deepcopy(base), out)(x), expected, atol=1e-5, rtol=0)


def test_refuses_what_it_cannot_merge_correctly(base, tmp_path):
    a, _ = save_adapter(base, ["fc1", "fc2"], tmp_path / "a", seed=1)
    x = torch.randn(8, 6)
    with pytest.raises(IncompatibleAdaptersError, match="a'.*no calibration batch"):
        sequential_merge([a], [1.0], base, {a.name: []})
    with pytest.raises(ValueError, match="unknown adapter"):
        sequential_merge([a], [1.0], base, {a.name: [x], "zz": [x]})
    with pytest.raises(IncompatibleAdaptersError, match="fc2"):  # a base of another shape
        sequential_merge([a], [1.0], TwoLayer(out=3), [[x]])
    shared_base = Shared().eval()
    s, _ = save_adapter(shared_base, ["fc1"], tmp_path / "s", seed=1)
    with pytest.raises(UnsupportedLayerError, match="'fc1'.*called 2 times"):
        sequential_merge([s], [1.0], shared_base, [[x]])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(
        IncompatibleAdaptersError, match="'fc1'.*inputs on the calibration batches are not finite"
    ):  # refused, nothing returned to fuse
        sequential_merge([a], [1.0], base, [[bad]])
    with pytest.raises(IncompatibleAdaptersError, match="already carries an adapter"):
        sequential_merge([a], [1.0], get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["fc1"])), [[x]])


def test_one_adapter_on_gpt2_conv1d_reproduces_the_single_model(tiny_gpt2, tmp_path):
    """transformers' Conv1D (weights stored ``(in, out)``), attention and MLP depths, through a real causal LM."""
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    single = get_peft_model(copy.deepcopy(tiny_gpt2), config)
    with torch.no_grad():
        for name, p in single.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    single.save_pretrained(str(tmp_path / "a"))
    adapter = load_adapter(resolve(str(tmp_path / "a")))
    ids = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(0))  # 96 tokens ≥ 32 features
    layers = sequential_merge([adapter], [1.0], tiny_gpt2, [[{"input_ids": ids}]], lam=0.0)
    assert len(layers) == 4
    merged = MergedAdapter([adapter], [1.0], "sequential")
    merged.kept_layers = layers
    model = merged.fuse(copy.deepcopy(tiny_gpt2))
    with torch.no_grad():
        want = single(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
        assert (want - tiny_gpt2(input_ids=ids).logits).abs().max() > 0.1


def _mismatch(model, singles, inputs, logits: bool) -> float:
    """Mean over adapters of the output mismatch to each single model on its batches (KL for logits, else MSE)."""
    total = 0.0
    with torch.no_grad():
        for single, batches in zip(singles, inputs):
            for batch in batches:
                if logits:
                    p = single(**batch).logits.double().log_softmax(-1)
                    q = model(**batch).logits.double().log_softmax(-1)
                    total += (p.exp() * (p - q)).sum(-1).mean().item() / len(batches)
                else:
                    total += (model(batch) - single(batch)).double().pow(2).mean().item() / len(batches)
    return total / len(singles)


def test_refinement_lowers_the_end_to_end_mismatch(base, tiny_gpt2, tmp_path):
    a, ma = save_adapter(base, ["fc1", "fc2"], tmp_path / "a", seed=1)
    b, mb = save_adapter(base, ["fc1", "fc2"], tmp_path / "b", seed=2)
    g = torch.Generator().manual_seed(6)
    inputs = [[torch.randn(20, 6, generator=g)], [torch.randn(20, 6, generator=g) + 1]]
    closed = sequential_merge([a, b], [1.0, 1.0], base, inputs)
    refined = sequential_merge([a, b], [1.0, 1.0], base, inputs, refine_steps=30, refine_lr=1e-2)
    before = _mismatch(fused(base, closed), [ma, mb], inputs, logits=False)
    after = _mismatch(fused(base, refined), [ma, mb], inputs, logits=False)
    assert after < 0.8 * before

    # Causal LM outputs are compared as next-token distributions (KL), through Conv1D layers.
    singles, adapters = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        model = get_peft_model(copy.deepcopy(tiny_gpt2), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.5)
        model.save_pretrained(str(tmp_path / f"g{seed}"))
        singles.append(model.eval())
        adapters.append(load_adapter(resolve(str(tmp_path / f"g{seed}"))))
    inputs = [[{"input_ids": torch.randint(0, 100, (4, 10), generator=g)}] for _ in adapters]
    results = []
    for steps in (0, 10):
        merged = MergedAdapter(adapters, [1.0, 1.0], "sequential")
        merged.kept_layers = sequential_merge(adapters, [1.0, 1.0], tiny_gpt2, inputs, refine_steps=steps)
        results.append(_mismatch(merged.fuse(copy.deepcopy(tiny_gpt2)), singles, inputs, logits=True))
    assert results[1] < results[0]
    assert all(p.grad is None for p in tiny_gpt2.parameters())  # the base model's own gradients are untouched


def test_balanced_refinement_weighs_each_adapter_by_its_own_effect(base, tmp_path):
    """``refine_balance``: each adapter's term is divided by its own effect on its batches. One adapter alone: the
    weight is exactly 1, nothing changes. A strong and a weak adapter on overlapping inputs: unbalanced, the weak
    one's mismatch relative to its effect is left large for the strong one's benefit; balanced, it shrinks."""
    a, ma = save_adapter(base, ["fc1", "fc2"], tmp_path / "a", seed=1, scale=1.0)
    b, mb = save_adapter(base, ["fc1", "fc2"], tmp_path / "b", seed=2, scale=0.1)
    g = torch.Generator().manual_seed(6)
    inputs = [[torch.randn(20, 6, generator=g)], [torch.randn(20, 6, generator=g) + 0.3]]
    kw = dict(refine_steps=20, refine_lr=1e-2)
    alone = [sequential_merge([a], [1.0], base, inputs[:1], refine_balance=flag, **kw) for flag in (False, True)]
    assert all(torch.equal(alone[0][k].delta, alone[1][k].delta) for k in alone[0])

    def relative(layers, single, batches):
        with torch.no_grad():
            x = batches[0]
            effect = (single(x) - base(x)).double().pow(2).mean()
            return float((fused(base, layers)(x) - single(x)).double().pow(2).mean() / effect)

    plain = sequential_merge([a, b], [1.0, 1.0], base, inputs, **kw)
    balanced = sequential_merge([a, b], [1.0, 1.0], base, inputs, refine_balance=True, **kw)
    assert relative(balanced, mb, inputs[1]) < relative(plain, mb, inputs[1])


def test_compose_method_sequential_is_the_function_and_refuses_without_calibration(base, tmp_path):
    from peft_ortho import compose

    a, _ = save_adapter(base, ["fc1", "fc2"], tmp_path / "a", seed=1)
    b, _ = save_adapter(base, ["fc1"], tmp_path / "b", seed=2)
    g = torch.Generator().manual_seed(7)
    inputs = {a.name: [torch.randn(12, 6, generator=g)], b.name: [torch.randn(12, 6, generator=g)]}
    prior = [torch.randn(10, 6, generator=g)]
    names = [a.name, b.name]
    merged = compose(
        names, [0.5, 1.5], method="sequential", calibrate=base, inputs=inputs, prior_inputs=prior, ridge=0.01,
        prior_weight=2.0, progress=False,
    )  # fmt: skip
    want = sequential_merge([a, b], [0.5, 1.5], base, inputs, prior=prior, mu=2.0, lam=0.01)
    assert merged.layers.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(merged.layers[key].delta, want[key].delta)
    assert not merged.exact and "Sequential merge" in merged.statement
    # The refinement's settings reach the function: the same steps at the same lr give the same deltas.
    refined = compose(
        names, method="sequential", calibrate=base, inputs=inputs, refine_steps=3, refine_lr=1e-2, progress=False
    )
    want = sequential_merge([a, b], [1.0, 1.0], base, inputs, refine_steps=3, refine_lr=1e-2)
    other = sequential_merge([a, b], [1.0, 1.0], base, inputs, refine_steps=3)  # the default lr, 1e-3
    for key in want:
        torch.testing.assert_close(refined.layers[key].delta, want[key].delta)
    assert any(not torch.allclose(want[k].delta, other[k].delta) for k in want)
    with pytest.raises(ValueError, match="calibrate=<base model> and inputs="):
        compose(names, method="sequential", inputs=inputs, progress=False)
    with pytest.raises(ValueError, match="calibrate=<base model> and inputs="):
        compose(names, method="sequential", calibrate=base, progress=False)
    with pytest.raises(ValueError, match="calibration forward passes"):  # the weights-only pass cannot solve it
        next(iter(merged.iter_layers()))


def test_calibration_inputs_are_the_adapted_pipelines_own_guided_sampling(tmp_path):
    """``calibration_inputs``: per denoising step, the UNet's inputs of both guidance halves, where each next state is
    the scheduler's step on the guided prediction of the *adapted* UNet (peft's own layers as the reference, not
    the hooks); the pipeline is left bit-unchanged; compose builds the sequential merge's inputs from prompts."""
    from peft_ortho import compose, testing
    from peft_ortho.statistics import calibration_inputs

    pipe = testing.tiny_sd_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    adapter, peft_unet = save_adapter(pipe.unet, ["to_q", "to_v"], tmp_path / "unet_lora", seed=3, scale=0.3)
    prompt, steps, k, guidance = "a photo of a dog", 3, 2, 4.0
    calls = calibration_inputs(adapter, pipe, prompt, steps=steps, num_images=k, guidance_scale=guidance, seed=5)
    assert len(calls) == steps
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    latents = torch.randn(k, channels, size, size, generator=torch.Generator().manual_seed(5))
    latents = latents * scheduler.init_noise_sigma
    ids = pipe.tokenizer([prompt] * k + [""] * k, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        for call, t in zip(calls, scheduler.timesteps):
            x = scheduler.scale_model_input(latents, t)
            torch.testing.assert_close(
                call["sample"], torch.cat([x, x]), rtol=1e-4, atol=5e-5
            )  # hooks vs peft: rounding
            assert torch.equal(call["timestep"], t.reshape(1).expand(2 * k))
            torch.testing.assert_close(call["encoder_hidden_states"], states)
            eps_c, eps_u = peft_unet(**call).sample.chunk(2)
            latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    base_calls = calibration_inputs(None, pipe, prompt, steps=steps, num_images=k, guidance_scale=guidance, seed=5)
    assert torch.equal(base_calls[0]["sample"], calls[0]["sample"])  # the same start ...
    assert not torch.allclose(base_calls[-1]["sample"], calls[-1]["sample"], atol=1e-4)  # ... the base's own path

    merged = compose(
        [adapter.name], method="sequential", calibrate=pipe, prompts={adapter.name: prompt}, progress=False
    )
    want = sequential_merge([adapter], [1.0], pipe.unet, {adapter.name: calibration_inputs(adapter, pipe, prompt)})
    assert merged.layers.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(merged.layers[key].delta, want[key].delta)
    pipe.unet = peft_unet  # a pipeline with an adapter loaded does not run the base: refused, not used
    with pytest.raises(PeftOrthoError, match="adapters loaded"):
        calibration_inputs(None, pipe, prompt)
    pipe.unet = peft_unet.unload()
    with pytest.raises(ValueError, match="calibrate=<pipeline> and prompts="):
        compose([adapter.name], method="sequential", calibrate=pipe.unet, progress=False)
    with pytest.raises(ValueError, match="a diffusers pipeline with a unet"):
        compose(
            [adapter.name], method="sequential", calibrate=pipe.unet, prompts={adapter.name: prompt}, progress=False
        )
