"""The peft contract every peft-ortho tuner keeps, on every layer type it supports (modelled on peft's
``tests/test_custom_models.py``).

A tuner is one row of ``TUNERS``: how to build its config, which layer kinds it adapts, which of its tensors are
frozen by design, and the error it raises when a state dict cannot be attributed to its placement. Adding a row gives
a new tuner the whole contract: identity at initialisation, bit-exact save/load (also under another adapter name and
with ``low_cpu_mem_usage``), state-dict keys free of adapter names, several adapters with set/disable/delete,
merge/unmerge/``merge_and_unload``, float16/bfloat16, ``torch.compile``, ``AutoPeftModel`` and transformers'
``load_adapter``, ``in_features``/``out_features``.

References are independent of the code under test: the base model's own output (identity, disabled, deleted), a
second model built from scratch (save/load, several adapters), the forward on activations against the merged weights.
"""

from __future__ import annotations

import copy
import json
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from peft import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    PeftConfig,
    PeftModel,
    PeftModelForCausalLM,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_ortho import (
    BasisMismatchError,
    BlockError,
    BlockLoraConfig,
    OrthoLoraConfig,
    SodaConfig,
    UnsupportedFeatureError,
    UnsupportedLayerError,
)

# ---------------------------------------------------------------------------------------------------- the tuners


@dataclass(frozen=True)
class Tuner:
    """One peft-ortho tuner as the contract sees it.

    ``config(targets, placement)``: an identity-initialised config adapting ``targets``; ``placement`` an int (a
    distinct, fixed slot/block per int: adapters 0 and 1 must be mergeable) or ``"random"``. ``layers``: the layer
    kinds of ``Toy`` it supports. ``frozen``: names of adapter parameters fixed by design (never randomised by the
    tests). ``placement_error``: what loading a foreign state dict into a ``"random"``-placed adapter raises (``None``:
    the tuner has no random placement). ``mixed_batches``: whether ``forward(..., adapter_names=[...])`` is
    implemented (otherwise it must be refused, never ignored).
    """

    name: str
    config: Callable[[list[str], object], PeftConfig]
    layers: tuple[str, ...]
    frozen: tuple[str, ...] = ()
    placement_error: Optional[type] = None
    mixed_batches: bool = False


TUNERS = [
    Tuner(
        "ortho_lora",
        lambda targets, placement: OrthoLoraConfig(r=2, lora_alpha=4, target_modules=targets, slot=placement),
        ("linear", "conv1x1", "conv3x3", "conv1d"),
        frozen=("lora_A",),
        placement_error=BasisMismatchError,
        mixed_batches=True,  # peft's LoRA forward
    ),
    Tuner(
        "block_lora",
        lambda targets, placement: BlockLoraConfig(
            r=2, lora_alpha=4, num_blocks=2, target_modules=targets, block_index=placement
        ),
        ("linear", "conv1x1", "conv3x3", "conv1d"),
        placement_error=BlockError,
    ),
    Tuner(
        "soda",
        lambda targets, placement: SodaConfig(target_modules=targets),
        ("linear", "conv1x1", "conv3x3"),
    ),
]
TUNER_BY_NAME = {t.name: t for t in TUNERS}


class Toy(nn.Module):
    """One layer of each kind the tuners adapt (``nn.Linear``, 1×1 and 3×3 ``nn.Conv2d``, transformers' ``Conv1D``),
    side by side so that each case adapts exactly one kind."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 16)
        self.conv1x1 = nn.Conv2d(8, 8, 1)
        self.conv3x3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv1d = Conv1D(16, 12)  # weight (12, 16): in × out

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        parts = [self.linear(x), self.conv1d(x), self.conv1x1(img), self.conv3x3(torch.relu(img))]
        return torch.cat([p.flatten(1) for p in parts], dim=1)


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def inputs(dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(3, 12, generator=g).to(dtype), "img": torch.randn(3, 8, 4, 4, generator=g).to(dtype)}


CASES = [pytest.param(t, layer, id=f"{t.name}-{layer}") for t in TUNERS for layer in t.layers]


def adapter_params(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """The adapter's own parameters: their names hold the adapter name as a whole segment."""
    return {
        n: p
        for n, p in model.named_parameters()
        if (f".{adapter}." in n or n.endswith(f".{adapter}")) and "base_layer" not in n
    }


