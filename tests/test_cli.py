"""``peft-ortho compose | inspect | export``: outputs equal the Python API's, and exit codes 0 / 1 / 2.

Most tests call ``peft_ortho.cli.main`` in-process; a few run ``python -m peft_ortho.cli`` in a subprocess to check
the real exit status and that user errors print one line and no traceback.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import build
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_ortho
from peft_ortho import OrthoLoraConfig, testing
from peft_ortho.cli import main
from peft_ortho.merging import compose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(peft_ortho.__file__)))
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def ortho(slot, **kw):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": testing.UNET_TARGETS, "init_lora_weights": False, **kw}
    return OrthoLoraConfig(slot=slot, **kw)


def run(argv) -> int:
    """``main(argv)``'s exit code, whether it returns it or exits (argparse exits 2 on usage errors)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def assert_user_error(code: int, err: str, *names) -> str:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("peft-ortho: error:"), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], err
    return lines[0]


def same_tensors(path_a, path_b) -> None:
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def ad(unet0, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_adapters")
    o0 = build(unet0, ortho(0), root / "o0", seed=1)
    o1 = build(unet0, ortho(1, lora_alpha=2), root / "o1", seed=2)
    lora = build(
        unet0,
        LoraConfig(r=3, lora_alpha=5, target_modules=testing.UNET_TARGETS, init_lora_weights=False),
        root / "lora",
        seed=3,
    )
    nan = str(root / "nan")
    shutil.copytree(o1, nan)
    path = os.path.join(nan, "adapter_model.safetensors")
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    tensors[f"base_model.model.{LAYER}.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return {"o0": o0, "o1": o1, "lora": lora, "nan": nan}


# ----------------------------------------------------------------------------------------------------- compose


def test_compose_peft(ad, unet0, tmp_path, capsys):
    out = tmp_path / "merged"
    code = run(["compose", ad["o0"], ad["o1"], ad["lora"], "--out", out, "--weights", "0.5", "2", "-1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(out) in captured.out
    assert (out / "adapter_config.json").is_file() and (out / "README.md").is_file()
    merged = compose([ad["o0"], ad["o1"], ad["lora"]], weights=[0.5, 2, -1])
    merged.save_pretrained(str(tmp_path / "api"))
    same_tensors(out / "adapter_model.safetensors", tmp_path / "api" / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(copy.deepcopy(unet0), str(out))
    fused = merged.fuse(copy.deepcopy(unet0))
    inputs = testing.unet_inputs(unet0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, fused(**inputs).sample, atol=2e-5, rtol=1e-4)


def test_compose_diffusers(ad, tmp_path, capsys):
    out = tmp_path / "merged-diffusers"
    code = run(["compose", ad["o0"], ad["lora"], "--out", out, "--format", "diffusers", "--weights", "1.5", "0.5"])
    assert code == 0, capsys.readouterr().err
    compose([ad["o0"], ad["lora"]], weights=[1.5, 0.5]).save_diffusers(str(tmp_path / "api"))
    same_tensors(out / "pytorch_lora_weights.safetensors", tmp_path / "api" / "pytorch_lora_weights.safetensors")


def test_compose_fused(ad, unet0, tmp_path, capsys):
    base = tmp_path / "base"
    unet0.save_pretrained(str(base))
    out = tmp_path / "fused"
    code = run(
        ["compose", ad["o0"], ad["o1"], "--out", out, "--format", "fused", "--base", base, "--weights", "0.7", "3"]
    )
    assert code == 0, capsys.readouterr().err
    (weights_file,) = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    saved = load_file(str(out / weights_file))
    fused = compose([ad["o0"], ad["o1"]], weights=[0.7, 3]).fuse(copy.deepcopy(unet0))
    expected = fused.state_dict()
    assert saved.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(saved[k], v), k
    assert not torch.equal(saved[f"{LAYER}.weight"], unet0.state_dict()[f"{LAYER}.weight"])


def test_compose_fused_errors(ad, tmp_path, capsys):
    out = tmp_path / "fused"
    code = run(["compose", ad["o0"], "--out", out, "--format", "fused"])
    assert_user_error(code, capsys.readouterr().err, "--base")
    assert not out.exists()
    narrow = tmp_path / "narrow"
    testing.tiny_unet(block_out_channels=(16, 32)).save_pretrained(str(narrow))
    code = run(["compose", ad["o0"], "--out", out, "--format", "fused", "--base", narrow])
    assert_user_error(code, capsys.readouterr().err)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------- inspect


def test_inspect_report_plot_json(ad, tmp_path, capsys):
    png, js = tmp_path / "heat.png", tmp_path / "report.json"
    code = run(["inspect", ad["o0"], ad["o1"], ad["lora"], "--plot", png, "--json", js])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(compose([ad["o0"], ad["o1"], ad["lora"]]).report) in captured.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["adapters"] == [ad["o0"], ad["o1"], ad["lora"]]
    assert len(data["layers"]) == 56


def test_inspect_collision_is_a_warning_not_an_error(unet0, tmp_path, capsys):
    rows = {"32/4": [0, 1, 2, 3], "64/4": [0, 1, 2, 3]}
    a = build(unet0, ortho("random", basis_rows=rows), tmp_path / "a", seed=1)
    rows = {"32/4": [3, 4, 5, 6], "64/4": [3, 4, 5, 6]}
    b = build(unet0, ortho("random", basis_rows=rows), tmp_path / "b", seed=2)
    code = run(["inspect", a, b])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning:" in captured.err and "1 shared rows" in captured.err
    assert "Traceback" not in captured.err


def test_inspect_hub_names_through_the_cache(ad, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants
    from hubcache import populate_hub_cache

    cache = tmp_path / "hub"
    commit = populate_hub_cache(cache, "alice/rex-ortho", ad["o0"], revision="v1.2")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "merged"
    code = run(["compose", "alice/rex-ortho@v1.2", ad["o1"], "--out", out])
    assert code == 0, capsys.readouterr().err
    assert commit in (out / "README.md").read_text()
    code = run(["inspect", "alice/rex-ortho@v9"])
    assert_user_error(code, capsys.readouterr().err, "alice/rex-ortho@v9")


# ----------------------------------------------------------------------------------------------------- export


def test_export_diffusers(ad, tmp_path, capsys):
    out = tmp_path / "exported"
    code = run(["export", ad["o0"], "--format", "diffusers", "--out", out])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    peft_ortho.save_diffusers(ad["o0"], str(tmp_path / "api"))
    same_tensors(out / "pytorch_lora_weights.safetensors", tmp_path / "api" / "pytorch_lora_weights.safetensors")
    code = run(["export", ad["nan"], "--format", "diffusers", "--out", tmp_path / "bad"])
    assert_user_error(code, capsys.readouterr().err, ad["nan"])
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------------- errors


def test_user_errors_exit_1_with_one_line(ad, tmp_path, capsys):
    missing = str(tmp_path / "no-such-adapter")
    out = tmp_path / "out"
    assert_user_error(run(["compose", ad["o0"], missing, "--out", out]), capsys.readouterr().err, missing)
    assert_user_error(run(["compose", ad["o0"], ad["nan"], "--out", out]), capsys.readouterr().err, ad["nan"], LAYER)
    assert_user_error(run(["inspect", ad["nan"]]), capsys.readouterr().err, ad["nan"])
    assert_user_error(run(["inspect", ad["o0"], ad["o0"]]), capsys.readouterr().err, ad["o0"])
    assert_user_error(run(["inspect", ad["o0"], ad["o1"], "--weights", "1"]), capsys.readouterr().err)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run(["compose", ad["o0"], "--out", out]), capsys.readouterr().err, str(out))
    assert os.listdir(out) == ["keep.txt"]
    assert run(["compose", ad["o0"], "--out", out, "--overwrite"]) == 0
    assert (out / "adapter_config.json").is_file() and not (out / "keep.txt").exists()


def test_user_error_with_many_adapters_is_still_one_line(ad, tmp_path, capsys):
    missing = str(tmp_path / "no-such-adapter")
    code = run(["inspect", ad["o0"], ad["o1"], ad["lora"], missing])
    assert_user_error(code, capsys.readouterr().err, missing)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["compose", "x", "--out", "y", "--format", "onnx"],
        ["compose", "x"],  # --out is required
        ["export", "x", "--out", "y"],  # --format is required
        ["inspect", "x", "--weights", "heavy"],
    ],
    ids=["no-args", "unknown-subcommand", "bad-format", "no-out", "export-no-format", "bad-weight"],
)
def test_usage_errors_exit_2(argv, capsys):
    assert run(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_subprocess_exit_codes(ad, tmp_path):
    """The real process: 0 on success, 1 with one stderr line and no traceback on a user error, 2 on usage."""
    from hubcache import populate_hub_cache

    cache = tmp_path / "hub"
    commit = populate_hub_cache(cache, "bob/mia-ortho", ad["o1"], revision="v1.2")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    }

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "peft_ortho.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(tmp_path),
            timeout=300,
        )

    out = tmp_path / "merged"
    ok = cli("compose", ad["o0"], "bob/mia-ortho@v1.2", "--out", out, "--weights", "1", "0.5")
    assert ok.returncode == 0, ok.stderr
    assert commit in (out / "README.md").read_text()

    bad = cli("compose", ad["o0"], ad["nan"], "--out", tmp_path / "bad")
    assert_user_error(bad.returncode, bad.stderr, ad["nan"])
    assert not (tmp_path / "bad").exists()

    usage = cli("compose", "--format", "onnx")
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_compose_sequential_from_prompts_equals_the_api(tmp_path, capsys):
    """``--method sequential --calibrate PIPELINE --prompt NAME=PROMPT``: each adapter's own sampling as its
    calibration inputs, ``--prior-prompt`` the base's; the written adapter is the Python API's, and the method's
    own flags are refused with another method."""
    from diffusers import StableDiffusionPipeline

    from peft_ortho.statistics import calibration_inputs

    pipe = testing.tiny_sd_pipeline()
    pipe.save_pretrained(str(tmp_path / "pipe"))
    names = []
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
        get_peft_model(copy.deepcopy(pipe.unet), config).save_pretrained(str(tmp_path / name))
        names.append(str(tmp_path / name))
    prompts = {names[0]: "a photo of sks dog", names[1]: "a photo of zwx cat"}
    argv = ["compose", *names, "--method", "sequential", "--calibrate", tmp_path / "pipe"]
    argv += [a for n, p in prompts.items() for a in ("--prompt", f"{n}={p}")]
    argv += ["--prior-prompt", "a photo of a dog", "--refine-steps", "2", "--out", tmp_path / "cli"]
    code = run(argv)
    assert code == 0, capsys.readouterr().err
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), use_safetensors=True)
    prior = calibration_inputs(None, loaded, ["a photo of a dog"])
    merged = compose(names, method="sequential", calibrate=loaded, prompts=prompts, prior_inputs=prior,
                     refine_steps=2, progress=False)  # fmt: skip
    merged.save_pretrained(str(tmp_path / "api"))
    same_tensors(tmp_path / "cli" / "adapter_model.safetensors", tmp_path / "api" / "adapter_model.safetensors")
    capsys.readouterr()
    code = run(
        ["compose", *names, "--method", "sequential", "--calibrate", tmp_path / "pipe", "--out", tmp_path / "x"]
    )
    assert_user_error(code, capsys.readouterr().err, "--prompt")
    code = run(["compose", *names, "--refine-steps", "3", "--out", tmp_path / "y"])
    assert_user_error(code, capsys.readouterr().err, "--method sequential")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
