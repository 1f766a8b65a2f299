"""Per-layer input statistics of an adapter's training distribution, for merges that keep behaviour.

For a layer ``y = W x`` (``x`` of width ``in``; unfolded patches ``C_in·k·k`` for convolutions) and one kind of
batch, the statistic is the mean second moment of the inputs the layer saw,

    G = Xᵀ X / n        (in × in, float64; X holds one input vector per row, n rows)

kept exactly, or as a low-rank sketch ``G ≈ U diag(σ) Uᵀ + ρ (I − U Uᵀ)`` with the top-k eigenpairs and the mean of
the remaining eigenvalues ``ρ`` (the residual trace spread over the residual subspace). No input is stored.

Kinds: ``"concept"`` (the concept's own prompts and images), ``"prior"`` (ordinary / prior-class inputs, e.g.
DreamBooth's prior-preservation batches) and ``"unconditional"`` (the concept's images under the empty prompt, which
classifier-free guidance feeds the model at sampling time).

- ``InputStatistics(model)`` records them while training (forward pre-hooks on every adapted layer);
- ``save_pretrained`` / ``load_statistics`` write and read ``adapter_statistics.safetensors`` (layout in
  ``docs/statistics.md``), validating everything a downloaded file could get wrong;
- ``calibrate(adapter, target, prompt)`` computes them for an adapter that comes without them, by running the base
  with that adapter applied; ``compare_statistics`` measures how close such statistics come to recorded ones.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._io import refuse_pickle
from .errors import AdapterFileError, PeftOrthoError
from .tuners._layers import check_supported_layer

__all__ = [
    "EXACT_MAX_FEATURES",
    "KINDS",
    "LOSSLESS_RANK",
    "SKETCH_RANK",
    "STATISTICS_NAME",
    "STATISTICS_SUFFIX",
    "AdapterStatistics",
    "InputStatistics",
    "Moment",
    "calibrate",
    "calibration_inputs",
    "check_statistics",
    "compare_statistics",
    "is_statistics_file",
    "layer_key",
    "load_statistics",
    "save_statistics",
    "sketch_moment",
]

KINDS = ("concept", "prior", "unconditional")

STATISTICS_NAME = "adapter_statistics.safetensors"
"""The file name beside ``adapter_model.safetensors`` (and in a diffusers LoRA folder beside its one weight file)."""
STATISTICS_SUFFIX = ".statistics.safetensors"
"""Sibling of a single LoRA file: ``rex.safetensors`` → ``rex.statistics.safetensors``."""
FORMAT = "peft-ortho/adapter-statistics"
FORMAT_VERSION = "1"

# Storage defaults (see ``sketch_moment``): chosen so that SD1.5 attention statistics of a rank-16 adapter, all three
# kinds, fit in less than the adapter file (arithmetic in docs/statistics.md, checked by tests/test_statistics.py).
EXACT_MAX_FEATURES = 128
SKETCH_RANK = 16
LOSSLESS_RANK = 77  # one CLIP prompt's tokens: prompt-side inputs are stored exactly

_MAX_FEATURES = 1 << 20
_MAX_COUNT = 1 << 53  # counts are exact in the float64 sums they divide
_LAYER_NAME = re.compile(r"^[A-Za-z0-9_][\w.\-]{0,499}$")
_ORTHONORMAL_TOL = 1e-4  # float32 bases: ‖UᵀU − I‖_max is ~1e-7·√in when written by us


def layer_key(component: str | None, layer: str) -> str:
    """The statistics key of an adapter layer.

    Args:
        component: the pipeline component (``"unet"``, ``"text_encoder"``...), or ``None`` for a single model.
        layer: the layer's name in the adapter's weight file.

    Returns:
        ``layer``, or ``"component.layer"``.
    """
    return layer if component is None else f"{component}.{layer}"


def is_statistics_file(filename: str) -> bool:
    """Whether a file name is a statistics file (never an adapter's weights).

    Args:
        filename: a file name or path.

    Returns:
        True for ``adapter_statistics.safetensors`` and names ending in the statistics suffix.
    """
    name = os.path.basename(filename)
    return name == STATISTICS_NAME or name.endswith(STATISTICS_SUFFIX)


@dataclass(frozen=True)
class Moment:
    """``G = XᵀX / count`` of one layer and one kind: exact (``gram``) or sketched (``basis``, ``values``, ``residual``).

    ``gram``: ``(in, in)`` float64. Sketch: ``basis`` ``(in, k)`` orthonormal columns, ``values`` ``(k,)``,
    ``residual`` ρ ≥ 0, with ``in`` given by ``in_features``.
    """

    count: int
    gram: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    values: torch.Tensor | None = None
    residual: float = 0.0

    @property
    def in_features(self) -> int:
        """``in``: the width of the layer's inputs (``C_in·kh·kw`` for a convolution)."""
        return (self.gram if self.gram is not None else self.basis).shape[0]

    @property
    def is_sketch(self) -> bool:
        """Whether ``G`` is held as a low-rank sketch (``basis``, ``values``, ``residual``) rather than exactly."""
        return self.gram is None

    def dense(self) -> torch.Tensor:
        """``G`` as a dense matrix.

        Returns:
            ``(in, in)`` float64.
        """
        if self.gram is not None:
            return self.gram
        U, s = self.basis, self.values
        G = (U * (s - self.residual)) @ U.T
        G.diagonal().add_(self.residual)
        return G

    def right_multiply(self, M: torch.Tensor) -> torch.Tensor:
        """``M G``, in ``O(r·in·k)`` for a sketch (``G`` is never formed).

        Args:
            M: ``(r, in)``.

        Returns:
            ``(r, in)`` float64.
        """
        M = M.to(torch.float64)
        if self.gram is not None:
            return M @ self.gram
        U = self.basis
        return self.residual * M + ((M @ U) * (self.values - self.residual)) @ U.T

    def trace(self) -> float:
        """The trace of ``G`` (exact for a sketch too: ``Σσ + ρ·(in − k)`` is how ``ρ`` was chosen).

        Returns:
            ``tr G``.
        """
        if self.gram is not None:
            return float(self.gram.diagonal().sum())
        return float(self.values.sum()) + self.residual * (self.in_features - self.values.shape[0])


@dataclass
class AdapterStatistics:
    """The statistics one adapter carries: ``layers[layer][kind] → Moment``.

    ``layer`` is the layer's name as in the adapter's own weight file, without peft's ``base_model.model.`` prefix
    and without the adapter name (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``); for files that
    hold several components of a pipeline, prefixed with the component (``text_encoder.…``).
    """

    layers: dict[str, dict[str, Moment]] = field(default_factory=dict)
    adapter: str | None = None

    def moment(self, layer: str, kind: str) -> Moment | None:
        """The moment of one layer and kind.

        Args:
            layer: the layer's statistics key.
            kind: one of ``KINDS``.

        Returns:
            The ``Moment``; ``None`` where that layer never saw an input of that kind.
        """
        return self.layers.get(layer, {}).get(kind)

    def kinds(self) -> list[str]:
        """The kinds present in at least one layer.

        Returns:
            Kind names, in ``KINDS`` order.
        """
        present = {k for moments in self.layers.values() for k in moments}
        return [k for k in KINDS if k in present]

    def counts(self, kind: str) -> list[int]:
        """The number of input rows behind each layer's moment of one kind.

        Args:
            kind: one of ``KINDS``.

        Returns:
            One count per layer that has that kind (layers without it left out).
        """
        return [m[kind].count for m in self.layers.values() if kind in m]

    def with_prefix(self, component: str) -> AdapterStatistics:
        """The same moments keyed ``"component.layer"`` (for a PEFT folder merged under a pipeline component).

        Args:
            component: the pipeline component.

        Returns:
            A new ``AdapterStatistics`` sharing the moments.
        """
        return AdapterStatistics({layer_key(component, k): v for k, v in self.layers.items()}, self.adapter)

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Write ``save_directory/adapter_statistics.safetensors`` (see ``save_statistics``).

        Args:
            save_directory: the folder (created if missing), usually the adapter's own.
            overwrite: replace an existing file.

        Returns:
            The file's path.
        """
        os.makedirs(save_directory, exist_ok=True)
        return save_statistics(self, os.path.join(os.fspath(save_directory), STATISTICS_NAME), overwrite=overwrite)


# --------------------------------------------------------------------------------------------------- sketching


def sketch_moment(
    gram: torch.Tensor,
    count: int,
    *,
    exact_max: int = EXACT_MAX_FEATURES,
    rank: int = SKETCH_RANK,
    lossless_rank: int = LOSSLESS_RANK,
) -> Moment:
    """The stored form of ``G`` (``(in, in)`` float64, symmetric PSD) from ``count`` rows.

    - ``in ≤ exact_max``: exact;
    - else eigendecompose ``G = Σ λ_j u_j u_jᵀ`` (λ descending) and keep the top ``k`` pairs, ``k`` = the numerical
      rank of ``G`` when it is at most ``lossless_rank`` (then the sketch is exact up to rounding: prompt-side
      inputs have at most 77 tokens per prompt) and ``rank`` otherwise, with ``ρ = Σ_{j>k} λ_j / (in − k)``.

    Error bound of the sketch ``Ĝ = U diag(λ_1..k) Uᵀ + ρ (I − U Uᵀ)``: ``G − Ĝ = Σ_{j>k} (λ_j − ρ) u_j u_jᵀ``,
    so ``‖G − Ĝ‖₂ = max_{j>k} |λ_j − ρ| ≤ λ_{k+1}`` (both ``λ_j`` and ``ρ`` lie in ``[0, λ_{k+1}]``) and
    ``tr Ĝ = tr G``. The basis is stored in float32, which adds at most ~1e-7·√in·λ_1.

    Args:
        gram: ``G``, ``(in, in)`` float64, symmetric PSD.
        count: the number of input rows behind it.
        exact_max: the widest layer stored exactly.
        rank: the sketch's rank ``k`` when ``G``'s numerical rank exceeds ``lossless_rank``.
        lossless_rank: up to this numerical rank, the sketch keeps every eigenpair.

    Returns:
        The ``Moment``: exact, or a sketch.
    """
    n = gram.shape[0]
    if n <= exact_max:
        return Moment(count=count, gram=gram)
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    tol = n * torch.finfo(torch.float64).eps * float(evals[0]) if n else 0.0
    numerical_rank = int((evals > tol).sum())
    k = numerical_rank if numerical_rank <= lossless_rank else rank
    k = max(1, min(k, n))
    kept = evals[:k]
    lossless = k >= numerical_rank  # what is dropped is rounding noise: ρ = 0, not that noise spread out
    residual = 0.0 if lossless else max(0.0, (float(gram.diagonal().sum()) - float(kept.sum())) / (n - k))
    basis = evecs[:, :k].to(torch.float32).to(torch.float64)  # what the file holds: the round trip is exact
    return Moment(count=count, basis=basis, values=kept.clone(), residual=residual)


# --------------------------------------------------------------------------------------------------- recording


def _in_features(base: nn.Module) -> int:
    if isinstance(base, nn.Conv2d):
        return base.in_channels * math.prod(base.kernel_size)
    if isinstance(base, nn.Linear):
        return base.in_features
    return base.weight.shape[0]  # Conv1D stores (in, out)


def _check_layer(base: nn.Module, name: str, adapter: str | None) -> None:
    """The tuners' own check (``tuners/_layers.py``): the layer types whose inputs are rows of ``in`` features."""
    check_supported_layer(base, adapter, name, "input statistics")


def _rows(base: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The layer's inputs as rows ``(n, in)`` in ``dtype``: tokens for linear layers, unfolded patches for convs.

    Patches are ``(C_in, kh, kw)`` flattened in that order, the order of ``weight.reshape(out, -1)`` (how peft and
    ``compose`` flatten a kernel), with the conv's own padding (mode included), stride and dilation.
    """
    x = x.detach()
    if isinstance(base, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(x.to(dtype), base.kernel_size, dilation=base.dilation, stride=base.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1]).to(dtype)


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """``rowsᵀ rows`` in the rows' dtype (the running sums add it in float64: every float32 value is exact there).

    A float32 product is computed in full float32 precision even where the caller enabled TF32 or bf16 reduced
    precision for float32 matmuls (``torch.set_float32_matmul_precision``): its error then stays at float32 rounding
    (about 1e-7 relative, docs/statistics.md), where TF32 would give about 1e-3.
    """
    if rows.dtype == torch.float32:
        precision = torch.get_float32_matmul_precision()
        if precision != "highest":
            torch.set_float32_matmul_precision("highest")
            try:
                return rows.T @ rows
            finally:
                torch.set_float32_matmul_precision(precision)
    return rows.T @ rows


def _in_backward() -> bool:
    """Whether autograd is running a backward pass: forwards run then are activation-checkpointing recomputations."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _Accumulator:
    """``Σ XᵀX`` (float64, on the inputs' device) and the row count of one layer and one kind."""

    __slots__ = ("sum", "count")

    def __init__(self, sum_: torch.Tensor, count: int):
        self.sum, self.count = sum_, count


class _Recorder:
    """Forward pre-hooks on ``{name: module}`` accumulating ``XᵀX`` per kind while ``record(kind)`` is open.

    The hooks are installed once and return at once outside ``record`` (under ``torch.compile`` they trace to
    nothing: the flag they read is guarded, so opening ``record`` recompiles once and the accumulation itself runs
    eagerly, outside the graph). Layers fed the same tensor (``to_q``/``to_k``/``to_v``; every block's
    cross-attention ``to_k``/``to_v``) share one ``XᵀX`` product per forward: the products of the last
    ``_CACHE_SIZE`` distinct inputs are kept (by weak reference to the tensor, so nothing is kept alive) until the
    ``record`` block ends.
    """

    _CACHE_SIZE = 8  # a transformer block has 5 distinct attention inputs; the prompt embedding recurs per block

    def __init__(
        self,
        layers: Mapping[str, tuple[nn.Module, nn.Module]],
        adapter: str | None,
        product_dtype: torch.dtype | None = None,
    ):
        if product_dtype not in (None, torch.float64, torch.float32):
            raise ValueError(f"product_dtype must be None, torch.float64 or torch.float32, not {product_dtype}")
        self.adapter = adapter
        self.product_dtype = product_dtype
        self._layers = dict(layers)  # name -> (module hooked, base layer)
        self._recording = False
        self._kind: str | None = None
        self._seen = 0
        self._products = 0  # XᵀX products computed (the rest were shared)
        self._cache: OrderedDict = OrderedDict()
        self._local: dict[tuple[str, str], _Accumulator] = {}
        self._reduced: dict[tuple[str, str], _Accumulator] = {}
        self._handles = []
        for name, (module, base) in self._layers.items():
            _check_layer(base, name, adapter)
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))

    # -- hooks

    def _make_hook(self, name: str):
        def hook(module, args, kwargs):
            if not self._recording:
                return None
            self._accumulate(name, args, kwargs)
            return None

        return hook

    @torch.compiler.disable
    def _accumulate(self, name: str, args: tuple, kwargs: dict) -> None:
        if _in_backward():
            return  # a checkpointed forward recomputed during backward: its inputs were counted the first time
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if x is None:
            return
        base = self._layers[name][1]
        conv = isinstance(base, nn.Conv2d)
        key = (base.kernel_size, base.stride, base.dilation, base._reversed_padding_repeated_twice) if conv else None
        version = x._version if not x.is_inference() else None  # inference tensors cannot change in place
        hit = self._cache.get((id(x), key))
        if hit is not None and hit[0]() is x and hit[1] == version:
            gram, n = hit[2], hit[3]
            self._cache.move_to_end((id(x), key))
        else:
            dtype = self.product_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
            rows = _rows(base, x, dtype)
            gram, n = _gram(rows), rows.shape[0]
            self._products += 1
            self._cache[(id(x), key)] = (weakref.ref(x), version, gram, n)
            if len(self._cache) > self._CACHE_SIZE:
                self._cache.popitem(last=False)
        acc = self._local.get((name, self._kind))
        if acc is None:
            self._local[(name, self._kind)] = _Accumulator(gram.to(torch.float64, copy=True), n)
        else:
            acc.sum.add_(gram)  # a float32 product is widened element by element inside the add (no temporary)
            acc.count += n
        self._seen += 1

    @contextlib.contextmanager
    def record(self, kind: str) -> Iterator[None]:
        """Accumulate the inputs of every forward inside the ``with`` block.

        Args:
            kind: what the inputs are, one of ``KINDS``.

        Yields:
            Nothing; on exit, at least one adapted layer must have seen an input.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown statistics kind {kind!r}; choose one of {KINDS}")
        if self._recording:
            raise RuntimeError(f"already recording {self._kind!r}; record blocks do not nest")
        if not self._handles:
            raise RuntimeError("these statistics' hooks were removed (remove() was called)")
        self._kind, self._recording, self._seen = kind, True, 0
        try:
            yield
        finally:
            self._recording, self._kind = False, None
            self._cache.clear()
        if self._seen == 0:
            raise RuntimeError(
                f"no adapted layer saw an input while recording {kind!r}. Run the model's forward inside the block; "
                "with torch.compile, create the statistics before compiling (hooks added to a compiled model are "
                "not run)"
            )

    def remove(self) -> None:
        """Remove the hooks (what was recorded stays)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- reduction and results

    def all_reduce(self, group=None) -> None:
        """Sum what every process recorded since the last call (a collective: call it on every rank).

        Layers × kinds are reduced in one fixed order, with zeros where a process saw nothing, so processes that
        recorded different kinds cannot deadlock or mix up layers; afterwards every rank holds bit-identical sums.
        In a single process it is a no-op.

        Args:
            group: the ``torch.distributed`` process group (default: the world).
        """
        import torch.distributed as dist

        if _world_size() > 1:
            keys = [(name, kind) for kind in KINDS for name in sorted(self._layers)]
            device = self._device(group)
            counts = torch.tensor([self._local[k].count if k in self._local else 0 for k in keys], device=device)
            dist.all_reduce(counts, group=group)
            for i, (name, kind) in enumerate(keys):
                if int(counts[i]) == 0:
                    continue
                acc = self._local.get((name, kind))
                n = _in_features(self._layers[name][1])
                t = acc.sum.to(device) if acc is not None else torch.zeros(n, n, dtype=torch.float64, device=device)
                dist.all_reduce(t, group=group)
                self._local[(name, kind)] = _Accumulator(t, int(counts[i]))
        for key, acc in self._local.items():
            done = self._reduced.get(key)
            if done is None:
                self._reduced[key] = acc
            else:
                done.sum = done.sum + acc.sum.to(done.sum.device)
                done.count += acc.count
        self._local = {}

    # -- state (checkpoints, resume, custom reductions)

    _PARTS = ("local", "reduced")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What has been accumulated, as plain tensors: save it with a checkpoint, restore it with ``load_state_dict``.

        Per layer and kind, ``"{part}/{kind}/{layer}/sum"``: ``Σ XᵀX``, ``(in, in)`` float64 on the device the inputs
        were on, and ``"{part}/{kind}/{layer}/count"``: the row count, an int64 scalar tensor. ``part`` is
        ``"local"`` (what this process recorded since the last ``all_reduce``) or ``"reduced"`` (already summed over
        the processes); in a single process both are summed by ``statistics()``. Nothing is copied: like
        ``nn.Module.state_dict``, the sums are the live accumulators, which later recording adds to in place, so
        copy or write them out before recording more. Every value is exact (float64 sums, integer counts), so a
        run resumed through ``load_state_dict`` ends with bit-identical statistics. Layers that saw nothing of a
        kind have no entry; a fresh recorder's state is ``{}``.

        Returns:
            ``{key: tensor}`` as above.
        """
        out: dict[str, torch.Tensor] = {}
        for part, accs in zip(self._PARTS, (self._local, self._reduced)):
            for (layer, kind), acc in accs.items():
                out[f"{part}/{kind}/{layer}/sum"] = acc.sum.detach()
                out[f"{part}/{kind}/{layer}/count"] = torch.tensor(acc.count, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor], *, device: torch.device | str | None = None) -> None:
        """Replace what has been accumulated with ``state`` (from ``state_dict``, e.g. read back from a checkpoint).

        Checked before anything changes (a bad state leaves this recorder as it was): every key names a part, a
        kind and a layer of this recorder, sums and counts come in pairs, sums are ``(in, in)`` float64 and finite,
        counts non-negative integer scalars. The sums are copied to ``device`` (default: the device of each
        layer's weight), so the recorder never aliases the caller's tensors.

        Args:
            state: what ``state_dict`` returned.
            device: where the sums go (default: each layer's weight's device).
        """
        pairs: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            head, _, field = key.rpartition("/")
            part, _, rest = head.partition("/")
            kind, _, layer = rest.partition("/")
            if (
                part not in self._PARTS
                or kind not in KINDS
                or layer not in self._layers
                or field
                not in (
                    "sum",
                    "count",
                )
            ):
                raise ValueError(
                    f"statistics state key {key!r} is not '<local|reduced>/<kind>/<layer>/<sum|count>' for a kind in "
                    f"{KINDS} and a layer of this recorder"
                )
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"statistics state {key!r} must be a tensor, not {type(value).__name__}")
            pairs.setdefault((part, kind, layer), {})[field] = value
        new: dict[str, dict[tuple[str, str], _Accumulator]] = {part: {} for part in self._PARTS}
        for (part, kind, layer), fields in pairs.items():
            where = f"{part}/{kind}/{layer}"
            if set(fields) != {"sum", "count"}:
                raise ValueError(f"statistics state {where!r} needs both 'sum' and 'count'")
            total, count = fields["sum"], fields["count"]
            n = _in_features(self._layers[layer][1])
            if total.dtype != torch.float64 or tuple(total.shape) != (n, n):
                raise ValueError(
                    f"statistics state {where}/sum must be ({n}, {n}) float64, not {tuple(total.shape)} {total.dtype}"
                )
            if count.numel() != 1 or count.dtype.is_floating_point or count.dtype.is_complex or int(count) < 0:
                raise ValueError(f"statistics state {where}/count must be a non-negative integer scalar")
            if not bool(torch.isfinite(total).all()):
                raise ValueError(f"statistics state {where}/sum holds non-finite values")
            target = device if device is not None else self._layers[layer][1].weight.device
            new[part][(layer, kind)] = _Accumulator(total.detach().to(target, copy=True), int(count))
        self._local, self._reduced = new["local"], new["reduced"]

    def _device(self, group) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def statistics(
        self,
        *,
        exact_max: int = EXACT_MAX_FEATURES,
        rank: int = SKETCH_RANK,
        lossless_rank: int = LOSSLESS_RANK,
    ) -> AdapterStatistics:
        """What was recorded, in stored form.

        Layers that never saw an input of a kind have no moment of that kind. Layers whose sums are bit-identical
        (they were fed the same tensors) share one ``Moment`` object, and one entry in the saved file.

        Args:
            exact_max, rank, lossless_rank: the stored form, as in ``sketch_moment``.

        Returns:
            The ``AdapterStatistics``.
        """
        if _world_size() > 1 and any(a.count for a in self._local.values()):
            raise RuntimeError(
                "this process recorded statistics that were not summed over the processes: call all_reduce() on "
                "every process first (then save on one)"
            )
        sums = dict(self._reduced)
        for key, acc in self._local.items():  # single process: no reduction needed
            sums[key] = _Accumulator(acc.sum + sums[key].sum, acc.count + sums[key].count) if key in sums else acc
        layers: dict[str, dict[str, Moment]] = {}
        shared: dict[tuple, Moment] = {}
        for name in self._layers:
            for kind in KINDS:
                acc = sums.get((name, kind))
                if acc is None or acc.count == 0:
                    continue
                S = acc.sum.detach().to("cpu", torch.float64)
                digest = (acc.count, hashlib.sha256(S.numpy().tobytes()).hexdigest())
                if digest not in shared:
                    G = S / acc.count
                    G = (G + G.T) / 2  # exactly symmetric (a + b == b + a)
                    shared[digest] = sketch_moment(
                        G, acc.count, exact_max=exact_max, rank=rank, lossless_rank=lossless_rank
                    )
                layers.setdefault(name, {})[kind] = shared[digest]
        return AdapterStatistics(layers, adapter=self.adapter)


def _unwrap(model):
    """The module under DDP / accelerate / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def _adapters_of(layer) -> set[str]:
    names = set()
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict, dict)):
            names.update(container.keys())
    return names


