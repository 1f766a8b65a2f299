"""Hostile inputs and faults: every refusal is one clear error, and nothing is lost.

One section per defect class of the data-safety audit. Each test asserts the error (its type, and a message naming
the adapter and the layer, field or file) *and* that nothing was lost: inputs unchanged by hash, no partial or
staging output left, existing outputs intact, models bit-unchanged on refusal. CLI cases run ``python -m
peft_ortho.cli`` in a real subprocess (exit codes 0 ok, 1 user error on one line of stderr, 2 usage); cases that
used to hang run under a subprocess timeout.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from conftest import edit_config
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_ortho
from peft_ortho import AdapterFileError, IncompatibleAdaptersError, OrthoLoraConfig, PeftOrthoError, _io, compose
from peft_ortho.cli import main
from peft_ortho.errors import OutputExistsError, UnsafeOutputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(peft_ortho.__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
PREFIX = "base_model.model."


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 16)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def save_adapter(path, config, seed: int, base=None) -> str:
    torch.manual_seed(seed)
    get_peft_model(copy.deepcopy(base or tiny()), config).save_pretrained(str(path))
    return str(path)


def ortho(slot: int, **kw) -> OrthoLoraConfig:
    return OrthoLoraConfig(
        r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False, slot=slot, **kw
    )


def lora(**kw) -> LoraConfig:
    return LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"], "init_lora_weights": False, **kw}
    )


def snapshot(*roots) -> dict[str, str]:
    """Every entry under ``roots`` (hidden ones included) → sha256 of its bytes ("dir" for folders)."""
    out = {}
    for root in map(str, roots):
        if os.path.isfile(root):
            out[root] = hashlib.sha256(open(root, "rb").read()).hexdigest()
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                out[os.path.join(dirpath, d)] = "dir"
            for f in filenames:
                full = os.path.join(dirpath, f)
                out[full] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peft_ortho.cli", *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments) -> str:
    """Exit 1, one line on stderr starting ``peft-ortho: error:``, no traceback, naming every fragment."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("peft-ortho: error:")]
    assert len(lines) == 1 and proc.stderr.rstrip("\n").endswith(lines[0]), proc.stderr  # libraries may log first
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def write_raw_safetensors(path, header, data: bytes = b"") -> str:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two orthogonal adapters on disjoint slots and a plain LoRA, on the same tiny base."""
    root = tmp_path_factory.mktemp("hostile_adapters")
    return {
        "a": save_adapter(root / "a", ortho(0), seed=1),
        "b": save_adapter(root / "b", ortho(1), seed=2),
        "lora": save_adapter(root / "lora", lora(), seed=3),
    }


def copy_adapter(adapters, key, dest) -> str:
    shutil.copytree(adapters[key], dest)
    return str(dest)


# ------------------------------------------------------------------------- 7: atomic_dir, races, stale staging
def write_marker(folder, text: str) -> None:
    with open(os.path.join(folder, "marker.txt"), "w") as f:
        f.write(text)


def test_two_writers_racing_for_one_output_cannot_both_succeed(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="another writer"):
        with _io.atomic_dir(out) as first:
            write_marker(first, "first")
            with _io.atomic_dir(out) as second:  # starts after the first checked, finishes before it
                write_marker(second, "second")
    assert (out / "marker.txt").read_text() == "second"  # the finished output is kept, not deleted
    assert os.listdir(tmp_path) == ["out"]  # the loser's staging folder is gone


def test_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with _io.atomic_dir(out) as tmp:
        write_marker(tmp, "old")
    before = snapshot(tmp_path)
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)  # a file system without atomic exchange
    real_rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(str(src)).startswith(".out.tmp-") and str(dst) == str(out):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        with _io.atomic_dir(out, overwrite=True) as tmp:
            write_marker(tmp, "new")
    assert snapshot(tmp_path) == before  # old output in place, nothing hidden or staged left over


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_in_one_step(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with _io.atomic_dir(out) as tmp:
        write_marker(tmp, "old")
    with _io.atomic_dir(out, overwrite=True) as tmp:
        write_marker(tmp, "new")
    assert (out / "marker.txt").read_text() == "new" and os.listdir(tmp_path) == ["out"]


def test_killed_writer_leaves_staging_that_the_next_run_cleans(tmp_path):
    out = tmp_path / "out"
    script = (
        "import sys, time; from peft_ortho import _io\n"
        "with _io.atomic_dir(sys.argv[1]) as tmp:\n"
        "    open(tmp + '/partial', 'w').write('x'); print('ready', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait()
    (stale,) = os.listdir(tmp_path)
    assert stale.startswith(".out.tmp-")
    with _io.atomic_dir(out) as tmp:
        write_marker(tmp, "fresh")
    assert os.listdir(tmp_path) == ["out"]


def test_output_killed_mid_swap_is_restored(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    old = tmp_path / f".out.old-{_io._host()}-{pid}-0123abcd"  # a previous output moved aside, then killed
    old.mkdir()
    write_marker(old, "previous")
    _io.clean_stale_staging(str(out))
    assert (out / "marker.txt").read_text() == "previous" and os.listdir(tmp_path) == ["out"]


def test_outputs_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with _io.atomic_dir(tmp_path / "out") as tmp:
            write_marker(tmp, "x")
    finally:
        os.umask(previous)
    assert (os.stat(tmp_path / "out").st_mode & 0o777) == 0o755


# ------------------------------------------------------------------------- 1: outputs that would destroy inputs
def test_cli_out_holding_the_inputs_is_refused(adapters, tmp_path):
    folder = tmp_path / "adapters"
    a, b = copy_adapter(adapters, "a", folder / "a"), copy_adapter(adapters, "b", folder / "b")
    (folder / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    proc = cli("compose", a, b, "--out", folder, "--overwrite")  # contains both inputs
    assert_user_error(proc, str(folder), "contains the input")
    assert snapshot(tmp_path) == before
    assert main(["compose", a, b, "--out", str(folder / "a"), "--overwrite"]) == 1  # is an input
    assert snapshot(tmp_path) == before


def test_api_outputs_inside_or_over_inputs_are_refused(adapters, tmp_path):
    from peft_ortho.hub import save_pretrained

    a = copy_adapter(adapters, "a", tmp_path / "a")
    b = copy_adapter(adapters, "b", tmp_path / "b")
    os.symlink(a, tmp_path / "link-to-a")
    before = snapshot(tmp_path)
    merged = compose([a, b])
    cases = [
        lambda: merged.save_pretrained(os.path.join(a, "merged")),  # lies inside an input
        lambda: merged.save_diffusers(str(tmp_path / "link-to-a"), overwrite=True),  # is an input, via a symlink
        lambda: merged.save_pretrained(str(tmp_path), overwrite=True),  # contains the inputs
        lambda: peft_ortho.save_diffusers(a, a, overwrite=True),
        lambda: save_pretrained(a, os.path.join(a, "copy")),
        lambda: merged.report.to_json(os.path.join(b, "adapter_config.json"), overwrite=True),
    ]
    for case in cases:
        with pytest.raises(UnsafeOutputError, match="input"):
            case()
        assert snapshot(tmp_path) == before


def test_output_inside_the_hub_cache_is_refused(adapters, tmp_path):
    from hubcache import populate_hub_cache

    cache = tmp_path / "cache"
    populate_hub_cache(cache, "alice/a", adapters["a"])
    merged = compose(["alice/a"], cache_dir=str(cache))
    before = snapshot(cache)
    with pytest.raises(UnsafeOutputError):
        merged.save_pretrained(str(cache / "models--alice--a"), overwrite=True)  # holds the snapshot and its blobs
    with pytest.raises(UnsafeOutputError):
        merged.save_pretrained(str(cache / "models--alice--a" / "blobs"), overwrite=True)  # the symlinks' targets
    assert snapshot(cache) == before


# ------------------------------------------------------------------------- 2: non-finite or overflowing results
@pytest.mark.parametrize("alpha", [float("nan"), 1e40, float("inf")])
def test_non_finite_lora_alpha_is_refused_where_the_config_is_read(adapters, tmp_path, alpha):
    bad = copy_adapter(adapters, "lora", tmp_path / "bad")
    edit_config(bad, lora_alpha=alpha)  # json writes NaN / Infinity / 1e+40
    before = snapshot(tmp_path)
    with pytest.raises(AdapterFileError, match="lora_alpha") as e:
        compose([adapters["a"], bad])
    assert e.value.adapter == bad
    proc = cli("compose", adapters["a"], bad, "--out", tmp_path / "out")
    assert_user_error(proc, bad, "lora_alpha")
    assert snapshot(tmp_path) == before  # no output, no staging


def test_finite_factors_whose_scaled_product_overflows_are_refused(adapters, tmp_path):
    big = copy_adapter(adapters, "lora", tmp_path / "big")
    edit_config(big, lora_alpha=3e38)  # valid (fits float32), but scale 7.5e37 × weight 100 × lora_B overflows
    with pytest.raises(AdapterFileError, match="overflows") as e:
        compose([adapters["a"], big], weights=[1.0, 100.0]).save_pretrained(str(tmp_path / "out"))
    assert e.value.adapter == big and e.value.layer in ("lin0", "lin1")
    assert sorted(os.listdir(tmp_path)) == ["big"]


def test_single_file_metadata_alpha_is_validated(tmp_path):
    torch.manual_seed(0)
    tensors = {"unet.lin0.lora_A.weight": torch.randn(4, 16), "unet.lin0.lora_B.weight": torch.randn(32, 4)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": "NaN"})}
    path = str(tmp_path / "style.safetensors")
    save_file(tensors, path, metadata=meta)
    with pytest.raises(AdapterFileError, match=r"lora_adapter_metadata \(unet\): lora_alpha") as e:
        compose([path])
    assert e.value.adapter == path


def test_fuse_that_would_overflow_float16_leaves_the_model_unchanged(tmp_path):
    base = tiny()
    path = save_adapter(tmp_path / "loud", lora(), seed=4, base=base)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    tensors[f"{PREFIX}lin1.lora_A.weight"] = torch.ones(4, 32)
    tensors[f"{PREFIX}lin1.lora_B.weight"] = torch.full((16, 4), 3e4)  # fits fp16, but ΔW = 2·4·3e4 > 65504
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    merged = compose([path])
    model = base.half()
    before = state(model)
    with pytest.raises(IncompatibleAdaptersError, match="float16") as e:
        merged.fuse(model)  # lin0 (fine) comes before lin1 (overflows): a partial fuse would have changed it
    assert e.value.layer == "lin1"
    assert_unchanged(model, before)
    merged.fuse(base.float())  # the same merge fits float32
    assert torch.isfinite(base.lin1.weight).all()


def test_writers_never_move_a_non_finite_file_into_place(tmp_path):
    with pytest.raises(AdapterFileError, match="non-finite") as e:
        with _io.atomic_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.tensor([1.0, float("inf")])}, os.path.join(tmp, "model.safetensors"))
    assert e.value.layer == "w" and os.listdir(tmp_path) == []


def test_continual_task_that_overflows_is_refused_with_the_model_unchanged():
    from peft_ortho.continual import ContinualLearner, ContinualStateError

    model = tiny().half()
    before = state(model)
    learner = ContinualLearner(model, "merge_and_init", lora(r=2, init_lora_weights=True))
    peft_model = learner.begin_task()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.fill_(300.0 if "lin1" in name else 0.01)
    with pytest.raises(ContinualStateError, match="NaN/inf") as e:
        learner.end_task()
    assert e.value.layer == "lin1"
    inner = peft_model.get_base_model()
    for name in ("lin0", "lin1"):  # lin0 would have fused fine: it was not fused either
        weight = inner.get_submodule(name).get_base_layer().weight
        assert torch.equal(weight, before[f"{name}.weight"]), name


# ------------------------------------------------------------------------- 3: validate everything, then write
@pytest.mark.parametrize("strategy", ["merge_and_init", "naive"])
def test_resume_of_a_corrupt_state_leaves_the_model_unchanged(tmp_path, strategy):
    from peft_ortho.continual import STATE_TENSORS, ContinualLearner, ContinualStateError

    learner = ContinualLearner(tiny(), strategy, lora(r=2, init_lora_weights=True))
    peft_model = learner.begin_task()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.5)
    learner.end_task()
    folder = learner.save(tmp_path / "state")
    path = os.path.join(folder, STATE_TENSORS)
    tensors, meta = load_file(path), None
    last = sorted(k for k in tensors if "lin1" in k)[-1]  # the last layer read: most of the model before it
    tensors[last] = tensors[last].clone().fill_(float("nan"))
    save_file(tensors, path, metadata={"format": "peft_ortho.continual/1"})
    model = tiny()
    before = state(model)
    with pytest.raises(ContinualStateError, match="NaN/Inf") as e:
        ContinualLearner.resume(folder, model)
    assert last in str(e.value) and meta is None
    assert_unchanged(model, before)  # lin0 was valid, and still was not written
    assert not any("lora" in n for n, _ in model.named_modules())  # no adapter left injected


# ------------------------------------------------------------------------- 4: one-line errors, PeftOrthoError only
def bad_weights(kind: str, folder) -> None:
    """Overwrite the adapter's weights with a malformed safetensors file of the given kind."""
    path = os.path.join(folder, "adapter_model.safetensors")
    if kind == "header-not-object":
        write_raw_safetensors(path, [1, 2])
    elif kind == "negative-dims":
        write_raw_safetensors(path, {"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif kind == "metadata-not-strings":
        write_raw_safetensors(path, {"__metadata__": {"format": 1}})
    elif kind == "rank-0":
        t = load_file(path)
        t = {k: (v[:0] if "lora_A" in k else v[:, :0]) if "lin1" in k else v for k, v in t.items()}
        save_file({k: v.contiguous() for k, v in t.items()}, path)


CONFIG_CASES = {
    "config-list": (b"[]", "not an object"),
    "config-not-utf8": (b'\xff\xfe{"r": 4}', "not UTF-8"),
    "alpha-string": ({"lora_alpha": "5"}, "lora_alpha must be a number, got the string '5'"),
    "rank-zero": ({"r": 0}, "r must be a positive integer"),
    "rank-string": ({"r": "3"}, "r must be a positive integer, got the string '3'"),
    "bad-regex": ({"rank_pattern": {"lin[": 2}}, "not a valid regular expression"),
    "base-list": ({"base_model_name_or_path": ["a", "b"]}, "base_model_name_or_path must be a string"),
}
WEIGHT_CASES = {
    "header-not-object": "adapter_model.safetensors",
    "negative-dims": "adapter_model.safetensors",
    "metadata-not-strings": "adapter_model.safetensors",
    "rank-0": "rank",
}


@pytest.mark.parametrize("case", [*CONFIG_CASES, *WEIGHT_CASES])
def test_malformed_adapter_is_one_peft_ortho_error_naming_it(adapters, tmp_path, case):
    bad = copy_adapter(adapters, "lora", tmp_path / "bad")
    if case in CONFIG_CASES:
        change, expected = CONFIG_CASES[case]
        if isinstance(change, bytes):
            (tmp_path / "bad" / "adapter_config.json").write_bytes(change)
        else:
            edit_config(bad, **change)
    else:
        bad_weights(case, bad)
        expected = WEIGHT_CASES[case]
    before = snapshot(tmp_path)
    for call in (
        lambda: compose([bad]),
        lambda: peft_ortho.save_diffusers(bad, str(tmp_path / "out"), component="unet"),
    ):
        with pytest.raises(PeftOrthoError) as e:
            call()
        assert e.value.adapter == bad and expected in str(e.value), str(e.value)
    assert snapshot(tmp_path) == before


def test_malformed_adapters_in_the_cli_are_one_line(adapters, tmp_path):
    bad = copy_adapter(adapters, "lora", tmp_path / "bad")
    (tmp_path / "bad" / "adapter_config.json").write_bytes(b"[]")
    assert_user_error(cli("inspect", bad), bad, "not an object")
    with pytest.raises(AdapterFileError, match="repo id") as e:  # the Hub's own repo-id rules, prefixed
        compose(["alice/re--x"])
    assert str(e.value).startswith("adapter 'alice/re--x': ")
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_fusing_into_a_pipeline_without_the_component_is_refused(tmp_path):
    from peft_ortho import testing

    torch.manual_seed(0)
    path = str(tmp_path / "dit.safetensors")
    save_file(
        {"transformer.a.lora_A.weight": torch.randn(2, 8), "transformer.a.lora_B.weight": torch.randn(8, 2)}, path
    )
    pipe = testing.tiny_sd_pipeline()
    before = state(pipe.unet)
    with pytest.raises(IncompatibleAdaptersError, match="no 'transformer' component"):
        compose([path]).fuse(pipe)
    assert_unchanged(pipe.unet, before)


def test_unknown_class_name_in_base_is_one_line(adapters, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_class_name": "__import__"}))
    proc = cli("compose", adapters["a"], "--format", "fused", "--base", base, "--out", tmp_path / "out")
    assert_user_error(proc, "__import__", "not a diffusers model class")
    assert sorted(os.listdir(tmp_path)) == ["base"]


# ------------------------------------------------------------------------- 5: the format is safetensors' own
def test_overlapping_data_offsets_are_refused(adapters, tmp_path):
    bad = copy_adapter(adapters, "lora", tmp_path / "bad")
    a, b = f"{PREFIX}lin0.lora_A.weight", f"{PREFIX}lin0.lora_B.weight"
    header = {
        a: {"dtype": "F32", "shape": [4, 16], "data_offsets": [0, 256]},
        b: {"dtype": "F32", "shape": [32, 4], "data_offsets": [0, 512]},  # shares A's bytes
    }
    write_raw_safetensors(os.path.join(bad, "adapter_model.safetensors"), header, b"\0" * 512)
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is not a readable safetensors") as e:
        compose([bad])
    assert e.value.adapter == bad and "invalid offset" in str(e.value)


def test_every_safetensors_dtype_reads_lazily_and_privately(tmp_path):
    path = str(tmp_path / "fp8.safetensors")
    values = torch.linspace(-2, 2, 64).reshape(4, 16)
    save_file({"x": values.to(torch.float8_e4m3fn), "y": values}, path)
    tensors, _ = _io.mmap_safetensors(path)
    assert tensors["x"].dtype == torch.float8_e4m3fn
    assert torch.equal(tensors["x"].float(), values.to(torch.float8_e4m3fn).float())
    assert _io.all_finite(tensors)
    before = snapshot(path)
    tensors["y"].mul_(0)  # a private map: writing to a tensor never reaches the file
    assert snapshot(path) == before


# ------------------------------------------------------------------------- 6: regular expressions from configs
HANG_CASES = [
    ("rank_pattern", {"(.*)*X": 2}),
    ("alpha_pattern", {"(a|ab)*c": 2}),
    ("target_modules", "(.*)*X"),
    ("target_modules", "(lin+)+0"),
]
HANG_SCRIPT = """
import json, sys
import peft_ortho
for field, folder, out in json.loads(sys.argv[1]):
    for call in (lambda: peft_ortho.compose([folder]), lambda: peft_ortho.save_diffusers(folder, out)):
        try:
            call()
            print(json.dumps(["no error", field, folder, ""]), flush=True)
        except peft_ortho.PeftOrthoError as e:
            print(json.dumps([type(e).__name__, field, e.adapter, str(e)]), flush=True)
"""


def test_catastrophic_patterns_are_refused_not_matched(adapters, tmp_path):
    cases = []
    for i, (field, value) in enumerate(HANG_CASES):
        bad = copy_adapter(adapters, "lora", tmp_path / f"bad{i}")
        edit_config(bad, **{field: value})
        cases.append((field, bad, str(tmp_path / f"out{i}")))
    before = snapshot(tmp_path)
    # Before the fix these hung forever in re; the timeouts turn a hang into a failure instead of a stuck CI job.
    proc = subprocess.run(
        [sys.executable, "-c", HANG_SCRIPT, json.dumps(cases)], env=ENV, capture_output=True, text=True, timeout=300
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 * len(cases), proc.stderr
    for (kind, field, adapter, message), (want_field, folder, _) in zip(rows, [c for c in cases for _ in (0, 1)]):
        assert (kind, field, adapter) == ("AdapterFileError", want_field, folder) and "refused" in message, message
    assert_user_error(cli("inspect", cases[0][1], timeout=300), cases[0][1], "rank_pattern key")
    assert snapshot(tmp_path) == before


def test_ordinary_patterns_still_work(adapters, tmp_path):
    fine = copy_adapter(adapters, "lora", tmp_path / "fine")
    edit_config(fine, target_modules=r".*lin[01]", rank_pattern={"^lin0$": 4}, alpha_pattern={"lin1": 8})
    assert compose([fine]).layers  # merges as before


# ------------------------------------------------------------------------- 8: revisions
@pytest.mark.parametrize("name", ["alice/a@", "alice/a@../../../x", "alice/a@main/../../x", "alice/a@.hidden"])
def test_bad_revisions_are_refused_before_the_cache_is_read(adapters, tmp_path, name):
    from hubcache import populate_hub_cache

    cache = tmp_path / "cache"
    populate_hub_cache(cache, "alice/a", adapters["a"])
    # a file the traversal would reach: cache/models--alice--a/refs/../../../x = tmp_path/x
    (tmp_path / "x").write_text("0" * 40)
    with pytest.raises(AdapterFileError, match="revision|nothing follows") as e:
        compose([name], cache_dir=str(cache))
    assert e.value.adapter == name


def test_a_valid_revision_still_resolves_to_its_commit(adapters, tmp_path):
    from hubcache import populate_hub_cache

    cache = tmp_path / "cache"
    commit = populate_hub_cache(cache, "alice/a", adapters["a"], revision="v1.2")
    (source,) = compose(["alice/a@v1.2"], cache_dir=str(cache)).sources
    assert source.commit == commit and source.revision == "v1.2"


@pytest.mark.parametrize(
    "name",
    ["alice/re--x", "alice/x.git", "alice/x\n", "alice/r\u00e9x", "alice/x y", "alice/" + "a" * 97, "-alice/x"],
)
def test_bad_repo_ids_are_refused_by_the_hubs_rules_before_any_download(tmp_path, name):
    """Repo ids go through huggingface_hub's own ``validate_repo_id`` (no second, looser copy of its rules)."""
    cache = tmp_path / "cache"
    with pytest.raises(AdapterFileError, match="repo id") as e:
        compose([name], cache_dir=str(cache))
    assert e.value.adapter == name and not cache.exists()


def test_a_repo_id_needs_its_owner():
    from peft_ortho.merging.resolve import check_repo_id

    assert check_repo_id("alice/rex-v1.2_x") == "alice/rex-v1.2_x"
    for bare in ("rex", "a/b/c"):
        with pytest.raises(AdapterFileError, match="owner/name"):
            check_repo_id(bare, adapter=bare)


# ------------------------------------------------------------------------- 9: the smaller ones
def test_usage_errors_exit_2(adapters, tmp_path):
    proc = cli("compose", adapters["lora"], "--out", tmp_path / "out", "--svd-rank", "-3")
    assert proc.returncode == 2 and "usage:" in proc.stderr and "positive integer" in proc.stderr, proc.stderr
    for args in (["--method", "bogus"], ["--svd-rank", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["compose", adapters["lora"], "--out", str(tmp_path / "out"), *args])
        assert e.value.code == 2
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="svd_rank"):
        compose([adapters["lora"]], method="svd", svd_rank=-1)


def test_inspect_outputs_are_not_replaced_silently(adapters, tmp_path):
    report, plot = tmp_path / "report.json", tmp_path / "plot.png"
    report.write_text("mine")
    plot.write_bytes(b"mine")
    assert_user_error(cli("inspect", adapters["a"], adapters["b"], "--json", report), str(report), "exists")
    with pytest.raises(OutputExistsError):
        compose([adapters["a"], adapters["b"]]).report.plot(str(plot))
    assert report.read_text() == "mine" and plot.read_bytes() == b"mine"
    proc = cli("inspect", adapters["a"], adapters["b"], "--json", report, "--plot", plot, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["adapters"] == [adapters["a"], adapters["b"]]
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(tmp_path)) == ["plot.png", "report.json"]  # no staging files


def test_a_name_with_a_newline_keeps_the_error_on_one_line(tmp_path):
    assert_user_error(cli("inspect", "no/such\nrepo@main"), "no/such\\nrepo")


def test_base_with_only_pickled_weights_is_never_unpickled(tmp_path):
    """A --base folder whose weights are a .bin pickle is refused by the loaders (safetensors only)."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    base = GPT2Model(
        GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    )
    adapter = save_adapter(tmp_path / "gpt", LoraConfig(r=2, target_modules=["c_attn"]), seed=0, base=base)
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    os.remove(folder / "model.safetensors")
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # a pickle that runs a shell command
    )
    proc = cli("compose", adapter, "--format", "fused", "--base", folder, "--out", tmp_path / "out")
    assert_user_error(proc)
    assert not marker.exists() and not (tmp_path / "out").exists()
