"""Merge-fidelity benchmark: does concept i survive a merge with N − 1 others? One command, from the repository root:

    python -m benchmarks.fidelity.run            # full: 15 concepts, N = 1, 2, 5, 10, 15; writes docs/benchmarks.md
    python -m benchmarks.fidelity.run --quick    # 5 concepts, N = 1, 2, 5, smaller base and budget; no docs

Everything is built and trained here on the CPU (nothing is downloaded) and cached under
``benchmarks/.cache/fidelity/``: the base model (``base_model.py``), the learning-rate sweep and every trained
adapter, so a rerun only evaluates. For each method (``methods.py``) and N it merges subsets of N concepts with
``compose`` (or peft's own merge for the peft baselines) and reports, averaged over the concepts of every subset:
retained improvement on the concept's own images and prompt, identity accuracy of sampled images (a classifier
validated on held-out real digits first), prior drift on ordinary class prompts, and merge time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .base_model import DIGIT_WORDS, BaseConfig, class_prompt, load_or_build, sample
from .concepts import MAX_CONCEPTS, TUNING_SET, make_concepts, make_tuning_concept
from .methods import ALL_METHODS, ERASURE_P, available_methods, merge_into, records_statistics, train_adapter
from .metrics import (
    IdentityClassifier,
    denoise_loss,
    identity_accuracy,
    make_eval_set,
    prior_drift,
    retained_improvement,
    timestep_grid,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CACHE = os.path.join(ROOT, "benchmarks", ".cache", "fidelity")
START, END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
TUNING_CONCEPT = MAX_CONCEPTS - 1  # the learning-rate sweep trains this concept, which the benchmark never merges
# Learning rates of the families the sweep does not cover (and of every family in quick mode and tests). The full
# run sweeps one plain and one orthogonal family; the others take the winner of the family they share a trained
# factor structure with: orthogonal (B only) -> ortho-disjoint-erasure's 3e-2, BlockLoRA (A and B) -> lora's 1e-2.
# SODA (spectrum + rotation): 3e-2, the better of 3e-3 / 3e-2 in a one-concept probe (3e-3 barely moved the loss).
DEFAULT_LRS = {
    "lora": 1e-2,
    "ortho-random": 3e-2,
    "ortho-disjoint": 3e-2,
    "ortho-disjoint-erasure": 3e-2,
    "block": 1e-2,
    "block-erasure": 1e-2,
    "soda": 3e-2,
}


@dataclass(frozen=True)
class RunConfig:
    base: BaseConfig = field(default_factory=BaseConfig)
    concepts: int = 15
    ns: tuple[int, ...] = (1, 2, 5, 10, 15)
    images_per_concept: int = 6
    rank: int = 2
    num_blocks: int = 16  # BlockLoRA output blocks per layer (r = 2 rows each on the 32-wide layers)
    steps: int = 120
    repeats: int = 2  # batch = images_per_concept × repeats
    # Families whose lr is tuned on the tuning concept (a sweep costs len(lr_grid) trainings); the others use
    # DEFAULT_LRS. Prior preservation made each training ~3x dearer, and the shared 2-core machine's budget no longer
    # allowed a sweep: DEFAULT_LRS hold the winners of the earlier sweeps (lora, ortho-disjoint-erasure).
    sweep: tuple[str, ...] = ()
    lr_grid: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    eval_timesteps: int = 8
    samples_per_concept: int = 8
    sample_steps: int = 10
    guidance: float = 2.0
    prior_images_per_class: int = 4
    # DreamBooth prior preservation: every training batch also holds as many class images under their class prompt,
    # weighted prior_loss_weight (diffusers' default 1). The class images are the base model's own samples of the
    # class prompts (class_images per digit), as diffusers' train_dreambooth generates them; held-out digits measure
    # the prior drift and stay unseen. prior_classes "all": the ten class prompts "a photo of digit <d>" (the
    # concept's class noun is "digit"); "own": only the concept's digit (measured: the other nine prompts then drift
    # by up to +370 % for a single adapter, see docs/benchmarks.md).
    prior_preservation: bool = True
    class_images: int = 24
    prior_classes: str = "all"
    prior_loss_weight: float = 1.0
    methods: tuple[str, ...] | None = None
    seed: int = 0

    def train_key(self, family: str, lr: float) -> str:
        blob = json.dumps(
            [
                family,
                lr,
                self.rank,
                self.num_blocks,
                self.steps,
                self.repeats,
                self.images_per_concept,
                self.seed,
                self.prior_preservation,
                self.class_images,
                self.prior_classes,
                self.prior_loss_weight,
                records_statistics(family),
                "v2",
            ],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def eval_key(self, family: str, lr: float) -> str:
        """Names a method's cached evaluation: everything that changes its numbers (not the method list)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("methods", "sweep", "lr_grid")}
        blob = json.dumps(
            [fields, self.base.key(), self.train_key(family, lr), "eval-v1"], sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


FULL = RunConfig()
QUICK = RunConfig(
    base=BaseConfig(train_steps=500),
    concepts=5,
    ns=(1, 2, 5),
    steps=45,
    sweep=(),
    eval_timesteps=6,
    samples_per_concept=6,
    prior_images_per_class=2,
)


def subsets(n_concepts: int, n: int) -> list[list[int]]:
    """``ceil(C / N)`` subsets of N concepts that together cover all C: subset k is ``k·N, …, k·N + N − 1`` mod C."""
    if not 1 <= n <= n_concepts:
        raise ValueError(f"N must be in [1, {n_concepts}], got {n}")
    return [[(k * n + j) % n_concepts for j in range(n)] for k in range(math.ceil(n_concepts / n))]


_CLASSIFIERS: dict[tuple, IdentityClassifier] = {}


class Benchmark:
    """State of one run: base model, concepts, evaluation sets, classifier, trained adapter folders."""

    def __init__(self, cfg: RunConfig, cache_dir: str, log=print):
        self.cfg, self.log = cfg, log
        self.base = load_or_build(cfg.base, cache_dir, log)
        self.dir = self.base.folder
        self.concepts = make_concepts(self.base.data, list(range(cfg.concepts)), cfg.images_per_concept)
        self.tuning_set = {i: make_tuning_concept(self.base.data, i, cfg.images_per_concept) for i in TUNING_SET}
        self.tuning = self.tuning_set[TUNING_CONCEPT]
        grid = timestep_grid(cfg.eval_timesteps, cfg.base.num_train_timesteps)
        self.eval_sets = {
            c.index: make_eval_set(c.images, [c.prompt], 0, grid, seed=100 + c.index)
            for c in [*self.concepts, *self.tuning_set.values()]
        }
        prior_x, prior_y = [], []
        for d in range(10):
            x, _ = self.base.data.part("heldout", d)
            prior_x.append(x[: cfg.prior_images_per_class])
            prior_y += [d] * len(prior_x[-1])
        self.prior_set = make_eval_set(
            torch.cat(prior_x), [class_prompt(d) for d in range(10)], prior_y, grid, seed=99
        )
        key = (cfg.base.image_size, cfg.base.split, cfg.base.seed, cfg.seed)
        if key not in _CLASSIFIERS:  # a function of the data split only: fit once per process
            _CLASSIFIERS[key] = IdentityClassifier(self.base.data, list(range(MAX_CONCEPTS)), seed=cfg.seed)
        self.classifier = _CLASSIFIERS[key]
        self.uncond = self.base.encode([""])
        self._states: dict[str, torch.Tensor] = {}
        self._class_pools: dict[int, torch.Tensor] = {}

    def prior_pool(self, digit: int) -> tuple[torch.Tensor, list[str]] | None:
        """The class images and prompts concept training preserves: the concept's own class (``prior_classes =
        "own"``, DreamBooth's recipe) or every digit class (``"all"``)."""
        digits = [digit] if self.cfg.prior_classes == "own" else list(range(10))
        return torch.cat([self.class_pool(d) for d in digits]), [
            class_prompt(d) for d in digits for _ in range(self.cfg.class_images)
        ]

    def class_pool(self, digit: int) -> torch.Tensor:
        """DreamBooth's class images of ``digit``: ``class_images`` samples ``(k, 1, S, S)`` of the base model for
        the class prompt (cached beside the base). The base's own samples, as diffusers' ``train_dreambooth``
        generates them, and not held-out digits: those measure the prior drift and must stay unseen."""
        if digit not in self._class_pools:
            from safetensors.torch import load_file, save_file

            k = self.cfg.class_images
            path = os.path.join(self.dir, "class_images", f"digit{digit}-k{k}-s{self.cfg.sample_steps}.safetensors")
            if not os.path.isfile(path):
                imgs = sample(
                    self.base.unet,
                    self.base.scheduler.config,
                    self.states([class_prompt(digit)] * k),
                    self.uncond,
                    steps=self.cfg.sample_steps,
                    guidance=self.cfg.guidance,
                    seed=30_000 + digit,
                    image_size=self.cfg.base.image_size,
                )
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_file({"images": imgs.contiguous()}, path + ".tmp")
                os.replace(path + ".tmp", path)
            self._class_pools[digit] = load_file(path)["images"]
        return self._class_pools[digit]

    # ------------------------------------------------------------------------------------------ evaluation
    def states(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._states]
        if missing:
            self._states.update(zip(missing, self.base.encode(missing)))
        return torch.stack([self._states[p] for p in prompts])

    def loss(self, unet, index: int) -> float:
        return denoise_loss(unet, self.base.scheduler, self.states, self.eval_sets[index])

    def prior_loss(self, unet) -> float:
        return denoise_loss(unet, self.base.scheduler, self.states, self.prior_set)

    def samples(self, unet, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """``samples_per_concept`` images per prompt; prompt k's noise comes from ``seeds[k]`` (same for every method)."""
        k = self.cfg.samples_per_concept
        out = []
        for prompt, seed in zip(prompts, seeds):
            out.append(
                sample(
                    unet,
                    self.base.scheduler.config,
                    self.states([prompt] * k),
                    self.uncond,
                    steps=self.cfg.sample_steps,
                    guidance=self.cfg.guidance,
                    seed=seed,
                    image_size=self.cfg.base.image_size,
                )
            )
        return torch.stack(out)  # (prompts, k, 1, S, S)

    def identity(self, unet, indices: list[int]) -> tuple[list[float], torch.Tensor]:
        concepts = [self.concept(i) for i in indices]
        imgs = self.samples(unet, [c.prompt for c in concepts], [10_000 + c.index for c in concepts])
        accs = [identity_accuracy(self.classifier.predict(x), c.label) for x, c in zip(imgs, concepts)]
        return accs, imgs

    def concept(self, index: int):
        return self.tuning_set[index] if index in self.tuning_set else self.concepts[index]

    # ------------------------------------------------------------------------------------------ training
    def adapter_dir(self, family: str, lr: float, index: int) -> str:
        return os.path.join(self.dir, "adapters", family, self.cfg.train_key(family, lr), f"c{index:02d}")

    def train(self, family: str, lr: float, index: int) -> str:
        folder = self.adapter_dir(family, lr, index)
        if not os.path.isfile(os.path.join(folder, "train.json")):
            c = self.concept(index)
            # Erasure's foreign pool: the ordinary class prompts and the concept's class with tokens no benchmark
            # concept uses (a user knows neither the other concepts nor their tokens, only that they exist).
            spare = [f"sks{k}" for k in range(MAX_CONCEPTS, self.cfg.base.rare_tokens)]
            foreign = [class_prompt(d) for d in range(10)] + [
                f"a photo of {t} digit {DIGIT_WORDS[c.digit]}" for t in spare
            ]
            stats = train_adapter(
                self.base,
                c,
                family,
                rank=self.cfg.rank,
                steps=self.cfg.steps,
                lr=lr,
                repeats=self.cfg.repeats,
                seed=self.cfg.seed,
                out_dir=folder,
                erasure_prompts=foreign,
                num_blocks=self.cfg.num_blocks,
                class_images=self.prior_pool(c.digit) if self.cfg.prior_preservation else None,
                prior_loss_weight=self.cfg.prior_loss_weight,
                record_statistics=records_statistics(family),
            )
            with open(os.path.join(folder, "train.json"), "w") as f:
                json.dump({"lr": lr, **stats}, f)
            self.log(f"    trained {family} c{index:02d} lr {lr:g}: {stats['train_seconds']:.1f} s")
        return folder

    def tune_lr(self, family: str) -> tuple[float, dict]:
        """The lr of ``lr_grid`` whose adapter for the tuning concept reaches the lowest loss on its own images."""
        if family not in self.cfg.sweep:
            return DEFAULT_LRS[family], {}
        from .methods import Method

        probe = Method("probe", family, "soda-sum" if family == "soda" else "compose-auto", "")
        losses = {}
        for lr in self.cfg.lr_grid:
            unet, _ = merge_into(self.base.unet, probe, [self.train(family, lr, TUNING_CONCEPT)])
            losses[lr] = self.loss(unet, TUNING_CONCEPT)
        best = min(losses, key=losses.get)
        self.log(
            f"  lr sweep {family}: " + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in losses.items()) + f" -> {best:g}"
        )
        return best, losses


def run(cfg: RunConfig, cache_dir: str = DEFAULT_CACHE, log=print) -> dict:
    """Run the benchmark; returns a dict of everything measured (per-merge ``rows``, per-method ``summary``; the
    images for the figures are tensors under ``base_samples`` and ``grid_samples``). Each method's evaluation is
    cached under ``<base folder>/results/`` keyed by everything that changes its numbers."""
    t_start = time.perf_counter()
    bench = Benchmark(cfg, cache_dir, log)
    log(f"base model {bench.dir} ({bench.base.info['train_seconds']:.0f} s of training when it was built)")
    log(f"identity classifier: validation accuracy {bench.classifier.validation['accuracy']:.3f}")
    base_unet = bench.base.unet
    results: dict = {
        "config": dataclasses.asdict(cfg),
        "base_info": bench.base.info,
        "classifier_validation": bench.classifier.validation,
        "erasure_p": ERASURE_P,
        "concepts": [
            {"index": c.index, "token": c.token, "digit": c.digit, "transform": c.transform_name}
            for c in bench.concepts
        ],
    }

    # The base model: its class-prompt samples must show the right digit, and it must not know the concepts.
    digit_imgs = bench.samples(base_unet, [class_prompt(d) for d in range(10)], [20_000 + d for d in range(10)])
    results["base_class_accuracy"] = float(
        np.mean([identity_accuracy(bench.classifier.predict(x), d) for d, x in enumerate(digit_imgs)])
    )
    base_loss = {c.index: bench.loss(base_unet, c.index) for c in bench.concepts}
    base_prior = bench.prior_loss(base_unet)
    base_identity, _ = bench.identity(base_unet, [c.index for c in bench.concepts])
    results["base"] = {"loss": base_loss, "prior_loss": base_prior, "identity": base_identity}
    results["base_samples"] = digit_imgs
    log(f"base: class-prompt sample accuracy {results['base_class_accuracy']:.3f}, prior loss {base_prior:.4f}")

    methods = available_methods(list(cfg.methods) if cfg.methods else None)
    results["skipped_methods"] = [
        m.name for m in ALL_METHODS if m not in methods and (not cfg.methods or m.name in cfg.methods)
    ]
    families = list(dict.fromkeys(m.family for m in methods))
    lrs, singles, folders = {}, {}, {}
    for family in families:
        lrs[family], sweep = bench.tune_lr(family)
        results.setdefault("lr_sweep", {})[family] = sweep
        folders[family] = {c.index: bench.train(family, lrs[family], c.index) for c in bench.concepts}
        probe = next(m for m in methods if m.family == family)
        exact = dataclasses.replace(probe, merge="soda-sum" if family == "soda" else "compose-sum")
        singles[family] = {}
        for c in bench.concepts:
            unet, _ = merge_into(base_unet, exact, [folders[family][c.index]])
            singles[family][c.index] = bench.loss(unet, c.index)
        train_s = [json.load(open(os.path.join(f, "train.json")))["train_seconds"] for f in folders[family].values()]
        log(f"  {family}: lr {lrs[family]:g}, median train {statistics.median(train_s):.1f} s per concept")
    results["lrs"], results["single_loss"] = lrs, singles

    rows, grid_samples = [], {}
    n_max = max(x for x in cfg.ns if x <= cfg.concepts)
    for method in methods:
        cached = os.path.join(
            bench.dir, "results", f"{method.name}-{cfg.eval_key(method.family, lrs[method.family])}.json"
        )
        if os.path.isfile(cached):  # evaluated before with the same adapters and settings: reuse (merge times too)
            with open(cached) as f:
                saved = json.load(f)
            rows += saved["rows"]
            for key, imgs in saved["grid_samples"].items():
                n = int(key)
                grid_samples[(method.name, n)] = {int(i): torch.tensor(x) for i, x in imgs.items()}
        else:
            method_rows, method_grid = evaluate_method(bench, method, folders, base_loss, base_prior, singles, n_max)
            rows += method_rows
            grid_samples.update({(method.name, n): g for n, g in method_grid.items()})
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            with open(cached + ".tmp", "w") as f:
                grids = {n: {i: x.tolist() for i, x in g.items()} for n, g in method_grid.items()}
                json.dump({"rows": method_rows, "grid_samples": grids}, f)
            os.replace(cached + ".tmp", cached)
        summary = summarize(rows, method.name)
        log(
            f"  {method.name}: "
            + ", ".join(
                f"N={n} retained {s['retained']:.3f} id {s['identity']:.2f} drift {100 * s['prior_drift']:+.1f}%"
                for n, s in summary.items()
            )
        )
    results["rows"] = rows
    results["summary"] = {m.name: summarize(rows, m.name) for m in methods}
    results["methods"] = [dataclasses.asdict(m) for m in methods]
    results["grid_samples"] = grid_samples
    results["wall_seconds"] = time.perf_counter() - t_start
    return results


def evaluate_method(bench, method, folders, base_loss, base_prior, singles, n_max) -> tuple[list[dict], dict]:
    """Every merge of ``method`` (each N, each subset): rows of measurements and, at N = 1 and ``n_max``, one
    sample per concept for the figure."""
    cfg, rows, grid = bench.cfg, [], {}
    for n in cfg.ns:
        if n > cfg.concepts:
            continue
        for subset in subsets(cfg.concepts, n):
            unet, seconds = merge_into(bench.base.unet, method, [folders[method.family][i] for i in subset])
            drift = prior_drift(base_prior, bench.prior_loss(unet))
            accs, imgs = bench.identity(unet, subset)
            for i, acc, img in zip(subset, accs, imgs):
                merged = bench.loss(unet, i)
                rows.append(
                    {
                        "method": method.name,
                        "n": n,
                        "subset": subset,
                        "concept": i,
                        "merged_loss": merged,
                        "retained": retained_improvement(base_loss[i], merged, singles[method.family][i]),
                        "identity": acc,
                        "prior_drift": drift,
                        "merge_seconds": seconds,
                    }
                )
                if n in (1, n_max):
                    grid.setdefault(n, {})[i] = img[0]
    return rows, grid


def summarize(rows: list[dict], method: str) -> dict[int, dict]:
    """Per N: means over concept evaluations (retained, identity), over merges (prior drift), median merge time."""
    out = {}
    for n in sorted({r["n"] for r in rows if r["method"] == method}):
        rs = [r for r in rows if r["method"] == method and r["n"] == n]
        merges = {tuple(r["subset"]): r for r in rs}.values()
        retained = [r["retained"] for r in rs if not math.isnan(r["retained"])]
        out[n] = {
            "retained": float(np.mean(retained)) if retained else math.nan,
            "retained_min": float(np.min(retained)) if retained else math.nan,
            "identity": float(np.mean([r["identity"] for r in rs])),
            "prior_drift": float(np.mean([r["prior_drift"] for r in merges])),
            "merge_seconds": float(statistics.median(r["merge_seconds"] for r in merges)),
            "evaluations": len(rs),
        }
    return out


def write_docs(results: dict, bench_concepts, command: str, docs_dir: str) -> None:
    """Figures into ``docs_dir`` and the fidelity section of ``docs_dir/benchmarks.md``."""
    from .. import _common
    from .report import markdown, save_base_grid, save_concept_grid, save_plot

    labels = {m["name"]: m["label"] for m in results["methods"]}
    save_base_grid(results["base_samples"], os.path.join(docs_dir, "fidelity_base_samples.png"))
    save_plot(results["summary"], labels, os.path.join(docs_dir, "fidelity_retained.png"))
    n_max = max(n for n in results["config"]["ns"] if n <= results["config"]["concepts"])
    save_concept_grid(
        bench_concepts, results["grid_samples"], list(labels), n_max, os.path.join(docs_dir, "fidelity_concepts.png")
    )
    text = markdown(results, labels, command)
    _common.write_section(os.path.join(docs_dir, "benchmarks.md"), START, END, text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 concepts, N = 1, 2, 5, smaller budget (< 5 min)")
    parser.add_argument("--methods", nargs="+", help="subset of methods (default: all available)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE)
    parser.add_argument("--docs", action="store_true", help="write docs/ (default for the full run)")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/")
    parser.add_argument("--note", default="", help="a sentence appended to the docs section (e.g. what was left out)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = QUICK if args.quick else FULL
    if args.methods:
        cfg = dataclasses.replace(cfg, methods=tuple(args.methods))
    results = run(cfg, args.cache_dir)
    print(f"wall time {results['wall_seconds']:.0f} s")
    if (args.docs or not args.quick) and not args.no_docs:
        command = "python -m benchmarks.fidelity.run" + (" --quick" if args.quick else "")
        command += (" --methods " + " ".join(args.methods)) if args.methods else ""
        results["note"] = args.note
        results["machine"] = (
            f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
            f"Python {platform.python_version()}"
        )
        concepts = make_concepts(
            load_or_build(cfg.base, args.cache_dir).data, list(range(cfg.concepts)), cfg.images_per_concept
        )
        write_docs(results, concepts, command, os.path.join(ROOT, "docs"))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
