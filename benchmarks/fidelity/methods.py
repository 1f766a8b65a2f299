"""How each method trains a concept's adapter and how it merges N of them into the base UNet.

Training *families* (one adapter per concept and family, same budget for all: steps, batch, rank):

- ``lora``: peft ``LoraConfig`` (A and B trained);
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
- ``ortho-random``, ``ortho-disjoint``, ``ortho-disjoint-erasure``, ``block``, ``block-erasure``: ``compose`` (``method="auto"``,
  weights 1: the stacked factors, exact) + ``fuse``;
- ``soda``: the adapters loaded as named adapters, all active, ``merge_and_unload`` (sum of ``W_i − W0``).
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
    merge: str  # "compose-sum", "compose-avg", "compose-auto", "peft-ties", "peft-svd", "soda-sum"
    label: str


ALL_METHODS = [
    Method("lora-sum", "lora", "compose-sum", "LoRA, sum"),
    Method("lora-avg", "lora", "compose-avg", "LoRA, average"),
    Method("peft-ties", "lora", "peft-ties", "LoRA, peft ties"),
    Method("peft-svd", "lora", "peft-svd", "LoRA, peft svd"),
    Method("ortho-random", "ortho-random", "compose-auto", "orthogonal, random slots"),
    Method("ortho-disjoint", "ortho-disjoint", "compose-auto", "orthogonal, disjoint slots"),
    Method("ortho-disjoint-erasure", "ortho-disjoint-erasure", "compose-auto", "orthogonal, disjoint + erasure"),
    Method("block", "block", "compose-auto", "BlockLoRA (blocks only)"),
    Method("block-erasure", "block-erasure", "compose-auto", "BlockLoRA + erasure"),
    Method("soda", "soda", "soda-sum", "SODA"),
]


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
    return [m for m in ALL_METHODS if (names is None or m.name in names) and family_available(m.family)]


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
) -> dict:
    """Train concept's adapter on its images with the noise-prediction loss, save it (peft folder), return stats.

    Each step sees every concept image ``repeats`` times at random timesteps and noises (Adam, constant ``lr``).
    The ``-erasure`` family swaps a fraction of the prompts for foreign ones (``erasure_prompts``) and pulls those
    predictions onto the frozen base's (``peft_ortho.erasure.OutputErasure``).
    """
    from peft import get_peft_model

    from peft_ortho._io import atomic_dir

    unet = copy.deepcopy(base.unet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(unet, peft_config(family, concept.index, rank, unet, num_blocks))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed * 7919 + concept.index)
    x0 = concept.images.repeat(repeats, 1, 1, 1)
    n = len(x0)
    erasure = None
    if family.endswith("-erasure"):
        from peft_ortho.erasure import OutputErasure

        erasure = OutputErasure(p=ERASURE_P, weight=1.0, foreign_prompts=erasure_prompts, seed=seed + concept.index)
    prompts, text = [concept.prompt] * n, {}

    def encode(ps: list[str]) -> torch.Tensor:
        missing = [p for p in set(ps) if p not in text]
        if missing:
            for p, s in zip(missing, base.encode(missing)):
                text[p] = s
        return torch.stack([text[p] for p in ps])

    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(base.scheduler.config.num_train_timesteps, (n,), generator=g)
        x_t = base.scheduler.add_noise(x0, noise, t)
        if erasure is None:
            loss = F.mse_loss(model(x_t, t, encode(prompts)).sample, noise)
        else:
            step_prompts, erased = erasure.swap(prompts)
            states = encode(step_prompts)
            pred = model(x_t, t, states).sample
            # The teacher runs now, inside this iteration: bind the batch explicitly (default args).
            teacher = erasure.teacher(
                model, lambda x=x_t[erased], tt=t[erased], s=states[erased]: model(x, tt, s).sample
            )
            loss = erasure.loss(pred, noise, erased, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
    return {"train_seconds": seconds, "final_loss": sum(losses[-20:]) / len(losses[-20:])}


def _quiet(fn: Callable):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collision warnings of random slots are expected and measured here
        return fn()


def merge_into(base_unet, method: Method, folders: list[str]) -> tuple[torch.nn.Module, float]:
    """A copy of ``base_unet`` with the adapters in ``folders`` merged into its weights, and the merge time in
    seconds (from the folders on disk to fused weights: reading, checking, combining and fusing; the copy of the
    base UNet is not timed)."""
    unet = copy.deepcopy(base_unet)
    n = len(folders)
    start = time.perf_counter()
    if method.merge.startswith("compose-"):
        from peft_ortho import compose

        weights = [1.0 / n] * n if method.merge == "compose-avg" else [1.0] * n
        kind = "auto" if method.merge == "compose-auto" else "linear"
        merged = _quiet(lambda: compose(folders, weights=weights, method=kind, progress=False))
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
