"""SODA layers: a frozen decomposition of ``W0``, a trainable spectrum delta and a Kronecker-orthogonal rotation.

Notation: ``W0 ∈ R^{out×in}`` (a ``k×k`` conv flattens its kernel, ``in = C_in·kh·kw``), ``p = min(out, in)``,
``k = spectrum_rank or p``. One adapter computes

    W = (W0 + S) R,   S = U_k diag(Δσ) V_kᵀ  (SVD)   or   S = E_k diag(Δ) Q_k  (LQ; E_k = first k columns of I_out),

with ``R = R_1 ⊗ … ⊗ R_m`` orthogonal acting on the input (for convs: on the input channels, ``R ⊗ I_{kh·kw}``).
The forward never forms ``W`` or ``R``:

    z = R x                        (factor by factor on the activations: O(in · Σ d_j) per token)
    y = W0 z + U_k (Δσ ⊙ V_kᵀ z)   (the base layer on z, plus a rank-k spectral term; LQ: Δ ⊙ Q_k z in rows < k)

so the cost over OFT is the spectral term, ``k·(in + out)`` (SVD) or ``k·in`` (LQ) multiply-adds per token. With
several active adapters the weight deltas add: ``y = W0 x + Σ_i (W_i − W0) x = W0 (x + Σ_i (R_i x − x)) +
Σ_i S_i R_i x`` (still one call of the base layer).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import zlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...errors import BasisError, UnsupportedLayerError

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --------------------------------------------------------------------------------------------------- Kronecker factors


def auto_factors(n: int, num_factors: int = 2) -> list[int]:
    """Near-equal factor sizes whose product is ``n`` (ascending, sizes of 1 dropped).

    Greedy: the largest divisor of ``n`` not above ``n^(1/m)`` for ``m`` factors left, e.g. 320 → [16, 20],
    768 → [24, 32], 1280 → [32, 40]. A prime ``n`` gets one factor ``[n]`` (a dense rotation: O(n²) per token).

    Args:
        n: the rotated width.
        num_factors: how many factors at most.

    Returns:
        The sizes.
    """
    if n < 1 or num_factors < 1:
        raise ValueError(f"auto_factors: need n >= 1 and num_factors >= 1, got {n}, {num_factors}")
    sizes, rest = [], n
    for m in range(num_factors, 1, -1):
        limit = rest ** (1.0 / m) + 1e-9
        d = max(d for d in range(1, int(limit) + 1) if rest % d == 0)
        sizes.append(d)
        rest //= d
    sizes.append(rest)
    return sorted(d for d in sizes if d > 1)


def resolve_factors(config, n: int, adapter_name: str, layer_name: str) -> list[int]:
    """Factor sizes of ``R`` for a layer whose rotated width is ``n`` (input features, or input channels)."""
    given = config.factors
    if isinstance(given, dict):
        given = given.get(str(n))
    if given is None:
        return auto_factors(n, config.num_factors)
    if math.prod(given) != n:
        raise BasisError(
            f"factor sizes {list(given)} multiply to {math.prod(given)}, but this layer rotates {n} input "
            "features (channels for convolutions); give sizes whose product is the input width, e.g. "
            f"{auto_factors(n, max(2, len(given)))}",
            adapter=adapter_name,
            layer=layer_name,
        )
    return sorted(d for d in given if d > 1)


def kron_apply(x: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    """``(M_1 ⊗ … ⊗ M_m) x`` for every row of ``x``, without forming the product.

    Row-major: index ``i = (i_1, …, i_m)`` of a row, so ``(A ⊗ B) vec(X) = vec(A X Bᵀ)``. Each step contracts the
    last axis with one factor (one GEMM of ``(N·n/d, d) × (d, d)``) and moves it to the front, so after ``m`` steps
    the axes are back in order: ``O(N · n · Σ d_j)`` work instead of ``O(N · n²)``.

    Args:
        x: shape ``(..., n)``, ``n = Π d_j``.
        mats: the factors ``M_j`` (``d_j × d_j``).

    Returns:
        A tensor of ``x``'s shape.
    """
    if not mats:
        return x
    n = math.prod(m.shape[0] for m in mats)
    if x.shape[-1] != n:
        raise ValueError(f"kron_apply: last dimension {x.shape[-1]} != product of factor sizes {n}")
    shape = x.shape
    y = x.reshape(-1, n)
    rows = y.shape[0]
    for m in reversed(mats):
        d = m.shape[0]
        y = y.reshape(-1, d) @ m.T
        y = y.reshape(rows, n // d, d).transpose(1, 2)
    return y.reshape(shape)


def skew_from_vector(vec: torch.Tensor, d: int) -> torch.Tensor:
    """The ``d×d`` skew-symmetric matrix whose strict upper triangle (row-major) is ``vec``."""
    rows, cols = torch.triu_indices(d, d, 1, device=vec.device)
    a = vec.new_zeros(d, d)
    a = a.index_put((rows, cols), vec)
    return a - a.T


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a linear solve runs in: LAPACK has no half-precision LU, and half would lose orthogonality anyway."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cayley(vec: torch.Tensor, d: int) -> torch.Tensor:
    """``R = (I + A)⁻¹ (I − A)`` for the skew ``A`` of ``vec``: orthogonal for every ``vec``; ``vec = 0`` gives ``I``.

    Solved in float32 for a half-precision ``vec`` and rounded back to its dtype (differentiable throughout).
    """
    a = skew_from_vector(vec.to(_solve_dtype(vec.dtype)), d)
    eye = torch.eye(d, dtype=a.dtype, device=vec.device)
    return torch.linalg.solve(eye + a, eye - a).to(vec.dtype)


def inverse_cayley(r: torch.Tensor) -> torch.Tensor:
    """The vector ``v`` with ``cayley(v) = r`` for an orthogonal ``r`` without eigenvalue −1 (``A = (I + R)⁻¹(I − R)``).

    Solved in float32 for a half-precision ``r``; returned in ``r``'s dtype.
    """
    d = r.shape[0]
    r_solve = r.to(_solve_dtype(r.dtype))
    eye = torch.eye(d, dtype=r_solve.dtype, device=r.device)
    a = torch.linalg.solve(eye + r_solve, eye - r_solve)
    rows, cols = torch.triu_indices(d, d, 1, device=r.device)
    return ((a - a.T) / 2)[rows, cols].to(r.dtype)


class KroneckerRotation(nn.Module):
    """``R = R_1 ⊗ … ⊗ R_m``, Cayley-parametrised or raw orthogonal factors. Factors of size 1 are dropped.

    Args:
        sizes: the factor sizes ``d_j``.
        mode: ``"cayley"`` (``skew``, ``d(d−1)/2`` parameters per factor) or ``"stiefel"`` (``d²`` parameters, kept
            orthogonal by ``peft_ortho.optim``).
        init_identity: start at ``R = I`` (else a random rotation, for tests).
        generator: the random generator of a random start.
    """

    def __init__(self, sizes: list[int], mode: str, init_identity: bool = True, generator=None):
        super().__init__()
        self.sizes = tuple(int(d) for d in sizes)
        self.mode = mode
        if mode == "cayley":
            vecs = [torch.zeros(d * (d - 1) // 2) for d in self.sizes]
            if not init_identity:
                vecs = [0.1 * torch.randn(v.shape, generator=generator) for v in vecs]
            self.skew = nn.ParameterList([nn.Parameter(v) for v in vecs])
        elif mode == "stiefel":
            mats = [torch.eye(d) for d in self.sizes]
            if not init_identity:
                mats = [cayley(0.1 * torch.randn(d * (d - 1) // 2, generator=generator), d) for d in self.sizes]
            self.stiefel = nn.ParameterList([nn.Parameter(m) for m in mats])
        else:
            raise ValueError(f"unknown rotation mode {mode!r}")

    def matrices(self) -> list[torch.Tensor]:
        """The orthogonal factors ``R_j`` (``d_j×d_j``), differentiable in the parameters."""
        if self.mode == "cayley":
            return [cayley(v, d) for v, d in zip(self.skew, self.sizes)]
        return list(self.stiefel)

    @torch.no_grad()
    def orthogonality_error(self) -> float:
        """``max_j ‖R_jᵀ R_j − I‖_F`` (0 for the Cayley mode up to rounding)."""
        err = 0.0
        for m in self.matrices():
            m = m.detach().double()
            err = max(
                err, torch.linalg.matrix_norm(m.T @ m - torch.eye(m.shape[0], dtype=m.dtype, device=m.device)).item()
            )
        return err


# ------------------------------------------------------------------------------------------------------- decomposition


LAPACK_THREADS_ENV = "PEFT_ORTHO_SINGLE_THREAD_LAPACK"


def _oversubscribed() -> bool:
    """Whether CPU SVD/QR should run on one thread: ``PEFT_ORTHO_SINGLE_THREAD_LAPACK=1`` always, ``=0`` never; by
    default only when the CPUs are measured oversubscribed (1-minute load average above the cores this process may
    run on)."""
    setting = os.environ.get(LAPACK_THREADS_ENV, "").strip().lower()
    if setting in ("1", "true", "yes"):
        return True
    if setting in ("0", "false", "no"):
        return False
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: assume the cores are free
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return load > cores


@contextlib.contextmanager
def _lapack_threads(device: torch.device) -> Iterator[None]:
    """Run CPU LAPACK (SVD/QR) on one intra-op thread when the cores are oversubscribed, restoring the count after.

    Measured on a shared 2-core machine under load: a 1280×1280 float32 SVD took 0.6 s on one thread and 34 s on
    two (LAPACK's many OpenMP barriers stall when the cores are oversubscribed); QR 0.1 s vs 0.9 s. On free cores
    the threads help, so this applies only where ``_oversubscribed`` measures contention (or is asked to). (A
    stacked, batched ``torch.linalg.svd`` over same-shape layers was also ~10× slower than the per-layer loop.)
    """
    if device.type != "cpu" or torch.get_num_threads() == 1 or not _oversubscribed():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def decompose(
    weight2d: torch.Tensor, decomposition: str, rank: Optional[int], dtype: torch.dtype, adapter: str, layer: str
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(left, right, sigma)`` of ``W0`` (``out×in``), computed in ``dtype`` on the weight's device.

    SVD: ``left = U_k`` (``out×k``), ``right = V_kᵀ`` (``k×in``), ``sigma = σ_1..σ_k`` (descending).
    LQ: ``left = None``, ``right = Q_k`` (first ``k`` rows of ``Q``), ``sigma`` = first ``k`` diagonal entries of ``L``,
    made non-negative (the sign is moved into ``Q``) so the factorisation is unique for full-rank ``W0``.
    """
    if weight2d.is_meta:
        raise BasisError("SODA needs the base weights to decompose (meta tensor)", adapter=adapter, layer=layer)
    w = weight2d.detach().to(dtype)
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise BasisError(
            f"the base weight has {bad} non-finite value(s) (NaN/Inf); SODA cannot decompose it",
            adapter=adapter,
            layer=layer,
        )
    out_f, in_f = w.shape
    p = min(out_f, in_f)
    if rank is not None and rank > p:
        raise BasisError(
            f"spectrum_rank {rank} exceeds min(out, in) = {p} of this {out_f}×{in_f} layer",
            adapter=adapter,
            layer=layer,
        )
    k = p if rank is None else rank
    if decomposition == "svd":
        with _lapack_threads(w.device):
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :k].contiguous(), vh[:k].contiguous(), s[:k].contiguous()
    # LQ from the QR of W0ᵀ: W0ᵀ = Q' R'  =>  W0 = R'ᵀ Q'ᵀ = L Q.
    with _lapack_threads(w.device):
        q, r = torch.linalg.qr(w.T)
    diag = torch.diagonal(r)
    sign = torch.where(diag < 0, -torch.ones_like(diag), torch.ones_like(diag))
    right = (q.T * sign[:, None])[:k]
    return None, right.contiguous(), (diag * sign)[:k].contiguous()


