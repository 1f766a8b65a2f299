"""Two further probes of LLM skill composition: a base that already knows several operations, and wider layers.

Follows ``studies/llm_composition.py`` (same merge, same module-level erasure) with its own token set. The base
GPT-2 (2 layers, built from a config, untied head) is pretrained on four operations over 5 digits — ``COPY``,
``REV`` (reversed), ``NEG`` (``9 − x``), ``SUCC`` (``x + 1 mod 10``) — so it routes its task token the way an
instruction-following model does. Two people then each teach it a new instruction token, ``TA`` (basis slot 0) and
``TB`` (slot 1), with an ``OrthoLoraConfig`` adapter trained alone:

- ``--skills alias``: ``TA`` means ``NEG`` and ``TB`` means ``SUCC`` — a new name for a known operation, the
  smallest change an adapter can make;
- ``--skills combo``: ``TA`` is ``NEG`` of the reversed digits, ``TB`` is ``SUCC`` of the reversed digits — a new
  operation built from known ones.

Each step also runs a foreign batch (the base's four task tokens and four tokens no one trains; never the other
person's token) with output erasure (``KL(base ‖ adapted)``, weight ``--kl``) and module-level erasure
(``‖s·BAx‖² / ‖x‖²`` per adapted module, weight ``--module``). ``--trigger`` also gives the new token a trainable
embedding row. Printed: each skill alone, both merged (exact sum of the two deltas), and the base operations merged.

    python -m studies.llm_probes --skills alias --width 128 --rank 4 --seeds 0 1   # about 4 min per seed
    python -m studies.llm_probes --quick                                            # smoke run, seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from . import llm_tasks as T
from .llm_composition import deltas, merged_model, skill_adapter, train_skill

K, L = T.K, T.L
COPY, REV, NEG, SUCC, TA, TB = range(K, K + 6)
BASE_TASKS = (COPY, REV, NEG, SUCC)
UNTRAINED = tuple(range(K + 6, K + 10))  # task tokens no one trains: the erasure pool's other half
SEP = K + 10
VOCAB = SEP + 1
NAMES = {COPY: "COPY", REV: "REV", NEG: "NEG", SUCC: "SUCC", TA: "TA", TB: "TB"}


def answers(tasks: torch.Tensor, x: torch.Tensor, skills: str) -> torch.Tensor:
    """``y`` for each row of ``x`` ``(n, L)`` under its task token in ``tasks`` ``(n, 1)``; unknown tokens copy."""
    flipped = x.flip(1)
    ta = K - 1 - (x if skills == "alias" else flipped)
    tb = (x if skills == "alias" else flipped) + 1
    table = {REV: flipped, NEG: K - 1 - x, SUCC: (x + 1) % K, TA: ta, TB: tb % K}
    y = x.clone()
    for token, value in table.items():
        y = torch.where(tasks == token, value, y)
    return y


def make_batch(tasks, n: int, generator, skills: str) -> torch.Tensor:
    """``(n, 2L + 2)`` sequences ``[task, x, SEP, y]``; ``tasks`` is a token or an ``(n, 1)`` tensor of tokens."""
    return T.sequences(tasks, n, generator, lambda t, x: answers(t, x, skills), SEP)


def accuracy(model, task: int, skills: str, n: int = 500) -> float:
    """Greedy per-token accuracy on this probe's tasks."""
    return T.accuracy(model, task, lambda t, m, g: make_batch(t, m, g, skills), n)


def build_base(width: int, steps: int, seed: int):
    """A 2-layer GPT-2 from a config, all weights pretrained on a uniform mix of the four base operations."""
    tasks = torch.tensor(BASE_TASKS)

    def batch(g: torch.Generator) -> torch.Tensor:
        return make_batch(tasks[torch.randint(0, len(tasks), (64, 1), generator=g)], 64, g, "alias")

    return T.pretrain(T.base_model(seed, width, VOCAB, SEP), batch, steps, 3e-3, seed)  # AdamW's default decay


def run(seed: int, args) -> dict:
    base = build_base(args.width, args.base_steps, seed)
    row, parts = {"seed": seed}, []
    for slot, task in enumerate((TA, TB)):
        model = skill_adapter(base, slot, args.rank, T.TARGETS, task if args.trigger else None)
        train_skill(
            model,
            task,
            {"kl": args.kl, "module": args.module},
            args.steps,
            args.lr,
            seed=seed * 100 + 10 + slot,
            batches=lambda tasks, n, g: make_batch(tasks, n, g, args.skills),
            foreign=BASE_TASKS + UNTRAINED,
        )
        row[f"{NAMES[task]} alone"] = accuracy(model, task, args.skills)
        parts.append(deltas(base, model))
    merged = merged_model(base, parts)
    for task in (TA, TB) + BASE_TASKS:
        row[f"{NAMES[task]} merged"] = accuracy(merged, task, args.skills)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skills", choices=["alias", "combo"], default="alias")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--base_steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--kl", type=float, default=1.0, help="output erasure weight")
    parser.add_argument("--module", type=float, default=10.0, help="module-level erasure weight")
    parser.add_argument("--trigger", action="store_true", help="a trainable embedding row for the new token")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny step counts, one seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.base_steps, args.seeds, args.width = 3, 3, args.seeds[:1], 32
    torch.set_num_threads(1)
    columns = ["TA alone", "TB alone", "TA merged", "TB merged"] + [f"{NAMES[t]} merged" for t in BASE_TASKS]
    print(f"skills {args.skills}, width {args.width}, rank {args.rank}" + (", trigger rows" if args.trigger else ""))
    print("| seed | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for seed in args.seeds:
        start = time.perf_counter()
        row = run(seed, args)
        cells = " | ".join(f"{row[c]:.3f}" for c in columns)
        print(f"| {seed} | {cells} |  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
