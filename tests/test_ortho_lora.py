"""OrthoLoraConfig / OrthoLoraModel: forward math, frozen basis, training, save/load, merging, adapters, errors."""

import copy
import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from peft_ortho import (
    BasisError,
    BasisMismatchError,
    OrthoLoraConfig,
    OrthoLoraModel,
    PeftOrthoType,
    UnsupportedLayerError,
    bases,
)

TARGETS = ["lin0", "lin1", "conv", "conv1x1"]
# input widths of the MLP fixture's targets: lin0 32, lin1 64, conv 16·3·3 = 144, conv1x1 8
WIDTHS = {"lin0": 32, "lin1": 64, "conv": 144, "conv1x1": 8}


def make_config(**kwargs):
    defaults = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "slot": 1, "init_lora_weights": False}
    defaults.update(kwargs)
    return OrthoLoraConfig(**defaults)


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 32, generator=g).to(dtype)
    img = torch.randn(2, 16, 6, 6, generator=g).to(dtype)
    return x, img


def lora_layers(model):
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def adapter_tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def expected_A(config, layer, adapter="default"):
    """The basis rows ``layer.lora_A[adapter]`` must hold, float64, flattened to ``(r, in)``."""
    weight = layer.lora_A[adapter].weight
    r, n = weight.shape[0], weight[0].numel()
    rows = config.basis_rows[bases.shape_key(n, r)]
    return bases.basis_rows(config.basis, config.basis_seed, n, rows)


def flat(weight):
    return weight.detach().flatten(1)


# --------------------------------------------------------------------------------------------- forward math


def test_model_class_and_peft_type(mlp):
    model = get_peft_model(mlp, make_config())
    assert isinstance(model.base_model, OrthoLoraModel)
    cfg = model.peft_config["default"]
    assert isinstance(cfg, OrthoLoraConfig)
    assert cfg.peft_type == PeftOrthoType.ORTHO_LORA and cfg.peft_type.value == "ORTHO_LORA"
    assert set(lora_layers(model)) == set(TARGETS)


def test_forward_linear_matches_reference(mlp):
    model = get_peft_model(mlp.double(), make_config(target_modules=["lin0", "lin1"]))
    x, _ = inputs(torch.float64)
    layers = lora_layers(model)
    s = 8 / 4
    for name in ("lin0", "lin1"):
        assert layers[name].scaling["default"] == s
        assert flat(layers[name].lora_B["default"].weight).abs().sum() > 0  # init_lora_weights=False: random B

    def ref_linear(layer, h):
        base = layer.get_base_layer()
        a = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        return h @ base.weight.T + base.bias + s * (h @ a.T) @ b.T

    h = torch.relu(ref_linear(layers["lin0"], x))
    expected = ref_linear(layers["lin1"], h)
    with torch.no_grad():
        out = model(x)
        base_out = mlp.lin1.base_layer(torch.relu(mlp.lin0.base_layer(x)))
    assert (out - expected).abs().max().item() < 1e-12
    assert (out - base_out).abs().max().item() > 1e-3  # the adapter does something


