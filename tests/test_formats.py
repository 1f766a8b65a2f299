"""Every model family and every file people share: DiT exports, community formats in and out, LLM merges.

Each test checks a property against an independent reference (a ΔW computed from the raw tensors in float64, the
peft model's own outputs, diffusers' own loader), and every path that used to give a silent wrong result with exit 0
has a test that it now refuses in one line.
"""

import json
import os

import pytest
import torch
from conftest import sd_lora_pair
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft_ortho import (
    AdapterFileError,
    BlockLoraConfig,
    OrthoLoraConfig,
    SodaConfig,
    UnsupportedAdapterError,
    compose,
    save_diffusers,
    save_kohya,
    testing,
)
from peft_ortho.lora_format import (
    community_format,
    find_module,
    infer_component,
    normalise_text_encoder_key,
    with_text_model_level,
)
from peft_ortho.merging import UnknownScaleWarning

ATOL = 1e-5


def _tuner_config(tuner: str):
    common = dict(r=2, lora_alpha=3, target_modules=testing.DIT_TARGETS)
    if tuner == "lora":
        return LoraConfig(init_lora_weights=False, **common)
    if tuner == "ortho":
        return OrthoLoraConfig(slot=1, **common)
    if tuner == "block":
        return BlockLoraConfig(num_blocks=2, block_index=1, init_lora_weights=False, **common)
    return SodaConfig(target_modules=testing.DIT_TARGETS)


def _train_step(model, inputs):
    """One Adam step on a random target, as a user's first training step (the ortho tuner's A stays frozen)."""
    with torch.no_grad():
        target = torch.randn_like(model(**inputs).sample)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(**inputs).sample, target).backward()
    opt.step()


# ------------------------------------------------------------------------------- 1. every family, every tuner


@pytest.mark.parametrize("tuner", ["lora", "ortho", "block"])
def test_train_export_with_defaults_load_lora_weights_reproduces(family, tuner, tmp_path):
    name, component, build = family
    peft_model = get_peft_model(build(), _tuner_config(tuner))
    inputs = testing.family_inputs(peft_model)
    _train_step(peft_model, inputs)
    expected = testing.family_output(peft_model, inputs)

    path = save_diffusers(peft_model, tmp_path / "out")  # no component: inferred from the model
    with safe_open(path, "pt") as f:
        assert {k.split(".", 1)[0] for k in f.keys()} == {component}
    _assert_loads_and_reproduces(family, tmp_path / "out", inputs, expected)


def test_soda_folder_has_no_lora_file_and_says_so_in_one_line(tmp_path):
    """A saved SODA adapter's update depends on the base weights: from its folder alone there is no LoRA to write;
    the message says to pass the live model (which ``save_diffusers`` converts by SVD, tests below)."""
    soda = get_peft_model(testing.tiny_flux_transformer(), _tuner_config("soda"))
    soda.save_pretrained(str(tmp_path / "folder"))
    with pytest.raises(UnsupportedAdapterError) as info:
        save_diffusers(str(tmp_path / "folder"), tmp_path / "out")
    assert "SODA" in str(info.value) and "\n" not in str(info.value) and "live model" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_soda_save_diffusers_exact_loads_with_load_lora_weights_and_reproduces(family, tmp_path):
    """save_diffusers dispatches per tuner: SODA through its LoRA conversion (svd_rank=None: exact, full rank)."""
    name, component, build = family
    peft_model = get_peft_model(build(), _tuner_config("soda"))
    inputs = testing.family_inputs(peft_model)
    _train_step(peft_model, inputs)
    expected = testing.family_output(peft_model, inputs)

    path = save_diffusers(peft_model, tmp_path / "out", svd_rank=None)
    with safe_open(path, "pt") as f:
        assert {k.split(".", 1)[0] for k in f.keys()} == {component}
        provenance = json.loads(f.metadata()["peft_ortho_adapter_config"])
    assert provenance[component]["peft_type"] == "SODA"
    assert provenance[component]["soda_export"]["relative_error"] == 0.0
    _assert_loads_and_reproduces(family, tmp_path / "out", inputs, expected)


def test_soda_save_diffusers_low_rank_reports_its_error_in_the_card(tmp_path):
    from peft_ortho.tuners.soda import soda_lora_state_dict

    soda = get_peft_model(testing.tiny_flux_transformer(), _tuner_config("soda"))
    _train_step(soda, testing.family_inputs(soda))
    path = save_diffusers(soda, tmp_path / "out", svd_rank=2)
    _, _, report = soda_lora_state_dict(soda, rank=2)
    assert 0 < report.relative_error < 1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "rank-2" in card and f"{report.relative_error:.3g}" in card and "SODA" in card
    with safe_open(path, "pt") as f:
        provenance = json.loads(f.metadata()["peft_ortho_adapter_config"])
    assert provenance["transformer"]["soda_export"]["relative_error"] == pytest.approx(report.relative_error)


