"""DreamBooth concept training with peft-ortho adapters, on diffusers + accelerate (Stable Diffusion 1.x/2.x and SDXL).

    accelerate launch examples/train_dreambooth.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --instance_data_dir ./rex-photos --instance_prompt "a photo of rex dog" \\
        --with_prior_preservation --class_prompt "a photo of a dog" --class_data_dir ./dogs \\
        --adapter ortho --concept_id alice/rex --rank 16 --max_train_steps 800 --output_dir rex-ortho

Trains an adapter on the UNet (``--train_text_encoder``: on the CLIP text encoder(s) too; both of SDXL's) with the
DreamBooth objective: each step takes a view of each instance image (random or ``--center_crop`` crop,
``--random_flip``), encodes it with the frozen VAE to ``z0``, draws noise ``ε`` and a timestep ``t``, and minimises
``‖ε̂(z_t, t, c) − ε‖²`` (or the velocity target for ``v_prediction`` schedulers). SDXL models (a folder or Hub id
whose ``model_index.json`` has a ``text_encoder_2``) are conditioned like ``StableDiffusionXLPipeline``: both text
encoders' penultimate hidden states, the second's pooled embedding and the ``add_time_ids`` micro-conditioning
(original size, crop corner, target size).

``--with_prior_preservation`` (as in diffusers' DreamBooth scripts): ``--num_class_images`` images of
``--class_prompt`` are generated once with the base pipeline into ``--class_data_dir`` (missing ones only, so an
interrupted generation resumes), and every batch adds as many class samples as instance samples, their loss weighted
by ``--prior_loss_weight``; ``--prior_loss_target base`` regresses them onto the frozen base's own prediction
instead of the noise (distillation; measured to halve the class prompt's drift). The adapter's input statistics (``adapter_statistics.safetensors``, for
behaviour-preserving merges) are recorded on the way: ``"concept"`` on the instance batches, ``"prior"`` on the class
batches, ``"unconditional"`` on the instance images under the empty prompt. ``--output_erasure`` adds Randomized
Output Erasure (``peft_ortho.erasure``) with the class prompt (or ``--foreign_prompts``).

``--adapter``: ``ortho`` (``OrthoLoraConfig``: frozen orthogonal down-projection, slot from ``--concept_id`` or
``--slot``), ``block`` (``BlockLoraConfig``), ``soda`` (``SodaConfig``) or ``lora`` (plain ``peft.LoraConfig``).

Writes into ``--output_dir``: the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``; the text
encoders' under ``text_encoder/`` and ``text_encoder_2/``), ``pytorch_lora_weights.safetensors`` for
``pipe.load_lora_weights`` (for SODA a rank-k or exact LoRA export, its error in the card), the statistics, a model
card ``README.md`` (with the final ``--validation_prompt`` grid ``validation.png``), and ``checkpoint-<step>/`` folders
every ``--checkpointing_steps`` (``--resume_from_checkpoint latest`` continues from the newest, bit-identically).
Data-parallel training: ``accelerate launch --multi_gpu --num_processes N``; every process ends with the same adapter
and statistics. See docs/train.md.
"""

from __future__ import annotations

import argparse
import contextlib
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
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
STATISTICS_FILE = "adapter_statistics.safetensors"
VALIDATION_GRID = "validation.png"
# Files the final save writes; a later run replaces all of them (and removes those it no longer produces).
FINAL_OUTPUTS = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
    STATISTICS_FILE,
    VALIDATION_GRID,
    *TEXT_ENCODERS,
)
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