@pytest.mark.parametrize("name", ["conv", "conv1x1"])
def test_forward_conv2d_matches_reference(mlp, name):
    model = get_peft_model(mlp.double(), make_config(target_modules=[name]))
    layer = lora_layers(model)[name]
    base = layer.get_base_layer()
    a = layer.lora_A["default"].weight  # (r, C_in, k, k)
    b = layer.lora_B["default"].weight  # (out, r, 1, 1)
    assert a.shape[1:] == base.weight.shape[1:]
    # ΔW = B @ A with the kernel flattened, as peft (and docs/methods.md) define it for a k×k conv
    delta = (b.flatten(1) @ a.flatten(1)).reshape(base.weight.shape)
    img = torch.randn(2, base.in_channels, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = F.conv2d(img, base.weight + 2.0 * delta, base.bias, padding=base.padding)
        out = layer(img)
    assert (out - expected).abs().max().item() < 1e-12
    assert torch.equal(flat(a), expected_A(model.peft_config["default"], layer))


def test_forward_conv1d_gpt2_matches_reference(tiny_gpt2):
    gpt2 = tiny_gpt2.double()
    model = get_peft_model(
        gpt2,
        OrthoLoraConfig(r=4, lora_alpha=12, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True),
    )
    cfg = model.peft_config["default"]
    assert cfg.fan_in_fan_out  # transformers' Conv1D stores W as (in, out); peft flips the flag for it
    layers = lora_layers(model)
    assert set(layers) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    layer = layers["transformer.h.0.attn.c_attn"]
    base = layer.get_base_layer()
    assert type(base).__name__ == "Conv1D"
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    assert a.shape == (4, 32)  # in = n_embd
    assert torch.equal(a, expected_A(cfg, layer))
    x = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = x @ (base.weight + 3.0 * (b @ a).T) + base.bias
        out = layer(x)
    assert (out - expected).abs().max().item() < 1e-12


# --------------------------------------------------------------------------------------------- the frozen basis


@pytest.mark.parametrize(
    "selection",
    [{"slot": 1}, {"slot": 0}, {"slot": None, "concept_id": "alice/rex"}, {"slot": "random"}, {"slot": None}],
    ids=["slot1", "slot0", "concept", "random", "default"],
)
@pytest.mark.parametrize("kind", ["orthogonal", "gaussian"])
def test_lora_A_is_exactly_the_basis_rows(mlp, selection, kind):
    model = get_peft_model(mlp, make_config(basis=kind, basis_seed=7, **selection))
    cfg = model.peft_config["default"]
    assert cfg.basis_algorithm == bases.ALGORITHM_VERSION
    keys = {bases.shape_key(n, 4) for n in WIDTHS.values()}
    assert set(cfg.basis_rows) == keys and set(cfg.basis_checksums) == keys
    for name, layer in lora_layers(model).items():
        n = WIDTHS[name]
        key = bases.shape_key(n, 4)
        rows = cfg.basis_rows[key]
        if selection.get("concept_id"):
            assert rows == bases.slot_rows(bases.concept_slot("alice/rex", n, 4), 4)
        elif isinstance(selection.get("slot"), int):
            assert rows == bases.slot_rows(selection["slot"], 4)
        else:  # random (also the default when neither slot nor concept_id is given)
            assert cfg.slot == "random"
            assert rows == sorted(rows) and len(set(rows)) == 4 and 0 <= min(rows) and max(rows) < n
        a64 = bases.basis_rows(kind, 7, n, rows)
        assert torch.equal(flat(layer.lora_A["default"].weight), a64.to(torch.float32))
        assert cfg.basis_checksums[key] == bases.checksum(a64)
        assert not layer.lora_A["default"].weight.requires_grad


def test_rank_pattern_records_each_shape(mlp):
    model = get_peft_model(mlp, make_config(rank_pattern={"lin1": 8}, slot=1))
    cfg = model.peft_config["default"]
    assert cfg.basis_rows["64/8"] == list(range(8, 16))
    assert cfg.basis_rows["32/4"] == list(range(4, 8))
    assert "64/4" not in cfg.basis_rows
    layer = lora_layers(model)["lin1"]
    assert layer.lora_A["default"].weight.shape == (8, 64)
    assert torch.equal(flat(layer.lora_A["default"].weight), expected_A(cfg, layer).float())


def test_training_updates_lora_B_only(mlp):
    model = get_peft_model(mlp, make_config(init_lora_weights=True))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, img = inputs()
    target = inputs(seed=1)
    for _ in range(4):
        opt.zero_grad()
        y, z = model(x, img)
        loss = F.mse_loss(y, target[0]) + F.mse_loss(z, torch.zeros_like(z) + 0.3)
        loss.backward()
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" not in name:
                assert p.grad is None, name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert not torch.equal(p, before[name]), name
        else:  # lora_A and every base weight: bit-unchanged (AdamW's weight decay must not touch them)
            assert torch.equal(p, before[name]), name
    for layer in lora_layers(model).values():
        assert torch.equal(
            flat(layer.lora_A["default"].weight), expected_A(model.peft_config["default"], layer).float()
        )


def test_only_lora_B_is_trainable_across_set_adapter(mlp):
    model = get_peft_model(mlp, make_config(slot=0))
    model.add_adapter("other", make_config(slot=1))

    def lora_B_count(adapter):
        return sum(p.numel() for n, p in model.named_parameters() if f"lora_B.{adapter}." in n)

    assert model.get_nb_trainable_parameters()[0] == lora_B_count("default") > 0
    assert all(".lora_B.default." in n for n in trainable_names(model))
    model.set_adapter("other")
    assert model.active_adapter == "other"
    assert all(".lora_B.other." in n for n in trainable_names(model))
    assert model.get_nb_trainable_parameters()[0] == lora_B_count("other")
    model.set_adapter("default")
    assert all(".lora_B.default." in n for n in trainable_names(model))
    assert len(trainable_names(model)) == len(TARGETS)
    # both active, and peft's set_requires_grad: lora_A stays frozen through peft's frozen-weight mechanism
    model.base_model.set_adapter(["default", "other"])
    names = trainable_names(model)
    assert len(names) == 2 * len(TARGETS) and all("lora_B" in n for n in names)
    model.set_requires_grad(["default", "other"], requires_grad=True)
    assert all("lora_B" in n for n in trainable_names(model))
    assert len(trainable_names(model)) == 2 * len(TARGETS)


def test_print_trainable_parameters(mlp, capsys):
    model = get_peft_model(mlp, make_config(r=2))
    capsys.readouterr()
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    m = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", out)
    assert m, out
    trainable, total = (int(g.replace(",", "")) for g in m.groups()[:2])
    # lora_B only: out × r for every target
    assert trainable == 2 * (64 + 32 + 8 + 8)
    assert total == sum(p.numel() for p in model.parameters())
    assert abs(float(m.group(3)) - 100 * trainable / total) < 1e-3


# --------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    "selection",
    [{"slot": 1}, {"slot": "random"}, {"slot": None, "concept_id": "bob/mia"}],
    ids=["slot", "random", "concept"],
)
def test_save_load_roundtrip_bit_exact(mlp, tmp_path, selection):
    base = copy.deepcopy(mlp)
    model = get_peft_model(mlp, make_config(basis_seed=42, **selection))
    model.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        stored = json.load(f)
    assert stored["peft_type"] == "ORTHO_LORA"
    cfg = model.peft_config["default"]
    assert stored["basis_rows"] == cfg.basis_rows and stored["basis_checksums"] == cfg.basis_checksums

    loaded_cfg = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded_cfg) is OrthoLoraConfig
    assert loaded_cfg.peft_type == "ORTHO_LORA"
    for field in ("basis", "basis_seed", "slot", "concept_id", "basis_algorithm", "basis_rows", "basis_checksums"):
        assert getattr(loaded_cfg, field) == getattr(cfg, field), field

    loaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert isinstance(loaded.base_model, OrthoLoraModel)
    # random slots: the recorded rows are reused, not drawn again
    assert loaded.peft_config["default"].basis_rows == cfg.basis_rows
    want, got = adapter_tensors(model), adapter_tensors(loaded)
    assert set(want) == set(got) and len(want) == 2 * len(TARGETS)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    x, img = inputs()
    with torch.no_grad():
        for a, b in zip(model(x, img), loaded(x, img)):
            assert torch.equal(a, b)
    names = trainable_names(loaded)
    assert len(names) == len(TARGETS) and all("lora_B" in n for n in names)


