"""DreamBooth-style concept training with peft-ortho adapters, on diffusers + accelerate.

    accelerate launch examples/train_dreambooth.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --instance_data_dir ./rex-photos --instance_prompt "a photo of rex dog" \\
        --adapter ortho --concept_id alice/rex --rank 16 --max_train_steps 800 --output_dir rex-ortho

Trains an adapter on the UNet (``--train_text_encoder``: on the CLIP text encoder too) with the DreamBooth objective:
each step encodes instance images with the frozen VAE to latents ``z0``, draws noise ``ε`` and timesteps ``t``, and
minimises ``‖ε̂(z_t, t, c) − ε‖²`` (or the velocity target for ``v_prediction`` schedulers), ``z_t`` from the DDPM
scheduler stored with the model. ``--class_prompt`` turns on Randomized Output Erasure (``peft_ortho.erasure``): on a
fraction ``--erasure_p`` of samples the instance prompt is swapped for the class prompt and the adapter is pulled onto
the frozen base model's prediction, so it stays silent outside its concept (what keeps merges clean).

``--adapter``: ``ortho`` (``OrthoLoraConfig``: frozen orthogonal down-projection, slot from ``--concept_id`` or
``--slot``), ``block`` (``BlockLoraConfig``), ``soda`` (``SodaConfig``) or ``lora`` (plain ``peft.LoraConfig``).

Writes into ``--output_dir``: the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``; the text
encoder's under ``text_encoder/``), ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights`` where the
adapter type has a LoRA form, a model card ``README.md``, and ``checkpoint-<step>/`` folders every
``--checkpointing_steps`` (``--resume_from_checkpoint latest`` continues from the newest). Data-parallel training:
``accelerate launch --multi_gpu --num_processes N``; every process ends with the same adapter. See docs/train.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile

# Heavy imports (torch, diffusers, transformers, peft) live inside the functions that need them, so that
# `--help` answers instantly.

DEFAULT_UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
DEFAULT_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Files the final save writes; a later run replaces all of them (and removes those it no longer produces).
FINAL_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "README.md", "text_encoder")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


# --------------------------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------------------------


def _slot(value: str) -> int | str:
    if value == "random":
        return value
    try:
        slot = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slot must be a non-negative integer or 'random', got {value!r}") from None
    if slot < 0:
        raise argparse.ArgumentTypeError(f"--slot must be a non-negative integer or 'random', got {value!r}")
    return slot


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a DreamBooth concept adapter (orthogonal / block / SODA / plain LoRA) with accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or folder of a diffusers model.")
    g.add_argument("--revision", default=None, help="Revision of the pretrained model on the Hub.")
    g.add_argument("--variant", default=None, help="Weight variant to load, e.g. 'fp16'.")
    g.add_argument("--instance_data_dir", required=True, help="Folder of instance images (png/jpg/webp/bmp).")
    g.add_argument("--instance_prompt", required=True, help="Prompt naming the concept, e.g. 'a photo of rex dog'.")
    g.add_argument("--resolution", type=int, default=512, help="Images are resized (shorter side) and center-cropped.")

    g = p.add_argument_group("adapter")
    g.add_argument("--adapter", choices=("ortho", "block", "soda", "lora"), default="ortho")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank r (ortho, block, lora).")
    g.add_argument("--lora_alpha", type=float, default=None, help="Scale numerator: ΔW = (alpha / r) B A. Default r.")
    g.add_argument("--target_modules", nargs="+", default=DEFAULT_UNET_TARGETS, help="UNet modules to adapt.")
    g.add_argument("--train_text_encoder", action="store_true", help="Also adapt the text encoder's attention.")
    g.add_argument(
        "--text_encoder_target_modules", nargs="+", default=DEFAULT_TEXT_ENCODER_TARGETS, help="Text encoder modules."
    )
    g.add_argument("--basis_seed", type=int, default=0, help="ortho: seed of the shared basis (same for everyone).")
    g.add_argument("--concept_id", default=None, help="ortho/block: name hashed to a slot/block, e.g. 'alice/rex'.")
    g.add_argument("--slot", type=_slot, default=None, help="ortho: basis slot (int) or 'random' (the default).")
    g.add_argument("--num_blocks", type=int, default=16, help="block: blocks per layer.")
    g.add_argument("--block_axis", choices=("out", "in"), default="out", help="block: partition rows or columns.")
    g.add_argument("--block_index", type=int, default=None, help="block: the block to train (else concept_id/random).")
    g.add_argument("--soda_decomposition", choices=("svd", "lq"), default="svd", help="soda: weight factorisation.")
    g.add_argument("--soda_rotation", choices=("cayley", "stiefel"), default="cayley", help="soda: rotation form.")

    g = p.add_argument_group("Randomized Output Erasure")
    g.add_argument("--class_prompt", default=None, help="Foreign prompt, e.g. 'a photo of a dog'; enables erasure.")
    g.add_argument(
        "--foreign_prompts", nargs="+", default=None, help="A pool of foreign prompts instead of --class_prompt."
    )
    g.add_argument("--erasure_p", type=float, default=0.25, help="Fraction of samples whose prompt is swapped.")
    g.add_argument("--erasure_weight", type=float, default=1.0, help="Weight of the erasure (distillation) loss.")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=1, help="Per process.")
    g.add_argument("--max_train_steps", type=int, default=500)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", default="constant", help="diffusers.optimization.get_scheduler name.")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    g.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="Frozen weights in this dtype, adapters in float32. Default: accelerate's config.",
    )
    g.add_argument("--seed", type=int, default=0, help="Seeds data order, noise, timesteps and erasure swaps.")

    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", default="dreambooth-adapter")
    g.add_argument("--overwrite_output_dir", action="store_true", help="Replace a finished adapter in output_dir.")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="accelerate save_state every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument(
        "--resume_from_checkpoint", default=None, help="'latest' (newest checkpoint-N in output_dir) or a folder."
    )
    g.add_argument("--push_to_hub", action="store_true", help="Upload the adapter folder to --hub_model_id.")
    g.add_argument("--hub_model_id", default=None, help="Repository id, e.g. 'alice/rex-ortho'.")
    g.add_argument("--hub_token", default=None, help="Token; by default huggingface_hub's stored login.")
    g.add_argument("--hub_private", action="store_true", help="Create the repository as private.")
    g.add_argument(
        "--debug_dump_adapter_hash",
        action="store_true",
        help="Every process writes output_dir/adapter_hash-rank<N>.json (SHA-256 of its adapter tensors, losses).",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.slot is not None and args.concept_id is not None and args.adapter == "ortho":
        parser.error("give either --slot or --concept_id, not both")
    if args.rank < 1:
        parser.error("--rank must be at least 1")
    if not 0.0 <= args.erasure_p <= 1.0:
        parser.error("--erasure_p must lie in [0, 1]")
    if args.max_train_steps < 1 or args.checkpointing_steps < 1 or args.train_batch_size < 1:
        parser.error("--max_train_steps, --checkpointing_steps and --train_batch_size must be positive")
    if args.class_prompt is not None and args.foreign_prompts:
        parser.error("give either --class_prompt or --foreign_prompts, not both")
    args.erasure = args.class_prompt is not None or bool(args.foreign_prompts)
    if args.lora_alpha is None:
        args.lora_alpha = args.rank
    elif float(args.lora_alpha).is_integer():
        args.lora_alpha = int(args.lora_alpha)  # integral alphas stay ints in adapter_config.json
    return args


# --------------------------------------------------------------------------------------------------------------------
# adapter configs
# --------------------------------------------------------------------------------------------------------------------


def adapter_config(
    args: argparse.Namespace, target_modules: list[str], checkpoint: str | None = None, component: str = "unet"
):
    """The peft config ``--adapter`` names, for ``target_modules``; or, when resuming, the one saved in
    ``checkpoint/<component>`` (a random slot or block was drawn once, at the start: the resumed adapter must be the
    same one). Block and SODA need peft-ortho versions that ship them; their absence is a clear error."""
    import peft

    import peft_ortho

    if checkpoint is not None:
        folder = os.path.join(checkpoint, component)
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise ValueError(f"checkpoint {checkpoint!r} holds no {component} adapter ({folder} is missing)")
        config = peft.PeftConfig.from_pretrained(folder)
        expected = {"ortho": "ORTHO_LORA", "block": "BLOCK_LORA", "soda": "SODA", "lora": "LORA"}[args.adapter]
        found = str(getattr(config.peft_type, "value", config.peft_type))
        if found != expected:
            raise ValueError(f"checkpoint {checkpoint!r} holds a {found} adapter, not --adapter {args.adapter}")
        config.inference_mode = False  # save_pretrained records inference_mode=True; we continue training
        config.base_model_name_or_path = None  # set again after get_peft_model (which warns if it must rename it)
        return config

    if args.adapter == "ortho":
        return peft_ortho.OrthoLoraConfig(
            r=args.rank,
            lora_alpha=args.lora_alpha,
            target_modules=target_modules,
            basis_seed=args.basis_seed,
            concept_id=args.concept_id,
            slot=args.slot if args.concept_id is None else None,
        )
    if args.adapter == "lora":
        return peft.LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, target_modules=target_modules)
    if args.adapter == "block":
        if not hasattr(peft_ortho, "BlockLoraConfig"):
            raise ValueError("--adapter block needs a peft-ortho version with BlockLoraConfig")
        if args.block_index is not None:
            where = {"block_index": args.block_index}
        elif args.concept_id is not None:
            where = {"concept_id": args.concept_id}
        else:
            where = {}  # the config's default: a random block
        return peft_ortho.BlockLoraConfig(
            r=args.rank,
            lora_alpha=args.lora_alpha,
            target_modules=target_modules,
            num_blocks=args.num_blocks,
            block_axis=args.block_axis,
            **where,
        )
    if not hasattr(peft_ortho, "SodaConfig"):
        raise ValueError("--adapter soda needs a peft-ortho version with SodaConfig")
    return peft_ortho.SodaConfig(
        target_modules=target_modules, decomposition=args.soda_decomposition, rotation=args.soda_rotation
    )


def wrap_with_adapter(model, config, accelerator, base_model: str):
    """``peft.get_peft_model(model, config)``, the same adapter on every process.

    Why ``get_peft_model`` (a ``PeftModel``) rather than diffusers' ``unet.add_adapter`` or peft's
    ``inject_adapter_in_model``: a ``PeftModel`` saves exactly the adapter (``adapter_config.json`` with our
    ``peft_type`` + ``adapter_model.safetensors``), reloads with ``PeftModel.from_pretrained``/
    ``set_peft_model_state_dict`` (which verifies an orthogonal basis), and is what ``compose``, ``push_to_hub`` and
    ``save_diffusers`` read. diffusers' ``add_adapter``/``save_lora_adapter`` assume a plain ``LoraConfig``. Under
    accelerate, DDP wraps the ``PeftModel`` like any module: only ``requires_grad`` adapter weights are all-reduced.

    A random slot or block is drawn when the adapter is created, differently in each process. So with several
    processes the main one creates its adapter first and sends its resolved config (which records the rows/block it
    drew); the others build theirs from that config and hold the very same adapter.
    """
    from peft import PeftConfig, get_peft_model

    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        resolved = [None]
        if accelerator.is_main_process:
            model = get_peft_model(model, config)
            resolved = [model.peft_config["default"].to_dict()]
        broadcast_object_list(resolved)  # a config dict between our own processes, not read from a file
        if not accelerator.is_main_process:
            fields = {k: v for k, v in resolved[0].items() if k != "base_model_name_or_path"}
            model = get_peft_model(model, PeftConfig.from_peft_type(**fields))
    else:
        model = get_peft_model(model, config)
    # get_peft_model reads the name from transformers models only; compose compares it across adapters.
    model.peft_config["default"].base_model_name_or_path = base_model
    for p in model.parameters():  # adapters train in float32 even when the frozen base is bf16/fp16
        if p.requires_grad:
            p.data = p.data.float()
    return model


# --------------------------------------------------------------------------------------------------------------------
# data, sampling, randomness
# --------------------------------------------------------------------------------------------------------------------


def load_instance_images(folder: str, resolution: int):
    """``(N, 3, resolution, resolution)`` float32 in ``[-1, 1]``: every image in ``folder``, RGB, shorter side resized
    to ``resolution`` (bicubic), then center-cropped. Sorted by file name, so every process sees the same order."""
    import numpy as np
    import torch
    from PIL import Image

    if not os.path.isdir(folder):
        raise ValueError(f"--instance_data_dir {folder!r} is not a folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise ValueError(f"--instance_data_dir {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as im:
            im = im.convert("RGB")
            scale = resolution / min(im.size)
            w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
            im = im.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            images.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(images)


def sample_indices(step: int, rank: int, batch_size: int, world_size: int, n: int, seed: int) -> list[int]:
    """Instance indices of ``rank``'s batch at ``step`` (0-based): a function of its arguments only.

    Sample number ``k = (step·world_size + rank)·batch_size + b`` of the run is element ``k mod n`` of the
    permutation of epoch ``k // n`` (drawn from ``seed`` and the epoch). The processes split each global batch
    without overlap, like a ``DistributedSampler``, and a resumed run continues exactly where it stopped.
    """
    import torch

    out = []
    for b in range(batch_size):
        epoch, i = divmod((step * world_size + rank) * batch_size + b, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return out


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the noise, timesteps and erasure swaps of ``rank`` at ``step``: reproducible after a resume, different
    across processes (each process trains on its own samples; DDP averages their gradients)."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def adapter_digest(model) -> str:
    """SHA-256 over every adapter tensor (names, dtypes, shapes and bytes, in name order)."""
    import torch
    from peft import get_peft_model_state_dict

    h = hashlib.sha256()
    for key, t in sorted(get_peft_model_state_dict(model, save_embedding_layers=False).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------------


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def resolve_checkpoint(value: str, output_dir: str) -> tuple[int, str]:
    """``(step, folder)`` of ``--resume_from_checkpoint`` (``latest`` or a ``checkpoint-<step>`` folder)."""
    if value == "latest":
        found = _checkpoints(output_dir)
        if not found:
            raise ValueError(f"--resume_from_checkpoint latest: no checkpoint-<step> folder in {output_dir!r}")
        return found[-1]
    m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(value)))
    if m is None or not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a checkpoint-<step> folder")
    return int(m.group(1)), value


def register_checkpoint_hooks(accelerator, models: dict) -> None:
    """Make ``save_state``/``load_state`` write and read only the adapters (``<component>/adapter_model.safetensors``)
    instead of the full UNet and text encoder weights (gigabytes per checkpoint for Stable Diffusion)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    def component(module) -> str:
        unwrapped = accelerator.unwrap_model(module)
        for name, model in models.items():
            if unwrapped is model:
                return name
        raise ValueError(f"unexpected model {type(unwrapped).__name__} in the accelerator state")

    def save_hook(prepared, weights, output_dir):
        if accelerator.is_main_process:
            for module in prepared:
                name = component(module)
                models[name].save_pretrained(os.path.join(output_dir, name), save_embedding_layers=False)
        weights.clear()  # on every process: accelerate would otherwise write the full models' weights

    def load_hook(prepared, input_dir):
        while prepared:
            name = component(prepared.pop())
            path = os.path.join(input_dir, name, "adapter_model.safetensors")
            if not os.path.isfile(path):
                raise ValueError(f"checkpoint {input_dir!r} has no {name} adapter ({path} is missing)")
            result = set_peft_model_state_dict(models[name], load_file(path))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint {input_dir!r}: unexpected {name} tensors {result.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """``accelerator.save_state`` into ``checkpoint-<step>``, written beside it and renamed when complete, so an
    interrupted save never leaves a half checkpoint for ``--resume_from_checkpoint latest`` to pick."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    staging = os.path.join(output_dir, f".checkpoint-{step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        if total_limit is not None:
            for _, old in _checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------------------------
# final outputs and the Hub
# --------------------------------------------------------------------------------------------------------------------


def _replace_into(staging: str, output_dir: str) -> None:
    """Move every entry of ``staging`` into ``output_dir`` (files by ``os.replace``; a folder by renaming the old one
    aside first), then remove final outputs of an earlier run that this run did not produce."""
    produced = set(os.listdir(staging))
    for name in sorted(produced):
        src, dst = os.path.join(staging, name), os.path.join(output_dir, name)
        if os.path.isdir(src) and os.path.exists(dst):
            aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=output_dir)
            os.rmdir(aside)
            os.replace(dst, aside)
            os.replace(src, dst)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(src, dst)
    for name in (*FINAL_OUTPUTS, DIFFUSERS_WEIGHT_NAME):
        path = os.path.join(output_dir, name)
        if name not in produced and os.path.exists(path):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def save_outputs(args: argparse.Namespace, unet, text_encoder=None, log=print) -> dict:
    """Write the adapter(s), the diffusers file and the model card into ``args.output_dir``; return what was written.

    Everything is staged in a temporary folder inside ``output_dir`` and moved in only once complete; the
    ``checkpoint-*`` folders beside it are left alone.
    """
    import peft_ortho
    from peft_ortho.errors import UnsupportedAdapterError

    os.makedirs(args.output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".final-", dir=args.output_dir)
    try:
        # save_embedding_layers=False: no embedding is adapted; "auto" would look for the base's config.json.
        unet.save_pretrained(staging, save_embedding_layers=False)
        components = {"unet": unet}
        if text_encoder is not None:
            text_encoder.save_pretrained(os.path.join(staging, "text_encoder"), save_embedding_layers=False)
            components["text_encoder"] = text_encoder
        diffusers_note = None
        try:
            path = peft_ortho.save_diffusers(components, os.path.join(staging, ".diffusers"))
            os.replace(path, os.path.join(staging, DIFFUSERS_WEIGHT_NAME))
            shutil.rmtree(os.path.join(staging, ".diffusers"))
        except UnsupportedAdapterError as e:
            # e.g. a SODA adapter is a full-rank rotation + spectrum: diffusers has no format for it (yet).
            diffusers_note = f"no {DIFFUSERS_WEIGHT_NAME}: {e}"
            log(f"note: {diffusers_note}")
        config = unet.peft_config["default"]
        card = peft_ortho.model_card(
            config,
            base_model=args.pretrained_model_name_or_path,
            extra_tags=["dreambooth", "text-to-image", "diffusers-training"],
            summary=_card_summary(args, diffusers_note),
            repo_id=args.hub_model_id,
            diffusers_weight_name=None if diffusers_note else DIFFUSERS_WEIGHT_NAME,
        )
        card.save(os.path.join(staging, "README.md"))  # replaces the generic card peft's save_pretrained wrote
        written = sorted(os.listdir(staging))
        _replace_into(staging, args.output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"files": written, "diffusers_note": diffusers_note}


def _card_summary(args: argparse.Namespace, diffusers_note: str | None) -> str:
    lines = [
        f"DreamBooth adapter for the prompt `{args.instance_prompt}`, trained with peft-ortho's "
        f"`examples/train_dreambooth.py` (`--adapter {args.adapter}`) on the UNet"
        + (" and the text encoder" if args.train_text_encoder else "")
        + ".",
        "",
        "| setting | value |",
        "|---|---|",
        f"| instance prompt | `{args.instance_prompt}` |",
        f"| steps × batch | {args.max_train_steps} × {args.train_batch_size} per process |",
        f"| learning rate | {args.learning_rate} ({args.lr_scheduler}) |",
        f"| resolution | {args.resolution} |",
    ]
    if args.erasure:
        foreign = f"`{args.class_prompt}`" if args.class_prompt else f"{len(args.foreign_prompts)} foreign prompts"
        lines.append(f"| output erasure | {foreign}, p = {args.erasure_p}, weight {args.erasure_weight} |")
    if args.train_text_encoder:
        lines += ["", "The text encoder's adapter is in `text_encoder/` (load it onto `pipe.text_encoder`)."]
    if diffusers_note:
        lines += ["", f"Note: {diffusers_note}"]
    return "\n".join(lines)


def push_output(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    api=None,
):
    """Upload the finished adapter folder (not its checkpoints) to ``repo_id`` in one commit; return the commit info.

    ``peft_ortho.push_to_hub`` uploads one adapter and writes a generic card; the folder this script leaves already
    holds the card with the training settings, the text encoder's adapter and a diffusers file covering both, so it
    is uploaded as it is, with the same ``create_repo`` + ``upload_folder`` calls. ``api``: an ``HfApi`` (or
    subclass) instance to use instead of ``HfApi(token=token)``.
    """
    from huggingface_hub import HfApi

    if api is None:
        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, exist_ok=True, private=private, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload peft-ortho DreamBooth adapter",
        repo_type="model",
        allow_patterns=["README.md", "adapter_config.json", "adapter_model.safetensors", DIFFUSERS_WEIGHT_NAME]
        + ["text_encoder/adapter_config.json", "text_encoder/adapter_model.safetensors"],
    )


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------


def make_erasure(args: argparse.Namespace, seed: int):
    """An ``OutputErasure`` for one step. Built per step from ``step_seed`` so that which samples are swapped is a
    function of (seed, step, process): a resumed run swaps exactly what the uninterrupted one would have."""
    from peft_ortho.erasure import OutputErasure

    pool = {"foreign_prompts": args.foreign_prompts} if args.foreign_prompts else {"class_prompt": args.class_prompt}
    return OutputErasure(p=args.erasure_p, weight=args.erasure_weight, seed=seed, **pool)


class DreamBoothObjective:
    """The loss of one training step on one process, a function of (seed, step, process) and the weights only.

    Sample ``z0 ~ N(μ, σ²)`` of the cached VAE posterior of the step's instance images, ``ε ~ N(0, I)``,
    ``t ~ U{0..T-1}``, ``z_t = √ᾱ_t z0 + √(1-ᾱ_t) ε``; return ``mean ‖ε̂(z_t, t, c) − y‖²`` with ``y = ε`` (or the
    velocity ``√ᾱ_t ε − √(1-ᾱ_t) z0`` for ``v_prediction``). With a class prompt, ``OutputErasure`` swaps some prompts
    and replaces their target by the frozen base model's prediction (adapters disabled, text encoder included).
    """

    def __init__(self, args, tokenizer, noise_scheduler, unet, text_encoder, frozen_text_encoder, mean, std, dtype):
        self.args, self.tokenizer, self.scheduler = args, tokenizer, noise_scheduler
        self.unet = unet  # the prepared (possibly DDP-wrapped) UNet
        self.text_encoder = text_encoder  # the prepared text encoder when it trains, else None
        self.frozen_text_encoder = frozen_text_encoder  # the PeftModel when it trains, else the plain model
        self.mean, self.std, self.dtype = mean, std, dtype

    def tokenize(self, prompts: list[str]):
        tok = self.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return ids.input_ids.to(self.mean.device)

    def encode(self, prompts: list[str]):
        import torch

        if self.text_encoder is not None:
            return self.text_encoder(self.tokenize(prompts))[0]
        with torch.no_grad():
            return self.frozen_text_encoder(self.tokenize(prompts))[0]

    def __call__(self, step: int, rank: int, world: int):
        import torch
        import torch.nn.functional as F

        args, device = self.args, self.mean.device
        g = torch.Generator().manual_seed(step_seed(args.seed, step, rank))
        idx = sample_indices(step, rank, args.train_batch_size, world, self.mean.shape[0], args.seed)
        mean, std = self.mean[idx], self.std[idx]
        latents = mean + std * torch.randn(mean.shape, generator=g).to(device)
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(idx),), generator=g).to(device)
        noisy = self.scheduler.add_noise(latents, noise, t).to(self.dtype)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        prompts = [args.instance_prompt] * len(idx)
        if not args.erasure:
            return F.mse_loss(self.unet(noisy, t, self.encode(prompts)).sample.float(), target.float())

        from peft_ortho.erasure import adapters_disabled

        erasure = make_erasure(args, int(torch.randint(0, 2**62, (1,), generator=g)))
        prompts, erased = erasure.swap(prompts)
        erased = erased.to(device)
        context = self.encode(prompts)
        pred = self.unet(noisy, t, context).sample

        def teacher():
            if self.text_encoder is None:  # a frozen text encoder: the student's context is the base's
                return self.unet(noisy[erased], t[erased], context[erased]).sample
            with adapters_disabled(self.frozen_text_encoder):  # the base text encoder too
                base_context = self.frozen_text_encoder(self.tokenize(prompts))[0]
            return self.unet(noisy[erased], t[erased], base_context[erased]).sample

        base = erasure.teacher(self.unet, teacher)
        return erasure.loss(pred.float(), target.float(), erased, None if base is None else base.float())


def main(argv: list[str] | None = None, *, hub_api=None) -> dict:
    """Train, save, optionally push. Returns ``{"output_dir", "files", "adapter_sha256", "losses", "pushed"}``.

    ``hub_api``: an ``HfApi`` instance for ``--push_to_hub`` (tests pass a recording one; default ``HfApi``).
    """
    args = parse_args(argv)

    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel

    import peft_ortho  # noqa: F401  (registers the peft-ortho adapter types with peft)

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > world:
        # torchrun started several processes but accelerate found no backend for them (on CPUs it needs
        # ACCELERATE_USE_CPU=1): each would train alone and they would overwrite each other's files.
        raise RuntimeError(
            f"launched as {launched} processes but accelerate runs {world}: on CPUs use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` (gloo backend)"
        )
    log = accelerator.print
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # Refuse, before any work, to replace a finished adapter that is not ours to replace.
    finished = os.path.isfile(os.path.join(args.output_dir, "adapter_model.safetensors"))
    if finished and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise FileExistsError(
            f"{args.output_dir} already holds a trained adapter; pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint to continue its training, or choose another --output_dir"
        )
    images = load_instance_images(args.instance_data_dir, args.resolution)

    load = {"revision": args.revision, "variant": args.variant, "torch_dtype": weight_dtype}
    path = args.pretrained_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **load)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **load)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=args.revision)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.to(accelerator.device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    first_step, checkpoint = 0, None
    if args.resume_from_checkpoint:
        first_step, checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    unet = wrap_with_adapter(unet, adapter_config(args, args.target_modules, checkpoint, "unet"), accelerator, path)
    models = {"unet": unet}
    if args.train_text_encoder:
        te_config = adapter_config(args, args.text_encoder_target_modules, checkpoint, "text_encoder")
        text_encoder = wrap_with_adapter(text_encoder, te_config, accelerator, path)
        models["text_encoder"] = text_encoder
    params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    log(f"{args.adapter} adapter: {n_params:,} trainable parameters on {', '.join(models)}; {world} process(es)")

    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    prepared = accelerator.prepare(*models.values(), optimizer, lr_scheduler)
    unet_ddp = prepared[0]
    te_ddp = prepared[1] if args.train_text_encoder else None
    optimizer, lr_scheduler = prepared[-2], prepared[-1]
    register_checkpoint_hooks(accelerator, models)

    # The VAE is frozen and the images are not augmented: encode once, sample z0 ~ N(mean, std²) per step.
    with torch.no_grad():
        dist = vae.encode(images.to(accelerator.device, dtype=weight_dtype)).latent_dist
        latent_mean = dist.mean.float() * vae.config.scaling_factor
        latent_std = dist.std.float() * vae.config.scaling_factor
    del vae

    objective = DreamBoothObjective(
        args, tokenizer, noise_scheduler, unet_ddp, te_ddp, text_encoder, latent_mean, latent_std, weight_dtype
    )

    if checkpoint is not None:
        accelerator.load_state(checkpoint)
        log(f"resumed from {checkpoint} (step {first_step})")
        if first_step >= args.max_train_steps:
            log(
                f"the checkpoint is at step {first_step} >= --max_train_steps {args.max_train_steps}: nothing to train"
            )

    losses: list[float] = []
    progress = tqdm(
        range(first_step, args.max_train_steps),
        initial=first_step,
        total=args.max_train_steps,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    for step in progress:
        with accelerator.autocast():
            loss = objective(step, rank, world)
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < args.max_train_steps:
            saved = save_checkpoint(accelerator, args.output_dir, step + 1, args.checkpoints_total_limit)
            log(f"saved {saved}")
    progress.close()

    if first_step < args.max_train_steps:
        # The final state is a checkpoint too: a later run can train further from it.
        save_checkpoint(accelerator, args.output_dir, args.max_train_steps, args.checkpoints_total_limit)
    digest = adapter_digest(models["unet"])
    if args.train_text_encoder:
        digest = hashlib.sha256((digest + adapter_digest(models["text_encoder"])).encode()).hexdigest()
    if args.debug_dump_adapter_hash:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, f"adapter_hash-rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world_size": world, "sha256": digest, "losses": losses}, f)

    result = {"output_dir": args.output_dir, "files": [], "adapter_sha256": digest, "losses": losses, "pushed": None}
    if accelerator.is_main_process:
        saved = save_outputs(args, models["unet"], models.get("text_encoder"), log=log)
        result["files"] = saved["files"]
        log(f"saved the adapter to {args.output_dir}: {', '.join(saved['files'])}")
        if args.push_to_hub:
            info = push_output(
                args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private, api=hub_api
            )
            result["pushed"] = info
            log(f"pushed to {getattr(info, 'commit_url', args.hub_model_id)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
