"""How each method trains a concept's adapter and how it merges N of them into the base UNet.

Training *families* (one adapter per concept and family, same budget for all: steps, batch, rank):

- ``lora``: peft ``LoraConfig`` (A and B trained);
- ``<family>-distill`` (``lora-distill``, ``ortho-disjoint-distill``): as ``<family>``, but the prior-preservation
  term regresses the class predictions onto the frozen base's own prediction on the same noised class image instead
  of onto the added noise (prior preservation as distillation; ``examples/train_dreambooth.py
  --prior_loss_target base``);
- ``ortho-random``: ``OrthoLoraConfig(slot="random")``: each concept draws its own ``r`` random basis rows (drawn
  from a seeded RNG per concept so reruns are identical; the paper's behaviour);
- ``ortho-disjoint``: ``OrthoLoraConfig(slot=i)``: concept ``i`` owns rows ``[i·r, (i+1)·r)``;
- ``ortho-disjoint-erasure``: as above, trained with Randomized Output Erasure (``peft_ortho.erasure``);
- ``block``: ``BlockLoraConfig(block_index=i)`` (output-channel blocks);
- ``block-erasure``: as above, trained with Randomized Output Erasure: BlockLoRA as its paper describes it (blockwise
  parameterization *and* erasure);
- ``soda``: ``SodaConfig`` (spectrum + Kronecker rotation).

Merge *methods* (what the benchmark reports), each mapping a family's adapter folders to a fused UNet:

- ``lora-sum`` / ``lora-avg``: ``compose(method="linear")`` with weights 1 / ``1/N`` (exact sum of the deltas);
- ``peft-ties`` / ``peft-svd``: the adapters loaded into one ``PeftModel`` and combined by peft's
  ``add_weighted_adapter`` (weights 1; ``ties`` with density 0.5 acts on the A and B factors separately, ``svd``
  truncates the summed delta to peft's default rank, the adapters' rank ``r``), then ``merge_and_unload``;
- ``ortho-random``, ``ortho-disjoint``, ``ortho-disjoint-erasure``, ``block``, ``block-erasure``: ``compose``
  (``method="linear"``, weights 1: the stacked factors, exact) + ``fuse``;
- ``soda``: the adapters loaded as named adapters, all active, ``merge_and_unload`` (sum of ``W_i − W0``);
- ``*-stats``: ``compose(method="regmean")`` (the statistics merge) on the statistics each adapter recorded in
  training; ``lora-stats-calibrated`` on statistics computed by ``peft_ortho.statistics.calibrate`` from the concept
  prompt alone; ``lora-sequential``: the sequential output-matching merge on calibration batches.
"""

from __future__ import annotations

import copy
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import peft_ortho

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ERASURE_P = 0.5  # half the samples erased: the concept prompt differs from the class prompt by one token only


@dataclass(frozen=True)
class Method:
    """A merge method: which family's adapters it merges and how."""

    name: str
    family: str
    # "compose-sum", "compose-avg", "compose-exact", "peft-ties", "peft-svd", "soda-sum", "compose-regmean" (the
    # statistics merge on the statistics each adapter recorded while training), "compose-regmean-calibrated" (on
    # statistics computed from the concept prompt alone, as for a third-party file), "sequential"
    merge: str
    label: str
    options: tuple[tuple[str, object], ...] = ()  # keyword arguments of the merge (e.g. prior_weight, ridge)

    @property
    def uses_statistics(self) -> bool:
        return self.merge.startswith("compose-regmean")