def _adapted_layers(model, adapter_name: str | None) -> tuple[dict[str, tuple[nn.Module, nn.Module]], str]:
    components = None
    if isinstance(model, Mapping):
        components = dict(model)
    elif not isinstance(model, nn.Module) and isinstance(getattr(model, "components", None), dict):
        components = {k: v for k, v in model.components.items() if isinstance(v, nn.Module)}  # a diffusers pipeline
    roots = {}
    for component, m in (components or {None: model}).items():
        m = _unwrap(m)
        if isinstance(m, PeftModel):
            m = m.base_model.model
        elif isinstance(m, BaseTuner):
            m = m.model
        roots[component] = m
    found: dict[str, tuple[nn.Module, nn.Module, set[str]]] = {}
    for component, root in roots.items():
        outer: list[str] = []  # a tuner layer inside another (its base layer) is the outer one's business
        for name, module in root.named_modules():
            if isinstance(module, BaseTunerLayer) and not any(name.startswith(p + ".") for p in outer):
                outer.append(name)
                found[layer_key(component, name)] = (module, module.get_base_layer(), _adapters_of(module))
    every = set().union(*(a for *_, a in found.values())) if found else set()
    if adapter_name is None:
        if len(every) != 1:
            raise ValueError(
                f"the model holds adapters {sorted(every)}; pass adapter_name= to say whose statistics to record"
                if every
                else "the model has no adapter layers (wrap it with get_peft_model or inject an adapter first)"
            )
        (adapter_name,) = every
    layers = {name: (m, base) for name, (m, base, names) in found.items() if adapter_name in names}
    if not layers:
        raise ValueError(f"no layer holds an adapter named {adapter_name!r} (adapters: {sorted(every)})")
    return layers, adapter_name


