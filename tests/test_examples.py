"""The examples: ``examples/train_dreambooth.py`` (diffusers + accelerate, also under 2-process DDP) and
``examples/llm_skills.py``, run end to end on tiny models built from configs, offline.

What is checked against independent references: the saved adapter reloads with peft's own
``PeftModel.from_pretrained`` (which also re-verifies an orthogonal basis), the diffusers file goes through diffusers'
real ``load_lora_weights`` and must reproduce the peft model's outputs, a resumed run must end bit-identical to an
uninterrupted one, and two DDP processes must end with the same adapter although they trained on different samples.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import load_script
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
    return load_script("examples", name)


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
    classes = root / "classes"  # user-provided class images (nothing to generate when 3 are asked for)
    classes.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(classes / f"dog{i}.png")
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
        (
            "train_dreambooth.py",
            ["--adapter {ortho,block,soda,lora}", "--resume_from_checkpoint", "--with_prior_preservation"]
            + ["--class_prompt", "--validation_prompt", "--no_statistics", "--gradient_accumulation_steps"],
        ),
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
    assert card.data.library_name == "peft" and card.data.base_model is None  # a local path never goes into a card
    assert {"peft-ortho", "orthogonal-adaptation", "lora", "diffusers", "dreambooth"} <= set(card.data.tags)
    assert f"`{PROMPT}`" in card.text and "import peft_ortho" in card.text and "basis_seed" in card.text

    # A second run into the same folder must not replace the finished adapter silently.
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        dreambooth.main(_argv(sd_data, out, "--max_train_steps", "1"))


def test_dreambooth_resume_is_bit_identical(dreambooth, sd_data, tmp_path):
    """4 steps in one go == 2 steps, stop, ``--resume_from_checkpoint latest`` to 4: bit for bit, adapter *and*
    input statistics.

    Exact (not to tolerance) because nothing a resumed run computes depends on the interruption: the adapter, the
    AdamW moments and each process's float64 statistics sums come back bit-exact (safetensors / weights-only
    torch.load), and every sample's image, view, noise, timestep and erasure swap is drawn from seeds of (seed,
    sample number) rather than from a running generator. Exercises every random draw: prior preservation (class
    samples), random crops and flips, output erasure with p = 0.5, 2 accumulated micro-batches of 2.
    """
    common = ["--checkpointing_steps", "2", "--train_batch_size", "2", "--slot", "2", "--random_flip"]
    common += ["--with_prior_preservation", "--class_data_dir", str(sd_data / "classes"), "--num_class_images", "3"]
    common += ["--class_prompt", "a photo of a dog", "--output_erasure", "--erasure_p", "0.5"]
    common += ["--gradient_accumulation_steps", "2"]
    full = dreambooth.main(_argv(sd_data, tmp_path / "full", "--max_train_steps", "4", *common))
    first = dreambooth.main(_argv(sd_data, tmp_path / "cut", "--max_train_steps", "2", *common))
    _reset_accelerate()
    resumed = dreambooth.main(
        _argv(sd_data, tmp_path / "cut", "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common)
    )
    assert first["losses"] == full["losses"][:2] and resumed["losses"] == full["losses"][2:]
    for name in ("adapter_model.safetensors", dreambooth.STATISTICS_FILE):
        a = load_file(str(tmp_path / "full" / name))
        b = load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["adapter_sha256"] == full["adapter_sha256"]
    assert resumed["statistics_sha256"] == full["statistics_sha256"] is not None
    assert len(set(full["losses"])) == 4 and min(full["losses"]) > 0  # real steps, not zero-gradient ones
    # Every sample was drawn: a micro-batch of 2 instance + 2 class samples, twice, and both augmentations occurred.
    assert [b["kind"] for b in full["batches"]] == ["instance", "class"] * 2
    views = [v for b in full["batches"] for v in b["views"]]
    assert {flip for *_, flip in views} == {True, False}


CLASS_PROMPT = "a photo of a dog"


def test_dreambooth_prior_preservation_generates_caches_and_mixes(dreambooth, sd_data, tmp_path, monkeypatch):
    """Missing class images are generated with the base pipeline (each from its own seed: the same images as
    diffusers' pipeline called directly), cached (a second run generates nothing and leaves the files alone), and
    resumed (a deleted image is regenerated bit for bit); user images in the folder count. Every step's batches are
    2 instance + 2 class samples, with their prompts."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    classes = tmp_path / "dogs"
    classes.mkdir()
    Image.fromarray(np.full((8, 8, 3), 127, np.uint8)).save(classes / "mine.png")  # counts as one of the 3
    argv = ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--class_data_dir", str(classes)]
    argv += ["--num_class_images", "3", "--class_inference_steps", "2", "--sample_batch_size", "1"]
    argv += ["--train_batch_size", "2", "--max_train_steps", "2", "--slot", "1", "--no_statistics"]
    result = dreambooth.main(_argv(sd_data, tmp_path / "a", *argv))
    assert result["class_images_generated"] == 2
    made = sorted(p.name for p in classes.iterdir())
    assert made == ["class-000000.png", "class-000001.png", "mine.png"]

    # The same images as the base pipeline makes from those seeds.
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_data / "model"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    for j in (0, 1):
        g = torch.Generator().manual_seed(dreambooth.derived_seed(0, "class-image", j))
        ref = pipe(CLASS_PROMPT, height=8, width=8, num_inference_steps=2, generator=g, output_type="np").images[0]
        got = np.asarray(Image.open(classes / f"class-00000{j}.png"), dtype=np.float64) / 255
        assert np.abs(got - ref).max() <= 1 / 255 + 1e-6

    # Every batch: the instance samples, then as many class samples (each with its prompt), from the right sets.
    assert [b["kind"] for b in result["batches"]] == ["instance", "class"]
    instance, cls = result["batches"]
    assert instance["samples"] == cls["samples"] == [2, 3]  # step 1: the 3rd and 4th sample of the run
    assert instance["prompts"] == [PROMPT] * 2 and cls["prompts"] == [CLASS_PROMPT] * 2
    assert all(0 <= i < 4 for i in instance["index"]) and all(0 <= i < 3 for i in cls["index"])

    # Cached: nothing generated again, files untouched (no pipeline is even built).
    before = {p.name: p.read_bytes() for p in classes.iterdir()}
    monkeypatch.setattr(dreambooth, "make_pipeline", _refuse_pipeline)
    _reset_accelerate()
    again = dreambooth.main(_argv(sd_data, tmp_path / "b", *argv))
    assert again["class_images_generated"] == 0
    assert {p.name: p.read_bytes() for p in classes.iterdir()} == before
    monkeypatch.undo()

    # Resumable: an interrupted generation (one image missing) makes exactly the missing one, bit for bit. This run
    # records statistics (the default with prior preservation): recording only reads, the adapter is the same.
    (classes / "class-000001.png").unlink()
    _reset_accelerate()
    resumed = dreambooth.main(_argv(sd_data, tmp_path / "c", *[a for a in argv if a != "--no_statistics"]))
    assert resumed["class_images_generated"] == 1
    assert {p.name: p.read_bytes() for p in classes.iterdir()} == before
    assert dreambooth.STATISTICS_FILE in resumed["files"] and dreambooth.STATISTICS_FILE not in result["files"]
    assert resumed["adapter_sha256"] == result["adapter_sha256"]


def test_dreambooth_prior_loss_target_base_is_the_frozen_base_prediction(dreambooth, sd_data, tmp_path):
    """``--prior_loss_target base``: the class samples regress onto the frozen base's prediction. At the first step
    the adapter is the identity, so the class term is exactly 0 and the step's loss equals the run without a class
    term (``--prior_loss_weight 0``) bit for bit; with the noise target it does not. From the second step the
    adapter has moved and the class term pulls it back: the runs differ."""
    argv = ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--class_data_dir", str(sd_data / "classes")]
    argv += ["--num_class_images", "3", "--train_batch_size", "2", "--max_train_steps", "2", "--slot", "1"]
    argv += ["--no_statistics"]
    runs = {}
    for name, extra in {
        "base": ["--prior_loss_target", "base"],
        "none": ["--prior_loss_target", "base", "--prior_loss_weight", "0"],
        "noise": [],
    }.items():
        _reset_accelerate()
        runs[name] = dreambooth.main(_argv(sd_data, tmp_path / name, *argv, *extra))
    assert runs["base"]["losses"][0] == runs["none"]["losses"][0]
    assert runs["noise"]["losses"][0] > runs["none"]["losses"][0]
    assert runs["base"]["losses"][1] != runs["none"]["losses"][1]
    assert runs["base"]["adapter_sha256"] != runs["none"]["adapter_sha256"] != runs["noise"]["adapter_sha256"]
    card = (tmp_path / "base" / "README.md").read_text()
    assert "target: the base's prediction" in card


def _refuse_pipeline(*args, **kwargs):
    raise AssertionError("a pipeline was built although nothing needed one")


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    """The tiny SDXL pipeline (diffusers' SDXL test configuration) saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("sdxl") / "model"
    testing.tiny_sdxl_pipeline().save_pretrained(str(folder))
    return folder


def test_dreambooth_sdxl_conditions_like_the_pipeline_and_exports(dreambooth, sd_data, sdxl_model, tmp_path):
    """SDXL: the script's text conditioning equals ``StableDiffusionXLPipeline.encode_prompt`` (both encoders'
    penultimate states, the second's pooled projection); ``--train_text_encoder`` adapts both encoders; the one
    diffusers file loads in plain ``StableDiffusionXLPipeline.load_lora_weights`` and computes what the three peft
    adapters compute."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_model))
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    tokenizers = {"text_encoder": pipe.tokenizer, "text_encoder_2": pipe.tokenizer_2}
    prompts = dreambooth.PromptEncoder(tokenizers, encoders, {}, torch.device("cpu"), sdxl=True, zero_uncond=True)
    context, pooled = prompts([PROMPT, CLASS_PROMPT])
    ref, _, ref_pooled, _ = pipe.encode_prompt([PROMPT, CLASS_PROMPT], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(context, ref, atol=0, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=0, rtol=0)

    out = tmp_path / "xl"
    argv = ["--pretrained_model_name_or_path", str(sdxl_model), "--resolution", "16", "--train_text_encoder"]
    argv += ["--max_train_steps", "2", "--train_batch_size", "2", "--text_encoder_lr", "5e-3"]
    result = dreambooth.main(_argv(sd_data, out, *argv))
    assert {"text_encoder", "text_encoder_2", DIFFUSERS_FILE} <= set(result["files"])
    keys = load_file(str(out / DIFFUSERS_FILE)).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}

    unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(str(sdxl_model), subfolder="unet"), str(out))
    te1 = PeftModel.from_pretrained(
        CLIPTextModel.from_pretrained(str(sdxl_model), subfolder="text_encoder"), str(out / "text_encoder")
    )
    te2 = PeftModel.from_pretrained(
        CLIPTextModelWithProjection.from_pretrained(str(sdxl_model), subfolder="text_encoder_2"),
        str(out / "text_encoder_2"),
    )
    for model in (unet, te2):
        assert min(_lora_b_norms(_adapter_state(model))) > 0  # trained
    # The UNet reads text_encoder's penultimate layer: its last layer gets no gradient and stays exactly zero (as in
    # diffusers' SDXL script); text_encoder_2's last layer feeds the pooled embedding and trains.
    last = f"layers.{pipe.text_encoder.config.num_hidden_layers - 1}."
    te1_state = _adapter_state(te1)
    assert min(_lora_b_norms({k: v for k, v in te1_state.items() if last not in k})) > 0
    assert max(_lora_b_norms({k: v for k, v in te1_state.items() if last in k})) == 0
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    ids = pipe.tokenizer([PROMPT], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        base = pipe.unet(sample, 10, context, added_cond_kwargs=cond).sample
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        ref = unet(sample, 10, context, added_cond_kwargs=cond).sample
        assert (ref - base).abs().max() > 1e-5
        torch.testing.assert_close(
            pipe.unet(sample, 10, context, added_cond_kwargs=cond).sample, ref, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(pipe.text_encoder(ids)[0], te1(ids)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.text_encoder_2(ids)[0], te2(ids)[0], atol=1e-5, rtol=0)
    assert "stable-diffusion-xl" in ModelCard.load(str(out / "README.md")).data.tags


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
            "--output_erasure",
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
        # a few float32 ulps of the output (|y| ~ 1) on top of 1e-6: the block product and the zero-padded LoRA
        # round differently (1.8e-6 at y = 1.08 under diffusers 0.41 / peft 0.21.0); a wrong export is off by ~ΔW
        torch.testing.assert_close(pipe.unet(**inputs).sample, ref, atol=1e-6, rtol=4e-6)
    assert "blocklora" in ModelCard.load(str(out / "README.md")).data.tags


def test_dreambooth_validation_grid_tracker_and_card(dreambooth, sd_data, tmp_path, monkeypatch):
    """``--validation_prompt``: a grid every ``--validation_steps`` and a final one, made with the adapter from seeded
    generators (the same images as plain diffusers makes from the exported file with those seeds), logged to
    TensorBoard, and the final grid is the card's widget. Asking for no validation builds no pipeline at all, and
    validating does not change what is trained."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "val"
    common = ["--max_train_steps", "2", "--slot", "3"]
    argv = ["--validation_prompt", PROMPT, "--num_validation_images", "2", "--validation_steps", "1"]
    argv += ["--validation_inference_steps", "2", "--report_to", "tensorboard"]
    result = dreambooth.main(_argv(sd_data, out, *common, *argv))
    assert dreambooth.VALIDATION_GRID in result["files"]
    assert sorted(os.listdir(out / "validation")) == ["step-000001.png"]  # step 2 is the final grid
    grid = np.asarray(Image.open(out / dreambooth.VALIDATION_GRID), dtype=np.float64) / 255
    assert grid.shape == (8, 16, 3)  # 1 row × 2 images of 8×8

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_data / "model"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    for i in range(2):
        g = torch.Generator().manual_seed(dreambooth.derived_seed(0, "validation", i))
        ref = pipe(PROMPT, height=8, width=8, num_inference_steps=2, generator=g, output_type="np").images[0]
        assert np.abs(grid[:, 8 * i : 8 * i + 8] - ref).max() <= 2 / 255

    card = ModelCard.load(str(out / "README.md"))
    assert card.data.widget == [{"text": PROMPT, "output": {"url": dreambooth.VALIDATION_GRID}}]
    assert f"]({dreambooth.VALIDATION_GRID})" in card.text

    events = EventAccumulator(str(out / "logs" / "dreambooth"), size_guidance={"images": 0})
    events.Reload()
    assert {"validation", "test"} <= set(events.Tags()["images"]) and "loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("loss")] == [1, 2]

    monkeypatch.setattr(dreambooth, "make_pipeline", _refuse_pipeline)
    _reset_accelerate()
    plain = dreambooth.main(_argv(sd_data, tmp_path / "plain", *common))
    assert plain["adapter_sha256"] == result["adapter_sha256"]
    assert not (tmp_path / "plain" / "validation").exists() and dreambooth.VALIDATION_GRID not in plain["files"]


def test_dreambooth_soda_exports_a_diffusers_lora(dreambooth, sd_data, tmp_path):
    """``--adapter soda --soda_export_rank exact``: the diffusers file loads in plain ``load_lora_weights`` and computes
    what the SODA adapter computes; the card says it is exact. A rank-1 export's reported error equals the one computed
    independently from the merged weights (``merge_and_unload`` minus the base, float64 SVD)."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "soda"
    argv = ["--adapter", "soda", "--max_train_steps", "2", "--soda_export_rank", "exact"]
    result = dreambooth.main(_argv(sd_data, out, *argv))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "SODA"
    assert DIFFUSERS_FILE in result["files"]
    peft_unet = PeftModel.from_pretrained(_fresh_unet(sd_data), str(out))
    inputs = _unet_inputs(sd_data)
    with torch.no_grad():
        ref = peft_unet(**inputs).sample
        assert (ref - _fresh_unet(sd_data)(**inputs).sample).abs().max() > 1e-5
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_data / "model"), safety_checker=None)
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**inputs).sample, ref, atol=1e-5, rtol=0)
    assert "exported **exactly**" in ModelCard.load(str(out / "README.md")).text

    reports = dreambooth.export_soda({"unet": peft_unet}, 1, str(tmp_path / "rank1"))
    base = dict(_fresh_unet(sd_data).named_parameters())
    merged = dict(PeftModel.from_pretrained(_fresh_unet(sd_data), str(out)).merge_and_unload().named_parameters())
    lost = total = 0.0
    for layer in reports["unet"].layers:
        delta = (merged[f"{layer}.weight"].double() - base[f"{layer}.weight"].double()).flatten(1)
        s = torch.linalg.svdvals(delta)
        lost, total = lost + (s[1:] ** 2).sum().item(), total + (s**2).sum().item()
    assert reports["unet"].relative_error == pytest.approx((lost / total) ** 0.5, rel=1e-3)
    note = dreambooth._soda_note(1, reports)
    assert f"{reports['unet'].relative_error:.3g}" in note and "rank-1" in note


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
        # --class_prompt alone used to mean output erasure: refused rather than silently reinterpreted.
        (["--class_prompt", "a dog"], "--class_prompt needs --with_prior_preservation"),
        (["--with_prior_preservation", "--class_prompt", "a dog"], "needs --class_prompt and --class_data_dir"),
        (["--class_data_dir", "x"], "--class_data_dir needs --with_prior_preservation"),
        (["--prior_loss_target", "base"], "--prior_loss_target needs --with_prior_preservation"),
        (["--output_erasure"], "--output_erasure needs --class_prompt or --foreign_prompts"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be positive"),
        (["--adapter", "soda", "--soda_export_rank", "0"], "--soda_export_rank must be a positive integer"),
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


def test_dreambooth_trains_the_same_adapter_on_two_ddp_processes(dreambooth, sd_data, tmp_path, monkeypatch):
    """``accelerate launch`` with 2 CPU processes (torchrun + gloo), with prior preservation: each process trains on
    its own images and noise (their losses differ), DDP averages the gradients, and both end with bit-identical
    adapters that training moved *and* bit-identical input statistics (summed over the processes). The random
    orthogonal slot is drawn once and shared, or the processes' frozen ``lora_A`` would differ.

    And 2 processes × batch 1 train on exactly the samples 1 process × batch 2 does (every draw is a function of the
    sample's number): the same losses, statistics and adapter, to float rounding (the single process is handed the
    basis rows the 2 processes drew)."""
    from peft_ortho.statistics import load_statistics

    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",  # CPU processes (gloo), also on a GPU machine
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml"),  # ignore any user-wide accelerate config
    }
    train = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--with_prior_preservation"]
    train += ["--class_prompt", CLASS_PROMPT, "--class_data_dir", str(sd_data / "classes"), "--num_class_images", "3"]
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
        *_argv(sd_data, out, *train, "--debug_dump_adapter_hash"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    dumps = [json.loads((out / f"adapter_hash-rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["world_size"] for d in dumps] == [2, 2]
    assert dumps[0]["losses"][0] != dumps[1]["losses"][0]  # different samples on each process...
    assert dumps[0]["sha256"] == dumps[1]["sha256"]  # ...and yet the same adapter
    assert dumps[0]["statistics_sha256"] == dumps[1]["statistics_sha256"] is not None  # and the same statistics
    # The adapter rank 0 saved is that adapter, reloads (basis verified against the shared slot) and was trained.
    peft_unet = PeftModel.from_pretrained(_fresh_unet(sd_data), str(out))
    assert dreambooth.adapter_digest(peft_unet) == dumps[0]["sha256"]
    assert min(_lora_b_norms(_adapter_state(peft_unet))) > 0
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(os.listdir(out / "checkpoint-2" / "statistics")) == ["rank0.safetensors", "rank1.safetensors"]

    # One process, batch 2: the same samples (and the same random rows).
    rows = json.loads((out / "adapter_config.json").read_text())["basis_rows"]
    monkeypatch.setattr(peft_ortho.bases, "random_rows", lambda n, r, rng=None: list(rows[f"{n}/{r}"]))
    single = dreambooth.main(_argv(sd_data, tmp_path / "one", *train, "--train_batch_size", "2"))
    assert single["losses"] == pytest.approx([(a + b) / 2 for a, b in zip(*(d["losses"] for d in dumps))], rel=1e-5)
    two, one = (load_statistics(str(folder), adapter="rex") for folder in (out, tmp_path / "one"))
    assert sorted(two.layers) == sorted(one.layers) == sorted(dreambooth_layers(peft_unet))
    for layer, kinds in two.layers.items():
        assert set(kinds) == {"concept", "prior", "unconditional"}
        for kind, moment in kinds.items():
            assert moment.count == one.layers[layer][kind].count
            ref = one.layers[layer][kind].dense()  # float32 activations, batch 1 vs 2: equal to rounding
            assert (moment.dense() - ref).norm() <= 1e-3 * ref.norm(), (layer, kind)
    a, b = (
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(tmp_path / "one" / "adapter_model.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-3)  # Adam's first steps ≈ lr · sign(g), lr = 1e-2


def dreambooth_layers(peft_model) -> list[str]:
    """Names of the adapted layers as statistics files key them (no ``base_model.model.`` prefix)."""
    return sorted(
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        for k in _adapter_state(peft_model)
        if k.endswith("lora_A.weight")
    )


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


def test_dreambooth_prior_benchmark_quick_run(tmp_path, capsys):
    """``python -m studies.dreambooth_prior --quick``: both adapters train (one on generated class images, cached in
    the work folder), and the printed JSON carries every field, finite."""
    from studies import dreambooth_prior as bench

    results = bench.main(["--quick", "--work_dir", str(tmp_path)])
    out = capsys.readouterr().out
    printed = json.loads(out[out.rindex("\n{") + 1 :])  # the JSON block printed last
    assert printed == results and results["steps"] == 2
    assert set(results["base"]) == {"concept", "class"} and all(np.isfinite(v) for v in results["base"].values())
    for name in ("plain", "prior"):
        assert set(results[name]) == {"concept_gain", "prior_drift", "prediction_change", "final_loss"}
        assert all(np.isfinite(v) for v in results[name].values()), results[name]
    class_images = sorted(f for f in os.listdir(tmp_path / "dogs") if f.endswith((".png", ".jpg")))
    assert len(class_images) == 2, os.listdir(tmp_path / "dogs")
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    prior = load_file(tmp_path / "prior" / "adapter_model.safetensors")
    assert plain.keys() == prior.keys()
    assert any(not torch.equal(plain[k], prior[k]) for k in plain), "the prior loss must change what is learned"