def _export_rank(value: str) -> int | None:
    if value == "exact":
        return None
    try:
        rank = int(value)
    except ValueError:
        rank = 0
    if rank < 1:
        raise argparse.ArgumentTypeError(f"--soda_export_rank must be a positive integer or 'exact', got {value!r}")
    return rank


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a DreamBooth concept adapter (orthogonal / block / SODA / plain LoRA) with accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--pretrained_model_name_or_path", required=True, help="Hub id or folder of a diffusers SD or SDXL pipeline."
    )
    g.add_argument("--revision", default=None, help="Revision of the pretrained model on the Hub.")
    g.add_argument("--variant", default=None, help="Weight variant to load, e.g. 'fp16'.")
    g.add_argument("--instance_data_dir", required=True, help="Folder of instance images (png/jpg/webp/bmp).")
    g.add_argument("--instance_prompt", required=True, help="Prompt naming the concept, e.g. 'a photo of rex dog'.")
    g.add_argument("--resolution", type=int, default=512, help="Images are resized (shorter side), then cropped.")
    g.add_argument("--center_crop", action="store_true", help="Center crops (default: a random crop per sample).")
    g.add_argument("--random_flip", action="store_true", help="Flip each sample horizontally with probability 1/2.")

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true", help="Add class samples to every batch.")
    g.add_argument("--class_prompt", default=None, help="Prompt of the class, e.g. 'a photo of a dog'.")
    g.add_argument("--class_data_dir", default=None, help="Folder of class images; missing ones are generated here.")
    g.add_argument("--num_class_images", type=int, default=100, help="Class images to use (generated if missing).")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the class samples' loss.")
    g.add_argument(
        "--prior_loss_target",
        choices=("noise", "base"),
        default="noise",
        help="What the class samples' predictions regress onto: the added noise (diffusers' recipe) or the frozen "
        "base's own prediction on the same noised class latents (distillation: less drift of the class prompt).",
    )
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    g.add_argument("--class_inference_steps", type=int, default=50, help="Denoising steps per generated class image.")
    g.add_argument(
        "--statistics",
        action="store_true",
        default=None,
        help=f"Record the adapter's input statistics into {STATISTICS_FILE} (default with --with_prior_preservation).",
    )
    g.add_argument("--no_statistics", dest="statistics", action="store_false", help="Do not record statistics.")

    g = p.add_argument_group("adapter")
    g.add_argument("--adapter", choices=("ortho", "block", "soda", "lora"), default="ortho")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank r (ortho, block, lora).")
    g.add_argument("--lora_alpha", type=float, default=None, help="Scale numerator: ΔW = (alpha / r) B A. Default r.")
    g.add_argument("--target_modules", nargs="+", default=DEFAULT_UNET_TARGETS, help="UNet modules to adapt.")
    g.add_argument("--train_text_encoder", action="store_true", help="Also adapt the text encoder(s)' attention.")
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
    g.add_argument(
        "--soda_export_rank",
        type=_export_rank,
        default=16,
        help="soda: rank of the diffusers LoRA export per layer, or 'exact' (full rank, no approximation).",
    )

    g = p.add_argument_group("Randomized Output Erasure")
    g.add_argument(
        "--output_erasure", action="store_true", help="Turn on erasure with --class_prompt (or --foreign_prompts)."
    )
    g.add_argument(
        "--foreign_prompts", nargs="+", default=None, help="A pool of foreign prompts instead of --class_prompt."
    )
    g.add_argument("--erasure_p", type=float, default=0.25, help="Fraction of samples whose prompt is swapped.")
    g.add_argument("--erasure_weight", type=float, default=1.0, help="Weight of the erasure (distillation) loss.")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=1, help="Instance samples per process and micro-batch.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument("--max_train_steps", type=int, default=500, help="Optimizer steps.")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--text_encoder_lr", type=float, default=None, help="Text encoders' lr (default --learning_rate).")
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
    g.add_argument("--seed", type=int, default=0, help="Seeds data order, views, noise, timesteps, swaps, images.")

    g = p.add_argument_group("validation and logging")
    g.add_argument("--validation_prompt", default=None, help="Generate images of this prompt with the adapter.")
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation (one grid).")
    g.add_argument("--validation_steps", type=int, default=100, help="Validate every N steps (and at the end).")
    g.add_argument("--validation_inference_steps", type=int, default=25, help="Denoising steps per validation image.")
    g.add_argument(
        "--report_to", choices=("none", "tensorboard", "wandb"), default="none", help="accelerate tracker for logs."
    )
    g.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")

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
        help="Every process writes output_dir/adapter_hash-rank<N>.json (SHA-256 of its adapter and statistics).",
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
    positive = ("max_train_steps", "checkpointing_steps", "train_batch_size", "gradient_accumulation_steps")
    positive += ("num_class_images", "sample_batch_size", "class_inference_steps", "validation_steps")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.num_validation_images < 0 or args.prior_loss_weight < 0:
        parser.error("--num_validation_images and --prior_loss_weight must not be negative")
    if args.class_prompt is not None and args.foreign_prompts:
        parser.error("give either --class_prompt or --foreign_prompts, not both")
    if args.with_prior_preservation and (args.class_prompt is None or args.class_data_dir is None):
        parser.error("--with_prior_preservation needs --class_prompt and --class_data_dir")
    if args.class_prompt is not None and not (args.with_prior_preservation or args.output_erasure):
        # Before prior preservation existed, --class_prompt alone turned on output erasure; refuse rather than
        # silently train something else than that command line used to.
        parser.error(
            "--class_prompt needs --with_prior_preservation (class samples in every batch) and/or --output_erasure "
            "(Randomized Output Erasure with that prompt)"
        )
    if args.class_data_dir is not None and not args.with_prior_preservation:
        parser.error("--class_data_dir needs --with_prior_preservation")
    if args.prior_loss_target != "noise" and not args.with_prior_preservation:
        parser.error("--prior_loss_target needs --with_prior_preservation (it is the target of the class samples)")
    if args.output_erasure and args.class_prompt is None and not args.foreign_prompts:
        parser.error("--output_erasure needs --class_prompt or --foreign_prompts")
    args.erasure = args.output_erasure or bool(args.foreign_prompts)
    if args.statistics is None:
        args.statistics = args.with_prior_preservation
    if args.text_encoder_lr is None:
        args.text_encoder_lr = args.learning_rate
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
    same one)."""
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
    return peft_ortho.SodaConfig(
        target_modules=target_modules, decomposition=args.soda_decomposition, rotation=args.soda_rotation
    )


def wrap_with_adapter(model, config, accelerator, base_model: str):
    """``peft.get_peft_model(model, config)``, the same adapter on every process.

    Why ``get_peft_model`` (a ``PeftModel``) rather than diffusers' ``unet.add_adapter`` or peft's
    ``inject_adapter_in_model``: a ``PeftModel`` saves exactly the adapter (``adapter_config.json`` with our
    ``peft_type`` + ``adapter_model.safetensors``), reloads with ``PeftModel.from_pretrained``/
    ``set_peft_model_state_dict`` (which verifies an orthogonal basis), and is what ``compose``, ``push_to_hub`` and
    ``save_diffusers`` read. (diffusers' own scripts use ``add_adapter``; docs/diffusers_scripts.md shows that path.)
    Under accelerate, DDP wraps the ``PeftModel`` like any module: only ``requires_grad`` adapter weights are
    all-reduced.

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


def _image_files(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."))


class ImageSet:
    """Images resized so that their shorter side is ``resolution`` (bicubic), and the views training takes of them.

    ``images[i]``: ``(3, h, w)`` float32 in ``[-1, 1]`` with ``min(h, w) = resolution``; ``original_sizes[i]``:
    the file's ``(height, width)`` (SDXL's ``add_time_ids`` condition on it). Files are read in name order, so
    every process sees the same list.
    """

    def __init__(self, folder: str, resolution: int, *, what: str = "--instance_data_dir", limit: int | None = None):
        import numpy as np
        import torch
        from PIL import Image, ImageOps

        if not os.path.isdir(folder):
            raise ValueError(f"{what} {folder!r} is not a folder")
        names = _image_files(folder)[:limit]
        if not names:
            raise ValueError(f"{what} {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.resolution, self.names, self.images, self.original_sizes = resolution, names, [], []
        for name in names:
            with Image.open(os.path.join(folder, name)) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                self.original_sizes.append((im.height, im.width))
                scale = resolution / min(im.size)
                w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
                im = im.resize((w, h), Image.Resampling.BICUBIC)
                self.images.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)

    def __len__(self) -> int:
        return len(self.images)

    def draw_view(self, i: int, generator, center_crop: bool, random_flip: bool) -> tuple[int, int, bool]:
        """``(top, left, flip)`` of a ``resolution²`` view of image ``i``. Always draws three numbers from
        ``generator``, so what follows in the stream does not depend on the flags."""
        import torch

        _, h, w = self.images[i].shape
        r = self.resolution
        u = torch.rand(3, generator=generator).tolist()
        if center_crop:
            top, left = (h - r) // 2, (w - r) // 2
        else:
            top, left = min(int(u[0] * (h - r + 1)), h - r), min(int(u[1] * (w - r + 1)), w - r)
        return top, left, bool(random_flip and u[2] < 0.5)

    def view(self, i: int, top: int, left: int, flip: bool):
        """``(3, resolution, resolution)`` pixels of that view."""
        r = self.resolution
        x = self.images[i][:, top : top + r, left : left + r]
        return x.flip(-1) if flip else x


def load_instance_images(folder: str, resolution: int):
    """``(N, 3, resolution, resolution)`` center crops of every image in ``folder`` (see :class:`ImageSet`)."""
    import torch

    images = ImageSet(folder, resolution)
    views = [images.view(i, *images.draw_view(i, torch.Generator(), True, False)) for i in range(len(images))]
    return torch.stack(views)


def derived_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (SHA-256 of their ``/``-joined text): independent streams per purpose."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_numbers(step: int, rank: int, batch_size: int, world_size: int) -> list[int]:
    """Global numbers ``k = (step·world_size + rank)·batch_size + b`` of ``rank``'s samples at micro-step ``step``.

    Every random draw of a sample (which image, its view, its latent, noise, timestep, erasure swap) is a function
    of ``(seed, k)`` only: a resumed run continues exactly where it stopped, and 2 processes × batch ``b`` train on
    exactly the samples 1 process × batch ``2b`` does.
    """
    return [(step * world_size + rank) * batch_size + b for b in range(batch_size)]


def sample_index(k: int, n: int, seed: int, stream: str = "instance") -> int:
    """Which of ``n`` items sample ``k`` uses: element ``k mod n`` of the permutation of epoch ``k // n``."""
    import torch

    epoch, i = divmod(k, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, stream, "epoch", epoch)))
    return int(perm[i])