class InputStatistics(_Recorder):
    """Records, per adapted layer and kind, the second moment ``XᵀX`` of the layer's inputs (float64) and their count.

    Inputs: ``nn.Linear`` and ``Conv1D`` tokens ``(…, in)``; ``nn.Conv2d`` unfolded patches ``(C_in·kh·kw)`` with
    the conv's stride, padding and dilation.

    Example::

        stats = InputStatistics(model)           # before torch.compile, if you compile
        for batch in loader:
            with stats.record("concept"):
                loss = model(**batch).loss
            ...
        stats.all_reduce()                       # every rank, when training data-parallel
        stats.save_pretrained("rex")             # rex/adapter_statistics.safetensors

    Forwards that run during a backward pass (gradient-checkpointing recomputations) are not counted. Costs one
    Python call per adapted layer and forward when not recording; ``remove()`` takes the hooks out.

    The dtype of each forward's ``XᵀX`` product (``product_dtype``; the running sums are float64 whatever it is),
    by default the inputs' own precision — float64 for float64 inputs, float32 for everything else
    (float32, and float16 / bfloat16 inputs widened to float32), never TF32. A float32 product of ``n`` rows is
    within ``γ_n = n·u / (1 − n·u)`` (``u = 2⁻²⁴``) of the exact one elementwise, relative to ``|X|ᵀ|X|``, for any
    summation order; measured on attention-shaped batches (hundreds to 32k rows, 320–768 wide) its relative
    Frobenius error is about 1e-7 per batch (tests/test_statistics.py checks ≤ 1e-6), far below what the merge
    can resolve (its ridge is 1e-3 of the mean eigenvalue). It costs half a float64 product on CPUs and much less
    on GPUs without fast float64 (docs/benchmarks.md). ``torch.float64`` forces products exact to float64 rounding.

    Args:
        model: a ``PeftModel`` (LoRA, OrthoLoRA, BlockLoRA, ...), a model with adapters injected in place
            (``inject_adapter_in_model``, diffusers' ``add_adapter``), either under DDP / accelerate /
            ``torch.compile`` wrappers, or a mapping ``{component: model}`` / a diffusers pipeline whose components
            carry adapters (layer names are then prefixed with the component, as in a diffusers LoRA file).
        adapter_name: whose layers (default: the only adapter).
        product_dtype: the dtype of each forward's product (default ``None``: as above).
    """

    def __init__(self, model, *, adapter_name: str | None = None, product_dtype: torch.dtype | None = None):
        layers, adapter_name = _adapted_layers(model, adapter_name)
        super().__init__(layers, adapter_name, product_dtype)

    @property
    def layer_names(self) -> list[str]:
        """The statistics keys of the layers this records."""
        return list(self._layers)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        exact_max: int = EXACT_MAX_FEATURES,
        rank: int = SKETCH_RANK,
        lossless_rank: int = LOSSLESS_RANK,
    ) -> str:
        """Write ``save_directory/adapter_statistics.safetensors`` (exact Grams for small layers, sketches for large).

        In a multi-process run call ``all_reduce()`` on every process first; it is refused otherwise.

        Args:
            save_directory: the folder (created if missing), usually the adapter's own.
            overwrite: replace an existing file.
            exact_max, rank, lossless_rank: the stored form, as in ``sketch_moment``.

        Returns:
            The file's path.
        """
        stats = self.statistics(exact_max=exact_max, rank=rank, lossless_rank=lossless_rank)
        return stats.save_pretrained(save_directory, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------- file


def save_statistics(stats: AdapterStatistics, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write statistics to one safetensors file, atomically (temporary file, then one rename).

    Layout: per distinct moment ``i`` the tensors ``"{i}.gram"`` (float64 ``(in, in)``) or ``"{i}.basis"``
    (float32 ``(in, k)``) and ``"{i}.values"`` (float64 ``(k,)``); metadata ``format``, ``format_version``,
    ``moments`` (JSON list of ``{count, in_features, residual, sketch}``) and ``layers`` (JSON
    ``{layer: {kind: i}}``). Moments shared by several layers are written once.

    Args:
        stats: the statistics.
        path: the file to write.
        overwrite: replace an existing file.

    Returns:
        ``path``.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not stats.layers:
        raise ValueError("no statistics to save: nothing was recorded")
    index: dict[int, int] = {}
    tensors: dict[str, torch.Tensor] = {}
    moments: list[dict] = []
    layers: dict[str, dict[str, int]] = {}
    for layer, by_kind in stats.layers.items():
        if not _LAYER_NAME.match(layer):
            raise ValueError(f"layer name {layer!r} cannot be stored")
        for kind, m in by_kind.items():
            if kind not in KINDS:
                raise ValueError(f"unknown statistics kind {kind!r} for layer {layer!r}")
            if id(m) not in index:
                i = index[id(m)] = len(moments)
                moments.append(
                    {
                        "count": int(m.count),
                        "in_features": m.in_features,
                        "residual": float(m.residual),
                        "sketch": m.is_sketch,
                    }
                )
                if m.is_sketch:
                    tensors[f"{i}.basis"] = m.basis.to(torch.float32).contiguous()
                    tensors[f"{i}.values"] = m.values.to(torch.float64).contiguous()
                else:
                    tensors[f"{i}.gram"] = m.gram.to(torch.float64).contiguous()
            layers.setdefault(layer, {})[kind] = index[id(m)]
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"statistics tensor {key} holds non-finite values; nothing was written")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moments": json.dumps(moments),
        "layers": json.dumps(layers, sort_keys=True),
    }
    if stats.adapter is not None:
        metadata["adapter"] = str(stats.adapter)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".statistics-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _bad(message: str, adapter: str, layer: str | None = None) -> AdapterFileError:
    return AdapterFileError(f"{STATISTICS_NAME}: {message}", adapter=adapter, layer=layer)


