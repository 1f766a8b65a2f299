"""Compatibility checks between adapters, before and during the merge pass.

Refusals raise ``IncompatibleAdaptersError`` / ``BasisMismatchError`` / ``AdapterFileError`` naming the adapter and
the layer. Situations that are merely lossy (two random orthogonal slots sharing rows) are ``CollisionWarning``s
carrying the number of shared rows.
"""

from __future__ import annotations

import itertools
import math
import warnings
from types import SimpleNamespace

import torch

from .. import bases
from .._io import all_finite, check_finite
from ..bases import ALGORITHM_VERSION
from ..errors import BasisMismatchError, IncompatibleAdaptersError
from ..tuners.ortho_lora.layer import expected_basis, matches_basis
from .load import Adapter, LayerFactors


class CollisionWarning(UserWarning):
    """Two orthogonal adapters share basis rows on some layers: each reads part of the other's input subspace there."""


def check_weights(adapters: list[Adapter], weights) -> list[float]:
    if weights is None:
        return [1.0] * len(adapters)
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
    for adapter, w in zip(adapters, weights):
        if not math.isfinite(w):
            raise IncompatibleAdaptersError(f"weight {w} is not finite", adapter=adapter.name)
    return weights


def check_configs(adapters: list[Adapter], *, allow_different_base: bool = False) -> None:
    """Checks that need only the configs: base model, basis seed and algorithm."""
    bases = [(a, a.base_model) for a in adapters if a.base_model]
    for (a, base_a), (b, base_b) in itertools.combinations(bases, 2):
        if base_a != base_b and not allow_different_base:
            raise IncompatibleAdaptersError(
                f"was trained on base model {base_a!r} but {b.name!r} on {base_b!r}; merging adapters of different "
                "bases gives garbage (pass allow_different_base=True if these names denote the same weights)",
                adapter=a.name,
            )
    check_blocks(adapters)
    ortho = [a for a in adapters if a.is_orthogonal]
    for a in ortho:
        algorithm = a.config.get("basis_algorithm")
        if algorithm != ALGORITHM_VERSION:
            raise BasisMismatchError(
                f"basis algorithm {algorithm!r} is not {ALGORITHM_VERSION!r}, the one this peft-ortho generates",
                adapter=a.name,
            )
    for a, b in itertools.combinations(ortho, 2):
        for field in ("basis", "basis_seed"):
            if a.config.get(field) != b.config.get(field):
                raise IncompatibleAdaptersError(
                    f"{field}={a.config.get(field)!r} but adapter {b.name!r} has {field}={b.config.get(field)!r}: "
                    "orthogonal adapters only read disjoint input subspaces when drawn from the same basis",
                    adapter=a.name,
                )


def check_blocks(adapters: list[Adapter]) -> None:
    """Prove from the configs that BlockLoRA adapters touch disjoint weights on every layer they share.

    Two blocks along the same axis must not overlap; blocks along different axes (rows of one, columns of the other)
    always intersect, so they are refused too. Layers of different widths mean different base models. The tensors
    are checked against these layouts when each layer is read (``Adapter.factors``).
    """
    blocks = [a for a in adapters if a.is_block]
    for a, b in itertools.combinations(blocks, 2):
        layout_a, layout_b = a.config.get("block_layout") or {}, b.config.get("block_layout") or {}
        axis_a, axis_b = a.config.get("block_axis", "out"), b.config.get("block_axis", "out")
        for layer in sorted(layout_a.keys() & layout_b.keys()):
            (n_a, start_a, end_a), (n_b, start_b, end_b) = layout_a[layer], layout_b[layer]
            if axis_a != axis_b:
                raise IncompatibleAdaptersError(
                    f"splits layers along {axis_a!r} but adapter {b.name!r} along {axis_b!r}: a row block and a "
                    "column block always share weights, so the merge would not be disjoint",
                    adapter=a.name,
                    layer=layer,
                )
            if n_a != n_b:
                raise IncompatibleAdaptersError(
                    f"has {n_a} {axis_a} channels here but adapter {b.name!r} has {n_b}: different base models",
                    adapter=a.name,
                    layer=layer,
                )
            if max(start_a, start_b) < min(end_a, end_b):
                raise IncompatibleAdaptersError(
                    f"block [{start_a}, {end_a}) overlaps block [{start_b}, {end_b}) of adapter {b.name!r} "
                    f"({axis_a} channels): both trained the same weights, so their sum is not a disjoint merge. "
                    "Retrain one with another block_index / concept_id",
                    adapter=a.name,
                    layer=layer,
                )


