"""Train-step benchmark: orthogonal adapter (``OrthoLoraConfig``) vs peft LoRA, side by side in one run.

What is compared. One ``diffusers.UNet2DConditionModel`` built from a config with SD-like widths (random weights,
seeded, CPU, float32) is copied twice; one copy gets a plain peft ``LoraConfig(r, lora_alpha, target_modules)``,
the other ``peft_ortho.OrthoLoraConfig(r, lora_alpha, target_modules, concept_id=...)``, both on the attention
projections ``to_q, to_k, to_v, to_out.0`` at the same rank. The orthogonal adapter is a LoRA whose ``lora_A`` is
frozen to rows of the shared basis: only ``lora_B`` trains.

What is measured.

- **Step time.** One training step = ``zero_grad`` + forward + noise-prediction MSE loss + backward + ``AdamW.step``
  over the trainable parameters. Both arms get the same pre-generated batches (step ``i`` of either arm sees batch
  ``i``). After ``--warmup`` steps per arm, the arms alternate step by step, with the order flipped every round
  (LoRA, ortho, ortho, LoRA, ...), so drift in machine load hits both sides alike. Reported: the median of
  ``--steps`` steps per arm (and its forward / backward / optimizer parts), and the median of the per-round paired
  ratios ortho / LoRA (the two steps of a round run back to back, so that ratio is the most load-robust number).
- **Peak memory.** Each arm runs again in its own new process (forked before the parent has built anything or
  run any torch kernel, so imports are shared but no tensors or caches): build the UNet and the batch, then reset
  the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``), take the current RSS as the
  baseline, inject the adapter, train a few steps, and read ``VmHWM``. The delta is everything training with the
  adapter adds on top of the loaded model: adapter weights, gradients, AdamW state, saved activations and
  temporaries, as the OS sees it (torch's CPU allocator is malloc, so RSS is where its tensors live; ``tracemalloc``
  would not see them). Where ``clear_refs`` is unavailable it falls back to ``ru_maxrss`` minus the baseline RSS (a
  lower bound if building the model peaked higher). Median of ``--memory-repeats`` processes per arm, alternating.
- **Injection time.** ``get_peft_model`` wall time, in the same new processes (so basis caches are cold, as a
  user's first call is).
- **Trainable parameters**, from the injected models.

    python benchmarks/train_step.py                  # full run, writes the "Train step" section of docs/benchmarks.md
    python benchmarks/train_step.py --quick          # smaller UNet, few steps, under a minute
    python benchmarks/train_step.py --rank 16 --steps 20 --warmup 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import reset_peak_rss, status_kb, write_section  # noqa: E402

import peft_ortho  # noqa: E402  (registers ORTHO_LORA with peft)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ARMS = ("lora", "ortho")
ARM_NAMES = {"lora": "peft LoRA", "ortho": "OrthoLora (peft-ortho)"}
START, END = "<!-- train_step:start -->", "<!-- train_step:end -->"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks.md")

# SD1.5 widths (320, 640, 1280), SD1.5's cross_attention_dim and head count, fewer blocks and a small latent so that
# a training step takes about a second on 2 CPU cores.
FULL_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
QUICK_UNET: dict[str, Any] = {
    **FULL_UNET,
    "sample_size": 8,
    "block_out_channels": (320, 640),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
FULL_BATCH, QUICK_BATCH = 2, 1
TOKENS = 77


@dataclass
class Arm:
    """One side of the comparison: an injected model, its optimizer and its per-step timings."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable: int
    inject_s: float
    step: list[float] = field(default_factory=list)
    forward: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)
    optim: list[float] = field(default_factory=list)
    first_loss: float | None = None


def unet_config(quick: bool) -> dict[str, Any]:
    return QUICK_UNET if quick else FULL_UNET


def build_unet(quick: bool) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**unet_config(quick))


def peft_config(arm: str, rank: int):
    from peft import LoraConfig

    if arm == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS))
    return peft_ortho.OrthoLoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), concept_id="bench/rex")