@pytest.mark.parametrize("dtype", [torch.bfloat16])  # float32: test_tuner_contract
def test_low_cpu_mem_usage_loading(mlp, tmp_path, dtype):
    # adapters created on the meta device take their values from the checkpoint, still verified against the basis
    base = copy.deepcopy(mlp).to(dtype)
    model = get_peft_model(mlp.to(dtype), make_config())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True)
    want, got = adapter_tensors(model), adapter_tensors(loaded)
    assert set(want) == set(got)
    for key in want:
        assert not got[key].is_meta and torch.equal(want[key], got[key]), key
    x, img = inputs(dtype)
    with torch.no_grad():
        for u, v in zip(model(x, img), loaded(x, img)):
            assert torch.equal(u, v)


def test_random_slots_are_drawn_per_config(mlp):
    # the paper's behaviour: two adapters created with slot="random" draw their rows independently
    first = get_peft_model(copy.deepcopy(mlp), make_config(slot="random")).peft_config["default"].basis_rows
    second = get_peft_model(copy.deepcopy(mlp), make_config(slot="random")).peft_config["default"].basis_rows
    assert set(first) == set(second)
    assert first != second  # equal on all four shapes with probability < 1e-15


# --------------------------------------------------------------------------------------------- merging


def test_merge_unmerge_restores_base_weights(mlp):
    model = get_peft_model(mlp, make_config())
    layers = lora_layers(model)
    originals = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    x, img = inputs()
    with torch.no_grad():
        unmerged = model(x, img)
    model.merge_adapter()
    assert all(layer.merged for layer in layers.values())
    for name, layer in layers.items():
        w = layer.get_base_layer().weight
        b = layer.lora_B["default"].weight.detach()
        a = layer.lora_A["default"].weight.detach()
        delta = (flat(b) @ flat(a)).reshape(w.shape) * 2.0
        assert torch.allclose(w, originals[name] + delta, atol=1e-6), name
        assert not torch.allclose(w, originals[name], atol=1e-4), name
    with torch.no_grad():
        merged = model(x, img)
    for u, m in zip(unmerged, merged):
        assert torch.allclose(u, m, atol=1e-5)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers.values())
    for name, layer in layers.items():
        assert torch.allclose(layer.get_base_layer().weight, originals[name], atol=1e-6), name
    with torch.no_grad():
        for u, again in zip(unmerged, model(x, img)):
            assert torch.allclose(u, again, atol=1e-5)