def _json_field(metadata: dict, key: str, kind: type, adapter: str):
    if key not in metadata:
        raise _bad(f"metadata {key!r} is missing (not a peft-ortho statistics file)", adapter)
    try:
        value = json.loads(metadata[key])
    except (TypeError, ValueError) as e:
        raise _bad(f"metadata {key!r} is not valid JSON ({e})", adapter) from e
    if not isinstance(value, kind):
        raise _bad(f"metadata {key!r} must be a JSON {kind.__name__}", adapter)
    return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load_statistics(path_or_folder: str | os.PathLike, *, adapter: str) -> AdapterStatistics:
    """Read and validate a statistics file (or a folder's ``adapter_statistics.safetensors``).

    Downloaded files are hostile input: everything is checked before it is used — the format and metadata types,
    the layer names and kinds, every moment's count (positive integer), shapes (``gram`` ``(in, in)``, ``basis``
    ``(in, k)`` with ``1 ≤ k ≤ in``, ``values`` ``(k,)``), dtypes, finiteness, exact symmetry and a non-negative
    diagonal of Grams, non-negative eigenvalues and residual, orthonormal bases, and that no tensor is missing or
    left over. Any failure raises ``AdapterFileError`` naming ``adapter`` and the layer.

    Args:
        path_or_folder: the file, or a folder holding ``adapter_statistics.safetensors``.
        adapter: the adapter name errors name.

    Returns:
        The ``AdapterStatistics``.
    """
    path = os.fspath(path_or_folder)
    if os.path.isdir(path):
        path = os.path.join(path, STATISTICS_NAME)
    refuse_pickle(path, adapter)
    if not os.path.isfile(path):
        raise _bad(f"no such file: {path}", adapter)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            raw = _validate_header(metadata, keys, adapter)
            moments_meta, layers_meta, owner = raw
            moments = [_read_moment(f, i, meta, adapter, owner[i]) for i, meta in enumerate(moments_meta)]
    except AdapterFileError:
        raise
    except Exception as e:  # safetensors' own errors for corrupt or truncated files
        raise _bad(f"not a readable safetensors file ({e})", adapter) from e
    layers = {layer: {kind: moments[i] for kind, i in by_kind.items()} for layer, by_kind in layers_meta.items()}
    return AdapterStatistics(layers, adapter=adapter)