def sample_indices(step: int, rank: int, batch_size: int, world_size: int, n: int, seed: int) -> list[int]:
    """Instance indices of ``rank``'s batch at micro-step ``step`` (0-based): the processes split each global batch
    without overlap, like a ``DistributedSampler``."""
    return [sample_index(k, n, seed) for k in sample_numbers(step, rank, batch_size, world_size)]


def adapter_digest(model) -> str:
    """SHA-256 over every adapter tensor (names, dtypes, shapes and bytes, in name order)."""
    from peft import get_peft_model_state_dict

    return tensors_digest(get_peft_model_state_dict(model, save_embedding_layers=False))


def tensors_digest(tensors: dict) -> str:
    import torch

    h = hashlib.sha256()
    for key, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# pipelines: class images and validation
# --------------------------------------------------------------------------------------------------------------------


def make_pipeline(args: argparse.Namespace, components: dict, dtype):
    """The model's diffusers pipeline around the already loaded ``components`` (only the scheduler and small
    preprocessing parts are read from the model folder), progress bars off. One place builds every pipeline the
    script uses (class images, validation), so a run that asks for neither builds none."""
    from diffusers import DiffusionPipeline

    extra = {} if "text_encoder_2" in components else {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        torch_dtype=dtype,
        **components,
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_class_images(args: argparse.Namespace, accelerator, components: dict, dtype, log=print) -> int:
    """Make ``--class_data_dir`` hold ``--num_class_images`` images of ``--class_prompt``; return how many were made.

    Only the missing ones are generated, with the base model (before any adapter exists): image ``j`` from a
    generator seeded by ``(seed, j)``, saved as ``class-<j>.png`` atomically (written aside, renamed when complete),
    so an interrupted generation resumes with exactly the images an uninterrupted one would have made. With several
    processes each generates a share.
    """
    import torch
    from tqdm.auto import tqdm

    folder = args.class_data_dir
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
    accelerator.wait_for_everyone()
    existing = set(os.listdir(folder))
    missing = args.num_class_images - len(_image_files(folder))
    accelerator.wait_for_everyone()  # everyone counted before anyone writes
    if missing <= 0:
        return 0
    # Numbers j of the images to make: the lowest whose file name is free.
    todo, j = [], 0
    while len(todo) < missing:
        if f"class-{j:06d}.png" not in existing:
            todo.append(j)
        j += 1
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    log(f"generating {missing} class images of {args.class_prompt!r} into {folder}")
    pipe = make_pipeline(args, components, dtype)
    pipe.to(accelerator.device)
    bar = tqdm(total=len(mine), desc="class images", disable=not accelerator.is_local_main_process)
    for start in range(0, len(mine), args.sample_batch_size):
        chunk = mine[start : start + args.sample_batch_size]
        gens = [
            torch.Generator(accelerator.device).manual_seed(derived_seed(args.seed, "class-image", j)) for j in chunk
        ]
        images = pipe(
            [args.class_prompt] * len(chunk),
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.class_inference_steps,
            generator=gens,
        ).images
        for j, image in zip(chunk, images):
            partial = os.path.join(folder, f".class-{j:06d}.png.partial")
            image.save(partial, format="PNG")
            os.replace(partial, os.path.join(folder, f"class-{j:06d}.png"))
        bar.update(len(chunk))
    bar.close()
    del pipe
    accelerator.wait_for_everyone()
    return missing


def image_grid(images):
    """One row of PIL images."""
    from diffusers.utils import make_image_grid

    return make_image_grid(list(images), rows=1, cols=len(images))


def run_validation(args, accelerator, pipe, step: int, *, final: bool = False):
    """``--num_validation_images`` images of ``--validation_prompt`` with the adapter as it is now; image ``i`` from a
    generator seeded by ``(seed, i)`` (the same noise at every validation, so grids are comparable). Saves the grid
    (``validation/step-<step>.png``; the final one is returned for the output folder) and logs the images to the
    trackers. Returns ``(images, grid)``."""
    import numpy as np
    import torch

    images = []
    for i in range(args.num_validation_images):
        g = torch.Generator(accelerator.device).manual_seed(derived_seed(args.seed, "validation", i))
        with torch.no_grad():
            out = pipe(
                args.validation_prompt,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.validation_inference_steps,
                generator=g,
            )
        images.append(out.images[0])
    grid = image_grid(images)
    if not final:
        folder = os.path.join(args.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        grid.save(os.path.join(folder, f"step-{step:06d}.png"))
    phase = "test" if final else "validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(phase, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {phase: [wandb.Image(im, caption=f"{i}: {args.validation_prompt}") for i, im in enumerate(images)]}
            )
    return images, grid


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


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None, stats=None) -> str:
    """``accelerator.save_state`` into ``checkpoint-<step>``, written beside it and renamed when complete, so an
    interrupted save never leaves a half checkpoint for ``--resume_from_checkpoint latest`` to pick."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    staging = os.path.join(output_dir, f".checkpoint-{step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    if stats is not None:
        stats.save_state(staging, accelerator.process_index)
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


def export_soda(models: dict, rank: int | None, folder: str) -> dict:
    """The diffusers file of SODA adapters: per component ``peft_ortho.tuners.soda.soda_lora_state_dict`` (the best
    rank-``rank`` LoRA of each layer's dense delta, or the exact one for ``rank=None``), written with
    ``write_diffusers_file``. Returns ``{component: SodaExportReport}``."""
    from peft_ortho.diffusers_lora import write_diffusers_file
    from peft_ortho.tuners.soda.lora_conversion import soda_lora_state_dict

    tensors, metadata, configs, reports = {}, {}, {}, {}
    for component, model in models.items():
        tensors[component], metadata[component], reports[component] = soda_lora_state_dict(model, rank=rank)
        configs[component] = {**model.peft_config["default"].to_dict(), "soda_export": reports[component].to_dict()}
    write_diffusers_file(folder, tensors, metadata, adapter_configs=configs, adapter="default")
    return reports


def _soda_note(rank: int | None, reports: dict) -> str:
    from peft_ortho.tuners.soda.lora_conversion import SodaExportReport

    every = SodaExportReport(
        rank=rank, layers={f"{c}.{k}": v for c, r in reports.items() for k, v in r.layers.items()}
    )
    if rank is None:
        return (
            f"`{DIFFUSERS_WEIGHT_NAME}` is the SODA adapter exported **exactly** (a full-rank LoRA per layer, no "
            "approximation)."
        )
    return (
        f"`{DIFFUSERS_WEIGHT_NAME}` is the SODA adapter **approximated** by its best rank-{rank} LoRA per layer: "
        f"relative error ‖ΔW − BA‖/‖ΔW‖ = {every.relative_error:.3g} over all layers, {every.max_layer_error:.3g} in "
        "the worst layer (`--soda_export_rank exact` exports it without error). The peft adapter is exact."
    )


def save_outputs(args: argparse.Namespace, models: dict, statistics=None, grid=None, log=print) -> dict:
    """Write the adapter(s), the diffusers file, the statistics, the validation grid and the model card into
    ``args.output_dir``; return ``{"files", "diffusers_note"}``.

    ``models``: ``{"unet": PeftModel, "text_encoder": ..., "text_encoder_2": ...}``. ``statistics``: the
    :class:`Statistics` recorder (already summed over processes) or ``None``. ``grid``: the final validation grid
    (a PIL image) or ``None``. Everything is staged in a temporary folder inside ``output_dir`` and moved in only
    once complete; the ``checkpoint-*`` folders beside it are left alone.
    """
    import peft_ortho
    from peft_ortho.errors import UnsupportedAdapterError

    os.makedirs(args.output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".final-", dir=args.output_dir)
    try:
        for component, model in models.items():
            # save_embedding_layers=False: no embedding is adapted; "auto" would look for the base's config.json.
            folder = staging if component == "unet" else os.path.join(staging, component)
            model.save_pretrained(folder, save_embedding_layers=False)
        if statistics is not None:
            statistics.save(staging)
        diffusers_note = soda_note = None
        target = os.path.join(staging, ".diffusers")
        try:
            if args.adapter == "soda":
                reports = export_soda(models, args.soda_export_rank, target)
                soda_note = _soda_note(args.soda_export_rank, reports)
                log(soda_note.replace("**", "").replace("`", ""))
            else:
                peft_ortho.save_diffusers(models, target)
            os.replace(os.path.join(target, DIFFUSERS_WEIGHT_NAME), os.path.join(staging, DIFFUSERS_WEIGHT_NAME))
            shutil.rmtree(target)
        except UnsupportedAdapterError as e:
            diffusers_note = f"no {DIFFUSERS_WEIGHT_NAME}: {e}"
            log(f"note: {diffusers_note}")
        if grid is not None:
            grid.save(os.path.join(staging, VALIDATION_GRID))
        card = peft_ortho.model_card(
            models["unet"].peft_config["default"],
            base_model=args.pretrained_model_name_or_path,
            extra_tags=["dreambooth", "text-to-image", "diffusers-training"]
            + (["stable-diffusion-xl"] if "text_encoder_2" in models or args.is_sdxl else []),
            summary=_card_summary(args, models, diffusers_note or soda_note, grid is not None),
            repo_id=args.hub_model_id,
            diffusers_weight_name=None if diffusers_note else DIFFUSERS_WEIGHT_NAME,
        )
        card.data.instance_prompt = args.instance_prompt
        if grid is not None:  # the Hub shows it as the model's sample (diffusers' cards do the same)
            card.data.widget = [{"text": args.validation_prompt, "output": {"url": VALIDATION_GRID}}]
        card.save(os.path.join(staging, "README.md"))  # replaces the generic card peft's save_pretrained wrote
        written = sorted(os.listdir(staging))
        _replace_into(staging, args.output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"files": written, "diffusers_note": diffusers_note}


def _card_summary(args: argparse.Namespace, models: dict, note: str | None, has_grid: bool) -> str:
    encoders = [c for c in TEXT_ENCODERS if c in models]
    lines = [
        f"DreamBooth adapter for the prompt `{args.instance_prompt}`, trained with peft-ortho's "
        f"`examples/train_dreambooth.py` (`--adapter {args.adapter}`) on the "
        f"{'SDXL ' if args.is_sdxl else ''}UNet"
        + (f" and {' and '.join(f'`{c}`' for c in encoders)}" if encoders else "")
        + ".",
    ]
    if has_grid:
        lines += ["", f"![{args.validation_prompt}]({VALIDATION_GRID})", "", f"*`{args.validation_prompt}`*"]
    lines += [
        "",
        "| setting | value |",
        "|---|---|",
        f"| instance prompt | `{args.instance_prompt}` |",
        f"| steps × batch × accumulation | {args.max_train_steps} × {args.train_batch_size} × "
        f"{args.gradient_accumulation_steps} per process |",
        f"| learning rate | {args.learning_rate} ({args.lr_scheduler})"
        + (f", text encoders {args.text_encoder_lr}" if encoders else "")
        + " |",
        f"| resolution | {args.resolution} ({'center' if args.center_crop else 'random'} crops"
        + (", random flips" if args.random_flip else "")
        + ") |",
    ]
    if args.with_prior_preservation:
        lines.append(
            f"| prior preservation | `{args.class_prompt}`, {args.num_class_images} class images, "
            f"weight {args.prior_loss_weight}"
            + (", target: the base's prediction" if args.prior_loss_target == "base" else "")
            + " |"
        )
    if args.erasure:
        foreign = f"`{args.class_prompt}`" if args.class_prompt else f"{len(args.foreign_prompts)} foreign prompts"
        lines.append(f"| output erasure | {foreign}, p = {args.erasure_p}, weight {args.erasure_weight} |")
    if args.statistics:
        lines += [
            "",
            f"`{STATISTICS_FILE}` holds the input statistics recorded during training (per adapted layer: concept"
            + (", prior" if args.with_prior_preservation else "")
            + " and unconditional inputs); `peft_ortho.compose` uses them for behaviour-preserving merges.",
        ]
    for c in encoders:
        lines += ["", f"The adapter of `{c}` is in `{c}/` (load it onto `pipe.{c}`)."]
    if note:
        lines += ["", f"Note: {note}"]
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
    is uploaded as it is (adapters, statistics, diffusers file, card, validation grid; not the checkpoints), with the
    same ``create_repo`` + ``upload_folder`` calls. ``api``: an ``HfApi`` (or
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
        allow_patterns=[
            f"{prefix}{name}"
            for prefix in ("", *(f"{c}/" for c in TEXT_ENCODERS))
            for name in ("adapter_config.json", "adapter_model.safetensors", STATISTICS_FILE)
        ]
        + ["README.md", DIFFUSERS_WEIGHT_NAME, VALIDATION_GRID],
    )


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------


class Statistics:
    """``peft_ortho.InputStatistics`` of every adapted component, recorded one batch kind at a time.

    ``record(kind, components)`` opens ``InputStatistics.record(kind)`` on the named components (default: all);
    ``save(folder)`` sums over processes (a collective: every process calls it) and writes the UNet's
    ``adapter_statistics.safetensors`` into ``folder`` and each text encoder's into ``folder/<component>/``.
    """

    def __init__(self, models: dict):
        from peft_ortho import InputStatistics

        self.stats = {name: InputStatistics(model) for name, model in models.items()}

    @contextlib.contextmanager
    def record(self, kind: str, components=None):
        with contextlib.ExitStack() as stack:
            for name in components or self.stats:
                stack.enter_context(self.stats[name].record(kind))
            yield

    def all_reduce(self) -> None:
        for s in self.stats.values():
            s.all_reduce()

    def digest(self) -> str:
        """SHA-256 of every recorded moment (call after ``all_reduce``)."""
        tensors = {}
        for name, s in self.stats.items():
            for layer, kinds in s.statistics().layers.items():
                for kind, m in kinds.items():
                    for field in ("gram", "basis", "values"):
                        if getattr(m, field) is not None:
                            tensors[f"{name}/{layer}/{kind}/{field}"] = getattr(m, field)
        return tensors_digest(tensors)

    def save(self, folder: str) -> None:
        for name, s in self.stats.items():
            s.save_pretrained(folder if name == "unet" else os.path.join(folder, name))

    # Checkpoints hold each process's running sums as they are (float64, not yet summed over processes:
    # ``InputStatistics.state_dict``), so that a resumed run ends with bit-identical statistics.
    def save_state(self, folder: str, rank: int) -> None:
        from safetensors.torch import save_file

        tensors = {
            f"{name}|{key}": value.detach().cpu().contiguous()
            for name, s in self.stats.items()
            for key, value in s.state_dict().items()
        }
        os.makedirs(os.path.join(folder, "statistics"), exist_ok=True)
        path = os.path.join(folder, "statistics", f"rank{rank}.safetensors")
        save_file(tensors, path, metadata={"format": "peft-ortho/input-statistics-state"})

    def load_state(self, folder: str, rank: int, device) -> None:
        from safetensors.torch import load_file

        path = os.path.join(folder, "statistics", f"rank{rank}.safetensors")
        if not os.path.isfile(path):
            raise ValueError(
                f"checkpoint {folder!r} holds no statistics of process {rank} ({path} is missing): resume with the "
                "number of processes and the statistics setting it was made with, or pass --no_statistics"
            )
        by_component: dict[str, dict] = {name: {} for name in self.stats}
        for key, tensor in load_file(path).items():
            name, _, inner = key.partition("|")
            if name not in self.stats:
                raise ValueError(f"checkpoint {folder!r}: statistics of an unknown component {name!r}")
            by_component[name][inner] = tensor
        for name, s in self.stats.items():
            try:
                s.load_state_dict(by_component[name], device=device)
            except ValueError as e:
                raise ValueError(f"checkpoint {folder!r}: {name}: {e}") from e


class PromptEncoder:
    """Prompts → the UNet's text conditioning, as the model's pipeline computes it.

    SD: ``context = text_encoder(ids)[0]`` ``(B, L, D)``. SDXL: the penultimate hidden states of both encoders
    concatenated ``(B, L, D1 + D2)`` and ``pooled`` = the second's projected embedding ``(B, P)``. ``train``: the
    prepared (DDP) encoders that train, by component; the others run without autograd. ``base=True`` runs them with
    their adapters off (the erasure teacher).
    """

    def __init__(self, tokenizers: dict, encoders: dict, train: dict, device, sdxl: bool, zero_uncond: bool):
        self.tokenizers, self.encoders, self.train = tokenizers, encoders, train
        self.device, self.sdxl, self.zero_uncond = device, sdxl, zero_uncond

    def _ids(self, name: str, prompts: list[str]):
        tok = self.tokenizers[name]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return ids.input_ids.to(self.device)

    def __call__(self, prompts: list[str], base: bool = False):
        import torch

        from peft_ortho.erasure import adapters_disabled

        hidden, pooled = [], None
        for name, encoder in self.encoders.items():
            trains = name in self.train and not base
            module = self.train[name] if trains else encoder
            with contextlib.ExitStack() as stack:
                if not trains:
                    stack.enter_context(torch.no_grad())
                if base and name in self.train:
                    stack.enter_context(adapters_disabled(encoder))
                if not self.sdxl:
                    return module(self._ids(name, prompts))[0], None
                out = module(self._ids(name, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled embedding
        return torch.cat(hidden, dim=-1), pooled


class DreamBoothObjective:
    """The loss of one optimizer step on one process, a function of (seed, step, process) and the weights only.

    Per micro-batch ``m`` of ``--gradient_accumulation_steps`` and per sample number ``k`` (:func:`sample_numbers`),
    a generator seeded by ``(seed, kind, k)`` draws the sample's view of its image (crop, flip), ``z0 ~ N(μ, σ²)`` of
    the VAE posterior of that view, ``ε ~ N(0, I)``, ``t ~ U{0..T-1}`` and (instance samples) the erasure swap;
    ``z_t = √ᾱ_t z0 + √(1-ᾱ_t) ε``, target ``ε`` (or the velocity ``√ᾱ_t ε − √(1-ᾱ_t) z0``). The step's loss is
    ``(1/G) Σ_m [ mse(instance) + w · mse(class) ]`` with ``w = --prior_loss_weight`` (diffusers' prior
    preservation loss), computed as one forward + backward per batch kind: DDP all-reduces the gradients once, in
    the step's last backward (``no_sync`` before it).
    """

    def __init__(self, args, accelerator, scheduler, vae, unet, prompts, instance, classes, stats, dtype, rank, world):
        self.args, self.accelerator, self.scheduler, self.vae = args, accelerator, scheduler, vae
        self.unet, self.prompts, self.instance, self.classes = unet, prompts, instance, classes
        self.stats, self.dtype, self.rank, self.world = stats, dtype, rank, world
        self.vae_dtype = next(vae.parameters()).dtype
        self.cache = {} if args.center_crop else None  # center-cropped views repeat: encode each once
        self.erasure = make_erasure(args, 0) if args.erasure else None  # its loss and teacher (swaps are per sample)
        self.batches: list[dict] = []  # what the last call trained on, for tests and logs

    # -- data

    def _latents(self, images: ImageSet, views: list[tuple]):
        """Posterior ``(mean, std)`` of the views ``(i, top, left, flip)``, scaled, ``(B, 4, h, w)`` float32."""
        import torch

        todo = [v for v in views if self.cache is None or v not in self.cache]
        if todo:
            pixels = torch.stack([images.view(*v) for v in todo]).to(self.accelerator.device, self.vae_dtype)
            with torch.no_grad():
                dist = self.vae.encode(pixels).latent_dist
            s = self.vae.config.scaling_factor
            encoded = {v: (dist.mean[j].float() * s, dist.std[j].float() * s) for j, v in enumerate(todo)}
            if self.cache is None:
                return torch.stack([encoded[v][0] for v in views]), torch.stack([encoded[v][1] for v in views])
            self.cache.update(encoded)
        return torch.stack([self.cache[v][0] for v in views]), torch.stack([self.cache[v][1] for v in views])

    def batch(self, kind: str, micro: int) -> dict:
        """The samples of ``kind`` (``"instance"`` or ``"class"``) of this process at micro-step ``micro``."""
        import torch

        args, device = self.args, self.accelerator.device
        images = self.instance if kind == "instance" else self.classes
        ks = sample_numbers(micro, self.rank, args.train_batch_size, self.world)
        gens = [torch.Generator().manual_seed(derived_seed(args.seed, kind, k)) for k in ks]
        index = [sample_index(k, len(images), args.seed, kind) for k in ks]
        views = [(i, *images.draw_view(i, g, args.center_crop, args.random_flip)) for i, g in zip(index, gens)]
        mean, std = self._latents(images, views)
        T = self.scheduler.config.num_train_timesteps
        z0, noise, t = [], [], []
        for g, m in zip(gens, mean):
            z0.append(torch.randn(m.shape, generator=g))
            noise.append(torch.randn(m.shape, generator=g))
            t.append(torch.randint(0, T, (1,), generator=g))
        latents = mean + std * torch.stack(z0).to(device)
        noise = torch.stack(noise).to(device)
        t = torch.cat(t).to(device)
        prompt = args.instance_prompt if kind == "instance" else args.class_prompt
        prompts, erased = [prompt] * len(ks), None
        if kind == "instance" and self.erasure is not None:
            swaps = [make_erasure(args, int(torch.randint(0, 2**62, (1,), generator=g))).swap([prompt]) for g in gens]
            prompts = [p[0] for p, _ in swaps]
            erased = torch.cat([e for _, e in swaps]).to(device)
        r = images.resolution
        time_ids = [
            [*images.original_sizes[i], top, left, r, r] for i, top, left, _ in views
        ]  # SDXL micro-conditioning: original (h, w), crop corner (top, left), target (h, w)
        return {
            "kind": kind,
            "samples": ks,
            "index": index,
            "views": views,
            "latents": latents,
            "noise": noise,
            "timesteps": t,
            "prompts": prompts,
            "erased": erased,
            "time_ids": torch.tensor(time_ids, dtype=self.dtype, device=device),
        }

    # -- model calls

    def predict(self, unet, b: dict, context, pooled, noisy=None):
        noisy = (
            self.scheduler.add_noise(b["latents"], b["noise"], b["timesteps"]).to(self.dtype)
            if noisy is None
            else noisy
        )
        extra = {}
        if pooled is not None:
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": b["time_ids"]}
        return unet(noisy, b["timesteps"], context, **extra).sample

    def target(self, b: dict):
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(b["latents"], b["noise"], b["timesteps"])
        return b["noise"]

    def _record(self, kind: str, components=None):
        return contextlib.nullcontext() if self.stats is None else self.stats.record(kind, components)

    def instance_loss(self, b: dict):
        import torch.nn.functional as F

        with self._record("concept"):
            context, pooled = self.prompts(b["prompts"])
            pred = self.predict(self.unet, b, context, pooled)
        target = self.target(b)
        if self.erasure is None:
            return F.mse_loss(pred.float(), target.float())
        erased = b["erased"]

        def teacher():
            if not self.prompts.train:  # frozen text encoders: the student's context is the base's
                ctx, pool = context, pooled
            else:
                ctx, pool = self.prompts(b["prompts"], base=True)
            sub = {**b, "timesteps": b["timesteps"][erased], "time_ids": b["time_ids"][erased]}
            noisy = self.scheduler.add_noise(b["latents"], b["noise"], b["timesteps"]).to(self.dtype)[erased]
            # The unwrapped model (same layers, adapters off): a DDP forward here would run on the ranks that erased
            # something only, and DDP's forward may hold collectives (buffer broadcasts) every rank must join.
            unet = self.accelerator.unwrap_model(self.unet)
            return self.predict(unet, sub, ctx[erased], None if pool is None else pool[erased], noisy=noisy)

        base = self.erasure.teacher(self.unet, teacher, erased=erased)
        return self.erasure.loss(pred.float(), target.float(), erased, None if base is None else base.float())

    def class_loss(self, b: dict):
        import torch.nn.functional as F

        with self._record("prior"):
            context, pooled = self.prompts(b["prompts"])
            pred = self.predict(self.unet, b, context, pooled)
        target = self.base_prediction(b) if self.args.prior_loss_target == "base" else self.target(b)
        return F.mse_loss(pred.float(), target.float())

    def base_prediction(self, b: dict):
        """``--prior_loss_target base``: the frozen base's prediction on the same noised class latents (every
        adapter off, text encoders' too; no autograd), the target that keeps the class prompt where the base has it
        instead of refitting it to the class images' noise draws."""
        import torch

        from peft_ortho.erasure import adapters_disabled

        # The unwrapped model, as the erasure teacher: no DDP forward (and its collectives) for a no-grad pass.
        unet = self.accelerator.unwrap_model(self.unet)
        context, pooled = self.prompts(b["prompts"], base=True)
        with torch.no_grad(), adapters_disabled(unet):
            return self.predict(unet, b, context, pooled)

    def record_unconditional(self, b: dict, unet) -> None:
        """The instance latents under the empty prompt, adapters on, no autograd: the "unconditional" statistics.
        Where the SDXL pipeline feeds zeros for it (``force_zeros_for_empty_prompt``) only the UNet sees it."""
        import torch

        n = len(b["samples"])
        with torch.no_grad():
            if self.prompts.zero_uncond:
                context, pooled = self.prompts([""] * n)
                context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
                with self.stats.record("unconditional", ["unet"]):
                    self.predict(unet, b, context, pooled)
            else:
                with self.stats.record("unconditional"):
                    context, pooled = self.prompts([""] * n)
                    self.predict(unet, b, context, pooled)

    def __call__(self, step: int, no_sync, plain_unet) -> float:
        """Forward + backward of every batch of optimizer step ``step``; returns the step's loss."""
        args = self.args
        G = args.gradient_accumulation_steps
        passes = []
        for j in range(G):
            micro = step * G + j
            passes.append((micro, "instance"))
            if args.with_prior_preservation:
                passes.append((micro, "class"))
        total = 0.0
        self.batches = []
        for n, (micro, kind) in enumerate(passes):
            b = self.batch(kind, micro)
            self.batches.append({k: b[k] for k in ("kind", "samples", "index", "views", "prompts")})
            last = n == len(passes) - 1
            with contextlib.nullcontext() if last else no_sync(), self.accelerator.autocast():
                if kind == "instance":
                    loss = self.instance_loss(b)
                else:
                    loss = args.prior_loss_weight * self.class_loss(b)
                self.accelerator.backward(loss / G)
            total += float(loss.detach()) / G
            if kind == "instance" and self.stats is not None:
                with self.accelerator.autocast():
                    self.record_unconditional(b, plain_unet)
        return total


def make_erasure(args: argparse.Namespace, seed: int):
    """An ``OutputErasure`` with the run's pool; ``seed`` drives its swaps."""
    from peft_ortho.erasure import OutputErasure

    pool = {"foreign_prompts": args.foreign_prompts} if args.foreign_prompts else {"class_prompt": args.class_prompt}
    return OutputErasure(p=args.erasure_p, weight=args.erasure_weight, seed=seed, **pool)


def load_components(args: argparse.Namespace, dtype) -> tuple[dict, dict, bool, bool]:
    """``(models, tokenizers, is_sdxl, zero_uncond)``: the frozen VAE, UNet and text encoder(s) of the pipeline at
    ``--pretrained_model_name_or_path``. An SDXL pipeline is recognised by a ``text_encoder_2`` in its
    ``model_index.json``."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path, load = args.pretrained_model_name_or_path, {"revision": args.revision, "variant": args.variant}
    index = DiffusionPipeline.load_config(path, revision=args.revision)
    sdxl = (index.get("text_encoder_2") or [None])[0] is not None
    tokenizers = {"text_encoder": AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=args.revision)}
    models = {"text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, **load)}
    if sdxl:
        tokenizers["text_encoder_2"] = AutoTokenizer.from_pretrained(
            path, subfolder="tokenizer_2", revision=args.revision
        )
        models["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", torch_dtype=dtype, **load
        )
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
    # SDXL's VAE overflows in fp16 (its config says force_upcast): keep it in float32 then, like its pipeline.
    models["vae"] = vae if getattr(vae.config, "force_upcast", False) else vae.to(dtype)
    models["unet"] = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **load)
    zero_uncond = sdxl and bool(index.get("force_zeros_for_empty_prompt", True))
    return models, tokenizers, sdxl, zero_uncond


def main(argv: list[str] | None = None, *, hub_api=None) -> dict:
    """Train, save, optionally push. Returns ``{"output_dir", "files", "adapter_sha256", "statistics_sha256",
    "losses", "batches", "class_images_generated", "pushed"}`` (``batches``: what the last step trained on).

    ``hub_api``: an ``HfApi`` instance for ``--push_to_hub`` (tests pass a recording one; default ``HfApi``).
    """
    args = parse_args(argv)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    import peft_ortho  # noqa: F401  (registers the peft-ortho adapter types with peft)

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
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
    instance = ImageSet(args.instance_data_dir, args.resolution)
    first_step, checkpoint = 0, None
    if args.resume_from_checkpoint:
        first_step, checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)

    path = args.pretrained_model_name_or_path
    frozen, tokenizers, args.is_sdxl, zero_uncond = load_components(args, weight_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=args.revision)
    for module in frozen.values():
        module.requires_grad_(False)
        module.to(accelerator.device)
    encoders = {c: frozen[c] for c in TEXT_ENCODERS if c in frozen}
    pipeline_parts = {**frozen, **{f"tokenizer{c[len('text_encoder') :]}": tokenizers[c] for c in encoders}}

    generated, classes = 0, None
    if args.with_prior_preservation:
        generated = generate_class_images(args, accelerator, pipeline_parts, weight_dtype, log=log)
        classes = ImageSet(args.class_data_dir, args.resolution, what="--class_data_dir", limit=args.num_class_images)
    if args.gradient_checkpointing:
        frozen["unet"].enable_gradient_checkpointing()

    unet = wrap_with_adapter(
        frozen["unet"], adapter_config(args, args.target_modules, checkpoint, "unet"), accelerator, path
    )
    models = {"unet": unet}
    if args.train_text_encoder:
        for c in encoders:
            config = adapter_config(args, args.text_encoder_target_modules, checkpoint, c)
            models[c] = encoders[c] = wrap_with_adapter(encoders[c], config, accelerator, path)
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": args.learning_rate}]
    groups += [
        {"params": [p for p in models[c].parameters() if p.requires_grad], "lr": args.text_encoder_lr}
        for c in models
        if c != "unet"
    ]
    params = [p for g in groups for p in g["params"]]
    log(
        f"{args.adapter} adapter: {sum(p.numel() for p in params):,} trainable parameters on {', '.join(models)} "
        f"({'SDXL' if args.is_sdxl else 'SD'}); {world} process(es)"
    )
    stats = Statistics(models) if args.statistics else None  # hooks on the adapted layers, before DDP wraps them

    optimizer = torch.optim.AdamW(
        groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    prepared = accelerator.prepare(*models.values(), optimizer, lr_scheduler)
    wrapped = dict(zip(models, prepared))
    optimizer, lr_scheduler = prepared[-2], prepared[-1]
    register_checkpoint_hooks(accelerator, models)

    def no_sync():
        stack = contextlib.ExitStack()
        for m in wrapped.values():
            stack.enter_context(accelerator.no_sync(m))
        return stack

    prompts = PromptEncoder(
        tokenizers,
        encoders,
        {c: wrapped[c] for c in TEXT_ENCODERS if c in wrapped},
        accelerator.device,
        args.is_sdxl,
        zero_uncond,
    )
    objective = DreamBoothObjective(
        args,
        accelerator,
        noise_scheduler,
        frozen["vae"],
        wrapped["unet"],
        prompts,
        instance,
        classes,
        stats,
        weight_dtype,
        rank,
        world,
    )

    if checkpoint is not None:
        accelerator.load_state(checkpoint)
        if stats is not None:
            stats.load_state(checkpoint, rank, accelerator.device)
        log(f"resumed from {checkpoint} (step {first_step})")
        if first_step >= args.max_train_steps:
            log(
                f"the checkpoint is at step {first_step} >= --max_train_steps {args.max_train_steps}: nothing to train"
            )
    if args.report_to != "none":
        accelerator.init_trackers("dreambooth", config={k: v for k, v in vars(args).items() if _scalar(v)})

    validation_pipe = None

    def validate(step: int, final: bool = False):
        nonlocal validation_pipe
        if validation_pipe is None:  # built only when a validation is due; it shares the training modules
            parts = {**pipeline_parts, "unet": unet.get_base_model()}
            parts.update({c: models[c].get_base_model() for c in models if c != "unet"})
            validation_pipe = make_pipeline(args, parts, weight_dtype)
        log(f"validation at step {step}: {args.num_validation_images} images of {args.validation_prompt!r}")
        return run_validation(args, accelerator, validation_pipe, step, final=final)

    validating = args.validation_prompt is not None and args.num_validation_images > 0
    losses: list[float] = []
    progress = tqdm(
        range(first_step, args.max_train_steps),
        initial=first_step,
        total=args.max_train_steps,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    for step in progress:
        loss = objective(step, no_sync, unet)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        accelerator.log({"loss": loss, "lr": lr_scheduler.get_last_lr()[0]}, step=step + 1)
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < args.max_train_steps:
            saved = save_checkpoint(accelerator, args.output_dir, step + 1, args.checkpoints_total_limit, stats)
            log(f"saved {saved}")
        if validating and (step + 1) % args.validation_steps == 0 and step + 1 < args.max_train_steps:
            if accelerator.is_main_process:
                validate(step + 1)
            accelerator.wait_for_everyone()
    progress.close()

    if first_step < args.max_train_steps:
        # The final state is a checkpoint too: a later run can train further from it.
        save_checkpoint(accelerator, args.output_dir, args.max_train_steps, args.checkpoints_total_limit, stats)
    digest = adapter_digest(models["unet"])
    for c in models:
        if c != "unet":
            digest = hashlib.sha256((digest + adapter_digest(models[c])).encode()).hexdigest()
    stats_digest = None
    if stats is not None:
        stats.all_reduce()  # every process: afterwards all hold the same sums
        stats_digest = stats.digest()
    if args.debug_dump_adapter_hash:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, f"adapter_hash-rank{rank}.json"), "w") as f:
            dump = {"rank": rank, "world_size": world, "sha256": digest, "statistics_sha256": stats_digest}
            json.dump({**dump, "losses": losses}, f)

    result = {
        "output_dir": args.output_dir,
        "files": [],
        "adapter_sha256": digest,
        "statistics_sha256": stats_digest,
        "losses": losses,
        "batches": objective.batches,
        "class_images_generated": generated,
        "pushed": None,
    }
    if accelerator.is_main_process:
        grid = validate(args.max_train_steps, final=True)[1] if validating else None
        saved = save_outputs(args, models, stats, grid, log=log)
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


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


if __name__ == "__main__":
    main(sys.argv[1:])
