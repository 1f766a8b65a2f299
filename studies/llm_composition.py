"""Why two independently trained LLM skills do not survive a merge, and which training recipes help.

The study behind docs/llm.md. It uses the sequence format of ``examples/llm_skills.py`` (``studies.llm_tasks``: a 2-layer GPT-2
built from a config, pretrained on ``COPY``; sequences ``[task, x_1..x_5, SEP, y_1..y_5]`` over 10 digits) with two token-map skills,
``NEG`` (``y = 9 − x``, basis slot 0) and ``SUCC`` (``y = x + 1 mod 10``, slot 1), each an ``OrthoLoraConfig``
adapter (rank 8 on ``c_attn, c_proj, c_fc``) trained alone from the base. The merged model is the base plus both
adapters' deltas (peft ``merge_and_unload`` per adapter, deltas summed: exact by linearity). Printed per recipe and
seed: each skill's greedy per-token accuracy alone and merged, and ``COPY`` after the merge.

Recipes (each adds to the one before):

- ``kl``: output erasure as in the example — each step also a batch with a foreign task token (``COPY`` or a token no
  one trains), on which ``KL(base ‖ adapted)`` of the next-token distributions is minimised (weight 1).
- ``trigger``: the skill's task token gets a trainable embedding row (peft ``trainable_token_indices``, untied
  output head) and the erasure also matches every layer's hidden states (MSE, weight 1).
- ``silent``: module-level erasure — on the foreign batch every adapted module's own output ``s·B A x`` is pushed
  to zero (``Σ ‖s·BAx‖² / ‖x‖²``, weight 10) — plus *slot confinement* on the skill's own batch: the change the
  adapter makes to every adapted module's input, ``δ = x_adapted − x_base``, is pushed into the adapter's own basis
  slot (``(‖δ‖² − ‖A δ‖²) / ‖x‖²``, weight 1), so the other slots' adapters cannot read it.

``--ablate`` additionally merges with one module of one adapter left out, which locates the crosstalk.

    python -m studies.llm_composition --recipes kl trigger silent --seeds 0 1 2   # about 6 min per seed, 1 CPU
    python -m studies.llm_composition --recipes silent --seeds 0 --ablate
    python -m studies.llm_composition --quick                                      # smoke run, seconds
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from peft_ortho import OrthoLoraConfig
from peft_ortho.erasure import adapters_disabled

from . import llm_tasks as T

K, L = T.K, T.L
COPY, NEG, SUCC = K, K + 1, K + 2
UNTRAINED = (K + 3, K + 4, K + 5)  # task tokens no one trains: with COPY, the erasure pool
SEP = K + 6
VOCAB = SEP + 1
SKILLS = {NEG: "NEG", SUCC: "SUCC", COPY: "COPY"}
RECIPES = {
    "kl": {"kl": 1.0},
    "trigger": {"kl": 1.0, "trigger": True, "hidden": 1.0},
    "silent": {"kl": 1.0, "trigger": True, "hidden": 1.0, "module": 10.0, "confine": 1.0},
}


def answers(tasks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` under each task token: ``NEG`` gives ``K − 1 − x``, ``SUCC`` ``x + 1 mod K``, every other token copies."""
    return torch.where(tasks == NEG, K - 1 - x, torch.where(tasks == SUCC, (x + 1) % K, x))


def make_batch(task, n: int, generator) -> torch.Tensor:
    """``(n, 2L + 2)`` sequences ``[task, x, SEP, y]``; ``task`` is a token or an ``(n, 1)`` tensor of tokens."""
    return T.sequences(task, n, generator, answers, SEP)


def accuracy(model, task: int, n: int = 500) -> float:
    """Greedy per-token accuracy on ``n`` fresh sequences of ``task``."""
    return T.accuracy(model, task, make_batch, n)


def build_base(width: int, steps: int, seed: int):
    """The base: a 2-layer GPT-2 from a config, all weights pretrained on ``COPY``."""
    model = T.base_model(seed, width, VOCAB, SEP)
    return T.pretrain(model, lambda g: make_batch(COPY, 64, g), steps, 3e-3, seed, weight_decay=0.0)


def skill_adapter(base, slot: int, rank: int, targets: list[str], trigger: int | None = None):
    """A copy of ``base`` with an ``OrthoLoraConfig`` adapter on ``slot``; ``trigger`` also gets a trainable row."""
    extra = {"trainable_token_indices": [trigger]} if trigger is not None else {}
    config = OrthoLoraConfig(
        slot=slot, basis_seed=0, r=rank, lora_alpha=rank, target_modules=targets, fan_in_fan_out=True, **extra
    )
    return get_peft_model(copy.deepcopy(base), config)


def module_inputs(layers):
    """Forward pre-hooks recording each adapted module's input; returns ``(store, handles)``."""
    store = {}
    handles = [m.register_forward_pre_hook(lambda m, args: store.__setitem__(m, args[0])) for m in layers]
    return store, handles


