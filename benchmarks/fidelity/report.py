"""Figures and the markdown section of ``docs/benchmarks.md`` for the fidelity benchmark."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base_model import DIGIT_WORDS

TARGET_METHODS = ("ortho-disjoint", "block", "ortho-disjoint-erasure", "block-erasure")
PLAIN_LORA = ("lora-sum", "lora-avg", "peft-ties", "peft-svd")


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
    """Retained improvement and identity accuracy vs N, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for name, per_n in summary.items():
        ns = sorted(per_n)
        style = "-" if name not in PLAIN_LORA else "--"
        for ax, key in zip(axes, ("retained", "identity")):
            ax.plot(ns, [per_n[n][key] for n in ns], style, marker="o", label=labels.get(name, name))
    axes[0].axhline(0.95, color="gray", lw=0.8, ls=":")
    axes[0].set_ylabel("retained improvement (1 = single adapter)")
    axes[1].set_ylabel("identity accuracy of sampled images")
    for ax in axes:
        ax.set_xlabel("N concepts merged")
        ax.set_xticks(sorted({n for per_n in summary.values() for n in per_n}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(x: float, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def metric_table(summary: dict, labels: dict[str, str], key: str, spec: str, scale: float = 1.0) -> str:
    ns = sorted({n for per_n in summary.values() for n in per_n})
    lines = ["| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for name, per_n in summary.items():
        cells = [_fmt(per_n[n][key] * scale, spec) if n in per_n else "–" for n in ns]
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(summary: dict, n_max: int) -> list[str]:
    """The issue's targets, each stated as met or missed with the numbers."""
    out = []
    best_plain = max(
        (summary[m][n_max]["retained"] for m in PLAIN_LORA if m in summary and n_max in summary[m]), default=math.nan
    )
    for m in TARGET_METHODS:
        if m not in summary or n_max not in summary[m]:
            out.append(f"- `{m}`: not measured (the method is not in this checkout yet).")
            continue
        s = summary[m][n_max]
        ok_r, ok_d, ok_p = s["retained"] >= 0.95, s["prior_drift"] <= 0.05, s["retained"] > best_plain
        verdict = "met" if ok_r and ok_d and ok_p else "missed"
        out.append(
            f"- `{m}` at N = {n_max}: retained improvement {s['retained']:.3f} (target ≥ 0.95: "
            f"{'met' if ok_r else 'missed'}), prior drift {100 * s['prior_drift']:+.1f} % (target ≤ 5 %: "
            f"{'met' if ok_d else 'missed'}), best plain-LoRA merge {best_plain:.3f} ("
            f"{'ahead' if ok_p else 'not ahead'}). Overall: **{verdict}**."
        )
    return out


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
        + "A family's lr minimises the loss on the tuning concept's own images after the common budget (the "
        "training objective; nothing about merging was looked at). Families not swept (CPU budget) take the winner "
        "of the family with the same trained factors (orthogonal: B only; BlockLoRA: A and B like LoRA); SODA took "
        "the better of two lrs in a one-concept probe."
    )
    skipped = results.get("skipped_methods") or []
    parts = [
        "## Merge fidelity: N personal concepts on a tiny text-to-image model",
        "",
        f"`{command}` ({results['wall_seconds'] / 60:.1f} min wall for the whole run on {results.get('machine', 'CPU')}; "
        "the base model and the trained adapters are cached under `benchmarks/.cache/fidelity/`, so a rerun only "
        "evaluates). `python -m benchmarks.fidelity.run --quick` is the smoke run (5 concepts, N = 1, 2, 5, its own "
        "smaller base model and budget, no lr sweep; 4.4 min from scratch on the same 2 cores, every method "
        "including SODA) and writes no docs.",
        "",
        "**Base model** (`benchmarks/fidelity/base_model.py`): a diffusers `UNet2DConditionModel` "
        f"(block_out_channels {tuple(base_cfg['block_out_channels'])}, cross-attention in every block, "
        f"cross_attention_dim {base_cfg['cross_attention_dim']}) and a {base_cfg['text_layers']}-layer transformers "
        "`CLIPTextModel`, both built from configs and trained jointly from scratch here on scikit-learn's digits "
        f"({base_cfg['train_steps']} steps, batch {base_cfg['batch_size']}, Adam, noise-prediction loss, cosine "
        f"DDPM schedule, 10 % empty prompts for classifier-free guidance; {results['base_info']['train_seconds'] / 60:.1f} "
        f"min of CPU). It works in pixel space on the digits' native {base_cfg['image_size']}×{base_cfg['image_size']} "
        "grid, 1 channel, no VAE (a VAE has nothing to compress at this size, and upscaling would add no information "
        "but 4× the compute on a shared 2-core machine). Prompts are `a photo of digit <class>`; the tokenizer is a "
        "word-level one written in code, so each concept token is one embedding row that base training never "
        f"updates. Class-prompt samples (DDIM, {cfg['sample_steps']} steps, guidance {cfg['guidance']:g}) are the "
        f"right digit {100 * results['base_class_accuracy']:.0f} % of the time by the classifier below "
        "(![base samples](fidelity_base_samples.png)).",
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
        f"**Training** (same budget for every method): rank {cfg['rank']} (`lora_alpha = r`), attention "
        f"`to_q, to_k, to_v, to_out.0`, {cfg['steps']} Adam steps of batch {cfg['images_per_concept'] * cfg['repeats']} "
        f"(each concept image {cfg['repeats']}× at random timesteps and noises). {sweep_text} Chosen: {lrs}. With "
        f"r = {cfg['rank']} the 32-wide layers hold exactly 16 disjoint orthogonal slots and BlockLoRA uses 16 "
        f"output blocks: 15 concepts fill the layers, the hard case of METHODS.md §5. Erasure: `OutputErasure(p={results.get('erasure_p', 0.5):g}, "
        "weight=1)` with a foreign pool of the ten class prompts and the concept's class under tokens no concept uses.",
        "",
        "**Measurements** per method and N: merges of subsets of N concepts that together cover all "
        f"{cfg['concepts']} (subset k = concepts kN … kN+N−1 mod {cfg['concepts']}), each concept evaluated in every "
        "subset it is in. (a) *retained improvement* = (L_base − L_merged) / (L_base − L_single) on the concept's own "
        f"images and prompt, L = noise-prediction MSE over {cfg['eval_timesteps']} fixed timesteps × fixed noises per "
        f"image; (b) *identity accuracy*: {cfg['samples_per_concept']} DDIM samples of the concept prompt (same noises "
        "for every method) classified as the concept; (c) *prior drift*: relative change of the loss on the class "
        f"prompts over {cfg['prior_images_per_class']} held-out digits per class vs the base; (d) *merge time*: "
        "adapter folders on disk to fused UNet weights (median over the merges).",
        "",
        "![retained improvement vs N](fidelity_retained.png)",
        "",
        "Retained improvement (mean over concept evaluations):",
        "",
        metric_table(summary, labels, "retained", ".3f"),
        "",
        "Worst concept's retained improvement:",
        "",
        metric_table(summary, labels, "retained_min", ".3f"),
        "",
        "Identity accuracy of sampled images:",
        "",
        metric_table(summary, labels, "identity", ".2f"),
        "",
        "Prior drift (% change of the class-prompt loss vs the base):",
        "",
        metric_table(summary, labels, "prior_drift", "+.1f", 100.0),
        "",
        "Merge time (ms, median):",
        "",
        metric_table(summary, labels, "merge_seconds", ".0f", 1000.0),
        "",
        f"![one sample per concept and method at N = {n_max}](fidelity_concepts.png)",
        "",
        "**Targets** (issue: orthogonal with disjoint slots and BlockLoRA retain ≥ 0.95 at N = 15 with prior drift "
        "≤ 5 %, ahead of every plain-LoRA merge):",
        "",
        *target_lines(summary, n_max),
    ]
    if skipped:
        parts += ["", f"Not in this run (not in the checkout yet): {', '.join(skipped)}."]
    if results.get("note"):
        parts += ["", results["note"]]
    parts += ["", interpretation(summary, cfg["rank"])]
    return "\n".join(parts)


def interpretation(summary: dict, rank: int, width: int = 32) -> str:
    """What the numbers say, with the numbers: generated, so a rerun cannot leave stale claims behind."""

    def get(m: str, n: int, key: str) -> float:
        return summary.get(m, {}).get(n, {}).get(key, math.nan)

    ns = sorted({n for per_n in summary.values() for n in per_n})
    n_max = ns[-1]
    lines = ["**Reading the results.**", ""]
    if "lora-sum" in summary and "lora-avg" in summary:
        lines.append(
            f"- Plain LoRA. Summing keeps every delta at full strength but every adapter acts on every prompt: at "
            f"N = {n_max} the sum retains {get('lora-sum', n_max, 'retained'):.2f} with prior drift "
            f"{100 * get('lora-sum', n_max, 'prior_drift'):+.0f} %; averaging divides each concept by N and retains "
            f"{get('lora-avg', n_max, 'retained'):.2f}. peft's `ties` trims and sign-elects the A and B factors "
            f"separately (not the deltas): {get('peft-ties', n_max, 'retained'):.2f}; `svd` truncates the summed "
            f"delta to rank {rank}: {get('peft-svd', n_max, 'retained'):.2f}."
        )
    if "ortho-disjoint" in summary:
        frac = (n_max - 1) * rank / width
        lines.append(
            f"- Orthogonal, disjoint slots: the merge is exact and no two adapters share an input direction, yet it "
            f"retains {get('ortho-disjoint', n_max, 'retained'):.2f} at N = {n_max} (random slots: "
            f"{get('ortho-random', n_max, 'retained'):.2f}). METHODS.md §5 predicts this: orthogonal down-projections "
            f"stop adapter j from reading *the directions adapter i uses*, not from reading concept i's inputs. With "
            f"{n_max} slots of rank {rank} on {width}-wide layers the other adapters read about (N−1)·r/in = "
            f"{frac:.0%} of an input's energy, and nothing taught them to output zero there."
        )
    for plain, erased, name in (
        ("ortho-disjoint", "ortho-disjoint-erasure", "orthogonal"),
        ("block", "block-erasure", "BlockLoRA"),
    ):
        if plain in summary and erased in summary:
            lines.append(
                f"- Output erasure ({name}): single-adapter prior drift {100 * get(plain, 1, 'prior_drift'):+.0f} % → "
                f"{100 * get(erased, 1, 'prior_drift'):+.0f} %; at N = {n_max} retained "
                f"{get(plain, n_max, 'retained'):.2f} → {get(erased, n_max, 'retained'):.2f}, drift "
                f"{100 * get(plain, n_max, 'prior_drift'):+.0f} % → {100 * get(erased, n_max, 'prior_drift'):+.0f} %, "
                f"identity {get(plain, n_max, 'identity'):.2f} → {get(erased, n_max, 'identity'):.2f}."
            )
    if "block" in summary:
        lines.append(
            f"- BlockLoRA without erasure retains {get('block', n_max, 'retained'):.2f} at N = {n_max}: disjoint "
            "output rows make the merge exact and free of sign conflicts, but a concept's rows feed every later layer, "
            "so an adapter that is not silent on foreign prompts still changes their activations."
        )
    if "soda" in summary:
        lines.append(
            f"- SODA (sum of W_i − W0): retained {get('soda', n_max, 'retained'):.2f} at N = {n_max}, drift "
            f"{100 * get('soda', n_max, 'prior_drift'):+.0f} %; its single adapters learn less in the common budget "
            "(see the identity at N = 1), so its retained ratio divides a smaller gain."
        )
    lines.append(
        "- Prior drift is large for every adapter trained without erasure *already at N = 1*: the concept prompt "
        "differs from its class prompt by one token and the concept's images are a transformed class, so a plain "
        "DreamBooth-style adapter also transforms the class (the *identity interference* of the BlockLoRA paper). "
        "Merging adds the drifts of all adapters. That is a property of how the adapters were trained, which no "
        "merge rule can undo; erasure is the remedy, and it is only partial here because it regresses the concept's "
        "own (transformed) images under foreign prompts, while the drift is measured on plain digits."
    )
    return "\n".join(lines)
