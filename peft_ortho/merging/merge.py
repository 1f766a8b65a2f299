"""One pass over the adapters' weights: check each layer, then stack (exact) or combine deltas (plain LoRAs).

``method="auto"`` / ``"linear"`` stack the factors, which is exact for *any* LoRAs::

    Σ_i w_i s_i B_i A_i = [w_1 s_1 B_1 … w_N s_N B_N] · [A_1; …; A_N]      (one LoRA of rank Σ r_i)

Exact means the merged ΔW equals the weighted sum of the deltas to float rounding. Whether the concepts then
*interfere* is a different question: orthogonal adapters on disjoint slots do not (``A_i A_jᵀ = 0``), plain LoRAs
generally do; ``merged.report`` measures it.

``"ties"``, ``"dare_linear"``, ``"dare_ties"`` and ``"svd"`` combine the deltas ``ΔW_i`` themselves with peft's
``merge_utils`` (peft's ``add_weighted_adapter`` applies them to A and B separately, which is not a function of
the deltas). Their result is a full-rank ΔW per layer: ``fuse`` uses it exactly, the LoRA exports re-factor it
with a truncated SVD of rank ``svd_rank`` and record the relative error per layer.

``"regmean"`` merges for behaviour, from each adapter's input statistics (``Adapter.statistics``): per layer it
solves ``min_ΔW Σ_i ‖(ΔW − w_i ΔW_i) X_i‖² + …`` in closed form (``regmean_layers``). The result is still a stacked
LoRA, ``ΔW = Σ_i B_i A'_i`` with ``A'_i = w_i s_i A_i H_i G⁻¹``, so every export works unchanged; it is not
``Σ w_i ΔW_i``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

import torch
from peft.utils import merge_utils

from ..errors import AdapterFileError, IncompatibleAdaptersError
from .check import check_adapter_finite, check_basis, check_shapes, prepare_basis_checks
from .load import Adapter

EXACT_METHODS = ("auto", "linear", "cat")
DELTA_METHODS = ("ties", "dare_linear", "dare_ties", "svd", "sequential")
# Solved from calibration forward passes of a base model (``merging.sequential``), not from the files alone.
CALIBRATED_METHODS = ("sequential",)
STATISTICS_METHODS = ("regmean",)
METHODS = EXACT_METHODS + DELTA_METHODS + STATISTICS_METHODS
PRIOR_TARGETS = ("own", "base")

# Defaults of the statistics merge, chosen by the fidelity benchmark with a rule that does not depend on N (see
# docs/compose.md "Statistics merge"): keep the base's behaviour on pooled ordinary inputs, weighted 0.3.
PRIOR_WEIGHT = 0.3  # μ: weight of the ordinary ("prior") inputs against the concepts' own
RIDGE = 1e-3  # λ, relative to the mean eigenvalue tr(G)/in of the matrix being inverted
PRIOR_TARGET = "base"
SEQUENTIAL_PRIOR_WEIGHT = 1.0  # μ of method="sequential" (merging.sequential), which has its own default
RIDGE_FLOOR = 1e-9  # added to λ: keeps the factorisation defined at ridge=0 (→ the minimum-norm solution)
_FACTOR_CACHE_BYTES = 128 << 20  # factorisations of G kept for layers that share it (bound independent of N)


class MergedLayer:
    """The merged update of one layer.

    Stacked: ``B`` ``(out, R)`` with weights and scales folded in, ``A`` ``(R, in)``; ``ΔW = B A``.
    Delta: ``delta`` ``(out, in)``; exports factor it as ``B A`` of rank ``svd_rank``.
    ``a_shape`` is the stored shape of one ``lora_A`` (conv kernels), used to write files in the layout peft expects.
    """

    __slots__ = ("A", "B", "delta", "a_shape", "b_shape", "ranks", "blocks", "svd_error", "_svd")

    def __init__(self, A=None, B=None, delta=None, a_shape=None, b_shape=None, ranks=None, blocks=None):
        self.A, self.B, self.delta = A, B, delta
        self.a_shape, self.b_shape, self.ranks = a_shape, b_shape, ranks
        # Stacked only: per adapter, None or (axis, start, end) of its BlockLoRA block; its rank columns of B (rows
        # of A) are zero outside it, which lets ``fuse`` update the block alone.
        self.blocks = blocks
        self.svd_error: float | None = None
        self._svd: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def out_features(self) -> int:
        return (self.B if self.delta is None else self.delta).shape[0]

    @property
    def in_features(self) -> int:
        return (self.A.shape[1]) if self.delta is None else self.delta.shape[1]

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` ``(out, in)`` (flattened for convs)."""
        return self.B @ self.A if self.delta is None else self.delta

    def factors(self, svd_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``ΔW ≈ B A``: the exact stack, or the truncated SVD of a delta-space merge."""
        if self.delta is None:
            return self.A, self.B
        rank = min(svd_rank or sum(self.ranks), *self.delta.shape)
        if self._svd is None or self._svd[0] != rank:  # the card and the file both need it: decompose once
            U, S, Vh = torch.linalg.svd(self.delta.float(), full_matrices=False)
            total = float(S.square().sum())
            self.svd_error = float(S[rank:].square().sum() / total) ** 0.5 if total > 0 else 0.0
            self._svd = (rank, Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous())
        return self._svd[1], self._svd[2]

    def stored_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_A``/``lora_B`` as peft stores them for this layer type, at ``rank``."""
        return (rank, *self.a_shape[1:]), (self.b_shape[0], rank, *self.b_shape[2:])


def iter_merged_layers(
    adapters: list[Adapter],
    weights: list[float],
    method: str,
    *,
    density: float = 0.5,
    majority_sign_method: str = "total",
    prior_weight: float = PRIOR_WEIGHT,
    ridge: float = RIDGE,
    prior_target: str = PRIOR_TARGET,
    dtype: torch.dtype = torch.float32,
    check: bool = True,
    merge: bool = True,
) -> Iterator[tuple[tuple[str | None, str], MergedLayer | None]]:
    """The single pass, one layer at a time: read that layer of each adapter, check it, merge it, yield it.

    Only one layer's factors are in memory at a time (for ``"regmean"`` also a cache of factorisations of ``G``
    bounded in bytes), so consumers that stream (``fuse``, validation) use memory independent of the number of adapters.
    ``merge=False`` only checks (yields ``None``); ``check=False`` skips the checks for adapters already validated.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {METHODS}")
    if method in CALIBRATED_METHODS and merge:
        raise ValueError(f"method {method!r} needs calibration forward passes: see peft_ortho.merging.sequential")
    if check:
        for adapter in adapters:
            check_adapter_finite(adapter)
        prepare_basis_checks(adapters)
    layer_owners: dict[tuple[str | None, str], list[int]] = {}
    for i, adapter in enumerate(adapters):
        for layer in adapter.layers():
            layer_owners.setdefault(layer, []).append(i)

    def read(layer, owners):
        group = [adapters[i] for i in owners]
        fs = [a.factors(layer, dtype=dtype) for a in group]  # views of the memory maps: nothing copied yet
        check_shapes(group, layer, fs)
        if check:  # finite values were checked per adapter, in one reduction over each file (check_adapter_finite)
            for adapter, f in zip(group, fs):
                if adapter.is_orthogonal:
                    check_basis(adapter, layer[1], f)
        return fs

    if method in STATISTICS_METHODS:
        options = RegMeanOptions(prior_weight, ridge, prior_target)
        pending = ((layer, owners, read(layer, owners)) for layer, owners in layer_owners.items())
        if not merge:
            for layer, owners, fs in pending:
                regmean_terms(adapters, owners, layer, fs[0].A.shape[1], options)  # statistics present and fitting
                yield layer, None
            return
        for layer, merged in regmean_layers(adapters, weights, pending, options, dtype):
            _check_merged(merged.A, layer, None, "the regmean solve")  # B'_i = B_i: the adapters' own, checked
            yield layer, merged
        return
    for layer, owners in layer_owners.items():
        fs = read(layer, owners)
        if not merge:
            yield layer, None
            continue
        ranks = [f.rank for f in fs]
        a_shape, b_shape = fs[0].a_shape, fs[0].b_shape
        group = [adapters[i] for i in owners]
        blocks = [a.block(layer) for a in group]
        blocks = [b if b is None else (b[0], b[2], b[3]) for b in blocks] if any(blocks) else None
        if method in EXACT_METHODS:
            # One copy per element: A rows concatenated, B columns written already scaled by w_i · s_i.
            A = torch.cat([f.A for f in fs])
            B = torch.empty(fs[0].B.shape[0], sum(ranks), dtype=dtype)
            col = 0
            for i, f in zip(owners, fs):
                torch.mul(f.B, weights[i] * f.scale, out=B[:, col : col + f.rank])
                col += f.rank
            if not bool(torch.isfinite(B).all()):  # finite factors can overflow once scaled: name whose did
                col = 0
                for adapter, i, f in zip(group, owners, fs):
                    what = f"lora_B × weight {weights[i]:g} × scale {f.scale:g}"
                    _check_merged(B[:, col : col + f.rank], layer, adapter.name, what)
                    col += f.rank
            yield layer, MergedLayer(A, B, None, a_shape, b_shape, ranks, blocks)
        else:
            deltas = [(f.B * f.scale) @ f.A for f in fs]
            for adapter, d in zip(group, deltas):
                _check_merged(d, layer, adapter.name, "scale × lora_B @ lora_A")
            layer_weights = torch.tensor([weights[i] for i in owners], dtype=dtype)
            delta = _combine_deltas(deltas, layer_weights, method, density, majority_sign_method)
            _check_merged(delta, layer, None, f"the {method} combination")
            yield layer, MergedLayer(None, None, delta, a_shape, b_shape, ranks)


def _check_merged(t: torch.Tensor, layer, adapter: str | None, what: str) -> None:
    """Finite inputs can still overflow once scaled: refuse a non-finite merged tensor, naming who caused it."""
    if not bool(torch.isfinite(t).all()):
        raise AdapterFileError(
            f"{what} overflows {t.dtype} ({int((~torch.isfinite(t)).sum())} non-finite value(s)): the merged "
            "adapter would be NaN/inf. Lower the weight or check the adapter's lora_alpha",
            adapter=adapter,
            layer=layer[1] if layer[0] is None else f"{layer[0]}.{layer[1]}",
        )


class RegMeanOptions:
    """``prior_weight`` μ ≥ 0, ``ridge`` λ ≥ 0 (relative to ``tr(G)/in``), ``prior_target`` ``"own"`` | ``"base"``."""

    __slots__ = ("prior_weight", "ridge", "prior_target")

    def __init__(self, prior_weight: float = PRIOR_WEIGHT, ridge: float = RIDGE, prior_target: str = PRIOR_TARGET):
        for name, value in (("prior_weight", prior_weight), ("ridge", ridge)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        if prior_target not in PRIOR_TARGETS:
            raise ValueError(f"prior_target must be one of {PRIOR_TARGETS}, got {prior_target!r}")
        self.prior_weight, self.ridge, self.prior_target = float(prior_weight), float(ridge), prior_target


def statistics_key(adapter: Adapter, layer: tuple[str | None, str]) -> str:
    """The layer's name in ``adapter.statistics``: ``name`` for PEFT folders, ``component.name`` for pipeline files."""
    component, name = layer
    stats = adapter.statistics
    if component is not None and stats is not None and f"{component}.{name}" in stats.layers:
        return f"{component}.{name}"
    return name


def layer_moments(adapter: Adapter, layer: tuple[str | None, str], in_features: int) -> dict:
    """``{"concept", "unconditional", "prior"} → Moment | None`` of one adapter's layer, checked against its width.

    Refuses (naming adapter and layer) an adapter without statistics for a layer it adapts, or without its
    ``"concept"`` moment there, or a moment of another width.
    """
    key = statistics_key(adapter, layer)
    stats = adapter.statistics
    if stats is None:
        raise IncompatibleAdaptersError(
            "carries no input statistics: the statistics merge needs them (record them while training, or pass "
            "calibrate=<pipeline> and prompts={name: prompt}; or choose method='linear')",
            adapter=adapter.name,
        )
    moments = {kind: stats.moment(key, kind) for kind in ("concept", "unconditional", "prior")}
    if moments["concept"] is None:
        raise IncompatibleAdaptersError(
            "has no 'concept' input statistics for this layer, which it adapts", adapter=adapter.name, layer=key
        )
    for kind, m in moments.items():
        if m is not None and m.in_features != in_features:
            raise IncompatibleAdaptersError(
                f"{kind!r} statistics are {m.in_features} wide but the layer's input is {in_features}",
                adapter=adapter.name,
                layer=key,
            )
    return moments


def concept_terms(moments: dict) -> list[tuple[float, object]]:
    """``G_i`` as ``[(coefficient, Moment)]``: the inputs the concept meets when it is sampled.

    With classifier-free guidance every step runs the concept's prompt and the empty prompt on the same latents,
    so when an ``"unconditional"`` moment is recorded ``G_i = (G_concept + G_unconditional) / 2``; otherwise
    ``G_i = G_concept``.
    """
    if moments["unconditional"] is None:
        return [(1.0, moments["concept"])]
    return [(0.5, moments["concept"]), (0.5, moments["unconditional"])]


def _right_multiply(terms, M: torch.Tensor) -> torch.Tensor:
    """``M Σ_t c_t G_t`` for ``M`` ``(r, in)``, without forming any ``G_t`` of a sketch.

    The sketches' bases are taken together: ``((M V) diag(c(σ−ρ))) Vᵀ + (Σ cρ) M`` with ``V = [U_1 … U_T]``, two
    products for all terms instead of two per term; exact Grams are multiplied one by one.
    """
    M = M.to(torch.float64)
    out = None
    cols, scales, diagonal = [], [], 0.0
    for coef, m in terms:
        if m.is_sketch:
            cols.append(m.basis)
            scales.append(coef * (m.values - m.residual))
            diagonal += coef * m.residual
        else:
            part = (M @ m.gram).mul_(coef)
            out = part if out is None else out.add_(part)
    if cols:
        V = cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
        part = ((M @ V).mul_(torch.cat(scales))) @ V.T
        if diagonal:
            part.add_(M, alpha=diagonal)
        out = part if out is None else out.add_(part)
    return out


def _add_dense(G: torch.Tensor, terms) -> None:
    """``G += Σ_t c_t G_t`` in place: exact Grams added, all sketches in one GEMM ``V diag(c(σ−ρ)) Vᵀ`` + ``Σ cρ I``."""
    cols, scaled = [], []
    diagonal = 0.0
    for coef, m in terms:
        if m.is_sketch:
            cols.append(m.basis)
            scaled.append(m.basis * (coef * (m.values - m.residual)))
            diagonal += coef * m.residual
        else:
            G.add_(m.gram, alpha=coef)
    if cols:
        G.addmm_(torch.cat(scaled, dim=1), torch.cat(cols, dim=1).T)
    if diagonal:
        G.diagonal().add_(diagonal)


class _MomentIndex:
    """One token per distinct moment *content*, so that equal moments are summed once.

    The same ``Moment`` object recurs where a file shares it (``to_q``/``to_k``/``to_v`` read one tensor; every
    cross-attention ``to_k``/``to_v`` reads the same text states), and equal contents recur across adapters (the
    empty prompt's text-side inputs are the same in every adapter's file). Fingerprint: the eigenvalues (or the
    Gram's diagonal) and the residual; equal fingerprints are confirmed with ``torch.equal`` on the tensors, so
    two moments share a token only when they are bit-identical. Holds references only (no copies).
    """

    def __init__(self):
        self._by_id: dict[int, tuple[object, int]] = {}
        self._by_print: dict[tuple, list[tuple[int, object]]] = {}
        self._tokens = 0

    def token(self, m) -> int:
        hit = self._by_id.get(id(m))
        if hit is not None and hit[0] is m:
            return hit[1]
        if m.is_sketch:
            fp = (True, m.in_features, m.basis.shape[1], float(m.residual), m.values.numpy().tobytes())
        else:
            fp = (False, m.in_features, m.gram.diagonal().numpy().tobytes())
        candidates = self._by_print.setdefault(fp, [])
        token = next((t for t, other in candidates if _same_moment(m, other)), None)
        if token is None:
            self._tokens += 1
            token = self._tokens
            candidates.append((token, m))
        self._by_id[id(m)] = (m, token)
        return token


def _same_moment(a, b) -> bool:
    if a.is_sketch:
        return torch.equal(a.basis, b.basis) and torch.equal(a.values, b.values) and a.residual == b.residual
    return torch.equal(a.gram, b.gram)


class _Factorisation:
    """``G`` (symmetric positive semi-definite, ridge added) ready to solve ``X G = M``: Cholesky, or a pseudo-inverse
    by eigendecomposition where Cholesky fails in float64."""

    __slots__ = ("L", "values", "vectors")

    def __init__(self, G: torch.Tensor):
        L, info = torch.linalg.cholesky_ex(G)
        self.L, self.values, self.vectors = (L, None, None) if int(info) == 0 else (None, *self._eig(G))

    @staticmethod
    def _eig(G):
        values, vectors = torch.linalg.eigh(G)
        keep = values > values.abs().max() * G.shape[0] * torch.finfo(torch.float64).eps
        return values[keep], vectors[:, keep].contiguous()

    @property
    def nbytes(self) -> int:
        t = self.L if self.L is not None else self.vectors
        return t.numel() * t.element_size()

    def solve(self, M: torch.Tensor) -> torch.Tensor:
        """``M G⁻¹`` for ``M`` ``(R, in)`` (``G`` symmetric: solves ``G Xᵀ = Mᵀ``; no inverse is formed)."""
        if self.L is not None:
            return torch.cholesky_solve(M.T, self.L).T
        return ((M @ self.vectors) / self.values) @ self.vectors.T


def regmean_terms(adapters, owners, layer, in_features, options: RegMeanOptions):
    """Per owner the terms of ``H_i`` (the Gram each adapter's behaviour is matched on) and the shared terms.

    ``prior_target="own"``: ``H_i = G_i + μ P_i`` (the adapter's whole training distribution, its prior inputs
    included), no shared term. ``"base"``: ``H_i = G_i`` and the shared term ``μ G_0``, ``G_0`` the mean of the
    owners' prior moments, asks for the base's behaviour (no change) on ordinary inputs.
    """
    own, priors = [], []
    for i in owners:
        moments = layer_moments(adapters[i], layer, in_features)
        terms = concept_terms(moments)
        if moments["prior"] is not None:
            priors.append(moments["prior"])
            if options.prior_target == "own" and options.prior_weight:
                terms.append((options.prior_weight, moments["prior"]))
        own.append(terms)
    shared = []
    if options.prior_target == "base" and options.prior_weight and priors:
        shared = [(options.prior_weight / len(priors), m) for m in priors]
    return own, shared


def regmean_layers(adapters, weights, pending, options: RegMeanOptions, dtype) -> Iterator:
    """The statistics merge of each layer: ``A'_i = w_i s_i (A_i H_i) G⁻¹``, ``G = Σ_i H_i [+ μ G_0] + λ̄ I``.

    ``λ̄ = (λ + 1e-9) · tr(G)/in``: scale-free, and at ``λ = 0`` the limit is the minimum-norm least-squares
    solution (rank-deficient ``G``, e.g. text-side inputs, included: ``A_i H_i`` has no component outside
    ``range(G)``). ``G`` is solved by Cholesky in float64 (no inverse formed); anything not positive definite after
    the floor is solved by eigendecomposition (pseudo-inverse). ``B'_i = B_i``.

    ``G`` depends only on the moments, not on the factors: equal moments (``_MomentIndex``) are summed once with
    their coefficients added, and layers whose ``G`` is made of the same moments with the same coefficients
    (``to_q``/``to_k``/``to_v`` of one block; every cross-attention ``to_k``/``to_v``, which read the same text
    states) share one ``G`` and one factorisation, kept in a cache of at most ``_FACTOR_CACHE_BYTES`` (memory
    independent of the number of adapters and of layers). Each layer is yielded as soon as it is solved.
    """
    index = _MomentIndex()
    cache: OrderedDict = OrderedDict()
    cached_bytes = 0
    for layer, owners, fs in pending:
        width = fs[0].A.shape[1]
        own, shared = regmean_terms(adapters, owners, layer, width, options)
        combined: dict[int, list] = {}  # token → [coefficient, moment], in first-seen order
        for terms in (*own, shared):
            for coef, m in terms:
                entry = combined.setdefault(index.token(m), [0.0, m])
                entry[0] += coef
        key = (width, tuple((token, coef) for token, (coef, _) in combined.items()))
        factor = cache.get(key)
        if factor is None:
            G = torch.zeros(width, width, dtype=torch.float64)
            _add_dense(G, [(coef, m) for coef, m in combined.values()])
            level = float(G.diagonal().sum()) / width
            G.diagonal().add_((options.ridge + RIDGE_FLOOR) * level if level > 0 else 1.0)
            factor = _Factorisation(G)
            del G
            cache[key] = factor
            cached_bytes += factor.nbytes
            while cached_bytes > _FACTOR_CACHE_BYTES and len(cache) > 1:
                cached_bytes -= cache.popitem(last=False)[1].nbytes
        else:
            cache.move_to_end(key)
        M = torch.cat([_right_multiply(terms, f.A * (weights[i] * f.scale)) for i, f, terms in zip(owners, fs, own)])
        A = factor.solve(M).to(dtype).contiguous()
        B = torch.cat([f.B for f in fs], dim=1).to(dtype)
        ranks = [f.rank for f in fs]
        # No block fast path: A'_i reads every input channel, so a BlockLoRA term is no longer confined.
        yield layer, MergedLayer(A, B, None, fs[0].a_shape, fs[0].b_shape, ranks, None)


def _combine_deltas(deltas, weights, method, density, majority_sign_method) -> torch.Tensor:
    if method == "svd":  # the weighted sum, re-factored at export
        return merge_utils.task_arithmetic(deltas, weights)
    if method == "ties":
        return merge_utils.ties(deltas, weights, density, majority_sign_method)
    if method == "dare_linear":
        return merge_utils.dare_linear(deltas, weights, density)
    return merge_utils.dare_ties(deltas, weights, density, majority_sign_method)