# --------------------------------------------------------------------------------------------- several adapters


def test_multiple_adapters_disjoint_slots(mlp):
    base = copy.deepcopy(mlp).double()
    model = get_peft_model(mlp.double(), make_config(slot=0), adapter_name="rex")
    model.add_adapter("mia", make_config(slot=1))
    layers = lora_layers(model)
    # measured on the model's actual tensors: A_rex A_miaᵀ = 0
    for name, layer in layers.items():
        a_a = flat(layer.lora_A["rex"].weight)
        a_b = flat(layer.lora_A["mia"].weight)
        assert (a_a @ a_b.T).abs().max().item() < 1e-12, name
        assert (a_a @ a_a.T - torch.eye(4, dtype=torch.float64)).abs().max().item() < 1e-12, name

    x, img = inputs(torch.float64)
    with torch.no_grad():
        base_out = base(x, img)
        out_a = model(x, img)
        model.set_adapter("mia")
        assert model.active_adapter == "mia"
        out_b = model(x, img)
        with model.disable_adapter():
            disabled = model(x, img)
        after = model(x, img)
    for d, want in zip(disabled, base_out):
        assert torch.equal(d, want)
    for oa, ob, bo, af in zip(out_a, out_b, base_out, after):
        assert (oa - ob).abs().max().item() > 1e-3
        assert (oa - bo).abs().max().item() > 1e-3
        assert torch.equal(af, ob)

    # mia's lin0 is exactly W x + s B_mia A_mia x, and silent on inputs that live in rex's rows
    lin0 = layers["lin0"]
    w, bias = lin0.get_base_layer().weight, lin0.get_base_layer().bias
    with torch.no_grad():
        want_b = x @ w.T + bias + 2.0 * x @ (lin0.lora_B["mia"].weight @ lin0.lora_A["mia"].weight).T
        assert (lin0(x) - want_b).abs().max().item() < 1e-12
        x_in_a = (
            torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            @ lin0.lora_A["rex"].weight
        )
        assert (lin0(x_in_a) - (x_in_a @ w.T + bias)).abs().max().item() < 1e-12
        model.set_adapter("rex")
        assert (lin0(x_in_a) - (x_in_a @ w.T + bias)).abs().max().item() > 1e-3
        # both active: the deltas add
        model.base_model.set_adapter(["rex", "mia"])
        delta = (
            lin0.lora_B["rex"].weight @ lin0.lora_A["rex"].weight
            + lin0.lora_B["mia"].weight @ lin0.lora_A["mia"].weight
        )
        assert (lin0(x) - (x @ (w + 2.0 * delta).T + bias)).abs().max().item() < 1e-12


