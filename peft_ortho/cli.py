"""``peft-ortho compose | inspect | export``. Exit codes: 0 ok, 1 user error (one line on stderr), 2 usage."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import diffusers
import transformers

from ._io import atomic_dir, check_output, read_json_object
from .diffusers_lora import save_diffusers
from .errors import PeftOrthoError
from .kohya_lora import save_kohya
from .merging import compose
from .merging.merge import METHODS as _METHODS
from .merging.merge import PRIOR_TARGET, PRIOR_TARGETS, PRIOR_WEIGHT, RIDGE, SEQUENTIAL_PRIOR_WEIGHT
from .statistics import calibration_inputs


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _one_line(text: str) -> str:
    """The message with line breaks and other control characters escaped: errors are one line on stderr."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-ortho", description="Merge, inspect and export peft-ortho adapters.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compose", help="merge adapters by name (Hub repo id[@rev], folder or .safetensors)")
    c.add_argument("names", nargs="+", metavar="NAME")
    c.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    c.add_argument("--format", choices=["peft", "diffusers", "kohya", "fused"], default="peft")
    c.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1.0 each)")
    _merge_arguments(c)
    c.add_argument("--svd-rank", type=_positive_int, help="rank of the LoRA export for delta-space methods")
    c.add_argument(
        "--component", help="diffusers component PEFT adapters belong to (default: inferred, e.g. unet / transformer)"
    )
    _format_arguments(c)
    c.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="precision to write (default: the inputs')")
    c.add_argument(
        "--base",
        help="the base model folder (diffusers or transformers): --format fused fuses into it; the report's drift "
        "‖ΔW X0‖/‖W X0‖ uses its weights",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out (never one of the inputs)")

    i = sub.add_parser("inspect", help="check adapters can be merged and print the report (predicted behaviour)")
    i.add_argument("names", nargs="+", metavar="NAME")
    i.add_argument("--weights", type=float, nargs="+")
    _merge_arguments(i)
    i.add_argument(
        "--component", help="diffusers component PEFT adapters belong to (default: inferred, e.g. unet / transformer)"
    )
    _format_arguments(i)
    i.add_argument("--base", help="base model folder whose weights the report's drift ‖ΔW X0‖/‖W X0‖ uses")
    i.add_argument(
        "--plot",
        metavar="FILE.png",
        help="write a heatmap: predicted output change per concept and layer, basis response",
    )
    i.add_argument("--json", metavar="FILE.json", help="write the full report as JSON")
    i.add_argument("--overwrite", action="store_true", help="replace existing --plot / --json files")

    e = sub.add_parser("export", help="convert a PEFT adapter to another format")
    e.add_argument("adapter", metavar="ADAPTER")
    e.add_argument("--format", choices=["diffusers", "kohya"], required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--component", help="pipeline component (default: inferred from the adapter's layers)")
    e.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="precision to write (default: the adapter's)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out (never the input)")
    return p


def _format_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--family",
        choices=["sd", "sdxl", "flux", "sd3"],
        help="model family of community single files (kohya, A1111, ComfyUI, BFL, xlabs); default: from the keys",
    )


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        default="auto",
        choices=list(_METHODS),
        help="auto (regmean when every adapter carries input statistics, else exact stacking), linear, regmean, "
        "ties, dare_linear, dare_ties, svd, sequential (layer by layer on each adapter's own sampling of its "
        "--prompt through the --calibrate pipeline)",
    )
    p.add_argument(
        "--prior-weight",
        type=float,
        default=None,
        help=f"regmean / sequential: μ, weight of ordinary inputs (default {PRIOR_WEIGHT} for regmean, "
        f"{SEQUENTIAL_PRIOR_WEIGHT} for sequential)",
    )
    p.add_argument(
        "--ridge",
        type=float,
        default=RIDGE,
        help="regmean: λ relative to tr(G)/in (0: minimum norm; default %(default)s)",
    )
    p.add_argument(
        "--prior-target",
        choices=PRIOR_TARGETS,
        default=PRIOR_TARGET,
        help="regmean: keep the base's output on the pooled prior inputs (base, the default) or each adapter's "
        "own (own)",
    )
    p.add_argument(
        "--calibrate",
        metavar="MODEL_DIR",
        help="pipeline or model folder to compute statistics with, for adapters without (needs --prompt)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="NAME=PROMPT",
        help="trigger prompt of adapter NAME for --calibrate (repeat per adapter)",
    )
    p.add_argument(
        "--prior-prompt",
        action="append",
        default=[],
        metavar="PROMPT",
        help="sequential: an ordinary prompt (e.g. the class prompt) on whose sampling the base's outputs are kept "
        "(repeat for several)",
    )
    p.add_argument("--refine-steps", type=int, default=0, help="sequential: end-to-end output-matching steps")
    p.add_argument(
        "--refine-lr", type=float, default=1e-3, help="sequential: their learning rate (default %(default)s)"
    )