@torch.no_grad()
def randomize(tuner: Tuner, model: nn.Module, adapter: str = "default") -> None:
    """Give the adapter non-trivial values (as training would), a function of the adapter's name and parameter names
    only, so the same adapter built on another model gets the same values; frozen-by-design tensors stay."""
    params = adapter_params(model, adapter)
    assert params, f"no parameters found for adapter {adapter!r}"
    for name, p in params.items():
        if any(f".{f}." in name for f in tuner.frozen):
            continue
        g = torch.Generator().manual_seed(zlib.crc32(f"{adapter}:{name.replace(adapter, '*')}".encode()))
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make(tuner: Tuner, layer: str, placement=0, adapter: str = "default", trained: bool = True) -> PeftModel:
    model = get_peft_model(toy(), tuner.config([layer], placement), adapter_name=adapter)
    if trained:
        randomize(tuner, model, adapter)
    return model.eval()


@torch.no_grad()
def run(model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return model(**inputs(dtype))


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


# ---------------------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("tuner, layer", CASES)
def test_identity_at_init(tuner, layer):
    """An untrained adapter computes exactly what the base model computes, bit for bit."""
    model = make(tuner, layer, trained=False)
    assert torch.equal(run(model), run(toy()))
    adapted = getattr(model.base_model.model, layer)
    assert not adapted.get_delta_weight("default").any()  # the update itself is zero, not merely small
    assert not torch.equal(run(make(tuner, layer)), run(toy()))  # and a trained one does not (the test can fail)


@pytest.mark.parametrize("tuner, layer", CASES)
def test_in_out_features(tuner, layer):
    """Adapter layers report their base layer's widths the way peft's own layers do (channels for convolutions)."""
    model = make(tuner, layer, trained=False)
    base = getattr(toy(), layer)
    widths = {
        "linear": (base.in_features, base.out_features) if isinstance(base, nn.Linear) else None,
        "conv1d": tuple(base.weight.shape),  # (in, out)
    }.get(layer) or (base.in_channels, base.out_channels)
    adapted = getattr(model.base_model.model, layer)
    assert isinstance(adapted, BaseTunerLayer)
    assert (adapted.in_features, adapted.out_features) == widths


@pytest.mark.parametrize("tuner, layer", CASES)
def test_save_load_bit_exact(tuner, layer, tmp_path):
    """``save_pretrained`` → ``PeftModel.from_pretrained`` on a fresh base: same tensors, same outputs, bit for bit;
    the same again with ``low_cpu_mem_usage`` (no tensor left on the meta device)."""
    model = make(tuner, layer, placement="random" if tuner.placement_error else 0)
    model.save_pretrained(tmp_path)
    want, out = adapter_tensors(model), run(model)
    for low_cpu in (False, True):
        loaded = PeftModel.from_pretrained(toy(), tmp_path, low_cpu_mem_usage=low_cpu).eval()
        got = adapter_tensors(loaded)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
        assert torch.equal(run(loaded), out)
        assert not any(t.is_meta for t in loaded.state_dict().values())


@pytest.mark.parametrize("tuner, layer", CASES)
def test_state_dict_keys_free_of_adapter_names(tuner, layer, tmp_path):
    """The saved keys do not depend on the adapter's name, so a file loads under any name."""
    a = make(tuner, layer, adapter="default")
    b = make(tuner, layer, adapter="zebra_7")
    keys_a, keys_b = get_peft_model_state_dict(a).keys(), get_peft_model_state_dict(b, adapter_name="zebra_7").keys()
    assert keys_a == keys_b and keys_a
    assert not any("default" in k or "zebra_7" in k for k in keys_a)
    b.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "zebra_7" / "adapter_model.safetensors"))
    assert on_disk.keys() == keys_a