def test_multiple_adapters_save_load(mlp, tmp_path):
    base = copy.deepcopy(mlp)
    model = get_peft_model(mlp, make_config(slot=0), adapter_name="rex")
    model.add_adapter("mia", make_config(slot=1))
    model.save_pretrained(tmp_path)  # peft writes every adapter not named "default" to a subfolder
    loaded = PeftModel.from_pretrained(base, tmp_path / "rex", adapter_name="rex")
    loaded.load_adapter(tmp_path / "mia", adapter_name="mia")
    want, got = adapter_tensors(model), adapter_tensors(loaded)
    assert set(want) == set(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    x, img = inputs()
    with torch.no_grad():
        for adapter in ("rex", "mia"):
            model.set_adapter(adapter)
            loaded.set_adapter(adapter)
            for u, v in zip(model(x, img), loaded(x, img)):
                assert torch.equal(u, v)


# --------------------------------------------------------------------------------------------- dtypes


def test_dtype_moves_keep_lora_A_the_basis_cast(mlp):
    model = get_peft_model(mlp, make_config())
    cfg = model.peft_config["default"]
    layers = lora_layers(model)
    x, img = inputs()
    model.to(torch.bfloat16)
    for layer in layers.values():
        a = layer.lora_A["default"].weight
        assert a.dtype == torch.bfloat16
        assert torch.equal(flat(a), expected_A(cfg, layer).to(torch.bfloat16))
        assert torch.equal(flat(a), expected_A(cfg, layer).float().to(torch.bfloat16))
    with torch.no_grad():
        out = model(x.bfloat16(), img.bfloat16())
    assert out[0].dtype == torch.bfloat16 and torch.isfinite(out[0]).all()
    model.double()
    for layer in layers.values():
        a = layer.lora_A["default"].weight
        assert a.dtype == torch.float64
        # a float32→bf16→float64 journey cannot recover precision: it is the bf16 cast, widened
        assert torch.equal(flat(a), expected_A(cfg, layer).to(torch.bfloat16).double())


def test_double_model_holds_the_float64_basis(mlp):
    model = get_peft_model(mlp.double(), make_config())
    cfg = model.peft_config["default"]
    for layer in lora_layers(model).values():
        assert layer.lora_A["default"].weight.dtype == torch.float64
        assert torch.equal(flat(layer.lora_A["default"].weight), expected_A(cfg, layer))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_model(mlp, autocast):
    model = get_peft_model(mlp.to(torch.bfloat16), make_config(), autocast_adapter_dtype=autocast)
    cfg = model.peft_config["default"]
    dtype = torch.float32 if autocast else torch.bfloat16  # peft upcasts bf16 adapters by default
    for layer in lora_layers(model).values():
        assert layer.lora_A["default"].weight.dtype == dtype
        assert torch.equal(flat(layer.lora_A["default"].weight), expected_A(cfg, layer).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_model_roundtrip(mlp, tmp_path, dtype):
    # the usual diffusers recipe: base in bf16/fp16, adapter upcast to float32 by peft. The float32 lora_A must hold
    # the float32 basis (not a widened bf16 one), and the adapter must load back onto the same half-precision base.
    base = copy.deepcopy(mlp).to(dtype)
    model = get_peft_model(mlp.to(dtype), make_config(slot=0))
    model.add_adapter("mia", make_config(slot=1))
    for layer in lora_layers(model).values():
        a, b = flat(layer.lora_A["default"].weight), flat(layer.lora_A["mia"].weight)
        assert a.dtype == torch.float32
        assert (a.double() @ b.double().T).abs().max().item() < 1e-6
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    want, got = adapter_tensors(model), adapter_tensors(loaded)
    for key in got:
        assert torch.equal(want[key], got[key]), key
    x, img = inputs(dtype)
    with torch.no_grad():
        for u, v in zip(model(x, img), loaded(x, img)):
            assert torch.equal(u, v)


@pytest.mark.parametrize("move", ["bf16", "double", "bf16_then_float", "half"])
def test_save_after_dtype_move_loads(mlp, tmp_path, move):
    # A model trained in float32 and cast before saving still holds the named basis, rounded: loading accepts it.
    base = copy.deepcopy(mlp)
    model = get_peft_model(mlp, make_config())
    if move == "bf16":
        model.to(torch.bfloat16)
    elif move == "double":
        model.double()
    elif move == "bf16_then_float":
        model.to(torch.bfloat16).float()
    else:
        model.half()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(base, tmp_path)
    for key, got in adapter_tensors(loaded).items():
        stored = saved[key.replace(".default.", ".")]
        assert torch.equal(got, stored.to(got.dtype)), key


# --------------------------------------------------------------------------------------------- training machinery


def test_gradient_checkpointing_gpt2_trains_lora_B(tiny_gpt2):
    for m in tiny_gpt2.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    reference = get_peft_model(
        copy.deepcopy(tiny_gpt2), OrthoLoraConfig(r=4, target_modules=["c_attn"], slot=1, fan_in_fan_out=True)
    )
    tiny_gpt2.gradient_checkpointing_enable()
    tiny_gpt2.enable_input_require_grads()
    assert tiny_gpt2.is_gradient_checkpointing
    model = get_peft_model(tiny_gpt2, OrthoLoraConfig(r=4, target_modules=["c_attn"], slot=1, fan_in_fan_out=True))
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))

    calls = {"n": 0}
    layer = lora_layers(model)["transformer.h.0.attn.c_attn"]
    layer.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    grads = {}
    for name, m in (("ckpt", model), ("ref", reference)):
        m.train()
        m.zero_grad()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert calls["n"] == 2  # the block really was recomputed during backward
    assert set(grads["ckpt"]) == set(grads["ref"])
    assert grads["ckpt"] and all("lora_B" in n for n in grads["ckpt"])
    for n, g in grads["ckpt"].items():
        assert g.abs().sum() > 0, n
        assert torch.allclose(g, grads["ref"][n], rtol=1e-4, atol=1e-7), n
    before = adapter_tensors(model)
    torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1).step()
    after = adapter_tensors(model)
    for key in before:
        assert torch.equal(before[key], after[key]) == ("lora_A" in key), key


