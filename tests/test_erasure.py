"""Randomized Output Erasure (peft_ortho.erasure): swaps, loss, teacher, and its effect on a tiny conditioned model."""

from __future__ import annotations

import copy
import gc
import math
import random

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from torch import nn

import peft_ortho
from peft_ortho import OrthoLoraConfig, testing
from peft_ortho.erasure import OutputErasure, adapter_layers, adapters_disabled
from peft_ortho.errors import UnsupportedAdapterError

HAS_BLOCK = hasattr(peft_ortho, "BlockLoraConfig")
TARGETS = ["inp", "mid", "out"]


# ----------------------------------------------------------------------------------------------- a tiny model
class CondMLP(nn.Module):
    """``f(x, c)``: a sample ``x`` (16) and a "prompt embedding" ``c`` (16) through three linears -> 16."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.mid = nn.Linear(64, 64)
        self.out = nn.Linear(64, 16)

    def forward(self, x, c):
        h = F.gelu(self.inp(torch.cat([x, c], -1)))
        return self.out(F.gelu(self.mid(h)))


CONCEPT = "a photo of sks dog"
POOL = [f"a photo of thing {i}" for i in range(8)]  # foreign prompts seen in training
HELD_OUT = [f"a photo of other {i}" for i in range(8)]  # foreign prompts never seen


def _embeddings() -> dict[str, torch.Tensor]:
    # Prompt embeddings share a common component, as text-encoder embeddings of related prompts do: the adapter
    # cannot tell the concept apart from foreign prompts for free.
    g = torch.Generator().manual_seed(0)
    common = torch.randn(16, generator=g)
    return {name: 0.5 * common + torch.randn(16, generator=g) for name in [CONCEPT, *POOL, *HELD_OUT]}


EMB = _embeddings()


def make_base() -> CondMLP:
    torch.manual_seed(0)
    return CondMLP().eval()


def make_config(kind: str, **kw):
    if kind == "lora":
        return LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, **kw)
    if kind == "ortho":
        return OrthoLoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, slot=1, **kw)
    if kind == "block":
        if not HAS_BLOCK:
            pytest.skip("BlockLoraConfig not in this checkout")
        return peft_ortho.BlockLoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, num_blocks=2, block_index=0, **kw)
    raise AssertionError(kind)


KINDS = ["lora", "ortho", "block"]


def embed(prompts: list[str]) -> torch.Tensor:
    return torch.stack([EMB[p] for p in prompts])


def train(model: nn.Module, erasure: OutputErasure | None, steps: int = 300, batch: int = 32) -> None:
    """Teach the adapter the concept "shift the output by v when the prompt is CONCEPT" (a constant, like a style)."""
    base = make_base()
    v = 0.3 * torch.randn(16, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    gx = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(batch, 16, generator=gx)
        with torch.no_grad():
            target = base(x, EMB[CONCEPT].expand(batch, -1)) + v
        prompts = [CONCEPT] * batch
        if erasure is None:
            loss = F.mse_loss(model(x, embed(prompts)), target)
        else:
            prompts, erased = erasure.swap(prompts)
            c = embed(prompts)
            pred = model(x, c)
            teacher = erasure.teacher(model, model, x[erased], c[erased])
            loss = erasure.loss(pred, target, erased, teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()


X_EVAL = torch.randn(256, 16, generator=torch.Generator().manual_seed(2))


def concept_loss(model: nn.Module) -> float:
    base = make_base()
    v = 0.3 * torch.randn(16, generator=torch.Generator().manual_seed(5))
    c = EMB[CONCEPT].expand(len(X_EVAL), -1)
    with torch.no_grad():
        return F.mse_loss(model(X_EVAL, c), base(X_EVAL, c) + v).item()


def foreign_effect(model: nn.Module, prompts: list[str]) -> float:
    """‖f_adapted(x, foreign) − f_base(x, foreign)‖ / ‖f_base(x, foreign)‖ over X_EVAL × prompts (base: a clean copy)."""
    base = make_base()
    num = den = 0.0
    with torch.no_grad():
        for p in prompts:
            c = EMB[p].expand(len(X_EVAL), -1)
            ref = base(X_EVAL, c)
            num += (model(X_EVAL, c) - ref).square().sum().item()
            den += ref.square().sum().item()
    return math.sqrt(num / den)


# ----------------------------------------------------------------------------------------------- (a) swap
def test_swap_statistics_match_p_and_uniform_pool():
    p, pool, n_batches, batch = 0.3, ["dog", "cat", "car", "tree"], 500, 40
    erasure = OutputErasure(p=p, foreign_prompts=pool, seed=123)
    prompts = [f"sks {i}" for i in range(batch)]
    original = list(prompts)
    masks, counts = [], dict.fromkeys(pool, 0)
    for _ in range(n_batches):
        swapped, erased = erasure.swap(prompts)
        assert prompts == original  # the caller's list is not modified
        assert erased.dtype == torch.bool and erased.shape == (batch,)
        for i, (new, e) in enumerate(zip(swapped, erased.tolist())):
            if e:
                counts[new] += 1
            else:
                assert new == original[i]  # kept samples keep their own prompt, in place
        masks.append(erased)
    n = n_batches * batch
    erased_total = int(torch.cat(masks).sum())
    # 5 standard deviations: a wrong p (or a mask tied to position) fails, the seed's luck does not.
    assert abs(erased_total / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    for name, k in counts.items():
        q = 1 / len(pool)
        assert abs(k / erased_total - q) < 5 * math.sqrt(q * (1 - q) / erased_total), (name, k)
    # Independent per position: every position is erased at about rate p.
    per_position = torch.stack(masks).float().mean(0)
    assert (per_position - p).abs().max() < 5 * math.sqrt(p * (1 - p) / n_batches)


def test_swap_p0_never_p1_always_and_class_prompt():
    prompts = ["sks dog"] * 64
    never = OutputErasure(p=0.0, class_prompt="a dog", seed=0)
    always = OutputErasure(p=1.0, class_prompt="a dog", seed=0)
    for _ in range(20):
        kept, erased = never.swap(prompts)
        assert kept == prompts and not erased.any()
        swapped, erased = always.swap(prompts)
        assert swapped == ["a dog"] * 64 and erased.all()


def test_swap_is_reproducible_from_seed_and_ignores_global_rng():
    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        random.seed(global_seed)
        e = OutputErasure(p=0.5, foreign_prompts=POOL, seed=seed)
        return [e.swap([CONCEPT] * 16) for _ in range(5)]

    a = run(7, global_seed=0)
    b = run(7, global_seed=999)  # the global RNGs do not influence the draws ...
    c = run(8, global_seed=0)
    for (pa, ma), (pb, mb) in zip(a, b):
        assert pa == pb and torch.equal(ma, mb)
    assert any(pa != pc for (pa, _), (pc, _) in zip(a, c))  # ... the seed does
    # ... and the draws do not consume the global RNGs.
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    e = OutputErasure(p=0.5, foreign_prompts=POOL, seed=7)
    expected_next = torch.rand(3)
    torch.set_rng_state(torch_state)
    e.swap([CONCEPT] * 16)
    assert torch.equal(torch.rand(3), expected_next)
    assert random.getstate() == py_state


def test_state_dict_resumes_the_same_masks():
    e = OutputErasure(p=0.4, foreign_prompts=POOL, seed=3)
    for _ in range(3):
        e.swap([CONCEPT] * 8)
    state = e.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in state.values())  # no objects to pickle
    expected = [e.swap([CONCEPT] * 8) for _ in range(4)]
    resumed = OutputErasure(p=0.4, foreign_prompts=POOL, seed=3)
    resumed.load_state_dict(state)
    for (p1, m1), (p2, m2) in zip(expected, (resumed.swap([CONCEPT] * 8) for _ in range(4))):
        assert p1 == p2 and torch.equal(m1, m2)
    with pytest.raises(ValueError, match="saved with 8 foreign prompts, this object has 2"):
        OutputErasure(p=0.4, foreign_prompts=POOL[:2], seed=3).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(p=1.5, class_prompt="a dog"), ValueError, r"p must be a probability in \[0, 1\], got 1.5"),
        (dict(p=-0.1, class_prompt="a dog"), ValueError, "p must be a probability"),
        (dict(p=float("nan"), class_prompt="a dog"), ValueError, "p must be a probability"),
        (dict(weight=-1.0, class_prompt="a dog"), ValueError, "weight must be a number >= 0, got -1.0"),
        (dict(weight=float("nan"), class_prompt="a dog"), ValueError, "weight must be a number >= 0"),
        (dict(foreign_prompts=[]), ValueError, "foreign prompt pool is empty"),
        (dict(), ValueError, "give exactly one of foreign_prompts"),
        (dict(foreign_prompts=["a"], class_prompt="b"), ValueError, "give exactly one of foreign_prompts"),
        (dict(foreign_prompts="a dog"), TypeError, "not one string"),
        (dict(foreign_prompts=["a", 3]), TypeError, "foreign prompts must be strings"),
        (dict(class_prompt="a", seed=1.5), TypeError, "seed must be an int"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        OutputErasure(**kwargs)


def test_swap_refuses_a_single_string():
    with pytest.raises(TypeError, match="list of strings"):
        OutputErasure(class_prompt="a dog").swap("sks dog")


# ----------------------------------------------------------------------------------------------- (b) loss
def test_loss_equals_hand_computation_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    B, shape = 6, (4, 3, 3)
    pred = torch.randn(B, *shape, generator=g, requires_grad=True)
    target = torch.randn(B, *shape, generator=g)
    erased = torch.tensor([True, False, False, True, True, False])
    base = torch.randn(int(erased.sum()), *shape, generator=g)
    w = 0.7
    erasure = OutputErasure(p=0.5, weight=w, class_prompt="x")

    loss = erasure.loss(pred, target, erased, base)
    rows, j = [], 0
    for i in range(B):
        if erased[i]:
            rows.append(w * ((pred[i] - base[j]) ** 2).mean())
            j += 1
        else:
            rows.append(((pred[i] - target[i]) ** 2).mean())
    hand = torch.stack(rows)
    torch.testing.assert_close(loss, hand.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(erasure.loss(pred, target, erased, base, reduction="none"), hand, rtol=1e-6, atol=0)

    # d L / d pred_i = 2/(B·D) · (pred_i − goal_i) · (w on erased rows, 1 on kept rows)
    loss.backward()
    D = pred[0].numel()
    goal = target.clone()
    goal[erased] = base
    scale = torch.where(erased, w, 1.0).view(-1, 1, 1, 1)
    torch.testing.assert_close(pred.grad, 2 / (B * D) * scale * (pred.detach() - goal), rtol=1e-5, atol=1e-7)

    # Nothing erased: exactly the plain diffusion loss.
    none = torch.zeros(B, dtype=torch.bool)
    torch.testing.assert_close(erasure.loss(pred, target, none, None), F.mse_loss(pred, target), rtol=1e-6, atol=0)


def test_loss_keeps_low_precision_inputs_in_float32():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(4, 8, generator=g).to(torch.bfloat16)
    target = torch.randn(4, 8, generator=g).to(torch.bfloat16)
    erased = torch.tensor([False, True, False, False])
    base = torch.randn(1, 8, generator=g).to(torch.bfloat16)
    loss = OutputErasure(class_prompt="x", weight=2.0).loss(pred, target, erased, base)
    assert loss.dtype == torch.float32
    ref = OutputErasure(class_prompt="x", weight=2.0).loss(pred.float(), target.float(), erased, base.float())
    assert torch.equal(loss, ref)


def test_loss_refuses_inconsistent_inputs():
    e = OutputErasure(class_prompt="x")
    pred, target = torch.zeros(3, 2), torch.zeros(3, 2)
    erased = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match=r"2 sample\(s\) erased but no teacher prediction"):
        e.loss(pred, target, erased, None)
    with pytest.raises(ValueError, match=r"base has shape \(3, 2\), expected \(2, 2\)"):
        e.loss(pred, target, erased, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"erased mask has shape \(2,\), expected \(3,\)"):
        e.loss(pred, target, erased[:2], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="pred .* and target .* differ"):
        e.loss(pred, target[:2], erased, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none'"):
        e.loss(pred, target, erased, torch.zeros(2, 2), reduction="sum")


# ----------------------------------------------------------------------------------------------- teacher
def test_teacher_skips_batches_with_nothing_erased():
    model = get_peft_model(make_base(), make_config("lora"))
    e = OutputErasure(p=0.0, class_prompt="x")
    e.swap(["a"] * 8)

    def must_not_run():
        raise AssertionError("the teacher ran on a batch with nothing erased")

    assert e.teacher(model, must_not_run) is None
    with pytest.raises(RuntimeError, match="call swap"):
        OutputErasure(class_prompt="x").teacher(model, must_not_run)


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_disabled_gives_the_base_model_and_restores_state(kind):
    base = make_base()
    model = get_peft_model(copy.deepcopy(base), make_config(kind, init_lora_weights=False))
    x, c = torch.randn(5, 16), embed([CONCEPT] * 5)
    with torch.no_grad():
        ref, adapted = base(x, c), model(x, c)
    assert not torch.equal(adapted, ref)  # the adapter does something
    for q in adapter_layers(model)[0][1].parameters():  # a user froze one layer's adapter: it must stay frozen
        q.requires_grad_(False)
    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    assert any(flags.values())

    with adapters_disabled(model), torch.no_grad():
        assert torch.equal(model(x, c), ref)  # bit-identical to the model without any adapter
    with torch.no_grad():
        assert torch.equal(model(x, c), adapted)
    # Unlike peft's enable_adapters, no requires_grad flag moves (OrthoLoRA's frozen lora_A stays frozen).
    assert {n: q.requires_grad for n, q in model.named_parameters()} == flags

    with pytest.raises(KeyError):  # state restored on exceptions too
        with adapters_disabled(model):
            raise KeyError("boom")
    assert all(not layer.disable_adapters for _, layer in adapter_layers(model))

    # Nested, and a layer disabled before entry stays disabled after exit.
    name, first = adapter_layers(model)[0]
    first.enable_adapters(False)
    with adapters_disabled(model):
        with adapters_disabled(model):
            pass
        assert all(layer.disable_adapters for _, layer in adapter_layers(model))
    assert first.disable_adapters and not adapter_layers(model)[1][1].disable_adapters


def test_adapters_disabled_refuses_models_without_adapters_and_merged_adapters():
    with pytest.raises(ValueError, match="has no peft adapter layer, so there is no adapter to disable"):
        with adapters_disabled(make_base()):
            pass
    model = get_peft_model(make_base(), make_config("lora", init_lora_weights=False))
    model.merge_adapter()
    with pytest.raises(UnsupportedAdapterError, match="layer '.*inp'.*merged into the base weights.*unmerge"):
        with adapters_disabled(model):
            pass
    model.unmerge_adapter()
    with adapters_disabled(model):
        pass


def test_adapters_disabled_on_injected_layers_and_a_diffusers_unet():
    base = make_base()
    injected = inject_adapter_in_model(make_config("lora", init_lora_weights=False), copy.deepcopy(base))
    x, c = torch.randn(3, 16), embed([CONCEPT] * 3)
    with adapters_disabled(injected), torch.no_grad():
        assert torch.equal(injected(x, c), base(x, c))

    unet = testing.tiny_unet()
    inputs = testing.unet_inputs(unet, batch=2)
    with torch.no_grad():
        ref = unet(**inputs).sample
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=testing.UNET_TARGETS, init_lora_weights=False))
    with torch.no_grad():
        assert not torch.allclose(unet(**inputs).sample, ref)
        with adapters_disabled(unet):
            assert torch.equal(unet(**inputs).sample, ref)


def test_warns_when_base_parameters_are_trainable():
    model = get_peft_model(make_base(), make_config("lora", bias="lora_only"))
    e = OutputErasure(p=1.0, class_prompt="x")
    e.swap(["a"])
    with pytest.warns(UserWarning, match=r"base parameter\(s\) outside the adapters are trainable.*'.*bias'"):
        e.teacher(model, lambda: None)


# ----------------------------------------------------------------------------------------------- (c), (e)
@pytest.mark.parametrize("kind", KINDS)
def test_erasure_silences_the_adapter_on_foreign_prompts(kind):
    plain = get_peft_model(make_base(), make_config(kind))
    erased = get_peft_model(make_base(), make_config(kind))
    before = concept_loss(plain)
    assert foreign_effect(plain, POOL) == 0.0  # B = 0 at init: no effect before training
    train(plain, None)
    train(erased, OutputErasure(p=0.5, weight=1.0, foreign_prompts=POOL, seed=0))

    # Both learn the concept ...
    assert concept_loss(plain) < 0.05 * before
    assert concept_loss(erased) < 0.05 * before
    # ... but without erasure the adapter shifts every prompt; with it, foreign prompts much less.
    leak_plain, leak_erased = foreign_effect(plain, POOL), foreign_effect(erased, POOL)
    assert leak_plain > 0.4
    # Measured: lora 1.52 -> 0.11, block 1.56 -> 0.13, ortho 2.52 -> 0.65 (OrthoLoRA's frozen, fixed input basis
    # leaves it fewer ways to tell prompts apart, so it can silence itself less: a property of the tuner).
    assert leak_erased < leak_plain / (3 if kind == "ortho" else 8), (leak_plain, leak_erased)
    # Foreign prompts never seen in training also move less (a weaker, generalisation effect).
    assert foreign_effect(erased, HELD_OUT) < 0.8 * foreign_effect(plain, HELD_OUT)

    # Before/after on one adapter: erasure applied to the already-leaking adapter drives its leak down.
    train(plain, OutputErasure(p=0.5, weight=1.0, foreign_prompts=POOL, seed=1))
    assert foreign_effect(plain, POOL) < leak_plain / (3 if kind == "ortho" else 8)
    assert concept_loss(plain) < 0.05 * before


# ----------------------------------------------------------------------------------------------- (d)
@pytest.mark.parametrize("kind", ["lora", "ortho"])
def test_teacher_path_is_never_updated(kind):
    base = make_base()
    model = get_peft_model(copy.deepcopy(base), make_config(kind))
    frozen = {n: q.detach().clone() for n, q in model.named_parameters() if not q.requires_grad}
    erasure = OutputErasure(p=1.0, weight=1.0, foreign_prompts=POOL, seed=0)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.1)
    x = torch.randn(8, 16)
    for _ in range(5):
        prompts, erased = erasure.swap([CONCEPT] * 8)
        c = embed(prompts).requires_grad_()  # as if a trained text encoder produced it
        pred = model(x, c)
        teacher = erasure.teacher(model, model, x[erased], c[erased])
        # The teacher is the untouched base model, exactly, at every step, and carries no autograd graph (even
        # from an input that has one): nothing flows back through the teacher path.
        with torch.no_grad():
            assert torch.equal(teacher, base(x[erased], c[erased]))
        assert not teacher.requires_grad and teacher.grad_fn is None
        loss = erasure.loss(pred + 0.1, pred.detach(), erased, teacher)  # + 0.1: a gradient even at B = 0
        opt.zero_grad()
        loss.backward()
        with_grad = {n for n, q in model.named_parameters() if q.grad is not None}
        assert with_grad and all("lora_" in n for n in with_grad), with_grad
        if kind == "ortho":
            assert not any("lora_A" in n for n in with_grad)
        opt.step()
    # Every non-trainable tensor (the base weights, OrthoLoRA's frozen basis) is bit-identical after training.
    for n, q in model.named_parameters():
        if n in frozen:
            assert torch.equal(q, frozen[n]), n
    assert any(not torch.equal(q, 0 * q) for n, q in model.named_parameters() if "lora_B" in n)


# ----------------------------------------------------------------------------------------------- (f) accelerate
@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_inside_accelerate(accelerator):
    base = make_base()
    model = get_peft_model(copy.deepcopy(base), make_config("ortho"))
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    erasure = OutputErasure(p=0.5, foreign_prompts=POOL, seed=accelerator.process_index)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    target = base(x, embed([CONCEPT] * 16)).detach() + 0.3
    losses = []
    for _ in range(40):
        prompts, erased = erasure.swap([CONCEPT] * 16)
        c = embed(prompts).to(accelerator.device)
        pred = model(x, c)
        teacher = erasure.teacher(model, model, x[erased], c[erased])
        loss = erasure.loss(pred, target, erased, teacher)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.2 * sum(losses[:5])
    unwrapped = accelerator.unwrap_model(model)
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(unwrapped(x, embed(POOL[:1] * 16)), base(x, embed(POOL[:1] * 16)))


def test_through_a_ddp_wrapper(tmp_path):
    # What accelerate.prepare returns with several processes: DistributedDataParallel. One process, gloo, CPU.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    ddp = pred = None
    try:
        base = make_base()
        ddp = DistributedDataParallel(
            get_peft_model(copy.deepcopy(base), make_config("lora", init_lora_weights=False))
        )
        x, c = torch.randn(4, 16), embed(POOL[:4])
        erasure = OutputErasure(p=1.0, foreign_prompts=POOL, seed=0)
        erasure.swap(["a"] * 4)
        teacher = erasure.teacher(ddp, ddp, x, c)
        assert torch.equal(teacher, base(x, c).detach())
        pred = ddp(x, c)
        erasure.loss(pred, pred.detach(), torch.ones(4, dtype=torch.bool), teacher).backward()
        assert all(q.grad is not None for n, q in ddp.named_parameters() if q.requires_grad)
    finally:
        # DDP's Reducer must be freed before its process group: destroying the group first can leave
        # ~ProcessGroupGloo joining its threads forever when the Reducer is collected later.
        del ddp, pred
        gc.collect()
        dist.destroy_process_group()


def test_a_diffusers_unet_training_step():
    # The agreed spelling with a UNet and string prompts; the teacher is the pristine UNet on the erased slice.
    pristine = testing.tiny_unet()
    unet = get_peft_model(testing.tiny_unet(), OrthoLoraConfig(r=4, target_modules=testing.UNET_TARGETS, slot=0))
    frozen = {n: q.detach().clone() for n, q in unet.named_parameters() if not q.requires_grad}
    g = torch.Generator().manual_seed(0)
    table = {p: torch.randn(5, 32, generator=g) for p in [CONCEPT, *POOL]}

    def encode(prompts):
        return torch.stack([table[p] for p in prompts])

    erasure = OutputErasure(p=0.5, foreign_prompts=POOL, seed=0)
    opt = torch.optim.SGD([q for q in unet.parameters() if q.requires_grad], lr=1e-3)
    saw_erased = 0
    for _ in range(3):
        inputs = testing.unet_inputs(unet, batch=4, seed=saw_erased)
        noisy, t = inputs["sample"], inputs["timestep"]
        prompts, erased = erasure.swap([CONCEPT] * 4)
        cond = encode(prompts)
        pred = unet(noisy, t, cond).sample
        base = erasure.teacher(unet, lambda: unet(noisy[erased], t[erased], cond[erased]).sample)  # noqa: B023
        if base is not None:
            saw_erased += 1
            with torch.no_grad():
                assert torch.equal(base, pristine(noisy[erased], t[erased], cond[erased]).sample)
        loss = erasure.loss(pred, torch.randn(pred.shape, generator=g), erased, base)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert saw_erased
    assert all(torch.equal(q, frozen[n]) for n, q in unet.named_parameters() if n in frozen)