ALL_METHODS = [
    Method("lora-sum", "lora", "compose-sum", "LoRA, sum"),
    Method("lora-avg", "lora", "compose-avg", "LoRA, average"),
    Method("peft-ties", "lora", "peft-ties", "LoRA, peft ties"),
    Method("peft-svd", "lora", "peft-svd", "LoRA, peft svd"),
    Method("ortho-random", "ortho-random", "compose-exact", "orthogonal, random slots"),
    Method("ortho-disjoint", "ortho-disjoint", "compose-exact", "orthogonal, disjoint slots"),
    Method("ortho-disjoint-erasure", "ortho-disjoint-erasure", "compose-exact", "orthogonal, disjoint + erasure"),
    Method("block", "block", "compose-exact", "BlockLoRA (blocks only)"),
    Method("block-erasure", "block-erasure", "compose-exact", "BlockLoRA + erasure"),
    Method("soda", "soda", "soda-sum", "SODA"),
    # The statistics merge (compose(method="regmean")) on the same adapters; its settings (prior weight μ, ridge λ,
    # prior target) are chosen on the tuning concepts (run.tune_statistics_merge) and filled in by the run.
    Method("lora-stats", "lora", "compose-regmean", "LoRA, statistics merge"),
    Method("lora-stats-calibrated", "lora", "compose-regmean-calibrated", "LoRA, statistics merge (calibrated)"),
    Method("lora-distill-avg", "lora-distill", "compose-avg", "LoRA (distilled prior), average"),
    Method("lora-distill-stats", "lora-distill", "compose-regmean", "LoRA (distilled prior), statistics merge"),
    Method(
        "ortho-disjoint-distill", "ortho-disjoint-distill", "compose-exact", "orthogonal disjoint (distilled prior)"
    ),
    Method(
        "ortho-disjoint-distill-stats",
        "ortho-disjoint-distill",
        "compose-regmean",
        "orthogonal disjoint (distilled prior), statistics merge",
    ),
    Method("ortho-disjoint-stats", "ortho-disjoint", "compose-regmean", "orthogonal disjoint, statistics merge"),
    Method("block-stats", "block", "compose-regmean", "BlockLoRA, statistics merge"),
    Method(
        "ortho-disjoint-erasure-stats",
        "ortho-disjoint-erasure",
        "compose-regmean",
        "orthogonal disjoint + erasure, statistics merge",
    ),
    Method("block-erasure-stats", "block-erasure", "compose-regmean", "BlockLoRA + erasure, statistics merge"),
    # The sequential merge (compose(method="sequential")): inputs re-measured layer by layer through the partly
    # merged model, on calibration batches of each concept (its images noised, under its prompt and the empty one)
    # and ordinary batches (class images under class prompts, weight μ). Settings fixed here, not tuned: μ and λ as
    # the statistics merge's chosen ones; the refined variant adds end-to-end output-matching Adam steps.
    Method(
        "lora-sequential",
        "lora",
        "sequential",
        "LoRA, sequential output matching",
        (("prior_weight", 0.3), ("ridge", 1e-3)),
    ),
    Method(
        "lora-sequential-refine",
        "lora",
        "sequential",
        "LoRA, sequential + 50 refine steps",
        (("prior_weight", 0.3), ("ridge", 1e-3), ("refine_steps", 50)),
    ),
    Method(
        "lora-distill-sequential-refine",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential + 50 refine steps",
        (("prior_weight", 0.3), ("ridge", 1e-3), ("refine_steps", 50)),
    ),
    Method(
        "lora-distill-sequential-refine150",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential + 150 refine steps",
        (("prior_weight", 0.3), ("ridge", 1e-3), ("refine_steps", 150)),
    ),
    Method(
        "lora-distill-sequential-mu1-refine150",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential (μ = 1) + 150 refine steps",
        (("prior_weight", 1.0), ("ridge", 1e-3), ("refine_steps", 150)),
    ),
    Method(
        "lora-distill-sequential-mu1-refine150-lr3e-3",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential (μ = 1) + 150 refine steps at lr 3e-3",
        (("prior_weight", 1.0), ("ridge", 1e-3), ("refine_steps", 150), ("refine_lr", 3e-3)),
    ),
    Method(
        "lora-distill-sequential-mu1-refine150-lr1e-2",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential (μ = 1) + 150 refine steps at lr 1e-2",
        (("prior_weight", 1.0), ("ridge", 1e-3), ("refine_steps", 150), ("refine_lr", 1e-2)),
    ),
    Method(
        "lora-distill-sequential-mu1-refine150-balanced",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential (μ = 1) + 150 balanced refine steps",
        (("prior_weight", 1.0), ("ridge", 1e-3), ("refine_steps", 150), ("refine_balance", True)),
    ),
    # Calibration along each single model's own sampling trajectory (``trajectory_samples`` images of its concept,
    # DDIM with guidance, both halves of every step, from noises the identity measurement never uses) on top of the
    # noised-image batches: what the sampler feeds the model, where the noised training images do not reach.
    Method(
        "lora-distill-sequential-mu1-refine150-trajectory",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential (μ = 1) + 150 refine steps, trajectory calibration",
        (("prior_weight", 1.0), ("ridge", 1e-3), ("refine_steps", 150), ("trajectory_samples", 2)),
    ),
    Method(
        "lora-distill-sequential-mu4-refine150-trajectory",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential (μ = 4) + 150 refine steps, trajectory calibration",
        (("prior_weight", 4.0), ("ridge", 1e-3), ("refine_steps", 150), ("trajectory_samples", 2)),
    ),
    Method(
        "lora-distill-sequential-mu1-refine150-trajectory8",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential (μ = 1) + 150 refine steps, trajectory calibration (8 images)",
        (("prior_weight", 1.0), ("ridge", 1e-3), ("refine_steps", 150), ("trajectory_samples", 8)),
    ),
    Method(
        "lora-distill-sequential-mu1-refine300-trajectory",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential (μ = 1) + 300 refine steps, trajectory calibration",
        (("prior_weight", 1.0), ("ridge", 1e-3), ("refine_steps", 300), ("trajectory_samples", 2)),
    ),
    Method(
        "lora-distill-sequential-mu1-refine300-trajectory8",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential (μ = 1) + 300 refine steps, trajectory calibration (8 images)",
        (("prior_weight", 1.0), ("ridge", 1e-3), ("refine_steps", 300), ("trajectory_samples", 8)),
    ),
    # Prompts only, as for third-party files (compose(method="sequential", calibrate=pipe, prompts=...)): each
    # adapter's own sampling trajectory (4 images) and, as ordinary inputs, the base's sampling of the class prompts.
    Method(
        "lora-distill-sequential-mu1-refine150-prompts",
        "lora-distill",
        "sequential",
        "LoRA (distilled prior), sequential (μ = 1) + 150 refine steps, prompts only",
        (
            ("prior_weight", 1.0),
            ("ridge", 1e-3),
            ("refine_steps", 150),
            ("trajectory_samples", 4),
            ("prompts_only", True),
        ),
    ),
    Method(
        "lora-sequential-refine150",
        "lora",
        "sequential",
        "LoRA, sequential (μ = 1) + 150 refine steps",
        (("prior_weight", 1.0), ("ridge", 1e-3), ("refine_steps", 150)),
    ),
    Method(
        "lora-sequential-mu1",
        "lora",
        "sequential",
        "LoRA, sequential, μ = 1",
        (("prior_weight", 1.0), ("ridge", 1e-3)),
    ),
]