def test_torch_compile_matches_eager(mlp):
    torch._dynamo.reset()
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")  # the cheapest backend that still goes through dynamo and AOTAutograd
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    model = get_peft_model(mlp, make_config())
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x, img = inputs()
    eager = model(x, img)
    out = compiled(x, img)
    assert graphs and any("lora_b" in gm.code.lower() for gm in graphs)  # the adapter is inside the graph
    for e, c in zip(eager, out):
        assert torch.allclose(e, c, atol=1e-6)
    # backward through the compiled graph: same lora_B gradients, none for lora_A
    eager_grads = torch.autograd.grad(sum(o.sum() for o in eager), [p for p in model.parameters() if p.requires_grad])
    compiled_grads = torch.autograd.grad(sum(o.sum() for o in out), [p for p in model.parameters() if p.requires_grad])
    for g, h in zip(eager_grads, compiled_grads):
        assert torch.allclose(g, h, atol=1e-5)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_A" in n)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- errors


def test_rank_larger_than_input_width(mlp):
    with pytest.raises(BasisError, match="rank 16") as info:
        get_peft_model(mlp, make_config(r=16, target_modules=["conv1x1"]), adapter_name="rex")
    assert "'rex'" in str(info.value) and "'conv1x1'" in str(info.value)
    assert info.value.adapter == "rex" and info.value.layer == "conv1x1"


def test_slot_out_of_range(mlp):
    with pytest.raises(BasisError, match="slot 8 is out of range") as info:
        get_peft_model(mlp, make_config(slot=8, target_modules=["lin0"]), adapter_name="rex")  # 32 / 4 = 8 slots
    assert "'rex'" in str(info.value) and "'lin0'" in str(info.value)


def test_slot_out_of_range_on_second_adapter(mlp):
    model = get_peft_model(mlp, make_config(slot=0, target_modules=["lin0", "lin1"]))
    # 12 fits lin1 (64 / 4 = 16 slots) but not lin0 (8 slots)
    with pytest.raises(BasisError) as info:
        model.add_adapter("mia", make_config(slot=12, target_modules=["lin0", "lin1"]))
    assert "'mia'" in str(info.value) and "'lin0'" in str(info.value)


