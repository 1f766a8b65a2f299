"""Saving a merge: a PEFT adapter folder, a diffusers LoRA file or a kohya file (fusing is in ``merging.fuse``)."""

from __future__ import annotations

import os

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from .._io import atomic_dir, check_finite
from ..diffusers_lora import resolve_dtype, write_diffusers_file
from ..errors import IncompatibleAdaptersError
from ..kohya_lora import write_kohya_file
from ..lora_format import PEFT_PREFIX, infer_component
from .merge import MergedLayer


def lora_tensors(
    layers: dict[str, MergedLayer], svd_rank: int | None = None, dtype: torch.dtype | None = None
) -> tuple[dict, dict[str, int]]:
    """``{"<layer>.lora_A.weight": A, "<layer>.lora_B.weight": B}`` in peft's stored shapes, and rank per layer.

    ``dtype``: the dtype to store (default the merge's float32); values it cannot hold are refused by layer.
    """
    tensors, ranks = {}, {}
    for name, layer in layers.items():
        A, B = layer.factors(svd_rank)
        a_shape, b_shape = layer.stored_shapes(A.shape[0])
        tensors[f"{name}.lora_A.weight"] = A.reshape(a_shape).to(dtype or A.dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = B.reshape(b_shape).to(dtype or B.dtype).contiguous()
        ranks[name] = A.shape[0]
    if dtype is not None:
        check_finite(tensors)  # e.g. a large merged B overflowing float16
    return tensors, ranks


def lora_config(
    ranks: dict[str, int], base_model: str | None, fan_in_fan_out: bool = False, task_type: str | None = None
):
    """A plain ``peft.LoraConfig`` for the merged factors: scale 1 (weights and alphas live in ``B``).

    Every layer may have its own rank (Σ of the ranks of the adapters that touch it), so each gets an exact
    ``rank_pattern``/``alpha_pattern`` entry anchored on its full module name. ``task_type``: the sources' (e.g.
    ``CAUSAL_LM``, so ``AutoPeftModelForCausalLM`` loads the merge).
    """
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{name.replace('.', '[.]')}$": r for name, r in ranks.items() if r != common}
    return LoraConfig(
        r=common,
        lora_alpha=common,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        base_model_name_or_path=base_model,
        fan_in_fan_out=fan_in_fan_out,
        task_type=task_type,
    )


def lora_config_dict(ranks: dict[str, int], base_model: str | None, fan_in_fan_out: bool = False) -> dict:
    """``lora_config(...)`` as the dict ``adapter_config.json`` holds (``peft_type: LORA``, sorted targets)."""
    out = lora_config(ranks, base_model, fan_in_fan_out).to_dict()
    out["peft_type"] = "LORA"
    out["target_modules"] = sorted(ranks)
    return out


def save_peft_folder(
    folder: str,
    layers: dict[str, MergedLayer],
    base_model,
    svd_rank,
    card_text: str,
    fan_in_fan_out=False,
    task_type=None,
    dtype=None,
) -> None:
    tensors, ranks = lora_tensors(layers, svd_rank, dtype)
    check_finite(tensors)
    save_file({PEFT_PREFIX + k: v for k, v in tensors.items()}, os.path.join(folder, "adapter_model.safetensors"))
    lora_config(ranks, base_model, fan_in_fan_out, task_type).save_pretrained(folder)  # adapter_config.json
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card_text)


def save_peft(
    out_dir,
    by_component,
    base_model,
    svd_rank,
    card_text,
    overwrite=False,
    fan_in_fan_out=False,
    *,
    task_type=None,
    dtype=None,
    inputs=(),
) -> str:
    """One PEFT adapter; with several components (unet + text_encoder), one sub-folder each.

    ``inputs``: the merged adapters' paths, which ``out_dir`` may not be, contain or lie inside.
    """
    dtype = resolve_dtype(dtype)
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        if len(by_component) == 1:
            (layers,) = by_component.values()
            save_peft_folder(tmp, layers, base_model, svd_rank, card_text, fan_in_fan_out, task_type, dtype)
        else:
            for component, layers in by_component.items():
                sub = os.path.join(tmp, component or "model")
                os.makedirs(sub)
                save_peft_folder(sub, layers, base_model, svd_rank, card_text, fan_in_fan_out, task_type, dtype)
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card_text)
    return os.path.abspath(out_dir)


def _named_components(by_component, default_component) -> dict[str, dict[str, MergedLayer]]:
    """PEFT-folder layers (component None) go to ``default_component``, inferred from their names when None."""
    out: dict[str, dict[str, MergedLayer]] = {}
    for component, layers in by_component.items():
        if component is None:
            component = infer_component(modules=list(layers), given=default_component)
        if component in out:
            raise IncompatibleAdaptersError(f"two parts of the merge are for component {component!r}")
        out[component] = layers
    return out


def save_diffusers_file(
    out_dir,
    by_component,
    default_component,
    svd_rank,
    overwrite=False,
    *,
    pipeline=None,
    dtype=None,
    card=None,
    inputs=(),
) -> str:
    dtype = resolve_dtype(dtype)
    tensors_by_component, metadata_by_component = {}, {}
    for component, layers in _named_components(by_component, default_component).items():
        tensors, ranks = lora_tensors(layers, svd_rank, dtype)
        tensors_by_component[component] = tensors
        metadata_by_component[component] = lora_config_dict(ranks, None)
    return write_diffusers_file(
        out_dir,
        tensors_by_component,
        metadata_by_component,
        overwrite=overwrite,
        pipeline=pipeline,
        card=card,
        inputs=inputs,
    )


def save_kohya_file(
    out_dir, by_component, default_component, svd_rank, overwrite=False, *, dtype=None, card=None, inputs=()
) -> str:
    dtype = resolve_dtype(dtype)
    tensors_by_component = {
        component: lora_tensors(layers, svd_rank, dtype)[0]  # scale 1: alpha = r in the kohya file
        for component, layers in _named_components(by_component, default_component).items()
    }
    return write_kohya_file(out_dir, tensors_by_component, overwrite=overwrite, card=card, inputs=inputs)