@pytest.mark.parametrize("tuner, layer", CASES)
def test_load_under_another_adapter_name(tuner, layer, tmp_path):
    """A file saved as ``default`` loads as ``other`` (``from_pretrained``) and beside another adapter
    (``load_adapter``, low_cpu_mem_usage both ways) with every trained tensor in place: same outputs."""
    model = make(tuner, layer)
    model.save_pretrained(tmp_path)
    want = run(model)
    loaded = PeftModel.from_pretrained(toy(), tmp_path, adapter_name="other").eval()
    assert torch.equal(run(loaded), want)
    for low_cpu in (False, True):
        host = make(tuner, layer, placement=1, adapter="first")
        host.load_adapter(tmp_path, adapter_name="second", low_cpu_mem_usage=low_cpu)
        host.set_adapter("second")
        assert torch.equal(run(host), want)


@pytest.mark.parametrize("tuner, layer", CASES)
def test_state_dict_into_a_fresh_adapter(tuner, layer):
    """A bare state dict (no config) into a new adapter: reproduces the outputs where the config fixes the placement,
    and where the placement was drawn at random it is refused naming adapter and layer, never put in the wrong place."""
    model = make(tuner, layer, placement=0)
    state = get_peft_model_state_dict(model)
    fresh = make(tuner, layer, placement=0, trained=False)
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    assert torch.equal(run(fresh), run(model))
    if tuner.placement_error is None:
        return
    random_model = make(tuner, layer, placement="random")
    random_state = {k: v.clone() for k, v in get_peft_model_state_dict(random_model).items()}
    set_peft_model_state_dict(random_model, random_state)  # its own state dict: accepted
    again = make(tuner, layer, placement="random", trained=False)
    # Two random draws can coincide (a 1x1 conv of 8 channels at rank 2 has only 28 row pairs), and then loading is
    # right, not a case to refuse: redraw until the frozen-by-design tensors differ.
    for _ in range(100):
        frozen = [k for k in random_state if any(f".{f}." in k or k.endswith(f".{f}.weight") for f in tuner.frozen)]
        if not frozen or any(not torch.equal(random_state[k], adapter_tensors(again)[k]) for k in frozen):
            break
        again = make(tuner, layer, placement="random", trained=False)
    before = adapter_tensors(again)
    with pytest.raises(tuner.placement_error) as info:
        set_peft_model_state_dict(again, random_state)
    assert "'default'" in str(info.value) and f"'{layer}'" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(again).items())  # nothing loaded


@pytest.mark.parametrize("tuner, layer", CASES)
def test_several_adapters_set_disable_delete(tuner, layer):
    """Two adapters on one model: each active alone computes what it computes on its own model; disabled, the base;
    after deleting one, the other is unchanged and nothing of the deleted one remains."""
    alone_a, alone_b = make(tuner, layer, placement=0, adapter="a"), make(tuner, layer, placement=1, adapter="b")
    model = make(tuner, layer, placement=0, adapter="a")
    model.add_adapter("b", tuner.config([layer], 1))
    randomize(tuner, model, "b")
    model.eval()
    assert torch.equal(run(model), run(alone_a))
    model.set_adapter("b")
    assert torch.equal(run(model), run(alone_b))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in adapter_params(model, "b") if not any(f".{f}." in n for f in tuner.frozen)}
    with model.disable_adapter():
        assert torch.equal(run(model), run(toy()))
    assert torch.equal(run(model), run(alone_b))
    model.delete_adapter("a")
    assert list(model.peft_config) == ["b"] and not adapter_params(model, "a")
    assert not any(".a." in k for k in model.state_dict())
    assert torch.equal(run(model), run(alone_b))


