"""The BlockLoRA layer: a LoRA that stores, trains and applies only one block of its layer's update.

Along ``"out"`` the adapter computes ``s · B A x`` for its ``block_out`` output channels and adds it into that slice
of the base output; along ``"in"`` it reads only its ``block_in`` input channels, ``s · B A x[block]``. Either way
it does no more work than a LoRA of the same rank (strictly less: one factor is block-sized), and merging writes
only the block's weights.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...errors import AdapterFileError
from .._layers import Conv1D


def layer_widths(base_layer: nn.Module) -> tuple[int, int, int]:
    """``(out, in, kernel elements)``: the widths blocks split (channels for convs) and ``kh·kw`` (1 if not a conv)."""
    if isinstance(base_layer, nn.Conv2d):
        kh, kw = base_layer.kernel_size
        return base_layer.out_channels, base_layer.in_channels, kh * kw
    if Conv1D and isinstance(base_layer, Conv1D):
        n_in, n_out = base_layer.weight.shape
        return n_out, n_in, 1
    return base_layer.out_features, base_layer.in_features, 1


class BlockLoraLayer(nn.Module, BaseTunerLayer):
    """Wraps one ``nn.Linear`` / ``nn.Conv2d`` / ``Conv1D`` with any number of named block adapters.

    Per adapter: ``lora_A[name]`` (``Linear(in | block_in → r)`` or the conv ``Conv2d(C_in | block_in → r, k×k)``),
    ``lora_B[name]`` (``Linear(r → out | block_out)`` or ``1×1 Conv2d``), ``scaling[name] = lora_alpha / r``,
    ``block_span[name] = (start, end)`` and ``block_axis[name]``.

    Args:
        base_layer: the layer to adapt.
        **kwargs: ignored (peft's tuner-layer signature).
    """

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "block_span", "block_axis")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.block_span: dict[str, tuple[int, int]] = {}
        self.block_axis: dict[str, str] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.is_conv = isinstance(base, nn.Conv2d)
        self.fan_in_fan_out = bool(Conv1D) and isinstance(base, Conv1D)  # weight stored as (in, out)
        self.out_features, self.in_features, self.kernel_numel = layer_widths(base)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool,
        block_axis: str,
        block_span: tuple[int, int],
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``: factors that cover only its block of the layer.

        Args:
            adapter_name: the peft adapter name.
            r: rank of the factors.
            lora_alpha: the scale is ``lora_alpha / r``, as peft's LoRA.
            lora_dropout: dropout probability on the block's inputs.
            init_lora_weights: ``True``: ``B = 0`` (peft's default); ``False``: random ``B`` (tests).
            block_axis: ``"out"`` (``B`` writes output rows ``block_span``) or ``"in"`` (``A`` reads input columns).
            block_span: ``(start, end)`` of the block on ``block_axis``.
            inference_mode: freeze the new factors.
        """
        start, end = block_span
        size = end - start
        n_out = size if block_axis == "out" else self.out_features
        n_in = size if block_axis == "in" else self.in_features
        base = self.get_base_layer()
        if self.is_conv:
            self.lora_A[adapter_name] = nn.Conv2d(
                n_in, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
            )
            self.lora_B[adapter_name] = nn.Conv2d(r, n_out, 1, bias=False)
        else:
            self.lora_A[adapter_name] = nn.Linear(n_in, r, bias=False)
            self.lora_B[adapter_name] = nn.Linear(r, n_out, bias=False)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.block_axis[adapter_name] = block_axis
        self.block_span[adapter_name] = (start, end)
        self.reset_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_lora_weights: bool = True) -> None:
        """LoRA's initialisation: ``A`` Kaiming-uniform, ``B = 0`` so the adapted layer starts equal to the base.

        Args:
            adapter_name: the adapter.
            init_lora_weights: False draws ``B`` at random too (for tests).
        """
        nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        else:  # for tests: a non-trivial adapter from the start
            nn.init.normal_(self.lora_B[adapter_name].weight, std=1.0 / self.r[adapter_name])

    # ------------------------------------------------------------------------------------------- the update as weights

    def block_delta(self, adapter_name: str) -> tuple[tuple[slice, ...], torch.Tensor]:
        """The adapter's update as ``weight[index] += delta``: only the block is materialised.

        Args:
            adapter_name: the adapter.

        Returns:
            ``(index, delta)``: ``delta`` is ``s · B A`` in the base weight's layout: ``(block_out, in)`` /
            ``(out, block_in)`` for Linear, transposed for Conv1D, ``(block_out, C_in, kh, kw)`` /
            ``(out, block_in, kh, kw)`` for Conv2d.
        """
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        start, end = self.block_span[adapter_name]
        delta = (B.flatten(1) @ A.flatten(1)) * self.scaling[adapter_name]
        if self.is_conv:
            delta = delta.reshape(B.shape[0], *A.shape[1:])
        axis_dim = 0 if self.block_axis[adapter_name] == "out" else 1
        if self.fan_in_fan_out:
            delta, axis_dim = delta.t(), 1 - axis_dim
        index = (slice(None),) * axis_dim + (slice(start, end),)
        return index, delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The full-size ``ΔW`` in the base weight's layout, zero outside the block (for inspection and conversion).

        Args:
            adapter_name: the adapter.

        Returns:
            ``ΔW``, shaped like the base weight.
        """
        weight = self.get_base_layer().weight
        index, delta = self.block_delta(adapter_name)
        full = torch.zeros(weight.shape, dtype=delta.dtype, device=delta.device)
        full[index] = delta
        return full

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the adapters' blocks into the base weight (only the block's entries are written).

        Args:
            safe_merge: check the merged weights are finite before writing them.
            adapter_names: the adapters to merge (default: the active ones).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            index, delta = self.block_delta(name)
            delta = delta.to(weight.dtype)
            if safe_merge:
                merged = weight.data[index] + delta
                if not torch.isfinite(merged).all():
                    raise AdapterFileError(
                        "NaNs detected in the merged weights: the adapter seems to be broken", adapter=name
                    )
                weight.data[index] = merged
            else:
                weight.data[index] += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                index, delta = self.block_delta(name)
                weight.data[index] -= delta.to(weight.dtype)

    # --------------------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        channel = 1 if self.is_conv else -1  # where channels live: (N, C, H, W) for convs, (..., features) otherwise
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            start, end = self.block_span[name]
            h = self._cast_input_dtype(x, A.weight.dtype)
            if self.block_axis[name] == "in":
                h = h.narrow(channel, start, end - start)
                result = result + B(A(self.lora_dropout[name](h))) * self.scaling[name]
            else:
                # In place on the block's slice of the fresh base output: nothing larger than the block is built.
                # (The base op does not save its output for backward, so autograd allows this.)
                delta = B(A(self.lora_dropout[name](h))) * self.scaling[name]
                result.narrow(channel, start, end - start).add_(delta.to(result.dtype))
        return result.to(result_dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "block_lora." + super().__repr__()
