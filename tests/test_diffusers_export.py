"""``save_diffusers``: adapters trained with peft load into a *fresh* pipeline through diffusers' real
``load_lora_weights`` and compute exactly what the peft model computes — scale included, without peft-ortho."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoHaConfig, LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft_ortho import AdapterFileError, OrthoLoraConfig, save_diffusers, testing
from peft_ortho import diffusers_lora as export
from peft_ortho.diffusers_lora import UnsupportedAdapterError, to_diffusers_state_dict, write_diffusers_file

# lora_alpha != r everywhere (and per-layer patterns on the text encoder), so a lost scale changes the outputs.
UNET_CONFIG = dict(r=4, lora_alpha=6, target_modules=testing.UNET_TARGETS, concept_id="alice/rex")
TE_CONFIG = dict(
    r=4,
    lora_alpha=3,
    target_modules=testing.TEXT_ENCODER_TARGETS,
    slot=1,
    rank_pattern={"q_proj": 8},
    alpha_pattern={"k_proj": 5},
)
ATOL = 1e-6


def _text_ids() -> torch.Tensor:
    return torch.randint(0, 600, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def trained():
    """A UNet adapter trained a few steps (only lora_B moves) and a text encoder adapter with random lora_B."""
    pipe = testing.tiny_sd_pipeline()
    unet = get_peft_model(pipe.unet, OrthoLoraConfig(**UNET_CONFIG))
    te = get_peft_model(pipe.text_encoder, OrthoLoraConfig(**TE_CONFIG))
    inputs = testing.unet_inputs(pipe.unet)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        target = torch.randn(unet(**inputs).sample.shape, generator=g)
    a_before = {k: v.clone() for k, v in get_peft_model_state_dict(unet).items() if "lora_A" in k}
    opt = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(unet(**inputs).sample, target).backward()
        opt.step()
    assert all(torch.equal(v, get_peft_model_state_dict(unet)[k]) for k, v in a_before.items())  # A stayed frozen
    with torch.no_grad():
        for name, p in te.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = _text_ids()
    with torch.no_grad():
        ref_unet = unet(**inputs).sample
        ref_te = te(input_ids=ids).last_hidden_state
    return {"unet": unet, "te": te, "inputs": inputs, "ids": ids, "ref_unet": ref_unet, "ref_te": ref_te}


def _outputs(pipe, inputs, ids):
    with torch.no_grad():
        return pipe.unet(**inputs).sample, pipe.text_encoder(input_ids=ids).last_hidden_state


def test_unet_and_text_encoder_load_exactly_in_a_fresh_pipeline(trained, tmp_path):
    path = save_diffusers({"unet": trained["unet"], "text_encoder": trained["te"]}, tmp_path / "out")
    assert path == str(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "pytorch_lora_weights.safetensors"]

    with safe_open(path, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("unet.", "text_encoder.")) for k in keys)
    assert not any("base_model" in k or ".default." in k for k in keys)
    # The tensors are the adapter's own, bit for bit.
    peft_sd = get_peft_model_state_dict(trained["unet"])
    saved = load_file(path)
    for k, v in peft_sd.items():
        assert torch.equal(saved["unet." + k.removeprefix("base_model.model.")], v)
    # diffusers' layout: one flat JSON of "<component>.<LoraConfig field>" under lora_adapter_metadata.
    meta = json.loads(metadata["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 6 and meta["text_encoder.lora_alpha"] == 3
    assert meta["text_encoder.rank_pattern"] == {"q_proj": 8} and meta["text_encoder.alpha_pattern"] == {"k_proj": 5}
    assert not any(k.split(".", 1)[1].startswith(("basis", "slot", "concept_id", "peft_type")) for k in meta)
    for component in ("unet", "text_encoder"):
        LoraConfig(**{k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(component + ".")})
    provenance = json.loads(metadata["peft_ortho_adapter_config"])
    assert provenance["unet"]["peft_type"] == "ORTHO_LORA" and provenance["unet"]["concept_id"] == "alice/rex"
    assert provenance["unet"]["basis_checksums"] == trained["unet"].peft_config["default"].basis_checksums

    fresh = testing.tiny_sd_pipeline()  # same seed: same base weights
    base_unet, base_te = _outputs(fresh, trained["inputs"], trained["ids"])
    fresh.load_lora_weights(str(tmp_path / "out"))
    out_unet, out_te = _outputs(fresh, trained["inputs"], trained["ids"])
    torch.testing.assert_close(out_unet, trained["ref_unet"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_te, trained["ref_te"], atol=ATOL, rtol=0)
    assert (out_unet - base_unet).abs().max() > 1e-3 and (out_te - base_te).abs().max() > 1e-3

    # Without the metadata diffusers assumes lora_alpha = r: the outputs change, so the test above checks the scale.
    stripped = tmp_path / "no_meta"
    stripped.mkdir()
    save_file(saved, str(stripped / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    other = testing.tiny_sd_pipeline()
    other.load_lora_weights(str(stripped))
    assert (_outputs(other, trained["inputs"], trained["ids"])[0] - trained["ref_unet"]).abs().max() > 1e-4


LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["peft_ortho"] = None  # any import of peft_ortho now fails: the loading side must not need it
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    base, lora, io = sys.argv[1:4]
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(lora)
    inputs = load_file(io + "/inputs.safetensors")
    ids = inputs.pop("input_ids")
    with torch.no_grad():
        out = {"unet": pipe.unet(**inputs).sample, "text_encoder": pipe.text_encoder(input_ids=ids).last_hidden_state}
    save_file(out, io + "/outputs.safetensors")
    """
)