# -------------------------------------------------------------------------------------------------------------- layers


class SodaLayer(BaseTunerLayer):
    """Shared state and math of the SODA layers. Per adapter:

    - ``soda_spectrum[a]``: trainable ``Δσ`` / ``Δ`` (``k``);
    - ``soda_rotation[a]``: trainable :class:`KroneckerRotation`;
    - ``soda_left[a]`` (SVD only) ``U_k`` and ``soda_right[a]`` ``V_kᵀ`` / ``Q_k``: frozen, *not saved* (recomputed
      from the base weights when the adapter is created or loaded; shared between adapters with the same settings);
    - ``soda_sigma[a]``: the base spectrum ``σ_1..σ_k`` (frozen, saved: ``k`` numbers, used to check at load time that
      the base weights are those the adapter was trained on).

    Args:
        base_layer: the layer to adapt.
        **kwargs: ignored (peft's tuner-layer signature).
    """

    adapter_layer_names = ("soda_spectrum", "soda_rotation")
    other_param_names = ("soda_left", "soda_right", "soda_sigma", "soda_settings")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.soda_spectrum = nn.ParameterDict({})
        self.soda_rotation = nn.ModuleDict({})
        self.soda_left = BufferDict({}, persistent=False)
        self.soda_right = BufferDict({}, persistent=False)
        self.soda_sigma = BufferDict({}, persistent=True)
        self.soda_settings: dict[str, dict[str, Any]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._soda_original_weight: Optional[torch.Tensor] = None  # W0 while adapters are merged (bit-exact unmerge)
        self._soda_forward_count: dict[str, int] = {}
        self.kwargs = kwargs
        base = self.get_base_layer()
        # peft's convention for adapter layers: channels for convolutions, features for linear layers.
        self.in_features = base.in_channels if isinstance(base, nn.Conv2d) else base.in_features
        self.out_features = base.out_channels if isinstance(base, nn.Conv2d) else base.out_features

    # -- shapes -------------------------------------------------------------------------------------------------------

    def _weight2d_shape(self) -> tuple[int, int]:
        w = self.get_base_layer().weight
        return w.shape[0], w[0].numel()

    def _rotated_width(self) -> int:
        raise NotImplementedError

    def original_weight(self) -> torch.Tensor:
        """``W0``: the base weight as it was before any SODA adapter was merged into it."""
        if self._soda_original_weight is not None:
            return self._soda_original_weight.to(self.get_base_layer().weight.device)
        return self.get_base_layer().weight.data

    # -- creation ----------------------------------------------------------------------------------------------------

    def update_layer(self, adapter_name: str, config, layer_name: str = "?", inference_mode: bool = False) -> None:
        """Decompose ``W0`` (or reuse another adapter's identical decomposition) and create the trainable tensors.

        Args:
            adapter_name: the adapter.
            config: its ``SodaConfig``.
            layer_name: the layer's name, for messages.
            inference_mode: freeze the new tensors.
        """
        sizes = resolve_factors(config, self._rotated_width(), adapter_name, layer_name)
        out_f, in_f = self._weight2d_shape()
        p = min(out_f, in_f)
        k = p if config.spectrum_rank is None else config.spectrum_rank
        key = (config.decomposition, k, config.decomposition_dtype)
        shared = next((a for a, s in self.soda_settings.items() if s["key"] == key and a in self.soda_right), None)
        if shared is not None:
            left = self.soda_left[shared] if shared in self.soda_left else None
            right, sigma = self.soda_right[shared], self.soda_sigma[shared]
        else:
            if k > p:
                raise BasisError(
                    f"spectrum_rank {k} exceeds min(out, in) = {p} of this {out_f}×{in_f} layer",
                    adapter=adapter_name,
                    layer=layer_name,
                )
            w0 = self.original_weight().reshape(out_f, in_f)
            left, right, sigma = decompose(
                w0,
                config.decomposition,
                config.spectrum_rank,
                _DTYPES[config.decomposition_dtype],
                adapter_name,
                layer_name,
            )
        # init_weights=False (tests): random values, deterministic per adapter and layer name (two adapters differ).
        seed = zlib.crc32(f"{adapter_name}\0{layer_name}".encode())
        generator = None if config.init_weights else torch.Generator().manual_seed(seed)
        spectrum = torch.zeros(k)
        if not config.init_weights:
            spectrum = 0.1 * sigma.detach().float().cpu().abs().mean() * torch.randn(k, generator=generator)
        self.soda_spectrum[adapter_name] = nn.Parameter(spectrum)
        self.soda_rotation[adapter_name] = KroneckerRotation(
            sizes, config.rotation, init_identity=config.init_weights, generator=generator
        )
        if left is not None:
            self.soda_left[adapter_name] = left
        self.soda_right[adapter_name] = right
        self.soda_sigma[adapter_name] = sigma.detach().clone()
        self.soda_settings[adapter_name] = {
            "key": key,
            "decomposition": config.decomposition,
            "rank": k,
            "sizes": tuple(sizes),
            "rotation": config.rotation,
            "check_every": config.stiefel_check_every,
            "tolerance": config.stiefel_tolerance,
            "forward_mode": config.forward_mode,
            "config": config,
            "layer": layer_name,
        }
        self._soda_forward_count[adapter_name] = 0
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # -- math ---------------------------------------------------------------------------------------------------------

    def _rotation_mats(self, adapter: str, dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
        mats = self.soda_rotation[adapter].matrices()
        return [m.to(dtype) for m in mats] if dtype is not None else mats

    def _adapter_dtype(self, adapter: str) -> torch.dtype:
        return self.soda_spectrum[adapter].dtype

    def dense_rotation(self, adapter: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``R`` as a dense ``in×in`` matrix (for tests and analysis only; the forward never forms it).

        Args:
            adapter: the adapter.
            dtype: of the matrix.

        Returns:
            ``R``.
        """
        mats = [m.detach().to(dtype) for m in self._rotation_mats(adapter)]
        r = torch.ones(1, 1, dtype=dtype, device=self.soda_spectrum[adapter].device)
        for m in mats:
            r = torch.kron(r, m)
        n = self._rotated_width()
        r = r if mats else torch.eye(n, dtype=dtype, device=r.device)
        kk = self._weight2d_shape()[1] // n
        return torch.kron(r.contiguous(), torch.eye(kk, dtype=dtype, device=r.device)) if kk > 1 else r

    def spectral_delta(self, adapter: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ``S`` (``out×in``): ``U_k diag(Δσ) V_kᵀ`` (SVD) or ``E_k diag(Δ) Q_k`` (LQ).

        Args:
            adapter: the adapter.
            dtype: of the matrix.

        Returns:
            ``S``.
        """
        delta = self.soda_spectrum[adapter].detach().to(dtype)
        right = self.soda_right[adapter].to(dtype)
        if adapter in self.soda_left:
            return (self.soda_left[adapter].to(dtype) * delta) @ right
        out_f, in_f = self._weight2d_shape()
        s = torch.zeros(out_f, in_f, dtype=dtype, device=right.device)
        s[: delta.shape[0]] = delta[:, None] * right
        return s

    def _rotate_rows_right(self, w: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
        """``w R`` for a 2-D ``w`` (``out×in``): ``Rᵀ`` applied to each row."""
        raise NotImplementedError

    @torch.no_grad()
    def get_delta_weight(self, adapter: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``W − W0 = (W0 + S) R − W0``, computed in float64 from the original ``W0`` (even while adapters are merged).

        Args:
            adapter: the adapter.
            dtype: of the result (default: the base weight's).

        Returns:
            ``ΔW``, shaped like the base weight.
        """
        w0 = self.original_weight()
        out_f, in_f = self._weight2d_shape()
        w0_64 = w0.reshape(out_f, in_f).to(torch.float64)
        mats = [m.detach().to(torch.float64) for m in self._rotation_mats(adapter)]
        w = self._rotate_rows_right(w0_64 + self.spectral_delta(adapter), mats)
        return (w - w0_64).reshape(w0.shape).to(dtype or w0.dtype)

    def _check_stiefel(self, adapter: str) -> None:
        """rotation='stiefel' trained with a plain optimizer drifts off the orthogonal group: measure and warn once."""
        settings = self.soda_settings[adapter]
        every = settings["check_every"]
        if settings["rotation"] != "stiefel" or not every or not self.training:
            return
        count = self._soda_forward_count.get(adapter, 0) + 1
        self._soda_forward_count[adapter] = count
        if count % every:
            return
        config = settings["config"]
        if config.stiefel_warned:
            return
        err = self.soda_rotation[adapter].orthogonality_error()
        if err > settings["tolerance"]:
            config.stiefel_warned = True
            warnings.warn(
                f"adapter {adapter!r}, layer {settings['layer']!r}: the rotation factors are no longer orthogonal "
                f"(‖RᵀR − I‖_F = {err:.3g} > {settings['tolerance']:g}). rotation='stiefel' factors must be trained "
                "with a Stiefel optimizer: use peft_ortho.optim.make_optimizer(model, ...) (or StiefelAdam/StiefelSGD "
                "for the parameters named '*.stiefel.*'), or choose rotation='cayley', which any optimizer keeps "
                "orthogonal.",
                UserWarning,
                stacklevel=3,
            )

    # -- merging ------------------------------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the base weight: ``W0 + Σ_i (W_i − W0)`` over the merged adapters.

        ``W0`` is kept (in the base weight's dtype and device) until ``unmerge``, which restores it bit for bit; the
        merged weight is always recomputed from ``W0`` in float64, so merging in several calls rounds only once.

        Args:
            safe_merge: check the merged weight is finite before writing it.
            adapter_names: the adapters to merge (default: the active ones).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.soda_spectrum]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if self._soda_original_weight is None:
            self._soda_original_weight = base.weight.data.clone()
        w0 = self._soda_original_weight
        total = w0.to(torch.float64)
        for a in [*self.merged_adapters, *adapter_names]:
            total = total + self.get_delta_weight(a, dtype=torch.float64)
        if safe_merge and not torch.isfinite(total).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {adapter_names} seem to be broken")
        base.weight.data = total.to(w0.dtype)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.get_base_layer().weight.data = self._soda_original_weight.to(self.get_base_layer().weight.device)
        self._soda_original_weight = None
        self.merged_adapters.clear()

    # -- forward ------------------------------------------------------------------------------------------------------

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.soda_spectrum]

    def _rotate(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def _forward_with_weight(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _use_weight_path(self, x: torch.Tensor, adapter: str) -> bool:
        """Whether ``W0 z + S z`` is cheaper as ``(W0 + S) z`` (form ``S`` once per call) than on the activations.

        Multiply-adds beyond the base layer, for ``T`` tokens (rows of ``x``; output positions for convs), rank ``k``:

        - activations: SVD ``T·k·(in + out)`` forward, the same again in the backward; LQ ``T·k·in`` and again;
        - weight: forming ``S`` costs ``out·k·in`` (SVD; LQ: none, ``S`` is ``Δ ⊙ Q_k`` placed in ``k`` rows), and the
          backward needs the weight gradient ``dyᵀ z`` (``T·out·in``) plus ``out·in·k`` (SVD) to reach ``Δ``.

        So the weight path wins for many tokens and a large ``k`` (e.g. full spectrum at SD's 4096 tokens per image),
        the activation path for few tokens or a small ``spectrum_rank``. ``forward_mode`` in the config forces one.
        """
        settings = self.soda_settings[adapter]
        mode = settings["forward_mode"]
        if mode != "auto":
            return mode == "weight"
        out_f, in_f = self._weight2d_shape()
        k = settings["rank"]
        tokens = x.numel() // max(1, self._rotated_width())
        svd = adapter in self.soda_left
        grad = torch.is_grad_enabled() and self.soda_spectrum[adapter].requires_grad
        act = tokens * k * ((in_f + out_f) if svd else in_f) * (2 if grad else 1)
        weight = (out_f * k * in_f if svd else 0) + (
            (tokens * out_f * in_f + (out_f * in_f * k if svd else 0)) if grad else 0
        )
        return weight < act

    def _effective_weight(self, adapter: str) -> torch.Tensor:
        """``W0 + S`` shaped like the base weight, differentiable in ``Δ`` (exactly ``W0`` when ``Δ = 0``)."""
        w0 = self.get_base_layer().weight
        right = self.soda_right[adapter]
        delta = self.soda_spectrum[adapter].to(right.dtype)
        if adapter in self.soda_left:
            s = (self.soda_left[adapter] * delta) @ right
        else:
            s = F.pad(delta[:, None] * right, (0, 0, 0, w0.shape[0] - delta.shape[0]))
        return w0 + s.reshape(w0.shape).to(w0.dtype)

    def _spectral(self, z: torch.Tensor, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def _base_input(self, x: torch.Tensor, adapters: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(x + Σ_i (R_i x − x), [R_i x])``: the base layer's input and each adapter's rotated input."""
        rotated = [self._rotate(x, a) for a in adapters]
        if len(rotated) == 1:
            return rotated[0], rotated
        xc = x.to(rotated[0].dtype)
        z = xc
        for r in rotated:
            z = z + (r.to(xc.dtype) - xc)
        return z, rotated

    def _soda_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapters = self._active()
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        for a in adapters:
            self._check_stiefel(a)
        if len(adapters) == 1 and self._use_weight_path(x, adapters[0]):
            z = self._rotate(x, adapters[0]).to(previous_dtype)
            return self._forward_with_weight(z, self._effective_weight(adapters[0])).to(previous_dtype)
        z, rotated = self._base_input(x, adapters)
        result = self.base_layer(z.to(previous_dtype), *args, **kwargs)
        for a, r in zip(adapters, rotated):
            result = result + self._spectral(r, a).to(result.dtype)
        return result.to(previous_dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True


class Linear(nn.Module, SodaLayer):
    """SODA on ``nn.Linear``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, layer_name: str = "?", **kwargs) -> None:
        super().__init__()
        SodaLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_name, inference_mode=config.inference_mode)

    def _rotated_width(self) -> int:
        return self.get_base_layer().in_features

    def _rotate_rows_right(self, w: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
        return kron_apply(w, [m.T for m in mats])

    def _forward_with_weight(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(z, weight, self.get_base_layer().bias)

    def _rotate(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        dtype = self._adapter_dtype(adapter)
        return kron_apply(x.to(dtype), self._rotation_mats(adapter))

    def _spectral(self, z: torch.Tensor, adapter: str) -> torch.Tensor:
        right = self.soda_right[adapter]
        delta = self.soda_spectrum[adapter]
        s = F.linear(z.to(right.dtype), right).to(delta.dtype) * delta  # (..., k)
        if adapter in self.soda_left:
            left = self.soda_left[adapter]
            return F.linear(s.to(left.dtype), left)
        return F.pad(s, (0, self.get_base_layer().out_features - s.shape[-1]))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._soda_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "soda." + super().__repr__()


class Conv2d(nn.Module, SodaLayer):
    """SODA on ``nn.Conv2d`` (any kernel size, ``groups=1``, zero padding). ``R`` rotates the input channels; the
    spectral term is a conv with ``V_kᵀ`` (or ``Q_k``) reshaped to ``(k, C_in, kh, kw)`` followed by a 1×1 conv."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, layer_name: str = "?", **kwargs) -> None:
        super().__init__()
        SodaLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_name, inference_mode=config.inference_mode)

    def _rotated_width(self) -> int:
        return self.get_base_layer().in_channels

    def _rotate_rows_right(self, w: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
        out_f, in_f = w.shape
        c = self._rotated_width()
        w3 = w.reshape(out_f, c, in_f // c).transpose(1, 2)  # (out, kh·kw, C_in): rotate the channel axis
        return kron_apply(w3, [m.T for m in mats]).transpose(1, 2).reshape(out_f, in_f)

    def _forward_with_weight(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.conv2d(z, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)

    def _rotate(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        dtype = self._adapter_dtype(adapter)
        mats = self._rotation_mats(adapter)
        if not mats:
            return x.to(dtype)
        # contiguous: a channels-last view would make the base conv pick another kernel (different rounding, and the
        # adapted layer would no longer equal the base layer bit for bit at initialisation).
        return kron_apply(x.to(dtype).movedim(-3, -1), mats).movedim(-1, -3).contiguous()

    def _spectral(self, z: torch.Tensor, adapter: str) -> torch.Tensor:
        base = self.get_base_layer()
        right = self.soda_right[adapter]
        delta = self.soda_spectrum[adapter]
        kernel = right.reshape(right.shape[0], *base.weight.shape[1:])
        s = F.conv2d(z.to(right.dtype), kernel, None, base.stride, base.padding, base.dilation)
        s = s.to(delta.dtype) * delta[:, None, None]
        if adapter in self.soda_left:
            left = self.soda_left[adapter]
            return F.conv2d(s.to(left.dtype), left[:, :, None, None])
        return F.pad(s, (0, 0, 0, 0, 0, base.out_channels - s.shape[-3]))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._soda_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "soda." + super().__repr__()


def create_soda_module(target: nn.Module, adapter_name: str, config, layer_name: str) -> nn.Module:
    """Wrap ``target`` (``nn.Linear`` or ``nn.Conv2d``) in a SODA layer; anything else is refused by name."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Linear):
        return Linear(target, adapter_name, config, layer_name)
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise UnsupportedLayerError(
                f"grouped Conv2d (groups={base.groups}) is not supported by SodaConfig",
                adapter=adapter_name,
                layer=layer_name,
            )
        if base.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"Conv2d with padding_mode={base.padding_mode!r} is not supported by SodaConfig (zero padding only)",
                adapter=adapter_name,
                layer=layer_name,
            )
        return Conv2d(target, adapter_name, config, layer_name)
    raise UnsupportedLayerError(
        f"{type(base).__name__} is not supported by SodaConfig (supported: Linear, Conv2d)",
        adapter=adapter_name,
        layer=layer_name,
    )