def _validate_header(metadata: dict, keys: set[str], adapter: str):
    if metadata.get("format") != FORMAT:
        raise _bad(f"metadata 'format' is {metadata.get('format')!r}, expected {FORMAT!r}", adapter)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _bad(f"format_version {metadata.get('format_version')!r} is not supported (this reads 1)", adapter)
    moments = _json_field(metadata, "moments", list, adapter)
    layers = _json_field(metadata, "layers", dict, adapter)
    owner: dict[int, tuple[str, str]] = {}
    for layer, by_kind in layers.items():
        if not isinstance(layer, str) or not _LAYER_NAME.match(layer):
            raise _bad(f"bad layer name {layer!r}", adapter)
        if not isinstance(by_kind, dict) or not by_kind:
            raise _bad("must map kinds to moment indices", adapter, layer)
        for kind, i in by_kind.items():
            if kind not in KINDS:
                raise _bad(f"unknown kind {kind!r} (known: {', '.join(KINDS)})", adapter, layer)
            if not _is_int(i) or not 0 <= i < len(moments):
                raise _bad(
                    f"kind {kind!r} points at moment {i!r}, not one of the {len(moments)} stored", adapter, layer
                )
            owner.setdefault(i, (layer, kind))
    expected = set()
    for i, meta in enumerate(moments):
        if i not in owner:
            raise _bad(f"moment {i} belongs to no layer", adapter)
        layer, kind = owner[i]
        if not isinstance(meta, dict) or set(meta) != {"count", "in_features", "residual", "sketch"}:
            raise _bad(
                f"{kind!r}: moment entry must have exactly count, in_features, residual, sketch", adapter, layer
            )
        count, n, residual, sketch = meta["count"], meta["in_features"], meta["residual"], meta["sketch"]
        if not _is_int(count) or not 0 < count <= _MAX_COUNT:
            raise _bad(f"{kind!r}: count must be a positive integer, got {count!r}", adapter, layer)
        if not _is_int(n) or not 0 < n <= _MAX_FEATURES:
            raise _bad(f"{kind!r}: in_features must be a positive integer, got {n!r}", adapter, layer)
        if not isinstance(sketch, bool):
            raise _bad(f"{kind!r}: sketch must be true or false, got {sketch!r}", adapter, layer)
        if not (_is_int(residual) or isinstance(residual, float)) or not math.isfinite(residual) or residual < 0:
            raise _bad(f"{kind!r}: residual must be a finite number ≥ 0, got {residual!r}", adapter, layer)
        expected |= {f"{i}.basis", f"{i}.values"} if sketch else {f"{i}.gram"}
    if keys != expected:
        extra, missing = sorted(keys - expected), sorted(expected - keys)
        raise _bad(f"tensors do not match the metadata (missing {missing}, unexpected {extra})", adapter)
    return moments, layers, owner


