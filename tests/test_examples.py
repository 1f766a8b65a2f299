"""The examples: ``examples/train_dreambooth.py`` (diffusers + accelerate, also under 2-process DDP) and
``examples/llm_skills.py``, run end to end on tiny models built from configs, offline.

What is checked against independent references: the saved adapter reloads with peft's own
``PeftModel.from_pretrained`` (which also re-verifies an orthogonal basis), the diffusers file goes through diffusers'
real ``load_lora_weights`` and must reproduce the peft model's outputs, a resumed run must end bit-identical to an
uninterrupted one, and two DDP processes must end with the same adapter although they trained on different samples.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from test_hub import RecordingApi

import peft_ortho
from peft_ortho import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PROMPT = "a photo of rex dog"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dreambooth():
    return _load_example("train_dreambooth")


def _reset_accelerate() -> None:
    """Each in-process run creates its own ``Accelerator``; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    _reset_accelerate()


@pytest.fixture(scope="module")
def sd_data(tmp_path_factory):
    """A tiny Stable Diffusion saved as a diffusers folder, and 4 instance PNGs of odd sizes (resized + cropped)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("dreambooth")
    testing.tiny_sd_pipeline().save_pretrained(str(root / "model"))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(12, 10), (10, 12), (16, 16), (9, 11)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image: ignored")
    return root


def _argv(sd_data, out, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(sd_data / "model"),
        "--instance_data_dir",
        str(sd_data / "images"),
        "--instance_prompt",
        PROMPT,
        "--resolution",
        "8",
        "--learning_rate",
        "1e-2",
        "--output_dir",
        str(out),
        *extra,
    ]


def _unet_inputs(sd_data):
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(sd_data / "model"), subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(str(sd_data / "model"), subfolder="text_encoder")
    ids = tok([PROMPT] * 2, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    inputs = testing.unet_inputs(testing.tiny_unet(), batch=2)
    with torch.no_grad():
        inputs["encoder_hidden_states"] = te(ids)[0]
    return inputs


def _fresh_unet(sd_data):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(sd_data / "model"), subfolder="unet")


def _adapter_state(model) -> dict:
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def _lora_b_norms(state: dict) -> list[float]:
    return [t.abs().max().item() for k, t in state.items() if ".lora_B." in k]


# ------------------------------------------------------------------------------------------------------ --help


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("train_dreambooth.py", ["--adapter {ortho,block,soda,lora}", "--resume_from_checkpoint", "--class_prompt"]),
        ("llm_skills.py", ["--steps", "--rank"]),
    ],
)
def test_example_help(script, expected):
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for flag in expected:
        assert flag in out.stdout


# ------------------------------------------------------------------------------------------------------ DreamBooth


def test_dreambooth_ortho_end_to_end(dreambooth, sd_data, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "rex"
    result = dreambooth.main(
        _argv(sd_data, out, "--concept_id", "alice/rex", "--max_train_steps", "3", "--checkpointing_steps", "2")
    )
    assert result["files"] == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors", DIFFUSERS_FILE])
    assert len(result["losses"]) == 3 and all(np.isfinite(result["losses"]))
    # Checkpoints every 2 steps and at the end; the save hook keeps the frozen base weights out of them.
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    for ckpt in ("checkpoint-2", "checkpoint-3"):
        files = set(os.listdir(out / ckpt))
        assert "unet" in files and not any(f.startswith("model") for f in files), files
    final = load_file(str(out / "adapter_model.safetensors"))
    last = load_file(str(out / "checkpoint-3" / "unet" / "adapter_model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)

    # peft reloads it (re-verifying the orthogonal basis against the config) and it changed the UNet.
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ORTHO_LORA" and config["concept_id"] == "alice/rex"
    assert config["base_model_name_or_path"] == str(sd_data / "model")
    peft_unet = PeftModel.from_pretrained(_fresh_unet(sd_data), str(out))
    assert min(_lora_b_norms(_adapter_state(peft_unet))) > 0  # every lora_B trained away from 0
    inputs = _unet_inputs(sd_data)
    with torch.no_grad():
        ref = peft_unet(**inputs).sample
        base = _fresh_unet(sd_data)(**inputs).sample
    assert (ref - base).abs().max() > 1e-4

    # The diffusers file, through diffusers' own loader, computes what the peft model computes.
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_data / "model"), safety_checker=None)
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**inputs).sample, ref, atol=1e-6, rtol=0)

    card = ModelCard.load(str(out / "README.md"))
    assert card.data.library_name == "peft" and card.data.base_model == str(sd_data / "model")
    assert {"peft-ortho", "orthogonal-adaptation", "lora", "diffusers", "dreambooth"} <= set(card.data.tags)
    assert f"`{PROMPT}`" in card.text and "import peft_ortho" in card.text and "basis_seed" in card.text

    # A second run into the same folder must not replace the finished adapter silently.
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        dreambooth.main(_argv(sd_data, out, "--max_train_steps", "1"))


def test_dreambooth_resume_is_bit_identical(dreambooth, sd_data, tmp_path):
    """4 steps in one go == 2 steps, stop, ``--resume_from_checkpoint latest`` to 4: bit for bit.

    Exact (not to tolerance) because nothing a resumed run computes depends on the interruption: the adapter and the
    AdamW moments come back bit-exact (safetensors / weights-only torch.load), and the data order, noise, timesteps
    and erasure swaps of step k are drawn from seeds of (seed, k, process) rather than from a running generator.
    Uses output erasure with p = 0.5 on batches of 2 (its swaps must replay too).
    """
    common = ["--checkpointing_steps", "2", "--train_batch_size", "2", "--slot", "2"]
    common += ["--class_prompt", "a photo of a dog", "--erasure_p", "0.5"]
    full = dreambooth.main(_argv(sd_data, tmp_path / "full", "--max_train_steps", "4", *common))
    first = dreambooth.main(_argv(sd_data, tmp_path / "cut", "--max_train_steps", "2", *common))
    _reset_accelerate()
    resumed = dreambooth.main(
        _argv(sd_data, tmp_path / "cut", "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common)
    )
    assert first["losses"] == full["losses"][:2] and resumed["losses"] == full["losses"][2:]
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["adapter_sha256"] == full["adapter_sha256"]
    assert len(set(full["losses"])) == 4 and min(full["losses"]) > 0  # real steps, not zero-gradient ones


def test_dreambooth_resume_keeps_a_random_slot(dreambooth, sd_data, tmp_path):
    """``slot="random"`` draws new rows in every run; a resumed run must continue with the checkpoint's rows (fresh
    rows would fail the basis check when the checkpoint's ``lora_A`` is loaded)."""
    dreambooth.main(_argv(sd_data, tmp_path / "r", "--max_train_steps", "1"))
    saved = json.loads((tmp_path / "r" / "checkpoint-1" / "unet" / "adapter_config.json").read_text())
    _reset_accelerate()
    dreambooth.main(_argv(sd_data, tmp_path / "r", "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    final = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert saved["slot"] == final["slot"] == "random" and final["basis_rows"] == saved["basis_rows"]
    assert final["base_model_name_or_path"] == str(sd_data / "model")
    a = load_file(str(tmp_path / "r" / "checkpoint-1" / "unet" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "r" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) == (".lora_A." in k) for k in a)  # same frozen basis, B trained further


def test_dreambooth_erasure_p1_keeps_the_adapter_silent(dreambooth, sd_data, tmp_path):
    """With every prompt erased the target *is* the base model's prediction, which the zero-initialised adapter
    already matches exactly: zero loss, zero gradient, lora_B stays exactly 0 — on the UNet and the text encoder.
    Fails if the teacher kept any adapter on, saw other inputs or prompts than the student, or if the erased
    samples were regressed on the noise."""
    result = dreambooth.main(
        _argv(
            sd_data,
            tmp_path / "silent",
            "--max_train_steps",
            "3",
            "--train_text_encoder",
            "--class_prompt",
            "a photo of a dog",
            "--erasure_p",
            "1.0",
        )
    )
    assert result["losses"] == [0.0, 0.0, 0.0]
    for folder in ("silent", "silent/text_encoder"):
        state = load_file(str(tmp_path / folder / "adapter_model.safetensors"))
        assert _lora_b_norms(state) and max(_lora_b_norms(state)) == 0.0


def test_dreambooth_lora_with_text_encoder(dreambooth, sd_data, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    out = tmp_path / "lora"
    result = dreambooth.main(
        _argv(sd_data, out, "--adapter", "lora", "--train_text_encoder", "--max_train_steps", "2")
    )
    assert "text_encoder" in result["files"] and DIFFUSERS_FILE in result["files"]
    te_config = json.loads((out / "text_encoder" / "adapter_config.json").read_text())
    assert te_config["peft_type"] == "LORA" and set(te_config["target_modules"]) == set(
        dreambooth.DEFAULT_TEXT_ENCODER_TARGETS
    )
    keys = load_file(str(out / DIFFUSERS_FILE)).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)

    # Both components through diffusers' loader == both peft adapters.
    te = PeftModel.from_pretrained(
        CLIPTextModel.from_pretrained(str(sd_data / "model"), subfolder="text_encoder"), str(out / "text_encoder")
    )
    assert min(_lora_b_norms(_adapter_state(te))) > 0
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_data / "model"), safety_checker=None)
    pipe.load_lora_weights(str(out))
    ids = pipe.tokenizer([PROMPT], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], te(ids)[0], atol=1e-5, rtol=0)
    card = ModelCard.load(str(out / "README.md"))
    assert "text_encoder/" in card.text and "orthogonal-adaptation" not in card.data.tags


