"""The kohya LoRA file (A1111 / ComfyUI / Civitai): ``save_kohya`` and the writer it shares with merges.

Keys are diffusers' ``convert_state_dict_to_kohya`` layout (``lora_unet_<module>.lora_down.weight`` / ``lora_up``
and ``.alpha``); the adapters are read as for the diffusers file (``peft_ortho.diffusers_lora``), so every tuner
that exports losslessly to a LoRA exports here too, its scale folded into ``lora_up``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from diffusers.utils import convert_state_dict_to_kohya
from safetensors.torch import save_file

from ._io import atomic_dir, check_finite, check_output
from .diffusers_lora import (
    checked_metadata,
    collect_diffusers_lora,
    diffusers_lora_metadata,
    fold_scale,
    group_lora_modules,
    resolve_dtype,
)
from .errors import UnsupportedAdapterError
from .lora_format import with_text_model_level

__all__ = ["KOHYA_WEIGHT_NAME", "save_kohya", "write_kohya_file"]

KOHYA_WEIGHT_NAME = "lora.safetensors"
_KOHYA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def write_kohya_file(
    out_dir: str | os.PathLike,
    tensors_by_component: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    overwrite: bool = False,
    weight_name: str = KOHYA_WEIGHT_NAME,
    dtype: str | torch.dtype | None = None,
    card: str | None = None,
    inputs: Iterable[str | os.PathLike] = (),
) -> str:
    """Write scale-1 LoRA factors as one kohya-format file (``out_dir/lora.safetensors``) and return its path.

    Keys are converted with diffusers' ``convert_state_dict_to_kohya`` (``lora_unet_<module>.lora_down.weight`` /
    ``lora_up`` and ``.alpha = r``), after two fix-ups the kohya readers need: CLIP layers get their ``text_model.``
    level back, and a single text encoder (SD1.x) is ``lora_te_`` as sd-scripts writes it (``lora_te1_``/``lora_te2_``
    are SDXL's two). Only SD1.x / SDXL parts (``unet``, ``text_encoder``, ``text_encoder_2``) have a kohya layout
    here; others are refused.

    Args:
        out_dir: the folder to write; empty or absent unless ``overwrite``.
        tensors_by_component: ``{"unet": {"<module>.lora_A.weight": A, ...}, "text_encoder": {...}}`` whose scale is
            1 (``ΔW = B A``: merged factors, or scale-folded ones).
        overwrite: replace a non-empty ``out_dir``.
        weight_name: the file name.
        dtype: ``"fp16"``, ``"bf16"``, ``"fp32"`` (default the tensors' own).
        card: text of a ``README.md`` written beside the file.
        inputs: paths the tensors were read from, which ``out_dir`` may not be, contain or lie inside.

    Returns:
        The absolute path of the written file.
    """
    check_output(out_dir, inputs)
    target_dtype = resolve_dtype(dtype)
    peft_keys: dict[str, torch.Tensor] = {}
    for component, tensors in tensors_by_component.items():
        if component not in _KOHYA_COMPONENTS:
            raise UnsupportedAdapterError(
                f"component {component!r} has no kohya SD/SDXL layout (kohya export covers {_KOHYA_COMPONENTS}); "
                "export it with save_diffusers",
                layer=component,
            )
        group_lora_modules(tensors, component)  # lora_A/lora_B keys only
        for key, value in tensors.items():
            value = value.detach().to("cpu")
            peft_keys[with_text_model_level(f"{component}.{key}")] = (
                value.to(target_dtype) if target_dtype else value
            ).contiguous()
    check_finite(peft_keys)
    kohya = convert_state_dict_to_kohya(peft_keys)
    if "text_encoder_2" not in tensors_by_component:
        kohya = {
            k.replace("lora_te1_", "lora_te_", 1) if k.startswith("lora_te1_") else k: v for k, v in kohya.items()
        }
    value_dtype = next(iter(peft_keys.values())).dtype
    kohya = {k: (v.to(value_dtype) if k.endswith(".alpha") else v).contiguous() for k, v in kohya.items()}
    if os.path.basename(weight_name) != weight_name or not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name must be a plain '*.safetensors' file name, got {weight_name!r}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(
            kohya, os.path.join(tmp, weight_name), metadata={"format": "pt", "ss_network_module": "networks.lora"}
        )
        if card is not None:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card)
    return os.path.join(os.path.abspath(os.fspath(out_dir)), weight_name)


def save_kohya(
    model_or_dir,
    out_dir: str | os.PathLike,
    component: str | None = None,
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
    weight_name: str = KOHYA_WEIGHT_NAME,
    dtype: str | torch.dtype | None = None,
) -> str:
    """Write one adapter (or ``{component: adapter}``) as a kohya-format file for A1111 / ComfyUI / Civitai.

    Each layer's scale is folded into ``lora_up`` (kohya's ``alpha`` is then ``r``), at the cost of one rounding per
    weight.

    Args:
        model_or_dir: as for ``save_diffusers`` (SD1.x / SDXL UNet and CLIP text encoders).
        out_dir: the folder to write; empty or absent unless ``overwrite``.
        component: the pipeline attribute; inferred when None.
        adapter_name: the adapter to export.
        overwrite: replace a non-empty ``out_dir``.
        weight_name: the file name.
        dtype: ``"fp16"``, ``"bf16"``, ``"fp32"`` (default the adapter's own).

    Returns:
        The path of ``out_dir/lora.safetensors``.
    """
    sources = list(model_or_dir.items()) if isinstance(model_or_dir, Mapping) else [(component, model_or_dir)]
    inputs = [os.fspath(s) for _, s in sources if isinstance(s, (str, os.PathLike))]
    check_output(out_dir, inputs)  # before anything is read
    tensors_by_component = {}
    for comp, source in sources:
        tensors, config, name, comp = collect_diffusers_lora(source, comp, adapter_name=adapter_name)
        meta = checked_metadata(comp, tensors, diffusers_lora_metadata(config, adapter=name), name)
        tensors_by_component[comp], _ = fold_scale(tensors, meta, comp)
    return write_kohya_file(
        out_dir, tensors_by_component, overwrite=overwrite, weight_name=weight_name, dtype=dtype, inputs=inputs
    )
