"""Merge-fidelity benchmark: does concept i survive a merge with N − 1 others? One command, from the repository root:

    python -m studies.fidelity.run            # full: 15 concepts, N = 1, 2, 5, 10, 15; writes docs/benchmarks.md
    python -m studies.fidelity.run --quick    # 5 concepts, N = 1, 2, 5, smaller base and budget; no docs

Everything is built and trained here on the CPU (nothing is downloaded) and cached under
``studies/.cache/fidelity/``: the base model (``base_model.py``), the learning-rate sweep and every trained
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

from benchmarks._common import write_section

from .base_model import DIGIT_WORDS, BaseConfig, class_prompt, load_or_build, sample
from .concepts import MAX_CONCEPTS, TUNING_SET, make_concepts, make_tuning_concept
from .methods import (
    ALL_METHODS,
    ERASURE_P,
    PROBE_FAMILIES,
    available_methods,
    class_target,
    merge_into,
    records_statistics,
    train_adapter,
)
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
DEFAULT_CACHE = os.path.join(ROOT, "studies", ".cache", "fidelity")
START, END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
NOTES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.md")
TUNING_CONCEPT = MAX_CONCEPTS - 1  # the learning-rate sweep trains this concept, which the benchmark never merges
# Learning rates of the families the sweep does not cover (and of every family in quick mode and tests). The full
# run sweeps one plain and one orthogonal family; the others take the winner of the family they share a trained
# factor structure with: orthogonal (B only) -> ortho-disjoint-erasure's 3e-2, BlockLoRA (A and B) -> lora's 1e-2.
# SODA (spectrum + rotation): 3e-2, the better of 3e-3 / 3e-2 in a one-concept probe (3e-3 barely moved the loss).
DEFAULT_LRS = {
    "lora": 1e-2,
    "lora-distill": 1e-2,  # lora's
    "ortho-random": 3e-2,
    "ortho-disjoint": 3e-2,
    "ortho-disjoint-distill": 3e-2,  # ortho-disjoint's
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
    # Instance half of a batch = images_per_concept × repeats, and as many class images. 1: 6 + 6 samples per step,
    # the compute per step of the earlier instrument (12 instance samples, no prior preservation), which the shared
    # machine's budget allowed for every adapter.
    repeats: int = 1
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
    # 2: the recipe probe's choice (docs/benchmarks.md); diffusers' default is 1.
    prior_loss_weight: float = 2.0
    class_ratio: int = 1  # class images per step, as a multiple of the instance half
    # The statistics merge's settings are chosen on the tuning concepts (never merged in the benchmark) at N =
    # len(TUNING_SET) = 5, over this grid, by a rule that does not look at N (tune_statistics_merge), then used at
    # every N. prior_weight μ: weight of each adapter's prior inputs; ridge λ relative to tr(G)/in; prior_target
    # "own" (each adapter keeps its own behaviour on its prior batches) or "base" (the base's behaviour).
    stats_grid: tuple[tuple[str, tuple], ...] = (
        ("prior_weight", (0.0, 0.3, 1.0, 3.0, 10.0)),
        ("ridge", (1e-3,)),
        ("prior_target", ("own", "base")),
    )
    tuning_identity: bool = False  # the rule reads R and drift; sampling every setting's images costs ~3x more
    # Which concepts choose the settings: "tuning" (TUNING_SET, never merged in the benchmark: five more adapters to
    # train) or "benchmark" (the benchmark's own concepts, in ceil(C/5) merges of five: no extra training, but the
    # settings are then chosen on the concepts they are measured on, at N = 5 only).
    stats_tuning: str = "benchmark"
    drift_allowance: float = 1.5  # the rule: highest R whose prior drift ≤ allowance × the single adapters' own
    calibration_steps: int = 4  # denoising steps of calibrate() for adapters without statistics
    # The sequential merge runs the model layer by layer per merge (minutes on this machine at N = 15): measured at
    # these N only.
    sequential_ns: tuple[int, ...] = (1, 2, 5, 10, 15)
    methods: tuple[str, ...] | None = None
    seed: int = 0
    # The DreamBooth recipe probe (probe_recipe): settings a user would try, each trained on the recipe concepts
    # (tuning concepts, never merged) and measured alone: (prior_loss_weight, class_ratio, steps, lr, target), the
    # target "noise" (diffusers' prior loss, family lora) or "base" (the frozen base's prediction, family
    # lora-distill). The rule: the lowest mean loss on the concepts' own images among the settings whose mean prior
    # drift is ≤ recipe_drift_max; if none, the lowest drift.
    recipe_grid: tuple[tuple, ...] = ()
    recipe_concepts: tuple[int, ...] = (TUNING_CONCEPT,)
    recipe_drift_max: float = 0.10
    # Concepts whose single LoRA is also trained without prior preservation under the chosen recipe (the "without"
    # number of the single-adapter drift).
    no_prior_concepts: tuple[int, ...] = ()

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
                self.class_ratio,
                records_statistics(family),
                "v3",
            ],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def eval_key(self, family: str, lr: float, options=()) -> str:
        """Names a method's cached evaluation: everything that changes its numbers (not the method list)."""
        skip = ("methods", "sweep", "lr_grid", "stats_grid", "drift_allowance", "stats_tuning", "ns", "sequential_ns")
        skip += ("recipe_grid", "recipe_drift_max", "recipe_concepts", "no_prior_concepts")  # cached per N
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip and k != "tuning_identity"}
        blob = json.dumps(
            [fields, self.base.key(), self.train_key(family, lr), list(options), "eval-v2"],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# The recipe probe's settings (prior_loss_weight, class images per step as a multiple of the instance half, steps,
# lr): diffusers' defaults (weight 1, as many class images as instance images) at the earlier 120 steps of 1e-2, and
# the knobs a DreamBooth user turns when the class drifts: a heavier prior term, more class images per step, a
# lower lr with more steps.
RECIPE_GRID = (
    (1.0, 1, 120, 1e-2, "noise"),
    (2.0, 1, 120, 1e-2, "noise"),
    (4.0, 1, 120, 1e-2, "noise"),
    (1.0, 2, 120, 1e-2, "noise"),
    (2.0, 2, 120, 1e-2, "noise"),
    (2.0, 1, 60, 1e-2, "noise"),
    (1.0, 1, 240, 5e-3, "noise"),
    (2.0, 2, 240, 5e-3, "noise"),
    (1.0, 1, 120, 3e-3, "noise"),
    (1.0, 1, 120, 1e-2, "base"),
    (2.0, 1, 120, 1e-2, "base"),
)
# Three tuning concepts choose the recipe: one alone understated the benchmark's mean drift (sks15 +8.7 % where the
# 15 benchmark concepts averaged +12.3 % under the same recipe).
FULL = RunConfig(recipe_grid=RECIPE_GRID, recipe_concepts=(15, 16, 17), no_prior_concepts=(0, 3, 7))
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
        self._singles: dict[str, dict] = {}
        self._single_images: dict[str, torch.Tensor] = {}
        self._trajectories: dict[tuple[str, int] | None, dict] = {}

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
                class_ratio=self.cfg.class_ratio,
                class_target=class_target(family),
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

        probe = Method("probe", family, "soda-sum" if family == "soda" else "compose-exact", "")
        losses = {}
        for lr in self.cfg.lr_grid:
            unet, _ = merge_into(self.base.unet, probe, [self.train(family, lr, TUNING_CONCEPT)])
            losses[lr] = self.loss(unet, TUNING_CONCEPT)
        best = min(losses, key=losses.get)
        self.log(
            f"  lr sweep {family}: " + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in losses.items()) + f" -> {best:g}"
        )
        return best, losses

    def singles(self, family: str, folders: dict[int, str], base_prior: float) -> dict[int, dict]:
        """Each adapter alone (exact, weight 1): loss on its concept, prior drift, identity of its samples."""
        from .methods import Method

        exact = Method("single", family, "soda-sum" if family == "soda" else "compose-sum", "")
        out = {}
        for i, folder in folders.items():
            if folder in self._singles:  # measured before in this run (the settings' tuning measures them too)
                out[i] = self._singles[folder]
                continue
            # Cached beside the adapter, keyed by the evaluation settings (a rerun does not sample them again).
            path = os.path.join(folder, f"single-{self.cfg.eval_key(family, 0.0, ('single', i))}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    saved = json.load(f)
                out[i] = self._singles[folder] = saved["measured"]
                self._single_images[folder] = torch.tensor(saved["image"])
                continue
            unet, seconds = merge_into(self.base.unet, exact, [folder])
            (acc,), imgs = self.identity(unet, [i])
            out[i] = {
                "loss": self.loss(unet, i),
                "prior_drift": prior_drift(base_prior, self.prior_loss(unet)),
                "identity": acc,
                "merge_seconds": seconds,
            }
            self._singles[folder] = out[i]
            self._single_images[folder] = imgs[0, 0]
            with open(path + ".tmp", "w") as f:
                json.dump({"measured": out[i], "image": imgs[0, 0].tolist()}, f)
            os.replace(path + ".tmp", path)
        return out

    def calibrated(self, folder: str, index: int) -> str:
        """A copy of the adapter in ``folder`` whose statistics are computed by ``peft_ortho.statistics.calibrate``
        from the concept's prompt alone (what a user with a third-party file has), not recorded in training."""
        from peft_ortho.merging.load import load_adapter
        from peft_ortho.merging.resolve import resolve
        from peft_ortho.statistics import calibrate

        out = folder + "-calibrated"
        if not os.path.isfile(os.path.join(out, "calibration.json")):
            import shutil

            from peft_ortho._io import atomic_dir
            from peft_ortho.statistics import compare_statistics, load_statistics

            start = time.perf_counter()
            stats = calibrate(
                load_adapter(resolve(folder)), self.pipeline, self.concept(index).prompt,
                steps=self.cfg.calibration_steps, guidance_scale=self.cfg.guidance, seed=self.cfg.seed,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            # How close the calibrated statistics come to the ones recorded in training (on what the merge uses).
            adapter = load_adapter(resolve(folder))
            recorded = load_statistics(folder, adapter=adapter.name)
            per_layer = compare_statistics(stats, recorded, adapter)
            closeness = {k: float(np.mean([v[k] for v in per_layer.values()])) for k in ("relative_error", "overlap")}
            with atomic_dir(out, overwrite=True) as tmp:
                for name in ("adapter_config.json", "adapter_model.safetensors"):
                    shutil.copy(os.path.join(folder, name), os.path.join(tmp, name))
                stats.save_pretrained(tmp)
                with open(os.path.join(tmp, "calibration.json"), "w") as f:
                    json.dump({"seconds": seconds, "prompt": self.concept(index).prompt, **closeness}, f)
        return out

    @property
    def pipeline(self):
        """The base as the parts of a diffusers pipeline ``calibrate`` runs (tokenizer, text encoder, UNet,
        scheduler)."""
        from types import SimpleNamespace

        from diffusers import DDIMScheduler

        b = self.base
        parts = {
            "tokenizer": b.tokenizer,
            "text_encoder": b.text_encoder,
            "unet": b.unet,
            "scheduler": DDIMScheduler.from_config(b.scheduler.config),  # the benchmark's sampler
        }
        return SimpleNamespace(components=parts, **parts)

    def calibration_batches(self, index: int, prior: bool = False) -> list[tuple]:
        """UNet batches ``(x_t, t, text states)`` for the sequential merge: the concept's images at the evaluation
        timesteps under its prompt and under the empty prompt (what guidance runs), or with ``prior`` the class
        images of every digit under their class prompts."""
        g = torch.Generator().manual_seed(50_000 + index)
        if prior:
            x0 = torch.cat([self.class_pool(d)[:2] for d in range(10)])
            prompts = [class_prompt(d) for d in range(10) for _ in range(2)]
            groups = [prompts]
        else:
            x0 = self.concept(index).images
            groups = [[self.concept(index).prompt] * len(x0), [""] * len(x0)]
        batches = []
        for prompts in groups:
            t = torch.tensor(timestep_grid(4, self.cfg.base.num_train_timesteps)).repeat_interleave(len(x0))
            x = x0.repeat(4, 1, 1, 1)
            x_t = self.base.scheduler.add_noise(x, torch.randn(x.shape, generator=g), t)
            batches.append((x_t, t, self.states(prompts * 4)))
        return batches

    def trajectory_batch(self, folder: str, index: int, samples: int) -> dict:
        """The adapter's own guided sampling of its concept prompt as one calibration batch for the sequential merge:
        ``peft_ortho.statistics.calibration_inputs`` with the benchmark's sampler (DDIM, ``sample_steps`` steps,
        guidance ``guidance``), ``samples`` images from noises the identity measurement never uses, every step's
        UNet call (both guidance halves) concatenated: ``2 · samples · sample_steps`` rows."""
        if (folder, samples) not in self._trajectories:
            from peft_ortho.merging.load import load_adapter
            from peft_ortho.merging.resolve import resolve
            from peft_ortho.statistics import calibration_inputs

            calls = calibration_inputs(
                load_adapter(resolve(folder)), self.pipeline, self.concept(index).prompt,
                steps=self.cfg.sample_steps, num_images=samples, guidance_scale=self.cfg.guidance,
                seed=60_000 + index,  # the identity samples use 10_000 + index
            )  # fmt: skip
            self._trajectories[(folder, samples)] = {k: torch.cat([c[k] for c in calls]) for k in calls[0]}
        return self._trajectories[(folder, samples)]

    def prior_trajectory_batch(self) -> dict:
        """Ordinary inputs a user without class images has: the base's own guided sampling of the ten class prompts
        (one image each, the benchmark's sampler), every step in one batch."""
        if None not in self._trajectories:
            from peft_ortho.statistics import calibration_inputs

            calls = calibration_inputs(
                None, self.pipeline, [class_prompt(d) for d in range(10)], steps=self.cfg.sample_steps,
                guidance_scale=self.cfg.guidance, seed=61_000,
            )  # fmt: skip
            self._trajectories[None] = {k: torch.cat([c[k] for c in calls]) for k in calls[0]}
        return self._trajectories[None]


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

    stages = results["stages"] = {}  # seconds each stage took when it was computed (cached stages: then, not now)
    if cfg.recipe_grid:  # the DreamBooth recipe, chosen on tuning concepts alone (never merged)
        trials = [probe_recipe(bench, base_prior, r) for r in cfg.recipe_grid]
        best, within = choose_recipe(trials, cfg.recipe_drift_max)
        results["recipe"] = {
            "trials": trials,
            "chosen": best,
            "within": within,
            "drift_max": cfg.recipe_drift_max,
            "concepts": list(cfg.recipe_concepts),
        }
        stages["recipe probe (trainings of the tuning concepts)"] = sum(t["train_seconds"] for t in trials)
        log(
            "  recipe probe: "
            + "; ".join(
                f"w {t['prior_loss_weight']:g} x{t['class_ratio']} {t['steps']}@{t['lr']:g} {t['target']}: "
                f"loss {t['loss']:.4f} drift {100 * t['prior_drift']:+.1f} %"
                for t in trials
            )
        )
        picked = recipe_of(best)
        results["recipe"]["families"] = [f for f in PROBE_FAMILIES.values() if family_recipe(cfg, f) == picked]
        log(f"  recipe chosen: {picked}, the recipe of: {', '.join(results['recipe']['families']) or 'no family'}")

    methods = available_methods(list(cfg.methods) if cfg.methods else None)
    results["skipped_methods"] = [
        m.name for m in ALL_METHODS if m not in methods and (not cfg.methods or m.name in cfg.methods)
    ]
    families = list(dict.fromkeys(m.family for m in methods))
    lrs, singles, single, folders = {}, {}, {}, {}
    rows, grid_samples = [], {}
    n_max = max(x for x in cfg.ns if x <= cfg.concepts)
    ctx = {"base_loss": base_loss, "base_prior": base_prior, "n_max": n_max}
    if any(m.uses_statistics and not m.options for m in methods):
        tuned = tune_statistics_merge(bench, base_prior)
        results["stats_tuning"] = tuned
        stages["choosing the statistics-merge settings (N = 5 merges)"] = tuned.get("seconds", math.nan)
        chosen = tuple(tuple(kv) for kv in tuned["chosen"])
        methods = [dataclasses.replace(m, options=chosen) if m.uses_statistics and not m.options else m
                   for m in methods]  # fmt: skip
    # Family by family: train its adapters, measure them alone, then every merge of them (so a run cut short has
    # complete rows for the families it reached).
    for family in families:
        lrs[family], sweep = bench.tune_lr(family)
        results.setdefault("lr_sweep", {})[family] = sweep
        folders[family] = {c.index: bench.train(family, lrs[family], c.index) for c in bench.concepts}
        single[family] = bench.singles(family, folders[family], base_prior)
        singles[family] = {i: v["loss"] for i, v in single[family].items()}
        train_s = [json.load(open(os.path.join(f, "train.json")))["train_seconds"] for f in folders[family].values()]
        stages[f"training the {len(train_s)} `{family}` adapters"] = sum(train_s)
        if family == "lora" and cfg.no_prior_concepts:
            results["no_prior"] = no_prior_comparison(bench, base_prior, single[family])
            log(
                "  single drift with / without prior preservation: "
                + ", ".join(
                    f"c{r['concept']} {100 * r['with']:+.1f} % / {100 * r['without']:+.1f} %"
                    for r in results["no_prior"]
                )
            )
        log(
            f"  {family}: lr {lrs[family]:g}, median train {statistics.median(train_s):.1f} s per concept; single "
            f"adapters: prior drift {100 * np.mean([v['prior_drift'] for v in single[family].values()]):+.1f} %, "
            f"identity {np.mean([v['identity'] for v in single[family].values()]):.2f}"
        )
        for method in [m for m in methods if m.family == family]:
            method_rows, method_grid, seconds = cached_evaluation(bench, method, lrs[family], folders, singles, ctx)
            stages[f"evaluating `{method.name}`"] = seconds
            rows += method_rows
            grid_samples.update({(method.name, n): g for n, g in method_grid.items()})
            summary = summarize(rows, method.name)
            log(
                f"  {method.name}: "
                + ", ".join(
                    f"N={n} retained {s['retained']:.3f} id {s['identity']:.2f} drift {100 * s['prior_drift']:+.1f}%"
                    for n, s in summary.items()
                )
            )
    results["lrs"], results["single_loss"], results["single"] = lrs, singles, single
    results["rows"] = rows
    results["summary"] = {m.name: summarize(rows, m.name) for m in methods}
    results["methods"] = [dataclasses.asdict(m) for m in methods]
    results["grid_samples"] = grid_samples
    results["prediction"] = prediction_agreement(rows)
    cal = [
        json.load(open(os.path.join(f + "-calibrated", "calibration.json")))
        for per in folders.values()
        for f in per.values()
        if os.path.isfile(os.path.join(f + "-calibrated", "calibration.json"))
    ]
    if cal:  # how close calibrate() came to the statistics recorded in training (compare_statistics, "concept")
        results["calibration"] = {
            k: float(np.mean([c[k] for c in cal])) for k in ("relative_error", "overlap", "seconds")
        }
        results["calibration"]["adapters"] = len(cal)
    results["wall_seconds"] = time.perf_counter() - t_start
    return results


def cached_evaluation(bench, method, lr, folders, singles, ctx) -> tuple[list[dict], dict, float]:
    """``evaluate_method``'s rows and sample grid, N by N, from ``<base>/results/`` when evaluated before with the
    same adapters and settings (merge times too); also the seconds the evaluations took when computed."""
    cfg = bench.cfg
    rows, grid, seconds = [], {}, 0.0
    for n in cfg.ns:
        if n > cfg.concepts or (method.merge == "sequential" and n not in cfg.sequential_ns):
            continue
        key = cfg.eval_key(method.family, lr, (*method.options, ("n", n)))
        cached = os.path.join(bench.dir, "results", f"{method.name}-N{n}-{key}.json")
        if not os.path.isfile(cached) and os.environ.get("FIDELITY_CACHED_ONLY"):
            continue  # --cached-only: the docs from what was evaluated before, nothing new measured
        if not os.path.isfile(cached):
            start = time.perf_counter()
            r, g = evaluate_method(
                bench, method, folders, ctx["base_loss"], ctx["base_prior"], singles, ctx["n_max"], ns=(n,)
            )
            saved = {
                "rows": r,
                "grid_samples": {k: {i: x.tolist() for i, x in v.items()} for k, v in g.items()},
                "seconds": time.perf_counter() - start,
            }
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            with open(cached + ".tmp", "w") as f:
                json.dump(saved, f)
            os.replace(cached + ".tmp", cached)
        with open(cached) as f:
            saved = json.load(f)
        rows += saved["rows"]
        grid.update(
            {int(k): {int(i): torch.tensor(x) for i, x in v.items()} for k, v in saved["grid_samples"].items()}
        )
        seconds += saved.get("seconds", math.nan)
    return rows, grid, seconds


def stats_settings(cfg: RunConfig) -> list[tuple[tuple[str, object], ...]]:
    """Every combination of ``cfg.stats_grid`` as merge options; μ = 0 makes the prior target moot (kept once)."""
    import itertools

    grid = dict(cfg.stats_grid)
    first_target = grid.get("prior_target", (None,))[0]
    out = []
    for values in itertools.product(*grid.values()):
        opts = dict(zip(grid, values))
        if opts.get("prior_weight") == 0 and opts.get("prior_target") != first_target:
            continue
        out.append(tuple(opts.items()))
    return out


def choose_setting(trials: list[dict], single_drift: float, allowance: float) -> dict:
    """The rule: of the settings whose prior drift is at most ``allowance`` × the single adapters' own (at N = 1),
    the one with the highest retained improvement; if none is within, the one with the lowest drift. It looks at
    one N only (the tuning set's), so the defaults it picks do not depend on the N they are used at."""
    if not trials:
        raise ValueError("no statistics-merge setting was measured")
    within = [t for t in trials if t["prior_drift"] <= allowance * max(single_drift, 0.0)]
    return max(within, key=lambda t: t["retained"]) if within else min(trials, key=lambda t: t["prior_drift"])


def tune_statistics_merge(bench: Benchmark, base_prior: float, family: str = "lora") -> dict:
    """Choose the statistics merge's settings on the tuning concepts (never merged in the benchmark): train their
    ``family`` adapters (recording statistics), merge all of them (N = 5) with every setting of the grid, measure
    retained improvement, identity and prior drift, and apply ``choose_setting``. Cached with the evaluations."""
    from .methods import Method

    cfg, log = bench.cfg, bench.log
    lr = DEFAULT_LRS[family] if family not in cfg.sweep else bench.tune_lr(family)[0]
    key = cfg.eval_key(family, lr, ("tuning", cfg.stats_tuning, tuple(map(tuple, stats_settings(cfg)))))
    path = os.path.join(bench.dir, "results", f"stats-tuning-{key}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if cfg.stats_tuning == "tuning":
        indices = sorted(TUNING_SET)
        groups = [indices]
    else:
        indices = [c.index for c in bench.concepts]
        groups = subsets(len(indices), min(5, len(indices)))
    folders = {i: bench.train(family, lr, i) for i in indices}
    single = bench.singles(family, folders, base_prior)
    start = time.perf_counter()
    base_loss = {i: bench.loss(bench.base.unet, i) for i in indices}
    single_drift = float(np.mean([v["prior_drift"] for v in single.values()]))
    trials = []
    for opts in stats_settings(cfg):
        method = Method("tuning", family, "compose-regmean", "", opts)
        retained, accs, drifts, seconds = [], [], [], []
        for group in groups:
            unet, s = merge_into(bench.base.unet, method, [folders[i] for i in group])
            if cfg.tuning_identity:
                accs += bench.identity(unet, group)[0]
            retained += [retained_improvement(base_loss[i], bench.loss(unet, i), single[i]["loss"]) for i in group]
            drifts.append(prior_drift(base_prior, bench.prior_loss(unet)))
            seconds.append(s)
        trial = {
            "options": dict(opts),
            "retained": float(np.nanmean(retained)),
            "retained_min": float(np.nanmin(retained)),
            "identity": float(np.mean(accs)) if accs else math.nan,
            "prior_drift": float(np.mean(drifts)),
            "merge_seconds": float(np.median(seconds)),
        }
        trials.append(trial)
        log(
            f"  tuning {dict(opts)}: retained {trial['retained']:.3f}, identity {trial['identity']:.2f}, drift "
            f"{100 * trial['prior_drift']:+.1f} %"
        )
    best = choose_setting(trials, single_drift, cfg.drift_allowance)
    out = {
        "family": family,
        "concepts": indices,
        "tuning_set": cfg.stats_tuning,
        "n": len(groups[0]),
        "single_prior_drift": single_drift,
        "single_identity": float(np.mean([v["identity"] for v in single.values()])),
        "trials": trials,
        "chosen": [list(kv) for kv in best["options"].items()],
        "seconds": time.perf_counter() - start,
    }
    log(f"  statistics merge settings chosen ({cfg.stats_tuning} concepts, N = {len(groups[0])}): {best['options']}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    return out


def _with_cfg(bench: Benchmark, cfg: RunConfig, fn):
    """Run ``fn()`` with ``bench`` training under ``cfg`` (the recipe probe's variants), then restore its own."""
    own = bench.cfg
    bench.cfg = cfg
    try:
        return fn()
    finally:
        bench.cfg = own


def recipe_variant(cfg: RunConfig, recipe) -> RunConfig:
    weight, ratio, steps = recipe[:3]
    return dataclasses.replace(cfg, prior_loss_weight=float(weight), class_ratio=int(ratio), steps=int(steps))


def recipe_of(trial: dict) -> tuple:
    """A probe trial's recipe ``(prior_loss_weight, class_ratio, steps, lr, target)``, typed for comparison."""
    return (
        float(trial["prior_loss_weight"]),
        int(trial["class_ratio"]),
        int(trial["steps"]),
        float(trial["lr"]),
        trial.get("target", "noise"),
    )


def family_recipe(cfg: RunConfig, family: str) -> tuple:
    """The recipe ``family``'s adapters are trained with under ``cfg`` (as :func:`recipe_of` spells it)."""
    return (float(cfg.prior_loss_weight), int(cfg.class_ratio), int(cfg.steps), DEFAULT_LRS[family],
            class_target(family))  # fmt: skip


def probe_recipe(bench: Benchmark, base_prior: float, recipe) -> dict:
    """One DreamBooth recipe ``(prior_loss_weight, class_ratio, steps, lr[, target])`` trained on each of the
    recipe concepts alone: the means of its loss on the concepts' own images, prior drift and identity, and the
    per-concept numbers (cached beside each adapter). Target ``"noise"`` trains family ``lora``, ``"base"``
    ``lora-distill``."""
    weight, ratio, steps, lr = recipe[:4]
    target = recipe[4] if len(recipe) > 4 else "noise"
    family = PROBE_FAMILIES[target]
    variant = recipe_variant(bench.cfg, recipe)
    per = []
    for c in bench.cfg.recipe_concepts:
        folder = _with_cfg(bench, variant, lambda c=c: bench.train(family, float(lr), c))
        path = os.path.join(folder, "probe.json")
        if not os.path.isfile(path):
            single = bench.singles(family, {c: folder}, base_prior)[c]
            with open(os.path.join(folder, "train.json")) as f:
                train = json.load(f)
            one = {
                "concept": c,
                "loss": single["loss"],
                "base_loss": bench.loss(bench.base.unet, c),
                "prior_drift": single["prior_drift"],
                "identity": single["identity"],
                "train_seconds": train["train_seconds"],
            }
            with open(path + ".tmp", "w") as f:
                json.dump(one, f)
            os.replace(path + ".tmp", path)
        with open(path) as f:
            per.append({"concept": c, **json.load(f)})
    out = {
        "prior_loss_weight": float(weight),
        "class_ratio": int(ratio),
        "steps": int(steps),
        "lr": float(lr),
        "target": target,
        "per_concept": per,
    }
    for k in ("loss", "base_loss", "prior_drift", "identity"):
        out[k] = float(np.mean([p[k] for p in per]))
    out["train_seconds"] = float(sum(p["train_seconds"] for p in per))
    return out


def choose_recipe(trials: list[dict], drift_max: float) -> tuple[dict, bool]:
    """The recipe rule: the lowest (mean) loss on the recipe concepts' own images among the trials whose (mean)
    prior drift is at most ``drift_max``; if none is, the lowest drift (second value ``False``)."""
    within = [t for t in trials if t["prior_drift"] <= drift_max]
    if within:
        return min(within, key=lambda t: t["loss"]), True
    return min(trials, key=lambda t: t["prior_drift"]), False


def no_prior_comparison(bench: Benchmark, base_prior: float, single: dict, family: str = "lora") -> list[dict]:
    """Single adapters of ``cfg.no_prior_concepts`` trained with the same recipe but without prior preservation:
    their prior drift next to the prior-preserved adapter's (``single``: the family's single measurements)."""
    variant = dataclasses.replace(bench.cfg, prior_preservation=False)
    lr = DEFAULT_LRS[family]
    out = []
    for i in bench.cfg.no_prior_concepts:
        folder = _with_cfg(bench, variant, lambda i=i: bench.train(family, lr, i))
        alone = _with_cfg(bench, variant, lambda folder=folder, i=i: bench.singles(family, {i: folder}, base_prior))
        out.append(
            {
                "concept": i,
                "with": single[i]["prior_drift"],
                "without": alone[i]["prior_drift"],
                "identity_with": single[i]["identity"],
                "identity_without": alone[i]["identity"],
            }
        )
    return out


def prediction_agreement(rows: list[dict]) -> dict:
    """Spearman rank correlation between the merge report's predicted retention and the measured retained
    improvement over every (concept, N > 1) evaluation: per method that predicts, over the statistics merges
    together (``"statistics"``) and over every predicting method together (``"all"``)."""
    from scipy.stats import spearmanr

    out = {}
    pairs = [r for r in rows if r.get("predicted") is not None and r["n"] > 1 and not math.isnan(r["retained"])]
    groups = {name: [r for r in pairs if r["method"] == name] for name in dict.fromkeys(r["method"] for r in pairs)}
    groups["statistics"] = [r for r in pairs if "-stats" in r["method"]]
    groups["all"] = pairs
    for name, rs in groups.items():
        if len(rs) >= 3:
            rho = spearmanr([r["predicted"] for r in rs], [r["retained"] for r in rs]).statistic
            out[name] = {"spearman": float(rho), "pairs": len(rs)}
    return out


# Merges whose result for one adapter is that adapter exactly.
WEIGHT_SPACE_MERGES = ("compose-sum", "compose-avg", "compose-exact", "peft-ties", "peft-svd", "soda-sum")


def evaluate_method(bench, method, folders, base_loss, base_prior, singles, n_max, ns=None) -> tuple[list[dict], dict]:
    """Every merge of ``method`` (each N, each subset): rows of measurements (with the merge report's predicted
    retention where it gives one) and one sample per concept and N for the figures."""
    cfg, rows, grid = bench.cfg, [], {}
    family = folders[method.family]
    if method.merge == "compose-regmean-calibrated":
        family = {i: bench.calibrated(f, i) for i, f in family.items()}
    for n in cfg.ns if ns is None else ns:
        if n > cfg.concepts or (method.merge == "sequential" and n not in cfg.sequential_ns):
            continue
        if n == 1 and method.merge in WEIGHT_SPACE_MERGES:
            # A weight-space merge of one adapter is that adapter (weight 1; peft turns one adapter into "linear"):
            # its row is the single adapter's measurement, taken once per family.
            for i in range(cfg.concepts):
                one = bench._singles[family[i]]
                rows.append(
                    {
                        "method": method.name,
                        "n": 1,
                        "subset": [i],
                        "concept": i,
                        "merged_loss": one["loss"],
                        "retained": retained_improvement(base_loss[i], one["loss"], singles[method.family][i]),
                        "identity": one["identity"],
                        "prior_drift": one["prior_drift"],
                        "merge_seconds": one["merge_seconds"],
                        "predicted": None,
                    }
                )
                grid.setdefault(1, {})[i] = bench._single_images[family[i]]
            continue
        for subset in subsets(cfg.concepts, n):
            calibration, info = None, {}
            if method.merge == "sequential":
                # Noised training images (the concept's and class images), and/or each adapter's own sampling
                # trajectory; "prompts_only": what a user with nothing but each adapter's prompt has.
                opts = dict(method.options)
                k, prompts_only = opts.get("trajectory_samples", 0), opts.get("prompts_only", False)
                calibration = (
                    [
                        ([] if prompts_only else bench.calibration_batches(i))
                        + ([bench.trajectory_batch(family[i], i, k)] if k else [])
                        for i in subset
                    ],
                    [bench.prior_trajectory_batch()] if prompts_only else bench.calibration_batches(0, prior=True),
                )
            unet, seconds = merge_into(
                bench.base.unet, method, [family[i] for i in subset], calibration=calibration, info=info
            )
            predicted = predicted_retention(info.get("merged"), n)
            drift = prior_drift(base_prior, bench.prior_loss(unet))
            accs, imgs = bench.identity(unet, subset)
            for k, (i, acc, img) in enumerate(zip(subset, accs, imgs)):
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
                        "predicted": None if predicted is None else predicted[k],
                    }
                )
                grid.setdefault(n, {})[i] = img[0]
    return rows, grid


def predicted_retention(merged, n: int) -> list[float] | None:
    """Per adapter of the merge (in its order), the retention the merge report predicts before generating
    (``None`` when the merge makes no such prediction: no statistics)."""
    concepts = getattr(getattr(merged, "report", None), "concepts", None) if merged is not None else None
    if not concepts:
        return None
    names = [a.name for a in merged.adapters]
    if len(names) != n or any(name not in concepts for name in names):
        raise ValueError(f"the report predicts {sorted(concepts)} for a merge of {names}")
    return [float(concepts[name]["retention"]) for name in names]


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
    """Figures into ``docs_dir`` (``fidelity_*.png``, one sample grid per method under ``fidelity_samples/``) and
    the fidelity section of ``docs_dir/benchmarks.md``."""
    from .report import markdown, save_base_grid, save_concept_grid, save_method_grid, save_plot

    labels = {m["name"]: m["label"] for m in results["methods"]}
    save_base_grid(results["base_samples"], os.path.join(docs_dir, "fidelity_base_samples.png"))
    save_plot(results["summary"], labels, os.path.join(docs_dir, "fidelity_retained.png"))
    n_max = max(n for n in results["config"]["ns"] if n <= results["config"]["concepts"])
    save_concept_grid(
        bench_concepts, results["grid_samples"], list(labels), n_max, os.path.join(docs_dir, "fidelity_concepts.png")
    )
    os.makedirs(os.path.join(docs_dir, "fidelity_samples"), exist_ok=True)
    for name in labels:
        per_n = {n: g for (m, n), g in results["grid_samples"].items() if m == name}
        if per_n:
            path = os.path.join(docs_dir, "fidelity_samples", f"{name}.png")
            save_method_grid(bench_concepts, per_n, labels[name], path)
    text = markdown(results, labels, command)
    write_section(os.path.join(docs_dir, "benchmarks.md"), START, END, text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 concepts, N = 1, 2, 5, smaller budget (< 5 min)")
    parser.add_argument("--methods", nargs="+", help="subset of methods (default: all available)")
    parser.add_argument("--ns", nargs="+", type=int, help="the N to measure (default: the mode's)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE)
    parser.add_argument("--docs", action="store_true", help="write docs/ (default for the full run)")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/")
    parser.add_argument("--note", default="", help="a sentence appended to the docs section (e.g. what was left out)")
    parser.add_argument("--note-file", help="a markdown file appended to the docs section (after --note)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--train-only", metavar="FAMILY", help="train FAMILY's adapters (--concepts) and exit")
    parser.add_argument("--concepts", nargs="+", type=int, help="with --train-only: which concepts")
    parser.add_argument(
        "--probe-only", nargs="*", type=int, metavar="K", help="train and measure recipe K of the probe"
    )
    parser.add_argument(
        "--cached-only", action="store_true", help="report only the (method, N) evaluations already in the cache"
    )
    args = parser.parse_args(argv)
    if args.cached_only:
        os.environ["FIDELITY_CACHED_ONLY"] = "1"
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = QUICK if args.quick else FULL
    if args.methods:
        cfg = dataclasses.replace(cfg, methods=tuple(args.methods))
    if args.ns:
        cfg = dataclasses.replace(cfg, ns=tuple(args.ns))
    if args.train_only or args.probe_only is not None:  # parallel preparation: fill the cache, measure nothing else
        bench = Benchmark(cfg, args.cache_dir)
        for d in range(10):
            bench.class_pool(d)
        base_prior = bench.prior_loss(bench.base.unet)
        for k in args.probe_only or []:
            print(probe_recipe(bench, base_prior, cfg.recipe_grid[k]))
        if args.train_only:
            lr = DEFAULT_LRS[args.train_only]
            for i in args.concepts if args.concepts is not None else range(cfg.concepts):
                if i in cfg.no_prior_concepts and args.train_only == "lora":
                    _with_cfg(bench, dataclasses.replace(cfg, prior_preservation=False),
                              lambda i=i: bench.train(args.train_only, lr, i))  # fmt: skip
                bench.train(args.train_only, lr, i)
        return {"prepared": True}
    results = run(cfg, args.cache_dir)
    print(f"wall time {results['wall_seconds']:.0f} s")
    if (args.docs or not args.quick) and not args.no_docs:
        command = "python -m studies.fidelity.run" + (" --quick" if args.quick else "")
        command += (" --methods " + " ".join(args.methods)) if args.methods else ""
        command += (" --ns " + " ".join(map(str, args.ns))) if args.ns else ""
        command += " --cached-only" if args.cached_only else ""
        results["note"] = args.note
        # The docs' hand-written part (rows of earlier instruments kept for reference) lives beside the code, so a
        # rerun from the cache regenerates the whole section.
        note_file = args.note_file or (NOTES if not args.quick and os.path.isfile(NOTES) else None)
        if note_file:
            with open(note_file) as f:
                results["note"] = (args.note + "\n\n" + f.read()).strip()
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