def make_batches(quick: bool, count: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` training batches (noisy latents, timesteps, text states, target noise), identical for both arms."""
    from diffusers import DDPMScheduler

    cfg = unet_config(quick)
    batch, size = (QUICK_BATCH if quick else FULL_BATCH), cfg["sample_size"]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        latents = torch.randn(batch, cfg["in_channels"], size, size, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        text = torch.randn(batch, TOKENS, cfg["cross_attention_dim"], generator=g)
        batches.append((scheduler.add_noise(latents, noise, t), t, text, noise))
    return batches


def inject(unet: torch.nn.Module, arm: str, rank: int, lr: float = 1e-4) -> Arm:
    from peft import get_peft_model

    t0 = time.perf_counter()
    model = get_peft_model(unet, peft_config(arm, rank))
    inject_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return Arm(arm, model, torch.optim.AdamW(params, lr=lr), sum(p.numel() for p in params), inject_s)


def train_step(arm: Arm, batch: tuple[torch.Tensor, ...]) -> float:
    """One step; appends its total and phase times to ``arm`` and returns the loss."""
    noisy, t, text, noise = batch
    t0 = time.perf_counter()
    arm.optimizer.zero_grad(set_to_none=True)
    pred = arm.model(noisy, t, encoder_hidden_states=text).sample
    loss = torch.nn.functional.mse_loss(pred, noise)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    arm.optimizer.step()
    t3 = time.perf_counter()
    arm.step.append(t3 - t0)
    arm.forward.append(t1 - t0)
    arm.backward.append(t2 - t1)
    arm.optim.append(t3 - t2)
    value = loss.item()
    if arm.first_loss is None:
        arm.first_loss = value
    return value


def matmul_work(arm: Arm, batch: tuple[torch.Tensor, ...]) -> tuple[int, float]:
    """Matmul calls and GFLOP (forward + backward) of one extra, untimed step, counted by ``torch.profiler``.

    A deterministic view of the work each arm does, immune to machine load. Convolutions are left out: the profiler
    counts their forward FLOPs only, and they are the same frozen UNet convolutions in both arms.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        train_step(arm, batch)
    for times in (arm.step, arm.forward, arm.backward, arm.optim):
        times.pop()
    ops = [e for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")]
    return sum(e.count for e in ops), sum(e.flops for e in ops) / 1e9


# ---------------------------------------------------------------------------------------------------------- memory


def memory_child(arm: str, rank: int, quick: bool, steps: int, threads: int, conn) -> None:
    """Runs in a fresh process: peak RSS added by injecting ``arm`` and training ``steps`` steps; sends a dict."""
    import gc

    torch.set_num_threads(threads)
    unet = build_unet(quick)
    batches = make_batches(quick, steps)
    gc.collect()
    reset = reset_peak_rss()
    baseline_kb = status_kb("VmRSS")
    state = inject(unet, arm, rank)
    for batch in batches:
        train_step(state, batch)
    peak_kb = status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    method = "VmHWM after clear_refs" if reset else "ru_maxrss"
    conn.send(
        {"arm": arm, "peak_delta_mb": (peak_kb - baseline_kb) / 1024, "inject_s": state.inject_s, "method": method}
    )
    conn.close()


def measure_memory(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``memory_child`` in a new process. Forked (Linux) before this process has run any torch kernel, so the
    child starts with the imports done and no OpenMP pool; a fresh interpreter (spawn) elsewhere."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=memory_child, args=(arm, args.rank, args.quick, args.memory_steps, args.threads, send))
    proc.start()
    send.close()
    result = receive.recv()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"memory measurement for {arm} failed (exit code {proc.exitcode})")
    return result


def measure_memory_repeated(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``--memory-repeats`` new processes per arm, arms alternating; medians of peak delta and injection time."""
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for i in range(args.memory_repeats):
        for arm in ARMS if i % 2 == 0 else ARMS[::-1]:
            runs[arm].append(measure_memory(arm, args))
    out = {}
    for arm, results in runs.items():
        peaks = [r["peak_delta_mb"] for r in results]
        out[arm] = {
            "peak_delta_mb": statistics.median(peaks),
            "peak_range_mb": (min(peaks), max(peaks)),
            "inject_s": statistics.median(r["inject_s"] for r in results),
            "method": results[0]["method"],
        }
    return out


# --------------------------------------------------------------------------------------------------------- report


def adapter_state_mb(model: torch.nn.Module) -> float:
    """Adapter weights + grads + AdamW's two moments for trainable ones, in MB (float32): the analytic part."""
    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            total += p.numel() * p.element_size() * (4 if p.requires_grad else 1)
    return total / 2**20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def iqr(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def render(args: argparse.Namespace, arms: dict[str, Arm], memory: dict[str, dict], info: dict[str, Any]) -> str:
    lora, ortho = arms["lora"], arms["ortho"]
    work = info["work"]
    same_start = "identical" if lora.first_loss == ortho.first_loss else "**different**, expected identical"
    med = {
        name: {k: statistics.median(getattr(a, k)) for k in ("step", "forward", "backward", "optim")}
        for name, a in arms.items()
    }
    paired = [o / lo for o, lo in zip(ortho.step, lora.step)]
    paired_med, (p_lo, p_hi) = statistics.median(paired), iqr(paired)
    step_ratio = med["ortho"]["step"] / med["lora"]["step"]
    mem_ratio = memory["ortho"]["peak_delta_mb"] / memory["lora"]["peak_delta_mb"]
    param_ratio = ortho.trainable / lora.trainable
    cfg = unet_config(args.quick)
    batch = QUICK_BATCH if args.quick else FULL_BATCH
    cmd = "python benchmarks/train_step.py" + (" --quick" if args.quick else "")
    cmd += f" --rank {args.rank} --steps {args.steps} --warmup {args.warmup}"

    def ms(x: float) -> str:
        return f"{x * 1000:.0f} ms"

    def mem_range(name: str) -> str:
        lo, hi = memory[name]["peak_range_mb"]
        return f" ({lo:.1f}–{hi:.1f})" if args.memory_repeats > 1 else ""

    rows = []
    for name, a in arms.items():
        lo, hi = iqr(a.step)
        m = med[name]
        rows.append(
            f"| {ARM_NAMES[name]} | {a.trainable:,} | **{ms(m['step'])}** ({ms(lo)}–{ms(hi)}) | {ms(m['forward'])} "
            f"| {ms(m['backward'])} | {ms(m['optim'])} | {memory[name]['peak_delta_mb']:.1f} MB{mem_range(name)} "
            f"| {adapter_state_mb(a.model):.1f} MB | {memory[name]['inject_s']:.2f} s |"
        )
    ratio = {k: med["ortho"][k] / med["lora"][k] for k in ("forward", "backward", "optim")}
    rows.append(
        f"| **ortho / LoRA** | **{param_ratio:.3f}×** | **{step_ratio:.3f}×** (paired {paired_med:.3f}×, IQR "
        f"{p_lo:.3f}–{p_hi:.3f}) | {ratio['forward']:.3f}× | {ratio['backward']:.3f}× | {ratio['optim']:.3f}× "
        f"| **{mem_ratio:.3f}×** | {adapter_state_mb(ortho.model) / adapter_state_mb(lora.model):.3f}× "
        f"| {memory['ortho']['inject_s'] / memory['lora']['inject_s']:.1f}× |"
    )

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    cfg_text = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
    lines = [
        "## Train step: orthogonal adapter vs LoRA",
        "",
        f"`{cmd}` (written by the script; {info['runtime_s']:.0f} s wall for the whole run).",
        "",
        f"Machine: {info['cpus']} CPU cores ({info['cpu']}), {args.threads} torch threads, CPU only, float32; "
        f"torch {torch.__version__}, peft {info['peft']}, diffusers {info['diffusers']}, peft-ortho "
        f"{peft_ortho.__version__}, Python {platform.python_version()}. Load average before / after the run: "
        f"{info['load_before']:.1f} / {info['load_after']:.1f} (the machine is shared, so absolute times are noisy; "
        "the interleaving and the paired ratio are there for that).",
        "",
        f"Model: `UNet2DConditionModel({cfg_text})`, seeded random weights, "
        f"{info['base_params'] / 1e6:.1f} M parameters, {info['n_layers']} adapted layers "
        f"({', '.join(TARGETS)}). Batch {batch}, {cfg['in_channels']}×{cfg['sample_size']}×{cfg['sample_size']} "
        f"latents noised by a `DDPMScheduler` at random timesteps, {TOKENS}×{cfg['cross_attention_dim']} text states.",
        "",
        f"Arms, same rank: `LoraConfig(r={args.rank}, lora_alpha={args.rank}, target_modules=...)` and "
        f'`OrthoLoraConfig(r={args.rank}, lora_alpha={args.rank}, target_modules=..., concept_id="bench/rex")`; '
        "`AdamW(lr=1e-4)` over the parameters with `requires_grad`. A step is zero_grad + forward + MSE to the noise + "
        f"backward + `AdamW.step`. Both arms start from the same weights and see the same batches (first-step losses "
        f"{lora.first_loss:.6f} vs {ortho.first_loss:.6f}: {same_start}, since `lora_B = 0` at init). After warm-up "
        f"({args.warmup} steps per arm), {args.steps} steps per arm alternate LoRA, ortho, ortho, LoRA, ...; times are medians "
        '(interquartile range in brackets); "paired" is the median of the per-round ratios of back-to-back steps.',
        "",
        "| arm | trainable params | step (median, IQR) | forward | backward | AdamW step | peak memory Δ "
        "| adapter state | get_peft_model |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Peak memory Δ: each arm in its own new process, forked before the parent built anything "
        f"({memory['lora']['method']}): the process's peak RSS while injecting and training {args.memory_steps} steps, "
        "minus its RSS after building the UNet and the batch; median of "
        f"{args.memory_repeats} such processes per arm (range in brackets). It counts adapter weights, gradients, "
        "AdamW state, saved activations and temporaries as the OS sees them (torch's CPU tensors live in malloc'd "
        "memory; `tracemalloc` would not see them), and the ortho arm's per-process basis cache (a few MB). "
        'Differences of a few MB are at the level of malloc\'s page reuse. "Adapter state" is the analytic part: '
        "adapter weights, plus gradient and two AdamW moments for each trainable one. get_peft_model: median wall "
        "time in the same processes (cold caches, as a user's first call).",
        "",
        "Targets (issue):",
        "",
        f"- step time ≤ 1.0× LoRA: {step_ratio:.3f}× (paired {paired_med:.3f}×), {verdict(step_ratio <= 1.0)}"
        + (
            f" (the paired ratios' IQR {p_lo:.3f}–{p_hi:.3f} straddles 1: the difference is within this machine's noise)."
            if p_lo < 1.0 < p_hi
            else "."
        ),
        f"- trainable parameters ½ of LoRA: {param_ratio:.3f}×, {verdict(param_ratio <= 0.5)}. LoRA trains "
        "`r·(in + out)` per layer and the orthogonal adapter `r·out`, so the ratio is exactly ½ where `in = out` "
        f"(self-attention) and below ½ for the cross-attention `to_k`/`to_v` (in {cfg['cross_attention_dim']} > out).",
        "",
        f"Matmul work of one step (forward + backward, `torch.profiler` FLOP counts of mm/addmm/bmm, one extra untimed "
        f"step per arm): LoRA {work['lora'][0]} calls, {work['lora'][1]:.2f} GFLOP; ortho {work['ortho'][0]} calls, "
        f"{work['ortho'][1]:.2f} GFLOP ({work['ortho'][1] / work['lora'][1]:.3f}×).",
        "",
        "Why the orthogonal step is no slower, and only slightly faster: the forward is the same LoRA forward "
        "(`x → A → B` in both arms). In the backward, `lora_A.weight` has `requires_grad=False`, so autograd skips the "
        "weight-gradient GEMM `dA = dhᵀ x` of every adapted layer (the matmul calls that the ortho arm does not make "
        "above; where the layer input needs no gradient either, as for `to_k`/`to_v` on the text states, the whole "
        "backward through `A` disappears), and it does not keep `x` alive for it; AdamW updates "
        f"{param_ratio:.2f}× as many parameters. These are rank-{args.rank} GEMMs next to the frozen UNet's full-width "
        "forward and input-gradient backward, which dominate the step and are identical in both arms: the saving is "
        f"the {(1 - work['ortho'][1] / work['lora'][1]) * 100:.1f} % of matmul FLOPs above, "
        + (
            f"and the measured step saving ({(1 - paired_med) * 100:.1f} %, paired) is of that size. "
            if p_hi < 1.0
            else "too small to stand out of the run-to-run noise of a shared 2-core machine in every run. "
        )
        + "Peak memory is "
        "likewise dominated by the UNet's saved activations, the same in both arms; the adapter's own state shrinks "
        'by the "adapter state" ratio.',
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="timed steps per arm (default 20; 6 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per arm (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smaller UNet and few steps (under a minute)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads for every arm")
    p.add_argument("--memory-steps", type=int, default=3, help="training steps in each memory process")
    p.add_argument(
        "--memory-repeats", type=int, default=None, help="memory processes per arm (default 3; 1 with --quick)"
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file whose train_step section is (re)written")
    args = p.parse_args()
    if args.steps is None:
        args.steps = 6 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.memory_repeats is None:
        args.memory_repeats = 1 if args.quick else 3
    if args.steps < 2 or args.warmup < 0 or args.memory_repeats < 1 or args.memory_steps < 1:
        p.error("need --steps >= 2, --warmup >= 0, --memory-repeats >= 1 and --memory-steps >= 1")

    import diffusers
    import peft

    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    # Memory first, in fresh processes, before this one runs any torch kernel (see measure_memory).
    memory = measure_memory_repeated(args)
    print(json.dumps(memory), flush=True)
    torch.set_num_threads(args.threads)

    unet = build_unet(args.quick)
    base_params = sum(p.numel() for p in unet.parameters())
    n_layers = sum(1 for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(tuple(TARGETS)))
    arms = {"lora": inject(copy.deepcopy(unet), "lora", args.rank), "ortho": inject(unet, "ortho", args.rank)}
    batches = make_batches(args.quick, args.warmup + args.steps)

    for i in range(args.warmup):
        for arm in arms.values():
            train_step(arm, batches[i])
    for arm in arms.values():  # keep only the timed steps
        arm.step, arm.forward, arm.backward, arm.optim = [], [], [], []
    for i in range(args.steps):
        order = ARMS if i % 2 == 0 else ARMS[::-1]
        for name in order:
            train_step(arms[name], batches[args.warmup + i])
        print(
            f"step {i + 1}/{args.steps}: " + ", ".join(f"{n} {arms[n].step[-1] * 1000:.0f} ms" for n in ARMS),
            flush=True,
        )

    work = {name: matmul_work(arm, batches[-1]) for name, arm in arms.items()}
    print(json.dumps(work), flush=True)

    info = {
        "work": work,
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "peft": peft.__version__,
        "diffusers": diffusers.__version__,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "base_params": base_params,
        "n_layers": n_layers,
        "runtime_s": time.perf_counter() - started,
    }
    text = render(args, arms, memory, info)
    print(text)
    write_section(args.out, START, END, text)


if __name__ == "__main__":
    main()
