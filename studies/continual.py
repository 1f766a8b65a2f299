"""Continual personalization benchmark: every ``peft_ortho.continual`` strategy over 10 text-to-image concepts.

What is run. A tiny ``StableDiffusionPipeline`` built from configs (``peft_ortho.testing.tiny_sd_pipeline``: a
two-block ``UNet2DConditionModel``, a two-layer ``CLIPTextModel``, a CLIP tokenizer written in code, a tiny VAE;
random weights, seeded, nothing downloaded) stands in for the pretrained model. Ten *concepts* arrive one after
another; concept ``k`` is a made-up word (prompt ``"a photo of <word>"``) with its own synthetic look (a shape ×
colour combination the base model has never been trained on), 8 training images and 8 held-out images, encoded
once by the VAE. For each strategy (``naive``, ``merge_and_init``, ``merge_and_orthogonal_init``, ``magnitude``,
and ``orthogonal``: disjoint slots of the shared basis with ``OrthoLoraConfig``) a ``ContinualLearner`` trains one
LoRA per concept (rank ``--rank`` on the UNet attention projections ``to_q, to_k, to_v, to_out.0``; AdamW,
``--steps`` steps, the noise-prediction loss), keeping no past adapter and no past data.

Score. ``M[s, t] = 1 − L_t(s) / L_0(s)``: the fraction of the base model's denoising loss on concept ``s``'s held-out
images (fixed noise and timesteps) that the model after task ``t`` removes. 0 = no better than the base, higher is
better. Average score and average forgetting are ``task_matrix_metrics`` (final-model definitions, see its
docstring), averaged over ``--orders`` random task orders; the spread is the standard deviation over orders.

    python -m studies.continual            # 10 tasks, 2 orders; writes the "continual" section of docs/benchmarks.md
    python -m studies.continual --quick    # 4 tasks, 1 order, few steps: a smoke run, under a minute
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig

import peft_ortho
from benchmarks._common import write_section
from peft_ortho import OrthoLoraConfig
from peft_ortho.continual import STATE_TENSORS, STRATEGIES, ContinualLearner, run_continual, task_matrix_metrics
from peft_ortho.testing import UNET_TARGETS, tiny_sd_pipeline

START, END = "<!-- continual:start -->", "<!-- continual:end -->"
WORDS = ("zorp", "quil", "blen", "mava", "tesk", "fryn", "holo", "pibe", "wuxa", "dron", "kelt", "savo")
SHAPES = ("blob", "stripes", "ring", "checker", "diagonal")
COLOURS = ((1.0, 0.5, -1.0), (-1.0, 0.3, 1.0), (0.2, 1.0, -0.6), (1.0, -1.0, 1.0))


def render(shape: str, colour: tuple[float, float, float], n: int, g: torch.Generator, size: int = 8) -> torch.Tensor:
    """``(n, 3, size, size)`` images in [-1, 1]: ``shape`` drawn in ``colour`` on its negative, plus jitter."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    if shape == "blob":
        mask = torch.exp(-(xx**2 + yy**2) * 3)
    elif shape == "stripes":
        mask = (torch.sin(xx * 6) > 0).float()
    elif shape == "ring":
        mask = ((xx**2 + yy**2 - 0.5).abs() < 0.2).float()
    elif shape == "checker":
        mask = ((torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2).float()
    else:
        mask = ((xx - yy).abs() < 0.3).float()
    base = torch.tensor(colour).view(3, 1, 1) * (2 * mask - 1)
    return (base + 0.15 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def concept_look(k: int) -> tuple[str, tuple[float, float, float]]:
    """Concept ``k``'s (shape, colour): ten distinct combinations of the 5 shapes × 4 colours."""
    return SHAPES[k % len(SHAPES)], COLOURS[(k + k // len(SHAPES)) % len(COLOURS)]


def concept_images(k: int, n: int, seed: int) -> torch.Tensor:
    shape, colour = concept_look(k)
    return render(shape, colour, n, torch.Generator().manual_seed(1000 * k + seed))


def encode_prompt(pipe, prompt: str, n: int) -> torch.Tensor:
    ids = pipe.tokenizer(
        [prompt] * n, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def denoising_loss(unet, scheduler, latents, context, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
    return F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, context).sample, noise)


def make_tasks(pipe, n_tasks: int) -> list[dict]:
    tasks = []
    for k in range(n_tasks):
        prompt = f"a photo of {WORDS[k]}"
        with torch.no_grad():
            train = pipe.vae.encode(concept_images(k, 8, seed=0)).latent_dist.mean * pipe.vae.config.scaling_factor
            held = pipe.vae.encode(concept_images(k, 8, seed=1)).latent_dist.mean * pipe.vae.config.scaling_factor
        context = encode_prompt(pipe, prompt, 8)
        tasks.append({"k": k, "prompt": prompt, "train": train, "held": held, "context": context})
    return tasks


def pretrain(pipe, steps: int, lr: float = 1e-3, batch: int = 16) -> None:
    """Make the random UNet a "pretrained" model: full training on every shape × colour under the generic prompt
    ``"a photo"``. It then denoises this world's images in general but knows no concept word, so what a concept's
    adapter learns is the word → look association, and an adapter that ignores the word harms other concepts."""
    g = torch.Generator().manual_seed(12345)
    context = encode_prompt(pipe, "a photo", batch)
    unet = pipe.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    for step in range(steps):
        picks = torch.randint(0, len(SHAPES) * len(COLOURS), (batch,), generator=g).tolist()
        images = torch.cat([render(SHAPES[i % len(SHAPES)], COLOURS[i // len(SHAPES)], 1, g) for i in picks])
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        loss = denoising_loss(unet, pipe.scheduler, latents, context, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval().requires_grad_(False)


def config_for(strategy: str, rank: int) -> LoraConfig:
    if strategy == "orthogonal":
        return OrthoLoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS, slot=0)
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS)


def summarize(results: dict[str, list], diagonals: dict[str, list[float]]) -> str:
    """Facts read off the numbers (true on any rerun); the discussion is in docs/continual.md."""

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    forgetting = {s: mean([r.average_forgetting for r in rs]) for s, rs in results.items()}
    score = {s: mean([r.average_score for r in rs]) for s, rs in results.items()}
    plastic = {s: mean(d) for s, d in diagonals.items()}
    least, most = min(forgetting, key=forgetting.get), max(forgetting, key=forgetting.get)
    best = max(score, key=score.get)
    spread = max(score.values()) - min(score.values())
    return (
        f"Least forgetting: {least} ({forgetting[least]:.3f}); most: {most} ({forgetting[most]:.3f}). Most plastic: "
        f"{max(plastic, key=plastic.get)} ({max(plastic.values()):.3f}); least: {min(plastic, key=plastic.get)} "
        f"({min(plastic.values()):.3f}). Best average score: {best} ({score[best]:.3f}), the five within "
        f"{spread:.3f} of each other. Discussion and caveats: [continual.md](continual.md#benchmark)."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--orders", type=int, default=2, help="random task orders to average over")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--eval-repeats", type=int, default=4, help="noise draws per held-out loss")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks.md")
    )
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.tasks, args.orders, args.steps, args.pretrain_steps = 4, 1, 10, 50
    torch.set_num_threads(1)
    started = time.perf_counter()

    pipe = tiny_sd_pipeline()
    t0 = time.perf_counter()
    pretrain(pipe, args.pretrain_steps)
    print(f"pretrained the tiny UNet for {args.pretrain_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    base_unet = pipe.unet
    scheduler = pipe.scheduler
    all_tasks = make_tasks(pipe, args.tasks)

    def held_loss(unet, task) -> float:
        return float(
            statistics.fmean(
                denoising_loss(unet, scheduler, task["held"], task["context"], seed=10_000 + i).item()
                for i in range(args.eval_repeats)
            )
        )

    with torch.no_grad():
        base_loss = {task["k"]: held_loss(base_unet, task) for task in all_tasks}

    def train(model, task) -> None:
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        for step in range(args.steps):
            loss = denoising_loss(model, scheduler, task["train"], task["context"], seed=100 * task["k"] + step)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()

    def score(model, task) -> float:
        return 1.0 - held_loss(model, task) / base_loss[task["k"]]

    results: dict[str, list] = {s: [] for s in STRATEGIES}
    seconds: dict[str, float] = dict.fromkeys(STRATEGIES, 0.0)
    state_bytes: dict[str, int] = {}
    example_matrix = {}
    diagonals: dict[str, list[float]] = {s: [] for s in STRATEGIES}  # mean of M[t, t]: score right after learning
    for order_seed in range(args.orders):
        order = np.random.default_rng(order_seed).permutation(args.tasks) if order_seed else np.arange(args.tasks)
        tasks = [all_tasks[i] for i in order]
        for strategy in STRATEGIES:
            t0 = time.perf_counter()
            learner = ContinualLearner(copy.deepcopy(base_unet), strategy, config_for(strategy, args.rank))
            with tempfile.TemporaryDirectory() as tmp:
                m = run_continual(learner, tasks, train, score, save_dir=os.path.join(tmp, "state"))
                state_bytes[strategy] = os.path.getsize(os.path.join(tmp, "state", STATE_TENSORS))
            seconds[strategy] += time.perf_counter() - t0
            results[strategy].append(task_matrix_metrics(m))
            diagonals[strategy].append(float(np.mean(np.diag(m))))
            if order_seed == 0:
                example_matrix[strategy] = m
            r = results[strategy][-1]
            print(f"order {order_seed} {strategy:26s} avg score {r.average_score:.3f}  avg forgetting "
                  f"{r.average_forgetting:.3f}  diag {np.mean(np.diag(m)):.3f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)  # fmt: skip

    def mean_sd(values: list[float]) -> str:
        mu = statistics.fmean(values)
        return f"{mu:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mu:.3f}"

    unet_numel = sum(q.numel() for q in base_unet.parameters())
    rows = [
        "| strategy | average score ↑ | average forgetting ↓ | score just after learning (plasticity) | state on disk |",
        "|---|---:|---:|---:|---:|",
    ]
    for strategy in STRATEGIES:
        rs = results[strategy]
        plasticity = diagonals[strategy]
        rows.append(
            f"| {strategy} | {mean_sd([r.average_score for r in rs])} | {mean_sd([r.average_forgetting for r in rs])} "
            f"| {mean_sd(plasticity)} | {state_bytes[strategy] / 1024:.0f} KiB |"
        )
    table = "\n".join(rows)
    print(table)
    m = example_matrix["merge_and_orthogonal_init"]
    elapsed = time.perf_counter() - started
    header = (
        f"`python -m studies.continual` on {os.cpu_count()} CPU cores (one torch thread), torch {torch.__version__},"
        f" peft-ortho {peft_ortho.__version__}, {platform.machine()}; {elapsed / 60:.1f} min. Model: tiny "
        f"StableDiffusion built from configs (UNet {unet_numel / 1e6:.2f} M parameters, random init, then trained "
        f'{args.pretrain_steps} steps here on every shape × colour under the prompt "a photo"; random CLIP text '
        f"encoder). {args.tasks} concepts (a new word each, bound to one shape × colour), in {args.orders} task "
        f"order(s): as listed, then random permutations; LoRA rank {args.rank} on {', '.join(UNET_TARGETS)}; "
        f"{args.steps} AdamW steps per concept at lr {args.lr}. Score `M[s, t] = 1 − L_t(s) / L_0(s)`: the fraction "
        f"of the base model's held-out denoising loss on concept s removed after task t. Average score and "
        f"forgetting: `task_matrix_metrics` (final-model definitions); plasticity: mean of `M[t, t]`; state on "
        f"disk: `continual_state.safetensors` after the last task (the same after every task). Mean ± sd over orders."
    )
    print(np.array2string(m, precision=2))
    summary = summarize(results, diagonals)
    print(summary)
    if not args.no_write and not args.quick:
        text = "\n".join(
            ["## Continual personalization: strategies over 10 concepts", "", header, "", table, "", summary]
        )
        write_section(os.path.abspath(args.out), START, END, text)
        print(f"wrote the continual section of {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
