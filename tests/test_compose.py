"""``peft_ortho.compose``: resolution, exact stacking, delta-space methods, refusals, report, safe export.

Every expectation is computed independently of peft-ortho's own merge code: deltas come from peft's own LoRA layers
(``PeftModel.from_pretrained`` + ``get_delta_weight``), loaded files go through diffusers' real ``load_lora_weights``,
and delta-space merges are compared with ``peft.utils.merge_utils`` applied by hand.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import shutil
import warnings

import pytest
import torch
from conftest import build, edit_config
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file

import peft_ortho
import peft_ortho.hub
from peft_ortho import (
    AdapterFileError,
    BasisMismatchError,
    IncompatibleAdaptersError,
    OrthoLoraConfig,
    PeftOrthoError,
    testing,
)
from peft_ortho.merging import CollisionWarning, compose

UNET_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_LAYER_2 = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # (32 out, 32 in)
MLP_TARGETS = ["lin0", "lin1", "conv", "conv1x1"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


# ----------------------------------------------------------------------------------------------------- helpers


def ortho_config(**kw) -> OrthoLoraConfig:
    kw = {"r": 4, "lora_alpha": 8, "target_modules": testing.UNET_TARGETS, "init_lora_weights": False, **kw}
    return OrthoLoraConfig(**kw)


def lora_config(**kw) -> LoraConfig:
    kw = {"r": 3, "lora_alpha": 5, "target_modules": testing.UNET_TARGETS, "init_lora_weights": False, **kw}
    return LoraConfig(**kw)


def copy_adapter(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "adapter_config.json")) as f:
        return json.load(f)


def edit_tensors(folder: str, fn) -> None:
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def key(layer: str, kind: str) -> str:
    return f"base_model.model.{layer}.{kind}.weight"


def peft_deltas(base, folder: str) -> dict[str, torch.Tensor]:
    """ΔW per layer as peft's own LoRA layer computes it (``get_delta_weight``: alpha/r and layouts included)."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out[name] = module.get_delta_weight("default").detach().clone()
    return out


def as_out_in(base, name: str, delta: torch.Tensor) -> torch.Tensor:
    """A delta in the module's weight layout → ``(out, in)`` (transformers' Conv1D stores ``(in, out)``)."""
    module = base.get_submodule(name)
    if type(module).__name__ == "Conv1D":
        return delta.t()
    return delta.reshape(delta.shape[0], -1)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_float_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal up to float32 rounding of sums of a few products (relative to the magnitude involved)."""
    err = max_err(actual, expected)
    bound = 1e-6 * (1.0 + expected.abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def file_hashes(*paths) -> dict[str, str]:
    out = {}
    for path in paths:
        path = str(path)
        files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        for file in files:
            with open(file, "rb") as f:
                out[file] = hashlib.sha256(f.read()).hexdigest()
    return out


def forward(model, kind: str):
    with torch.no_grad():
        if kind == "unet":
            return model(**testing.unet_inputs(model)).sample
        if kind == "mlp":
            g = torch.Generator().manual_seed(1)
            y, img = model(torch.randn(3, 32, generator=g), torch.randn(2, 16, 5, 5, generator=g))
            return torch.cat([y.flatten(), img.flatten()])
        ids = torch.arange(12).reshape(2, 6) % 100
        return model(input_ids=ids).logits


@contextlib.contextmanager
def raises_naming(exc, *names):
    """``pytest.raises`` that also checks that every name (adapter, layer, value) appears in the message."""
    with pytest.raises(exc) as info:
        yield info
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"


# ----------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ad(unet0, tmp_path_factory):
    """Adapters on the tiny UNet, built once per module (tests copy a folder before editing it)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "o0": build(unet0, ortho_config(slot=0), root / "o0", seed=1),
        "o1": build(unet0, ortho_config(slot=1, lora_alpha=2), root / "o1", seed=2),
        "l0": build(unet0, lora_config(), root / "l0", seed=3),
        "l1": build(unet0, lora_config(r=2, lora_alpha=7), root / "l1", seed=4),
    }


# ----------------------------------------------------------------------------------------------------- exactness


def _build_family(kind: str, base, root) -> tuple[list[str], list[float]]:
    """Two orthogonal adapters + one plain LoRA, lora_alpha != r, weights != 1."""
    if kind == "unet":  # per-layer rank and alpha on the plain LoRA: the merged rank differs between layers
        targets, r, extra = testing.UNET_TARGETS, 4, {"rank_pattern": {"to_v": 5}, "alpha_pattern": {"to_k": 2.5}}
    elif kind == "mlp":  # Linear, k×k Conv2d (in = 16·9) and 1×1 Conv2d (in = 8); rsLoRA scaling alpha/sqrt(r)
        targets, r, extra = MLP_TARGETS, 2, {"use_rslora": True}
    else:  # transformers Conv1D (weights stored (in, out): fan_in_fan_out)
        targets, r, extra = GPT2_TARGETS, 4, {}
    fan = {"fan_in_fan_out": kind == "gpt2"}
    names = [
        build(base, ortho_config(r=r, lora_alpha=3 * r, slot=0, target_modules=targets, **fan), root / "a", seed=11),
        build(base, ortho_config(r=r, lora_alpha=1, slot=1, target_modules=targets, **fan), root / "b", seed=12),
        build(base, lora_config(r=3, lora_alpha=5, target_modules=targets, **fan, **extra), root / "c", seed=13),
    ]
    return names, [0.7, -1.3, 2.5]


