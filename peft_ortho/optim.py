"""Optimizers on the Stiefel manifold, for SODA's ``rotation="stiefel"`` mode (raw orthogonal Kronecker factors).

A parameter ``X ∈ R^{n×p}`` (``n ≥ p``; SODA's factors are square) lives on ``St(n, p) = {X : XᵀX = I}``. One step:

All Stiefel arithmetic runs in float64 on stacks of same-shape factors (a few batched ops per shape, not a dozen
tiny ops per factor). One step:

1. Riemannian gradient: project the Euclidean gradient ``G`` onto the tangent space at ``X``,
   ``ξ = G − X sym(XᵀG)`` with ``sym(A) = (A + Aᵀ)/2``;
2. a Euclidean-style update direction ``D`` built from ``ξ`` (momentum for SGD; Adam's moments for Adam; the moments
   are re-projected onto the current tangent space, a cheap vector transport), projected onto the tangent space;
3. retraction back onto the manifold: ``X ← qf(X − lr·D)``, the Q factor of a thin QR with the signs fixed so that
   ``diag(R) > 0`` (``retraction="qr"``, default), or the Cayley retraction ``X ← (I + lr/2 W)⁻¹(I − lr/2 W) X`` with
   the skew ``W = D Xᵀ − X Dᵀ`` (``retraction="cayley"``; ``n×n`` solve), followed by one Newton–Schulz step
   ``X (3I − XᵀX)/2`` that removes the rounding the Cayley map would otherwise carry from step to step.

The QR retraction re-orthonormalises ``X`` at every step, so rounding errors do not accumulate: ``‖XᵀX − I‖`` stays at
float precision (≈1e-6 in float32) over any number of steps. Parameter groups with ``stiefel=False`` are updated as
plain SGD / AdamW (decoupled weight decay), so one optimizer object trains a whole SODA model; ``make_optimizer``
builds it. Weight decay is never applied to Stiefel groups (it would pull ``X`` off the manifold).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn

STIEFEL_MARKER = ".stiefel."


def is_stiefel_parameter(name: str) -> bool:
    """Whether a parameter is a SODA ``rotation="stiefel"`` factor.

    Args:
        name: a name from ``model.named_parameters()``.

    Returns:
        True for names ``*.stiefel.*``.
    """
    return STIEFEL_MARKER in name or name.startswith("stiefel.")


def _as_matrix(p: torch.Tensor) -> torch.Tensor:
    if p.ndim != 2 or p.shape[0] < p.shape[1]:
        raise ValueError(f"Stiefel parameters must be n×p matrices with n >= p, got shape {tuple(p.shape)}")
    return p


def _sym(a: torch.Tensor) -> torch.Tensor:
    return (a + a.mT) / 2


def project_tangent(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of ``g`` onto the tangent space of the Stiefel manifold at ``x``: ``g − x sym(xᵀg)``.

    Args:
        x: a point, an ``n×p`` matrix with orthonormal columns, or a stack ``(B, n, p)``.
        g: a gradient of the same shape.

    Returns:
        The tangent vector.
    """
    return g - x @ _sym(x.mT @ g)


def qr_retraction(y: torch.Tensor) -> torch.Tensor:
    """The orthonormal Q factor of ``y`` (thin QR) with ``diag(R) > 0``: the closest-in-sign orthonormal matrix.

    Args:
        y: an ``n×p`` matrix (or a stack).

    Returns:
        Q, of ``y``'s shape.
    """
    q, r = torch.linalg.qr(y)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)


def cayley_retraction(x: torch.Tensor, d: torch.Tensor, lr: float) -> torch.Tensor:
    """``(I + lr/2 W)⁻¹ (I − lr/2 W) x`` with ``W = d xᵀ − x dᵀ`` (skew): stays on the manifold, descends along ``d``.

    Args:
        x: the current point.
        d: the descent direction (tangent).
        lr: the step size.

    Returns:
        The new point.
    """
    w = d @ x.mT - x @ d.mT
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye + (lr / 2) * w, (eye - (lr / 2) * w) @ x)


def orthogonality_error(x: torch.Tensor) -> float:
    """``‖xᵀx − I‖_F`` computed in float64.

    Args:
        x: a matrix (or a stack).

    Returns:
        The error, as a float.
    """
    x = x.detach().double()
    return torch.linalg.matrix_norm(x.T @ x - torch.eye(x.shape[1], dtype=x.dtype, device=x.device)).item()


