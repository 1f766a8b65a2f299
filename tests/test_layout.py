"""Where things are: the import graph has no cycle, each tuner keeps its facts in its own folder, names say what they
hold, and ``peft_ortho.compose`` is one thing."""

import ast
import importlib
import os
import re
import subprocess
import sys

import peft_ortho
from peft_ortho import _registry
from peft_ortho.peft_types import LORA_FACTS, LoraExport, PeftOrthoType, TunerFacts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "peft_ortho")


# ------------------------------------------------------------------------------------------------------ import graph


def _modules() -> dict[str, str]:
    """``{dotted module name: file}`` for every module of the package (packages by their ``__init__.py``)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = os.path.join(folder, f)
    return out


def _module_level_imports(tree: ast.Module):
    """Import statements executed when the module is imported: not inside functions, not under TYPE_CHECKING."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    todo += child.body if isinstance(child, ast.ExceptHandler) else [child]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """``{module: modules its import runs first}``, peft-ortho's own modules only.

    Importing ``a.b.c`` runs ``a/__init__``, ``a/b/__init__`` then ``a/b/c``: an edge goes to the target and to each
    of its packages that is not already being imported (an ancestor of the importing module), so a cycle through a
    package's ``__init__`` counts.
    """
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        tree = ast.parse(open(path, encoding="utf-8").read())
        targets: set[str] = set()
        for node in _module_level_imports(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            targets |= {f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules}
        edges = set()
        for target in targets:
            if target not in modules:
                continue
            for m in [*_ancestors(target), target]:
                if m != name and m not in _ancestors(name):
                    edges.add(m)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself): Tarjan."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "peft_ortho.diffusers_lora" in graph  # the scan sees the package
    assert "peft_ortho.tuners.block_lora" in graph["peft_ortho.diffusers_lora"]  # package inits are edges
    assert _cycles(graph) == []
    assert graph["peft_ortho.peft_types"] == set()  # the leaf every tuner and reader may import


def test_the_cycle_check_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


# -------------------------------------------------------------------------------------------------------- tuners


def test_every_peft_ortho_type_has_facts_declared_by_its_own_folder():
    tuners = _registry.tuners()
    assert sorted(tuners) == sorted(t.value for t in PeftOrthoType)
    for peft_type in PeftOrthoType:
        tuner = tuners[peft_type.value]
        facts = _registry.tuner_facts(peft_type)
        assert isinstance(facts, TunerFacts) and facts is tuner.facts and facts.peft_type == peft_type.value
        assert facts.title and facts.citation and facts.tag and isinstance(facts.lora_export, LoraExport)
        package = importlib.import_module(tuner.model_cls.__module__.rsplit(".", 1)[0])
        assert package.FACTS is facts  # declared in tuners/<name>/__init__.py
        folder = os.path.dirname(package.__file__)
        assert {"config.py", "layer.py", "model.py", "__init__.py"} <= set(os.listdir(folder))
        assert tuner.config_cls.__module__ == f"{package.__name__}.config"
        assert tuner.config_cls().peft_type == peft_type  # the config sets the type its facts declare
    assert _registry.tuner_facts("LORA") is LORA_FACTS
    assert _registry.tuner_facts("LOHA") is None


def test_the_facts_drive_export_cards_and_merging():
    """The modules that used to keep tables of type strings read the tuners' facts instead."""
    assert _registry.lora_types(LoraExport.AS_IS) == ("LORA", "ORTHO_LORA")
    assert _registry.lora_types(LoraExport.PADDED_BLOCKS) == ("BLOCK_LORA",)
    assert _registry.lora_types(LoraExport.SVD) == ("SODA",)
    for module in ("diffusers_lora.py", "kohya_lora.py", "cards.py", "hub.py", "lora_format.py", "merging/load.py"):
        text = open(os.path.join(PACKAGE, module), encoding="utf-8").read()
        assert not re.search(r"[\"'](ORTHO_LORA|BLOCK_LORA|SODA)[\"']", text), f"{module} spells a peft type"
    card = str(peft_ortho.model_card(peft_ortho.BlockLoraConfig(r=2, target_modules=["x"], block_index=1)))
    facts = _registry.tuner_facts("BLOCK_LORA")
    assert facts.tag in card and facts.method in card and facts.card_note.split("{")[0] in card
    assert "of 16 along the `out` axis" in card  # the note's fields come from the config


# -------------------------------------------------------------------------------------------------------- names


def test_module_names_say_what_they_hold():
    modules = _modules()
    assert not [m for m in modules if m.rsplit(".", 1)[-1] == "export"]  # three modules used to share this name
    for name in ("diffusers_lora", "kohya_lora", "merging.save", "merging.fuse", "tuners.soda.lora_conversion"):
        assert f"peft_ortho.{name}" in modules


_COMPOSE_IMPORT = r"""
import sys
# An editable install of another checkout maps peft_ortho.* names to its files; import this checkout's only.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import importlib, peft_ortho
assert peft_ortho.__file__.startswith(sys.argv[1]), peft_ortho.__file__
import peft_ortho.merging
assert callable(peft_ortho.compose) and peft_ortho.compose is peft_ortho.merging.compose
try:
    import peft_ortho.compose
except ModuleNotFoundError as e:
    assert e.name == "peft_ortho.compose", e.name
else:
    raise AssertionError("peft_ortho.compose is a module as well as a function")
from peft_ortho import compose
assert compose is peft_ortho.merging.compose and peft_ortho.compose is compose
print("OK")
"""


def test_peft_ortho_compose_is_one_thing():
    """``peft_ortho.compose`` is the function; the subpackage is ``peft_ortho.merging`` (``import peft_ortho.compose``
    finds no module rather than a second object under the same name)."""
    proc = subprocess.run(
        [sys.executable, "-c", _COMPOSE_IMPORT, ROOT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]


def test_every_public_module_is_in_the_api_reference():
    """A module with an ``__all__`` (and no private part in its name) is public: the API page documents it."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        gen_api = importlib.import_module("gen_api")
    finally:
        sys.path.remove(os.path.join(ROOT, "docs"))
    api = open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8").read()
    public = [
        m
        for m in _modules()
        if not any(part.startswith("_") for part in m.split(".")) and hasattr(importlib.import_module(m), "__all__")
    ]
    assert "peft_ortho.tuners.soda" in public
    for module in public:
        assert module in gen_api.MODULES, f"{module} is public but not in docs/gen_api.py's MODULES"
        for name in importlib.import_module(module).__all__:
            if not name.startswith("__"):
                assert f"`{module}.{name}" in api, f"{module}.{name} is missing from docs/api.md"
