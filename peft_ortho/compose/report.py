"""Interference between adapters, measured per layer and per pair.

For adapters ``i`` and ``j`` on a layer (``ΔW_k = w_k s_k B_k A_k``):

- **basis overlap** ``‖A_i A_jᵀ‖_F / sqrt(r_i r_j)``: 0 when the down-projections read orthogonal subspaces (disjoint
  orthogonal slots); for orthonormal rows sharing ``k`` rows it is ``sqrt(k) / r``.
- **crosstalk** ``‖ΔW_j A_iᵀ‖_F / ‖ΔW_i A_iᵀ‖_F``: how strongly adapter ``j`` responds to the input directions
  adapter ``i`` reads, relative to ``i``'s own response. Aggregated over layers as a ratio of root sums of squares.
- **sign conflicts**: among the weights both deltas change, the fraction where they push in opposite directions
  (what TIES resolves; zero by construction for disjoint blocks).

Overlap and crosstalk use only the small ``r × r`` Gram blocks ``A_i A_jᵀ`` (no ``out × in`` product); sign
conflicts need the deltas and are computed only when asked for (``sign_conflicts=True``).
"""

from __future__ import annotations

import json
import math
import warnings

import torch

from .._io import atomic_file
from .load import Adapter


class Report:
    """Pairwise interference numbers. ``str(report)`` is a short summary; ``to_json()`` has everything."""

    def __init__(self, adapters: list[Adapter], weights: list[float], method: str, *, sign_conflicts: bool = True):
        self.names = [a.name for a in adapters]
        self.input_paths = [a.source.path for a in adapters]  # files written from the report never replace these
        self.method = method
        self.layers: dict[str, dict] = {}
        n = len(adapters)
        num = torch.zeros(n, n, dtype=torch.float64)  # Σ_layers ‖ΔW_j A_iᵀ‖² at [i, j]
        den = torch.zeros(n, dtype=torch.float64)  # Σ_layers ‖ΔW_i A_iᵀ‖²
        conflicts = torch.zeros(n, n, dtype=torch.float64)
        conflict_layers = torch.zeros(n, n, dtype=torch.float64)
        all_layers = sorted({layer for a in adapters for layer in a.layers()}, key=lambda x: (x[0] or "", x[1]))
        for layer in all_layers:
            owners = [i for i, a in enumerate(adapters) if layer in a.layer_keys]
            factors = {i: adapters[i].factors(layer, dtype=torch.float64) for i in owners}
            Bs = {i: f.B * (weights[i] * f.scale) for i, f in factors.items()}
            entry = {"overlap": {}, "crosstalk": {}}
            for i in owners:
                own = torch.linalg.matrix_norm(Bs[i] @ (factors[i].A @ factors[i].A.t())).item() ** 2
                den[i] += own
                for j in owners:
                    if i == j:
                        continue
                    gram = factors[j].A @ factors[i].A.t()  # (r_j, r_i)
                    cross = torch.linalg.matrix_norm(Bs[j] @ gram).item() ** 2
                    num[i, j] += cross
                    key = f"{self.names[i]} <- {self.names[j]}"
                    entry["crosstalk"][key] = math.sqrt(cross / own) if own > 0 else (0.0 if cross == 0 else math.inf)
                    if i < j:
                        r = math.sqrt(factors[i].rank * factors[j].rank)
                        entry["overlap"][f"{self.names[i]} | {self.names[j]}"] = (
                            torch.linalg.matrix_norm(gram).item() / r
                        )
            if sign_conflicts and len(owners) > 1:
                deltas = {i: Bs[i] @ factors[i].A for i in owners}
                entry["sign_conflicts"] = {}
                for a_pos, i in enumerate(owners):
                    for j in owners[a_pos + 1 :]:
                        both = (deltas[i] != 0) & (deltas[j] != 0)
                        total = int(both.sum())
                        frac = float(((deltas[i] * deltas[j] < 0) & both).sum()) / total if total else 0.0
                        entry["sign_conflicts"][f"{self.names[i]} | {self.names[j]}"] = frac
                        conflicts[i, j] += frac
                        conflict_layers[i, j] += 1
            self.layers[layer[1] if layer[0] is None else f"{layer[0]}.{layer[1]}"] = entry
        # Pairwise aggregates; crosstalk[i, j]: j's effect on i's directions.
        self.crosstalk = torch.where(den[:, None] > 0, (num / den[:, None].clamp_min(1e-300)).sqrt(), num.sqrt())
        self.crosstalk.fill_diagonal_(0.0)
        upper = conflicts / conflict_layers.clamp_min(1)
        self.sign_conflicts = upper + upper.t()

    def max_overlap(self) -> float:
        return max((v for e in self.layers.values() for v in e["overlap"].values()), default=0.0)

    def max_crosstalk(self) -> tuple[float, str, str]:
        """Largest per-layer crosstalk, with the pair and the layer."""
        best = (0.0, "", "")
        for layer, e in self.layers.items():
            for pair, v in e["crosstalk"].items():
                if v > best[0]:
                    best = (v, pair, layer)
        return best

    def to_dict(self) -> dict:
        return {
            "adapters": self.names,
            "method": self.method,
            "pairwise_crosstalk": self.crosstalk.tolist(),
            "pairwise_sign_conflicts": self.sign_conflicts.tolist(),
            "max_overlap": self.max_overlap(),
            "layers": self.layers,
        }

    def to_json(self, path: str | None = None, *, overwrite: bool = False) -> str:
        """The report as JSON text; with ``path``, also written there (atomically; an existing file only with
        ``overwrite``; never over or inside one of the adapters it describes)."""
        text = json.dumps(self.to_dict(), indent=2, default=float)
        if path is not None:
            with atomic_file(path, overwrite, inputs=self.input_paths) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def __str__(self) -> str:
        n = len(self.names)
        value, pair, layer = self.max_crosstalk()
        off = ~torch.eye(n, dtype=torch.bool)
        lines = [
            f"peft-ortho merge report: {n} adapter(s), {len(self.layers)} layer(s), method={self.method}",
            f"  max basis overlap      {self.max_overlap():.3g}   (0 = orthogonal down-projections)",
            f"  max layer crosstalk    {value:.3g}" + (f"   ({pair} at {layer})" if pair else ""),
        ]
        if n > 1:
            lines.append(f"  mean pair crosstalk    {self.crosstalk[off].mean().item():.3g}")
            lines.append(f"  mean sign conflicts    {self.sign_conflicts[off].mean().item():.3g}")
            lines.append("  crosstalk (row i: effect of column j on i's input directions, all layers):")
            width = max(len(s) for s in self.names)
            for i, name in enumerate(self.names):
                row = " ".join(f"{self.crosstalk[i, j].item():7.3g}" for j in range(n))
                lines.append(f"    {name:<{width}} {row}")
        return "\n".join(lines)

    def plot(self, path: str, *, overwrite: bool = False) -> str:
        """Heatmap PNG of the pairwise crosstalk (needs matplotlib: ``pip install peft-ortho[plot]``).

        Written atomically; an existing ``path`` is replaced only with ``overwrite``, never an input adapter.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("the heatmap needs matplotlib: pip install 'peft-ortho[plot]'") from e
        n = len(self.names)
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1.0 + 0.5 * n))
        im = ax.imshow(self.crosstalk.numpy(), cmap="magma", vmin=0)
        ax.set_xticks(range(n), self.names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), self.names, fontsize=8)
        ax.set_xlabel("adapter j (source)")
        ax.set_ylabel("adapter i (directions read)")
        ax.set_title("crosstalk ‖ΔW_j A_iᵀ‖ / ‖ΔW_i A_iᵀ‖", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        try:
            with warnings.catch_warnings():  # long names: "tight layout not applied" is cosmetic, not the user's
                warnings.simplefilter("ignore")
                fig.tight_layout()
                with atomic_file(path, overwrite, inputs=self.input_paths) as tmp:
                    fig.savefig(tmp, dpi=120)
        finally:
            plt.close(fig)
        return path