def _prompts(items: list[str]) -> dict[str, str] | None:
    prompts = {}
    for item in items:
        name, sep, prompt = item.partition("=")
        if not sep or not name:
            raise PeftOrthoError(f"--prompt {item!r}: expected NAME=PROMPT")
        prompts[name] = prompt
    return prompts or None


def _load_base(path: str):
    """A base model folder saved with ``save_pretrained``: a diffusers pipeline (``model_index.json``,
    ``DiffusionPipeline``) or model (its ``_class_name``), or a transformers model with the class its
    ``config.architectures`` names, so a causal LM keeps its LM head (else ``AutoModelForCausalLM`` / ``AutoModel``).
    Weights are read from safetensors files only (``use_safetensors=True``):
    a folder holding only pickled ``.bin`` weights is refused by the loaders, never unpickled."""
    if not os.path.isdir(path):
        raise PeftOrthoError(f"{path!r} is not a model folder")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        from diffusers import DiffusionPipeline  # imports diffusers' pipelines (seconds): only for a pipeline folder

        return DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise PeftOrthoError(f"{path!r} has no config.json or model_index.json: not a saved model")
    config = read_json_object(config_path, adapter=None)
    if "_class_name" in config:
        name = config["_class_name"]
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
            raise PeftOrthoError(f"{path!r}: config.json names {name!r}, which is not a diffusers model class")
        return cls.from_pretrained(path, use_safetensors=True)
    architectures = config.get("architectures") or []
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        causal = any("CausalLM" in str(a) or "LMHead" in str(a) for a in architectures or ())
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return cls.from_pretrained(path, use_safetensors=True)


def _run(args) -> int:
    if args.command == "export":
        save = save_kohya if args.format == "kohya" else save_diffusers
        path = save(args.adapter, args.out, component=args.component, overwrite=args.overwrite, dtype=args.dtype)
        print(f"wrote {path}")
        return 0
    prompts = _prompts(args.prompt)
    if prompts and not args.calibrate:
        raise PeftOrthoError("--prompt needs --calibrate MODEL_DIR (the model to run the prompts through)")
    if args.method != "sequential" and (args.prior_prompt or args.refine_steps):
        raise PeftOrthoError("--prior-prompt and --refine-steps are options of --method sequential")
    if args.method == "sequential" and (not args.calibrate or not prompts):
        raise PeftOrthoError("--method sequential needs --calibrate PIPELINE_DIR and --prompt NAME=PROMPT per adapter")
    calibrate = _load_base(args.calibrate) if args.calibrate else None
    base = _load_base(args.base) if args.base else None
    sequential = {}
    if args.method == "sequential":
        if not hasattr(calibrate, "unet"):
            raise PeftOrthoError(
                f"--method sequential needs a diffusers pipeline folder for --calibrate: {args.calibrate}"
            )
        sequential = dict(refine_steps=args.refine_steps, refine_lr=args.refine_lr)
        if args.prior_prompt:
            sequential["prior_inputs"] = calibration_inputs(None, calibrate, list(args.prior_prompt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = compose(
            args.names,
            weights=args.weights,
            method=args.method,
            prior_weight=args.prior_weight,
            ridge=args.ridge,
            prior_target=args.prior_target,
            calibrate=calibrate,
            prompts=prompts,
            base=base,
            component=args.component,
            family=args.family,
            progress=sys.stderr.isatty(),  # progress bars only for a person watching; logs get one-line errors
            **sequential,
        )
    for w in caught:
        print(f"warning: {_one_line(w.message)}", file=sys.stderr)
    if args.command == "inspect":
        print(merged.statement)
        print(merged.report)
        if args.json:
            merged.report.to_json(args.json, overwrite=args.overwrite)
        if args.plot:
            print(f"wrote {merged.report.plot(args.plot, overwrite=args.overwrite)}")
        return 0
    merged.svd_rank = args.svd_rank
    inputs = merged.input_paths + ([args.base] if args.base else [])
    check_output(args.out, inputs)  # before the merge is written or fused
    if args.format == "peft":
        path = merged.save_pretrained(args.out, overwrite=args.overwrite, dtype=args.dtype)
    elif args.format == "diffusers":
        path = merged.save_diffusers(args.out, component=args.component, overwrite=args.overwrite, dtype=args.dtype)
    elif args.format == "kohya":
        path = merged.save_kohya(args.out, component=args.component, overwrite=args.overwrite, dtype=args.dtype)
    else:
        if not args.base:
            raise PeftOrthoError("--format fused needs --base FOLDER (the base model to fuse into)")
        model = merged.fuse(base, component=args.component)
        with atomic_dir(args.out, overwrite=args.overwrite, inputs=inputs) as tmp:
            model.save_pretrained(tmp)  # safetensors: transformers 5 writes nothing else, diffusers by default
        path = os.path.abspath(args.out)
    print(f"{merged.statement}\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # usage errors: argparse prints usage and exits 2
    try:
        return _run(args)
    except (PeftOrthoError, OSError, ValueError) as e:
        print(f"peft-ortho: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