@pytest.mark.parametrize("tuner, layer", CASES)
def test_mixed_adapter_batches(tuner, layer):
    """``model(..., adapter_names=[...])`` gives each row its own adapter (or the base for ``"__base__"``), or, where
    the tuner does not implement it, is refused: peft would otherwise run every row through the active adapter."""
    model = make(tuner, layer, placement=0, adapter="a")
    model.add_adapter("b", tuner.config([layer], 1))
    randomize(tuner, model, "b")
    model.eval()
    names = ["a", "b", "__base__"]
    if not tuner.mixed_batches:
        with pytest.raises(UnsupportedFeatureError, match="mixed adapter batches"):
            model(**inputs(), adapter_names=names)
        return
    with torch.no_grad():
        mixed = model(**inputs(), adapter_names=names)
    want = [run(make(tuner, layer, placement=0, adapter="a")), run(make(tuner, layer, placement=1, adapter="b"))]
    want.append(run(toy()))
    for row, reference in enumerate(want):
        torch.testing.assert_close(mixed[row], reference[row], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tuner, layer", CASES)
def test_merge_unmerge_and_unload(tuner, layer):
    """Merged weights compute what the adapter computes on activations; unmerging restores the base weights;
    ``merge_and_unload`` leaves a plain model of the base's layer types with the adapted behaviour."""
    model = make(tuner, layer)
    want, base_out = run(model), run(toy())
    weight = getattr(toy(), layer).weight
    model.merge_adapter()
    merged = run(model)
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-6)
    assert (merged - base_out).abs().max() > 1e-3  # the merge changed something
    model.unmerge_adapter()
    torch.testing.assert_close(
        getattr(model.base_model.model, layer).get_base_layer().weight, weight, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(run(model), want, rtol=1e-5, atol=1e-6)  # unmerge subtracts: exact up to rounding
    unloaded = model.merge_and_unload()
    assert type(getattr(unloaded, layer)) is type(getattr(toy(), layer))
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    torch.testing.assert_close(run(unloaded), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tuner, layer", CASES)
def test_half_precision(tuner, layer, dtype, tmp_path):
    """On a half-precision base: peft's autocast keeps the trainable tensors in float32 and the output in the model's
    dtype; an adapter kept in half saves and loads bit for bit; a float32 model cast wholly to half (adapter included)
    runs, merges and unloads. All close to the float32 result."""
    reference = make(tuner, layer)
    want = run(reference)
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype] * want.abs().max().item()

    def check(out):
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), want, rtol=0, atol=tol)

    for autocast in (True, False):
        model = get_peft_model(toy().to(dtype), tuner.config([layer], 0), autocast_adapter_dtype=autocast)
        trainable = [p.dtype for p in model.parameters() if p.requires_grad]
        assert trainable and set(trainable) == {torch.float32 if autocast else dtype}
        model.load_state_dict(reference.state_dict(), strict=False)  # the trained values (rounded where half)
        out = run(model.eval(), dtype)
        check(out)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(toy().to(dtype), tmp_path, autocast_adapter_dtype=False).eval()
    assert torch.equal(run(loaded, dtype), out)

    cast = copy.deepcopy(reference).to(dtype)
    check(run(cast, dtype))
    unloaded = cast.merge_and_unload()
    assert getattr(unloaded, layer).weight.dtype == dtype
    check(run(unloaded, dtype))


@pytest.mark.parametrize("tuner", [pytest.param(t, id=t.name) for t in TUNERS])
def test_torch_compile(tuner):
    """``torch.compile`` traces the adapted model (dynamo; the eager backend keeps this cheap on CPU): same forward,
    and gradients reach the trainable adapter tensors."""
    torch._dynamo.reset()
    model = make(tuner, "linear")
    want = run(model)
    compiled = torch.compile(model, backend="eager")
    x = inputs()
    got = compiled(**x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.square().sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)


# ------------------------------------------------------------------------------ transformers models and Auto classes


FAMILIES = {  # a tiny transformers model per layer kind: nn.Linear projections (Llama), Conv1D (GPT-2)
    "llama": (
        lambda: __import__("transformers").LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=50,
            max_position_embeddings=16,
        ),
        ["q_proj", "v_proj"],
        "linear",
    ),
    "gpt2": (
        lambda: __import__("transformers").GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16),
        ["c_attn"],
        "conv1d",
    ),
}
AUTO_CASES = [
    pytest.param(t, family, id=f"{t.name}-{family}")
    for t in TUNERS
    for family, (_, _, kind) in FAMILIES.items()
    if kind in t.layers
]


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory):
    """Each family's tiny causal LM, seeded and saved locally (``base_model_name_or_path`` of the adapters)."""
    from transformers import AutoModelForCausalLM

    paths = {}
    for family, (config, _, _) in FAMILIES.items():
        torch.manual_seed(0)
        paths[family] = tmp_path_factory.mktemp(family)
        AutoModelForCausalLM.from_config(config()).save_pretrained(paths[family])
    return paths


