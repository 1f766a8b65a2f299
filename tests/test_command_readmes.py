"""``benchmarks/README.md`` and ``studies/README.md`` list every command of their folder, and every command they
list runs: each module answers ``--help`` from the repository root (no ``sys.path`` edits) and knows each flag the
README gives it, and each completes a smoke run (its ``--quick`` mode at the smallest sizes its flags allow; the
studies' smoke runs are in their own tests: ``test_llm_composition``, ``test_examples``, and ``test_fidelity``'s
end-to-end run of the fidelity study on a toy configuration)."""

import ast
import hashlib
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("benchmarks", "studies")
BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def readme_commands(folder: str) -> list[list[str]]:
    """``[module, arg, ...]`` of every ``python -m ...`` line in the ```bash blocks of ``folder/README.md``."""
    text = open(os.path.join(ROOT, folder, "README.md"), encoding="utf-8").read()
    lines = [line.split(" #")[0].strip() for block in BASH.findall(text) for line in block.splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.startswith("python -m ")]


def command_modules(folder: str) -> set[str]:
    """Dotted names of the folder's modules that are commands: a module-level ``main`` or an ``argparse`` parser."""
    out = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if not f.endswith(".py") or f == "__init__.py":
                continue
            path = os.path.join(dirpath, f)
            tree = ast.parse(open(path, encoding="utf-8").read())
            has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
            uses_argparse = any(
                isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names) for n in ast.walk(tree)
            )
            if has_main or uses_argparse:
                out.add(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
    return out


MODULES = sorted({cmd[0] for folder in FOLDERS for cmd in readme_commands(folder)})


def test_every_command_module_is_listed_in_its_folders_readme():
    for folder in FOLDERS:
        listed = {cmd[0] for cmd in readme_commands(folder)}
        found = command_modules(folder)
        assert len(found) >= 3, f"the scan finds {folder}'s commands: {found}"
        assert found <= listed, f"{folder}/README.md misses {sorted(found - listed)}"
        assert all(m.startswith(folder + ".") for m in listed), f"{folder}/README.md lists another folder's module"
    assert {"benchmarks.merge", "studies.fidelity.run", "studies.llm_composition"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_readme_commands_run(module):
    """``python -m <module> --help`` exits 0 from the repository root, and every flag that the README passes to the
    module is one its parser knows."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-3000:]
    flags = {
        arg.split("=")[0]
        for folder in FOLDERS
        for cmd in readme_commands(folder)
        if cmd[0] == module
        for arg in cmd[1:]
        if arg.startswith("--")
    }
    unknown = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", proc.stdout))
    assert not unknown, f"{module} --help does not know {unknown}"


# The benchmarks' --quick runs at their smallest sizes, writing into a copy of the page instead of docs/.
SMOKE = {
    "benchmarks.train_step": [
        "--arms",
        "lora,ortho",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--memory-steps",
        "1",
        "--no-decomposition",
    ],  # fmt: skip
    "benchmarks.input_statistics": ["--steps", "1", "--warmup", "0"],
    "benchmarks.merge": [
        "--ns",
        "2",
        "--memory-ns",
        "2",
        "--timing-repeats",
        "1",
        "--repeats",
        "1",
        "--svd-max-n",
        "0",
        "--latent",
        "8",
    ],  # fmt: skip
    "studies.continual": ["--no-write"],
}
SECTIONS = {
    "benchmarks.train_step": "<!-- train_step:start -->",
    "benchmarks.input_statistics": "<!-- statistics:start -->",
    "benchmarks.merge": "<!-- merge:start -->",
}


@pytest.mark.parametrize("module", sorted(SMOKE))
def test_readme_commands_complete_a_smoke_run(module, tmp_path):
    """The module's ``--quick`` run exits 0; a benchmark writes its section into the page it is given (the rest of
    the page kept) and leaves the repository's docs alone."""
    docs = os.path.join(ROOT, "docs", "benchmarks.md")
    before = hashlib.sha256(open(docs, "rb").read()).hexdigest()
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nkept text\n")
    args = ["--quick", *SMOKE[module]] + (["--out", str(page)] if module in SECTIONS else [])
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if module in SECTIONS:
        text = page.read_text()
        assert "kept text" in text and SECTIONS[module] in text, text[:2000]
    else:
        assert "Best average score" in proc.stdout, proc.stdout[-2000:]
    assert hashlib.sha256(open(docs, "rb").read()).hexdigest() == before
