"""``peft-ortho compose | inspect | export``. Exit codes: 0 ok, 1 user error (one line on stderr), 2 usage."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import PeftOrthoError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-ortho", description="Merge, inspect and export peft-ortho adapters.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compose", help="merge adapters by name (Hub repo id[@rev], folder or .safetensors)")
    c.add_argument("names", nargs="+", metavar="NAME")
    c.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    c.add_argument("--format", choices=["peft", "diffusers", "kohya", "fused"], default="peft")
    c.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1.0 each)")
    c.add_argument("--method", default="auto", help="auto (exact stacking), linear, ties, dare_linear, dare_ties, svd")
    c.add_argument("--svd-rank", type=int, help="rank of the LoRA export for delta-space methods")
    c.add_argument(
        "--component", help="diffusers component PEFT adapters belong to (default: inferred, e.g. unet / transformer)"
    )
    c.add_argument(
        "--family",
        choices=["sd", "sdxl", "flux", "sd3"],
        help="model family of community single files (kohya, A1111, ComfyUI, BFL, xlabs); default: from the keys",
    )
    c.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="precision to write (default: the inputs')")
    c.add_argument(
        "--base",
        help="--format fused: the base to fuse into (a diffusers pipeline or model folder, or a transformers model)",
    )
    c.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("inspect", help="check adapters can be merged and print their interference report")
    i.add_argument("names", nargs="+", metavar="NAME")
    i.add_argument("--weights", type=float, nargs="+")
    i.add_argument("--family", choices=["sd", "sdxl", "flux", "sd3"], help="model family of community single files")
    i.add_argument("--plot", metavar="FILE.png", help="write a heatmap of the pairwise crosstalk")
    i.add_argument("--json", metavar="FILE.json", help="write the full report as JSON")

    e = sub.add_parser("export", help="convert a PEFT adapter to another format")
    e.add_argument("adapter", metavar="ADAPTER")
    e.add_argument("--format", choices=["diffusers", "kohya"], required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--component", help="pipeline component (default: inferred from the adapter's layers)")
    e.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="precision to write (default: the adapter's)")
    e.add_argument("--overwrite", action="store_true")
    return p


def _load_base(path: str):
    """A base model folder saved with ``save_pretrained``, loaded whole (safetensors only).

    A diffusers pipeline folder (``model_index.json``) with ``DiffusionPipeline``; a diffusers model by its
    ``_class_name``; a transformers model with the class its ``config.architectures`` names (a causal LM keeps its
    LM head), else ``AutoModelForCausalLM`` / ``AutoModel``.
    """
    import json

    if os.path.isfile(os.path.join(path, "model_index.json")):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if "_class_name" in config:
        import diffusers

        cls = getattr(diffusers, str(config["_class_name"]), None)
        if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
            raise PeftOrthoError(f"{path}: config.json names an unknown diffusers class {config['_class_name']!r}")
        return cls.from_pretrained(path, use_safetensors=True)
    import transformers

    architectures = config.get("architectures") or []
    cls = getattr(transformers, str(architectures[0]), None) if architectures else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModelForCausalLM if any("CausalLM" in str(a) for a in architectures) else None
        cls = cls or transformers.AutoModel
    return cls.from_pretrained(path, use_safetensors=True)


def _run(args) -> int:
    from .compose import compose

    if args.command == "export":
        from .export import save_diffusers, save_kohya

        save = save_kohya if args.format == "kohya" else save_diffusers
        path = save(args.adapter, args.out, component=args.component, overwrite=args.overwrite, dtype=args.dtype)
        print(f"wrote {path}")
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = compose(
            args.names,
            weights=args.weights,
            method=getattr(args, "method", "auto"),
            component=getattr(args, "component", None),
            family=getattr(args, "family", None),
            progress=sys.stderr.isatty(),  # progress bars only for a person watching; logs get one-line errors
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.command == "inspect":
        print(merged.statement)
        print(merged.report)
        if args.json:
            merged.report.to_json(args.json)
        if args.plot:
            print(f"wrote {merged.report.plot(args.plot)}")
        return 0
    merged.svd_rank = args.svd_rank
    if args.format == "peft":
        path = merged.save_pretrained(args.out, overwrite=args.overwrite, dtype=args.dtype)
    elif args.format == "diffusers":
        path = merged.save_diffusers(args.out, component=args.component, overwrite=args.overwrite, dtype=args.dtype)
    elif args.format == "kohya":
        path = merged.save_kohya(args.out, component=args.component, overwrite=args.overwrite, dtype=args.dtype)
    else:
        if not args.base:
            raise PeftOrthoError("--format fused needs --base FOLDER (the base model to fuse into)")
        from ._io import atomic_dir

        model = merged.fuse(_load_base(args.base), component=args.component)
        with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            model.save_pretrained(tmp)
        path = os.path.abspath(args.out)
    print(f"{merged.statement}\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # usage errors: argparse prints usage and exits 2
    try:
        return _run(args)
    except (PeftOrthoError, OSError, ValueError) as e:
        print(f"peft-ortho: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