@pytest.mark.parametrize("tuner, family", AUTO_CASES)
def test_auto_peft_model_and_transformers_load_adapter(tuner, family, saved_bases, tmp_path):
    """A saved adapter on a transformers model loads through ``AutoPeftModelForCausalLM``, transformers' own
    ``model.load_adapter`` and (without a task type, on the bare transformer) ``AutoPeftModel``: the saved tensors,
    the same outputs."""
    from transformers import AutoModel, AutoModelForCausalLM

    base_dir, targets = saved_bases[family], FAMILIES[family][1]
    config = tuner.config(targets, "random" if tuner.placement_error else 0)
    config.task_type = "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "fan_in_fan_out is set to False but the target module is Conv1D"
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).eval()
    randomize(tuner, model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, PeftModelForCausalLM) and type(loaded.base_model) is type(model.base_model)
        got = get_peft_model_state_dict(loaded)
        assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
        assert torch.equal(loaded(ids).logits, want)

        hf = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        reference = hf(ids).logits
        hf.load_adapter(str(tmp_path), adapter_name="mine")
        got = hf.get_adapter_state_dict("mine")
        assert {f"base_model.model.{k}" for k in got} == saved.keys()
        assert all(torch.equal(v, saved[f"base_model.model.{k}"]) for k, v in got.items())
        assert torch.equal(hf(ids).logits, want) and not torch.equal(want, reference)

    config = tuner.config(targets, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare = get_peft_model(AutoModel.from_pretrained(base_dir), config).eval()
    randomize(tuner, bare)
    bare.save_pretrained(tmp_path / "bare")
    with torch.no_grad():
        loaded = AutoPeftModel.from_pretrained(tmp_path / "bare").eval()
        assert type(loaded.base_model) is type(bare.base_model)
        assert torch.equal(loaded(ids).last_hidden_state, bare(ids).last_hidden_state)


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("tuner", [pytest.param(t, id=t.name) for t in TUNERS])
def test_unsupported_layer_is_refused_by_name(tuner):
    """A target the tuner cannot adapt is refused before the model changes, naming adapter and layer."""

    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

    model = WithEmbedding()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = tuner.config(["emb"], 0)
    with pytest.raises(UnsupportedLayerError, match=f"Embedding is not supported by {type(config).__name__}") as info:
        get_peft_model(model, config)
    assert "'default'" in str(info.value) and "'emb'" in str(info.value)
    assert isinstance(model.emb, nn.Embedding)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_fourth_tuner_is_one_row():
    """The table drives every test above: each tuner runs on every layer kind it declares."""
    assert {t.name for t in TUNERS} == {"ortho_lora", "block_lora", "soda"}
    assert {c.values[1] for c in CASES if c.values[0].name == "soda"} == {"linear", "conv1x1", "conv3x3"}
    assert len(CASES) == sum(len(t.layers) for t in TUNERS)


def test_legacy_soda_rotation_keys_still_load(tmp_path):
    """Files written while SODA's rotation keys still held the adapter name (``soda_rotation.<name>.skew.j``) load
    under any adapter name with the trained rotation (not silently dropped)."""
    tuner = TUNER_BY_NAME["soda"]
    model = make(tuner, "linear")
    model.save_pretrained(tmp_path / "new")
    state = load_file(str(tmp_path / "new" / "adapter_model.safetensors"))
    assert any(".soda_rotation.skew." in k for k in state)
    for old_name in ("default", "dog"):
        legacy = tmp_path / old_name
        legacy.mkdir()
        (legacy / "adapter_config.json").write_text((tmp_path / "new" / "adapter_config.json").read_text())
        save_file(
            {k.replace(".soda_rotation.", f".soda_rotation.{old_name}."): v for k, v in state.items()},
            str(legacy / "adapter_model.safetensors"),
        )
        for name in ("default", "other"):
            loaded = PeftModel.from_pretrained(toy(), legacy, adapter_name=name).eval()
            assert torch.equal(run(loaded), run(model)), (old_name, name)
