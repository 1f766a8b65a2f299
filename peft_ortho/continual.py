"""Continual personalization: learn task after task with LoRA, keeping no past adapters (Staniszewski et al., 2024).

Concepts arrive one after another. Between tasks only the current model is kept, plus the least extra state a
strategy needs; past adapters and past data are gone. ``ContinualLearner`` carries a model through the sequence:

.. code-block:: python

    from peft import LoraConfig
    from peft_ortho.continual import ContinualLearner, run_continual, task_matrix_metrics

    learner = ContinualLearner(model, "merge_and_orthogonal_init", LoraConfig(r=4, target_modules=["to_q", "to_v"]))
    for task in tasks:
        peft_model = learner.begin_task()  # a peft model ready to train
        train(peft_model, task)  # your own loop
        learner.end_task()  # fuse / select / accumulate, per the strategy
        learner.save("state")  # safetensors + JSON; ContinualLearner.resume("state", base_model) on another day

Notation (peft's letters): a targeted layer ``W ∈ R^{out×in}``, task ``t``'s adapter ``ΔW_t = s · B_t A_t`` with
``A_t ∈ R^{r×in}`` (``lora_A``), ``B_t ∈ R^{out×r}`` (``lora_B``), ``s = lora_alpha / r``; ``W_0`` the base weight.
Conv kernels are flattened to ``in = C_in·k·k`` as peft does; ``Conv1D`` (GPT-2) is handled by peft's
``fan_in_fan_out``.

Strategies (**paper** = the paper and its released code; **ours** = where we chose):

- ``"naive"`` (paper): one adapter keeps training across tasks; the model is ``W_0 + s·B A`` with the latest ``B, A``.
  Kept between tasks: the adapter (it *is* the current model). Base weights are never touched.
- ``"merge_and_init"`` (paper): after each task fuse ``W_t = W_{t-1} + s·B_t A_t``, then start a fresh adapter
  (peft's init: ``B = 0``, ``A`` random). Kept: the fused model only.
- ``"merge_and_orthogonal_init"`` (paper's rule, our merge): as ``merge_and_init``, but the fresh ``A_t`` is made
  orthogonal, column by column in rank space, to the sum of the previous down-projections ``S = Σ_{s<t} A_s``:
  ``A_t[:, j] · S[:, j] = 0`` for every input column ``j``. The merge is the **product** ``W_t = W_{t-1} + s·B_t A_t``;
  the released code instead stores factor sums ``(ΣB)(ΣA)``, which adds cross terms ``B_i A_j`` no task trained.
  Kept: the fused model and ``S`` (one ``r×in`` matrix per layer, constant in the number of tasks).
  *Ours:* the column is the projection of peft's fresh random init, ``a ← a − (a·s / s·s) s``, rescaled to the
  init's norm (the released code takes an arbitrary unit vector of the orthogonal complement from an SVD). With
  ``r = 1`` the complement is ``{0}``, so rank 1 is refused.
- ``"magnitude"`` (paper): fuse, then per weight keep whichever task vector is larger in magnitude:
  ``τ = where(|τ_t| ≥ |τ_{t-1}|, τ_t, τ_{t-1})`` with ``τ_t = s·B_t A_t`` the new task's vector and ``τ_{t-1}`` the
  running one, and ``W_t = W_0 + τ``. Kept in memory: ``W_0`` of the targeted layers (*ours*: rather than ``τ``; both
  are one copy of the targeted weights. With ``W_0`` kept, every weight is ``W_0 + τ_s`` for the task ``s`` that won
  it, rounded once, with no drift over tasks; the running ``τ_{t-1}`` is read as ``W_{t-1} − W_0``, as the released
  code does). On disk ``W_0`` is not stored: it is the base model you pass to ``resume``, verified by fingerprint.
- ``"orthogonal"`` (ours, with ``OrthoLoraConfig``): task ``t`` takes slot ``k + t`` of the shared orthogonal basis
  (``k`` = the config's integer ``slot``, else 0), trains only ``B_t``, and is fused like ``merge_and_init``. Since
  ``A_t A_sᵀ = 0``, task ``t``'s adapter reads input directions disjoint from those earlier tasks' adapters read.
  Kept: the fused model only. Capacity: ``in // r`` tasks on the narrowest targeted layer.

Saved state (``save``): ``continual_state.json`` (strategy, tasks done, the adapter config, seed, a SHA-256
fingerprint of the base weights of the targeted layers) and ``continual_state.safetensors``: the targeted layers'
fused weights (merge strategies; never the whole model), or the adapter (``naive``), plus ``S`` for
``merge_and_orthogonal_init``. ``resume`` refuses a different strategy, adapter config or base model.

Fresh adapters are initialised from a seed derived from ``(seed, task index)``, not from the global RNG, so a run
resumed from disk is bit-identical to an uninterrupted one (given the same training loop).

Metrics (``task_matrix_metrics``): ``M[s, t]`` = score of task ``s`` after training task ``t``; see its docstring.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from ._io import atomic_dir, mmap_safetensors, refuse_pickle
from ._version import __version__
from .errors import BasisError, PeftOrthoError, UnsupportedFeatureError, UnsupportedLayerError
from .lora_format import PLAIN_LORA_REFUSALS, config_dict
from .tuners.ortho_lora import OrthoLoraConfig

STATE_FORMAT = "peft_ortho.continual/1"
STATE_JSON = "continual_state.json"
STATE_TENSORS = "continual_state.safetensors"
# Config keys that legitimately differ between two runs of the same learner (peft fills them from the model).
_VOLATILE_CONFIG_KEYS = ("base_model_name_or_path", "revision")

__all__ = [
    "STRATEGIES",
    "ContinualLearner",
    "ContinualMetrics",
    "ContinualStateError",
    "Strategy",
    "format_metrics_table",
    "orthogonal_init",
    "run_continual",
    "task_matrix_metrics",
]


class ContinualStateError(PeftOrthoError, ValueError):
    """A continual state cannot be used as asked (other strategy, other base model, corrupt files, misuse)."""


# ---------------------------------------------------------------------------------------------------------- strategies


class Strategy:
    """One continual strategy as a few small hooks (as peft's ``LoraVariant`` is for a LoRA layer).

    The base class is ``merge_and_init``: peft's fresh init for every task, the merge ``W ← W + s·B A``, no state
    besides the model. A strategy overrides what it changes: the init of a task's adapter (``init_adapter``), the
    merge (``merged``), the state it keeps between tasks (``initial_extra``, ``after_merge``, saved under
    ``saved_extra`` when it is not the base model itself), and what it refuses (``check_config``, ``check_layer``,
    ``check_task``).
    """

    name = "merge_and_init"
    fuses = True  # False: the adapter itself is carried from task to task (naive), nothing is fused
    assigns_slots = False  # True: each task takes the next slot of the shared basis (orthogonal)
    saved_extra: str | None = None  # name of the extra tensor per layer written to the state file, if any

    def check_config(self, config: LoraConfig) -> None:
        """Refuse a config this strategy cannot run (the checks every strategy makes are in ``_check_config``).

        Args:
            config: the learner's adapter config.
        """

    def check_layer(self, name: str, layer: LoraLayer, adapter_name: str) -> None:
        """Refuse a targeted layer (read once, on the meta device, when the learner is created).

        Args:
            name: the layer's name in the base model.
            layer: its peft LoRA layer.
            adapter_name: the learner's adapter name.
        """

    def task_config(self, config: LoraConfig, first_slot: int, t: int) -> LoraConfig:
        """The adapter config of task ``t``: a copy of the learner's.

        Args:
            config: the learner's adapter config.
            first_slot: the config's integer slot, else 0.
            t: the task index.

        Returns:
            A new config.
        """
        return copy.deepcopy(config)

    def check_task(self, layers: dict[str, tuple[int, int]], first_slot: int, t: int, adapter_name: str) -> None:
        """Refuse task ``t`` before its adapter is created.

        Args:
            layers: ``{layer name: (r, in)}`` of the targeted layers.
            first_slot: the config's integer slot, else 0.
            t: the task index.
            adapter_name: the learner's adapter name.
        """

    def initial_extra(self, model: nn.Module, layers: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The extra state at the start.

        Args:
            model: the base model.
            layers: ``{layer name: (r, in)}`` of the targeted layers.

        Returns:
            ``{layer name: tensor}`` (empty by default).
        """
        return {}

    def init_adapter(self, layers: dict[str, LoraLayer], adapter_name: str, extra: dict[str, torch.Tensor]) -> None:
        """Change a task's fresh adapter before it trains (default: keep peft's init).

        Args:
            layers: the adapter's LoRA layers by name.
            adapter_name: the learner's adapter name.
            extra: the extra state.
        """

    def merged(self, weight: torch.Tensor, delta: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """The layer's weight after the task, both in the wider of their dtypes: ``W + s·B A`` by default.

        Args:
            weight: the current weight ``W``.
            delta: the task's update ``s·B A`` in the weight's layout.
            extra: the layer's extra state (None when the strategy keeps none).

        Returns:
            The new weight, in the inputs' dtype.
        """
        return weight + delta

    def after_merge(self, name: str, layer: LoraLayer, adapter_name: str, extra: dict[str, torch.Tensor]) -> None:
        """Update the extra state once layer ``name`` is fused (its adapter still present).

        Args:
            name: the layer's name.
            layer: its LoRA layer.
            adapter_name: the learner's adapter name.
            extra: the extra state, updated in place.
        """


class _Naive(Strategy):
    """One adapter keeps training across tasks; the base weights are never touched (paper)."""

    name = "naive"
    fuses = False


class _MergeAndOrthogonalInit(Strategy):
    """Fuse after each task; each fresh ``A_t`` is orthogonal, column by column in rank space, to ``S = Σ_{s<t} A_s``
    (paper's rule, product merge ours). Extra state: ``S`` per layer."""

    name = "merge_and_orthogonal_init"
    saved_extra = "sum_A"

    def check_config(self, config: LoraConfig) -> None:
        if isinstance(config, OrthoLoraConfig):
            raise ValueError(
                "merge_and_orthogonal_init re-initialises lora_A, which OrthoLoraConfig freezes to the shared basis; "
                "use strategy 'orthogonal' with an OrthoLoraConfig, or a plain LoraConfig"
            )

    def check_layer(self, name: str, layer: LoraLayer, adapter_name: str) -> None:
        if adapter_name not in layer.lora_A:
            raise UnsupportedLayerError(
                f"merge_and_orthogonal_init cannot adapt {type(layer.get_base_layer()).__name__}: peft initialises "
                "embedding LoRAs with A = 0 and a random B, so there is no random down-projection to make orthogonal; "
                "use another strategy or exclude this layer",
                adapter=adapter_name,
                layer=name,
            )
        if layer.lora_A[adapter_name].weight.shape[0] < 2:
            raise UnsupportedFeatureError(
                "merge_and_orthogonal_init needs rank >= 2 (at rank 1 the only vector orthogonal to a previous "
                "down-projection column is 0); this layer has rank 1",
                adapter=adapter_name,
                layer=name,
            )

    def init_adapter(self, layers: dict[str, LoraLayer], adapter_name: str, extra: dict[str, torch.Tensor]) -> None:
        if not extra:
            return
        with torch.no_grad():
            for name, layer in layers.items():
                a = _down_projection(layer, adapter_name)
                a.copy_(orthogonal_init(a, extra[name]))

    def after_merge(self, name: str, layer: LoraLayer, adapter_name: str, extra: dict[str, torch.Tensor]) -> None:
        a = _down_projection(layer, adapter_name).detach()
        extra[name] = extra[name].to(a.device) + a if name in extra else a.clone()


class _Magnitude(Strategy):
    """Fuse, then per weight keep the task vector of larger magnitude (paper). Extra state: ``W_0`` (in memory)."""

    name = "magnitude"

    def initial_extra(self, model: nn.Module, layers: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        return {name: _weight(model, name).detach().clone() for name in layers}

    def merged(self, weight: torch.Tensor, delta: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        w0 = extra.to(weight.dtype)
        running = weight - w0  # τ_{t-1}
        return torch.where(delta.abs() >= running.abs(), w0 + delta, weight)


class _Orthogonal(Strategy):
    """Task ``t`` takes slot ``k + t`` of the shared orthogonal basis and is fused (ours, with ``OrthoLoraConfig``)."""

    name = "orthogonal"
    assigns_slots = True

    def check_config(self, config: LoraConfig) -> None:
        if not isinstance(config, OrthoLoraConfig):
            raise ValueError("strategy 'orthogonal' needs an OrthoLoraConfig (each task takes the next disjoint slot)")
        if config.concept_id is not None:
            raise ValueError(
                "strategy 'orthogonal' assigns slots by task index: give `slot=<first slot>`, not concept_id"
            )

    def task_config(self, config: LoraConfig, first_slot: int, t: int) -> LoraConfig:
        return dataclasses.replace(
            copy.deepcopy(config), slot=first_slot + t, concept_id=None, basis_rows=None, basis_checksums=None
        )

    def check_task(self, layers: dict[str, tuple[int, int]], first_slot: int, t: int, adapter_name: str) -> None:
        slot = first_slot + t
        for name, (r, n) in layers.items():
            if slot >= n // r:
                raise BasisError(
                    f"task {t} needs orthogonal slot {slot}, but this layer (input width {n}, rank {r}) has "
                    f"{n // r} disjoint slots: the 'orthogonal' strategy holds at most {n // r - first_slot} tasks "
                    "here. Lower r, or continue with merge_and_orthogonal_init.",
                    adapter=adapter_name,
                    layer=name,
                )


_STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (_Naive(), Strategy(), _MergeAndOrthogonalInit(), _Magnitude(), _Orthogonal())
}
STRATEGIES = tuple(_STRATEGIES)


# ------------------------------------------------------------------------------------------------------------- learner


class ContinualLearner:
    """Carries one model through a sequence of tasks with one continual-LoRA strategy (see the module docstring).

    Args:
        model: the base model (any ``nn.Module`` peft can adapt; not already a ``PeftModel``). It is modified in
            place: adapters are injected into it and, for the merge strategies, fused into its targeted weights.
        strategy: one of ``STRATEGIES``.
        lora_config: a ``peft.LoraConfig`` (every strategy but ``"orthogonal"``) or a ``peft_ortho.OrthoLoraConfig``
            (``"orthogonal"``; also accepted, with an integer ``slot`` or a ``concept_id``, by ``naive``,
            ``merge_and_init`` and ``magnitude``). Copied; the same config serves every task.
        seed: seeds each task's fresh adapter init (``B = 0``, random ``A``) independently of the global RNG.
        adapter_name: the peft adapter name used for every task.

    Use ``begin_task()`` → train the returned peft model → ``end_task()``; ``model`` is the current model between
    tasks (a ``PeftModel`` for ``naive``, the plain fused module otherwise).
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: str,
        lora_config: LoraConfig,
        *,
        seed: int = 0,
        adapter_name: str = "default",
    ) -> None:
        if strategy not in _STRATEGIES:
            raise ValueError(f"unknown continual strategy {strategy!r}; choose one of {STRATEGIES}")
        if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError(
                "ContinualLearner needs the base model, not a model that already carries peft adapters: pass the "
                "plain module (merge_and_unload() it first if the adapters belong in the base)"
            )
        self._rule = _STRATEGIES[strategy]
        _check_config(self._rule, lora_config)
        self.strategy = strategy
        self.seed = int(seed)
        self.adapter_name = adapter_name
        self.tasks_done = 0
        self._config = copy.deepcopy(lora_config)
        self._first_slot = lora_config.slot if isinstance(getattr(lora_config, "slot", None), int) else 0
        self._base = model  # the plain module; adapters are injected into it
        self._peft_model: PeftModel | None = None  # open task, or the one ever-training adapter of "naive"
        self._in_task = False
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._layers = self._probe_layers()  # {layer name: (r, in)} in the order peft creates them
        self.fingerprint = _fingerprint(model, self._layers)
        # Extra state between tasks, besides the model: S = Σ A_s (orthogonal init) or W_0 (magnitude).
        self._extra: dict[str, torch.Tensor] = self._rule.initial_extra(model, self._layers)

    # ------------------------------------------------------------------------------------------------------- task loop

    @property
    def model(self) -> nn.Module:
        """The current model: the ``PeftModel`` while a task is open (always, for ``naive``), else the fused module."""
        return self._peft_model if self._peft_model is not None else self._base

    @property
    def layer_names(self) -> list[str]:
        """Names (in the base model) of the layers the adapters target."""
        return list(self._layers)

    def begin_task(self) -> PeftModel:
        """Open task ``tasks_done`` and return the peft model to train.

        Returns:
            A fresh adapter (``B = 0``; its init per the strategy), or, for ``naive``, the adapter as the previous
            task left it. Only the adapter's parameters require grad.
        """
        if self._in_task:
            raise ContinualStateError(f"task {self.tasks_done} is already open: call end_task() before begin_task()")
        t = self.tasks_done
        if not self._rule.fuses and self._peft_model is not None:
            self._in_task = True
            return self._peft_model
        self._rule.check_task(self._layers, self._first_slot, t, self.adapter_name)
        peft_model = self._wrap(self._task_config(t), t)
        self._rule.init_adapter(_lora_layers(peft_model, self.adapter_name), self.adapter_name, self._extra)
        self._peft_model = peft_model
        self._in_task = True
        return peft_model

    def end_task(self) -> nn.Module:
        """Close the open task per the strategy and return the current model (see ``model``).

        Merge strategies fuse each targeted layer in place, ``W ← W + s·B_t A_t`` (``magnitude``: the per-weight
        selection), then remove the adapter; ``merge_and_orthogonal_init`` adds the trained ``A_t`` to ``S``.

        Returns:
            The current model.
        """
        if not self._in_task:
            raise ContinualStateError("no task is open: call begin_task() first")
        if self._rule.fuses:
            peft_model = self._peft_model
            layers = _lora_layers(peft_model, self.adapter_name)
            with torch.no_grad():
                # All fused weights are computed and checked before the first is written: a task whose update
                # overflows the weights' dtype is refused with the model (and the open task) as they were.
                fused = {name: self._fused(name, layer) for name, layer in layers.items()}
                for name, layer in layers.items():
                    layer.get_base_layer().weight.copy_(fused.pop(name))
                    self._rule.after_merge(name, layer, self.adapter_name, self._extra)
            self._base = peft_model.unload()
            for n, p in self._base.named_parameters():  # peft froze the base; hand the model back as it was given
                p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
            self._peft_model = None
        self._in_task = False
        self.tasks_done += 1
        return self.model

    def _fused(self, name: str, layer: LoraLayer) -> torch.Tensor:
        """The layer's weight after this task, in the weight's dtype; an error if it is not finite there."""
        weight = layer.get_base_layer().weight
        delta = layer.get_delta_weight(self.adapter_name)  # s·B A in the weight's layout (peft handles conv, Conv1D)
        if delta.shape != weight.shape:
            raise UnsupportedLayerError(
                f"delta of shape {tuple(delta.shape)} does not match the weight {tuple(weight.shape)}",
                adapter=self.adapter_name,
                layer=name,
            )
        dtype = torch.promote_types(weight.dtype, delta.dtype)  # add in the wider dtype, round once into the weight
        new = self._rule.merged(weight.to(dtype), delta.to(dtype), self._extra.get(name)).to(weight.dtype)
        if not bool(torch.isfinite(new).all()):
            raise ContinualStateError(
                f"fusing this task would make {int((~torch.isfinite(new)).sum())} weight(s) NaN/inf in "
                f"{weight.dtype}; nothing was fused (the task is still open)",
                adapter=self.adapter_name,
                layer=name,
            )
        return new

    # ----------------------------------------------------------------------------------------------------------- state

    def extra_state(self) -> dict[str, torch.Tensor]:
        """The tensors kept between tasks besides the model.

        Returns:
            ``S = Σ A_s`` per layer (``merge_and_orthogonal_init``), ``W_0`` per targeted layer (``magnitude``),
            nothing otherwise. Its size does not depend on the task count.
        """
        return dict(self._extra)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> str:
        """Write the state between tasks to folder ``path`` (atomically).

        Files: ``continual_state.json`` and ``continual_state.safetensors``. A folder holding exactly a previous
        continual state is replaced (so ``save`` can run after every task); any other non-empty folder needs
        ``overwrite=True``.

        Args:
            path: the folder.
            overwrite: replace a non-empty folder that is not a continual state.

        Returns:
            ``path``.
        """
        return _State.save(self, os.fspath(path), overwrite)

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike,
        model: nn.Module,
        *,
        strategy: str | None = None,
        lora_config: LoraConfig | None = None,
    ) -> ContinualLearner:
        """Rebuild the learner ``save`` wrote, on ``model`` = the **base** model the run started from.

        Anything that does not match is refused with ``ContinualStateError``: applying one strategy's update to
        weights another strategy fused, or fused deltas to another base, gives a model that silently is neither.

        Args:
            path: the folder ``save`` wrote.
            model: the base model the run started from (same targeted weights: SHA-256 fingerprint).
            strategy: when given, must be the saved one.
            lora_config: when given, must match the saved one.

        Returns:
            The learner, ``tasks_done`` tasks in.
        """
        return _State.load(cls, os.fspath(path), model, strategy=strategy, lora_config=lora_config)

    # ------------------------------------------------------------------------------------------------------- internals

    def _task_config(self, t: int) -> LoraConfig:
        return self._rule.task_config(self._config, self._first_slot, t)

    def _wrap(self, config: LoraConfig, t: int, low_cpu_mem_usage: bool = False) -> PeftModel:
        """``get_peft_model`` with the init RNG seeded from ``(seed, t)`` and the global RNG left untouched."""
        digest = hashlib.sha256(f"peft_ortho.continual/{self.seed}/{t}".encode()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            return get_peft_model(
                self._base, config, adapter_name=self.adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
            )

    def _probe_layers(self) -> dict[str, tuple[int, int]]:
        """Which layers peft targets, and each one's ``(r, in)``: inject adapters on the meta device (no memory, no
        init), read them, remove them. peft's own matching decides, so every ``target_modules`` form works."""
        probe = self._wrap(self._task_config(0), -1, low_cpu_mem_usage=True)
        try:
            layers = {}
            for name, layer in _lora_layers(probe, self.adapter_name).items():
                base = layer.get_base_layer()
                if not isinstance(getattr(base, "weight", None), torch.Tensor) or isinstance(
                    base, nn.MultiheadAttention
                ):
                    raise UnsupportedLayerError(
                        f"{type(base).__name__} is not supported by continual strategies (they fuse W + s·B A into "
                        "a layer's `weight`)",
                        adapter=self.adapter_name,
                        layer=name,
                    )
                self._rule.check_layer(name, layer, self.adapter_name)
                a = _down_projection(layer, self.adapter_name)
                layers[name] = (a.shape[0], a[0].numel())
            if not layers:
                raise ValueError(f"the adapter config targets no layer of this model: {self._config.target_modules}")
            return layers
        finally:
            probe.unload()
            for n, p in self._base.named_parameters():
                p.requires_grad_(self._requires_grad.get(n, p.requires_grad))


# ----------------------------------------------------------------------------------------------------- the state files


class _State:
    """``continual_state.json`` + ``continual_state.safetensors``: writing a learner's state and rebuilding it.

    The tensors: the targeted layers' fused weights ``model.<layer>.weight`` (merge strategies; never the whole
    model) or the adapter ``adapter.<layer>.lora_A``/``lora_B`` (``naive``), plus the strategy's saved extra state
    ``state.<layer>.<saved_extra>`` (``S`` of ``merge_and_orthogonal_init``). ``W_0`` of ``magnitude`` is not
    stored: it is the base model given to ``resume``, verified by fingerprint.
    """

    @staticmethod
    def tensors(learner: ContinualLearner) -> dict[str, torch.Tensor]:
        rule, tensors = learner._rule, {}
        if not rule.fuses:
            if learner._peft_model is not None:
                for name, layer in _lora_layers(learner._peft_model, learner.adapter_name).items():
                    tensors[f"adapter.{name}.lora_A"] = _down_projection(layer, learner.adapter_name)
                    tensors[f"adapter.{name}.lora_B"] = _up_projection(layer, learner.adapter_name)
        else:
            for name in learner._layers:
                tensors[f"model.{name}.weight"] = _weight(learner._base, name)
            if rule.saved_extra is not None:
                tensors.update({f"state.{name}.{rule.saved_extra}": t for name, t in learner._extra.items()})
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    @classmethod
    def save(cls, learner: ContinualLearner, path: str, overwrite: bool) -> str:
        if learner._in_task:
            raise ContinualStateError(
                f"task {learner.tasks_done} is open: call end_task() before save() (mid-task adapters are not a state)"
            )
        tensors = cls.tensors(learner)
        meta = {
            "format": STATE_FORMAT,
            "strategy": learner.strategy,
            "tasks_done": learner.tasks_done,
            "seed": learner.seed,
            "adapter_name": learner.adapter_name,
            "lora_config": _config_dict(learner._config),
            "base_fingerprint": learner.fingerprint,
            "layers": [[name, *shape] for name, shape in learner._layers.items()],  # [name, r, in], peft's order
            "peft_ortho_version": __version__,
        }
        replace = overwrite or (os.path.isdir(path) and set(os.listdir(path)) <= {STATE_JSON, STATE_TENSORS})
        with atomic_dir(path, overwrite=replace) as tmp:
            save_file(tensors, os.path.join(tmp, STATE_TENSORS), metadata={"format": STATE_FORMAT})
            with open(os.path.join(tmp, STATE_JSON), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
        return path

    @staticmethod
    def load(
        learner_cls: type[ContinualLearner],
        path: str,
        model: nn.Module,
        *,
        strategy: str | None,
        lora_config: LoraConfig | None,
    ) -> ContinualLearner:
        meta = _read_meta(path)
        saved = meta["strategy"]
        if strategy is not None and strategy != saved:
            raise ContinualStateError(
                f"{path} holds a {saved!r} state; resuming it with strategy {strategy!r} would apply another update "
                f"rule to weights {saved!r} fused. Resume with strategy={saved!r}, or start a new learner from the "
                "base model."
            )
        saved_config = meta["lora_config"]
        if lora_config is not None:
            given = _config_dict(lora_config)
            diff = sorted(
                k
                for k in set(given) | set(saved_config)
                if k not in _VOLATILE_CONFIG_KEYS and given.get(k) != saved_config.get(k)
            )
            if diff:
                details = ", ".join(f"{k}: saved {saved_config.get(k)!r}, given {given.get(k)!r}" for k in diff[:4])
                raise ContinualStateError(f"{path} was made with another adapter config ({details})")
        else:
            lora_config = PeftConfig.from_peft_type(**saved_config)
        learner = learner_cls(model, saved, lora_config, seed=meta["seed"], adapter_name=meta["adapter_name"])
        if (
            learner.fingerprint != meta["base_fingerprint"]
            or [[n, *rs] for n, rs in learner._layers.items()] != meta["layers"]
        ):
            raise ContinualStateError(
                f"the model given is not the base model {path} was made from: the fingerprint of its targeted "
                f"weights is {learner.fingerprint[:16]}, the state's is {str(meta['base_fingerprint'])[:16]}. Pass "
                "the original base model (not a fused or fine-tuned one)."
            )
        tensors, _ = mmap_safetensors(os.path.join(path, STATE_TENSORS))

        def get(key: str, like: torch.Tensor | None = None) -> torch.Tensor:
            if key not in tensors:
                raise ContinualStateError(f"{STATE_TENSORS} in {path} lacks tensor {key!r} (corrupt or truncated)")
            t = tensors[key]
            if like is not None and tuple(t.shape) != tuple(like.shape):
                raise ContinualStateError(
                    f"tensor {key!r} in {path} has shape {tuple(t.shape)}, expected {tuple(like.shape)}"
                )
            if not t.is_floating_point() or not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()):
                raise ContinualStateError(f"tensor {key!r} in {path} is not floating point or holds NaN/Inf")
            if like is not None and like.is_floating_point() and t.numel():
                limit = torch.finfo(like.dtype).max
                if float(t.abs().max().double()) > limit:
                    raise ContinualStateError(
                        f"tensor {key!r} in {path} has values beyond {like.dtype}'s range ({limit:.6g})"
                    )
            return t

        # Everything is read and checked first; the model is changed only once all of it is known to be valid.
        rule, started = learner._rule, meta["tasks_done"] > 0
        writes: list[tuple[torch.Tensor, torch.Tensor]] = []
        extra: dict[str, torch.Tensor] = {}
        try:
            if not rule.fuses:
                if started:
                    learner._peft_model = learner._wrap(learner._task_config(0), 0)
                    for name, layer in _lora_layers(learner._peft_model, learner.adapter_name).items():
                        for key, p in (("lora_A", _down_projection(layer, learner.adapter_name)),
                                       ("lora_B", _up_projection(layer, learner.adapter_name))):  # fmt: skip
                            writes.append((p, get(f"adapter.{name}.{key}", p)))
            else:
                for name in learner._layers:
                    w = _weight(learner._base, name)
                    writes.append((w, get(f"model.{name}.weight", w)))
                if rule.saved_extra is not None and started:
                    extra = {name: get(f"state.{name}.{rule.saved_extra}") for name in learner._layers}
        except BaseException:
            if learner._peft_model is not None:  # remove the adapters injected to read the shapes
                learner._peft_model.unload()
                learner._peft_model = None
            raise
        with torch.no_grad():
            for p, t in writes:
                p.copy_(t)
        if extra:
            learner._extra = {name: t.clone() for name, t in extra.items()}
        learner.tasks_done = int(meta["tasks_done"])
        return learner


# -------------------------------------------------------------------------------------------- the orthogonal init rule
def orthogonal_init(a: torch.Tensor, previous_sum: torch.Tensor) -> torch.Tensor:
    """Make each input column of ``a`` orthogonal, in rank space, to the same column of ``previous_sum``.

    For every column ``j``: ``p_j = a_j − (a_j·s_j / s_j·s_j) s_j`` (``p_j = a_j`` where ``s_j = 0``), then ``p_j``
    is rescaled to ``‖a_j‖`` so the init keeps peft's scale. Result: ``(p * S).sum(0) = 0`` to the precision of
    ``a``'s dtype (computed in float64, rounded once).

    Args:
        a: a fresh down-projection, shape ``(r, ...)`` (``lora_A`` weight; trailing dims flattened to ``in``).
        previous_sum: ``S = Σ_{s<t} A_s``, same shape.

    Returns:
        A new tensor of ``a``'s shape, dtype and device.
    """
    r = a.shape[0]
    if previous_sum.numel() != a.numel():
        raise ValueError(f"orthogonal_init: shapes differ, {tuple(a.shape)} vs {tuple(previous_sum.shape)}")
    a64 = a.detach().reshape(r, -1).to(torch.float64)
    s64 = previous_sum.detach().reshape(r, -1).to(device=a.device, dtype=torch.float64)
    ss = (s64 * s64).sum(0)
    coef = torch.where(ss > 0, (a64 * s64).sum(0) / ss.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    p = a64 - coef * s64
    norm_a, norm_p = a64.norm(dim=0), p.norm(dim=0)
    p = p * torch.where(norm_p > 0, norm_a / norm_p.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return p.reshape(a.shape).to(a.dtype)


# ------------------------------------------------------------------------------------------------------------- metrics
@dataclasses.dataclass(frozen=True)
class ContinualMetrics:
    """Summary of a task matrix. ``final_scores[s] = M[s, T-1]``; ``forgetting[s]`` for ``s < T-1``."""

    average_score: float
    average_forgetting: float
    final_scores: tuple[float, ...]
    forgetting: tuple[float, ...]


def task_matrix_metrics(matrix: Any, convention: str = "final") -> ContinualMetrics:
    """Average score and average forgetting of a task matrix ``M[s, t]`` (score of task ``s`` after task ``t``).

    ``convention="final"`` (default; the standard definitions of Chaudhry et al. 2018, which the paper reports):

    - average score ``= (1/T) Σ_s M[s, T-1]``, every task scored by the final model;
    - average forgetting ``= (1/(T-1)) Σ_{s<T-1} ( max_{s ≤ t' < T-1} M[s, t'] − M[s, T-1] )``: how far each
      earlier task fell from its best score to its final one (``NaN`` when ``T = 1``).

    ``convention="released_code"`` reproduces ``calculate_cl_metrics`` of the paper's released code
    (github.com/luk-st/continual-lora, ``eval/metrics.py``), which differs: average score
    ``= (1/T) Σ_t mean_{s ≤ t} M[s, t]`` (mean over time of the mean over tasks seen so far), and forgetting of task
    ``s`` ``= max_{t' > s} (M[s, s] − M[s, t'])`` (largest drop from just after learning it, at any later time).

    Args:
        matrix: ``(T, T)``, higher is better; entries ``s > t`` (tasks not yet learned) are ignored and may be NaN.
        convention: ``"final"`` or ``"released_code"``.

    Returns:
        A ``ContinualMetrics``.
    """
    if convention not in ("final", "released_code"):
        raise ValueError(f"unknown convention {convention!r}; choose 'final' or 'released_code'")
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"the task matrix must be square (T, T) with T >= 1, got shape {m.shape}")
    n = m.shape[0]
    seen = np.triu(np.ones((n, n), dtype=bool))  # s <= t
    if not np.isfinite(m[seen]).all():
        raise ValueError("the task matrix has NaN/Inf where a learned task was scored (entries s <= t)")
    final = m[:, -1]
    if convention == "final":
        forgetting = [float(m[s, s : n - 1].max() - m[s, n - 1]) for s in range(n - 1)]
        average_score = float(final.mean())
    else:
        forgetting = [float((m[s, s] - m[s, s + 1 :]).max()) for s in range(n - 1)]
        average_score = float(np.mean([m[: t + 1, t].mean() for t in range(n)]))
    average_forgetting = float(np.mean(forgetting)) if forgetting else math.nan
    return ContinualMetrics(average_score, average_forgetting, tuple(float(x) for x in final), tuple(forgetting))


def run_continual(
    learner: ContinualLearner,
    tasks: Sequence[Any],
    train: Callable[[nn.Module, Any], Any],
    score: Callable[[nn.Module, Any], float],
    *,
    matrix: Any = None,
    save_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Train ``tasks[learner.tasks_done:]`` in order and fill the task matrix ``M[s, t]``.

    For each task ``t``: ``train(learner.begin_task(), tasks[t])``, ``learner.end_task()``, then
    ``M[s, t] = score(learner.model, tasks[s])`` for every ``s ≤ t`` (under ``torch.no_grad()``), and
    ``learner.save(save_dir)`` when given.

    Args:
        learner: the learner (fresh, or resumed).
        tasks: every task of the sequence.
        train: ``train(peft_model, task)``, your training loop.
        score: ``score(model, task) -> float``, higher is better.
        matrix: when resuming, the matrix of the earlier tasks (``(k, k)`` with ``k ≤ T``, e.g. what the first call
            returned); it is copied into the top-left corner.
        save_dir: save the learner there after every task.

    Returns:
        ``M`` as a ``(T, T)`` float64 array, NaN where ``s > t``.
    """
    n = len(tasks)
    m = np.full((n, n), np.nan)
    if matrix is not None:
        earlier = np.asarray(matrix, dtype=np.float64)
        k = earlier.shape[0] if earlier.ndim == 2 else -1
        if earlier.ndim != 2 or earlier.shape != (k, k) or k > n:
            raise ValueError(f"matrix has shape {earlier.shape}; expected (k, k) with k <= {n}, the number of tasks")
        m[:k, :k] = earlier
    if learner.tasks_done > n:
        raise ValueError(f"the learner has done {learner.tasks_done} tasks, more than the {n} given")
    for t in range(learner.tasks_done, n):
        train(learner.begin_task(), tasks[t])
        learner.end_task()
        with torch.no_grad():
            for s in range(t + 1):
                m[s, t] = float(score(learner.model, tasks[s]))
        if save_dir is not None:
            learner.save(save_dir)
    return m


def format_metrics_table(results: dict[str, ContinualMetrics], digits: int = 3) -> str:
    """A Markdown table: one row per strategy with average score, average forgetting and the final scores.

    Args:
        results: ``{strategy: ContinualMetrics}``.
        digits: decimals shown.

    Returns:
        The table's text.
    """
    lines = ["| strategy | average score ↑ | average forgetting ↓ | final score per task |", "|---|---:|---:|---|"]
    for name, r in results.items():
        finals = " ".join(f"{x:.{digits}f}" for x in r.final_scores)
        lines.append(f"| {name} | {r.average_score:.{digits}f} | {r.average_forgetting:.{digits}f} | {finals} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- helpers
def _check_config(strategy: Strategy, config: LoraConfig) -> None:
    if not isinstance(config, LoraConfig):
        raise ValueError(f"ContinualLearner needs a peft LoraConfig or OrthoLoraConfig, got {type(config).__name__}")
    strategy.check_config(config)
    if isinstance(config, OrthoLoraConfig) and not strategy.assigns_slots and config.slot == "random":
        raise ValueError(
            f"strategy {strategy.name!r} with OrthoLoraConfig(slot='random'): the rows would be drawn from system "
            "randomness for every new adapter, so the run could not be resumed bit-identically; give slot=<int> or "
            "concept_id='...'"
        )
    # What a plain W + s·B A LoRA cannot express (lora_format's table), plus a bias, which the strategies cannot fuse.
    refused = {**PLAIN_LORA_REFUSALS, "lora_bias": "a LoRA bias is not part of the product B A"}
    for key, why in refused.items():
        if getattr(config, key, None):
            raise ValueError(f"ContinualLearner: {key} is not supported ({why})")
    init = config.init_lora_weights
    if isinstance(init, str) and init != "gaussian":
        raise ValueError(
            f"ContinualLearner: init_lora_weights={init!r} changes the base weights at init (or needs data); "
            "use True (peft's default) or 'gaussian'"
        )


def _lora_layers(peft_model: PeftModel, adapter_name: str) -> dict[str, LoraLayer]:
    """LoRA layers holding ``adapter_name``, by their name in the base model."""
    base = peft_model.get_base_model()
    layers = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and (
            adapter_name in module.lora_A or adapter_name in getattr(module, "lora_embedding_A", {})
        ):
            layers[name] = module
    return layers


def _down_projection(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """``A`` as a parameter tensor, ``(r, ...)``."""
    if adapter_name in layer.lora_A:
        return layer.lora_A[adapter_name].weight
    return layer.lora_embedding_A[adapter_name]


def _up_projection(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    if adapter_name in layer.lora_B:
        return layer.lora_B[adapter_name].weight
    return layer.lora_embedding_B[adapter_name]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    """The ``weight`` of base layer ``name`` in a plain or adapted model."""
    module = model.get_submodule(name)
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module.weight


def _fingerprint(model: nn.Module, layers: dict[str, Any]) -> str:
    """SHA-256 over the targeted layers' base weights (name, dtype, shape, bytes), in peft's layer order."""
    h = hashlib.sha256()
    for name in layers:
        w = _weight(model, name).detach().to("cpu").contiguous()
        h.update(f"{name}|{w.dtype}|{tuple(w.shape)}|".encode())
        h.update(w.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_dict(config: LoraConfig) -> dict:
    """The config as JSON-ready data (``lora_format.config_dict``: the layout adapter files use), without the
    orthogonal tuner's per-task fields, for saving and comparing."""
    data = config_dict(config, default_peft_type=None)
    for key in ("basis_rows", "basis_checksums"):  # filled per task by the orthogonal tuner
        data.pop(key, None)
    return data


def _read_meta(path: str) -> dict:
    json_path = os.path.join(path, STATE_JSON)
    if not os.path.isdir(path):
        raise ContinualStateError(f"no continual state folder at {path}")
    if not os.path.isfile(json_path) or not os.path.isfile(os.path.join(path, STATE_TENSORS)):
        for candidate in sorted(os.listdir(path)):
            refuse_pickle(os.path.join(path, candidate))
        raise ContinualStateError(f"{path} is not a continual state: it needs {STATE_JSON} and {STATE_TENSORS}")
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise ContinualStateError(f"{json_path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise ContinualStateError(
            f"{json_path} has format {meta.get('format') if isinstance(meta, dict) else None!r}; this version of "
            f"peft-ortho reads {STATE_FORMAT!r}"
        )
    missing = [
        k
        for k in ("strategy", "tasks_done", "seed", "adapter_name", "lora_config", "base_fingerprint", "layers")
        if k not in meta
    ]
    if missing or meta["strategy"] not in _STRATEGIES:
        raise ContinualStateError(
            f"{json_path} is incomplete or unknown (missing {missing}, strategy {meta.get('strategy')!r})"
        )
    types = {"tasks_done": int, "seed": int, "adapter_name": str, "lora_config": dict, "base_fingerprint": str}
    for key, kind in types.items():
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool) or (kind is int and meta[key] < 0):
            raise ContinualStateError(f"{json_path}: {key} must be a {'non-negative ' * (kind is int)}{kind.__name__}")
    return meta