def test_unknown_basis_at_config_creation():
    with pytest.raises(ValueError, match="unknown basis 'haar'"):
        OrthoLoraConfig(r=4, target_modules=["lin0"], basis="haar")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slot": 1, "concept_id": "alice/rex"}, "either `slot` or `concept_id`"),
        ({"use_dora": True}, "use_dora"),
        ({"slot": -1}, "non-negative"),
        ({"slot": True}, "non-negative"),
        ({"slot": "first"}, "non-negative"),
        ({"concept_id": ""}, "non-empty"),
        ({"lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "gaussian"}, "init_lora_weights"),
        ({"basis_algorithm": "givens-butterfly-v0"}, "basis_algorithm"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        OrthoLoraConfig(r=4, target_modules=["lin0"], **kwargs)


def _saved(mlp, tmp_path, **kwargs):
    base = copy.deepcopy(mlp)
    model = get_peft_model(mlp, make_config(**kwargs))
    model.save_pretrained(tmp_path)
    return base


def _edit_config(path, edit):
    with open(path / "adapter_config.json") as f:
        data = json.load(f)
    edit(data)
    with open(path / "adapter_config.json", "w") as f:
        json.dump(data, f)


def test_edited_checksum_is_refused(mlp, tmp_path):
    base = _saved(mlp, tmp_path)
    _edit_config(tmp_path, lambda d: d["basis_checksums"].__setitem__("64/4", "0123456789abcdef"))
    with pytest.raises(BasisMismatchError, match="checksum") as info:
        PeftModel.from_pretrained(base, tmp_path, adapter_name="rex")
    assert "'rex'" in str(info.value) and "'lin1'" in str(info.value)  # lin1 is the only 64-wide layer


def test_edited_seed_is_refused(mlp, tmp_path):
    base = _saved(mlp, tmp_path)
    _edit_config(tmp_path, lambda d: d.__setitem__("basis_seed", 1))
    with pytest.raises(BasisMismatchError, match="checksum") as info:
        PeftModel.from_pretrained(base, tmp_path, adapter_name="rex")
    assert "'rex'" in str(info.value) and "'lin0'" in str(info.value)


def test_edited_rows_are_refused(mlp, tmp_path):
    base = _saved(mlp, tmp_path, slot=1)
    _edit_config(tmp_path, lambda d: d["basis_rows"].__setitem__("144/4", [0, 1, 2, 3]))
    with pytest.raises(BasisMismatchError, match="basis rows") as info:
        PeftModel.from_pretrained(base, tmp_path, adapter_name="rex")
    assert "'rex'" in str(info.value) and "'conv'" in str(info.value)


@pytest.mark.parametrize("edit", ["one_ulp", "swap_rows"])
def test_edited_lora_A_tensor_is_refused(mlp, tmp_path, edit):
    base = _saved(mlp, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.conv.lora_A.weight"
    a = tensors[key].clone()
    if edit == "one_ulp":
        a[2, 5, 1, 1] = torch.nextafter(a[2, 5, 1, 1], torch.tensor(10.0))
    else:
        a = a[[1, 0, 2, 3]].contiguous()  # right basis rows, wrong order: not the recorded rows
    tensors[key] = a
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(BasisMismatchError, match="lora_A differs") as info:
        PeftModel.from_pretrained(base, tmp_path, adapter_name="rex")
    assert "'rex'" in str(info.value) and "'conv'" in str(info.value)


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.c1 = nn.Conv1d(8, 8, 3)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.lin = nn.Linear(8, 8)


@pytest.mark.parametrize(("target", "message"), [("emb", "Embedding"), ("c1", "Conv1d"), ("grouped", "grouped")])
def test_unsupported_layer(target, message):
    model = WithUnsupported()
    with pytest.raises(UnsupportedLayerError, match=message) as info:
        get_peft_model(model, OrthoLoraConfig(r=2, target_modules=[target]), adapter_name="rex")
    assert "'rex'" in str(info.value) and f"'{target}'" in str(info.value)
    assert not isinstance(getattr(model, target), LoraLayer)  # refused before anything was modified


def test_reusing_a_random_slot_config_warns_about_the_collision(mlp):
    config = OrthoLoraConfig(r=4, target_modules=["lin0"], slot="random")
    first = get_peft_model(copy.deepcopy(mlp), config)
    with pytest.warns(UserWarning, match="already drew its rows for another adapter"):
        second = get_peft_model(copy.deepcopy(mlp), config)
    a1 = first.base_model.model.lin0.lora_A["default"].weight
    a2 = second.base_model.model.lin0.lora_A["default"].weight
    assert torch.equal(a1, a2)  # the collision the warning describes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh config per concept: no warning
        get_peft_model(copy.deepcopy(mlp), OrthoLoraConfig(r=4, target_modules=["lin0"], slot="random"))