def test_plain_diffusers_process_without_peft_ortho_loads_it(trained, tmp_path):
    save_diffusers({"unet": trained["unet"], "text_encoder": trained["te"]}, tmp_path / "lora")
    testing.tiny_sd_pipeline().save_pretrained(str(tmp_path / "base"))
    save_file({**trained["inputs"], "input_ids": trained["ids"]}, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "loader.py").write_text(LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "loader.py"), str(tmp_path / "base"), str(tmp_path / "lora"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(str(tmp_path / "outputs.safetensors"))
    torch.testing.assert_close(out["unet"], trained["ref_unet"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["text_encoder"], trained["ref_te"], atol=ATOL, rtol=0)


def test_saved_adapter_folder_exports_the_same_file(trained, tmp_path):
    trained["unet"].save_pretrained(str(tmp_path / "adapter"))
    from_folder = save_diffusers(str(tmp_path / "adapter"), tmp_path / "a")
    from_model = save_diffusers(trained["unet"], tmp_path / "b")
    a, b = load_file(from_folder), load_file(from_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(from_folder, "pt") as fa, safe_open(from_model, "pt") as fb:
        assert json.loads(fa.metadata()["lora_adapter_metadata"]) == json.loads(fb.metadata()["lora_adapter_metadata"])


@pytest.mark.parametrize("bake_scale", [False, True])
def test_plain_peft_lora_with_rslora_and_patterns(tmp_path, bake_scale):
    pipe = testing.tiny_sd_pipeline()
    config = LoraConfig(
        r=4,
        lora_alpha=7,
        use_rslora=True,
        target_modules=testing.UNET_TARGETS,
        rank_pattern={"to_q": 2},
        alpha_pattern={"to_v": 3},
        init_lora_weights=False,  # random lora_B: a non-zero delta without training
    )
    unet = get_peft_model(pipe.unet, config)
    inputs = testing.unet_inputs(pipe.unet)
    with torch.no_grad():
        ref = unet(**inputs).sample
    path = save_diffusers(unet, tmp_path / "out", bake_scale=bake_scale)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    if bake_scale:  # the scale lives in lora_B: loaders that ignore the metadata get it right too
        assert meta["unet.lora_alpha"] == meta["unet.r"] and meta["unet.use_rslora"] is False
    fresh = testing.tiny_sd_pipeline()
    with torch.no_grad():
        base = fresh.unet(**inputs).sample
    fresh.load_lora_weights(str(tmp_path / "out"))
    with torch.no_grad():
        out = fresh.unet(**inputs).sample
    # Baking rounds each lora_B once (float32), hence the looser tolerance; unbaked factors are bit-exact.
    torch.testing.assert_close(out, ref, atol=1e-5 if bake_scale else ATOL, rtol=0)
    assert (out - base).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ refusals


def _small_peft_unet(**overrides):
    return get_peft_model(testing.tiny_unet(), OrthoLoraConfig(**{**UNET_CONFIG, **overrides}))


def test_nan_in_lora_b_names_the_layer(tmp_path):
    unet = _small_peft_unet()
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    with torch.no_grad():
        unet.get_submodule("base_model.model." + layer).lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(AdapterFileError, match="non-finite") as info:
        save_diffusers(unet, tmp_path / "out")
    assert info.value.layer == f"unet.{layer}.lora_B.weight" and layer in str(info.value)
    assert not (tmp_path / "out").exists()
    # The same from a saved folder, named by its path.
    unet.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(AdapterFileError, match=layer):
        save_diffusers(str(tmp_path / "adapter"), tmp_path / "out")


def test_pickled_adapter_is_refused_unread(tmp_path):
    folder = tmp_path / "adapter"
    _small_peft_unet().save_pretrained(str(folder))
    os.remove(folder / "adapter_model.safetensors")
    marker = tmp_path / "unpickled"

    class Payload:  # loading this pickle would create `marker`
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"x": Payload()}, str(folder / "adapter_model.bin"))
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin is a pickled checkpoint") as info:
        save_diffusers(str(folder), tmp_path / "out")
    assert info.value.adapter == str(folder)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(AdapterFileError, match="no such adapter folder"):
        save_diffusers(str(tmp_path / "nope"), tmp_path / "out")
    folder = tmp_path / "adapter"
    _small_peft_unet().save_pretrained(str(folder))
    os.remove(folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is missing"):
        save_diffusers(str(folder), tmp_path / "out")
    os.remove(folder / "adapter_config.json")
    with pytest.raises(AdapterFileError, match="adapter_config.json is missing"):
        save_diffusers(str(folder), tmp_path / "out")


def test_unsupported_peft_type_is_refused(tmp_path):
    loha = get_peft_model(testing.tiny_unet(), LoHaConfig(r=4, target_modules=testing.UNET_TARGETS))
    with pytest.raises(UnsupportedAdapterError, match="'LOHA' cannot be exported") as info:
        save_diffusers(loha, tmp_path / "out")
    assert info.value.adapter == "default"
    loha.save_pretrained(str(tmp_path / "loha"))
    with pytest.raises(UnsupportedAdapterError, match="LOHA"):
        save_diffusers(str(tmp_path / "loha"), tmp_path / "out")
    dora = get_peft_model(testing.tiny_unet(), LoraConfig(r=4, target_modules=["to_q"], use_dora=True))
    with pytest.raises(UnsupportedAdapterError, match="use_dora"):
        save_diffusers(dora, tmp_path / "out")
    te = get_peft_model(testing.tiny_text_encoder(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UnsupportedAdapterError, match="component='unet'.*pass component='text_encoder'"):
        save_diffusers(te, tmp_path / "out", component="unet")  # diffusers would ignore every unet.* key
    assert not (tmp_path / "out").exists()


def test_interrupted_save_leaves_nothing_behind(tmp_path, monkeypatch):
    unet = _small_peft_unet(init_lora_weights=False)

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers(unet, tmp_path / "new")
    assert os.listdir(tmp_path) == []  # neither the folder nor a temporary one

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "pytorch_lora_weights.safetensors").write_bytes(b"previous export")
    with pytest.raises(OSError, match="disk full"):
        save_diffusers(unet, existing, overwrite=True)
    assert os.listdir(tmp_path) == ["existing"]
    assert os.listdir(existing) == ["pytorch_lora_weights.safetensors"]
    assert (existing / "pytorch_lora_weights.safetensors").read_bytes() == b"previous export"
    monkeypatch.undo()
    with pytest.raises(FileExistsError):  # an existing export is only replaced on request
        save_diffusers(unet, existing)
    save_diffusers(unet, existing, overwrite=True)
    assert set(load_file(str(existing / "pytorch_lora_weights.safetensors"))) == {
        "unet." + k.removeprefix("base_model.model.") for k in get_peft_model_state_dict(unet)
    }


# ------------------------------------------------------------------------------------------------ low level


def test_to_diffusers_state_dict_key_layouts():
    a, b = torch.randn(2, 8), torch.randn(4, 2)
    saved = {"base_model.model.blk.to_q.lora_A.weight": a, "base_model.model.blk.to_q.lora_B.weight": b}
    live = {"blk.to_q.lora_A.rex.weight": a, "blk.to_q.lora_B.rex.weight": b, "blk.to_q.lora_A.mia.weight": a * 2}
    expected = {"unet.blk.to_q.lora_A.weight", "unet.blk.to_q.lora_B.weight"}
    assert set(to_diffusers_state_dict(saved, "unet")) == expected
    out = to_diffusers_state_dict(live, "unet", adapter_name="rex")
    assert set(out) == expected and torch.equal(out["unet.blk.to_q.lora_A.weight"], a)
    with pytest.raises(ValueError, match="several adapters"):
        to_diffusers_state_dict(live, "unet")
    with pytest.raises(UnsupportedAdapterError, match="modules_to_save"):
        to_diffusers_state_dict({"base_model.model.head.modules_to_save.default.weight": a}, "unet")
    with pytest.raises(ValueError, match="component"):
        to_diffusers_state_dict(saved, "unet.x")


def test_write_diffusers_file_checks_ranks_against_the_metadata(tmp_path):
    tensors = {"blk.to_q.lora_A.weight": torch.randn(2, 8), "blk.to_q.lora_B.weight": torch.randn(4, 2)}
    with pytest.raises(AdapterFileError, match="rank 3 but its tensors have rank 2"):
        write_diffusers_file(tmp_path / "out", {"unet": tensors}, {"unet": {"r": 3, "lora_alpha": 3}})
    # A merged adapter's config (compose): full module names as targets, peft_type LORA; unknown fields dropped.
    meta = LoraConfig(r=2, lora_alpha=2, target_modules=["blk.to_q"]).to_dict()
    path = write_diffusers_file(tmp_path / "out", {"unet": tensors}, {"unet": {**meta, "peft_type": "LORA"}})
    with safe_open(path, "pt") as f:
        written = json.loads(f.metadata()["lora_adapter_metadata"])
    assert written["unet.target_modules"] == ["blk.to_q"] and "unet.peft_type" not in written
