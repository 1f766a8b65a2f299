"""Two "skills" for a small causal LM, each trained independently as an adapter, then merged with
``peft_ortho.compose`` four ways and fused into the base. Offline and tokenizer-free: a GPT-2 built from a config,
integer tokens, synthetic tasks; a few minutes on a CPU (most of it the end-to-end refinement of the last merge).

    python examples/llm_skills.py [--steps 200] [--rank 8] [--methods lora ortho] [--erasure_weight 1] [--out DIR]

Tokens: digits ``0..K-1`` and task tokens ``COPY``, ``REV``, ``SUCC``, plus ``SEP``. A sequence is
``[task, x_1..x_L, SEP, y_1..y_L]`` and the model must produce ``y`` greedily:

- ``COPY``: ``y = x`` — the *base* model is pretrained (all weights) on this one, so it knows the format;
- ``REV`` (skill 1): ``y = reversed(x)`` — re-routes attention;
- ``SUCC`` (skill 2): ``y_i = (x_i + 1) mod K`` — re-maps tokens.

Each skill is learnt by its own adapter from the same base, by "people" who never see the other skill: a plain
``LoraConfig`` adapter and, for comparison, an ``OrthoLoraConfig`` adapter on basis slot 0 (REV) or 1 (SUCC).
Training uses output erasure on foreign inputs (``--erasure_weight``: the base model's behaviour on ``COPY`` and on
task tokens no one trains, adapters disabled as teacher) and records each adapted layer's input statistics with
``peft_ortho.InputStatistics`` (task batches as ``"concept"``, erasure batches as ``"prior"``), saved beside the
adapter. Each pair is then merged with ``compose``:

- ``exact sum`` (``method="linear"``): ``W + ΔW_rev + ΔW_succ``;
- ``per-layer closed form`` (``method="regmean"``): from the recorded statistics;
- ``sequential`` (``method="sequential"``): layer by layer through the partly merged model, on calibration
  sequences of each skill and ordinary ones (``calibrate=base``, ``inputs=``, ``prior_inputs=``);
- ``sequential + refinement``: the same, then ``--refine_steps`` of end-to-end output matching.

Printed: the greedy per-token accuracy (chance: ``1/K``) of each skill alone and after each merge, and of COPY
(what the base could do). Measured numbers and what they mean: docs/llm.md. The studies ``studies/llm_composition.py``
and ``studies/llm_probes.py`` ask why summed skill adapters interfere.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

# Heavy imports inside the functions: `--help` answers instantly.

K = 10  # digits 0..K-1
L = 5  # digits per sequence
COPY, REV, SUCC = K, K + 1, K + 2
TASK_TOKENS = (COPY, REV, SUCC, K + 3, K + 4, K + 5)  # K+3..K+5: task tokens no one trains (erasure pool)
SEP = K + len(TASK_TOKENS)
VOCAB = SEP + 1
NAMES = {COPY: "COPY", REV: "REV", SUCC: "SUCC"}
TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2's Conv1D layers: attention in/out, MLP in/out


def make_batch(task, n: int, generator):
    """``(n, 2L + 2)`` int64 sequences ``[task, x, SEP, y]`` with ``x`` uniform digits.

    ``task``: a task token, or an ``(n, 1)`` tensor of task tokens (the answer is then ``x``: the erasure pool's
    sequences only need inputs, their target is the base model's output).
    """
    import torch

    x = torch.randint(0, K, (n, L), generator=generator)
    if isinstance(task, int):
        y = {REV: x.flip(1), SUCC: (x + 1) % K}.get(task, x)
        task = torch.full((n, 1), task)
    else:
        y = x
    return torch.cat([task, x, torch.full((n, 1), SEP), y], 1)


def lm_loss(model, seq):
    """Next-token cross-entropy on the answer positions only (``y_1..y_L``), averaged."""
    import torch.nn.functional as F

    logits = model(input_ids=seq[:, :-1]).logits  # (n, 2L+1, V); position j predicts token j+1
    target = seq[:, 1:].clone()
    target[:, : L + 1] = -100  # task, x and SEP are given, not predicted
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def accuracy(model, task: int, n: int = 500, seed: int = 1234, batches=make_batch) -> float:
    """Per-token accuracy of the greedy answer (``L`` decoding steps) on ``n`` fresh sequences; chance is ``1/K``.

    ``batches(task, n, generator)`` makes the sequences (default: this example's tasks).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    seq = batches(task, n, g)
    cur = seq[:, : L + 2]
    with torch.no_grad():
        for _ in range(L):
            cur = torch.cat([cur, model(input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return (cur[:, L + 2 :] == seq[:, L + 2 :]).float().mean().item()


def build_base(width: int, steps: int, lr: float, seed: int = 0):
    """A 2-layer, 4-head GPT-2 from a config (``peft_ortho.testing.tiny_gpt2``: no dropout), ``2L + 2`` positions,
    pretrained on COPY with all weights trainable."""
    from peft_ortho.testing import tiny_gpt2

    model = tiny_gpt2(seed, width, VOCAB, n_positions=2 * L + 2, eos_token_id=SEP)
    train(model, COPY, steps, lr, seed=seed)
    return model


def train(
    model,
    task: int,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
    erasure_weight: float = 0.0,
    stats=None,
):
    """AdamW on ``lm_loss`` for ``task``; returns the last loss.

    ``erasure_weight > 0`` adds output erasure on foreign inputs: each step a batch with a task token drawn from
    the other task tokens, on which ``KL(base ‖ adapted)`` of the next-token distributions (all positions) is
    minimised; the base is the same model with its adapters disabled (``peft_ortho.erasure.adapters_disabled``).

    ``stats``: a ``peft_ortho.InputStatistics`` of ``model``; the task batches are recorded as ``"concept"`` and the
    erasure batches (the adapted model's forward) as ``"prior"``.
    """
    import contextlib

    import torch
    import torch.nn.functional as F

    def recording(kind):
        return stats.record(kind) if stats is not None else contextlib.nullcontext()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    # Private training: the pool is the base task and tokens no one trains, never the other skill's trigger.
    foreign = torch.tensor([t for t in TASK_TOKENS if t not in (task, REV, SUCC)])
    model.train()
    for _ in range(steps):
        with recording("concept"):
            loss = lm_loss(model, make_batch(task, batch_size, g))
        if erasure_weight:
            from peft_ortho.erasure import adapters_disabled

            tokens = foreign[torch.randint(0, len(foreign), (batch_size, 1), generator=g)]
            inputs = make_batch(tokens, batch_size, g)[:, :-1]
            with adapters_disabled(model), torch.no_grad():
                teacher = model(input_ids=inputs).logits.log_softmax(-1)
            with recording("prior"):
                student = model(input_ids=inputs).logits.log_softmax(-1)
            kl = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
            loss = loss + erasure_weight * kl
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def skill_config(method: str, slot: int, rank: int):
    """``OrthoLoraConfig`` on ``slot`` of the shared basis (seed 0), or a plain ``LoraConfig`` of the same rank."""
    from peft import LoraConfig

    from peft_ortho import OrthoLoraConfig

    common = {"r": rank, "lora_alpha": rank, "target_modules": TARGETS, "fan_in_fan_out": True}  # GPT-2's Conv1D
    if method == "ortho":
        return OrthoLoraConfig(slot=slot, basis_seed=0, **common)
    return LoraConfig(**common)


MERGES = {  # row label → compose arguments
    "exact sum": {"method": "linear"},
    "per-layer closed form": {"method": "regmean"},
    "sequential": {"method": "sequential"},
    "sequential + refinement": {"method": "sequential"},
}


def calibration(n: int, seed: int) -> tuple[dict, list]:
    """The merge's calibration batches: ``n`` sequences of each skill (the prompts a user of that skill sends, with
    the answers the skill gives) and ``n`` ordinary ones (``COPY`` and the untrained task tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    skills = {task: [{"input_ids": make_batch(task, n, g)[:, :-1]}] for task in (REV, SUCC)}
    pool = torch.tensor([t for t in TASK_TOKENS if t not in (REV, SUCC)])
    ordinary = [{"input_ids": make_batch(pool[torch.randint(0, len(pool), (n, 1), generator=g)], n, g)[:, :-1]}]
    return skills, ordinary


def run(args: argparse.Namespace, out_dir: str, log=print) -> dict:
    """Train the base, two skill adapters per method (recording their input statistics), merge each pair four ways.

    Returns ``{"base": {task: acc}, "<method>": {...}, "folders": {...}}`` where each method's entry holds ``"alone"``
    (``{task: acc}`` of each skill's own adapter), ``"merged"`` (``{merge row: {task: acc}}`` for REV, SUCC, COPY,
    one row per ``MERGES`` entry) and ``"exact"`` (``{merge row: compose's exactness flag}``).
    """
    import torch
    from peft import get_peft_model

    from peft_ortho import InputStatistics, compose

    start = time.perf_counter()
    base = build_base(args.width, args.base_steps, 3e-3, seed=args.seed)
    results = {"base": {NAMES[t]: accuracy(base, t) for t in (COPY, REV, SUCC)}, "folders": {}}
    log(f"base (pretrained on COPY, {time.perf_counter() - start:.1f} s): {_fmt(results['base'])}")
    skills, ordinary = calibration(args.calibration, seed=args.seed + 99)
    for method in args.methods:
        folders, alone = [], {}
        for slot, task in enumerate((REV, SUCC)):
            torch.manual_seed(args.seed + 1 + slot)  # the plain LoRA's random lora_A
            model = get_peft_model(copy.deepcopy(base), skill_config(method, slot, args.rank))
            stats = InputStatistics(model)  # what the per-layer closed form merges with
            loss = train(
                model,
                task,
                args.steps,
                args.lr,
                seed=args.seed + 10 + slot,
                erasure_weight=args.erasure_weight,
                stats=stats,
            )
            alone[NAMES[task]] = accuracy(model, task)
            folder = os.path.join(out_dir, f"{method}-{NAMES[task].lower()}")
            model.save_pretrained(folder)
            stats.save_pretrained(folder)  # adapter_statistics.safetensors beside the adapter
            folders.append(folder)
            log(f"{method} {NAMES[task]}: final loss {loss:.4f}, accuracy alone {alone[NAMES[task]]:.3f}")
        inputs = {folder: skills[task] for folder, task in zip(folders, (REV, SUCC))}
        results[method] = {"alone": alone, "merged": {}, "exact": {}}
        for row, options in MERGES.items():
            tic = time.perf_counter()
            if options["method"] == "sequential":
                refine = args.refine_steps if row.endswith("refinement") else 0
                options = {
                    **options,
                    "calibrate": base,
                    "inputs": inputs,
                    "prior_inputs": ordinary,
                    "refine_steps": refine,
                }
            merged = compose(folders, progress=False, **options)
            fused = merged.fuse(copy.deepcopy(base))
            results[method]["merged"][row] = {NAMES[t]: accuracy(fused, t) for t in (REV, SUCC, COPY)}
            results[method]["exact"][row] = merged.exact
            log(f"{method} {row} ({time.perf_counter() - tic:.1f} s): {_fmt(results[method]['merged'][row])}")
        results["folders"][method] = folders
    log(f"\nper-token accuracy, greedy; chance = {1 / K:.2f}; erasure weight {args.erasure_weight}, seed {args.seed}")
    log("| adapters | REV alone | SUCC alone | merge | REV merged | SUCC merged | COPY merged |")
    log("|---|---|---|---|---|---|---|")
    for method in args.methods:
        a = results[method]["alone"]
        for row, m in results[method]["merged"].items():
            log(
                f"| {method} | {a['REV']:.3f} | {a['SUCC']:.3f} | {row} | {m['REV']:.3f} | {m['SUCC']:.3f} "
                f"| {m['COPY']:.3f} |"
            )
    log(f"done in {time.perf_counter() - start:.1f} s")
    return results


def _fmt(accs: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in accs.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train two LM skills as independent adapters, merge them four ways, compare.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=200, help="Training steps per skill adapter (batch 64).")
    p.add_argument("--base_steps", type=int, default=300, help="Pretraining steps of the base on COPY.")
    p.add_argument("--rank", type=int, default=8, help="Adapter rank r (lora_alpha = r).")
    p.add_argument("--lr", type=float, default=1e-2, help="Adapter learning rate.")
    p.add_argument("--width", type=int, default=64, help="Hidden size of the GPT-2.")
    p.add_argument(
        "--erasure_weight", type=float, default=1.0, help="Output erasure on foreign task tokens (0: none)."
    )
    p.add_argument("--methods", nargs="+", default=["lora", "ortho"], choices=["lora", "ortho"])
    p.add_argument("--calibration", type=int, default=256, help="Calibration sequences per skill for the merge.")
    p.add_argument("--refine_steps", type=int, default=300, help="End-to-end refinement steps of the last row.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Folder for the adapters (default: a temporary folder).")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if min(args.steps, args.base_steps, args.rank, args.calibration) < 1 or args.refine_steps < 0 or args.width % 4:
        raise ValueError(
            "--steps, --base_steps, --rank and --calibration must be positive, --refine_steps ≥ 0 and --width a "
            "multiple of 4"
        )
    import torch

    import peft_ortho  # noqa: F401  (registers ORTHO_LORA with peft)

    torch.set_num_threads(1)  # matrices of a few dozen rows: threads cost more than they bring

    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        if os.listdir(args.out):
            raise FileExistsError(f"{args.out} is not empty; choose an empty or new folder")
        return run(args, args.out)
    with tempfile.TemporaryDirectory(prefix="llm_skills_") as tmp:
        return run(args, tmp)


if __name__ == "__main__":
    main()
