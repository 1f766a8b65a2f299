"""Fusing a merge into a model's weights: ``W ← W + ΔW``, every layer found and checked before the first changes."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import IncompatibleAdaptersError
from ..lora_format import find_module
from .merge import MergedLayer


def fuse_targets(model: nn.Module, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, bool]]:
    """Find every layer's weight in ``model`` and check its ``(out, in)`` before anything is modified."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    targets = {}
    for name, shape in shapes.items():
        module = find_module(model, name)
        if module is None:
            raise IncompatibleAdaptersError(f"the model has no module {name!r}", layer=name)
        module = getattr(module, "base_layer", module)
        weight = getattr(module, "weight", None)
        if weight is None:
            raise IncompatibleAdaptersError(f"{type(module).__name__} has no weight to fuse into", layer=name)
        transposed = _is_conv1d(module)  # transformers' Conv1D stores W as (in, out)
        out_f, in_f = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight[0].numel())
        if (out_f, in_f) != tuple(shape):
            raise IncompatibleAdaptersError(
                f"ΔW has shape {tuple(shape)} but the model's weight is {(out_f, in_f)}: wrong base model", layer=name
            )
        targets[name] = (weight, transposed)
    return targets


@torch.no_grad()
def check_fusable(weight: torch.Tensor, transposed: bool, layer: MergedLayer, *, layer_name: str) -> None:
    """Refuse, before anything is changed, a fusion whose result would not be finite in the weight's dtype.

    A bound decides cheaply: ``max|W + ΔW| ≤ max|W| + max_i Σ_k |B_ik| · max|A|`` (stacked) or ``+ max|ΔW|``
    (delta). Only when the bound exceeds half the dtype's largest value is the fused weight computed into a scratch
    copy and checked exactly.
    """
    limit = torch.finfo(weight.dtype).max
    if layer.delta is not None:
        bound = float(layer.delta.abs().max().double()) if layer.delta.numel() else 0.0
    elif layer.A.numel() and layer.B.numel():
        bound = float(layer.B.abs().double().sum(1).max()) * float(layer.A.abs().max().double())
    else:
        bound = 0.0
    if weight.numel():
        bound += float(weight.detach().abs().max().double())
    if math.isfinite(bound) and bound <= limit / 2:
        return
    scratch = weight.detach().clone()
    fuse_layer(scratch, transposed, layer)
    if not bool(torch.isfinite(scratch).all()):
        raise IncompatibleAdaptersError(
            f"fusing would make {int((~torch.isfinite(scratch)).sum())} weight(s) non-finite in {weight.dtype} "
            f"(largest finite value {limit:.6g}): the merged update is too large for this model's dtype. Nothing "
            "was changed; fuse into a float32 model or lower the weights",
            layer=layer_name,
        )


@torch.no_grad()
def fuse_layer(weight: torch.Tensor, transposed: bool, layer: MergedLayer) -> None:
    """``W ← W + ΔW`` in place: one GEMM (``W.addmm_(B, A)``) for stacked factors."""
    if layer.delta is not None:
        delta = layer.delta.to(weight.device, weight.dtype)
        weight += delta.t() if transposed else delta.reshape(weight.shape)
        return
    A, B = layer.A.to(weight.device, weight.dtype), layer.B.to(weight.device, weight.dtype)
    W = weight.t() if transposed else weight.view(weight.shape[0], -1)  # (out, in) views of the same storage
    if layer.blocks is None:
        W.addmm_(B, A)
        return
    # BlockLoRA adapters: each updates only its block (N times fewer multiply-adds than the padded stack).
    kernel = math.prod(layer.a_shape[2:])  # kh·kw for convs, 1 otherwise
    col = 0
    for rank, block in zip(layer.ranks, layer.blocks):
        Bi, Ai = B[:, col : col + rank], A[col : col + rank]
        col += rank
        if block is None:
            W.addmm_(Bi, Ai)
        elif block[0] == "out":
            W[block[1] : block[2]].addmm_(Bi[block[1] : block[2]], Ai)
        else:
            start, end = block[1] * kernel, block[2] * kernel  # input channels → flattened (C_in·kh·kw) columns
            W[:, start:end].addmm_(Bi, Ai[:, start:end])


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)