def _retract(x: torch.Tensor, d: torch.Tensor, lr: float, retraction: str) -> torch.Tensor:
    """Retraction of ``x − lr·d`` (``x``, ``d`` float64 stacks ``(B, n, p)``)."""
    if retraction == "qr":
        return qr_retraction(x - lr * d)
    y = cayley_retraction(x, d, lr)
    # The Cayley map preserves XᵀX exactly, including the rounding error of the previous step, so errors would add up
    # over thousands of steps; one Newton–Schulz step toward the polar factor, X (3I − XᵀX) / 2, removes them
    # (error ε → O(ε²)) for one small matmul.
    eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
    return y @ (1.5 * eye - 0.5 * (y.mT @ y))


def _by_shape(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters grouped by (shape, dtype, device): each group is updated with a handful of batched ops instead of a
    dozen tiny ops per factor (tiny ops are dominated by dispatch and thread wake-ups on CPU)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    return list(groups.values())


def _stack64(tensors: list[torch.Tensor]) -> torch.Tensor:
    # Stiefel math in float64 (the factors are small): orthogonality to ~1e-15 before the cast back, also for fp16.
    return torch.stack([t.detach() for t in tensors]).to(torch.float64)


def _write_back(targets: list[torch.Tensor], values: torch.Tensor) -> None:
    torch._foreach_copy_(targets, [v.to(t.dtype) for t, v in zip(targets, values.unbind(0))])


class _StiefelBase(torch.optim.Optimizer):
    def __init__(self, params, defaults: dict[str, Any]):
        if defaults["retraction"] not in ("qr", "cayley"):
            raise ValueError(f"retraction must be 'qr' or 'cayley', got {defaults['retraction']!r}")
        if defaults["lr"] < 0:
            raise ValueError(f"invalid learning rate {defaults['lr']}")
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["stiefel"]:
                if group.get("weight_decay", 0.0):
                    raise ValueError("weight_decay must be 0 for Stiefel parameter groups (it leaves the manifold)")
                for p in group["params"]:
                    _as_matrix(p)


class StiefelSGD(_StiefelBase):
    """Riemannian SGD with momentum on the Stiefel manifold (groups with ``stiefel=False``: plain SGD).

    ``momentum`` is transported by projection onto the new tangent space after each step.

    Args:
        params: tensors or param groups; a group's ``stiefel`` says whether its matrices are kept orthonormal.
        lr: the learning rate.
        momentum: the momentum factor.
        weight_decay: weight decay (Euclidean groups).
        retraction: ``"qr"`` or ``"cayley"``.
        stiefel: the default of the groups' ``stiefel``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        retraction: str = "qr",
        stiefel: bool = True,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, retraction=retraction, stiefel=stiefel)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            if not group["stiefel"]:
                for p in params:
                    g = p.grad
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    if momentum:
                        state = self.state[p]
                        if "momentum_buffer" not in state:
                            state["momentum_buffer"] = g.clone()
                        else:
                            state["momentum_buffer"].mul_(momentum).add_(g)
                        g = state["momentum_buffer"]
                    p.add_(g, alpha=-lr)
                continue
            for batch in _by_shape(params):
                x = _stack64(batch)
                g = project_tangent(x, _stack64([p.grad for p in batch]))
                if momentum:
                    states = [self.state[p] for p in batch]
                    fresh = [s for s in states if "momentum_buffer" not in s]
                    for s, p in zip(states, batch):
                        if "momentum_buffer" not in s:
                            s["momentum_buffer"] = torch.zeros_like(p)
                    buf = _stack64([s["momentum_buffer"] for s in states])
                    # a new buffer starts at the gradient (as torch's SGD), the others decay
                    decay = torch.tensor([0.0 if s in fresh else momentum for s in states], dtype=torch.float64)
                    g = buf * decay.to(buf.device)[:, None, None] + g
                x_new = _retract(x, project_tangent(x, g), lr, group["retraction"])
                _write_back(batch, x_new)
                if momentum:
                    _write_back([s["momentum_buffer"] for s in states], project_tangent(x_new, g))
        return loss


class StiefelAdam(_StiefelBase):
    """Riemannian Adam on the Stiefel manifold (groups with ``stiefel=False``: AdamW, decoupled weight decay).

    Stiefel groups: the first moment accumulates Riemannian gradients and is re-projected onto the tangent space after
    every step; the second moment is elementwise as in Adam (like most Riemannian Adam variants for matrix manifolds it
    is not rotation-invariant); the step ``m̂ / (√v̂ + eps)`` is projected onto the tangent space and retracted.

    Args:
        params: tensors or param groups; a group's ``stiefel`` says whether its matrices are kept orthonormal.
        lr: the learning rate.
        betas: Adam's moment decays.
        eps: Adam's denominator term.
        weight_decay: decoupled weight decay (Euclidean groups).
        retraction: ``"qr"`` or ``"cayley"``.
        stiefel: the default of the groups' ``stiefel``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        retraction: str = "qr",
        stiefel: bool = True,
    ):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, retraction=retraction, stiefel=stiefel)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            if not group["stiefel"]:
                for p in params:  # AdamW, as torch.optim.AdamW computes it
                    state = self.state[p]
                    step = state["step"].item()
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    m.lerp_(p.grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    if group["weight_decay"]:
                        p.mul_(1 - lr * group["weight_decay"])
                    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                    p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
                continue
            for batch in _by_shape(params):
                states = [self.state[p] for p in batch]
                steps = torch.tensor([s["step"].item() for s in states], dtype=torch.float64)[:, None, None]
                x = _stack64(batch)
                g = project_tangent(x, _stack64([p.grad for p in batch]))
                m = _stack64([s["exp_avg"] for s in states]).lerp_(g, 1 - beta1)
                v = _stack64([s["exp_avg_sq"] for s in states]).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                steps = steps.to(x.device)
                direction = (m / (1 - beta1**steps)) / (v.sqrt() / torch.sqrt(1 - beta2**steps) + eps)
                x_new = _retract(x, project_tangent(x, direction), lr, group["retraction"])
                _write_back(batch, x_new)
                _write_back([s["exp_avg"] for s in states], project_tangent(x_new, m))  # transport m
                _write_back([s["exp_avg_sq"] for s in states], v)
        return loss


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The model's trainable parameters, Stiefel factors (names ``*.stiefel.*``) apart.

    Args:
        model: the model.

    Returns:
        ``(euclidean, stiefel)``: two lists of parameters.
    """
    euclidean, stiefel = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (stiefel if is_stiefel_parameter(name) else euclidean).append(p)
    return euclidean, stiefel


def make_optimizer(
    model: nn.Module,
    lr: float = 1e-4,
    stiefel_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    kind: str = "adam",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.0,
    retraction: str = "qr",
) -> torch.optim.Optimizer:
    """One optimizer for a whole (SODA) model: AdamW or SGD on the Euclidean parameters, its Stiefel kind on the rest.

    The Euclidean parameters are the spectrum deltas, the Cayley factors and anything else trainable; the Stiefel
    optimizer of the same kind takes the ``rotation="stiefel"`` factors (no weight decay).

    Args:
        model: the model (a peft model holding SODA adapters, or any module).
        lr: the learning rate.
        stiefel_lr: the Stiefel factors' learning rate (default ``lr``).
        weight_decay: decoupled weight decay of the Euclidean parameters.
        kind: ``"adam"`` or ``"sgd"``.
        betas: Adam's moment decays.
        eps: Adam's denominator term.
        momentum: SGD's momentum.
        retraction: ``"qr"`` or ``"cayley"``.

    Returns:
        A ``torch.optim.Optimizer`` (``StiefelAdam`` / ``StiefelSGD`` with two param groups: ``"euclidean"`` then
        ``"stiefel"``), so LR schedulers, ``state_dict``/``load_state_dict`` and gradient clipping work as usual.
    """
    euclidean, stiefel = split_parameters(model)
    if not euclidean and not stiefel:
        raise ValueError("the model has no trainable parameters")
    groups = []
    if euclidean:
        groups.append({"params": euclidean, "stiefel": False, "weight_decay": weight_decay, "name": "euclidean"})
    if stiefel:
        groups.append({"params": stiefel, "stiefel": True, "weight_decay": 0.0, "name": "stiefel"})
        groups[-1]["lr"] = lr if stiefel_lr is None else stiefel_lr
    if kind == "adam":
        return StiefelAdam(groups, lr=lr, betas=betas, eps=eps, retraction=retraction)
    if kind == "sgd":
        return StiefelSGD(groups, lr=lr, momentum=momentum, retraction=retraction)
    raise ValueError(f"kind must be 'adam' or 'sgd', got {kind!r}")