def shared_rows(adapters: list[Adapter]) -> dict[tuple[str, str], dict[str, int]]:
    """For each pair of orthogonal adapters, the number of basis rows they share per ``"in/r"`` shape."""
    ortho = [a for a in adapters if a.is_orthogonal]
    out = {}
    for a, b in itertools.combinations(ortho, 2):
        rows_a, rows_b = a.config.get("basis_rows") or {}, b.config.get("basis_rows") or {}
        by_width_a = {k.split("/")[0]: set(v) for k, v in rows_a.items()}
        by_width_b = {k.split("/")[0]: set(v) for k, v in rows_b.items()}
        common = {w: len(by_width_a[w] & by_width_b[w]) for w in by_width_a.keys() & by_width_b.keys()}
        common = {w: c for w, c in common.items() if c}
        if common:
            out[(a.name, b.name)] = common
    return out


def _layers_by_width(adapter: Adapter) -> dict[int, set]:
    """The adapter's layers grouped by input width (from shapes; cached on the adapter)."""
    if adapter.width_index is None:
        adapter.width_index = {}
        for layer in adapter.layers():
            adapter.width_index.setdefault(adapter.delta_shape(layer)[1], set()).add(layer)
    return adapter.width_index


def pair_basis_response(a: Adapter, b: Adapter, weights: tuple[float, float], widths: set[int]) -> float:
    """Basis response between two adapters over their common layers of the given input widths.

    The larger of the two directions of ``sqrt(Σ‖ΔW_j A_iᵀ‖²) / sqrt(Σ‖ΔW_i A_iᵀ‖²)`` (the report's definition),
    from ``r × r`` Gram blocks only.
    """
    num, den = [0.0, 0.0], [0.0, 0.0]
    by_width_a, by_width_b = _layers_by_width(a), _layers_by_width(b)
    common = [layer for w in widths for layer in by_width_a.get(w, set()) & by_width_b.get(w, set())]
    for layer in common:  # only the colliding layers are read
        fa, fb = a.factors(layer), b.factors(layer)
        Ba, Bb = fa.B * (weights[0] * fa.scale), fb.B * (weights[1] * fb.scale)
        for k, (Bi, Ai, Bj, Aj) in enumerate(((Ba, fa.A, Bb, fb.A), (Bb, fb.A, Ba, fa.A))):
            num[k] += float(torch.linalg.matrix_norm(Bj @ (Aj @ Ai.t())) ** 2)
            den[k] += float(torch.linalg.matrix_norm(Bi @ (Ai @ Ai.t())) ** 2)
    return max(math.sqrt(n / d) if d > 0 else (0.0 if n == 0 else math.inf) for n, d in zip(num, den))


def warn_collisions(adapters: list[Adapter], weights: list[float]) -> None:
    """A ``CollisionWarning`` per pair of orthogonal adapters that share basis rows, with their basis response."""
    by_name = {a.name: (a, w) for a, w in zip(adapters, weights)}
    for (a, b), common in shared_rows(adapters).items():
        (adapter_a, w_a), (adapter_b, w_b) = by_name[a], by_name[b]
        response = pair_basis_response(adapter_a, adapter_b, (w_a, w_b), {int(w) for w in common})
        detail = ", ".join(f"{c} shared rows at input width {w}" for w, c in sorted(common.items()))
        warnings.warn(
            f"adapters {a!r} and {b!r} share basis rows ({detail}): on those layers each reads part of the other's "
            f"input subspace; basis response there {response:.3g} (0 for disjoint slots; per layer in "
            "merged.report). Use distinct `slot`s or `concept_id`s to avoid it.",
            CollisionWarning,
            stacklevel=3,
        )


def check_shapes(adapters: list[Adapter], layer: tuple[str | None, str], factors: list[LayerFactors]) -> None:
    """Ranks agree within each adapter, and every adapter's ΔW (and conv kernel) has the same shape on this layer."""
    ref_name, ref = adapters[0].name, factors[0]
    for adapter, f in zip(adapters, factors):
        if f.A.shape[0] != f.B.shape[1]:
            raise IncompatibleAdaptersError(
                f"lora_A has rank {f.A.shape[0]} but lora_B has rank {f.B.shape[1]}",
                adapter=adapter.name,
                layer=layer[1],
            )
        shape, ref_shape = (f.B.shape[0], f.A.shape[1]), (ref.B.shape[0], ref.A.shape[1])
        if shape != ref_shape or f.a_shape[1:] != ref.a_shape[1:]:
            raise IncompatibleAdaptersError(
                f"ΔW has shape {shape} (kernel {f.a_shape[2:]}) but adapter {ref_name!r} has {ref_shape} (kernel "
                f"{ref.a_shape[2:]}) on the same layer: the adapters were trained on different base models",
                adapter=adapter.name,
                layer=layer[1],
            )