def _read_moment(f, i: int, meta: dict, adapter: str, owner: tuple[str, str]) -> Moment:
    layer, kind = owner
    n = meta["in_features"]

    def tensor(name: str, dtype: str, shape_ok) -> torch.Tensor:
        sl = f.get_slice(f"{i}.{name}")
        shape, got = list(sl.get_shape()), sl.get_dtype()
        if got != dtype or not shape_ok(shape):
            raise _bad(
                f"{kind!r}: {name} has dtype {got} and shape {shape}, which this layer cannot have", adapter, layer
            )
        t = f.get_tensor(f"{i}.{name}")
        if not bool(torch.isfinite(t).all()):
            raise _bad(f"{kind!r}: {name} holds non-finite values (NaN/Inf)", adapter, layer)
        return t

    if not meta["sketch"]:
        G = tensor("gram", "F64", lambda s: s == [n, n])
        if not torch.equal(G, G.T):
            raise _bad(f"{kind!r}: the Gram matrix is not symmetric", adapter, layer)
        if bool((G.diagonal() < 0).any()):
            raise _bad(
                f"{kind!r}: the Gram matrix has a negative diagonal entry (not a second moment)", adapter, layer
            )
        return Moment(count=meta["count"], gram=G)
    U = tensor("basis", "F32", lambda s: len(s) == 2 and s[0] == n and 1 <= s[1] <= n)
    k = U.shape[1]
    values = tensor("values", "F64", lambda s: s == [k])
    if bool((values < 0).any()):
        raise _bad(f"{kind!r}: negative eigenvalues (not a second moment)", adapter, layer)
    U = U.to(torch.float64)
    if float((U.T @ U - torch.eye(k, dtype=torch.float64)).abs().max()) > _ORTHONORMAL_TOL:
        raise _bad(f"{kind!r}: the sketch basis is not orthonormal", adapter, layer)
    return Moment(count=meta["count"], basis=U, values=values, residual=float(meta["residual"]))


def check_statistics(stats: AdapterStatistics, in_features: Mapping[str, int], *, adapter: str) -> None:
    """Refuse statistics whose layers are not the adapter's, or of another width (``AdapterFileError``).

    Args:
        stats: the statistics.
        in_features: the adapter's layers, ``{layer key: in}``.
        adapter: the adapter name errors name.
    """
    for layer, by_kind in stats.layers.items():
        if layer not in in_features:
            raise AdapterFileError(
                f"{STATISTICS_NAME} has statistics for a layer the adapter does not have", adapter=adapter, layer=layer
            )
        for kind, m in by_kind.items():
            if m.in_features != in_features[layer]:
                raise AdapterFileError(
                    f"{STATISTICS_NAME}: {kind!r} statistics are {m.in_features} wide but the layer has "
                    f"{in_features[layer]} inputs",
                    adapter=adapter,
                    layer=layer,
                )


# --------------------------------------------------------------------------------------------------- calibration


def _pipeline_parts(target):
    """``{component: module}`` of a diffusers pipeline, or ``None`` for a plain model (a causal LM)."""
    comps = getattr(target, "components", None)
    if isinstance(target, nn.Module) or not isinstance(comps, dict):
        return None
    return {k: v for k, v in comps.items() if isinstance(v, nn.Module)}