def merge_available(merge: str) -> bool:
    """Whether this checkout has the merge (the statistics and sequential merges land separately)."""
    if merge.startswith("compose-regmean"):
        from peft_ortho.merging import merge as compose_merge

        ok = hasattr(peft_ortho, "InputStatistics") and "regmean" in getattr(compose_merge, "METHODS", ())
        if merge.endswith("-calibrated"):
            from peft_ortho import statistics

            ok = ok and hasattr(statistics, "calibrate")
        return ok
    if merge == "sequential":
        try:
            from peft_ortho.merging.sequential import sequential_merge  # noqa: F401
        except ImportError:
            return False
    return True


def family_available(family: str) -> bool:
    """Whether this checkout has what the family needs (BlockLoRA, SODA and erasure land separately)."""
    if family.startswith("block") and not hasattr(peft_ortho, "BlockLoraConfig"):
        return False
    if family == "soda":
        return hasattr(peft_ortho, "SodaConfig")
    if family.endswith("-erasure"):
        try:
            from peft_ortho.erasure import OutputErasure  # noqa: F401
        except ImportError:
            return False
    return True


def available_methods(names: list[str] | None = None) -> list[Method]:
    """The methods this checkout can run: all, or those named, in the order named."""
    by_name = {m.name: m for m in ALL_METHODS}
    unknown = [n for n in names or [] if n not in by_name]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(by_name)}")
    chosen = ALL_METHODS if names is None else [by_name[n] for n in names]
    return [m for m in chosen if family_available(m.family) and merge_available(m.merge)]