@pytest.mark.parametrize("kind", ["unet", "mlp", "gpt2"])
def test_exact_stacking_equals_sum_of_peft_deltas_and_fuse(kind, request, tmp_path):
    base = request.getfixturevalue({"unet": "tiny_unet", "mlp": "mlp", "gpt2": "tiny_gpt2"}[kind])
    names, weights = _build_family(kind, base, tmp_path)
    expected: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights):
        for layer, d in peft_deltas(base, name).items():
            expected[layer] = expected.get(layer, 0) + w * d
    if kind == "mlp":
        assert base.conv.kernel_size == (3, 3) and "conv" in expected
    if kind == "gpt2":
        assert type(base.get_submodule("transformer.h.0.attn.c_attn")).__name__ == "Conv1D"

    merged = compose(names, weights=weights)
    assert merged.exact
    assert {name for _, name in merged.layers} == set(expected)
    for (_, layer), merged_layer in merged.layers.items():
        assert_float_close(merged_layer.delta_weight(), as_out_in(base, layer, expected[layer]), layer)

    fused = merged.fuse(copy.deepcopy(base))
    for layer, delta in expected.items():
        before, after = base.get_submodule(layer).weight, fused.get_submodule(layer).weight
        assert_float_close(after - before, delta, f"fused {layer}")

    # The PEFT export loads with plain peft and reproduces the fused model.
    out = tmp_path / "merged"
    merged.save_pretrained(str(out))
    config = read_config(str(out))
    assert config["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    torch.testing.assert_close(forward(loaded, kind), forward(fused, kind), atol=2e-5, rtol=1e-4)
    assert max_err(forward(fused, kind), forward(base, kind)) > 1e-3  # the merge does something


def test_stream_fuse_equals_in_memory_fuse(unet0, ad):
    names, weights = [ad["o0"], ad["o1"], ad["l0"]], [0.5, 2.0, -1.0]
    a = compose(names, weights=weights).fuse(copy.deepcopy(unet0))
    b = compose(names, weights=weights, stream=True).fuse(copy.deepcopy(unet0))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na


def test_orthogonal_disjoint_slots_have_no_basis_response(ad):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollisionWarning)
        merged = compose([ad["o0"], ad["o1"]])
    report = merged.report
    assert report.max_overlap() < 1e-6
    assert report.max_basis_response()[0] < 1e-6
    assert report.basis_response.abs().max().item() < 1e-6


# ----------------------------------------------------------------------------------------------------- sources


def test_single_safetensors_diffusers_layout_by_hand(unet0, tmp_path):
    torch.manual_seed(0)
    A1, B1 = torch.randn(4, 32), torch.randn(32, 4)
    A2, B2 = torch.randn(2, 32), torch.randn(32, 2)
    path = str(tmp_path / "hand.safetensors")
    save_file(
        {
            f"unet.{UNET_LAYER}.lora_A.weight": A1,
            f"unet.{UNET_LAYER}.lora_B.weight": B1,
            f"unet.{UNET_LAYER}.alpha": torch.tensor(6.0),
            f"unet.{UNET_LAYER_2}.lora_A.weight": A2,
            f"unet.{UNET_LAYER_2}.lora_B.weight": B2,
            f"unet.{UNET_LAYER_2}.alpha": torch.tensor(1.0),
        },
        path,
    )
    merged = compose([path], weights=[1.5])
    assert merged.sources[0].kind == "file"
    layers = {name: layer for (_, name), layer in merged.layers.items()}
    assert set(layers) == {UNET_LAYER, UNET_LAYER_2}
    assert_float_close(layers[UNET_LAYER].delta_weight(), 1.5 * 6.0 / 4 * B1 @ A1)
    assert_float_close(layers[UNET_LAYER_2].delta_weight(), 1.5 * 1.0 / 2 * B2 @ A2)
    fused = merged.fuse(copy.deepcopy(unet0))
    diff = fused.get_submodule(UNET_LAYER).weight - unet0.get_submodule(UNET_LAYER).weight
    assert_float_close(diff, 1.5 * 6.0 / 4 * B1 @ A1)


def test_single_file_written_by_save_diffusers(unet0, ad, tmp_path):
    """An adapter exported with ``peft_ortho.save_diffusers`` merges exactly like its PEFT folder."""
    names = [ad["o1"], ad["l0"]]  # lora_alpha != r for both
    files = [peft_ortho.save_diffusers(n, str(tmp_path / f"d{i}")) for i, n in enumerate(names)]
    from_files = compose(files, weights=[2.0, -0.5])
    from_folders = compose(names, weights=[2.0, -0.5])
    assert [s.kind for s in from_files.sources] == ["file", "file"]
    assert {(c, n) for c, n in from_files.layers} == {("unet", n) for _, n in from_folders.layers}
    for (_, name), layer in from_folders.layers.items():
        assert_float_close(from_files.layers[("unet", name)].delta_weight(), layer.delta_weight(), name)


