"""The README promises exactly two set-up commands, and CI runs the second one verbatim."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_commands() -> list[str]:
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2, commands
    assert "examples/quickstart.py" in commands[0] and "torch==2.13.0" in commands[0]
    assert commands[1].startswith("python -m pytest")


def last_command(job: str) -> str:
    """The last line of ``.ci/<job>`` that is not blank or a comment."""
    lines = open(os.path.join(ROOT, ".ci", job)).read().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")][-1]


def test_ci_runs_the_readme_test_command():
    assert last_command("run") == setup_commands()[1]


def test_quickstart_runs_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = os.path.join(ROOT, "examples", "quickstart.py")
    out = subprocess.run(
        [sys.executable, script, "--steps", "3", "--out", str(tmp_path / "q")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,  # ~3 minutes alone on a busy 2-core machine; more beside another xdist worker
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained 'rex'" in out.stdout and "trained 'mia'" in out.stdout
    assert "load_lora_weights" in out.stdout
    assert os.path.isfile(tmp_path / "q" / "rex+mia-diffusers" / "pytorch_lora_weights.safetensors")


def test_oldest_pair_job_pins_the_floors_pyproject_admits():
    """``.ci/oldest`` tests the oldest admitted versions: each pin in its constraints file is the floor of that
    dependency in pyproject.toml, every ranged core dependency but torch (the local CPU wheel) is pinned, and the job
    runs the whole suite."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    floors = {}
    for req in requirements:
        for spec in req.specifier:
            if spec.operator == ">=":
                floors[req.name.lower().replace("_", "-")] = spec.version
    pins = {}
    for line in open(os.path.join(ROOT, ".ci", "oldest-constraints.txt")).read().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    core = {Requirement(r).name.lower().replace("_", "-") for r in project["dependencies"]}
    assert core - {"torch"} <= pins.keys(), core - pins.keys()
    for name, version in pins.items():
        floor = floors[name]
        # the floor's own release, or a patch release of its series (numpy 1.24.4 for >=1.24)
        assert version == floor or version.startswith(f"{floor}."), (name, version, floor)
    job = open(os.path.join(ROOT, ".ci", "oldest")).read()
    assert job.index('"torch==2.13.0"') < job.index("-c .ci/oldest-constraints.txt")
    # the whole suite (docs' runnable blocks included), not a subset: the README's test command, verbatim
    assert last_command("oldest") == setup_commands()[1]
