"""Every model family and every file people share: DiT exports, community formats in and out, LLM merges.

Each test checks a property against an independent reference (a ΔW computed from the raw tensors in float64, the
peft model's own outputs, diffusers' own loader), and every path that used to give a silent wrong result with exit 0
has a test that it now refuses in one line.
"""

import json
import os

import pytest
import torch
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
from peft_ortho.compose import UnknownScaleWarning
from peft_ortho.lora_format import community_format, infer_component

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
    pipe = testing.empty_pipeline(name, **{component: build()})
    base_out = testing.family_output(getattr(pipe, component), inputs)
    pipe.load_lora_weights(str(tmp_path / "out"))
    got = testing.family_output(getattr(pipe, component), inputs)
    assert (expected - base_out).abs().max() > 1e-4  # the adapter changes the output: the check can fail
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_soda_has_no_lora_file_and_says_so_in_one_line(tmp_path):
    soda = get_peft_model(testing.tiny_flux_transformer(), _tuner_config("soda"))
    with pytest.raises(UnsupportedAdapterError) as info:
        save_diffusers(soda, tmp_path / "out")
    assert "SODA" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


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
    with pytest.raises(UnsupportedAdapterError, match=r"FluxPipeline loads LoRAs only into \['transformer', 'text_encoder'\]"):
        save_diffusers({"transformer": flux, "text_encoder_2": clip}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # ... and SDXL's pipeline does load a second CLIP encoder.
    assert save_diffusers({"text_encoder_2": clip}, tmp_path / "ok", pipeline="sdxl")


def test_compose_flux_folders_export_fuse_into_transformer(tmp_path):
    """compose of Flux adapters: the diffusers file holds ``transformer.*`` and fuse(pipeline) fuses the DiT."""
    inputs = testing.family_inputs(testing.tiny_flux_transformer())
    folders, models = [], []
    for i, slot in enumerate((0, 1)):
        m = get_peft_model(testing.tiny_flux_transformer(), OrthoLoraConfig(r=2, slot=slot, target_modules=testing.DIT_TARGETS))
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