def test_kohya_single_file(unet0, tmp_path):
    torch.manual_seed(0)
    k1 = "lora_unet_" + UNET_LAYER.replace(".", "_")
    k2 = "lora_unet_" + UNET_LAYER_2.replace(".", "_")
    down1, up1 = torch.randn(4, 32), torch.randn(32, 4)
    down2, up2 = torch.randn(2, 32), torch.randn(32, 2)
    path = str(tmp_path / "kohya.safetensors")
    save_file(
        {
            f"{k1}.lora_down.weight": down1,
            f"{k1}.lora_up.weight": up1,
            f"{k1}.alpha": torch.tensor(2.0),
            f"{k2}.lora_down.weight": down2,
            f"{k2}.lora_up.weight": up2,
            f"{k2}.alpha": torch.tensor(3.0),
        },
        path,
    )
    merged = compose([path])
    layers = {name: layer for (_, name), layer in merged.layers.items()}
    assert set(layers) == {UNET_LAYER, UNET_LAYER_2}
    assert_float_close(layers[UNET_LAYER].delta_weight(), 2.0 / 4 * up1 @ down1, UNET_LAYER)
    assert_float_close(layers[UNET_LAYER_2].delta_weight(), 3.0 / 2 * up2 @ down2, UNET_LAYER_2)
    fused = merged.fuse(copy.deepcopy(unet0))
    diff = fused.get_submodule(UNET_LAYER).weight - unet0.get_submodule(UNET_LAYER).weight
    assert_float_close(diff, 2.0 / 4 * up1 @ down1)