def test_dit_adapter_named_unet_is_refused(tmp_path):
    """Formerly: ``unet.*`` keys for a Flux transformer, which FluxPipeline ignores with a log line."""
    flux = get_peft_model(testing.tiny_flux_transformer(), _tuner_config("lora"))
    with pytest.raises(UnsupportedAdapterError, match="component='unet'.*pass component='transformer'"):
        save_diffusers(flux, tmp_path / "out", component="unet")
    flux.save_pretrained(str(tmp_path / "folder"))
    with pytest.raises(UnsupportedAdapterError, match="component='unet'"):
        save_diffusers(str(tmp_path / "folder"), tmp_path / "out", component="unet")
    assert infer_component(flux) == "transformer"
    assert save_diffusers(str(tmp_path / "folder"), tmp_path / "out").endswith(".safetensors")  # inferred
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())


def _assert_loads_and_reproduces(family, folder, inputs, expected):
    """Plain ``load_lora_weights`` of ``folder`` into a fresh base reproduces ``expected`` (and the adapter matters)."""
    name, component, build = family
    pipe = testing.empty_pipeline(name, **{component: build()})
    base_out = testing.family_output(getattr(pipe, component), inputs)
    pipe.load_lora_weights(str(folder))
    got = testing.family_output(getattr(pipe, component), inputs)
    assert (expected - base_out).abs().max() > 1e-4  # the adapter changes the output: the check can fail
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=100, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4)
    return T5EncoderModel(config).eval()