def test_dreambooth_block_adapter(dreambooth, sd_data, tmp_path):
    if not hasattr(peft_ortho, "BlockLoraConfig"):
        pytest.skip("BlockLoraConfig is not available in this peft-ortho")
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "block"
    argv = ["--adapter", "block", "--num_blocks", "4", "--block_index", "3", "--max_train_steps", "2"]
    result = dreambooth.main(_argv(sd_data, out, *argv))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "BLOCK_LORA" and config["resolved_block"] == 3
    peft_unet = PeftModel.from_pretrained(_fresh_unet(sd_data), str(out))
    inputs = _unet_inputs(sd_data)
    with torch.no_grad():
        ref = peft_unet(**inputs).sample
        assert (ref - _fresh_unet(sd_data)(**inputs).sample).abs().max() > 1e-5
    assert DIFFUSERS_FILE in result["files"]
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_data / "model"), safety_checker=None)
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**inputs).sample, ref, atol=1e-6, rtol=0)
    assert "blocklora" in ModelCard.load(str(out / "README.md")).data.tags


def test_dreambooth_soda_adapter(dreambooth, sd_data, tmp_path):
    if not hasattr(peft_ortho, "SodaConfig"):
        pytest.skip("SodaConfig is not available in this peft-ortho")
    out = tmp_path / "soda"
    result = dreambooth.main(_argv(sd_data, out, "--adapter", "soda", "--max_train_steps", "2"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "SODA"
    peft_unet = PeftModel.from_pretrained(_fresh_unet(sd_data), str(out))
    inputs = _unet_inputs(sd_data)
    with torch.no_grad():
        assert (peft_unet(**inputs).sample - _fresh_unet(sd_data)(**inputs).sample).abs().max() > 1e-5
    card = ModelCard.load(str(out / "README.md")).text
    # Either a diffusers file was written, or the card says why not.
    assert (DIFFUSERS_FILE in result["files"]) != (f"no {DIFFUSERS_FILE}" in card)


class _FilteringRecordingApi(RecordingApi):
    """tests/test_hub.py's recording ``HfApi`` that also applies ``allow_patterns`` the way ``upload_folder`` does."""

    def upload_folder(self, **kwargs):
        info = super().upload_folder(**kwargs)
        kept = set(filter_repo_objects(self.uploaded, allow_patterns=kwargs.get("allow_patterns")))
        self.uploaded = {k: v for k, v in self.uploaded.items() if k in kept}
        return info


def test_dreambooth_push_to_hub_is_recorded(dreambooth, sd_data, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing may leave this machine
    api = _FilteringRecordingApi(token="hf_fake")
    out = tmp_path / "push"
    argv = ["--max_train_steps", "2", "--push_to_hub", "--hub_model_id", "alice/rex-ortho", "--hub_private"]
    result = dreambooth.main(_argv(sd_data, out, "--slot", "1", *argv), hub_api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "alice/rex-ortho", "exist_ok": True, "private": True, "repo_type": "model"}
    assert set(api.uploaded) == {"README.md", "adapter_config.json", "adapter_model.safetensors", DIFFUSERS_FILE}
    assert api.uploaded["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    card = ModelCard(api.uploaded["README.md"].decode())
    assert "PeftModel.from_pretrained(base_model, 'alice/rex-ortho')" in card.text
    assert f"pipe.load_lora_weights('alice/rex-ortho', weight_name='{DIFFUSERS_FILE}')" in card.text
    assert "| `slot` | `1` |" in card.text and result["pushed"].oid


def test_dreambooth_refuses_bad_input(dreambooth, sd_data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    argv = _argv(sd_data, tmp_path / "o", "--max_train_steps", "1")
    bad_dir = [*argv, "--instance_data_dir", str(empty)]
    with pytest.raises(ValueError, match="holds no images"):
        dreambooth.main(bad_dir)
    with pytest.raises(ValueError, match="no checkpoint-<step> folder"):
        dreambooth.main([*argv, "--resume_from_checkpoint", "latest"])
    for extra, message in [
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--slot", "1", "--concept_id", "x"], "either --slot or --concept_id"),
        (["--slot", "-2"], "--slot must be a non-negative integer"),
        (["--erasure_p", "1.5"], "--erasure_p must lie in"),
    ]:
        with pytest.raises(SystemExit):
            dreambooth.parse_args([*argv, *extra])
        assert message in capsys.readouterr().err


def test_sample_indices_split_epochs_without_overlap(dreambooth):
    """Two processes × batch 2 over 5 images: every epoch of 5 consecutive samples is a permutation."""
    samples = [i for step in range(5) for rank in range(2) for i in dreambooth.sample_indices(step, rank, 2, 2, 5, 0)]
    assert len(samples) == 20
    for epoch in range(4):
        assert sorted(samples[5 * epoch : 5 * epoch + 5]) == [0, 1, 2, 3, 4]
    assert samples[:5] != samples[5:10]  # reshuffled each epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dreambooth_trains_the_same_adapter_on_two_ddp_processes(dreambooth, sd_data, tmp_path):
    """``accelerate launch`` with 2 CPU processes (torchrun + gloo): each process trains on its own images and noise
    (their losses differ), DDP averages the gradients, and both end with bit-identical adapters that training moved.
    The random orthogonal slot is drawn once and shared, or the processes' frozen ``lora_A`` would differ."""
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",  # CPU processes (gloo), also on a GPU machine
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml"),  # ignore any user-wide accelerate config
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # --multi_gpu selects accelerate's torchrun launcher; ACCELERATE_USE_CPU makes the processes MULTI_CPU / gloo.
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        os.path.join(EXAMPLES, "train_dreambooth.py"),
        *_argv(sd_data, out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--debug_dump_adapter_hash"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    dumps = [json.loads((out / f"adapter_hash-rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["world_size"] for d in dumps] == [2, 2]
    assert dumps[0]["losses"][0] != dumps[1]["losses"][0]  # different samples on each process...
    assert dumps[0]["sha256"] == dumps[1]["sha256"]  # ...and yet the same adapter
    # The adapter rank 0 saved is that adapter, reloads (basis verified against the shared slot) and was trained.
    peft_unet = PeftModel.from_pretrained(_fresh_unet(sd_data), str(out))
    assert dreambooth.adapter_digest(peft_unet) == dumps[0]["sha256"]
    assert min(_lora_b_norms(_adapter_state(peft_unet))) > 0
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]


# ------------------------------------------------------------------------------------------------------ LLM skills


def test_llm_skills_train_record_statistics_and_merge_four_ways(tmp_path):
    """Small budget: the base learns COPY only; each adapter learns its own skill far above chance (1/K), records its
    input statistics beside the adapter, and the pair is merged four ways. The exact sum, fused, is exactly the
    model peft computes with both adapters active; the other rows are not exact sums.

    Deliberately *not* asserted: the merged accuracies (measured with the defaults in docs/llm.md); the test pins
    their meaning instead.
    """
    from peft import PeftModel

    from peft_ortho.statistics import load_statistics

    llm = _load_example("llm_skills")
    argv = ["--steps", "80", "--base_steps", "150", "--width", "32", "--calibration", "64", "--refine_steps", "3"]
    results = llm.main([*argv, "--methods", "ortho", "--out", str(tmp_path / "skills")])
    chance = 1 / llm.K
    assert results["base"]["COPY"] > 0.95 and results["base"]["SUCC"] < 2 * chance
    assert "lora" not in results
    for method in ("ortho",):
        assert results[method]["alone"]["SUCC"] > 5 * chance, results
        assert results[method]["alone"]["REV"] > 4 * chance, results
        assert list(results[method]["merged"]) == list(llm.MERGES)
        assert results[method]["exact"] == {row: row == "exact sum" for row in llm.MERGES}
        for accs in results[method]["merged"].values():
            assert all(0.0 <= v <= 1.0 for v in accs.values())

    # Statistics travel with each adapter: concept (task batches) and prior (erasure batches) for every layer.
    rev, succ = results["folders"]["ortho"]
    stats = load_statistics(rev, adapter="rev")
    assert len(stats.layers) == 8  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in both blocks
    assert all({"concept", "prior"} <= set(kinds) for kinds in stats.layers.values())

    # The fused exact sum == peft's own forward with both orthogonal adapters loaded and active.
    torch.set_num_threads(1)
    base = llm.build_base(32, 150, 3e-3, seed=0)  # the same base: same seed, one thread, deterministic
    assert llm.accuracy(base, llm.COPY) == results["base"]["COPY"]
    assert json.loads(open(os.path.join(rev, "adapter_config.json")).read())["slot"] == 0
    model = PeftModel.from_pretrained(llm.copy.deepcopy(base), rev, adapter_name="rev")
    model.load_adapter(succ, adapter_name="succ")
    model.base_model.set_adapter(["rev", "succ"])
    fused = peft_ortho.compose([rev, succ], method="linear", progress=False).fuse(llm.copy.deepcopy(base))
    seq = llm.make_batch(llm.REV, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=seq).logits, model(input_ids=seq).logits, atol=1e-4, rtol=0)
        assert (fused(input_ids=seq).logits - base(input_ids=seq).logits).abs().max() > 0.1
    assert llm.accuracy(fused, llm.REV) == results["ortho"]["merged"]["exact sum"]["REV"]