def test_diffusers_file_written_by_diffusers_matches_load_lora_weights(tmp_path):
    """A file saved by diffusers' own ``save_lora_weights`` (alpha != r in its metadata) means to compose what it
    means to diffusers: fusing it gives the same UNet output as ``pipe.load_lora_weights``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = testing.tiny_unet()
    config = LoraConfig(r=4, lora_alpha=12, target_modules=testing.UNET_TARGETS, init_lora_weights=False)
    torch.manual_seed(5)
    unet.add_adapter(config)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    out = tmp_path / "diffusers_lora"
    StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True
    )
    file = str(out / "pytorch_lora_weights.safetensors")

    pipe = testing.tiny_sd_pipeline()
    pipe.load_lora_weights(str(out))
    inputs = testing.unet_inputs(pipe.unet)
    with torch.no_grad():
        want = pipe.unet(**inputs).sample
    fused = compose([file]).fuse(testing.tiny_unet())
    with torch.no_grad():
        got = fused(**inputs).sample
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_mixing_peft_folder_and_diffusers_file_sums_on_shared_layers(unet0, ad, tmp_path):
    """A PEFT folder and a diffusers single file targeting the same UNet layer are one layer of the merge."""
    torch.manual_seed(0)
    A, B = torch.randn(2, 32), torch.randn(32, 2)
    path = str(tmp_path / "style.safetensors")
    save_file(
        {
            f"unet.{UNET_LAYER}.lora_A.weight": A,
            f"unet.{UNET_LAYER}.lora_B.weight": B,
            f"unet.{UNET_LAYER}.alpha": torch.tensor(2.0),
        },
        path,
    )
    expected = peft_deltas(unet0, ad["l0"])[UNET_LAYER] + B @ A
    merged = compose([ad["l0"], path])
    fused = merged.fuse(copy.deepcopy(unet0))
    diff = fused.get_submodule(UNET_LAYER).weight - unet0.get_submodule(UNET_LAYER).weight
    assert_float_close(diff, expected)
    # The PEFT export holds that layer once, with both contributions.
    out = tmp_path / "mixed"
    merged.save_pretrained(str(out))
    loaded = PeftModel.from_pretrained(copy.deepcopy(unet0), str(out))
    torch.testing.assert_close(forward(loaded, "unet"), forward(fused, "unet"), atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------- delta methods


def test_delta_space_methods_run(ad):
    names = [ad["l0"], ad["l1"]]
    for method in ["ties", "dare_linear", "dare_ties", "svd"]:
        merged = compose(names, weights=[0.8, 1.2], method=method, density=0.5)
        assert not merged.exact
        assert merged.layers
        for (_, name), layer in merged.layers.items():
            delta = layer.delta_weight()
            assert delta.shape == (layer.out_features, layer.in_features)
            assert torch.isfinite(delta).all(), (method, name)


def test_ties_equals_peft_merge_utils_on_deltas(unet0, ad):
    names, weights = [ad["l0"], ad["l1"], ad["o0"]], [0.8, 1.2, -0.6]
    deltas = [peft_deltas(unet0, n) for n in names]
    merged = compose(names, weights=weights, method="ties", density=0.4, majority_sign_method="total")
    for (_, layer), merged_layer in merged.layers.items():
        expected = merge_utils.ties(
            [d[layer] for d in deltas], torch.tensor(weights), density=0.4, majority_sign_method="total"
        )
        assert_float_close(merged_layer.delta_weight(), expected, layer)


def test_svd_export_records_its_error(unet0, ad, tmp_path):
    names = [ad["l0"], ad["l1"]]
    merged = compose(names, weights=[1.0, 0.5], method="svd", svd_rank=2)
    out = tmp_path / "svd"
    merged.save_pretrained(str(out))
    saved = load_file(str(out / "adapter_model.safetensors"))
    config = read_config(str(out))
    errors = {}
    for (_, layer), merged_layer in merged.layers.items():
        A, B = saved[key(layer, "lora_A")], saved[key(layer, "lora_B")]
        assert A.shape[0] == 2
        r = config["rank_pattern"].get(f"^{layer.replace('.', '[.]')}$", config["r"])
        scale = config["alpha_pattern"].get(f"^{layer.replace('.', '[.]')}$", config["lora_alpha"]) / r
        delta = merged_layer.delta_weight()
        measured = (torch.linalg.norm(delta - scale * B @ A) / torch.linalg.norm(delta)).item()
        assert merged_layer.svd_error is not None, layer
        assert 0 < merged_layer.svd_error < 1
        assert math.isclose(merged_layer.svd_error, measured, rel_tol=1e-3, abs_tol=1e-6), layer
        errors[layer] = merged_layer.svd_error
    assert max(errors.values()) > 1e-3  # rank 2 < 3 + 2: the truncation is lossy and says so


def test_svd_export_error_is_in_the_card(ad, tmp_path):
    """DESIGN/statement: "LoRA exports re-factor it with a truncated SVD (relative error per layer in the card)"."""
    merged = compose([ad["l0"], ad["l1"]], weights=[1.0, 0.5], method="svd", svd_rank=2)
    out = tmp_path / "svd"
    merged.save_pretrained(str(out))
    errors = {layer: m.svd_error for (_, layer), m in merged.layers.items()}
    card = (out / "README.md").read_text()
    worst = max(errors, key=errors.get)
    assert worst in card and "error" in card.lower()
    assert f"{errors[worst]:.3g}" in card or f"{errors[worst]:.2g}" in card


# ----------------------------------------------------------------------------------------------------- refusals


def test_refuses_different_base_model(ad, tmp_path):
    a = copy_adapter(ad["o0"], tmp_path / "a")
    b = copy_adapter(ad["o1"], tmp_path / "b")
    edit_config(a, base_model_name_or_path="org/base-one")
    edit_config(b, base_model_name_or_path="org/base-two")
    with raises_naming(IncompatibleAdaptersError, a, b, "org/base-one", "org/base-two"):
        compose([a, b])


def test_refuses_different_shapes(ad, tmp_path):
    other = testing.tiny_unet(block_out_channels=(16, 32))
    b = build(other, ortho_config(slot=1), tmp_path / "narrow", seed=3)
    with raises_naming(IncompatibleAdaptersError, b) as info:
        compose([ad["o0"], b])
    assert info.value.layer and info.value.layer in str(info.value)


def test_refuses_different_basis_seed(unet0, ad, tmp_path):
    b = build(unet0, ortho_config(slot=1, basis_seed=1), tmp_path / "seed1", seed=3)
    with raises_naming(IncompatibleAdaptersError, ad["o0"], b, "basis_seed"):
        compose([ad["o0"], b])


def test_refuses_different_basis_kind(unet0, ad, tmp_path):
    b = build(unet0, ortho_config(slot=1, basis="gaussian"), tmp_path / "gauss", seed=3)
    with raises_naming(IncompatibleAdaptersError, ad["o0"], b, "gaussian"):
        compose([ad["o0"], b])


def test_refuses_unknown_basis_algorithm(ad, tmp_path):
    b = copy_adapter(ad["o1"], tmp_path / "algo")
    edit_config(b, basis_algorithm="givens-butterfly-v9")
    with raises_naming(BasisMismatchError, b, "givens-butterfly-v9"):
        compose([ad["o0"], b])


def test_refuses_edited_checksum(ad, tmp_path):
    b = copy_adapter(ad["o1"], tmp_path / "checksum")
    checksums = read_config(b)["basis_checksums"]
    shape = sorted(checksums)[0]
    edit_config(b, basis_checksums={**checksums, shape: "0" * 16})
    with raises_naming(BasisMismatchError, b) as info:
        compose([ad["o0"], b])
    assert info.value.layer and info.value.layer in str(info.value)


def test_refuses_edited_lora_A(ad, tmp_path):
    b = copy_adapter(ad["o1"], tmp_path / "edited")

    def nudge(t):
        t[key(UNET_LAYER, "lora_A")][0, 0] += 1e-3

    edit_tensors(b, nudge)
    with raises_naming(BasisMismatchError, b, UNET_LAYER):
        compose([ad["o0"], b])


def test_refuses_unknown_peft_type(ad, tmp_path):
    b = copy_adapter(ad["l0"], tmp_path / "loha")
    edit_config(b, peft_type="LOHA")
    with raises_naming(AdapterFileError, b, "LOHA"):
        compose([ad["o0"], b])


def test_refuses_missing_lora_B(ad, tmp_path):
    b = copy_adapter(ad["l0"], tmp_path / "missing_b")
    edit_tensors(b, lambda t: t.pop(key(UNET_LAYER, "lora_B")))
    with raises_naming(AdapterFileError, b, UNET_LAYER, "lora_B"):
        compose([b])


def test_refuses_extra_unknown_key(ad, tmp_path):
    b = copy_adapter(ad["l0"], tmp_path / "extra")
    edit_tensors(b, lambda t: t.update({f"base_model.model.{UNET_LAYER}.lora_magnitude_vector": torch.ones(32)}))
    with raises_naming(AdapterFileError, b, UNET_LAYER):
        compose([b])


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("which", ["l0", "o1"])
def test_refuses_non_finite(ad, tmp_path, value, which):
    b = copy_adapter(ad[which], tmp_path / "bad")

    def poison(t):
        t[key(UNET_LAYER, "lora_B")][3, 1] = value

    edit_tensors(b, poison)
    with raises_naming(AdapterFileError, b, UNET_LAYER):
        compose([ad["o0" if which == "l0" else "l1"], b])


def test_refuses_non_finite_lora_A_of_plain_lora(ad, tmp_path):
    b = copy_adapter(ad["l0"], tmp_path / "bad_a")

    def poison(t):
        t[key(UNET_LAYER, "lora_A")][0, 2] = float("nan")

    edit_tensors(b, poison)
    with raises_naming(AdapterFileError, b, UNET_LAYER, "lora_A"):
        compose([b])


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_refuses_non_finite_weight(ad, weight):
    with raises_naming(PeftOrthoError, ad["o1"]):
        compose([ad["o0"], ad["o1"]], weights=[1.0, weight])


class _Trap:
    """Unpickling this creates ``path`` (what a malicious checkpoint could do instead)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_trap(path, marker) -> None:
    torch.save({"base_model.model.x.lora_A.weight": _Trap(str(marker))}, str(path))