def _random_basis_rows(unet, rank: int, seed: int) -> dict[str, list[int]]:
    """``slot="random"`` rows drawn from a seeded RNG, one draw per input width (as the tuner would draw them)."""
    from peft_ortho import bases

    widths = sorted(
        {
            m.in_features
            for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(tuple(TARGETS))
        }
    )
    rng = random.Random(seed)
    return {bases.shape_key(n, rank): bases.random_rows(n, rank, rng) for n in widths}


def peft_config(family: str, index: int, rank: int, unet, num_blocks: int = 16):
    """The peft config concept ``index`` trains with in ``family`` (rank ``r``, ``lora_alpha = r``: scale 1)."""
    from peft import LoraConfig

    family = family.removesuffix("-distill")  # a training recipe, not another adapter
    if family == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)
    if family == "ortho-random":
        return peft_ortho.OrthoLoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=TARGETS,
            slot="random",
            basis_rows=_random_basis_rows(unet, rank, seed=1000 + index),
        )
    if family in ("ortho-disjoint", "ortho-disjoint-erasure"):
        return peft_ortho.OrthoLoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, slot=index)
    if family in ("block", "block-erasure"):
        return peft_ortho.BlockLoraConfig(
            r=rank, lora_alpha=rank, target_modules=TARGETS, num_blocks=num_blocks, block_axis="out", block_index=index
        )
    if family == "soda":
        return peft_ortho.SodaConfig(target_modules=TARGETS, decomposition="svd", rotation="cayley")
    raise ValueError(f"unknown family {family!r}")