def test_flux_t5_text_encoder_part_is_refused_by_name(tmp_path):
    """Formerly: ``text_encoder_2.*`` (T5) keys that FluxPipeline drops without a word."""
    flux = get_peft_model(testing.tiny_flux_transformer(), _tuner_config("lora"))
    t5 = get_peft_model(_tiny_t5(), LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False))
    with pytest.raises(UnsupportedAdapterError, match="text_encoder_2 is a T5 text encoder") as info:
        save_diffusers({"transformer": flux, "text_encoder_2": t5}, tmp_path / "out")
    assert "\n" not in str(info.value) and "SelfAttention" in str(info.value)
    # A CLIP part under a component the pipeline does not load is refused against _lora_loadable_modules.
    clip = get_peft_model(testing.tiny_text_encoder(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(
        UnsupportedAdapterError, match=r"FluxPipeline loads LoRAs only into \['transformer', 'text_encoder'\]"
    ):
        save_diffusers({"transformer": flux, "text_encoder_2": clip}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # ... and SDXL's pipeline does load a second CLIP encoder.
    assert save_diffusers({"text_encoder_2": clip}, tmp_path / "ok", pipeline="sdxl")


def test_compose_flux_folders_export_fuse_into_transformer(tmp_path):
    """compose of Flux adapters: the diffusers file holds ``transformer.*`` and fuse(pipeline) fuses the DiT."""
    inputs = testing.family_inputs(testing.tiny_flux_transformer())
    folders, models = [], []
    for i, slot in enumerate((0, 1)):
        m = get_peft_model(
            testing.tiny_flux_transformer(), OrthoLoraConfig(r=2, slot=slot, target_modules=testing.DIT_TARGETS)
        )
        _train_step(m, inputs)
        m.save_pretrained(str(tmp_path / f"a{i}"))
        folders.append(str(tmp_path / f"a{i}"))
        models.append(m)
    merged = compose(folders, progress=False)
    path = merged.save_diffusers(str(tmp_path / "merged"))
    with safe_open(path, "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    pipe = testing.empty_pipeline("flux", transformer=testing.tiny_flux_transformer())
    pipe.load_lora_weights(str(tmp_path / "merged"))
    loaded = testing.family_output(pipe.transformer, inputs)

    fused_pipe = testing.empty_pipeline("flux", transformer=testing.tiny_flux_transformer())
    merged.fuse(fused_pipe)  # into the pipeline's transformer, the component the merge has
    fused = testing.family_output(fused_pipe.transformer, inputs)
    # Independent reference: W + Σ ΔW_i with each adapter's own get_delta_weight.
    ref = testing.tiny_flux_transformer()
    with torch.no_grad():
        for m in models:
            for name, mod in m.get_base_model().named_modules():
                if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
                    ref.get_submodule(name).weight += mod.get_delta_weight("default")
    expected = testing.family_output(ref, inputs)
    torch.testing.assert_close(fused, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(loaded, expected, atol=ATOL, rtol=0)
    card = open(tmp_path / "merged" / "README.md").read()
    assert "pipeline_tag: text-to-image" in card and "template:sd-lora" in card


# ------------------------------------------------------------------------------- 2. community files in


def _pair(prefix, out, inn, *, alpha=None, down="lora_down", up="lora_up", seed=0):
    """One LoRA module as community tools write it: ``<prefix>.lora_down.weight`` ``(r, in)``, ``lora_up`` ``(out, r)``."""
    g = torch.Generator().manual_seed(seed + out * 7 + inn)
    tensors = {
        f"{prefix}.{down}.weight": torch.randn(2, inn, generator=g),
        f"{prefix}.{up}.weight": torch.randn(out, 2, generator=g) * 0.1,
    }
    if alpha is not None:
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return tensors


def _delta(tensors, prefix, rows=None, *, down="lora_down", up="lora_up"):
    """Independent ΔW in float64: ``(alpha / r) · up[rows] @ down`` from the raw file tensors."""
    a = tensors[f"{prefix}.{down}.weight"].double()
    b = tensors[f"{prefix}.{up}.weight"].double()
    alpha = tensors.get(f"{prefix}.alpha")
    scale = 1.0 if alpha is None else float(alpha) / a.shape[0]
    b = b if rows is None else b[rows]
    return scale * b @ a


def _write(tmp_path, name, tensors, metadata=None):
    path = str(tmp_path / name)
    save_file(tensors, path, metadata=metadata)
    return path


def _weight(pipe, key):
    component, name = key.split(".", 1)
    part = pipe.components[component]
    try:
        return part.get_submodule(name).weight.detach()
    except AttributeError:  # CLIP in transformers < 5.x nests under text_model
        return part.get_submodule(f"text_model.{name}").weight.detach()


def _fused_deltas(merged, pipe, expected):
    """Fuse the merge into ``pipe`` and return ``{component.layer: W_after - W_before}`` for ``expected``'s layers."""
    before = {k: _weight(pipe, k).clone() for k in expected}
    merged.fuse(pipe)
    return {k: (_weight(pipe, k) - before[k]).double() for k in expected}


def _assert_deltas(got, expected):
    for k, ref in expected.items():
        torch.testing.assert_close(got[k], ref, atol=1e-6, rtol=1e-5, msg=k)


def test_kohya_sdxl_sgm_names_merge_exactly(tmp_path):
    """sd-scripts' SDXL names (input_blocks_4_1, middle_block_1, output_blocks_0_1) land on the right layers.

    Formerly read with the SD1.x converter as ``down_blocks.4.1…`` and reported exact; the export did nothing.
    """
    f = {}
    f.update(_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 64, 64, alpha=1))
    f.update(_pair("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k", 64, 64, alpha=4))
    f.update(_pair("lora_unet_output_blocks_0_1_proj_in", 64, 64, alpha=2))
    f.update(_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32, alpha=1))
    f.update(_pair("lora_te2_text_model_encoder_layers_1_mlp_fc1", 64, 32, alpha=3))
    assert community_format(f) == "kohya-sdxl-sgm"
    path = _write(tmp_path, "sdxl_kohya.safetensors", f)
    expected = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": _delta(
            f, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
        ),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": _delta(
            f, "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"
        ),
        "unet.up_blocks.0.attentions.0.proj_in": _delta(f, "lora_unet_output_blocks_0_1_proj_in"),
        "text_encoder.encoder.layers.0.self_attn.q_proj": _delta(
            f, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        ),
        "text_encoder_2.encoder.layers.1.mlp.fc1": _delta(f, "lora_te2_text_model_encoder_layers_1_mlp_fc1"),
    }
    pipe = testing.empty_pipeline(
        "sdxl",
        unet=testing.tiny_sdxl_unet(),
        text_encoder=testing.tiny_text_encoder(),
        text_encoder_2=testing.tiny_text_encoder(seed=1),
    )
    merged = compose([path], base=pipe, progress=False)  # family and layers_per_block from the base pipeline
    assert merged.adapters[0].config["family"] == "sdxl"
    _assert_deltas(_fused_deltas(merged, pipe, expected), expected)
    assert compose([path], progress=False).adapters[0].config["family"] == "sdxl"  # ... or from the keys
    # Read as SD1.x (the former behaviour), the file is refused instead of mapped to invented names.
    with pytest.raises(AdapterFileError, match="kohya-sdxl-sgm LoRA \\(sdxl\\) but family='sd'"):
        compose([path], family="sd", progress=False)


def _sdxl_pipe():
    return testing.empty_pipeline(
        "sdxl",
        unet=testing.tiny_sdxl_unet(),
        text_encoder=testing.tiny_text_encoder(),
        text_encoder_2=testing.tiny_text_encoder(seed=1),
    )


