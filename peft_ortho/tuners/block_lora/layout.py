"""Where a BlockLoRA adapter's block lives in a layer, and how its block-sized factors become a standard LoRA.

A layer ``y = W x`` with ``W ∈ R^{out×in}`` is split along one axis into ``num_blocks`` contiguous, near-equal
blocks: block ``b`` of an axis of width ``n`` is ``[⌊b·n/num_blocks⌋, ⌊(b+1)·n/num_blocks⌋)``. Along ``"out"``
a block is a range of output channels (rows of ``ΔW``); along ``"in"`` a range of input channels (columns of
``ΔW``; for a ``k×k`` conv the input *channels*, i.e. ``C_in``, so a block keeps whole kernels).

An adapter stores only its block: ``B`` ``(block_out, r)`` with ``A`` ``(r, in)`` along ``"out"``, or ``B``
``(out, r)`` with ``A`` ``(r, block_in)`` along ``"in"``. Padding the block factor with zeros gives the standard
LoRA ``ΔW = s · B A`` of the whole layer, exactly (the padding rows/columns multiply to exact zeros).
"""

from __future__ import annotations

import hashlib

import torch

from ...errors import AdapterFileError

AXES = ("out", "in")


def block_span(n: int, num_blocks: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of block ``index`` of an axis of width ``n`` split into ``num_blocks`` near-equal blocks."""
    return index * n // num_blocks, (index + 1) * n // num_blocks


def concept_block(concept_id: str, num_blocks: int) -> int:
    """Deterministic block for ``concept_id`` (SHA-256, identical on every machine and Python)."""
    digest = hashlib.sha256(concept_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_blocks


def spans_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def stored_dim(axis: str) -> tuple[str, int]:
    """Which factor holds the block and along which of its stored dimensions: B's rows or A's columns."""
    return ("lora_B", 0) if axis == "out" else ("lora_A", 1)


def pad_factor(tensor: torch.Tensor, axis: str, start: int, n: int) -> torch.Tensor:
    """The block factor (``lora_B`` for ``"out"``, ``lora_A`` for ``"in"``) zero-padded to the full width ``n``.

    Works on peft's stored shapes: ``B`` ``(block, r[, 1, 1])`` → ``(n, r[, 1, 1])``; ``A`` ``(r, block[, kh, kw])``
    → ``(r, n[, kh, kw])``. Values are copied unchanged, so the padded LoRA's ``ΔW`` equals the block's bit for bit.
    """
    dim = stored_dim(axis)[1]
    shape = list(tensor.shape)
    shape[dim] = n
    full = tensor.new_zeros(shape)
    full.narrow(dim, start, tensor.shape[dim]).copy_(tensor)
    return full


def layout_entry(n: int, start: int, end: int) -> list[int]:
    """How a layer's block is recorded in ``BlockLoraConfig.block_layout``: ``[axis width, start, end]``."""
    return [int(n), int(start), int(end)]


# Fields of a BlockLoraConfig that mean the same in a plain LoraConfig.
_LORA_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "base_model_name_or_path",
    "revision",
)


def lora_config_dict(block_config: dict) -> dict:
    """The plain ``LoraConfig`` (as a dict) of the padded LoRA equivalent to a block adapter (same ``r``, scale)."""
    out = {k: block_config[k] for k in _LORA_FIELDS if k in block_config}
    out.update(peft_type="LORA", init_lora_weights=True)
    return out


def block_entry(block_config: dict, module: str, *, adapter: str | None = None) -> tuple[int, int, int]:
    """``(width, start, end)`` the config's ``block_layout`` records for ``module``; an error if it is not listed."""
    entry = (block_config.get("block_layout") or {}).get(module)
    if entry is None:
        raise AdapterFileError("the config's block_layout does not list this layer", adapter=adapter, layer=module)
    n, start, end = (int(v) for v in entry)
    return n, start, end


def check_block_factor(
    factor: torch.Tensor, axis: str, entry: tuple[int, int, int], *, adapter: str | None, layer: str
) -> None:
    """The stored block factor must hold exactly the ``[start, end)`` channels its layout entry records."""
    kind, dim = stored_dim(axis)
    n, start, end = entry
    if factor.shape[dim] != end - start or not 0 <= start < end <= n:
        raise AdapterFileError(
            f"{kind} holds {factor.shape[dim]} block channels but the config's layout [width, start, end] = "
            f"{[n, start, end]} gives {end - start}",
            adapter=adapter,
            layer=layer,
        )


def pad_state_dict(block_config: dict, state_dict: dict, *, adapter: str | None = None) -> dict:
    """A block adapter's peft tensors → the standard LoRA tensors of the whole layers (block factor zero-padded).

    ``state_dict`` has peft keys ``[base_model.model.]<module>.lora_A.weight``; ``<module>`` must be in the config's
    ``block_layout``, whose ``[width, start, end]`` must match the stored block size.
    """
    axis = block_config.get("block_axis", "out")
    kind, _ = stored_dim(axis)
    out = {}
    for key, tensor in state_dict.items():
        if f".{kind}." not in key:
            out[key] = tensor
            continue
        module = key.removeprefix("base_model.model.").rsplit(f".{kind}.", 1)[0]
        entry = block_entry(block_config, module, adapter=adapter)
        check_block_factor(tensor, axis, entry, adapter=adapter, layer=module)
        out[key] = pad_factor(tensor, axis, entry[1], entry[0])
    return out