def dreambooth_batch(
    instance: torch.Tensor,
    class_pool: tuple[torch.Tensor, list[str]] | None,
    g: torch.Generator,
    n_prior: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """One DreamBooth step's images: the instance images and as many class images drawn from ``class_pool``.

    Args:
        instance: ``(n, 1, S, S)``, the concept's images (each repeated as the budget says).
        class_pool: ``(images, prompts)``: ``m ≥ n`` class images ``(m, 1, S, S)`` and the class prompt of each, or
            ``None`` (no prior preservation).
        g: the training generator (draws the class images without replacement within a step).
        n_prior: class images per step (default: as many as instance images, diffusers' recipe).

    Returns:
        ``(instance, prior, prior_prompts)``: ``prior`` is ``(n, 1, S, S)`` class images with their ``n`` prompts
        (``None`` and ``[]`` without a pool). As in diffusers' ``train_dreambooth --with_prior_preservation`` every
        batch holds both halves, the instance half under the concept prompt and the prior half under class prompts.
    """
    if class_pool is None:
        return instance, None, []
    images, prompts = class_pool
    k = len(instance) if n_prior is None else n_prior
    if len(images) != len(prompts):
        raise ValueError(f"class pool: {len(images)} images but {len(prompts)} prompts")
    if len(images) < k:
        raise ValueError(f"{len(images)} class images cannot fill a prior half of {k}")
    pick = torch.randperm(len(images), generator=g)[:k]
    return instance, images[pick], [prompts[k] for k in pick.tolist()]


# Families whose adapters the statistics merge reads (SODA rotates the whole weight and random slots are measured
# for the exact merge only, so those record nothing and their training does not wait for the recorder).
STATISTICS_FAMILIES = ("lora", "ortho-disjoint", "ortho-disjoint-erasure", "block", "block-erasure")


# The LoRA family each prior-preservation target trains (the recipe probe's families).
PROBE_FAMILIES = {"noise": "lora", "base": "lora-distill"}


def class_target(family: str) -> str:
    """What ``family``'s prior-preservation term regresses the class predictions onto (``train_adapter``)."""
    return "base" if family.endswith("-distill") else "noise"


def records_statistics(family: str) -> bool:
    """Whether ``family``'s adapters record input statistics in this checkout (the statistics merge reads them)."""
    return family.removesuffix("-distill") in STATISTICS_FAMILIES and hasattr(peft_ortho, "InputStatistics")


def statistics_recorder(model):
    """The product's recorder ``peft_ortho.InputStatistics(model)`` when this checkout has it, else ``None``."""
    cls = getattr(peft_ortho, "InputStatistics", None)
    return None if cls is None else cls(model)


def train_adapter(
    base,
    concept,
    family: str,
    *,
    rank: int,
    steps: int,
    lr: float,
    repeats: int,
    seed: int,
    out_dir: str,
    erasure_prompts: list[str] | None = None,
    num_blocks: int = 16,
    class_images: tuple[torch.Tensor, list[str]] | None = None,
    prior_loss_weight: float = 1.0,
    class_ratio: int = 1,
    class_target: str = "noise",
    record_statistics: bool = True,
) -> dict:
    """Train concept's adapter on its images with the noise-prediction loss, save it (peft folder), return stats.

    Each step sees every concept image ``repeats`` times at random timesteps and noises (Adam, constant ``lr``).
    With ``class_images`` (DreamBooth prior preservation: ``(images, prompts)``) every step also holds as many class
    images (``class_ratio`` × as many) under their class prompts, and the loss is ``L_instance + prior_loss_weight · L_prior`` (diffusers'
    ``train_dreambooth --with_prior_preservation``). ``class_target``: what ``L_prior`` regresses the class
    predictions onto, ``"noise"`` (the added noise, diffusers' recipe) or ``"base"`` (the frozen base's own
    prediction on the same noised class image: prior preservation as distillation, no sampling noise in the target). The ``-erasure`` family swaps a fraction of the instance
    prompts for foreign ones (``erasure_prompts``) and pulls those predictions onto the frozen base's
    (``peft_ortho.erasure.OutputErasure``).

    With ``record_statistics`` and a checkout that has ``peft_ortho.InputStatistics``, the adapter's input
    statistics are recorded during training and saved beside it: the instance half as ``"concept"``, the class half
    and erased samples as ``"prior"`` and the instance images under the empty prompt (what classifier-free guidance
    feeds the model; one extra forward without autograd) as ``"unconditional"``.
    """
    from contextlib import nullcontext

    from peft import get_peft_model

    from peft_ortho._io import atomic_dir
    from peft_ortho.erasure import adapters_disabled

    unet = copy.deepcopy(base.unet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(unet, peft_config(family, concept.index, rank, unet, num_blocks))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed * 7919 + concept.index)
    x_inst = concept.images.repeat(repeats, 1, 1, 1)
    n = len(x_inst)
    erasure = None
    if family.endswith("-erasure"):
        from peft_ortho.erasure import OutputErasure

        erasure = OutputErasure(p=ERASURE_P, weight=1.0, foreign_prompts=erasure_prompts, seed=seed + concept.index)
    stats = statistics_recorder(model) if record_statistics else None

    def record(kind: str):
        return stats.record(kind) if stats is not None else nullcontext()

    prompts, text = [concept.prompt] * n, {}

    def encode(ps: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(ps) if p not in text]
        if missing:
            for p, s in zip(missing, base.encode(missing)):
                text[p] = s
        return torch.stack([text[p] for p in ps])

    def noised(x0: torch.Tensor):
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(base.scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        return base.scheduler.add_noise(x0, noise, t), t, noise

    model.train()
    start, losses, prior_losses = time.perf_counter(), [], []
    for _ in range(steps):
        x0, x_prior, prior_prompts = dreambooth_batch(x_inst, class_images, g, class_ratio * n)
        x_t, t, noise = noised(x0)
        if erasure is None:
            with record("concept"):
                loss = F.mse_loss(model(x_t, t, encode(prompts)).sample, noise)
        else:
            step_prompts, erased = erasure.swap(prompts)
            states = encode(step_prompts)
            kept = ~erased
            pred = torch.empty_like(noise)
            # Kept samples are the concept's inputs; erased ones (foreign prompts, pulled onto the base) are
            # ordinary inputs on which the adapter must do nothing, i.e. prior.
            for mask, kind in ((kept, "concept"), (erased, "prior")):
                if mask.any():
                    with record(kind):
                        pred[mask] = model(x_t[mask], t[mask], states[mask]).sample
            # The teacher runs now, inside this iteration: bind the batch explicitly (default args).
            teacher = erasure.teacher(
                model, lambda x=x_t[erased], tt=t[erased], s=states[erased]: model(x, tt, s).sample
            )
            loss = erasure.loss(pred, noise, erased, teacher)
        if stats is not None:
            with torch.no_grad(), record("unconditional"):
                model(x_t, t, encode([""] * n))
        if x_prior is not None:
            xp_t, tp, noise_p = noised(x_prior)
            states_p = encode(prior_prompts)
            if class_target == "base":
                with torch.no_grad(), adapters_disabled(model):
                    noise_p = model(xp_t, tp, states_p).sample
            with record("prior"):
                prior = F.mse_loss(model(xp_t, tp, states_p).sample, noise_p)
            loss = loss + prior_loss_weight * prior
            prior_losses.append(prior.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        if stats is not None:
            stats.save_pretrained(tmp)
    out = {"train_seconds": seconds, "final_loss": sum(losses[-20:]) / len(losses[-20:])}
    if prior_losses:
        out["final_prior_loss"] = sum(prior_losses[-20:]) / len(prior_losses[-20:])
    out["statistics"] = stats is not None
    return out


def _quiet(fn: Callable):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collision warnings of random slots are expected and measured here
        return fn()


def merge_into(
    base_unet, method: Method, folders: list[str], *, calibration=None, info: dict | None = None
) -> tuple[torch.nn.Module, float]:
    """A copy of ``base_unet`` with the adapters in ``folders`` merged into its weights, and the merge time in
    seconds (from the folders on disk to fused weights: reading, checking, combining and fusing; the copy of the
    base UNet is not timed).

    ``calibration`` (``"sequential"`` only): ``(inputs, prior)``, per folder a list of UNet batches
    ``(x_t, t, text states)`` and a list of ordinary batches. ``info``: filled with the merge's report
    (``"report"``) when the merge makes one.
    """
    unet = copy.deepcopy(base_unet)
    n = len(folders)
    options = dict(method.options)
    for study_option in ("trajectory_samples", "prompts_only"):  # the study's calibration batches, not arguments
        options.pop(study_option, None)
    start = time.perf_counter()
    if method.merge.startswith("compose-"):
        from peft_ortho import compose

        weights = [1.0 / n] * n if method.merge == "compose-avg" else [1.0] * n
        # The exact rows ask for "linear" (stacked factors) by name: "auto" would pick the statistics merge for
        # adapters that carry statistics, and every adapter of a statistics family records them.
        kind = "regmean" if method.uses_statistics else "linear"
        merged = _quiet(lambda: compose(folders, weights=weights, method=kind, progress=False, **options))
        merged.fuse(unet)
        if info is not None:
            info["merged"] = merged
    elif method.merge == "sequential":
        from peft_ortho import compose

        inputs, prior = calibration
        merged = _quiet(
            lambda: compose(
                folders,
                method="sequential",
                calibrate=base_unet,
                inputs=list(inputs),  # in the folders' order
                prior_inputs=prior,
                progress=False,
                **options,
            )
        )
        merged.fuse(unet)
    else:
        from peft import PeftModel

        names = [f"c{k}" for k in range(n)]
        model = _quiet(lambda: PeftModel.from_pretrained(unet, folders[0], adapter_name=names[0]))
        for name, folder in zip(names[1:], folders[1:]):
            _quiet(lambda name=name, folder=folder: model.load_adapter(folder, adapter_name=name))
        if method.merge in ("peft-ties", "peft-svd"):
            kind = method.merge.removeprefix("peft-")
            model.add_weighted_adapter(names, [1.0] * n, "merged", combination_type=kind, density=0.5)
            model.set_adapter("merged")
        elif method.merge == "soda-sum":
            model.base_model.set_adapter(names)
        else:
            raise ValueError(f"unknown merge {method.merge!r}")
        unet = model.merge_and_unload()
    return unet.eval(), time.perf_counter() - start