def check_adapter_finite(adapter: Adapter) -> None:
    """No NaN/Inf anywhere in the adapter: one reduction over its file, element-wise only to name a suspect."""
    if all_finite(adapter.tensors):
        return
    for (_, name), (a_key, b_key) in adapter.layer_keys.items():
        check_finite(
            {f"{name}.lora_A": adapter.tensors[a_key], f"{name}.lora_B": adapter.tensors[b_key]}, adapter.name
        )


def _basis_spec(adapter: Adapter) -> SimpleNamespace:
    spec = adapter.basis_spec
    if spec is None:
        cfg = adapter.config
        spec = adapter.basis_spec = SimpleNamespace(
            basis=cfg.get("basis", "orthogonal"),
            basis_seed=cfg.get("basis_seed", 0),
            basis_algorithm=cfg.get("basis_algorithm"),
            slot=cfg.get("slot"),
            concept_id=cfg.get("concept_id"),
            basis_rows=dict(cfg.get("basis_rows") or {}),
            basis_checksums=dict(cfg.get("basis_checksums") or {}),
            rows64={},  # shape key -> float64 rows, generated in one batch per width (prepare_basis_checks)
            expected={},  # (shape key, dtype) -> the verified rows in that dtype
        )
    return spec


def prepare_basis_checks(adapters: list[Adapter]) -> None:
    """Generate the basis rows every orthogonal adapter records, one batched pass per (basis, seed, width).

    Verifying N adapters then costs one butterfly pass per width instead of N; rows shared by several adapters are
    generated once.
    """
    wanted: dict[tuple[str, int, int], set[int]] = {}
    for adapter in adapters:
        if adapter.is_orthogonal:
            spec = _basis_spec(adapter)
            for key, rows in spec.basis_rows.items():
                n = int(key.split("/")[0])
                wanted.setdefault((spec.basis, int(spec.basis_seed), n), set()).update(int(i) for i in rows)
    generated = {}
    for (kind, seed, n), rows in wanted.items():
        if rows and max(rows) < n and min(rows) >= 0:  # bad rows are reported per layer by expected_basis
            order = sorted(rows)
            generated[(kind, seed, n)] = (bases.basis_rows(kind, seed, n, order), {r: i for i, r in enumerate(order)})
    for adapter in adapters:
        if adapter.is_orthogonal:
            spec = _basis_spec(adapter)
            for key, rows in spec.basis_rows.items():
                block = generated.get((spec.basis, int(spec.basis_seed), int(key.split("/")[0])))
                if block is not None:
                    spec.rows64[key] = block[0][[block[1][int(i)] for i in rows]]


def check_basis(adapter: Adapter, layer: str, factors: LayerFactors) -> None:
    """The stored ``lora_A`` must be, bit for bit, the basis rows its config records (and their checksum).

    The config-level part (rows follow from the slot, checksum matches the regenerated rows) depends only on the
    ``(in, r)`` shape, so it runs once per adapter and shape; the tensor comparison runs for every layer.
    """
    r, n = factors.A.shape
    key = bases.shape_key(n, r)
    spec = _basis_spec(adapter)
    expected = spec.expected.get((key, factors.stored_dtype))
    if expected is None:
        a64 = expected_basis(spec, n, r, adapter.name, layer, a64=spec.rows64.get(key))
        spec.rows64[key] = a64
        expected = spec.expected[(key, factors.stored_dtype)] = a64.to(factors.stored_dtype)
    # Fast path: the rows cast to the dtype the file stores. Slow path (only on a miss): the rows rounded through a
    # narrower float dtype first, as after a legitimate dtype move (trained in fp32, saved after .double()).
    stored = factors.A.to(factors.stored_dtype)
    if not torch.equal(stored, expected) and not matches_basis(stored, spec.rows64[key]):
        raise BasisMismatchError(
            "lora_A is not the basis its config records (the checkpoint was edited or mixed up)",
            adapter=adapter.name,
            layer=layer,
        )
