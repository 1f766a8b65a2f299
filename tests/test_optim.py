"""Stiefel optimizers: orthogonality over thousands of steps, descent, AdamW/SGD equivalence, the combined helper."""

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_ortho import SodaConfig
from peft_ortho.optim import (
    StiefelAdam,
    StiefelSGD,
    make_optimizer,
    orthogonality_error,
    project_tangent,
    qr_retraction,
    split_parameters,
)


def _orthonormal(n, p, seed=0):
    return qr_retraction(torch.randn(n, p, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: StiefelAdam(ps, lr=0.02),
        lambda ps: StiefelAdam(ps, lr=0.02, retraction="cayley"),
        lambda ps: StiefelSGD(ps, lr=0.05, momentum=0.9),
        lambda ps: StiefelSGD(ps, lr=0.05, momentum=0.9, retraction="cayley"),
    ],
)
def test_orthogonality_holds_to_float_precision_over_thousands_of_steps(make):
    g = torch.Generator().manual_seed(1)
    square = nn.Parameter(_orthonormal(8, 8))
    other = nn.Parameter(_orthonormal(6, 6, seed=4))
    target = torch.randn(8, 8, generator=g)
    opt = make([square, other])
    for _ in range(2000):
        opt.zero_grad()
        noise = torch.randn(8, 8, generator=g)  # a moving objective keeps the gradients large
        loss = ((square - target - 0.1 * noise) ** 2).sum() + (other @ other[:, :1]).sum()
        loss.backward()
        opt.step()
    assert orthogonality_error(square) < 1e-5
    assert orthogonality_error(other) < 1e-5
    assert (square - torch.eye(8)).abs().max() > 0.1  # it moved


def test_tall_matrix_and_tangent_projection():
    x = _orthonormal(7, 3)
    g = torch.randn(7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    xi = project_tangent(x, g)
    assert torch.allclose(x.T @ xi + xi.T @ x, torch.zeros(3, 3), atol=1e-6)  # tangent: XᵀΞ skew
    p = nn.Parameter(x.clone())
    opt = StiefelAdam([p], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        (p * g).sum().backward()
        opt.step()
    assert orthogonality_error(p) < 1e-6


def test_stiefel_adam_solves_orthogonal_procrustes():
    target = _orthonormal(6, 6, seed=3)
    x = nn.Parameter(torch.eye(6))
    opt = StiefelAdam([x], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        loss = ((x - target) ** 2).sum()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3  # reached the orthogonal target, moving only on the manifold
    assert orthogonality_error(x) < 1e-6


def _euclidean_run(opt_cls, ref_cls, opt_kw, ref_kw, steps=20):
    torch.manual_seed(0)
    a = nn.Linear(5, 3)
    b = copy.deepcopy(a)
    opt = opt_cls([{"params": a.parameters(), "stiefel": False, **opt_kw}])
    ref = ref_cls(b.parameters(), **ref_kw)
    x = torch.randn(4, 5)
    for _ in range(steps):
        for model, o in ((a, opt), (b, ref)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    return a, b


def test_euclidean_groups_match_torch_adamw_and_sgd():
    a, b = _euclidean_run(
        StiefelAdam, torch.optim.AdamW, {"weight_decay": 0.1, "lr": 0.01}, {"weight_decay": 0.1, "lr": 0.01}
    )
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))
    a, b = _euclidean_run(StiefelSGD, torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}, {"lr": 0.01, "momentum": 0.9})
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_make_optimizer_groups_and_state_dict_resume(mlp):
    model = get_peft_model(copy.deepcopy(mlp), SodaConfig(target_modules=["lin0", "lin1"], rotation="stiefel"))
    euclidean, stiefel = split_parameters(model)
    assert len(stiefel) == 4 and all(p.ndim == 2 for p in stiefel)  # two factors per layer
    assert len(euclidean) == 2  # the two spectra
    opt = make_optimizer(model, lr=1e-2, stiefel_lr=5e-2, weight_decay=0.01)
    assert [g["name"] for g in opt.param_groups] == ["euclidean", "stiefel"]
    assert opt.param_groups[1]["lr"] == 5e-2 and opt.param_groups[1]["weight_decay"] == 0.0
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))

    def step(m, o):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    clone = copy.deepcopy(model)
    opt2 = make_optimizer(clone, lr=1e-2, stiefel_lr=5e-2, weight_decay=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved and read back: no shared tensors
    for _ in range(3):
        step(model, opt)
        step(clone, opt2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clone.parameters()))  # resume is exact
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # a real torch Optimizer
    step(model, opt)
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(2.5e-2)


def test_invalid_arguments():
    p = nn.Parameter(torch.eye(3))
    with pytest.raises(ValueError, match="weight_decay must be 0 for Stiefel"):
        StiefelAdam([p], weight_decay=0.1)
    with pytest.raises(ValueError, match=r"n×p matrices with n >= p"):
        StiefelSGD([nn.Parameter(torch.ones(2, 5))])
    with pytest.raises(ValueError, match="retraction must be 'qr' or 'cayley'"):
        StiefelAdam([p], retraction="polar")
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(nn.Linear(2, 2).requires_grad_(False))
