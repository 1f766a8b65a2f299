"""Generate docs/api.md (docstrings and signatures of every public name) and docs/cli.md (the CLI's --help).

    python docs/gen_api.py          # rewrite docs/api.md and docs/cli.md
    python docs/gen_api.py --check  # exit 1 if either is stale (tests/test_docs.py runs this check)

Public means: listed in ``__all__`` of ``peft_ortho`` or of one of the public submodules below.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import sys

MODULES = (
    "peft_ortho",
    "peft_ortho.merging",
    "peft_ortho.merging.sequential",
    "peft_ortho.diffusers_lora",
    "peft_ortho.kohya_lora",
    "peft_ortho.cards",
    "peft_ortho.hub",
    "peft_ortho.peft_types",
    "peft_ortho.tuners.ortho_lora",
    "peft_ortho.tuners.block_lora",
    "peft_ortho.tuners.soda",
    "peft_ortho.bases",
    "peft_ortho.erasure",
    "peft_ortho.continual",
    "peft_ortho.optim",
    "peft_ortho.statistics",
    "peft_ortho.errors",
    "peft_ortho.testing",
)
HERE = os.path.dirname(os.path.abspath(__file__))


def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
            and (inspect.isclass(v) or inspect.isfunction(v))
        ]
    return sorted(names, key=str.lower)


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "*(no docstring)*"


def _own_fields(cls) -> tuple[list, list[str]]:
    """Dataclass fields declared by peft-ortho classes, and the names of the peft/other bases that add the rest."""
    ours = [c for c in cls.__mro__ if c.__module__.startswith("peft_ortho")]
    own = {name for c in ours for name in vars(c).get("__annotations__", {})}
    inherited = [c.__name__ for c in cls.__mro__[1:] if dataclasses.is_dataclass(c) and c not in ours][:1]
    return [f for f in dataclasses.fields(cls) if f.name in own], inherited


def _field_line(f) -> str:
    default = f.default if f.default is not dataclasses.MISSING else "…"
    help_text = " ".join(str(f.metadata.get("help", "")).split())
    return f"- `{f.name}` = `{default!r}`" + (f": {help_text}" if help_text else "")


def _public_methods(cls) -> list[tuple[str, object]]:
    out = []
    for name, member in vars(cls).items():
        if name.startswith("_") or not (inspect.isfunction(member) or isinstance(member, (property, classmethod))):
            continue
        func = member.__func__ if isinstance(member, classmethod) else member
        if isinstance(member, property) or func.__doc__:
            out.append((name, member))
    return out


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py` (a test fails when this page is stale). Every name",
        "below is public: importable from the module named in its section.",
        "",
    ]
    seen: set[int] = set()
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        names = [n for n in public_names(module) if not n.startswith("__")]
        if not names:
            continue
        lines += [f"## `{module_name}`", ""]
        first = (module.__doc__ or "").strip().split("\n\n")[0]
        if first:
            lines += [" ".join(first.split()), ""]
        for name in names:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                lines += [f"### `{module_name}.{name}`", "", f"Module; see `{obj.__name__}` below.", ""]
                continue
            if id(obj) in seen and module_name != "peft_ortho":
                lines += [f"### `{module_name}.{name}`", "", f"Same object as `peft_ortho.{name}`.", ""]
                continue
            seen.add(id(obj))
            kind = "class" if inspect.isclass(obj) else ("function" if callable(obj) else "constant")
            if kind == "constant":
                lines += [f"### `{module_name}.{name}`", "", f"Constant: `{obj!r}`.", ""]
                continue
            if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
                fields, inherited = _own_fields(obj)
                is_config = any(c.__name__ == "PeftConfig" for c in obj.__mro__)
                label = "*config class (dataclass)*" if is_config else "*dataclass*"
                lines += [f"### `{module_name}.{name}(...)`", "", label, "", _doc(obj), ""]
                extra = f" (plus every field of peft's `{inherited[0]}`)" if inherited else ""
                lines += [f"Fields{extra}:", "", *map(_field_line, fields), ""]
                if is_config:
                    continue
            else:
                lines += [f"### `{module_name}.{name}{_signature(obj)}`", "", f"*{kind}*", "", _doc(obj), ""]
            if inspect.isclass(obj):
                for meth_name, member in _public_methods(obj):
                    if isinstance(member, property):
                        lines += [f"- `{meth_name}` (property): {' '.join(_doc(member.fget).split())}"]
                    else:
                        func = member.__func__ if isinstance(member, classmethod) else member
                        doc = " ".join(_doc(func).split())
                        lines += [f"- `{meth_name}{_signature(func)}`: {doc}"]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_cli() -> str:
    """Every subcommand's ``--help``, at a fixed width so the page is the same on every terminal."""
    os.environ["COLUMNS"] = "110"
    from peft_ortho.cli import _parser

    parser = _parser()
    lines = [
        "# Command line reference",
        "",
        "Generated from the parser by `python docs/gen_api.py`. Exit codes: 0 success; 1 a user error, printed as one",
        "line `peft-ortho: error: …` on stderr without a traceback; 2 a usage error. Outputs are written to a temporary",
        "folder beside `--out` and renamed into place when complete; a non-empty `--out` is left untouched unless",
        "`--overwrite`. How the merge works: [compose.md](compose.md).",
        "",
        "```",
        parser.format_help().rstrip(),
        "```",
    ]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        lines += ["", f"## `peft-ortho {name}`", "", "```", sub.format_help().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    pages = {"api.md": render(), "cli.md": render_cli()}
    stale = []
    for name, text in pages.items():
        path = os.path.join(HERE, name)
        if args.check:
            if (open(path).read() if os.path.exists(path) else "") != text:
                stale.append(name)
            continue
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    if stale:
        print(f"docs/{', docs/'.join(stale)} stale: run `python docs/gen_api.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
