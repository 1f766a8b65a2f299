"""Per-layer work of the orthogonal tuner: pick the basis rows, write them into ``lora_A``, freeze it.

The adapter layers themselves are peft's LoRA layers (``peft.tuners.lora.Linear`` / ``Conv2d``); an
orthogonal adapter *is* a standard LoRA whose ``lora_A`` happens to be frozen basis rows, which is what
lets it export losslessly to every format that reads LoRAs.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from ... import bases
from ...errors import BasisError, BasisMismatchError


def resolve_rows(config, n: int, r: int, adapter_name: str, layer_name: str) -> list[int]:
    """The basis rows this adapter uses on an ``n``-wide layer of rank ``r``, recorded in ``config.basis_rows``."""
    if r > n:
        raise BasisError(
            f"rank {r} is larger than the {n} rows of this layer's basis (input width {n}); lower r or "
            "use rank_pattern for this layer",
            adapter=adapter_name,
            layer=layer_name,
        )
    key = bases.shape_key(n, r)
    recorded = (config.basis_rows or {}).get(key)
    if config.concept_id is not None:
        expected = bases.slot_rows(bases.concept_slot(config.concept_id, n, r), r)
    elif config.slot == "random":
        expected = list(recorded) if recorded is not None else bases.random_rows(n, r)
    else:
        slots = bases.num_slots(n, r)
        if config.slot >= slots:
            raise BasisError(
                f"slot {config.slot} is out of range: a layer of input width {n} at rank {r} has {slots} "
                f"disjoint slots (0..{slots - 1})",
                adapter=adapter_name,
                layer=layer_name,
            )
        expected = bases.slot_rows(config.slot, r)
    if recorded is not None and list(recorded) != expected:
        raise BasisMismatchError(
            f"the config records basis rows {list(recorded)[:4]}... for shape {key}, but its slot choice gives "
            f"{expected[:4]}...",
            adapter=adapter_name,
            layer=layer_name,
        )
    if len(set(expected)) != r or min(expected) < 0 or max(expected) >= n:
        raise BasisMismatchError(
            f"invalid basis rows recorded for shape {key}", adapter=adapter_name, layer=layer_name
        )
    config.basis_rows = {**(config.basis_rows or {}), key: expected}
    return expected


def expected_basis(config, n: int, r: int, adapter_name: str, layer_name: str, a64=None) -> torch.Tensor:
    """Float64 ``(r, n)`` down-projection for this layer, checked against the checksum the config records.

    ``a64``: the rows already generated (compose generates every adapter's rows of one width in one batched pass).
    """
    rows = resolve_rows(config, n, r, adapter_name, layer_name)
    if a64 is None:
        a64 = bases.basis_rows(config.basis, config.basis_seed, n, rows)
        digest = bases.basis_checksum(config.basis, config.basis_seed, n, rows)
    else:
        digest = bases.checksum(a64)
    key = bases.shape_key(n, r)
    recorded = (config.basis_checksums or {}).get(key)
    if recorded is not None and recorded != digest:
        raise BasisMismatchError(
            f"stored basis checksum {recorded} does not match the basis regenerated from basis_seed="
            f"{config.basis_seed}, basis={config.basis!r}, algorithm={config.basis_algorithm!r} ({digest}) for "
            f"shape {key}: the adapter was made with a different basis or its config was edited",
            adapter=adapter_name,
            layer=layer_name,
        )
    config.basis_checksums = {**(config.basis_checksums or {}), key: digest}
    return a64


# Float dtypes a ``lora_A`` may have been rounded to on its way to a file: a model trained in float32 and then moved
# with ``.double()``, or to bfloat16 and back to float32, stores the basis rounded to the narrower dtype in the wider
# one. Such a tensor still holds exactly the named basis, so loading must accept it.
_ROUNDING_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def matches_basis(tensor: torch.Tensor, a64: torch.Tensor) -> bool:
    """Whether ``tensor`` is, bit for bit, the float64 basis ``a64`` rounded to some float dtype (then stored as is)."""
    t = tensor.detach().cpu()
    a64 = a64.reshape(t.shape)
    if torch.equal(t, a64.to(t.dtype)):
        return True
    return any(torch.equal(t, a64.to(d).to(t.dtype)) for d in _ROUNDING_DTYPES if d != t.dtype)


def freeze_lora_A(module: LoraLayer, adapter_name: str) -> None:
    """Declare ``lora_A`` frozen through peft's own mechanism, so ``set_adapter`` & co. keep it frozen."""
    frozen = dict(module.frozen_peft_weight_names)  # instance copy: never mutate the class-level default
    frozen[adapter_name] = tuple(dict.fromkeys((*frozen.get(adapter_name, ()), "lora_A")))
    module.frozen_peft_weight_names = frozen
    module._freeze_non_trainable_peft_weights(adapter_name)


def init_orthogonal_lora(module: LoraLayer, adapter_name: str, config, layer_name: str) -> None:
    """Write the shared basis into ``lora_A[adapter_name]`` (cast at the end), zero ``lora_B``, freeze ``lora_A``."""
    write_basis(module, adapter_name, config, layer_name)
    weight = module.lora_B[adapter_name].weight
    if not weight.is_meta and config.init_lora_weights is not False:
        with torch.no_grad():
            weight.zero_()
    freeze_lora_A(module, adapter_name)


def write_basis(module: LoraLayer, adapter_name: str, config, layer_name: str) -> None:
    """Copy the float64 basis into ``lora_A[adapter_name]``, rounded once to the weight's current dtype."""
    weight = module.lora_A[adapter_name].weight  # (r, in) for Linear/Conv1D, (r, C_in, kh, kw) for Conv2d
    r, n = weight.shape[0], weight[0].numel()
    a64 = expected_basis(config, n, r, adapter_name, layer_name)
    if not weight.is_meta:  # meta: low_cpu_mem_usage loading, the values come from the checkpoint
        with torch.no_grad():
            weight.copy_(a64.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))