def _locate(adapter, target) -> dict[str, tuple[nn.Module, tuple]]:
    """``{statistics key: (module of target, adapter layer)}``; every adapter layer must exist in the target."""
    parts = _pipeline_parts(target)
    _refuse_loaded_adapters(target, adapter.name)
    layers = adapter.layers()
    home = None  # a PEFT folder's layers on a pipeline: the one component that has them all
    unplaced = [name for c, name in layers if c is None]
    if unplaced and parts is not None:
        home = next((r for r in parts.values() if all(_has(r, name) for name in unplaced)), None)
        if home is None:
            raise PeftOrthoError(
                "no component of the pipeline has all the adapter's layers", adapter=adapter.name, layer=unplaced[0]
            )
    out = {}
    for comp, layer in layers:
        if comp is None and parts is not None:
            root = home
        elif comp is not None:
            if parts is None or comp not in parts:
                raise PeftOrthoError(
                    f"the adapter adapts component {comp!r}, which the target does not have", adapter=adapter.name
                )
            root = parts[comp]
        else:
            root = target
        if not _has(root, layer):
            raise PeftOrthoError("the target has no such module", adapter=adapter.name, layer=layer_key(comp, layer))
        out[layer_key(comp, layer)] = (root.get_submodule(layer), (comp, layer))
    return out


def _refuse_loaded_adapters(target, adapter_name: str | None) -> None:
    """Calibration runs the *base* model: a target with peft adapters already loaded would run another model."""
    parts = _pipeline_parts(target)
    for comp, root in (parts if parts is not None else {None: target}).items():
        for name, m in root.named_modules():
            if isinstance(m, BaseTunerLayer):
                raise PeftOrthoError(
                    f"calibration runs the base model, but the target has adapters loaded (on "
                    f"{layer_key(comp, name)!r}); unload them first (pipe.unload_lora_weights(), model.unload())",
                    adapter=adapter_name,
                )


def _has(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
        return True
    except AttributeError:
        return False


def _delta_hook(base: nn.Module, factors):
    """A forward hook adding ``scale · B A x`` to ``base``'s output (the adapter, applied without touching weights)."""
    w = base.weight
    A = factors.A.to(device=w.device, dtype=w.dtype)
    B = factors.B.to(device=w.device, dtype=w.dtype)
    scale = factors.scale
    if isinstance(base, nn.Conv2d):
        A4 = A.reshape(factors.a_shape)
        B4 = B.reshape(B.shape[0], B.shape[1], 1, 1)

        def hook(module, args, output):
            return output + scale * F.conv2d(module._conv_forward(args[0], A4, None), B4)
    else:

        def hook(module, args, output):
            return output + scale * F.linear(F.linear(args[0], A), B)

    return hook


@contextlib.contextmanager
def _frozen_eval(modules: list[nn.Module]) -> Iterator[None]:
    """Every module in eval mode (no dropout) for the block; the training flags restored exactly afterwards."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def calibrate(
    adapter,
    target,
    prompt,
    *,
    steps: int = 4,
    num_images: int = 2,
    guidance_scale: float = 7.5,
    prior_prompt=None,
    tokenizer=None,
    seed: int = 0,
    exact_max: int = EXACT_MAX_FEATURES,
    rank: int = SKETCH_RANK,
    lossless_rank: int = LOSSLESS_RANK,
) -> AdapterStatistics:
    """Statistics for an adapter that comes without them, computed by running the base with that adapter applied.

    The adapter is applied by forward hooks that add ``scale · B A x`` to each adapted layer's output; no weight
    is changed and nothing is loaded into ``target``, which is bit-unchanged afterwards (its modules' training
    flags too; the scheduler is copied). A target that already has adapters loaded is refused.

    Args:
        adapter: a loaded ``peft_ortho.merging.load.Adapter`` (PEFT folder or diffusers / kohya file).
        target: a Stable Diffusion style diffusers pipeline (``tokenizer``, ``text_encoder``, ``unet``,
            ``scheduler``), or a base model (a causal LM) whose module names are the adapter's layer names.
        prompt: the adapter's trigger prompt. Pipelines: a string (or list of strings). Causal LMs: a string or list
            of strings (with ``tokenizer=``), or input ids ``(batch, seq)``.
        steps: denoising steps (DDIM-style, the pipeline's scheduler) from ``num_images`` seeded noise latents.
        guidance_scale: the classifier-free guidance that steps the latents (as at sampling time).
        prior_prompt: ordinary / class inputs for ``"prior"`` (a class prompt such as ``"a photo of a dog"``, or
            ordinary text / ids for an LLM), run through the same procedure; ``None``: no ``"prior"`` statistics.
        tokenizer: for causal LMs given strings.
        seed: of the initial latents.
        exact_max, rank, lossless_rank: stored form, as in ``sketch_moment``.

    Returns:
        ``AdapterStatistics`` keyed like the adapter's layers. Pipelines: text-encoder layers see the prompt's
        tokens (``"concept"``) and the empty prompt's (``"unconditional"``); UNet layers see every denoising step's
        conditional pass (``"concept"``, so cross-attention ``to_k``/``to_v`` see the adapted prompt embedding) and
        unconditional pass (``"unconditional"``). ``"prior"`` is what the same run gives for ``prior_prompt`` (its
        conditional passes only). Causal LMs: every position of the prompts (``"concept"``), of ``prior_prompt``
        (``"prior"``).
    """
    located = _locate(adapter, target)
    layers = {key: (module, module) for key, (module, _) in located.items()}
    rec = _Recorder(layers, adapter.name)
    handles = [
        module.register_forward_hook(_delta_hook(module, adapter.factors(al))) for module, al in located.values()
    ]
    parts = _pipeline_parts(target)
    try:
        modules = list(parts.values()) if parts is not None else [target]
        with torch.no_grad(), _frozen_eval(modules):
            if parts is None:
                _run_lm(rec, target, prompt, "concept", tokenizer)
                if prior_prompt is not None:
                    _run_lm(rec, target, prior_prompt, "prior", tokenizer)
            else:
                run = dict(steps=steps, num_images=num_images, guidance_scale=guidance_scale, seed=seed)
                _run_diffusion(rec, target, prompt, "concept", record_uncond=True, **run)
                if prior_prompt is not None:
                    _run_diffusion(rec, target, prior_prompt, "prior", record_uncond=False, **run)
    finally:
        for h in handles:
            h.remove()
        rec.remove()
    rec._reduced, rec._local = rec._local, {}  # computed here, in this process: nothing to sum over ranks
    return rec.statistics(exact_max=exact_max, rank=rank, lossless_rank=lossless_rank)


@contextlib.contextmanager
def _maybe_record(rec: _Recorder, kind: str | None) -> Iterator[None]:
    """``rec.record(kind)``, tolerating a pass no adapted layer sees (e.g. a UNet-only adapter's text encoding)."""
    if kind is None:
        yield
        return
    try:
        with rec.record(kind):
            yield
    except RuntimeError as e:
        if "no adapted layer saw an input" not in str(e):
            raise


def _run_lm(rec: _Recorder, model, prompt, kind: str, tokenizer) -> None:
    if isinstance(prompt, torch.Tensor):
        batches = [prompt if prompt.dim() == 2 else prompt.unsqueeze(0)]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, torch.Tensor) for p in prompt):
        batches = [p if p.dim() == 2 else p.unsqueeze(0) for p in prompt]
    else:
        if tokenizer is None:
            raise ValueError("calibrating a causal LM on text needs tokenizer= (or pass input ids)")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        batches = [tokenizer(t, return_tensors="pt").input_ids for t in texts]
    device = next(model.parameters()).device
    with rec.record(kind):
        for ids in batches:
            model(input_ids=ids.to(device))


def calibration_inputs(
    adapter,
    pipeline,
    prompt,
    *,
    steps: int = 4,
    num_images: int = 2,
    guidance_scale: float = 7.5,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """What a pipeline's UNet is called with while it samples ``prompt`` with ``adapter`` applied: calibration batches
    for the sequential merge (``compose(method="sequential", inputs=...)``) that need no training images.

    The adapter is applied by forward hooks, as in ``calibrate``; the pipeline is bit-unchanged afterwards. The
    trajectory is ``calibrate``'s: ``steps`` denoising steps of the pipeline's scheduler from ``num_images`` seeded
    latents, stepped with classifier-free guidance ``ε_u + guidance_scale · (ε_c − ε_u)``, so the batches hold the
    states the adapted model itself passes through, under the prompt and under the empty prompt.

    Args:
        adapter: a loaded ``peft_ortho.merging.load.Adapter``, or ``None`` for the base pipeline's own trajectory
            (ordinary inputs for ``prior_inputs``, from a class or everyday prompt).
        pipeline: a Stable Diffusion style diffusers pipeline (``tokenizer``, ``text_encoder``, ``unet``,
            ``scheduler``) without adapters loaded.
        prompt: a string (``num_images`` samples of it) or a list of strings (one sample each).
        steps, num_images, guidance_scale, seed: the sampler, as in ``calibrate``.

    Returns:
        One batch per denoising step, keyword arguments of ``pipeline.unet``: ``{"sample": (2B, C, H, W),
        "timestep": (2B,), "encoder_hidden_states": (2B, L, D)}`` with the conditional half first (``B`` prompts).
    """
    parts = _pipeline_parts(pipeline)
    if parts is None:
        raise ValueError("calibration_inputs needs a diffusers pipeline (for a causal LM, pass its prompts' ids)")
    if adapter is None:
        _refuse_loaded_adapters(pipeline, None)  # the base's trajectory, not a loaded adapter's
        located = {}
    else:
        located = _locate(adapter, pipeline)
    handles = [m.register_forward_hook(_delta_hook(m, adapter.factors(al))) for m, al in located.values()]
    calls: list[dict[str, torch.Tensor]] = []
    try:
        with torch.no_grad(), _frozen_eval(list(parts.values())):
            run = dict(steps=steps, num_images=num_images, guidance_scale=guidance_scale, seed=seed)
            _run_diffusion(None, pipeline, prompt, None, record_uncond=False, calls=calls, **run)
    finally:
        for h in handles:
            h.remove()
    return calls


def _run_diffusion(
    rec, pipe, prompt, kind, *, record_uncond, steps, num_images, guidance_scale, seed, calls=None
) -> None:
    """Guided sampling of ``prompt`` through ``pipe`` (the UNet's inputs recorded under ``kind`` by ``rec``, and
    appended to ``calls`` as one batch per step when given)."""
    for part in ("tokenizer", "text_encoder", "unet", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise ValueError(f"calibration needs a Stable Diffusion style pipeline with a {part}")
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)

    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return te(ids.input_ids.to(te.device))[0].to(unet.dtype)

    with _maybe_record(rec, kind):
        cond = encode(prompts)
    with _maybe_record(rec, "unconditional" if record_uncond else None):
        uncond = encode([""] * len(prompts))
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), unet.config.in_channels, size, size, generator=g)
    latents = (latents * scheduler.init_noise_sigma).to(device=unet.device, dtype=unet.dtype)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        with _maybe_record(rec, kind):
            eps_c = unet(x, t, encoder_hidden_states=cond).sample
        with _maybe_record(rec, "unconditional" if record_uncond else None):
            eps_u = unet(x, t, encoder_hidden_states=uncond).sample
        if calls is not None:
            both = torch.cat([x, x])
            calls.append(
                {
                    "sample": both,
                    "timestep": torch.as_tensor(t, device=both.device).reshape(1).expand(len(both)).clone(),
                    "encoder_hidden_states": torch.cat([cond, uncond]),
                }
            )
        latents = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, latents).prev_sample