def test_kohya_sdxl_file_with_diffusers_module_names_merges_exactly(tmp_path):
    """sd-scripts' SDXL files in diffusers module names (``lora_unet_down_blocks_1_…``, ``lora_te1_`` and
    ``lora_te2_`` for the two text encoders) land on the same layers (independent ΔW per layer)."""
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_v_proj"
    te2 = "lora_te2_text_model_encoder_layers_1_mlp_fc2"
    f = {**_pair(q, 64, 64, alpha=1), **_pair(k, 64, 64, alpha=3), **_pair(te1, 32, 32), **_pair(te2, 32, 64, alpha=2)}
    expected = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": _delta(f, q),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": _delta(f, k),
        "text_encoder.encoder.layers.0.self_attn.v_proj": _delta(f, te1),
        "text_encoder_2.encoder.layers.1.mlp.fc2": _delta(f, te2),
    }
    pipe = _sdxl_pipe()
    merged = compose([_write(tmp_path, "sdxl_diffusers_names.safetensors", f)], base=pipe, progress=False)
    assert merged.adapters[0].config["family"] == "sdxl"
    _assert_deltas(_fused_deltas(merged, pipe, expected), expected)


def test_lycoris_locon_conv_layers_merge_exactly(tmp_path):
    """LyCORIS LoCon / kohya conv LoRA: ``lora_down`` ``(r, C_in, kh, kw)``, ``lora_up`` ``(C_out, r, 1, 1)`` on
    ResNet convolutions (3×3 and a 1×1 shortcut), beside an attention layer; ΔW = (alpha / r) · up ⊗ down."""
    g = torch.Generator().manual_seed(4)
    f = {}
    convs = {
        "lora_unet_down_blocks_0_resnets_0_conv1": ("unet.down_blocks.0.resnets.0.conv1", 32, 32, 3, 4.0),
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": (
            "unet.down_blocks.1.resnets.0.conv_shortcut",
            64,
            32,
            1,
            1.0,
        ),
    }
    expected = {}
    for prefix, (layer, out, inn, k, alpha) in convs.items():
        down = torch.randn(2, inn, k, k, generator=g)
        up = torch.randn(out, 2, 1, 1, generator=g) * 0.1
        f.update(
            {
                f"{prefix}.lora_down.weight": down,
                f"{prefix}.lora_up.weight": up,
                f"{prefix}.alpha": torch.tensor(alpha),
            }
        )
        expected[layer] = (alpha / 2) * (up.double().flatten(1) @ down.double().flatten(1)).reshape(out, inn, k, k)
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    f.update(_pair(attn, 32, 32, alpha=2))
    expected["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] = _delta(f, attn)
    pipe = testing.tiny_sd_pipeline()
    merged = compose([_write(tmp_path, "locon.safetensors", f)], progress=False)
    _assert_deltas(_fused_deltas(merged, pipe, expected), expected)


def test_cli_kohya_export_dtype_and_family(tmp_path, capsys):
    """``--format kohya --dtype fp16`` writes what ``save_kohya(dtype="fp16")`` writes, for compose and export;
    ``--family`` reaches the community-file reader: an SDXL file read as ``sd`` is refused in one line."""
    from peft_ortho.cli import main

    _sd_adapters(tmp_path)
    names = [str(tmp_path / "unet_ad"), str(tmp_path / "te_ad")]
    assert main(["compose", *names, "--out", str(tmp_path / "cli"), "--format", "kohya", "--dtype", "fp16"]) == 0
    api = compose(names, progress=False).save_kohya(str(tmp_path / "api"), dtype="fp16")
    (written,) = [f for f in os.listdir(tmp_path / "cli") if f.endswith(".safetensors")]
    cli, ref = load_file(str(tmp_path / "cli" / written)), load_file(api)
    assert cli.keys() == ref.keys() and {v.dtype for v in cli.values()} == {torch.float16}
    assert all(torch.equal(cli[k], ref[k]) for k in ref)
    out = tmp_path / "export"
    assert main(["export", names[0], "--format", "kohya", "--dtype", "bf16", "--out", str(out)]) == 0
    (written,) = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    exported = load_file(str(out / written))
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    assert all(k.startswith("lora_unet_") for k in exported)

    sgm = _write(
        tmp_path, "sgm.safetensors", _pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 64, 64)
    )
    capsys.readouterr()
    assert main(["inspect", sgm, "--family", "sdxl"]) == 0
    code = main(["compose", sgm, "--family", "sd", "--out", str(tmp_path / "sd")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "family='sd'" in err and "sgm.safetensors" in err
    assert not (tmp_path / "sd").exists()


def test_sgm_key_that_stays_unmapped_is_refused_by_name(tmp_path):
    f = _pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 64, 64, alpha=1)
    f.update(_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_zz", 64, 64, alpha=1))
    with pytest.raises(AdapterFileError, match="stays unmapped") as info:
        compose([_write(tmp_path, "bad.safetensors", f)], progress=False)
    assert "attn1.to.zz" in str(info.value) and "\n" not in str(info.value)


def _flux_reference(f, qkv, proj, mlp0, linear2, down="lora_down", up="lora_up"):
    inner = 32
    return {
        "transformer.transformer_blocks.0.attn.to_q": _delta(f, qkv, slice(0, inner), down=down, up=up),
        "transformer.transformer_blocks.0.attn.to_k": _delta(f, qkv, slice(inner, 2 * inner), down=down, up=up),
        "transformer.transformer_blocks.0.attn.to_v": _delta(f, qkv, slice(2 * inner, 3 * inner), down=down, up=up),
        "transformer.transformer_blocks.0.attn.to_out.0": _delta(f, proj, down=down, up=up),
        **({"transformer.transformer_blocks.0.ff_context.net.0.proj": _delta(f, mlp0)} if mlp0 else {}),
        **({"transformer.single_transformer_blocks.0.proj_out": _delta(f, linear2)} if linear2 else {}),
    }


@pytest.mark.parametrize("layout", ["kohya", "bfl"])
def test_kohya_and_bfl_flux_files_merge_exactly(layout, tmp_path):
    """sd-scripts' Flux names and BFL / ComfyUI's ``diffusion_model.`` names, fused qkv split into q, k, v."""
    if layout == "kohya":
        names = ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj")
        extra = ("lora_unet_double_blocks_0_txt_mlp_0", "lora_unet_single_blocks_0_linear2")
    else:
        names = ("diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.double_blocks.0.img_attn.proj")
        extra = (None, None)
    f = {**_pair(names[0], 96, 32, alpha=1), **_pair(names[1], 32, 32, alpha=4)}
    if extra[0]:
        f.update({**_pair(extra[0], 128, 32, alpha=2), **_pair(extra[1], 32, 160, alpha=2)})
    assert community_format(f) == "flux"
    expected = _flux_reference(f, *names, *extra)
    merged = compose([_write(tmp_path, "flux.safetensors", f)], progress=False)
    pipe = testing.empty_pipeline("flux", transformer=testing.tiny_flux_transformer())
    _assert_deltas(_fused_deltas(merged, pipe, expected), expected)


def test_xlabs_flux_file_merges_exactly(tmp_path):
    f = {
        **_pair("double_blocks.0.processor.qkv_lora1", 96, 32, down="down", up="up"),
        **_pair("double_blocks.0.processor.proj_lora1", 32, 32, down="down", up="up"),
    }
    expected = _flux_reference(
        f,
        "double_blocks.0.processor.qkv_lora1",
        "double_blocks.0.processor.proj_lora1",
        None,
        None,
        down="down",
        up="up",
    )
    merged = compose([_write(tmp_path, "xlabs.safetensors", f)], progress=False)
    pipe = testing.empty_pipeline("flux", transformer=testing.tiny_flux_transformer())
    _assert_deltas(_fused_deltas(merged, pipe, expected), expected)


def test_flux_t5_layers_dropped_by_the_converter_are_refused(tmp_path):
    """Formerly: diffusers' Flux converter dropped the T5 (``lora_te2_``) layers with a log line, exit 0."""
    f = _pair("lora_unet_double_blocks_0_img_attn_proj", 32, 32, alpha=1)
    f.update(_pair("lora_te2_encoder_block_0_layer_0_SelfAttention_q", 32, 32, alpha=1))
    with pytest.raises(AdapterFileError, match="drops 1 layer") as info:
        compose([_write(tmp_path, "flux_t5.safetensors", f)], progress=False)
    assert info.value.layer == "lora_te2_encoder_block_0_layer_0_SelfAttention_q" and "\n" not in str(info.value)


def test_bfl_lora_a_names_are_refused_in_one_line(tmp_path):
    f = _pair("diffusion_model.double_blocks.0.img_attn.qkv", 96, 32, down="lora_A", up="lora_B")
    with pytest.raises(AdapterFileError) as info:
        compose([_write(tmp_path, "bfl.safetensors", f)], progress=False)
    assert "diffusion_model" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "fmt, keys",
    [
        ("LoHa", ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]),
        ("LoKr", ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
        ("DoRA", ["lora_down.weight", "lora_up.weight", "dora_scale"]),
    ],
)
def test_lycoris_and_dora_files_are_refused_in_one_line_naming_the_format(fmt, keys, tmp_path):
    """Formerly: a 35 KB message that never said what is unsupported (or, for DoRA, a silently dropped magnitude)."""
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    f = {f"{prefix}.{k}": torch.randn(4, 4) for k in keys}
    f[f"{prefix}.alpha"] = torch.tensor(4.0)
    with pytest.raises(UnsupportedAdapterError, match=fmt) as info:
        compose([_write(tmp_path, "lyco.safetensors", f)], progress=False)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400


def test_diffusers_file_without_recorded_alpha_warns(tmp_path):
    """Formerly: read at scale 1 with no word although it may have been trained with lora_alpha != r."""
    f = _pair("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 32, 32, down="lora_A", up="lora_B")
    path = _write(tmp_path, "plain.safetensors", f)
    with pytest.warns(UnknownScaleWarning, match="records no scale"):
        compose([path], progress=False)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4})}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownScaleWarning)
        merged = compose([_write(tmp_path, "meta.safetensors", f, meta)], progress=False)
    assert merged.adapters[0].scales[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")] == 2.0


def test_sd3_non_diffusers_layout_is_refused(tmp_path):
    f = _pair("lora_transformer_transformer_blocks_0_attn_to_q", 32, 32, alpha=1)
    with pytest.raises(AdapterFileError):
        compose([_write(tmp_path, "sd3.safetensors", f)], family="sd3", progress=False)


# ------------------------------------------------------------------------------- 4. kohya out


def _sd_adapters(tmp_path):
    """A trained-like UNet adapter and a text-encoder adapter of the tiny SD1.5 pipeline, saved as PEFT folders."""
    unet, te = sd_lora_pair(unet_alpha=6, te_alpha=1)
    unet.save_pretrained(str(tmp_path / "unet_ad"))
    te.save_pretrained(str(tmp_path / "te_ad"))
    return unet, te


def _sd_outputs(pipe):
    inputs = testing.unet_inputs(pipe.unet)
    ids = torch.randint(0, 600, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(**inputs).sample, pipe.text_encoder(input_ids=ids).last_hidden_state


def test_kohya_export_reads_back_exactly_and_loads_in_diffusers(tmp_path):
    _sd_adapters(tmp_path)
    merged = compose([str(tmp_path / "unet_ad"), str(tmp_path / "te_ad")], progress=False)
    path = merged.save_kohya(str(tmp_path / "kohya"))
    keys = load_file(path)
    # sd-scripts' SD1.x names: lora_unet_<diffusers module>, lora_te_text_model_…, lora_down/lora_up + alpha.
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert community_format(keys) == "kohya"

    fused = testing.tiny_sd_pipeline()
    merged.fuse(fused)
    expected = _sd_outputs(fused)
    readback = testing.tiny_sd_pipeline()
    compose([path], progress=False).fuse(readback)  # through the kohya reader (diffusers' converter)
    for got, ref in zip(_sd_outputs(readback), expected):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    loaded = testing.tiny_sd_pipeline()
    loaded.load_lora_weights(str(tmp_path / "kohya"), weight_name="lora.safetensors")
    for got, ref in zip(_sd_outputs(loaded), expected):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_save_kohya_of_a_peft_model_bakes_the_scale(tmp_path):
    unet, te = _sd_adapters(tmp_path)
    path = save_kohya({"unet": unet, "text_encoder": te}, tmp_path / "k", dtype="fp16")
    tensors = load_file(path)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    pipe = testing.tiny_sd_pipeline()
    pipe.load_lora_weights(str(tmp_path / "k"), weight_name="lora.safetensors")
    ref = testing.tiny_sd_pipeline()
    ref.unet, ref.text_encoder = unet, te
    for got, want in zip(_sd_outputs(pipe), _sd_outputs(ref)):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # fp16 factors: one rounding per weight
    with pytest.raises(UnsupportedAdapterError, match="no kohya SD/SDXL layout"):
        save_kohya(get_peft_model(testing.tiny_flux_transformer(), _tuner_config("lora")), tmp_path / "f")


def test_output_dtype_defaults_to_the_inputs_and_can_be_chosen(tmp_path):
    unet = get_peft_model(testing.tiny_unet(), LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    unet = unet.to(torch.bfloat16)
    unet.save_pretrained(str(tmp_path / "bf16"))
    merged = compose([str(tmp_path / "bf16")], progress=False)
    for out, dtype, want in [("a", None, torch.bfloat16), ("b", "fp32", torch.float32), ("c", "fp16", torch.float16)]:
        path = merged.save_diffusers(str(tmp_path / out), dtype=dtype)
        assert {v.dtype for v in load_file(path).values()} == {want}
    folder = merged.save_pretrained(str(tmp_path / "peft"))
    assert {v.dtype for v in load_file(os.path.join(folder, "adapter_model.safetensors")).values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be one of"):
        merged.save_diffusers(str(tmp_path / "d"), dtype="int8")


# ------------------------------------------------------------------------------- 5. LLM users


@pytest.fixture
def gpt2_adapters(tiny_gpt2, tmp_path):
    """The tiny GPT-2 saved as a base folder and two CAUSAL_LM LoRA adapters on it (GPT-2's Conv1D layers)."""
    base_dir = str(tmp_path / "gpt2")
    tiny_gpt2.save_pretrained(base_dir)
    folders = []
    for i in range(2):
        torch.manual_seed(10 + i)
        config = LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["c_attn", "c_proj"],
            task_type="CAUSAL_LM",
            fan_in_fan_out=True,
            init_lora_weights=False,
        )
        from transformers import AutoModelForCausalLM

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
        model.peft_config["default"].base_model_name_or_path = base_dir
        model.save_pretrained(str(tmp_path / f"llm{i}"))
        folders.append(str(tmp_path / f"llm{i}"))
    return base_dir, folders


def _logits(model, seed=0):
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_llm_merge_keeps_task_type_and_loads_with_auto_peft_model(gpt2_adapters, tmp_path):
    """Formerly: the merged config dropped task_type, so AutoPeftModelForCausalLM refused it."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    base_dir, folders = gpt2_adapters
    merged = compose(folders, progress=False)
    out = merged.save_pretrained(str(tmp_path / "merged"))
    assert json.load(open(os.path.join(out, "adapter_config.json")))["task_type"] == "CAUSAL_LM"
    loaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    # Reference: each source adapter merged into the base with peft's own merge_and_unload, deltas summed.
    ref = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    from peft import PeftModel

    state = {k: v.clone() for k, v in ref.state_dict().items()}
    for folder in folders:
        fused = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).merge_and_unload()
        base_sd = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
        for k, v in fused.state_dict().items():
            state[k] += v - base_sd[k]
    ref.load_state_dict(state)
    torch.testing.assert_close(_logits(loaded), _logits(ref), atol=1e-5, rtol=0)
    card = open(os.path.join(out, "README.md")).read()
    assert "pipeline_tag: text-generation" in card
    assert base_dir not in card  # a local path is never written into a card meant for the Hub


def test_cli_fused_causal_lm_keeps_the_lm_head(gpt2_adapters, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from peft_ortho.cli import main

    base_dir, folders = gpt2_adapters
    out = str(tmp_path / "fused")
    assert main(["compose", *folders, "--format", "fused", "--base", base_dir, "--out", out]) == 0
    fused = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = compose(folders, progress=False).fuse(AutoModelForCausalLM.from_pretrained(base_dir).eval())
    assert type(fused).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(_logits(fused), _logits(ref), atol=1e-5, rtol=0)


def test_cli_export_of_an_llm_adapter_to_diffusers_is_refused(gpt2_adapters, tmp_path, capsys):
    """Formerly: exit 0 and a file of ``unet.transformer.h.0…`` keys no pipeline loads."""
    from peft_ortho.cli import main

    _, folders = gpt2_adapters
    for extra in ([], ["--component", "unet"]):
        assert main(["export", folders[0], "--format", "diffusers", "--out", str(tmp_path / "x"), *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert "language model" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_fused_into_a_diffusers_pipeline_folder(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from peft_ortho.cli import main

    _sd_adapters(tmp_path)
    pipe_dir = str(tmp_path / "pipe")
    testing.tiny_sd_pipeline().save_pretrained(pipe_dir)
    names = [str(tmp_path / "unet_ad"), str(tmp_path / "te_ad")]
    assert main(["compose", *names, "--format", "fused", "--base", pipe_dir, "--out", str(tmp_path / "out")]) == 0
    fused = DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    ref = testing.tiny_sd_pipeline()
    compose(names, progress=False).fuse(ref)
    for got, want in zip(_sd_outputs(fused), _sd_outputs(ref)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- 7. cards


def test_hub_save_pretrained_of_a_flux_adapter_ships_transformer_keys(tmp_path):
    from peft_ortho.hub import save_pretrained

    flux = get_peft_model(testing.tiny_flux_transformer(), _tuner_config("ortho"))
    out = save_pretrained(
        flux,
        tmp_path / "hub",
        include_diffusers=True,
        base_model="black-forest-labs/FLUX.1-dev",
        instance_prompt="a photo of sks dog",
    )
    with safe_open(os.path.join(out, "pytorch_lora_weights.safetensors"), "pt") as f:
        assert {k.split(".", 1)[0] for k in f.keys()} == {"transformer"}
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.pipeline_tag == "text-to-image" and card.data.base_model == "black-forest-labs/FLUX.1-dev"
    assert "base_model:adapter:black-forest-labs/FLUX.1-dev" in card.data.tags
    assert card.data.instance_prompt == "a photo of sks dog"


def test_save_diffusers_writes_a_hub_card_without_local_paths(tmp_path):
    from huggingface_hub import ModelCard

    unet = get_peft_model(testing.tiny_unet(), LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    unet.peft_config["default"].base_model_name_or_path = str(tmp_path / "my-local-base")
    save_diffusers(unet, tmp_path / "out")
    text = open(tmp_path / "out" / "README.md").read()
    card = ModelCard(text)
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-to-image"
    assert {"lora", "diffusers", "diffusers-training", "template:sd-lora", "text-to-image"} <= set(card.data.tags)
    assert str(tmp_path) not in text and card.data.base_model is None


def test_lossy_merge_export_records_the_svd_error_in_its_card(tmp_path):
    folders = []
    for i in range(2):
        torch.manual_seed(i)
        m = get_peft_model(testing.tiny_unet(), LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
        m.save_pretrained(str(tmp_path / f"a{i}"))
        folders.append(str(tmp_path / f"a{i}"))
    merged = compose(folders, method="ties", svd_rank=1, progress=False)
    merged.save_diffusers(str(tmp_path / "out"))
    text = open(tmp_path / "out" / "README.md").read()
    assert "Rank-1 SVD of the merged deltas, relative Frobenius error per layer" in text
    # Independent: the error of a rank-1 truncation of layer's merged ΔW, from its singular values in float64.
    (comp, name), layer = next(iter(merged.layers.items()))
    s = torch.linalg.svdvals(layer.delta.double())
    want = float((s[1:].square().sum() / s.square().sum()).sqrt())
    assert f"- `{name}`: {want:.3g}" in text


def test_model_card_trigger_words_and_widget():
    from peft_ortho import model_card

    card = model_card(
        {"peft_type": "LORA", "r": 4},
        base_model="stabilityai/stable-diffusion-xl-base-1.0",
        diffusion=True,
        instance_prompt="a photo of sks dog",
        widget=[{"text": "a photo of sks dog", "output": {"url": "sample.png"}}],
    )
    assert card.data.instance_prompt == "a photo of sks dog"
    assert card.data.widget == [{"text": "a photo of sks dog", "output": {"url": "sample.png"}}]
    assert "Use `a photo of sks dog` in the prompt" in card.text
    llm = model_card({"peft_type": "LORA", "task_type": "CAUSAL_LM"}, base_model="openai-community/gpt2")
    assert llm.data.pipeline_tag == "text-generation" and "template:sd-lora" not in llm.data.tags


def test_cli_export_and_compose_of_flux_adapters_write_transformer_keys(tmp_path, capsys):
    """Formerly: ``--component`` defaulted to ``unet`` and the Flux file did nothing in FluxPipeline."""
    from peft_ortho.cli import main

    flux = get_peft_model(testing.tiny_flux_transformer(), _tuner_config("lora"))
    flux.save_pretrained(str(tmp_path / "flux"))
    assert main(["export", str(tmp_path / "flux"), "--format", "diffusers", "--out", str(tmp_path / "e")]) == 0
    assert main(["compose", str(tmp_path / "flux"), "--format", "diffusers", "--out", str(tmp_path / "c")]) == 0
    for out in ("e", "c"):
        with safe_open(str(tmp_path / out / "pytorch_lora_weights.safetensors"), "pt") as f:
            assert {k.split(".", 1)[0] for k in f.keys()} == {"transformer"}
    assert (
        main(
            [
                "export",
                str(tmp_path / "flux"),
                "--format",
                "diffusers",
                "--out",
                str(tmp_path / "u"),
                "--component",
                "unet",
            ]
        )
        == 1
    )
    assert "component='unet'" in capsys.readouterr().err


def test_one_rule_for_clips_text_model_level():
    """Files spell CLIP layers without ``text_model.``; kohya files and nested encoders with it: one rule maps both,
    and module lookup (fuse, sequential merge) finds a layer under either spelling."""
    key = "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    nested = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    assert with_text_model_level(key) == with_text_model_level(nested) == nested
    assert normalise_text_encoder_key(nested) == normalise_text_encoder_key(key) == key
    assert with_text_model_level("unet.a.lora_A.weight") == "unet.a.lora_A.weight"
    flat = torch.nn.ModuleDict({"encoder": torch.nn.ModuleDict({"q": torch.nn.Linear(2, 2)})})
    nested_model = torch.nn.ModuleDict({"text_model": flat})
    assert find_module(flat, "encoder.q") is find_module(nested_model, "encoder.q") is flat["encoder"]["q"]
    assert find_module(nested_model, "encoder.k") is None


def test_family_of_pipeline_by_class_and_subclass():
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from peft_ortho.lora_format import family_of_pipeline

    class MyXL(StableDiffusionXLPipeline):
        pass

    assert family_of_pipeline(StableDiffusionPipeline) == "sd" and family_of_pipeline(FluxPipeline) == "flux"
    assert family_of_pipeline(MyXL) == "sdxl" and family_of_pipeline(testing.tiny_sd_pipeline()) == "sd"
    assert family_of_pipeline(testing.tiny_unet()) is None and family_of_pipeline("sd") is None
