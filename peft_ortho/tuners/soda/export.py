"""Export a SODA adapter as a standard LoRA that plain diffusers (or any LoRA loader) can load.

A SODA adapter changes each layer by a dense ``ΔW = (W0 + S) R − W0`` that is in general full-rank, and diffusers has
no path for full-rank deltas. So the export writes, per layer,

- ``rank=k``: the best rank-``k`` approximation (Eckart–Young): ``ΔW ≈ B A`` with ``B = U_k diag(s_k)``,
  ``A = V_kᵀ`` from the SVD of ``ΔW``. Its relative error ``‖ΔW − B A‖_F / ‖ΔW‖_F = √(Σ_{i>k} s_i²) / √(Σ_i s_i²)``
  is reported per layer and overall (``√(Σ_layers discarded) / √(Σ_layers ‖ΔW‖²)``);
- ``rank=None``: exactly, as a LoRA of rank ``min(out, in)`` with an identity on the smaller side (``A = I``,
  ``B = ΔW`` when ``in ≤ out``; ``A = ΔW``, ``B = I`` otherwise). No SVD, no approximation; the file is about the
  size of the adapted weights.

Scale 1 everywhere (``lora_alpha = r``, per-layer ranks in ``rank_pattern``/``alpha_pattern``). The file is written
with ``peft_ortho.export.write_diffusers_file`` (atomic, finite tensors, metadata diffusers' ``LoraConfig`` accepts).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ...export import DIFFUSERS_WEIGHT_NAME, write_diffusers_file


@dataclass
class SodaExportReport:
    """Per-layer ranks and relative Frobenius errors of an export, and the overall relative error."""

    rank: Optional[int]
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    path: Optional[str] = None

    @property
    def relative_error(self) -> float:
        """``√(Σ discarded energy) / √(Σ ‖ΔW‖_F²)`` over all layers (0 for an exact export or an all-zero delta)."""
        total = sum(v["norm"] ** 2 for v in self.layers.values())
        lost = sum((v["relative_error"] * v["norm"]) ** 2 for v in self.layers.values())
        return math.sqrt(lost / total) if total > 0 else 0.0

    @property
    def max_layer_error(self) -> float:
        return max((v["relative_error"] for v in self.layers.values()), default=0.0)

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "relative_error": self.relative_error,
            "max_layer_error": self.max_layer_error,
            "layers": self.layers,
        }

    def __str__(self) -> str:
        mode = "exact" if self.rank is None else f"rank {self.rank}"
        lines = [f"SODA → LoRA export ({mode}): overall relative error {self.relative_error:.3g}"]
        worst = sorted(self.layers.items(), key=lambda kv: -kv[1]["relative_error"])[:5]
        lines += [f"  {name}: rank {int(v['rank'])}, relative error {v['relative_error']:.3g}" for name, v in worst]
        return "\n".join(lines)


def _lora_factors(delta: torch.Tensor, rank: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(A, B, r, relative error)`` with ``B A ≈ delta`` (2-D, float64)."""
    out_f, in_f = delta.shape
    norm = torch.linalg.matrix_norm(delta).item()
    if rank is None:
        if in_f <= out_f:
            return torch.eye(in_f, dtype=delta.dtype), delta, in_f, 0.0
        return delta, torch.eye(out_f, dtype=delta.dtype), out_f, 0.0
    r = min(rank, out_f, in_f)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    lost = torch.sqrt((s[r:] ** 2).sum()).item()
    return vh[:r], u[:, :r] * s[:r], r, (lost / norm if norm > 0 else 0.0)


@torch.no_grad()
def soda_lora_state_dict(
    model, adapter_name: str = "default", rank: Optional[int] = 16, dtype: Optional[torch.dtype] = None
) -> tuple[dict[str, torch.Tensor], dict, SodaExportReport]:
    """``(tensors, metadata, report)``: component-relative ``<module>.lora_A.weight``/``lora_B.weight`` tensors in
    peft's LoRA shapes (convs: ``A`` ``(r, C_in, kh, kw)``, ``B`` ``(out, r, 1, 1)``), plain ``LoraConfig`` fields, and
    the error report. ``model``: a ``PeftModel`` or ``SodaModel`` holding the SODA adapter ``adapter_name``.
    ``dtype``: of the written tensors (default: each base weight's dtype)."""
    from .model import SodaModel

    tuner = model.base_model if hasattr(model, "base_model") and isinstance(model.base_model, SodaModel) else model
    if not isinstance(tuner, SodaModel):
        raise TypeError(f"expected a PeftModel/SodaModel with SODA adapters, got {type(model).__name__}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None (exact), got {rank!r}")
    layers = {n: m for n, m in tuner.soda_layers().items() if adapter_name in m.soda_spectrum}
    if not layers:
        raise ValueError(f"no SODA layer holds an adapter named {adapter_name!r}")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    report = SodaExportReport(rank=rank)
    for name, layer in sorted(layers.items()):
        w0 = layer.original_weight()
        out_dtype = dtype or w0.dtype
        delta = layer.get_delta_weight(adapter_name, dtype=torch.float64).cpu()
        a, b, r, err = _lora_factors(delta.reshape(delta.shape[0], -1), rank)
        if delta.ndim == 4:  # conv: A is a conv with the base kernel shape, B a 1×1 conv
            a, b = a.reshape(r, *delta.shape[1:]), b.reshape(delta.shape[0], r, 1, 1)
        tensors[f"{name}.lora_A.weight"] = a.to(out_dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = b.to(out_dtype).contiguous()
        ranks[name] = r
        report.layers[name] = {"rank": r, "relative_error": err, "norm": torch.linalg.vector_norm(delta).item()}
    base_rank = rank if rank is not None else max(ranks.values())
    pattern = {n: r for n, r in ranks.items() if r != base_rank}
    metadata = {
        "r": base_rank,
        "lora_alpha": base_rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(layers),
    }
    return tensors, metadata, report


def export_lora(
    model,
    out_dir: str | os.PathLike,
    *,
    adapter_name: str = "default",
    rank: Optional[int] = 16,
    component: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
) -> SodaExportReport:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` (for ``pipe.load_lora_weights(out_dir)``) from a SODA
    adapter and return the :class:`SodaExportReport` (also stored in the file's ``peft_ortho_adapter_config``).

    ``rank=k``: best rank-``k`` LoRA per layer, error reported; ``rank=None``: exact (rank ``min(out, in)``).
    ``component``: the pipeline attribute the model is (``"unet"``, ``"transformer"``, ``"text_encoder"``); inferred
    from the model when None (``peft_ortho.lora_format.infer_component``), and checked against it when given. A
    truncated export (``rank=k``) is lossy: the report holds each layer's relative error.
    """
    from ...lora_format import infer_component

    component = infer_component(model, given=component, adapter=adapter_name)
    tensors, metadata, report = soda_lora_state_dict(model, adapter_name=adapter_name, rank=rank, dtype=dtype)
    config = model.peft_config[adapter_name]
    provenance = {**config.to_dict(), "soda_export": report.to_dict()}
    report.path = write_diffusers_file(
        out_dir,
        {component: tensors},
        {component: metadata},
        overwrite=overwrite,
        weight_name=weight_name,
        adapter_configs={component: provenance},
        adapter=adapter_name,
    )
    return report
