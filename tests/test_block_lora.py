"""BlockLoraConfig / BlockLoraModel: block geometry, forward math, training, merging, save/load, export, compose, errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_ortho
from peft_ortho import BlockError, BlockLoraConfig, BlockLoraModel, IncompatibleAdaptersError, PeftOrthoType, compose
from peft_ortho import testing as pt
from peft_ortho.errors import AdapterFileError
from peft_ortho.tuners.block_lora import BlockLoraLayer
from peft_ortho.tuners.block_lora.layout import block_span, concept_block

TARGETS = ["lin0", "lin1", "conv", "conv1x1"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]


def make_config(**kwargs):
    defaults = {"r": 2, "lora_alpha": 3, "target_modules": TARGETS, "num_blocks": 4, "block_index": 1}
    defaults.update({"init_lora_weights": False, **kwargs})
    if "concept_id" in kwargs:
        del defaults["block_index"]
    return BlockLoraConfig(**defaults)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 32, generator=g), torch.randn(2, 16, 6, 6, generator=g)


def block_layers(model):
    return {
        name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, BlockLoraLayer)
    }


def weights_of(model):
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in block_layers(model).items()}


def outputs(model, seed=0):
    x, img = inputs(seed)
    y, z = model(x, img)
    return torch.cat([y.flatten(), z.flatten()])


# ------------------------------------------------------------------------------------------------ geometry


def test_block_spans_partition_the_axis():
    for n, k in [(64, 4), (320, 16), (10, 3), (7, 7)]:
        spans = [block_span(n, k, b) for b in range(k)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(spans[i][1] == spans[i + 1][0] for i in range(k - 1))
        assert max(e - s for s, e in spans) - min(e - s for s, e in spans) <= 1


def test_concept_id_is_hashed_deterministically():
    assert concept_block("alice/rex", 16) == concept_block("alice/rex", 16)
    # a stable golden value: two people on two machines must land on the same block
    assert (
        concept_block("alice/rex", 16)
        == int.from_bytes(__import__("hashlib").sha256(b"alice/rex").digest()[:8], "big") % 16
    )
    assert len({concept_block(f"concept-{i}", 16) for i in range(200)}) == 16


def test_config_records_peft_type_block_and_layout(mlp):
    model = get_peft_model(mlp, make_config(block_index=2))
    assert isinstance(model.base_model, BlockLoraModel)
    cfg = model.peft_config["default"]
    assert cfg.peft_type == PeftOrthoType.BLOCK_LORA
    assert cfg.resolved_block == 2
    # out widths 64, 32, 8, 8 split in 4 blocks: block 2
    assert cfg.block_layout == {"lin0": [64, 32, 48], "lin1": [32, 16, 24], "conv": [8, 4, 6], "conv1x1": [8, 4, 6]}


def test_random_block_is_drawn_once_and_recorded(mlp):
    cfg = make_config(block_index="random")
    get_peft_model(mlp, cfg)
    assert 0 <= cfg.resolved_block < 4
    reloaded = BlockLoraConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("peft_type", "peft_version")})
    assert reloaded.resolved_block == cfg.resolved_block


def test_a_random_block_refuses_weights_it_cannot_attribute(mlp, tmp_path):
    """A fresh ``block_index="random"`` adapter drew its own block, and a state dict does not say which block it was
    trained in (every block's factors have the same shapes): loading another adapter's weights into it, e.g. resuming
    a training run with a new random config, is refused naming adapter and layer, never put into the wrong block.
    Its own saved weights load back; with the saved config (``from_pretrained``) the recorded block is used."""
    from peft import set_peft_model_state_dict

    trained = get_peft_model(copy.deepcopy(mlp), make_config(block_index="random"))
    trained.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert not set_peft_model_state_dict(trained, state).unexpected_keys  # its own file, same process: accepted

    fresh = get_peft_model(copy.deepcopy(mlp), make_config(block_index="random"))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(BlockError, match=r"adapter 'default', layer '(lin0|lin1|conv|conv1x1)'.*drew block") as info:
        fresh.load_adapter(tmp_path, adapter_name="default")
    assert "block_index" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())

    loaded = PeftModel.from_pretrained(copy.deepcopy(mlp), tmp_path)
    assert loaded.peft_config["default"].resolved_block == trained.peft_config["default"].resolved_block
    assert torch.equal(outputs(loaded), outputs(trained))
    fixed = get_peft_model(copy.deepcopy(mlp), make_config(block_index=trained.peft_config["default"].resolved_block))
    set_peft_model_state_dict(fixed, state)  # a given block_index is the user's statement of the trained block
    assert torch.equal(outputs(fixed), outputs(trained))


# ------------------------------------------------------------------------------------------------ forward math


@pytest.mark.parametrize("axis", ["out", "in"])
def test_forward_matches_reference(mlp, axis):
    """Adapted output == base layer with ``W + ΔW`` where ΔW is the block-padded ``s · B A``, computed by hand."""
    ref = copy.deepcopy(mlp)
    model = get_peft_model(mlp, make_config(block_axis=axis, block_index=3))
    layers = block_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            start, end = layer.block_span["default"]
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            delta = (B.flatten(1) @ A.flatten(1)) * (3 / 2)
            W = getattr(ref, name).weight
            if layer.is_conv:
                delta = delta.reshape(B.shape[0], *A.shape[1:])
            if axis == "out":
                W[start:end] += delta
            else:
                W[:, start:end] += delta
    torch.testing.assert_close(outputs(model), outputs(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_update_is_supported_on_the_block_only(mlp, axis):
    """Measured on the tensors: ΔW is zero outside the block and not zero inside."""
    model = get_peft_model(mlp, make_config(block_axis=axis, block_index=1))
    for name, layer in block_layers(model).items():
        delta = layer.get_delta_weight("default")
        start, end = layer.block_span["default"]
        touched = (delta != 0).flatten(2) if delta.ndim == 4 else (delta != 0)
        touched = touched.any(-1) if touched.ndim == 3 else touched
        along = touched.any(1) if axis == "out" else touched.any(0)
        assert along.nonzero().flatten().tolist() == list(range(start, end)), name


def test_conv1d_gpt2_matches_merged_weights(tiny_gpt2):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    for axis in ("out", "in"):
        model = get_peft_model(
            copy.deepcopy(tiny_gpt2),
            BlockLoraConfig(
                r=2,
                target_modules=["c_attn", "c_proj"],
                num_blocks=4,
                block_index=2,
                block_axis=axis,
                init_lora_weights=False,
                fan_in_fan_out=True,
            ),
        )
        y = model(ids).logits
        base = copy.deepcopy(tiny_gpt2)
        with torch.no_grad():
            for name, layer in block_layers(model).items():
                base.get_submodule(name).weight += layer.get_delta_weight("default")
        torch.testing.assert_close(y, base(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y, tiny_gpt2(ids).logits)


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("axis", ["out", "in"])
def test_trainable_parameters_are_exactly_the_block(mlp, axis):
    model = get_peft_model(mlp, make_config(block_axis=axis))
    expected = 0
    for layer in block_layers(model).values():
        start, end = layer.block_span["default"]
        size, r, k = end - start, 2, layer.kernel_numel
        if axis == "out":  # B: (block_out, r); A: (r, in · k)
            expected += size * r + r * layer.in_features * k
        else:  # B: (out, r); A: (r, block_in · k)
            expected += layer.out_features * r + r * size * k
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    # no full-size tensor anywhere in the adapter
    full = sum(layer.get_base_layer().weight.numel() for layer in block_layers(model).values())
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == expected < full


def test_training_changes_only_the_block_and_both_factors_train(mlp):
    model = get_peft_model(mlp, make_config(init_lora_weights=True))
    before = weights_of(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, img = inputs()
    for _ in range(5):
        y, z = model(x, img)
        loss = (y - 1).square().mean() + (z - 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, layer in block_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, before[name])
        assert layer.lora_B["default"].weight.abs().sum() > 0
    model.merge_adapter()
    for name, layer in block_layers(model).items():
        changed = (layer.get_base_layer().weight != before[name]).flatten(1).any(1).nonzero().flatten().tolist()
        start, end = layer.block_span["default"]
        assert changed and set(changed) <= set(range(start, end)), name


def test_several_adapters_disable_and_set_adapter(mlp):
    reference = copy.deepcopy(mlp)
    ref = outputs(reference)
    model = get_peft_model(mlp, make_config(block_index=0))
    model.add_adapter("other", make_config(block_index=2))
    y_default = outputs(model)
    model.set_adapter("other")
    assert not torch.allclose(y_default, outputs(model))
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"other"}
    with model.disable_adapter():
        assert torch.equal(outputs(model), ref)
    # both active == the base model with both blocks' deltas added to its weights
    model.base_model.set_adapter(["default", "other"])
    both = outputs(model)
    with torch.no_grad():
        for name, layer in block_layers(model).items():
            getattr(reference, name).weight += layer.get_delta_weight("default") + layer.get_delta_weight("other")
    torch.testing.assert_close(both, outputs(reference), rtol=1e-5, atol=1e-6)
    model.merge_adapter(["default", "other"])
    torch.testing.assert_close(outputs(model), both, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("axis", ["out", "in"])
def test_save_load_roundtrip_bit_exact(mlp, tmp_path, axis):
    base = copy.deepcopy(mlp)
    model = get_peft_model(mlp, make_config(block_axis=axis, concept_id="alice/rex"))
    y = outputs(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BLOCK_LORA" and saved["resolved_block"] == concept_block("alice/rex", 4)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    layer = block_layers(model)["lin0"]
    start, end = layer.block_span["default"]
    key = "lora_B" if axis == "out" else "lora_A"
    dim = 0 if axis == "out" else 1
    assert stored[f"base_model.model.lin0.{key}.weight"].shape[dim] == end - start  # only the block is stored
    assert isinstance(PeftConfig.from_pretrained(tmp_path), BlockLoraConfig)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert torch.equal(outputs(loaded), y)
    for k, v in model.state_dict().items():
        if "lora_" in k:
            assert torch.equal(loaded.state_dict()[k], v)


def test_loading_on_another_base_model_is_refused(tmp_path):
    from torch import nn

    small = nn.Sequential(nn.Linear(8, 16))
    get_peft_model(small, BlockLoraConfig(r=2, target_modules=["0"], num_blocks=4, block_index=1)).save_pretrained(
        tmp_path
    )
    wider = nn.Sequential(nn.Linear(8, 32))
    with pytest.raises(BlockError, match=r"layer '0'.*another base model"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_dtype_moves(mlp):
    model = get_peft_model(mlp, make_config()).to(torch.float64)
    x, img = (t.double() for t in inputs())
    y, _ = model(x, img)
    assert y.dtype == torch.float64
    assert all(p.dtype == torch.float64 for n, p in model.named_parameters() if "lora_" in n)


# ------------------------------------------------------------------------------------------------ diffusers export


@pytest.mark.parametrize("axis", ["out", "in"])
def test_diffusers_loads_the_exported_block_adapter(tmp_path, axis):
    pipe = pt.tiny_sd_pipeline()
    unet = get_peft_model(
        pipe.unet,
        BlockLoraConfig(
            r=2,
            lora_alpha=3,
            target_modules=UNET_TARGETS,
            num_blocks=4,
            block_index=2,
            block_axis=axis,
            init_lora_weights=False,
        ),
    )
    inp = pt.unet_inputs(unet)
    with torch.no_grad():
        expected = unet(**inp).sample
    path = peft_ortho.save_diffusers(unet, tmp_path / "live")
    unet.save_pretrained(tmp_path / "folder")
    from_folder = peft_ortho.save_diffusers(tmp_path / "folder", tmp_path / "from_folder")
    assert load_file(path).keys() == load_file(from_folder).keys()
    for k, v in load_file(path).items():
        assert torch.equal(v, load_file(from_folder)[k])
    fresh = pt.tiny_sd_pipeline()
    fresh.load_lora_weights(str(tmp_path / "live"))
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(**inp).sample, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ compose


def _save_blocks(tmp_path, mlp, indices, **kwargs):
    paths, deltas = [], []
    for i in indices:
        model = get_peft_model(copy.deepcopy(mlp), make_config(block_index=i, **kwargs))
        torch.manual_seed(100 + i)
        for layer in block_layers(model).values():  # distinct, signed values in every block
            torch.nn.init.normal_(layer.lora_B["default"].weight)
        path = tmp_path / f"block{i}"
        model.save_pretrained(path)
        paths.append(str(path))
        deltas.append({n: layer.get_delta_weight("default") for n, layer in block_layers(model).items()})
    return paths, deltas


def test_compose_ten_blocks_is_the_exact_sum_without_sign_conflicts(mlp, tmp_path):
    paths, deltas = _save_blocks(tmp_path, mlp, range(10), num_blocks=16, r=1, lora_alpha=1, target_modules=["lin0"])
    merged = compose(paths, progress=False)
    ref = copy.deepcopy(mlp)
    with torch.no_grad():
        ref.lin0.weight += sum(d["lin0"] for d in deltas)
    fused = merged.fuse(copy.deepcopy(mlp))
    torch.testing.assert_close(fused.lin0.weight, ref.lin0.weight, rtol=0, atol=1e-6)
    off = ~torch.eye(10, dtype=torch.bool)
    assert merged.report.sign_conflicts[off].abs().max().item() == 0
    # disjoint support, measured: no weight is touched by two adapters
    support = torch.stack([d["lin0"] != 0 for d in deltas]).sum(0)
    assert support.max().item() == 1
    assert "disjoint weights" in merged.statement


def test_compose_blocks_exports_a_lora_diffusers_loads(tmp_path):
    pipe = pt.tiny_sd_pipeline()
    inp = pt.unet_inputs(pipe.unet)
    with torch.no_grad():
        base_out = pipe.unet(**inp).sample
    paths, expected = [], base_out.clone()
    for i in range(3):
        unet = get_peft_model(
            copy.deepcopy(pipe.unet),
            BlockLoraConfig(r=2, target_modules=UNET_TARGETS, num_blocks=4, block_index=i, init_lora_weights=False),
        )
        unet.save_pretrained(tmp_path / f"a{i}")
        paths.append(str(tmp_path / f"a{i}"))
        fused_one = unet.merge_and_unload()
        with torch.no_grad():
            expected += fused_one(**inp).sample - base_out  # first order check below is exact because ΔW adds
    merged = compose(paths, progress=False)
    merged.save_diffusers(str(tmp_path / "merged"))
    fresh = pt.tiny_sd_pipeline()
    fresh.load_lora_weights(str(tmp_path / "merged"))
    fused = merged.fuse(pt.tiny_sd_pipeline().unet)
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(**inp).sample, fused(**inp).sample, rtol=1e-5, atol=1e-5)


def test_compose_refuses_overlapping_blocks_naming_both(mlp, tmp_path):
    paths, _ = _save_blocks(tmp_path, mlp, [1])
    other = get_peft_model(copy.deepcopy(mlp), make_config(block_index=1))
    other.save_pretrained(tmp_path / "again")
    with pytest.raises(
        IncompatibleAdaptersError, match=r"block1', layer 'conv'.*overlaps block \[2, 4\) of adapter '.*again'"
    ):
        compose([paths[0], str(tmp_path / "again")], progress=False)


def test_compose_refuses_blocks_along_different_axes(mlp, tmp_path):
    a, _ = _save_blocks(tmp_path / "a", mlp, [0])
    b, _ = _save_blocks(tmp_path / "b", mlp, [1], block_axis="in")
    with pytest.raises(IncompatibleAdaptersError, match="'out' but adapter .* along 'in'"):
        compose(a + b, progress=False)


def test_compose_refuses_a_file_whose_block_does_not_match_its_layout(mlp, tmp_path):
    paths, _ = _save_blocks(tmp_path, mlp, [0, 2])
    cfg_path = tmp_path / "block2" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_layout"]["lin0"] = [64, 32, 40]  # says 8 rows; the file stores 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match=r"layer 'lin0'.*16 block channels"):
        compose(paths, progress=False)


# ------------------------------------------------------------------------------------------------ bad input


def test_block_index_out_of_range():
    with pytest.raises(ValueError, match=r"block_index must be 'random' or an int in \[0, num_blocks=4\)"):
        BlockLoraConfig(target_modules=["x"], num_blocks=4, block_index=4)


def test_rank_too_large_for_the_block(mlp):
    # conv1x1 has 8 output channels: 4 blocks of 2 rows cannot hold rank 3
    with pytest.raises(BlockError, match=r"layer 'conv'.*rank 3 is too large.*2×144"):
        get_peft_model(mlp, make_config(r=3))


def test_too_many_blocks_for_the_layer(mlp):
    with pytest.raises(BlockError, match=r"layer 'conv'.*8 output channels cannot be split into num_blocks=16"):
        get_peft_model(mlp, make_config(num_blocks=16, r=1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_axis": "rows"}, "block_axis must be one of"),
        ({"block_index": 1, "concept_id": "x"}, "either `block_index` or `concept_id`"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"num_blocks": 0}, "num_blocks must be a positive int"),
        ({"concept_id": ""}, "non-empty string"),
    ],
)
def test_config_validation(kwargs, message):
    base = {"target_modules": ["x"]}
    with pytest.raises(ValueError, match=message):
        BlockLoraConfig(**{**base, **kwargs})


def test_same_block_twice_in_one_model_warns(mlp):
    model = get_peft_model(mlp, make_config(block_index=1))
    with pytest.warns(UserWarning, match="uses the same block as adapter 'default'"):
        model.add_adapter("again", make_config(block_index=1))


def test_torch_compile_matches_eager(mlp):
    model = get_peft_model(mlp, make_config())
    x, _ = inputs()
    compiled = torch.compile(model.base_model.model.lin0, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model.base_model.model.lin0(x))
    loss = F.mse_loss(compiled(x), torch.zeros(3, 64))
    loss.backward()
    assert model.base_model.model.lin0.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("axis", ["out", "in"])
def test_compose_fuse_updates_blocks_alone_and_equals_the_sum(mlp, tmp_path, axis):
    """fuse writes each block adapter's block only (no padded GEMM); Linear, k×k and 1×1 convs, with a plain LoRA."""
    from peft import LoraConfig

    paths, deltas = _save_blocks(tmp_path, mlp, [0, 2, 3], block_axis=axis)
    plain = get_peft_model(copy.deepcopy(mlp), LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    plain.save_pretrained(tmp_path / "plain")
    deltas.append({n: plain.base_model.model.get_submodule(n).get_delta_weight("default") for n in TARGETS})
    merged = compose([*paths, str(tmp_path / "plain")], progress=False)
    assert all(layer.blocks is not None for layer in merged.layers.values())
    fused = merged.fuse(copy.deepcopy(mlp))
    for name in TARGETS:
        expected = getattr(mlp, name).weight + sum(d[name] for d in deltas)
        torch.testing.assert_close(getattr(fused, name).weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_compose_fuse_blocks_on_conv1d(tiny_gpt2, tmp_path, axis):
    paths, deltas = [], []
    for i in range(2):
        model = get_peft_model(
            copy.deepcopy(tiny_gpt2),
            BlockLoraConfig(
                r=2,
                target_modules=["c_attn"],
                num_blocks=4,
                block_index=i,
                block_axis=axis,
                init_lora_weights=False,
                fan_in_fan_out=True,
            ),
        )
        model.save_pretrained(tmp_path / f"g{i}")
        paths.append(str(tmp_path / f"g{i}"))
        deltas.append({n: layer.get_delta_weight("default") for n, layer in block_layers(model).items()})
    fused = compose(paths, progress=False).fuse(copy.deepcopy(tiny_gpt2))
    for name in deltas[0]:
        expected = tiny_gpt2.get_submodule(name).weight + deltas[0][name] + deltas[1][name]
        torch.testing.assert_close(fused.get_submodule(name).weight, expected, rtol=0, atol=1e-6)
