"""peft-ortho as peft, transformers and diffusers see it: registration, Auto classes, load_adapter, a UNet."""

import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from packaging import version
from peft import (
    AutoPeftModel,
    PeftModel,
    PeftModelForCausalLM,
    get_peft_model,
    mapping,
)
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import peft_ortho
from peft_ortho import BasisMismatchError, OrthoLoraConfig, OrthoLoraModel, PeftOrthoType, bases, testing
from peft_ortho._registry import register, register_all

REPO_ROOT = Path(__file__).resolve().parents[1]
PEFT_VERSION = version.parse(importlib.metadata.version("peft"))


def gpt2_config(**kwargs):
    return OrthoLoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True, **kwargs)


def lora_tensors(model):
    """Adapter tensors keyed without the peft prefix and adapter name, e.g. ``transformer.h.0.attn.c_attn.lora_A``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            name = name.removeprefix("base_model.model.")
            for adapter, layer in module.lora_A.items():
                out[(name, "lora_A", adapter)] = layer.weight.detach().clone()
            for adapter, layer in module.lora_B.items():
                out[(name, "lora_B", adapter)] = layer.weight.detach().clone()
    return out


def ids(seed=0):
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- registration


def test_registered_in_peft_tables():
    assert peft_ortho._registry.is_registered(PeftOrthoType.ORTHO_LORA)
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["ORTHO_LORA"] is OrthoLoraConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["ORTHO_LORA"] is OrthoLoraModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["ORTHO_LORA"] == "lora_"
    # the mixed-model table only where the tuner's facts say PeftMixedModel works (test below): none today
    for peft_type, tuner in peft_ortho._registry.tuners().items():
        assert (peft_type in mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING) == tuner.facts.mixed_model
    # a plain string read from adapter_config.json finds the entry (str-Enum hashing)
    assert "ORTHO_LORA" in mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    assert str(PeftOrthoType.ORTHO_LORA) == "ORTHO_LORA"


@pytest.mark.parametrize("peft_type", list(PeftOrthoType), ids=str)
def test_mixed_model_refuses_every_tuner_not_registered_there(peft_type):
    """peft 0.21's PeftMixedModel accepts only peft's own LoRA-family types, so no peft-ortho tuner is registered in
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING (TunerFacts.mixed_model=False); get_peft_model(mixed=True) refuses it."""
    tuner = peft_ortho._registry.tuners()[peft_type.value]
    assert not tuner.facts.mixed_model
    kwargs = {
        PeftOrthoType.ORTHO_LORA: dict(r=2, slot=0),
        PeftOrthoType.BLOCK_LORA: dict(r=2, num_blocks=2, block_index=0),
        PeftOrthoType.SODA: {},
    }[peft_type]
    config = tuner.config_cls(target_modules=["0"], **kwargs)
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), config, mixed=True)


def test_register_all_is_idempotent_in_process():
    tables = (
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
        mapping.PEFT_TYPE_TO_TUNER_MAPPING,
        mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
    )
    before = [dict(t) for t in tables]
    importlib.import_module("peft_ortho")
    import peft_ortho as again  # noqa: F401

    register_all()
    register_all()
    assert [dict(t) for t in tables] == before


def test_a_different_class_under_the_same_name_is_refused():
    class Impostor(OrthoLoraConfig):
        pass

    Impostor.__qualname__ = "Impostor"
    before = dict(mapping.PEFT_TYPE_TO_CONFIG_MAPPING)
    with pytest.raises(RuntimeError, match="different ORTHO_LORA"):
        register(PeftOrthoType.ORTHO_LORA, Impostor, OrthoLoraModel, "lora_")
    assert dict(mapping.PEFT_TYPE_TO_CONFIG_MAPPING) == before


_RELOAD_CHILD = r"""
import importlib, sys, tempfile
import torch
import peft_ortho
import peft_ortho._registry as reg
import peft_ortho.peft_types as types
from peft import PeftConfig, PeftModel, get_peft_model, mapping
old_enum = types.PeftOrthoType
importlib.reload(types)                     # a notebook re-running its imports
importlib.reload(reg)
assert types.PeftOrthoType is not old_enum  # the reload really happened
assert sorted(reg.tuners()) == ["BLOCK_LORA", "ORTHO_LORA", "SODA"]  # the tuners' facts survive the reload
reg.register_all()
reg.register_all()
importlib.reload(peft_ortho)              # and `import peft_ortho` re-executed
peft_ortho.register_all()
from peft_ortho import OrthoLoraConfig, OrthoLoraModel
assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["ORTHO_LORA"] is OrthoLoraConfig
assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["ORTHO_LORA"] is OrthoLoraModel
assert sum(1 for k in mapping.PEFT_TYPE_TO_CONFIG_MAPPING if k == "ORTHO_LORA") == 1
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
ref = __import__("copy").deepcopy(base)
model = get_peft_model(base, OrthoLoraConfig(r=2, target_modules=["0", "2"], slot=3, init_lora_weights=False))
assert type(model.base_model).__name__ == "OrthoLoraModel"
d = tempfile.mkdtemp()
model.save_pretrained(d)
assert type(PeftConfig.from_pretrained(d)).__name__ == "OrthoLoraConfig"
loaded = PeftModel.from_pretrained(ref, d)
x = torch.randn(3, 16)
assert torch.equal(model(x), loaded(x))
print("OK")
"""


def test_reload_then_register_again_in_a_fresh_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD_CHILD],
        capture_output=True,
        text=True,
        cwd=str(REPO_ROOT),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "OK"


def test_get_peft_model(tiny_gpt2):
    model = get_peft_model(tiny_gpt2, gpt2_config(slot=2, task_type="CAUSAL_LM"))
    assert isinstance(model, PeftModelForCausalLM)
    assert isinstance(model.base_model, OrthoLoraModel)
    assert model.peft_type == "ORTHO_LORA"
    assert model.peft_config["default"].basis_rows == {"32/4": [8, 9, 10, 11]}
    with torch.no_grad():
        assert model(ids()).logits.shape == (2, 7, 100)


# --------------------------------------------------------------------------------------------- Auto classes


@pytest.fixture
def saved_gpt2(tiny_gpt2, tmp_path):
    """A tiny GPT-2 LM saved locally, an orthogonal adapter on it saved with base_model_name_or_path set."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_gpt2.save_pretrained(base_dir)
    reference = copy.deepcopy(tiny_gpt2)
    model = get_peft_model(tiny_gpt2, gpt2_config(slot=1, task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    with open(adapter_dir / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(base_dir)
    return model.eval(), reference, adapter_dir


def test_auto_peft_model_without_task_type(tmp_path):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    base = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)).eval()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, gpt2_config(concept_id="alice/rex"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModel.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, PeftModel) and isinstance(loaded.base_model, OrthoLoraModel)
    assert loaded.peft_config["default"].concept_id == "alice/rex"
    want, got = lora_tensors(model), lora_tensors(loaded)
    assert set(want) == set(got) and len(want) == 4
    for key in want:
        assert torch.equal(want[key], got[key]), key
    with torch.no_grad():
        assert torch.equal(model(ids()).last_hidden_state, loaded(ids()).last_hidden_state)


# --------------------------------------------------------------------------------------------- transformers


def test_transformers_load_adapter(saved_gpt2):
    model, reference, adapter_dir = saved_gpt2
    hf = copy.deepcopy(reference)
    hf.load_adapter(str(adapter_dir), adapter_name="rex")
    assert isinstance(hf.peft_config["rex"], OrthoLoraConfig)
    # the loaded weights are the saved ones (a freshly initialised B would be random here, A the same basis)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    got = lora_tensors(hf)
    assert len(got) == len(saved) == 4
    for (layer, kind, adapter), tensor in got.items():
        assert adapter == "rex"
        assert torch.equal(tensor, saved[f"base_model.model.{layer}.{kind}.weight"]), (layer, kind)
    with torch.no_grad():
        out = hf(ids()).logits
        assert torch.equal(out, model(ids()).logits)
        assert not torch.allclose(out, reference(ids()).logits)
    # the basis it loaded is the one its config names, and lora_A stays frozen
    cfg = hf.peft_config["rex"]
    for (_, kind, _), tensor in got.items():
        if kind == "lora_A":
            assert torch.equal(tensor, bases.basis_rows("orthogonal", 0, 32, cfg.basis_rows["32/4"]).float())
    assert not any(p.requires_grad for n, p in hf.named_parameters() if "lora_A" in n)


def test_transformers_load_adapter_refuses_an_edited_checksum(saved_gpt2):
    _, reference, adapter_dir = saved_gpt2
    with open(adapter_dir / "adapter_config.json") as f:
        data = json.load(f)
    data["basis_checksums"]["32/4"] = "0000000000000000"
    with open(adapter_dir / "adapter_config.json", "w") as f:
        json.dump(data, f)
    with pytest.raises(BasisMismatchError, match="checksum") as info:
        copy.deepcopy(reference).load_adapter(str(adapter_dir), adapter_name="rex")
    assert "'rex'" in str(info.value) and "'transformer.h.0.attn.c_attn'" in str(info.value)


def test_transformers_load_adapter_refuses_an_edited_lora_A(saved_gpt2):
    _, reference, adapter_dir = saved_gpt2
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"
    edited = tensors[key] * 1.5
    tensors[key] = edited
    save_file(tensors, path, metadata={"format": "pt"})
    # peft's own loader refuses it (see test_ortho_lora for the messages) ...
    with pytest.raises(BasisMismatchError):
        PeftModel.from_pretrained(copy.deepcopy(reference), adapter_dir)
    # ... and transformers' load_adapter should too
    hf = copy.deepcopy(reference)
    try:
        hf.load_adapter(str(adapter_dir), adapter_name="rex")
    except BasisMismatchError as e:
        assert "'rex'" in str(e) and "transformer.h.1.attn.c_attn" in str(e)
        return
    # known gap: the edited tensor went into the model without a word
    loaded = hf.transformer.h[1].attn.c_attn.lora_A["rex"].weight
    assert torch.equal(loaded, edited)
    pytest.xfail(
        "transformers' load_adapter reads adapter weights with its own loader, which never calls peft's "
        "_remap_adapter_state_dict_for_load, so OrthoLoraModel's lora_A check does not run on that path"
    )


def test_transformers_set_and_delete_adapter(saved_gpt2, tmp_path):
    model, reference, adapter_dir = saved_gpt2
    # a second adapter on another slot, saved the same way
    other = get_peft_model(copy.deepcopy(reference), gpt2_config(slot=5, task_type="CAUSAL_LM"))
    other.save_pretrained(tmp_path / "other")
    hf = copy.deepcopy(reference)
    hf.load_adapter(str(adapter_dir), adapter_name="rex")
    hf.load_adapter(str(tmp_path / "other"), adapter_name="mia")
    assert set(hf.peft_config) == {"rex", "mia"}
    with torch.no_grad():
        hf.set_adapter("rex")
        assert torch.equal(hf(ids()).logits, model(ids()).logits)
        hf.set_adapter("mia")
        assert torch.equal(hf(ids()).logits, other(ids()).logits)
        hf.delete_adapter(["mia", "rex"])
        assert torch.equal(hf(ids()).logits, reference(ids()).logits)


# --------------------------------------------------------------------------------------------- diffusers


def test_unet_trains_lora_B_only():
    unet = testing.tiny_unet()
    base = copy.deepcopy(unet)
    model = get_peft_model(unet, OrthoLoraConfig(r=4, target_modules=testing.UNET_TARGETS, concept_id="alice/rex"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    targets = tuple("." + t for t in testing.UNET_TARGETS)
    expected = {n for n, m in base.named_modules() if n.endswith(targets) and isinstance(m, torch.nn.Linear)}
    assert {n.removeprefix("base_model.model.") for n in layers} == expected
    assert {t for t in testing.UNET_TARGETS if any(n.endswith("." + t) for n in expected)} == set(testing.UNET_TARGETS)
    cfg = model.peft_config["default"]
    for name, layer in layers.items():
        a = layer.lora_A["default"].weight
        n = a.shape[1]
        rows = bases.slot_rows(bases.concept_slot("alice/rex", n, 4), 4)
        assert cfg.basis_rows[bases.shape_key(n, 4)] == rows
        assert torch.equal(a, bases.basis_rows("orthogonal", 0, n, rows).float()), name

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == sum(m.lora_B["default"].weight.numel() for m in layers.values())

    inputs = testing.unet_inputs(unet)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, base(**inputs).sample)  # B = 0: the base model exactly
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        loss = F.mse_loss(model(**inputs).sample, torch.zeros_like(inputs["sample"]))
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).sample, base(**inputs).sample)
