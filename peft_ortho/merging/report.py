"""What the merge will do, predicted from input statistics, and how the adapters' bases relate, per layer and pair.

**Predicted behaviour** (needs each adapter's input statistics, ``Adapter.statistics``). For a layer with merged
update ``ΔW`` and adapter ``i``'s own ``E_i = w_i ΔW_i``, on concept ``i``'s inputs ``X_i`` (second moment ``G_i``,
the concept and, when recorded, the unconditional inputs classifier-free guidance adds, averaged):

- **output change** ``‖(ΔW − E_i) X_i‖ / ‖E_i X_i‖ = sqrt(tr(D G_i Dᵀ) / tr(E_i G_i E_iᵀ))``, ``D = ΔW − E_i``:
  how far the merged layer's output on the concept's inputs is from what the adapter alone did, relative to the
  adapter's own effect. 0 keeps the concept exactly; 1 is as far off as the base model. Per concept it is
  aggregated over the layers the adapter adapts by energy, ``sqrt(Σ_l tr(D G Dᵀ) / Σ_l tr(E G Eᵀ))``.
- **predicted retention** ``1 − change²``: the share of the adapter's gain kept if each adapter's own change is
  what its concept needs (then the merged residual is ``‖D X‖²``). It is negative when the other adapters push the
  output further than the concept moved it: expect the concept to be lost.
- **drift** on ordinary inputs ``X_0`` (``G_0``: the mean of the adapters' ``"prior"`` moments):
  ``‖ΔW X_0‖ / ‖W X_0‖`` when the base weights ``W`` are known (``compose(..., base=model)``, the calibration target,
  or after ``fuse``), and always ``‖ΔW X_0‖`` relative to the single adapters' own ``rms_i ‖E_i X_0‖``.

Everything is computed from the factors (``ΔW = B A``): ``A U`` products with the sketches' bases and ``r × r``
Grams; no ``out × in`` product is formed unless a statistic is an exact Gram (small layers).

**Basis relations** (from the weights alone; they say nothing about the inputs a concept actually sees):

- **basis overlap** ``‖A_i A_jᵀ‖_F / sqrt(r_i r_j)``: 0 when the down-projections read orthogonal subspaces (disjoint
  orthogonal slots); for orthonormal rows sharing ``k`` rows it is ``sqrt(k) / r``.
- **basis response** ``‖ΔW_j A_iᵀ‖_F / ‖ΔW_i A_iᵀ‖_F``: how strongly adapter ``j`` responds to the input
  *directions* adapter ``i`` reads, relative to ``i``'s own response. It is 0 for disjoint slots whatever the
  inputs, so it is not the interference a user sees (an input of concept ``i`` still has energy in ``j``'s
  directions); that is the output change above. Aggregated over layers as a ratio of root sums of squares.
  (Called "crosstalk" in earlier versions.)
- **sign conflicts**: among the weights both deltas change, the fraction where they push in opposite directions
  (what TIES resolves; zero by construction for disjoint blocks).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable

import torch

from .._io import atomic_file
from .load import Adapter
from .merge import MergedLayer, concept_terms, statistics_key

RETENTION_WARNING = 0.5  # below this predicted retention the text report warns that the concept will be lost


def _layer_name(layer: tuple[str | None, str]) -> str:
    return layer[1] if layer[0] is None else f"{layer[0]}.{layer[1]}"


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


class _Operator:
    """``ΔW`` of one layer as factors ``B A`` (or a dense delta), with the products the traces need."""

    def __init__(self, B: torch.Tensor | None, A: torch.Tensor | None, delta: torch.Tensor | None = None):
        self.B, self.A, self.delta = B, A, delta
        self._fro2: float | None = None
        self._dense: torch.Tensor | None = None

    def times(self, V: torch.Tensor) -> torch.Tensor:
        """``ΔW V`` for ``V`` ``(in, k)``."""
        return self.delta @ V if self.delta is not None else self.B @ (self.A @ V)

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.delta if self.delta is not None else self.B @ self.A
        return self._dense

    def fro2(self) -> float:
        """``‖ΔW‖_F²`` from ``r × r`` Grams: ``Σ (BᵀB) ⊙ (AAᵀ)``."""
        if self._fro2 is None:
            if self.delta is not None:
                self._fro2 = float(self.delta.square().sum())
            else:
                self._fro2 = float(((self.B.T @ self.B) * (self.A @ self.A.T)).sum())
        return self._fro2

    def inner(self, other: _Operator) -> float:
        """``⟨ΔW, other⟩_F`` for a factored ``other`` (``tr((BᵀB_o)(A_o Aᵀ))``)."""
        if self.delta is not None:
            return float(((other.B.T @ self.delta) * other.A).sum())
        return float(((self.B.T @ other.B) * (self.A @ other.A.T)).sum())


def _quadratic(X: _Operator, Y: _Operator, terms, same: bool) -> float:
    """``tr(X G Yᵀ)`` for ``G = Σ_t c_t G_t`` (each ``G_t`` exact or ``U diag(σ) Uᵀ + ρ (I − UUᵀ)``)."""
    total = 0.0
    for coef, m in terms:
        if m.is_sketch:
            U = m.basis.to(torch.float64)
            s = m.values - m.residual
            XU = X.times(U)
            YU = XU if same else Y.times(U)
            frob = X.fro2() if same else X.inner(Y) if Y.delta is None else Y.inner(X)
            total += coef * (m.residual * frob + float((XU * YU * s).sum()))
        else:
            XG = X.dense() @ m.gram if X.delta is not None else X.B @ (X.A @ m.gram)
            total += coef * float((XG * Y.dense()).sum())
    return total


def prior_terms(adapters: list[Adapter], owners: list[int], layer) -> list:
    """``G_0`` of a layer as ``[(1/n, Moment)]``: the mean of the owners' ``"prior"`` moments (empty if none)."""
    priors = []
    for i in owners:
        stats = adapters[i].statistics
        if stats is not None:
            m = stats.moment(statistics_key(adapters[i], layer), "prior")
            if m is not None:
                priors.append(m)
    return [(1.0 / len(priors), m) for m in priors]


