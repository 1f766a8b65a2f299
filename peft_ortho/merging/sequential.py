"""Sequential output-matching merge: each layer, in forward order, reproduces every single adapter's layer output.

The per-layer closed forms ask each merged layer to do what adapter ``i`` did *on the inputs adapter ``i``'s own
model saw*. Once earlier layers are merged, later layers see different inputs, and that error compounds with depth.
The sequential merge measures the inputs again, through the partly merged model, before it solves each layer.

**Objective.** For each adapted layer ``y = W x + b`` (``W`` ``(out, in)``; ``x`` one row of ``X``: a token for
linear layers, an unfolded ``C_in·kh·kw`` patch for convolutions), in the order the forward pass reaches them::

    min_ΔW  Σ_i α_i ‖X_i^m (W + ΔW)ᵀ − X_i^s (W + ΔW_i)ᵀ‖²_F  +  λ' ‖ΔW‖²_F

``X_i^s`` ``(n_i, in)``: the layer's inputs on adapter ``i``'s calibration batches in the *single* model (base +
``w_i ΔW_i`` on every layer); ``X_i^m``: the same batches' inputs in the *partly merged* model (base + the merged
``ΔW`` on every layer already solved; the rows pair up token by token). ``α_i = 1 / n_i`` weighs every adapter
equally whatever its number of tokens; optional ordinary batches enter as one more term with ``ΔW_0 = 0`` (target:
the base model's output) and weight ``α_0 = μ / n_0``. The bias cancels from both sides.

**Solution.** Setting the gradient to zero, with ``T_i = X_i^s (W + ΔW_i)ᵀ − X_i^m Wᵀ`` ``(n_i, out)``::

    ΔW (Σ_i α_i X_i^mᵀ X_i^m + λ' I) = Σ_i α_i T_iᵀ X_i^m
    ΔW = (Σ_i α_i T_iᵀ X_i^m) (Σ_i α_i X_i^mᵀ X_i^m + λ' I)⁻¹

and ``T_iᵀ X_i^m = (W + ΔW_i) C_i − W G_i`` with ``C_i = X_i^sᵀ X_i^m`` and ``G_i = X_i^mᵀ X_i^m`` (``in × in``), so
only those two matrices are accumulated (float64), never the rows. ``λ' = λ · tr(Σ α_i G_i) / in`` makes ``λ``
independent of the inputs' scale; ``λ = 0`` takes the minimum-norm least-squares solution. With one adapter and
``λ = 0`` the merged model reproduces that adapter's layer outputs on its calibration inputs exactly (when they
span the layer's input space), since then ``X^m = X^s`` layer after layer.

**Cost.** Layers that receive the same input tensor (``to_q``/``to_k``/``to_v``; cross-attention ``to_k``/``to_v``
everywhere in a UNet, which all read the text encoder's states) form one *depth* and are solved together from one
pass: one ``in × in`` factorisation per depth. Each merged-model pass stops as soon as the depth's inputs are
captured, and the single models' inputs are captured once per batch for every depth (``cache=True``; memory: the
calibration rows of every adapted layer, in the model's dtype) or again per depth (``cache=False``; memory: one
batch's activations). About ``D / 2`` truncated forward passes per batch for ``D`` depths.

**Refinement** (``refine_steps > 0``). A per-layer least squares cannot do what no single layer's output asks for:
where two adapters' calibration inputs coincide (an LM's first layer on tokens both skills share) it returns the
average of their changes. Starting from the closed form, full-batch Adam on every ``ΔW`` at once then minimises
the end-to-end mismatch ``Σ_s (μ_s / Σ μ) · mean_batches D(f_merged(x), f_s(x))`` over the same calibration sets
(``f_s``: single model ``i``, or the base for ``prior``; ``μ_s`` 1, or ``mu`` for ``prior``), with ``D`` the
``KL(f_s ‖ f_merged)`` of the next-token distributions for outputs that have ``logits``, else the mean squared error
of the output tensor (``.sample`` for diffusers models). The targets are computed once; each step is one forward and
backward pass per calibration batch. With ``refine_balance`` each adapter's term is divided by its own effect
``e_i = mean_batches D(f_base(x), f_i(x))`` and multiplied by the adapters' mean effect ``ē``: every adapter's
mismatch then counts relative to how much it changes the model, so an adapter that changes little is not left to
the others' benefit (the prior term keeps ``μ`` relative to an adapter of mean effect).

The result is a dense ``ΔW`` per layer (``MergedLayer(delta=...)``): ``fuse`` uses it exactly; the LoRA exports
re-factor it with a truncated SVD of rank ``svd_rank`` (default ``Σ r_i``) and record the error in the card.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import IncompatibleAdaptersError, UnsupportedLayerError
from ..lora_format import find_module
from .fuse import fuse_targets
from .load import Adapter
from .merge import MergedLayer, iter_merged_layers

__all__ = ["sequential_merge"]

Batch = Any  # a tensor (``model(batch)``), a dict (``model(**batch)``) or a tuple/list (``model(*batch)``)


class _Stop(Exception):
    """Raised from a hook once every wanted input is captured: the rest of the forward pass is not needed."""


def sequential_merge(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    model: nn.Module,
    inputs: Sequence[Iterable[Batch]] | Mapping[str, Iterable[Batch]],
    *,
    prior: Iterable[Batch] | None = None,
    mu: float = 1.0,
    lam: float = 1e-3,
    cache: bool = True,
    refine_steps: int = 0,
    refine_lr: float = 1e-3,
    refine_balance: bool = False,
) -> dict[tuple[str | None, str], MergedLayer]:
    """Merge ``adapters`` layer by layer so the merged model reproduces each single model's layer outputs.

    Args:
        adapters: loaded adapters (``compose``'s ``Adapter``: a PEFT folder or a one-component file), all for
            ``model``; checked as ``compose`` checks them (finite values, shapes, orthogonal bases).
        weights: one merge weight ``w_i`` per adapter: single model ``i`` is the base + ``w_i ΔW_i``.
        model: the base model without adapters (a ``torch.nn.Module``: a causal LM, a UNet; a model whose layers
            already carry peft adapters is refused). It is run in eval mode; its weights and gradients are not
            modified (merged and single weights are passed with ``torch.func.functional_call``).
        inputs: per adapter (a sequence in ``adapters``' order, or a mapping by adapter name), the calibration
            batches: what the model sees when that adapter's concept or skill is used (its prompts; for a diffusion
            model, noisy latents with its prompt's embeddings). Each batch is a tensor, a dict of keyword arguments
            or a tuple of positional arguments for ``model``.
        prior: optional ordinary batches on which the merged model should keep the base model's outputs.
        mu: weight of ``prior`` relative to one adapter's batches.
        lam: ridge ``λ``, relative to the mean eigenvalue of the inputs' second moment (``λ' = λ · tr(G) / in``);
            ``0`` for the minimum-norm least-squares solution.
        cache: keep the single models' layer inputs between depths (one forward per batch and adapter) instead of
            recomputing them per depth.
        refine_steps: after the closed form, this many full-batch Adam steps on every merged ``ΔW`` at once, matching
            the merged model's *final* outputs to each single model's on its calibration batches (and to the base's
            on ``prior``); see the module docstring. ``0``: the closed form alone.
        refine_lr: Adam's learning rate for the refinement.
        refine_balance: weigh each adapter's refinement term by the inverse of its own effect on its batches
            (module docstring).

    Returns:
        ``{(component, layer): MergedLayer(delta=ΔW)}`` with ``ΔW`` ``(out, in)`` float32 (flattened for convs),
        the mapping ``MergedAdapter.layers`` holds.

    Raises:
        IncompatibleAdaptersError: a layer is missing from ``model`` or has another shape, no calibration batch is
            given for an adapter, the forward pass never reaches a layer, or a merged ΔW of a layer is not finite.
        UnsupportedLayerError: a layer is called more than once per forward pass, or is of a type whose inputs this
            merge cannot unfold (grouped or non-zero-padded convolutions).
    """
    adapters = list(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters")
    if mu < 0 or lam < 0 or refine_steps < 0:
        raise ValueError("mu, lam and refine_steps must be ≥ 0")
    batches = _batches_per_adapter(adapters, inputs)
    prior_batches = list(prior) if prior is not None else []
    for _ in iter_merged_layers(adapters, list(weights), "auto", merge=False):  # compose's checks, nothing merged
        pass
    components = {c for a in adapters for c, _ in a.layers()}
    if len(components) > 1:
        raise IncompatibleAdaptersError(
            f"the adapters span several components {sorted(map(str, components))}: merge one component's model at a time"
        )
    (component,) = components
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    owners: dict[str, list[int]] = {}
    for i, adapter in enumerate(adapters):
        for _, name in adapter.layers():
            owners.setdefault(name, []).append(i)
    shapes = {name: adapters[idx[0]].delta_shape((component, name)) for name, idx in owners.items()}
    targets = fuse_targets(root, shapes)  # shape checks; (weight, transposed) per layer
    param_names = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    modules = {name: _module(root, name) for name in owners}
    for name, (weight, _) in targets.items():
        if id(weight) not in param_names:
            raise IncompatibleAdaptersError("the layer's weight is not a parameter of the model", layer=name)
        _check_layer_type(modules[name], name)

    was_training = root.training
    root.eval()
    try:
        sets = [(i, batches[i], 1.0) for i in range(len(adapters))]  # target: single model i
        if prior_batches and mu > 0:
            sets.append((None, prior_batches, mu))  # target: the base model
        problem = _Problem(adapters, list(weights), root, component, owners, targets, param_names, modules, sets)
        with torch.no_grad():
            deltas = _solve(problem, lam, cache)
        if refine_steps:
            deltas = _refine(problem, deltas, refine_steps, refine_lr, refine_balance)
    finally:
        root.train(was_training)
    result = {}
    for name in sorted(deltas):
        if not torch.isfinite(deltas[name]).all():  # never hand fuse/export a NaN: name the layer instead
            raise IncompatibleAdaptersError(
                "the merged ΔW is not finite (non-finite model outputs on the calibration batches?)", layer=name
            )
        idx = owners[name]
        first = problem.factors[(idx[0], name)]
        ranks = [problem.factors[(i, name)].rank for i in idx]
        result[(component, name)] = MergedLayer(
            None, None, deltas[name].to(torch.float32), first.a_shape, first.b_shape, ranks
        )
    return result


class _Problem:
    """What every stage needs: the model, its adapted layers, the adapters' factors and the calibration sets.

    ``sets``: ``(adapter index or None for the base, batches, weight)``.
    """

    def __init__(self, adapters, weights, root, component, owners, targets, param_names, modules, sets):
        self.root, self.owners, self.targets, self.modules, self.sets = root, owners, targets, modules, sets
        self.weights = weights
        self.param = {name: param_names[id(weight)] for name, (weight, _) in targets.items()}
        self.base_w = {name: _as_out_in(w, t).detach().to(torch.float64) for name, (w, t) in targets.items()}
        self.factors = {
            (i, name): adapters[i].factors((component, name), dtype=torch.float64)
            for name, idx in owners.items()
            for i in idx
        }

    def own_delta(self, i: int, name: str) -> torch.Tensor:
        """``w_i ΔW_i`` ``(out, in)`` float64."""
        f = self.factors[(i, name)]
        return (f.B * (self.weights[i] * f.scale)) @ f.A

    def params(self, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameter overrides ``W + ΔW`` in each weight's own layout and dtype."""
        return {
            self.param[n]: _to_layout(self.base_w[n] + d.to(torch.float64), *self.targets[n])
            for n, d in deltas.items()
        }

    def single(self, i: int | None) -> dict[str, torch.Tensor]:
        """Overrides for single model ``i`` (base + ``w_i ΔW_i`` on its layers); ``{}`` for the base."""
        if i is None:
            return {}
        return self.params({n: self.own_delta(i, n) for n, idx in self.owners.items() if i in idx})


def _solve(problem: _Problem, lam: float, cache: bool) -> dict[str, torch.Tensor]:
    """The closed form, depth by depth in forward order; returns ``{layer: ΔW}`` float64."""
    root, modules, sets = problem.root, problem.modules, problem.sets
    depths = _depths(root, modules, sets[0][1][0])
    all_names = [n for depth in depths for n in depth]
    cached: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    if cache:
        for s, (i, group, _) in enumerate(sets):
            params = problem.single(i)
            for b, batch in enumerate(group):
                cached[(s, b)] = _capture(root, params, batch, modules, all_names, stop=False)
    deltas: dict[str, torch.Tensor] = {}
    for depth in depths:
        lead = depth[0]  # every layer of a depth reads the same tensor
        width = problem.base_w[lead].shape[1]
        merged_params = problem.params(deltas)
        C = torch.zeros(len(sets), width, width, dtype=torch.float64)  # Σ α X_sᵀ X_m per set
        G = torch.zeros_like(C)  # Σ α X_mᵀ X_m per set
        for s, (i, group, alpha) in enumerate(sets):
            params = {} if cache else problem.single(i)
            n = 0
            for b, batch in enumerate(group):
                xs = cached[(s, b)][lead] if cache else _capture(root, params, batch, modules, [lead])[lead]
                xm = _capture(root, merged_params, batch, modules, [lead])[lead]
                xs, xm = xs.to(torch.float64), xm.to(torch.float64)
                C[s] += xs.T @ xm
                G[s] += xm.T @ xm
                n += xm.shape[0]
            C[s] *= alpha / n
            G[s] *= alpha / n
        if not (torch.isfinite(C).all() and torch.isfinite(G).all()):
            raise IncompatibleAdaptersError("the layer's inputs on the calibration batches are not finite", layer=lead)
        gram = G.sum(0)
        ridge = lam * float(gram.diagonal().mean())
        system = gram + ridge * torch.eye(width, dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(system) if ridge > 0 else (None, 1)
        for name in depth:
            numerator = problem.base_w[name] @ (C.sum(0) - gram)  # Σ_s W (C_s − G_s)
            for s, (i, _, _) in enumerate(sets):
                if i is not None and i in problem.owners[name]:
                    numerator += problem.own_delta(i, name) @ C[s]
            if info == 0:
                deltas[name] = torch.cholesky_solve(numerator.T, chol).T  # the system is symmetric
            else:  # λ = 0 (or a singular system): the minimum-norm least-squares solution
                deltas[name] = torch.linalg.lstsq(system, numerator.T, driver="gelsd").solution.T
        for key in cached:  # this depth's cached rows are no longer needed
            cached[key].pop(lead, None)
    return deltas


def _refine(
    problem: _Problem, deltas: dict[str, torch.Tensor], steps: int, lr: float, balance: bool = False
) -> dict[str, torch.Tensor]:
    """Adam on all ``ΔW`` at once: match the merged model's outputs to each set's target model, end to end."""
    targets, effects = [], []
    with torch.no_grad():
        for i, group, _ in problem.sets:
            params = problem.single(i)
            targets.append([_output(_call(problem.root, params, batch)) for batch in group])
            if balance and i is not None:  # e_i: how far single model i is from the base on its own batches
                base = [_output(_call(problem.root, {}, batch)) for batch in group]
                effects.append(float(sum(_divergence(b, t) for b, t in zip(base, targets[-1]))) / len(group))
            else:
                effects.append(None)
    known = [e for e in effects if e is not None and e > 0]
    mean_effect = sum(known) / len(known) if known else 1.0
    # An adapter without effect on its batches asks for the base there, like a prior set: weight 1.
    balanced = [mean_effect / e if e is not None and e > 0 else 1.0 for e in effects]
    dtype = next(iter(problem.targets.values()))[0].dtype
    free = {n: d.to(dtype).clone().requires_grad_(True) for n, d in deltas.items()}
    optimizer = torch.optim.Adam(free.values(), lr=lr)
    total = sum(w for _, _, w in problem.sets)
    # Every other parameter enters detached: the gradient flows to the ΔW alone, the model's .grad stays untouched.
    frozen = {n: p.detach() for n, p in problem.root.named_parameters()}
    for _ in range(steps):
        params = dict(frozen)
        for name, d in free.items():  # differentiable W + ΔW in the parameter's layout
            weight, transposed = problem.targets[name]
            params[problem.param[name]] = weight.detach() + (d.t() if transposed else d.reshape(weight.shape))
        loss = 0.0
        for (_, group, w), outs, k in zip(problem.sets, targets, balanced):
            for batch, target in zip(group, outs):
                loss = loss + (k * w / total / len(group)) * _divergence(
                    _output(_call(problem.root, params, batch)), target
                )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {n: d.detach().to(torch.float64) for n, d in free.items()}


def _output(out) -> tuple[torch.Tensor, bool]:
    """The tensor a model's output is judged by, and whether it is next-token logits (``.logits`` of an LM; else
    ``.sample`` of a diffusers model, or the first tensor)."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, True
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample, False
    return (out[0] if isinstance(out, (tuple, list)) else out), False


def _divergence(out: tuple[torch.Tensor, bool], target: tuple[torch.Tensor, bool]) -> torch.Tensor:
    """``KL(target ‖ out)`` of the next-token distributions (mean over positions) for logits, else the MSE."""
    (y, logits), (t, _) = out, target
    if logits:
        log_q, log_p = y.log_softmax(-1).flatten(0, -2), t.log_softmax(-1).flatten(0, -2)
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return F.mse_loss(y, t)


def _batches_per_adapter(adapters: list[Adapter], inputs) -> list[list[Batch]]:
    if isinstance(inputs, Mapping):
        unknown = set(inputs) - {a.name for a in adapters}
        if unknown:
            raise ValueError(f"calibration inputs for unknown adapter(s) {sorted(unknown)}")
        lists = [list(inputs.get(a.name, ())) for a in adapters]
    else:
        inputs = list(inputs)
        if len(inputs) != len(adapters):
            raise ValueError(f"{len(inputs)} calibration sets for {len(adapters)} adapters")
        lists = [list(batches) for batches in inputs]
    for adapter, group in zip(adapters, lists):
        if not group:
            raise IncompatibleAdaptersError("no calibration batch for this adapter", adapter=adapter.name)
    return lists


def _module(root: nn.Module, name: str) -> nn.Module:
    module = find_module(root, name)  # the same lookup as fuse_targets
    if module is None:
        raise IncompatibleAdaptersError(f"the model has no module {name!r}", layer=name)
    if hasattr(module, "base_layer"):
        raise IncompatibleAdaptersError("the model already carries an adapter here: pass the base model", layer=name)
    return module


def _check_layer_type(module: nn.Module, name: str) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                "grouped, 'same'-padded or non-zero-padded convolutions are not supported by the sequential merge",
                layer=name,
            )
    elif not isinstance(module, (nn.Linear, Conv1D)):
        raise UnsupportedLayerError(
            f"{type(module).__name__} is not supported by the sequential merge (Linear, Conv1D, Conv2d)", layer=name
        )


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(n, in)`` rows: tokens, or unfolded ``C_in·kh·kw`` patches for a convolution."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, C·k·k, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _as_out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.t() if transposed else weight.reshape(weight.shape[0], -1)


def _to_layout(w_out_in: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``(out, in)`` float64 → the parameter's own layout and dtype (Conv1D stores ``(in, out)``; convs a kernel)."""
    w = w_out_in.t() if transposed else w_out_in.reshape(weight.shape)
    return w.to(weight.dtype).contiguous()


def _call(root: nn.Module, params: dict[str, torch.Tensor], batch: Batch):
    if isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    else:
        args, kwargs = (batch,), {}
    return torch.func.functional_call(root, params, args, kwargs, strict=False)


def _capture(
    root: nn.Module,
    params: dict[str, torch.Tensor],
    batch: Batch,
    modules: dict[str, nn.Module],
    names: list[str],
    stop: bool = True,
) -> dict[str, torch.Tensor]:
    """Inputs (as rows) of ``names`` in one forward pass with ``params`` swapped in; stops early once all are seen."""
    found: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(module, args):
            found[name] = _rows(module, args[0]).detach()
            if stop and len(found) == len(names):
                raise _Stop

        return pre

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        _call(root, params, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in found]
    if missing:
        raise IncompatibleAdaptersError("the calibration forward pass never reaches this layer", layer=missing[0])
    return found


def _depths(root: nn.Module, modules: dict[str, nn.Module], batch: Batch) -> list[list[str]]:
    """Adapted layers grouped by the input tensor they read, in the order the forward pass first reaches them.

    A group's input was computed before any of its layers ran, so it depends only on layers of earlier groups.
    """
    calls: list[tuple[str, int]] = []
    keep: list[torch.Tensor] = []  # holds every input alive during the pass, so no id() is reused

    def hook(name):
        def pre(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise UnsupportedLayerError("the layer is called without a positional input tensor", layer=name)
            keep.append(args[0])
            calls.append((name, id(args[0])))

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        _call(root, {}, batch)
    finally:
        for h in handles:
            h.remove()
    seen: dict[str, int] = {}
    for name, _ in calls:
        seen[name] = seen.get(name, 0) + 1
    for name in modules:
        if name not in seen:
            raise IncompatibleAdaptersError("the calibration forward pass never reaches this layer", layer=name)
        if seen[name] > 1:
            raise UnsupportedLayerError(
                f"called {seen[name]} times in one forward pass: its inputs depend on its own merged weight; "
                "calibrate with one call per forward (e.g. one denoising step per batch)",
                layer=name,
            )
    groups: dict[int, list[str]] = {}
    for name, key in calls:
        groups.setdefault(key, []).append(name)
    return list(groups.values())  # dicts keep insertion order: first call first