def compare_statistics(
    calibrated: AdapterStatistics, recorded: AdapterStatistics, adapter, *, kind: str = "concept"
) -> dict[str, dict[str, float]]:
    """How close ``calibrated`` comes to ``recorded`` on what a merge uses, per layer of ``adapter``.

    For a layer with down-projection ``A`` ``(r, in)`` (what the merge multiplies ``G`` by):

    - ``relative_error = ‖A (G_cal − G_rec)‖_F / ‖A G_rec‖_F`` (0 is perfect);
    - ``overlap = ‖U_calᵀ U_rec‖_F² / r`` of the top-``r`` eigenvectors of the two (1: the same ``r``-dimensional
      input subspace dominates both; ``r/in``: no better than chance).

    Args:
        calibrated: statistics from ``calibrate``.
        recorded: statistics recorded while training.
        adapter: the loaded adapter (``peft_ortho.merging.load.Adapter``) whose ``A`` factors weigh the comparison.
        kind: which moments to compare.

    Returns:
        ``{layer key: {"relative_error", "overlap"}}`` for the layers both hold ``kind`` for.
    """
    out = {}
    for comp, layer in adapter.layers():
        key = layer_key(comp, layer)
        m_cal, m_rec = calibrated.moment(key, kind), recorded.moment(key, kind)
        if m_cal is None or m_rec is None:
            continue
        A = adapter.factors((comp, layer), dtype=torch.float64).A
        num = torch.linalg.norm(m_cal.right_multiply(A) - m_rec.right_multiply(A))
        den = torch.linalg.norm(m_rec.right_multiply(A))
        r = min(A.shape[0], m_rec.in_features)
        U_cal = torch.linalg.eigh(m_cal.dense())[1][:, -r:]
        U_rec = torch.linalg.eigh(m_rec.dense())[1][:, -r:]
        overlap = float(torch.linalg.norm(U_cal.T @ U_rec) ** 2 / r)
        out[key] = {"relative_error": float(num / den) if den > 0 else float("inf"), "overlap": overlap}
    return out