def base_energies(adapters: list[Adapter], weights: dict) -> dict:
    """``{layer: tr(W G_0 Wᵀ)}`` = ``‖W X_0‖²/n`` of the base weights ``{layer: (weight, transposed)}`` (views).

    Computed at once, so a later ``fuse`` into the same model does not change them.
    """
    out = {}
    owners: dict = {}
    for i, a in enumerate(adapters):
        for layer in a.layers():
            owners.setdefault(layer, []).append(i)
    for layer, idx in owners.items():
        terms = prior_terms(adapters, idx, layer)
        if terms and layer in weights:
            weight, transposed = weights[layer]
            W = weight.detach().to(torch.float64)
            W = W.t() if transposed else W.reshape(W.shape[0], -1)
            op = _Operator(None, None, W)
            out[layer] = _quadratic(op, op, terms, same=True)
    return out


class Report:
    """Predicted behaviour (from statistics) and basis relations. ``str(report)`` is a summary; ``to_json()`` all.

    Args:
        adapters, weights, method: what was merged.
        layers: ``((component, layer), MergedLayer)`` of the merge, in one pass (``MergedAdapter.iter_layers``);
            without it only the basis relations are computed.
        base_energy: ``{(component, layer): tr(W G_0 Wᵀ)}`` of the base model (``base_energies``), for the drift
            relative to ``‖W X_0‖``.
        sign_conflicts: compute sign conflicts (they need the dense deltas of every pair).

    Attributes:
        output_change: ``{adapter: {layer: change}}`` and ``concepts``: ``{adapter: {"output_change",
            "retention"}}`` for adapters with statistics; ``drift``: aggregated drift numbers (empty without
            prior statistics); ``basis_response`` ``(N, N)``: ``[i, j]`` is ``j``'s response to ``i``'s directions;
            ``sign_conflicts`` ``(N, N)``; ``layers``: per-layer entries.
    """

    def __init__(
        self,
        adapters: list[Adapter],
        weights: list[float],
        method: str,
        *,
        layers: Iterable[tuple[tuple[str | None, str], MergedLayer]] | None = None,
        base_energy: dict | None = None,
        sign_conflicts: bool = True,
    ):
        self.names = [a.name for a in adapters]
        self.input_paths = [a.source.path for a in adapters]  # files written from the report never replace these
        self.method = method
        self.layers: dict[str, dict] = {}
        self.has_base = bool(base_energy)
        n = len(adapters)
        num = torch.zeros(n, n, dtype=torch.float64)  # Σ_layers ‖ΔW_j A_iᵀ‖² at [i, j]
        den = torch.zeros(n, dtype=torch.float64)  # Σ_layers ‖ΔW_i A_iᵀ‖²
        conflicts = torch.zeros(n, n, dtype=torch.float64)
        conflict_layers = torch.zeros(n, n, dtype=torch.float64)
        with_stats = [a.statistics is not None for a in adapters]
        self.without_statistics = [a.name for a, s in zip(adapters, with_stats) if not s]
        change = torch.zeros(n, dtype=torch.float64)  # Σ_l tr(D_i G_i D_iᵀ)
        own = torch.zeros(n, dtype=torch.float64)  # Σ_l tr(E_i G_i E_iᵀ)
        drift = {"merged": 0.0, "single": 0.0, "base": 0.0, "layers": 0}
        self.output_change: dict[str, dict[str, float]] = {a.name: {} for a, s in zip(adapters, with_stats) if s}
        if layers is None:
            pairs = ((layer, None) for layer in sorted({la for a in adapters for la in a.layers()}, key=_sort_key))
        else:
            pairs = iter(layers)
        for layer, merged_layer in pairs:
            owners = [i for i, a in enumerate(adapters) if layer in a.layer_keys]
            factors = {i: adapters[i].factors(layer, dtype=torch.float64) for i in owners}
            Bs = {i: f.B * (weights[i] * f.scale) for i, f in factors.items()}
            entry = {"overlap": {}, "basis_response": {}}
            for i in owners:
                ownr = torch.linalg.matrix_norm(Bs[i] @ (factors[i].A @ factors[i].A.t())).item() ** 2
                den[i] += ownr
                for j in owners:
                    if i == j:
                        continue
                    gram = factors[j].A @ factors[i].A.t()  # (r_j, r_i)
                    cross = torch.linalg.matrix_norm(Bs[j] @ gram).item() ** 2
                    num[i, j] += cross
                    entry["basis_response"][f"{self.names[i]} <- {self.names[j]}"] = _ratio(cross, ownr)
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
            name = _layer_name(layer)
            if merged_layer is not None and any(with_stats[i] for i in owners):
                self._predict_layer(
                    entry, name, layer, merged_layer, adapters, owners, Bs, factors, base_energy, change, own
                )
                d = entry.get("drift")
                if d is not None:
                    drift["merged"] += d["_merged"]
                    drift["single"] += d["_single"]
                    drift["base"] += d.pop("_base", 0.0)
                    drift["layers"] += 1
                    del d["_merged"], d["_single"]
            self.layers[name] = entry
        # Pairwise aggregates; basis_response[i, j]: j's response to i's directions.
        self.basis_response = torch.where(den[:, None] > 0, (num / den[:, None].clamp_min(1e-300)).sqrt(), num.sqrt())
        self.basis_response.fill_diagonal_(0.0)
        upper = conflicts / conflict_layers.clamp_min(1)
        self.sign_conflicts = upper + upper.t()
        self.concepts: dict[str, dict[str, float]] = {}
        for i, a in enumerate(adapters):
            if with_stats[i] and own[i] > 0:
                c = _ratio(float(change[i]), float(own[i]))
                self.concepts[a.name] = {"output_change": c, "retention": 1.0 - c * c}
        self.drift: dict[str, float] = {}
        if drift["layers"]:
            self.drift["vs_single"] = _ratio(drift["merged"], drift["single"])
            if self.has_base and drift["base"] > 0:
                self.drift["relative"] = _ratio(drift["merged"], drift["base"])
                self.drift["single_relative"] = _ratio(drift["single"], drift["base"])
            self.drift["layers"] = drift["layers"]

    def _predict_layer(self, entry, name, layer, merged_layer, adapters, owners, Bs, factors, base, change, own):
        if merged_layer.delta is not None:
            merged = _Operator(None, None, merged_layer.delta.to(torch.float64))
        else:
            merged = _Operator(merged_layer.B.to(torch.float64), merged_layer.A.to(torch.float64))
        entry["output_change"] = {}
        singles = {}
        for i in owners:
            stats = adapters[i].statistics
            single = singles[i] = _Operator(Bs[i], factors[i].A)
            if stats is None:
                continue
            key = statistics_key(adapters[i], layer)
            concept, uncond = stats.moment(key, "concept"), stats.moment(key, "unconditional")
            if concept is None:
                continue
            terms = concept_terms({"concept": concept, "unconditional": uncond})
            e2 = _quadratic(single, single, terms, same=True)
            m2 = _quadratic(merged, merged, terms, same=True)
            cross = _quadratic(merged, single, terms, same=False)
            d2 = max(m2 - 2 * cross + e2, 0.0)  # ‖(ΔW − E_i) X_i‖² (clamped: rounding near an exact match)
            change[i] += d2
            own[i] += e2
            value = _ratio(d2, e2)
            entry["output_change"][self.names[i]] = value
            self.output_change[self.names[i]][name] = value
        terms = prior_terms(adapters, owners, layer)
        if terms:
            m2 = _quadratic(merged, merged, terms, same=True)
            s2 = sum(_quadratic(s, s, terms, same=True) for s in singles.values()) / len(singles)
            entry["drift"] = {"vs_single": _ratio(m2, s2), "_merged": m2, "_single": s2}
            if base and layer in base:
                entry["drift"]["relative"] = _ratio(m2, base[layer])
                entry["drift"]["_base"] = base[layer]

    def max_overlap(self) -> float:
        return max((v for e in self.layers.values() for v in e["overlap"].values()), default=0.0)

    def max_basis_response(self) -> tuple[float, str, str]:
        """Largest per-layer basis response, with the pair and the layer."""
        best = (0.0, "", "")
        for layer, e in self.layers.items():
            for pair, v in e["basis_response"].items():
                if v > best[0]:
                    best = (v, pair, layer)
        return best

    def worst_concept(self) -> tuple[str, float] | None:
        """The concept with the lowest predicted retention, or None without statistics."""
        if not self.concepts:
            return None
        name = min(self.concepts, key=lambda k: self.concepts[k]["retention"])
        return name, self.concepts[name]["retention"]

    def to_dict(self) -> dict:
        return {
            "adapters": self.names,
            "method": self.method,
            "concepts": self.concepts,
            "drift": self.drift,
            "without_statistics": self.without_statistics,
            "pairwise_basis_response": self.basis_response.tolist(),
            "pairwise_sign_conflicts": self.sign_conflicts.tolist(),
            "max_overlap": self.max_overlap(),
            "layers": self.layers,
        }

    def to_json(self, path: str | None = None, *, overwrite: bool = False) -> str:
        """The report as JSON text, optionally written to a file.

        Args:
            path: also write it there (atomically; never over or inside one of the adapters it describes).
            overwrite: replace an existing ``path``.

        Returns:
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=2, default=float)
        if path is not None:
            with atomic_file(path, overwrite, inputs=self.input_paths) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def _prediction_lines(self) -> list[str]:
        if not self.concepts:
            return [
                "  no input statistics: the change on each concept's inputs cannot be predicted (record statistics "
                "while training, or compose(..., calibrate=pipe, prompts=...))"
            ]
        width = max(8, *(len(k) for k in self.concepts))
        lines = [
            "  predicted from input statistics (energy-weighted over the layers each adapter adapts):",
            f"    {'concept':<{width}}  output change  retention",
        ]
        for name, c in self.concepts.items():
            lines.append(f"    {name:<{width}}  {c['output_change']:13.3g}  {c['retention']:9.3g}")
        if self.without_statistics:
            lines.append(f"    (no statistics, not predicted: {', '.join(self.without_statistics)})")
        if self.drift:
            text = f"  drift on ordinary inputs: ‖ΔW X0‖ = {self.drift['vs_single']:.3g}× a single adapter's (rms)"
            if "relative" in self.drift:
                text += (
                    f"; ‖ΔW X0‖/‖W X0‖ = {self.drift['relative']:.3g} (single adapters "
                    f"{self.drift['single_relative']:.3g})"
                )
            else:
                text += "; pass base= for ‖ΔW X0‖/‖W X0‖"
            lines.append(text)
        else:
            lines.append("  drift on ordinary inputs: not predicted (no 'prior' statistics)")
        lost = [k for k, c in self.concepts.items() if c["retention"] < RETENTION_WARNING]
        if lost:
            lines.append(
                f"  warning: predicted retention below {RETENTION_WARNING} for {len(lost)} concept(s) "
                f"({', '.join(lost[:5])}{', …' if len(lost) > 5 else ''}): expect them to be lost"
                + ("; try method='regmean'" if self.method != "regmean" else "")
            )
        return lines

    def __str__(self) -> str:
        n = len(self.names)
        value, pair, layer = self.max_basis_response()
        off = ~torch.eye(n, dtype=torch.bool)
        lines = [
            f"peft-ortho merge report: {n} adapter(s), {len(self.layers)} layer(s), method={self.method}",
            *self._prediction_lines(),
            "  basis relations (weights only; 0 for disjoint slots whatever the inputs):",
            f"  max basis overlap      {self.max_overlap():.3g}   (0 = orthogonal down-projections)",
            f"  max basis response     {value:.3g}" + (f"   ({pair} at {layer})" if pair else ""),
        ]
        if n > 1:
            lines.append(f"  mean basis response    {self.basis_response[off].mean().item():.3g}")
            lines.append(f"  mean sign conflicts    {self.sign_conflicts[off].mean().item():.3g}")
            lines.append("  basis response (row i: response of column j to i's input directions, all layers):")
            width = max(len(s) for s in self.names)
            for i, name in enumerate(self.names):
                row = " ".join(f"{self.basis_response[i, j].item():7.3g}" for j in range(n))
                lines.append(f"    {name:<{width}} {row}")
        return "\n".join(lines)

    def plot(self, path: str, *, overwrite: bool = False) -> str:
        """Heatmap PNG: predicted output change per concept and layer (with statistics), pairwise basis response.

        Needs matplotlib (``pip install peft-ortho[plot]``). Written atomically; never over an input adapter.

        Args:
            path: the PNG to write.
            overwrite: replace an existing ``path``.

        Returns:
            ``path``.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("the heatmap needs matplotlib: pip install 'peft-ortho[plot]'") from e
        n = len(self.names)
        panels = 2 if self.concepts else 1
        fig, axes = plt.subplots(1, panels, figsize=(1.2 + 0.5 * n + (6 if panels == 2 else 0), 1.0 + 0.5 * n))
        axes = [axes] if panels == 1 else list(axes)
        if self.concepts:
            ax = axes.pop(0)
            names = list(self.concepts)
            layer_names = list(self.layers)
            grid = torch.full((len(names), len(layer_names)), float("nan"))
            for r, name in enumerate(names):
                for c, layer in enumerate(layer_names):
                    v = self.output_change[name].get(layer)
                    if v is not None:
                        grid[r, c] = min(v, 2.0)
            im = ax.imshow(grid.numpy(), cmap="magma", vmin=0, vmax=max(1.0, float(grid.nan_to_num(0).max())))
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.set_xlabel("layer (merge order)")
            ax.set_title("predicted output change ‖(ΔW − E_i)X_i‖ / ‖E_i X_i‖ (clipped at 2)", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax = axes[0]
        im = ax.imshow(self.basis_response.numpy(), cmap="magma", vmin=0)
        ax.set_xticks(range(n), self.names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), self.names, fontsize=8)
        ax.set_xlabel("adapter j (responds)")
        ax.set_ylabel("adapter i (directions read)")
        ax.set_title("basis response ‖ΔW_j A_iᵀ‖ / ‖ΔW_i A_iᵀ‖", fontsize=9)
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


def _sort_key(layer: tuple[str | None, str]) -> tuple[str, str]:
    return (layer[0] or "", layer[1])
