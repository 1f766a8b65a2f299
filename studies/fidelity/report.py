"""Figures and the markdown section of ``docs/benchmarks.md`` for the fidelity benchmark."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base_model import DIGIT_WORDS
from .methods import ALL_METHODS, Method

TARGET_METHODS = ("ortho-disjoint", "block", "ortho-disjoint-erasure", "block-erasure")
PLAIN_LORA = ("lora-sum", "lora-avg", "peft-ties", "peft-svd")
# Merges that keep or combine the weights only (no statistics, no calibration inputs): what the statistics merge
# must beat on both retention and drift.
WEIGHT_SPACE = (*PLAIN_LORA, "ortho-random", *TARGET_METHODS, "soda", "lora-distill-avg", "ortho-disjoint-distill")
# Merges that use each adapter's inputs (recorded statistics or calibration batches), in the methods' order.
STATISTICS = tuple(m.name for m in ALL_METHODS if m.uses_statistics or m.merge == "sequential")


def describe_sequential(method: Method) -> str:
    """What a sequential-merge row does, from its options: μ, the refinement, the calibration batches."""
    o = dict(method.options)
    what = f"μ = {o.get('prior_weight', 1.0):g}"
    if o.get("refine_steps"):
        what += f", then {o['refine_steps']} end-to-end refinement steps"
        what += f" at lr {o['refine_lr']:g} (default 1e-3)" if "refine_lr" in o else ""
        what += ", each concept's term divided by its own effect (`refine_balance`)" if o.get("refine_balance") else ""
    if method.family.endswith("-distill"):
        what += ", on the distilled-prior LoRAs"
    k = o.get("trajectory_samples", 0)
    own = f"the adapter's own guided sampling of its prompt ({k} images, both guidance halves of every step)"
    if o.get("prompts_only"):
        batches = f"only {own}, and the base's own sampling of the ten class prompts as ordinary inputs"
    else:
        batches = (
            "each concept's training images noised at 4 timesteps under its prompt and the empty prompt"
            + (f", {own}" if k else "")
            + ", and 20 class images under their class prompts"
        )
    return f"{what}; calibration batches: {batches}"


def _to_grid(rows: list[list[torch.Tensor | None]], pad: int = 1) -> np.ndarray:
    """Images ``(1, S, S)`` in ``[-1, 1]`` (or None = blank) arranged in rows, as one ``[0, 1]`` array."""
    s = next(x for r in rows for x in r if x is not None).shape[-1]
    h, w = len(rows), max(len(r) for r in rows)
    out = np.ones((h * (s + pad) + pad, w * (s + pad) + pad))
    for i, r in enumerate(rows):
        for j, x in enumerate(r):
            if x is not None:
                y0, x0 = pad + i * (s + pad), pad + j * (s + pad)
                out[y0 : y0 + s, x0 : x0 + s] = (x.reshape(s, s).numpy() + 1) / 2
    return out


def save_base_grid(images: torch.Tensor, path: str) -> None:
    """Base-model samples ``(10, k, 1, S, S)``: one row per class prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = _to_grid([list(row) for row in images])
    fig, ax = plt.subplots(figsize=(0.5 * images.shape[1] + 1.6, 0.5 * images.shape[0] + 0.4), dpi=120)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    s = images.shape[-1] + 1
    ax.set_yticks([1 + s * i + s / 2 - 1 for i in range(10)], [f'"... digit {w}"' for w in DIGIT_WORDS], fontsize=7)
    ax.set_xticks([])
    ax.set_title("Base model samples, prompt 'a photo of digit <class>'", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_concept_grid(concepts, grid_samples: dict, methods: list[str], n_max: int, path: str) -> None:
    """Columns: concepts. Rows: a training image, then one sample per method at N = ``n_max`` (same noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[c.images[0] for c in concepts]]
    labels = ["training image"]
    for m in methods:
        got = grid_samples.get((m, n_max))
        if got:
            rows.append([got.get(c.index) for c in concepts])
            labels.append(f"{m}, N={n_max}")
    grid = _to_grid(rows)
    s = concepts[0].images.shape[-1] + 1
    fig, ax = plt.subplots(figsize=(0.45 * len(concepts) + 2.2, 0.45 * len(rows) + 0.8), dpi=120)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([1 + s * i + s / 2 - 1 for i in range(len(rows))], labels, fontsize=7)
    ax.set_xticks([1 + s * j + s / 2 - 1 for j in range(len(concepts))], [c.token for c in concepts], fontsize=6)
    ax.set_title("Each concept's prompt, sampled from the merge of all concepts", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_plot(summary: dict, labels: dict[str, str], path: str) -> None:
    """Retained improvement, identity accuracy and prior drift vs N, one line per method (statistics merges solid
    and thick, weight-space merges thin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=90)
    for name, per_n in summary.items():
        ns = sorted(per_n)
        style = dict(lw=2.2, ls="-") if name in STATISTICS else dict(lw=1.0, ls="--" if name in PLAIN_LORA else ":")
        for ax, key, scale in zip(axes, ("retained", "identity", "prior_drift"), (1, 1, 100)):
            ax.plot(ns, [per_n[n][key] * scale for n in ns], marker="o", ms=3, label=labels.get(name, name), **style)
    axes[0].axhline(0.9, color="gray", lw=0.8, ls=":")
    axes[0].set_ylim(-3, 1.1)
    axes[0].set_ylabel("retained improvement (1 = single adapter; clipped at -3)")
    axes[1].set_ylabel("identity accuracy of sampled images")
    axes[2].set_ylabel("prior drift, % (symlog)")
    axes[2].set_yscale("symlog", linthresh=10)
    for ax in axes:
        ax.set_xlabel("N concepts merged")
        ax.set_xticks(sorted({n for per_n in summary.values() for n in per_n}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_method_grid(concepts, per_n: dict, label: str, path: str) -> None:
    """One method's samples: a training image per concept, then one row per N (same noise for every method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(per_n)
    rows = [[c.images[0] for c in concepts]] + [[per_n[n].get(c.index) for c in concepts] for n in ns]
    grid = _to_grid(rows)
    s = concepts[0].images.shape[-1] + 1
    fig, ax = plt.subplots(figsize=(0.3 * len(concepts) + 1.2, 0.3 * len(rows) + 0.5), dpi=80)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([1 + s * i + s / 2 - 1 for i in range(len(rows))], ["train"] + [f"N={n}" for n in ns], fontsize=6)
    ax.set_xticks([1 + s * j + s / 2 - 1 for j in range(len(concepts))], [c.token[3:] for c in concepts], fontsize=5)
    ax.set_title(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(x: float, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def metric_table(
    summary: dict, labels: dict[str, str], key: str, spec: str, scale: float = 1.0, single: dict | None = None
) -> str:
    """One row per method, one column per N; with ``single`` (method → value) a first column with the single
    adapters' own value (each adapter alone, exact), the baseline every merged number is read against."""
    ns = sorted({n for per_n in summary.values() for n in per_n})
    head = "| method | " + ("single | " if single else "") + " | ".join(f"N={n}" for n in ns) + " |"
    lines = [head, "|---|" + "---:|" * (len(ns) + bool(single))]
    for name, per_n in summary.items():
        cells = [_fmt(per_n[n][key] * scale, spec) if n in per_n else "–" for n in ns]
        if single:
            cells.insert(0, _fmt(single.get(name, math.nan) * scale, spec))
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def single_baselines(results: dict, key: str) -> dict[str, float]:
    """Per method, the mean of ``key`` over its family's single adapters (each alone, exact merge)."""
    single = results.get("single") or {}
    out = {}
    for m in results["methods"]:
        per = single.get(m["family"]) or single.get(str(m["family"]))
        if per:
            out[m["name"]] = float(np.mean([v[key] for v in per.values()]))
    return out


def _get(summary: dict, m: str, n: int, key: str) -> float:
    return summary.get(m, {}).get(n, {}).get(key, math.nan)


def target_lines(results: dict, n_max: int) -> list[str]:
    """The targets, each stated as met or missed with the numbers."""
    summary = results["summary"]
    drift1 = single_baselines(results, "prior_drift")
    ident1 = single_baselines(results, "identity")
    weight_space = [m for m in WEIGHT_SPACE if n_max in summary.get(m, {})]
    best_r = max(weight_space, key=lambda m: summary[m][n_max]["retained"], default=None)
    best_d = min(weight_space, key=lambda m: summary[m][n_max]["prior_drift"], default=None)
    out = []
    for m in STATISTICS:
        if n_max not in summary.get(m, {}):
            out.append(f"- `{m}`: not measured in this run (see the note below).")
            continue
        s, d1, i1 = summary[m][n_max], drift1.get(m, math.nan), ident1.get(m, math.nan)
        ok_r, ok_stretch = s["retained"] >= 0.9, s["retained"] >= 0.95
        ok_d = s["prior_drift"] <= 1.5 * max(d1, 0.0)
        ahead_r = best_r is None or s["retained"] > summary[best_r][n_max]["retained"]
        ahead_d = best_d is None or s["prior_drift"] < summary[best_d][n_max]["prior_drift"]
        ok_i = s["identity"] >= 0.9 * i1
        verdict = "met" if ok_r and ok_d and ahead_r and ahead_d and ok_i else "missed"
        out.append(
            f"- `{m}` at N = {n_max}: R {s['retained']:.3f} (≥ 0.9: {'met' if ok_r else 'missed'}; stretch 0.95: "
            f"{'met' if ok_stretch else 'missed'}); prior drift {100 * s['prior_drift']:+.1f} % vs 1.5 × the single "
            f"adapters' {100 * d1:+.1f} % ({'met' if ok_d else 'missed'}); ahead of every weight-space merge on R "
            f"({'yes' if ahead_r else 'no'}, best {best_r} {summary[best_r][n_max]['retained']:.3f}) and on drift "
            f"({'yes' if ahead_d else 'no'}, lowest {best_d} {100 * summary[best_d][n_max]['prior_drift']:+.1f} %); "
            f"identity {s['identity']:.2f} vs the single adapters' {i1:.2f} (within 10 %: "
            f"{'met' if ok_i else 'missed'}). Overall: **{verdict}**."
        )
    pred = results.get("prediction") or {}
    if pred:
        rho = pred.get("statistics", {}).get("spearman", math.nan)
        per = ", ".join(f"`{k}` {v['spearman']:.2f}" for k, v in pred.items() if k not in ("all", "statistics"))
        out.append(
            f"- The report's predicted retention vs the measured R (Spearman over concepts × N > 1, the statistics "
            f"merges together): {rho:.2f} over {pred.get('statistics', {}).get('pairs', 0)} pairs (≥ 0.8: "
            f"{'met' if rho >= 0.8 else 'missed'}); every predicting merge together "
            f"{pred.get('all', {}).get('spearman', math.nan):.2f}; per method: {per}."
        )
    else:
        out.append(
            "- Predicted vs measured retention: **not measured** (the merge report of this checkout gives no "
            "per-concept predicted retention)."
        )
    pp = [
        (f, float(np.mean([v["prior_drift"] for v in per.values()]))) for f, per in results.get("single", {}).items()
    ]
    if pp:
        met = [f"`{f}`" for f, d in pp if d <= 0.10]
        missed = [f"`{f}`" for f, d in pp if not d <= 0.10]
        out.append(
            "- Single adapter trained with prior preservation, prior drift ≤ 10 % (mean over the concepts): "
            + ", ".join(f"`{f}` {100 * d:+.1f} %" for f, d in pp)
            + f"; met by {', '.join(met) or 'none'}"
            + (f", missed by {', '.join(missed)}" if missed else "")
            + " (`-distill`: the class term's target is the frozen base's prediction; the others: the noise, as in "
            "diffusers)."
        )
    return out


def tuning_table(tuned: dict) -> str:
    """The statistics-merge settings measured on the tuning concepts, the chosen one in bold."""
    chosen = dict(tuple(kv) for kv in tuned["chosen"])
    keys = list(tuned["trials"][0]["options"])
    lines = [
        "| " + " | ".join(keys) + " | R | worst | identity | prior drift |",
        "|" + "---|" * len(keys) + "---:|---:|---:|---:|",
    ]
    for t in tuned["trials"]:
        bold = "**" if t["options"] == chosen else ""
        cells = [f"{bold}{t['options'][k]}{bold}" for k in keys]
        cells += [f"{t['retained']:.3f}", f"{t['retained_min']:.3f}", _fmt(t["identity"], ".2f")]
        cells.append(f"{100 * t['prior_drift']:+.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TARGET_WORDS = {"noise": "noise", "base": "base's prediction"}


def _trained_recipe_note(results: dict, best: dict) -> str:
    """Which families below are trained with the recipe the rule chose (``recipe["families"]``, found by the run;
    a rerun whose probe picks another recipe than the configured one says so instead of claiming it)."""
    cfg = results["config"]
    shared = (float(cfg["prior_loss_weight"]), int(cfg["class_ratio"]), int(cfg["steps"]))
    ran = results.get("lrs", {})
    users = [f for f in results["recipe"].get("families", []) if f in ran]
    if not users:
        return (
            f"**the adapters below are not**: they are trained with prior_loss_weight {shared[0]:g}, {shared[1]}× "
            f"class images per step, {shared[2]} steps (the configured recipe; see the note at the end of this "
            "section)."
        )
    if len(users) == len(ran):
        return "every adapter below is trained with it."
    noise = best.get("target", "noise") == "noise"
    return (
        f"the {', '.join(f'`{f}`' for f in users)} adapters below are trained with it; every other family with "
        f"prior_loss_weight {shared[0]:g}, {shared[1]}× class images per step, {shared[2]} steps at its own lr, and "
        + ("the base's prediction as target." if noise else "the noise target (diffusers' recipe).")
    )


def recipe_section(results: dict) -> list[str]:
    """The DreamBooth recipe probe on the recipe concepts (the rule and the chosen row in bold), the single-adapter
    drift with and without prior preservation, as markdown lines."""
    rec = results.get("recipe")
    out: list[str] = []
    if rec:
        best = rec["chosen"]
        concepts = rec.get("concepts", [15])
        lines = [
            "| prior_loss_weight | class images per step | steps | lr | target | loss on own images (base) "
            "| identity | prior drift | per concept | train s |",
            "|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
        ]
        for t in rec["trials"]:
            b = "**" if t == best else ""
            per_step = t["class_ratio"] * results["config"]["images_per_concept"] * results["config"]["repeats"]
            per = " / ".join(f"{100 * p['prior_drift']:+.1f}" for p in t.get("per_concept", []))
            lines.append(
                f"| {b}{t['prior_loss_weight']:g}{b} | {b}{per_step}{b} | {b}{t['steps']}{b} | {b}{t['lr']:g}{b} "
                f"| {b}{TARGET_WORDS[t.get('target', 'noise')]}{b} | {t['loss']:.4f} ({t['base_loss']:.4f}) "
                f"| {t['identity']:.2f} | {100 * t['prior_drift']:+.1f} % | {per} | {t['train_seconds']:.0f} |"
            )
        mean = "mean " if len(concepts) > 1 else ""
        verdict = (
            f"the lowest {mean}loss on the concepts' own images among the settings whose {mean}prior drift is ≤ "
            f"{100 * rec['drift_max']:.0f} %"
            if rec["within"]
            else f"**no setting drifted ≤ {100 * rec['drift_max']:.0f} %**, so the rule falls back to the lowest drift"
        )
        names = ", ".join(f"`sks{c}`" for c in concepts)
        out += [
            "",
            f"**DreamBooth recipe** (chosen on the tuning concept{'s' if len(concepts) > 1 else ''} {names}, never "
            "merged; one LoRA per setting and concept, measured alone; the columns are means over the concepts, "
            "*per concept* gives each one's drift): the settings a DreamBooth user turns when the class drifts, the "
            "prior loss weight, the class images per step (as many as the 6 instance images, diffusers' default, "
            "or twice as many), steps/lr, and what the class samples' predictions regress onto: the added noise "
            "(diffusers' prior loss) or the frozen base's own prediction on the same noised class image "
            "(`examples/train_dreambooth.py --prior_loss_target base`). Rule: "
            + verdict
            + f". Chosen: prior_loss_weight {best['prior_loss_weight']:g}, {best['class_ratio']}× class images per "
            f"step, {best['steps']} steps at lr {best['lr']:g}, target: {TARGET_WORDS[best.get('target', 'noise')]}; "
            + _trained_recipe_note(results, best),
            "",
            *lines,
        ]
    nop = results.get("no_prior")
    if nop:
        lines = [
            "| concept | prior drift with prior preservation | without | identity with | without |",
            "|---|---:|---:|---:|---:|",
        ]
        tokens = {c["index"]: c["token"] for c in results["concepts"]}
        for r in nop:
            lines.append(
                f"| `{tokens.get(r['concept'], r['concept'])}` | {100 * r['with']:+.1f} % | {100 * r['without']:+.1f} % "
                f"| {r['identity_with']:.2f} | {r['identity_without']:.2f} |"
            )
        mean_w = float(np.mean([r["with"] for r in nop]))
        mean_wo = float(np.mean([r["without"] for r in nop]))
        out += [
            "",
            f"Single LoRA (`lora`, the noise target) with and without prior preservation (same steps, lr and instance "
            f"batch; without it the batch holds the instance half only): mean {100 * mean_w:+.1f} % vs "
            f"{100 * mean_wo:+.1f} %.",
            "",
            *lines,
        ]
    return out


def stage_lines(results: dict) -> list[str]:
    """Per-stage runtimes (seconds when the stage was computed: cached stages keep their first time)."""
    stages = {k: v for k, v in (results.get("stages") or {}).items() if v == v}
    if not stages:
        return []
    return [
        "",
        "Per-stage runtimes (CPU seconds when each stage was computed, on the shared 2-core machine at 1 torch "
        f"thread; cached stages keep the time of their first computation; base model {results['base_info']['train_seconds']:.0f} s): "
        + "; ".join(f"{k} {v:.0f} s" for k, v in stages.items())
        + ".",
    ]


def markdown(results: dict, labels: dict[str, str], command: str) -> str:
    """The fidelity section of ``docs/benchmarks.md``: setup, validation of the instruments, tables, targets."""
    cfg, base_cfg = results["config"], results["config"]["base"]
    summary = results["summary"]
    n_max = max(n for n in cfg["ns"] if n <= cfg["concepts"])
    val = results["classifier_validation"]
    worst_label = min(val["per_label"], key=val["per_label"].get)
    concepts = ", ".join(f"`{c['token']}` {c['transform']} {c['digit']}" for c in results["concepts"])
    lrs = ", ".join(f"{f} {lr:g}" for f, lr in results["lrs"].items())
    sweep = results.get("lr_sweep") or {}
    swept = {f: v for f, v in sweep.items() if v}
    sweep_text = (
        "Learning rates: "
        + "; ".join(
            f"`{f}` swept on the tuning concept (`sks15`, underlined 5, never merged) over "
            + ", ".join(f"{float(lr):g} → loss {v:.4f}" for lr, v in vals.items())
            for f, vals in swept.items()
        )
        + (". " if swept else "")
        + (
            "the winners of the earlier sweeps on the tuning concept (`sks15`, underlined 5, never merged; LoRA "
            "over 3e-3/1e-2/3e-2 → 1e-2, orthogonal + erasure → 3e-2, each minimising the loss on the tuning "
            "concept's own images, nothing about merging looked at); with prior preservation the recipe probe below "
            "re-tried LoRA at 3e-3 and 5e-3 (240 steps) against 1e-2 on the same concept; families not swept take "
            "the winner of the family with the same trained factors (orthogonal: B only; BlockLoRA: A and B like "
            "LoRA); SODA took the better of two lrs in a one-concept probe."
            if not swept
            else "A family's lr minimises the loss on the tuning concept's own images after the common budget."
        )
    )
    skipped = results.get("skipped_methods") or []
    drift1 = single_baselines(results, "prior_drift")
    ident1 = single_baselines(results, "identity")
    parts = [
        "## Merge fidelity: N personal concepts on a tiny text-to-image model",
        "",
        f"`{command}` ({results['wall_seconds'] / 60:.1f} min wall for this invocation on "
        f"{results.get('machine', 'CPU')}, a machine shared with other jobs; the base model and the trained "
        "adapters are cached under `studies/.cache/fidelity/`, so a rerun only evaluates). "
        "`python -m studies.fidelity.run --quick` is the smoke run (5 concepts, N = 1, 2, 5, its own smaller "
        "base model and budget, no lr sweep) and writes no docs.",
        "",
        "**Base model** (`studies/fidelity/base_model.py`): a diffusers `UNet2DConditionModel` "
        f"(block_out_channels {tuple(base_cfg['block_out_channels'])}, cross-attention in every block, "
        f"cross_attention_dim {base_cfg['cross_attention_dim']}) and a {base_cfg['text_layers']}-layer transformers "
        "`CLIPTextModel`, both built from configs and trained jointly from scratch here on scikit-learn's digits "
        f"({base_cfg['train_steps']} steps, batch {base_cfg['batch_size']}, Adam, noise-prediction loss, cosine "
        f"DDPM schedule, 10 % empty prompts for classifier-free guidance; {results['base_info']['train_seconds'] / 60:.1f} "
        f"min of CPU). It works in pixel space on the digits' native {base_cfg['image_size']}×{base_cfg['image_size']} "
        "grid, 1 channel, no VAE (a VAE has nothing to compress at this size). Prompts are `a photo of digit "
        "<class>`; the tokenizer is a word-level one written in code, so each concept token is one embedding row "
        f"that base training never updates. Class-prompt samples (DDIM, {cfg['sample_steps']} steps, guidance "
        f"{cfg['guidance']:g}) are the right digit {100 * results['base_class_accuracy']:.0f} % of the time by the "
        "classifier below (![base samples](fidelity_base_samples.png)).",
        "",
        f"**Concepts** (`concepts.py`): {cfg['concepts']} identities the base has not seen, each a digit class rendered "
        f"with its own fixed transformation, {cfg['images_per_concept']} images (from digits the base never trained "
        "on) and its own rare token, prompt `a photo of sks<i> digit <class>`: " + concepts + ". Several concepts "
        "share a digit class and every prompt shares its words, so an adapter that is not silent outside its token "
        "shows up on the others.",
        "",
        "**Identity classifier** (`metrics.py`): logistic regression on pixels over the 10 plain digits and the "
        f"16 concept transformations, validated on held-out digits nobody trained on: accuracy {val['accuracy']:.3f} "
        f"on {val['n']} images (worst label {worst_label}: {val['per_label'][worst_label]:.2f}). The base model's "
        "samples for the concept prompts are classified as the concept "
        f"{100 * float(np.mean(results['base']['identity'])):.0f} % of the time (it has never seen them).",
        "",
        f"**Training** (same budget for every method, as a DreamBooth user trains): rank {cfg['rank']} "
        f"(`lora_alpha = r`), attention `to_q, to_k, to_v, to_out.0`, {cfg['steps']} Adam steps; each step holds "
        f"the concept's images {cfg['repeats']}× ({cfg['images_per_concept'] * cfg['repeats']} samples) under the "
        f"concept prompt **and {'as many' if cfg.get('class_ratio', 1) == 1 else str(cfg['class_ratio']) + '× as many'} "
        "class images under their class prompts** (DreamBooth prior preservation, "
        f"loss = L_instance + {cfg['prior_loss_weight']:g} · L_prior as in diffusers' `train_dreambooth`, whose "
        "L_prior regresses the class predictions onto the added noise; the `-distill` families regress them onto the "
        "frozen base's own prediction on the same noised class image instead, `train_dreambooth.py "
        "--prior_loss_target base`; see the recipe probe below). The "
        f"class images are the base model's own samples of the class prompts ({cfg['class_images']} per digit, as "
        "diffusers' script generates them), not held-out digits: those measure the prior drift and stay unseen. "
        "Classes: "
        + (
            "the ten class prompts `a photo of digit <d>` (the concept's class noun is *digit*). The strict "
            "reading, the concept's own digit only, was measured first on two concepts (12 + 12 samples per step): the nine other class "
            "prompts then still drifted by up to +370 % (single LoRA of `sks0`: +153 % over all classes vs +17 % "
            "with all ten; `sks3`: +24 % vs +8 %), because in this 14-word vocabulary every prompt is one or two "
            "tokens from the concept's"
            if cfg.get("prior_classes", "all") == "all"
            else "the concept's own digit only"
        )
        + f". {sweep_text} Chosen: {lrs}. With r = {cfg['rank']} the 32-wide layers hold exactly 16 disjoint "
        "orthogonal slots and BlockLoRA uses 16 output blocks: 15 concepts fill the layers, the hard case. Erasure: "
        f"`OutputErasure(p={results.get('erasure_p', 0.5):g}, weight=1)` on the instance half with a foreign pool of "
        "the ten class prompts and the concept's class under tokens no benchmark concept uses. **Input statistics** "
        "are recorded during each adapter's own training with `peft_ortho.InputStatistics`: the instance half as "
        '`"concept"`, the class half and erased samples as `"prior"`, and the instance images under the empty '
        "prompt (what classifier-free guidance runs, one extra forward without autograd per step) as "
        '`"unconditional"`; saved as `adapter_statistics.safetensors` beside each adapter.',
        "",
        "**Measurements** per method and N: merges of subsets of N concepts that together cover all "
        f"{cfg['concepts']} (subset k = concepts kN … kN+N−1 mod {cfg['concepts']}), each concept evaluated in every "
        "subset it is in. (a) *retained improvement* R = (L_base − L_merged) / (L_base − L_single) on the concept's "
        f"own images and prompt, L = noise-prediction MSE over {cfg['eval_timesteps']} fixed timesteps × fixed noises "
        f"per image; (b) *identity accuracy*: {cfg['samples_per_concept']} DDIM samples of the concept prompt (same "
        "noises for every method) classified as the concept; (c) *prior drift*: relative change of the loss on the "
        f"ten class prompts over {cfg['prior_images_per_class']} held-out digits per class vs the base; (d) *merge "
        "time*: adapter folders on disk to fused UNet weights (median over the merges). The *single* column is each "
        "family's adapters alone (exact), the baseline of every merged number.",
    ]
    parts += recipe_section(results)
    tuned = results.get("stats_tuning")
    if tuned:
        chosen = dict(tuple(kv) for kv in tuned["chosen"])
        where = (
            f"the tuning set ({tuned['family']} adapters of `sks15`–`sks19`: underlined 5, and inverted 0, mirrored "
            "3, small 6, bold 2 on other images under their own tokens; never merged in the benchmark; all five "
            "merged, N = 5)"
            if tuned.get("tuning_set") == "tuning"
            else f"the benchmark's own {tuned['family']} adapters at N = {tuned.get('n', 5)} (the "
            f"{len(tuned['concepts']) // max(tuned.get('n', 5), 1)} merges of five that cover all concepts; no "
            "separate tuning set: its five extra trainings did not fit the shared machine's budget, so the settings "
            "are chosen on the same concepts they are then measured on, at N = 5 only)"
        )
        parts += [
            "",
            '**Statistics merge settings** (`compose(method="regmean", prior_weight=μ, ridge=λ, prior_target=…)`), '
            f"chosen on {where} by a rule that does not look at N: of the settings whose prior drift is at most "
            f"{cfg['drift_allowance']:g} × the single adapters' own ({100 * tuned['single_prior_drift']:+.1f} %), "
            'the highest R; if none, the lowest drift. `prior_target="own"` matches each adapter\'s '
            'behaviour over its whole training distribution (H_i = G_i + μ P_i); `"base"` asks for the base\'s '
            "behaviour on the pooled prior inputs (H_i = G_i, plus μ G_0). Chosen: "
            + ", ".join(f"{k} = {v}" for k, v in chosen.items())
            + ". Every statistics-merge row below uses it at every N.",
            "",
            tuning_table(tuned),
        ]
    parts += [
        "",
        "![retained improvement, identity and drift vs N](fidelity_retained.png)",
        "",
        "Retained improvement R (mean over concept evaluations):",
        "",
        metric_table(summary, labels, "retained", ".3f"),
        "",
        "Worst concept's retained improvement:",
        "",
        metric_table(summary, labels, "retained_min", ".3f"),
        "",
        "Identity accuracy of sampled images:",
        "",
        metric_table(summary, labels, "identity", ".2f", single=ident1),
        "",
        "Prior drift (% change of the class-prompt loss vs the base):",
        "",
        metric_table(summary, labels, "prior_drift", "+.1f", 100.0, single=drift1),
        "",
        "Merge time (ms, median):",
        "",
        metric_table(summary, labels, "merge_seconds", ".0f", 1000.0),
        "",
        f"![one sample per concept and method at N = {n_max}](fidelity_concepts.png)",
        "",
        "Samples per method and N (training image, then one row per N; same noise everywhere): "
        + ", ".join(f"[{m}](fidelity_samples/{m}.png)" for m in summary)
        + ".",
        "",
        "**Targets** (N = 15: the statistics merge retains R ≥ 0.9, stretch 0.95, with prior drift within 1.5× the "
        "single adapters' own, ahead of every weight-space merge on both, identity within 10 % of the single "
        "adapters'; predicted retention ranks like the measured, Spearman ≥ 0.8; a single adapter trained with "
        "prior preservation drifts ≤ 10 %):",
        "",
        *target_lines(results, n_max),
    ]
    if skipped:
        parts += ["", f"Not in this run (not in the checkout, or left out): {', '.join(skipped)}."]
    parts += stage_lines(results)
    if results.get("note"):
        parts += ["", results["note"]]
    parts += ["", interpretation(results)]
    return "\n".join(parts)


def interpretation(results: dict, width: int = 32) -> str:
    """What the numbers say, with the numbers: generated, so a rerun cannot leave stale claims behind."""
    summary, rank = results["summary"], results["config"]["rank"]
    drift1 = single_baselines(results, "prior_drift")
    ns = sorted({n for per_n in summary.values() for n in per_n})
    n_max = ns[-1]

    def get(m: str, n: int, key: str) -> float:
        return _get(summary, m, n, key)

    lines = ["**Reading the results.**", ""]
    if "lora-sum" in summary and "lora-avg" in summary:
        lines.append(
            f"- Plain LoRA, weight space. Summing keeps every delta at full strength but every adapter acts on every "
            f"prompt: at N = {n_max} the sum retains {get('lora-sum', n_max, 'retained'):.2f} with prior drift "
            f"{100 * get('lora-sum', n_max, 'prior_drift'):+.0f} %; averaging divides each concept by N and retains "
            f"{get('lora-avg', n_max, 'retained'):.2f}. peft's `ties` (on the A and B factors separately): "
            f"{get('peft-ties', n_max, 'retained'):.2f}; `svd` (the summed delta truncated to rank {rank}): "
            f"{get('peft-svd', n_max, 'retained'):.2f}."
        )
    if "lora-stats" in summary:
        lines.append(
            f"- The statistics merge on the *same* LoRAs retains {get('lora-stats', n_max, 'retained'):.2f} at "
            f"N = {n_max} (N = 2: {get('lora-stats', 2, 'retained'):.2f}, N = 5: "
            f"{get('lora-stats', 5, 'retained'):.2f}) with prior drift "
            f"{100 * get('lora-stats', n_max, 'prior_drift'):+.0f} % (single adapters "
            f"{100 * drift1.get('lora-stats', math.nan):+.0f} %) and identity "
            f"{get('lora-stats', n_max, 'identity'):.2f}: per layer it solves for the merged update that reproduces "
            "each adapter's output on that adapter's own recorded inputs instead of adding the deltas."
        )
    for m, base in (("ortho-disjoint-stats", "ortho-disjoint"), ("block-stats", "block")):
        if m in summary and base in summary:
            lines.append(
                f"- `{m}`: R {get(m, n_max, 'retained'):.2f} at N = {n_max} where the exact merge of the same "
                f"adapters gives {get(base, n_max, 'retained'):.2f}; drift {100 * get(m, n_max, 'prior_drift'):+.0f} "
                f"% vs {100 * get(base, n_max, 'prior_drift'):+.0f} %."
            )
    for m, base in (
        ("ortho-disjoint-erasure-stats", "ortho-disjoint-erasure"),
        ("block-erasure-stats", "block-erasure"),
    ):
        if m in summary and base in summary:
            lines.append(
                f"- Erasure-trained adapters under the statistics merge (`{m}`): R {get(m, n_max, 'retained'):.2f}, "
                f"drift {100 * get(m, n_max, 'prior_drift'):+.0f} %, identity {get(m, n_max, 'identity'):.2f} at "
                f"N = {n_max} (exact merge: R {get(base, n_max, 'retained'):.2f})."
            )
    if "lora-stats-calibrated" in summary and "lora-stats" in summary:
        lines.append(
            f"- Calibrated statistics (computed by `calibrate` from the concept prompt alone, as for a third-party "
            f"file) vs recorded: R {get('lora-stats-calibrated', n_max, 'retained'):.2f} vs "
            f"{get('lora-stats', n_max, 'retained'):.2f} at N = {n_max}, drift "
            f"{100 * get('lora-stats-calibrated', n_max, 'prior_drift'):+.0f} % vs "
            f"{100 * get('lora-stats', n_max, 'prior_drift'):+.0f} %."
        )
        cal = results.get("calibration")
        if cal:
            lines.append(
                f'- How close calibration comes to the recorded statistics (`compare_statistics`, the `"concept"` '
                f"inputs, mean over {cal['adapters']} adapters and their layers): relative error ‖A(G_cal − G_rec)‖ / "
                f"‖A G_rec‖ {cal['relative_error']:.2f}, overlap of the top-r input subspaces {cal['overlap']:.2f} "
                f"(1 = the same); {cal['seconds']:.1f} s per adapter. Calibration from the prompt alone has no "
                '`"prior"` inputs, so the prior term drops out of the merge and the drift is that of μ = 0.'
            )
    if "lora-stats" in summary and n_max in summary["lora-stats"]:
        lines.append(
            f"- Why the statistics merge misses R ≥ 0.9 at N = {n_max} here: the layers are 32 wide and each concept's "
            "inputs differ from the others' by one token of the prompt and a transformation of the same digits, so "
            f"{n_max} adapters' recorded input distributions overlap heavily and no single ΔW per layer can "
            "reproduce every adapter on its own inputs; the per-layer solution also ignores that the inputs of "
            "deeper layers change once earlier layers are merged. μ trades R against drift (table above: "
            "μ = 0 keeps the most but drifts like the sum)."
            + (
                " Levers not measured in this run: " + ", ".join(missing) + "."
                if (
                    missing := [
                        name
                        for name, keys in (
                            (
                                "erasure-trained adapters underneath",
                                ("ortho-disjoint-erasure-stats", "block-erasure-stats"),
                            ),
                            ("orthogonal slots underneath", ("ortho-disjoint-stats",)),
                            ("the sequential re-estimation of inputs", ("lora-sequential",)),
                        )
                        if not any(k in summary for k in keys)
                    ]
                )
                else ""
            )
        )
    for method in [m for m in ALL_METHODS if m.merge == "sequential"]:
        m = method.name
        if m in summary and n_max in summary[m]:
            per_n = ", ".join(f"N = {n}: {summary[m][n]['retained']:.2f}" for n in sorted(summary[m]) if n != n_max)
            lines.append(
                f"- Sequential output matching (`{m}`, {describe_sequential(method)}; inputs re-measured through "
                f"the partly merged model): R "
                f"{get(m, n_max, 'retained'):.2f} at N = {n_max}" + (f" ({per_n})" if per_n else "") + ", drift "
                f"{100 * get(m, n_max, 'prior_drift'):+.0f} %, identity {get(m, n_max, 'identity'):.2f} (statistics "
                f"merge: R {get('lora-stats', n_max, 'retained'):.2f}, drift "
                f"{100 * get('lora-stats', n_max, 'prior_drift'):+.0f} %, identity "
                f"{get('lora-stats', n_max, 'identity'):.2f})."
            )
    if "ortho-disjoint" in summary:
        frac = (n_max - 1) * rank / width
        lines.append(
            f"- Orthogonal, disjoint slots, exact merge: retains {get('ortho-disjoint', n_max, 'retained'):.2f} at "
            f"N = {n_max} (random slots: {get('ortho-random', n_max, 'retained'):.2f}). Orthogonal down-projections "
            "stop adapter j from reading *the directions adapter i uses*, not from reading concept i's inputs: with "
            f"{n_max} slots of rank {rank} on {width}-wide layers the other adapters read about (N−1)·r/in = "
            f"{frac:.0%} of an input's energy."
        )
    single = results.get("single", {})
    pairs = [(f, f"{f}-distill") for f in ("lora", "ortho-disjoint") if f in single and f"{f}-distill" in single]
    if pairs:

        def mean(family: str, key: str) -> float:
            return float(np.mean([v[key] for v in single[family].values()]))

        merged = [
            f"`{m}` R {get(m, n_max, 'retained'):.2f}, drift {100 * get(m, n_max, 'prior_drift'):+.0f} %, identity "
            f"{get(m, n_max, 'identity'):.2f}"
            for m in ("lora-distill-stats", "ortho-disjoint-distill-stats", "lora-distill-sequential-refine")
            if n_max in summary.get(m, {})
        ]
        lines.append(
            "- Prior preservation as distillation (`-distill`: the class term's target is the frozen base's "
            "prediction instead of the noise): single adapters drift "
            + ", ".join(
                f"{100 * mean(d, 'prior_drift'):+.1f} % instead of {100 * mean(f, 'prior_drift'):+.1f} % "
                f"(`{f}`; identity {mean(d, 'identity'):.2f} vs {mean(f, 'identity'):.2f})"
                for f, d in pairs
            )
            + ". The noise target refits the class prompts to a few generated images and noise draws, which moves "
            "the model by itself; the base's prediction asks for no change at all on class inputs. Merged at "
            f"N = {n_max}: " + ("; ".join(merged) if merged else "not measured") + "."
        )
    if "soda" in summary:
        lines.append(
            f"- SODA (sum of W_i − W0): retained {get('soda', n_max, 'retained'):.2f} at N = {n_max}, drift "
            f"{100 * get('soda', n_max, 'prior_drift'):+.0f} %."
        )
    return "\n".join(lines)