def train_skill(
    model,
    task: int,
    recipe: dict,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
    batches=None,
    foreign: tuple[int, ...] | None = None,
) -> float:
    """AdamW on the skill's loss plus the recipe's regularisers (see the module docstring); returns the last loss.

    ``batches(task, n, generator)`` makes the sequences (default: this study's ``make_batch``); ``foreign`` holds the
    erasure pool's task tokens (default: ``COPY`` and the tokens no one trains).
    """
    batches = batches or make_batch
    foreign = torch.tensor(foreign or (COPY, *UNTRAINED))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    store, handles = module_inputs(layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = batches(task, batch_size, g)
        if recipe.get("confine"):
            with adapters_disabled(model), torch.no_grad():
                model(input_ids=batch[:, :-1])
            base_inputs = dict(store)
        loss = T.answer_loss(model, batch)
        if recipe.get("confine"):
            loss = loss + recipe["confine"] * sum(
                outside_slot(m, store[m] - base_inputs[m], base_inputs[m]) for m in layers
            )
        tokens = foreign[torch.randint(0, len(foreign), (batch_size, 1), generator=g)]
        inputs = batches(tokens, batch_size, g)[:, :-1]
        with adapters_disabled(model), torch.no_grad():
            teacher = model(input_ids=inputs, output_hidden_states=True)
            base_inputs = dict(store)
        student = model(input_ids=inputs, output_hidden_states=True)
        kl = F.kl_div(
            student.logits.log_softmax(-1).flatten(0, 1),
            teacher.logits.log_softmax(-1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        loss = loss + recipe["kl"] * kl
        if recipe.get("hidden"):
            loss = loss + recipe["hidden"] * sum(
                F.mse_loss(s, t) for s, t in zip(student.hidden_states[1:], teacher.hidden_states[1:])
            )
        if recipe.get("module"):
            loss = loss + recipe["module"] * sum(module_output(m, base_inputs[m]) for m in layers)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    model.eval()
    return float(loss.detach())


def outside_slot(module, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Energy of ``delta`` outside the rows of the module's frozen ``lora_A`` (its basis slot), relative to ``x``."""
    inside = delta @ module.lora_A["default"].weight.T
    return (delta.pow(2).sum(-1) - inside.pow(2).sum(-1)).mean() / x.pow(2).sum(-1).mean()


def module_output(module, x: torch.Tensor) -> torch.Tensor:
    """``‖s·B A x‖² / ‖x‖²``: the adapter branch's own output on a foreign input, relative to the input."""
    out = module.lora_B["default"](module.lora_A["default"](x)) * module.scaling["default"]
    return out.pow(2).sum(-1).mean() / x.pow(2).sum(-1).mean()


def kl_to_base(model, task: int, n: int = 256) -> float:
    """Mean ``KL(base ‖ adapted)`` of the answer positions' next-token distributions on ``task``'s prompts."""
    inputs = make_batch(task, n, torch.Generator().manual_seed(5))[:, :-1]
    with torch.no_grad():
        with adapters_disabled(model):
            teacher = model(input_ids=inputs).logits[:, L + 1 :].log_softmax(-1)
        student = model(input_ids=inputs).logits[:, L + 1 :].log_softmax(-1)
    return float(F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean"))


def deltas(base, model) -> dict:
    """``{state-dict key: merged − base}`` for the keys the adapter changes (LoRA layers and trigger rows)."""
    before = base.state_dict()
    after = copy.deepcopy(model).merge_and_unload().state_dict()
    return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


def merged_model(base, parts: list[dict], keep=lambda i, key: True):
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for i, part in enumerate(parts):
        for key, d in part.items():
            if keep(i, key):
                state[key] += d
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return model


def run(recipe_name: str, seed: int, args) -> dict:
    recipe = RECIPES[recipe_name]
    base = build_base(args.width, args.base_steps, seed)
    parts, row = [], {"recipe": recipe_name, "seed": seed}
    for slot, task in enumerate((NEG, SUCC)):
        model = skill_adapter(base, slot, args.rank, args.targets, task if recipe.get("trigger") else None)
        train_skill(model, task, recipe, args.steps, args.lr, seed=seed * 100 + 10 + slot)
        row[f"{SKILLS[task]} alone"] = accuracy(model, task)
        row[f"{SKILLS[task]} adapter's KL on the other skill"] = kl_to_base(model, SUCC if task == NEG else NEG)
        parts.append(deltas(base, model))
    merged = merged_model(base, parts)
    for task in (NEG, SUCC, COPY):
        row[f"{SKILLS[task]} merged"] = accuracy(merged, task)
    if args.ablate:
        modules = sorted({key.rsplit(".", 1)[0] for part in parts for key in part})
        row["ablation"] = {
            module: [
                accuracy(
                    merged_model(
                        base, parts, lambda i, k, drop=drop, module=module: not (i == drop and k.startswith(module))
                    ),
                    t,
                )
                for drop, t in ((0, SUCC), (1, NEG))
            ]
            for module in modules
        }
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--base_steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=T.TARGETS, help="GPT-2 modules the adapters wrap")
    parser.add_argument("--ablate", action="store_true", help="also merge with one module of one adapter left out")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny step counts, one seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.base_steps, args.seeds = 5, 5, args.seeds[:1]
    torch.set_num_threads(1)
    print("| recipe | seed | NEG alone | SUCC alone | NEG merged | SUCC merged | COPY merged |")
    print("|---|---|---|---|---|---|---|")
    for name in args.recipes:
        for seed in args.seeds:
            start = time.perf_counter()
            row = run(name, seed, args)
            cells = [row[k] for k in ("NEG alone", "SUCC alone", "NEG merged", "SUCC merged", "COPY merged")]
            print(
                f"| {name} | {seed} | "
                + " | ".join(f"{c:.3f}" for c in cells)
                + f" |  ({time.perf_counter() - start:.0f} s)"
            )
            kls = [row[f"{k} adapter's KL on the other skill"] for k in ("NEG", "SUCC")]
            print(f"    KL(base || adapter alone) on the other skill's prompts: NEG {kls[0]:.2e}, SUCC {kls[1]:.2e}")
            for module, (succ, neg) in row.get("ablation", {}).items():
                print(
                    f"    without NEG's {module}: SUCC merged {succ:.3f}; without SUCC's {module}: NEG merged {neg:.3f}"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
