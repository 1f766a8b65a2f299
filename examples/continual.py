"""Continual personalization on a tiny MLP: five tasks, one after another, with every strategy; prints the table.

    python examples/continual.py [--tasks 5] [--steps 150] [--rank 4] [--state continual-state]

Offline and CPU-only; a few seconds. What it does:

1. builds a small MLP classifier (random weights stand in for a pretrained model) and five synthetic tasks: task
   ``k`` draws inputs around its own centre and labels them with its own random linear teacher, so the tasks need
   different, partly conflicting updates of the same layers;
2. for each strategy (naive, merge & init, merge & orthogonal init, magnitude, and orthogonal slots with
   ``OrthoLoraConfig``) trains the tasks in order through ``ContinualLearner``: a LoRA per task (rank ``--rank``
   on the hidden layers), no past adapter and no past data kept; ``run_continual`` fills the task matrix
   ``M[s, t]`` (accuracy on task ``s`` after training task ``t``);
3. stops the merge & orthogonal init run after task 3, saves its state, resumes it on a fresh copy of the base
   model (as another day would) and checks the finished run is bit-identical to an uninterrupted one;
4. prints average accuracy and average forgetting per strategy.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch
from peft import LoraConfig
from torch import nn

from peft_ortho import OrthoLoraConfig
from peft_ortho.continual import (
    STRATEGIES,
    ContinualLearner,
    format_metrics_table,
    run_continual,
    task_matrix_metrics,
)

IN, HIDDEN, CLASSES = 128, 64, 4
TARGETS = ["hidden1", "hidden2"]


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden1 = nn.Linear(IN, HIDDEN)
        self.hidden2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden2(torch.tanh(self.hidden1(x)))))


def make_tasks(n: int, seed: int = 0, dim: int = 4) -> list[dict[str, torch.Tensor]]:
    """Task ``k``: inputs ``x = U_k z`` with ``z ~ N(0, I_dim)`` on the task's own random ``dim``-dimensional
    subspace ``U_k`` of the input space (random subspaces overlap partly), labels ``argmax(T_k z)`` from the task's
    own random teacher ``T_k``. One model can solve every task at once; a task's update, learned from its own
    inputs only, disturbs the others through the overlaps and the shared hidden layer."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        basis = torch.linalg.qr(torch.randn(IN, dim, generator=g))[0] * 2.0
        teacher = torch.randn(CLASSES, dim, generator=g)
        z = torch.randn(512, dim, generator=g)
        x, y = z @ basis.T, (z @ teacher.T).argmax(-1)
        tasks.append({"x_train": x[:384], "y_train": y[:384], "x_test": x[384:], "y_test": y[384:]})
    return tasks


def train(model: nn.Module, task: dict[str, torch.Tensor], steps: int = 150, lr: float = 1e-2) -> None:
    torch.manual_seed(0)  # batch order: the same on every run, so a resumed run can be bit-identical
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, task["x_train"].shape[0], (64,))
        loss = nn.functional.cross_entropy(model(task["x_train"][idx]), task["y_train"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(model: nn.Module, task: dict[str, torch.Tensor]) -> float:
    return float((model(task["x_test"]).argmax(-1) == task["y_test"]).float().mean())


def config_for(strategy: str, rank: int) -> LoraConfig:
    if strategy == "orthogonal":  # task t trains B on slot t of the shared basis (128 // rank slots on hidden1)
        return OrthoLoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, slot=0)
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--state", default=None, help="folder for the saved state (default: a temporary folder)")
    args = p.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and spares a shared machine
    torch.manual_seed(0)
    base = Classifier()
    tasks = make_tasks(args.tasks)

    def train_fn(model, task):
        train(model, task, args.steps)

    results, matrices = {}, {}
    for strategy in STRATEGIES:
        learner = ContinualLearner(copy.deepcopy(base), strategy, config_for(strategy, args.rank))
        matrices[strategy] = run_continual(learner, tasks, train_fn, accuracy)
        results[strategy] = task_matrix_metrics(matrices[strategy])
        if strategy == "merge_and_orthogonal_init":
            uninterrupted = learner.model.state_dict()

    # Another day: stop after task 3, save, resume on a fresh copy of the base model, finish the sequence.
    state = args.state or os.path.join(tempfile.mkdtemp(prefix="continual-"), "state")
    cut = min(3, args.tasks - 1)
    learner = ContinualLearner(
        copy.deepcopy(base), "merge_and_orthogonal_init", config_for("merge_and_orthogonal_init", args.rank)
    )
    partial = run_continual(learner, tasks[:cut], train_fn, accuracy, save_dir=state)
    resumed = ContinualLearner.resume(state, copy.deepcopy(base))
    matrix = run_continual(resumed, tasks, train_fn, accuracy, matrix=partial)
    same = all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in uninterrupted.items())
    same = same and np.array_equal(matrix, matrices["merge_and_orthogonal_init"], equal_nan=True)
    files = ", ".join(f"{f} ({os.path.getsize(os.path.join(state, f))} B)" for f in sorted(os.listdir(state)))
    print(f"saved after task {cut} to {state}/: {files}")
    print(f"resumed on a fresh base model and finished: bit-identical to the uninterrupted run: {same}")

    print(
        f"\n{args.tasks} tasks, LoRA rank {args.rank} on {TARGETS}, {args.steps} Adam steps per task; score = accuracy"
    )
    print("task matrix of merge_and_orthogonal_init (rows: task s, columns: after task t):")
    print(np.array2string(matrices["merge_and_orthogonal_init"], precision=2))
    print()
    print(format_metrics_table(results))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    if not same:
        raise SystemExit("resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
