"""SODA → LoRA conversion: a SODA adapter as a standard LoRA that plain diffusers (or any LoRA loader) can load.

A SODA adapter changes each layer by a dense ``ΔW = (W0 + S) R − W0`` that is in general full-rank, and diffusers has
no path for full-rank deltas. So the export writes, per layer,

- ``rank=k``: the best rank-``k`` approximation (Eckart–Young): ``ΔW ≈ B A`` with ``B = U_k diag(s_k)``,
  ``A = V_kᵀ`` from the SVD of ``ΔW``. Its relative error ``‖ΔW − B A‖_F / ‖ΔW‖_F = √(Σ_{i>k} s_i²) / √(Σ_i s_i²)``
  is reported per layer and overall (``√(Σ_layers discarded) / √(Σ_layers ‖ΔW‖²)``);
- ``rank=None``: exactly, as a LoRA of rank ``min(out, in)`` with an identity on the smaller side (``A = I``,
  ``B = ΔW`` when ``in ≤ out``; ``A = ΔW``, ``B = I`` otherwise). No SVD, no approximation; the file is about the
  size of the adapted weights.

Scale 1 everywhere (``lora_alpha = r``, per-layer ranks in ``rank_pattern``/``alpha_pattern``).
``peft_ortho.save_diffusers`` calls this conversion for SODA adapters (through ``SodaModel.lora_state_dict``, as
SODA's facts say: ``LoraExport.SVD``); ``export_lora`` is the same export returning the error report. The file is
written with ``peft_ortho.diffusers_lora.write_diffusers_file`` (atomic, finite tensors, metadata diffusers'
``LoraConfig`` accepts).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ...diffusers_lora import convert_by_svd, write_diffusers_file
from ...lora_format import DIFFUSERS_WEIGHT_NAME


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
    """A SODA adapter's layers as LoRA factors, and the error report.

    Args:
        model: a ``PeftModel`` or ``SodaModel`` holding the SODA adapter ``adapter_name``.
        adapter_name: the adapter to convert.
        rank: each layer's LoRA rank (best rank-``k`` approximation); None for exact (rank ``min(out, in)``).
        dtype: of the written tensors (default: each base weight's dtype).

    Returns:
        ``(tensors, metadata, report)``: component-relative ``<module>.lora_A.weight``/``lora_B.weight`` tensors in
        peft's LoRA shapes (convs: ``A`` ``(r, C_in, kh, kw)``, ``B`` ``(out, r, 1, 1)``), plain ``LoraConfig``
        fields, and the :class:`SodaExportReport`.
    """
    tuner = getattr(model, "base_model", model)
    if not callable(getattr(tuner, "soda_layers", None)):  # SodaModel (its module imports this one)
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

    ``peft_ortho.save_diffusers(model, out_dir, svd_rank=rank)`` writes the same file (and a model card); this
    function returns the report instead of the path.

    Args:
        model: a ``PeftModel`` (or ``SodaModel``) holding the SODA adapter, on its base weights.
        out_dir: the folder to write (empty or absent unless ``overwrite``).
        adapter_name: the adapter to export.
        rank: ``k``: best rank-``k`` LoRA per layer, error reported (lossy); ``None``: exact (rank ``min(out, in)``).
        component: the pipeline attribute the model is (``"unet"``, ``"transformer"``, ``"text_encoder"``); inferred
            from the model when None (``peft_ortho.lora_format.infer_component``), and checked against it when given.
        dtype: of the written tensors (default: each base weight's dtype).
        overwrite: replace a non-empty ``out_dir``.
        weight_name: the file name.

    Returns:
        The report, with ``path`` set to the written file.
    """
    tensors, metadata, provenance, component, report = convert_by_svd(
        model, component, adapter_name=adapter_name, svd_rank=rank, dtype=dtype
    )
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