def test_trap_pickle_works(tmp_path):
    """The check that the trap would fire if unpickled (so the refusal tests below prove something)."""
    marker = tmp_path / "fired"
    _write_trap(tmp_path / "trap.bin", marker)
    torch.load(str(tmp_path / "trap.bin"), weights_only=False)
    assert marker.exists()


def test_refuses_pickled_folder_without_unpickling(ad, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(os.path.join(ad["l0"], "adapter_config.json"), folder)
    marker = tmp_path / "UNPICKLED"
    _write_trap(folder / "adapter_model.bin", marker)
    with raises_naming(AdapterFileError, str(folder), "adapter_model.bin"):
        compose([str(folder)])
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_refuses_pickled_single_file_without_unpickling(tmp_path, suffix):
    path = str(tmp_path / f"lora{suffix}")
    marker = tmp_path / "UNPICKLED"
    _write_trap(path, marker)
    with raises_naming(AdapterFileError, path):
        compose([path])
    assert not marker.exists()


def test_refuses_corrupt_safetensors(ad, tmp_path):
    gen = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist())
    folder = copy_adapter(ad["l0"], tmp_path / "corrupt")
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
        f.write(noise)
    with raises_naming(AdapterFileError, folder):
        compose([folder])
    single = str(tmp_path / "corrupt.safetensors")
    with open(single, "wb") as f:
        f.write(noise)
    with raises_naming(AdapterFileError, single):
        compose([single])
    truncated = copy_adapter(ad["l0"], tmp_path / "truncated")
    path = os.path.join(truncated, "adapter_model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with raises_naming(AdapterFileError, truncated):
        compose([truncated])


def test_refuses_duplicate_names(ad):
    with raises_naming(IncompatibleAdaptersError, ad["o0"]):
        compose([ad["o0"], ad["o1"], ad["o0"]])
    with raises_naming(IncompatibleAdaptersError, ad["o0"] + "/"):
        compose([ad["o0"], ad["o0"] + "/"])


@pytest.mark.parametrize("name", ["./no-such-adapter", "no_such_adapter", "/nonexistent/dir/x", "missing.safetensors"])
def test_refuses_unknown_name(ad, name):
    with raises_naming(AdapterFileError, name):
        compose([ad["o0"], name])


def test_refuses_folder_without_adapter_config(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with raises_naming(AdapterFileError, str(folder)):
        compose([str(folder)])


def test_refuses_wrong_weight_count(ad):
    with pytest.raises(ValueError, match="2"):
        compose([ad["o0"], ad["o1"]], weights=[1.0])
    with pytest.raises(ValueError):
        compose([ad["o0"], ad["o1"]], weights=[1.0, 1.0, 1.0])


def test_refuses_unknown_method_and_empty_list(ad):
    with pytest.raises(ValueError, match="bogus"):
        compose([ad["o0"]], method="bogus")
    with pytest.raises(ValueError):
        compose([])


# ----------------------------------------------------------------------------------------------------- collisions


def _random_slot(unet0, rows, path, seed):
    config = ortho_config(slot="random", basis_rows={"32/4": list(rows), "64/4": list(rows)})
    return build(unet0, config, path, seed=seed)


def test_overlapping_random_slots_warn_with_shared_row_count(unet0, tmp_path):
    a = _random_slot(unet0, [0, 1, 2, 3], tmp_path / "a", seed=1)
    b = _random_slot(unet0, [2, 3, 4, 5], tmp_path / "b", seed=2)
    with pytest.warns(CollisionWarning) as record:
        merged = compose([a, b])
    message = " ".join(str(w.message) for w in record if issubclass(w.category, CollisionWarning))
    assert a in message and b in message
    assert "2 shared rows" in message
    report = merged.report
    assert report.basis_response[0, 1].item() > 1e-2 and report.basis_response[1, 0].item() > 1e-2
    # the warning carries the basis response: here every layer collides, so it is the report's larger direction
    warned = float(re.search(r"basis response there ([0-9.e+-]+)", message).group(1))
    expected = max(report.basis_response[0, 1].item(), report.basis_response[1, 0].item())
    assert math.isclose(warned, expected, rel_tol=1e-2)
    # two orthonormal rows shared out of four: overlap sqrt(2) / 4 on every layer
    for entry in report.layers.values():
        (overlap,) = entry["overlap"].values()
        assert math.isclose(overlap, math.sqrt(2) / 4, rel_tol=1e-5)
    # still exact
    assert merged.exact


def test_disjoint_random_slots_do_not_warn(unet0, tmp_path):
    a = _random_slot(unet0, [0, 1, 2, 3], tmp_path / "a", seed=1)
    b = _random_slot(unet0, [4, 5, 6, 7], tmp_path / "b", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollisionWarning)
        merged = compose([a, b])
    assert merged.report.max_overlap() < 1e-6
    assert merged.report.basis_response.abs().max().item() < 1e-6


# ----------------------------------------------------------------------------------------------------- report


def test_report_summary_json_and_plot(ad, tmp_path):
    names = [ad["o0"], ad["o1"], ad["l0"]]
    merged = compose(names, weights=[1.0, 0.5, 2.0])
    report = merged.report
    text = str(report)
    assert "basis response" in text and "overlap" in text
    for name in names:
        assert name in text
    data = json.loads(report.to_json())
    assert data["adapters"] == names
    n_layers = len(merged.layers)
    assert n_layers == 56 and len(data["layers"]) == n_layers
    entry = data["layers"][UNET_LAYER]
    assert set(entry) >= {"overlap", "basis_response", "sign_conflicts"}
    assert len(entry["overlap"]) == 3 and len(entry["basis_response"]) == 6
    assert len(data["pairwise_basis_response"]) == 3
    # orthogonal pair: no basis response; plain LoRA vs orthogonal: some
    assert data["pairwise_basis_response"][0][1] < 1e-6
    assert data["pairwise_basis_response"][0][2] > 1e-3
    path = tmp_path / "report.json"
    report.to_json(str(path))
    assert json.loads(path.read_text()) == data

    pytest.importorskip("matplotlib")
    png = tmp_path / "heat.png"
    assert report.plot(str(png)) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sign_conflicts_opposite_updates(unet0, tmp_path):
    """B = +c and B = -c on the same A: every changed weight moves in opposite directions (fraction exactly 1)."""
    a = build(unet0, lora_config(), tmp_path / "plus", seed=3)

    def constant(sign):
        def fn(t):
            for k in t:
                if ".lora_B." in k:
                    t[k] = torch.full_like(t[k], sign * 0.25)

        return fn

    b = copy_adapter(a, tmp_path / "minus")
    edit_tensors(a, constant(+1))
    edit_tensors(b, constant(-1))
    report = compose([a, b]).report
    assert report.sign_conflicts[0, 1].item() == 1.0
    assert report.sign_conflicts[1, 0].item() == 1.0
    assert all(next(iter(e["sign_conflicts"].values())) == 1.0 for e in report.layers.values())
    same = compose([a, copy_adapter(a, tmp_path / "plus2")]).report
    assert same.sign_conflicts[0, 1].item() == 0.0


# ----------------------------------------------------------------------------------------------------- safe export


def exploding_save_file(tensors, filename, *args, **kwargs):
    """A save that writes part of its file, then fails (disk full)."""
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise RuntimeError("disk full")


def test_interrupted_save_leaves_nothing(ad, tmp_path, monkeypatch):
    from peft_ortho.merging import save as export

    merged = compose([ad["o0"], ad["o1"]])
    parent = tmp_path / "outputs"
    parent.mkdir()

    monkeypatch.setattr(export, "save_file", exploding_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        merged.save_pretrained(str(parent / "out"))
    assert os.listdir(parent) == []

    # overwrite=True over an existing output: the interrupted save keeps the old one intact
    monkeypatch.undo()
    merged.save_pretrained(str(parent / "out"))
    before = file_hashes(parent / "out")
    monkeypatch.setattr(export, "save_file", exploding_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        merged.save_pretrained(str(parent / "out"), overwrite=True)
    assert os.listdir(parent) == ["out"]
    assert file_hashes(parent / "out") == before


def test_existing_out_dir_untouched_without_overwrite(ad, tmp_path):
    merged = compose([ad["o0"], ad["o1"]])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        merged.save_pretrained(str(out))
    with pytest.raises(FileExistsError):
        merged.save_diffusers(str(out))
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    merged.save_pretrained(str(out), overwrite=True)
    assert "adapter_config.json" in os.listdir(out) and "keep.txt" not in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_inputs_never_modified(unet0, ad, tmp_path):
    torch.manual_seed(0)
    single = str(tmp_path / "style.safetensors")
    save_file(
        {
            f"unet.{UNET_LAYER_2}.lora_A.weight": torch.randn(2, 32),
            f"unet.{UNET_LAYER_2}.lora_B.weight": torch.randn(32, 2),
        },
        single,
    )
    inputs = [ad["o0"], ad["o1"], ad["l0"], single]
    before = file_hashes(*inputs)
    merged = compose(inputs, weights=[1.0, 2.0, 0.5, 1.5])
    merged.fuse(copy.deepcopy(unet0))
    merged.save_pretrained(str(tmp_path / "out"))
    str(merged.report)
    for method in ("ties", "svd"):
        compose(inputs, method=method).save_pretrained(str(tmp_path / method))
    assert file_hashes(*inputs) == before


def test_interrupted_diffusers_save_leaves_nothing(ad, tmp_path, monkeypatch):
    import peft_ortho.diffusers_lora
    from peft_ortho.merging import save as export

    merged = compose([ad["o0"], ad["l0"]])
    parent = tmp_path / "outputs"
    parent.mkdir()

    monkeypatch.setattr(export, "save_file", exploding_save_file)
    monkeypatch.setattr(peft_ortho.diffusers_lora, "save_file", exploding_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        merged.save_diffusers(str(parent / "out"))
    assert os.listdir(parent) == []


# ----------------------------------------------------------------------------------------------------- diffusers export


def test_save_diffusers_loads_with_load_lora_weights(tmp_path):
    """``merged.save_diffusers`` + diffusers' real ``pipe.load_lora_weights`` == the merged UNet (``fuse``)."""
    pipe = testing.tiny_sd_pipeline()
    base = copy.deepcopy(pipe.unet)
    names = [
        build(base, ortho_config(slot=2, lora_alpha=3), tmp_path / "a", seed=21),
        build(base, ortho_config(slot=5, lora_alpha=16), tmp_path / "b", seed=22),
        # per-layer ranks and alphas: the merged rank differs between layers (rank_pattern in the export)
        build(
            base,
            lora_config(r=2, lora_alpha=7, rank_pattern={"to_q": 3}, alpha_pattern={"to_k": 1.5}),
            tmp_path / "c",
            seed=23,
        ),
    ]
    merged = compose(names, weights=[1.5, -0.5, 0.8])
    out = tmp_path / "merged-diffusers"
    path = merged.save_diffusers(str(out))
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors" and os.path.isfile(path)
    keys = list(load_file(path))
    assert keys and all(k.startswith("unet.") and "base_model" not in k for k in keys)

    pipe.load_lora_weights(str(out))
    fused = merged.fuse(copy.deepcopy(base))
    inputs = testing.unet_inputs(base)
    with torch.no_grad():
        got, want, plain = pipe.unet(**inputs).sample, fused(**inputs).sample, base(**inputs).sample
    assert max_err(want, plain) > 1e-3
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # fuse also takes the pipeline itself (PEFT-adapter layers go to pipe.unet)
    pipe2 = testing.tiny_sd_pipeline()
    assert merged.fuse(pipe2) is pipe2
    with torch.no_grad():
        torch.testing.assert_close(pipe2.unet(**inputs).sample, want, atol=1e-6, rtol=1e-6)


def test_mixed_sources_save_diffusers_keeps_every_adapter(unet0, ad, tmp_path):
    """A PEFT-folder adapter and a diffusers-file adapter (both UNet) exported to one diffusers file: nothing lost."""
    torch.manual_seed(0)
    path = str(tmp_path / "style.safetensors")
    save_file(
        {
            f"unet.{UNET_LAYER_2}.lora_A.weight": torch.randn(2, 32),
            f"unet.{UNET_LAYER_2}.lora_B.weight": torch.randn(32, 2),
        },
        path,
    )
    merged = compose([ad["l0"], path], weights=[1.0, 2.0])
    out = merged.save_diffusers(str(tmp_path / "out"))
    saved_layers = {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in load_file(out)}
    assert UNET_LAYER_2 in saved_layers  # from the single file
    assert UNET_LAYER in saved_layers  # from the PEFT folder (only it targets to_q of down_blocks.0)


# ----------------------------------------------------------------------------------------------------- Hub cache


@pytest.fixture
def hub_cache(unet0, ad, tmp_path):
    """A real huggingface_hub cache: alice/rex-ortho@main and bob/mia-ortho@main and @v1.2 (different files)."""
    from hubcache import populate_hub_cache

    cache = tmp_path / "hub"
    v12 = build(unet0, ortho_config(slot=3, lora_alpha=6), tmp_path / "mia-v1.2", seed=31)
    # alice's repo as peft_ortho.push_to_hub lays it out: adapter, card and a diffusers file beside it
    rex = peft_ortho.hub.save_pretrained(ad["o0"], tmp_path / "rex-repo", include_diffusers=True)
    assert os.path.isfile(os.path.join(rex, "pytorch_lora_weights.safetensors"))
    commits = {
        "alice/rex-ortho": populate_hub_cache(cache, "alice/rex-ortho", rex),
        "bob/mia-ortho": populate_hub_cache(cache, "bob/mia-ortho", ad["o1"]),
        "bob/mia-ortho@v1.2": populate_hub_cache(cache, "bob/mia-ortho", v12, revision="v1.2"),
    }
    assert len(set(commits.values())) == 3
    return str(cache), commits, {"alice/rex-ortho": ad["o0"], "bob/mia-ortho": ad["o1"], "bob/mia-ortho@v1.2": v12}


def test_hub_repo_ids_resolve_offline_and_record_commits(unet0, hub_cache, tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    cache, commits, local = hub_cache
    names = ["alice/rex-ortho", "bob/mia-ortho@v1.2"]
    merged = compose(names, weights=[0.5, 2.0], cache_dir=cache)
    for source, name in zip(merged.sources, names):
        assert source.kind == "hub" and source.name == name
        assert source.commit == commits[name]
        assert source.path.startswith(cache)
    assert merged.sources[0].repo_id == "alice/rex-ortho" and merged.sources[0].revision is None
    assert merged.sources[1].repo_id == "bob/mia-ortho" and merged.sources[1].revision == "v1.2"

    # @v1.2 is the v1.2 files, not main's: same merge as from the local folders
    expected = compose([local[n] for n in names], weights=[0.5, 2.0])
    for key_, layer in expected.layers.items():
        assert torch.equal(merged.layers[key_].delta_weight(), layer.delta_weight())
    main = compose(["bob/mia-ortho"], cache_dir=cache)
    assert main.sources[0].commit == commits["bob/mia-ortho"]

    out = tmp_path / "merged"
    merged.save_pretrained(str(out))
    card = (out / "README.md").read_text()
    for name in names:
        assert commits[name] in card
    assert "v1.2" in card and "alice/rex-ortho" in card and "bob/mia-ortho" in card


def test_hub_repo_not_in_cache_is_refused_offline(hub_cache):
    cache, _, _ = hub_cache
    for name in ["carol/not-cached", "bob/mia-ortho@v9.9"]:
        with raises_naming(AdapterFileError, name):
            compose(["alice/rex-ortho", name], cache_dir=cache)


def test_hub_duplicate_is_refused(hub_cache):
    cache, commits, _ = hub_cache
    with raises_naming(IncompatibleAdaptersError, "alice/rex-ortho"):
        compose(["alice/rex-ortho", f"alice/rex-ortho@{commits['alice/rex-ortho']}"], cache_dir=cache)


def test_hub_single_file_repo(hub_cache, tmp_path):
    """A Hub repo holding only a diffusers/kohya ``.safetensors`` (no adapter_config.json) resolves to that file."""
    from hubcache import populate_hub_cache

    cache, _, _ = hub_cache
    torch.manual_seed(0)
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    k = "lora_unet_" + UNET_LAYER.replace(".", "_")
    folder = tmp_path / "kohya-repo"
    folder.mkdir()
    save_file(
        {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(8.0)},
        str(folder / "style.safetensors"),
    )
    commit = populate_hub_cache(cache, "dave/kohya-style", folder, revision="v2")
    merged = compose(["dave/kohya-style@v2"], cache_dir=cache)
    assert merged.sources[0].commit == commit
    ((_, layer),) = merged.layers
    assert_float_close(merged.layers[("unet", layer)].delta_weight(), 2.0 * up @ down)


def test_hub_repo_with_only_pickled_weights_is_refused_unread(ad, tmp_path):
    from hubcache import populate_hub_cache

    folder = tmp_path / "pickled-repo"
    folder.mkdir()
    shutil.copy(os.path.join(ad["l0"], "adapter_config.json"), folder)
    marker = tmp_path / "UNPICKLED"
    _write_trap(folder / "adapter_model.bin", marker)
    cache = str(tmp_path / "hub")
    populate_hub_cache(cache, "eve/pickled", folder)
    with raises_naming(AdapterFileError, "eve/pickled"):
        compose(["eve/pickled"], cache_dir=cache)
    assert not marker.exists()
