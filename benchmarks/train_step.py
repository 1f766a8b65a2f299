"""Train-step benchmark: peft-ortho's tuners vs peft LoRA, OFT and BOFT, side by side in one run.

What is compared. One ``diffusers.UNet2DConditionModel`` built from a config with SD-like widths (random weights,
seeded, CPU, float32) is copied once per arm; every arm adapts the attention projections ``to_q, to_k, to_v,
to_out.0``:

- ``lora``: peft ``LoraConfig(r, lora_alpha=r)``, the reference every ratio is taken against;
- ``ortho``: ``peft_ortho.OrthoLoraConfig(r, lora_alpha=r, concept_id=...)`` (a LoRA with ``lora_A`` frozen to rows
  of the shared basis: only ``lora_B`` trains);
- ``block``: ``peft_ortho.BlockLoraConfig(r, lora_alpha=r, num_blocks=4, block_index=0)`` (present once the package
  ships it);
- ``oft``: peft ``OFTConfig(oft_block_size=64)``; ``boft``: peft ``BOFTConfig(boft_block_size=32)`` (the issue's
  reference points: OFT block 64 ≈ LoRA r16 parameters on square layers);
- ``soda-svd-cayley``, ``soda-svd-stiefel``, ``soda-lq-cayley``, ``soda-lq-stiefel``: ``peft_ortho.SodaConfig`` in
  both decompositions and both rotation modes, automatic near-equal Kronecker factors, full spectrum; the Stiefel arms
  train with ``peft_ortho.optim.make_optimizer`` (AdamW + Stiefel Adam), every other arm with ``AdamW``;
- ``soda-svd-cayley-k16``: SODA with ``spectrum_rank=16`` (the cheapest option: the spectral term costs what a
  rank-16 LoRA costs); ``soda-svd-cayley-matched``: SODA with larger Kronecker factors chosen so that its trainable
  parameter count approaches LoRA r16's (two factors ``(in/d, d)``).

What is measured.

- **Step time.** One training step = ``zero_grad`` + forward + noise-prediction MSE loss + backward + optimizer step
  over the trainable parameters. All arms get the same pre-generated batches (step ``i`` of any arm sees batch
  ``i``). After ``--warmup`` steps per arm, the arms take turns step by step; the order rotates every round and is
  reversed every other round, so drift in machine load hits all arms alike. Reported: the median of ``--steps`` steps
  per arm (and its forward / backward / optimizer parts), and the median of the per-round paired ratios arm / LoRA
  (the steps of a round run back to back, so that ratio is the most load-robust number).
- **Peak memory.** Each arm runs again in its own new process (forked before the parent has built anything or
  run any torch kernel, so imports are shared but no tensors or caches): build the UNet and the batch, then reset
  the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``), take the current RSS as the
  baseline, inject the adapter, train a few steps, and read ``VmHWM``. The delta is everything training with the
  adapter adds on top of the loaded model: adapter weights, frozen decompositions, gradients, optimizer state, saved
  activations and temporaries, as the OS sees it. Where ``clear_refs`` is unavailable it falls back to ``ru_maxrss``
  minus the baseline RSS. Median of ``--memory-repeats`` processes per arm, arms alternating.
- **Injection time.** ``get_peft_model`` wall time, in the same new processes (cold caches, as a user's first call;
  for SODA this is the one-off decomposition).
- **SODA decomposition time on SD1.5's attention layer set**: the 128 ``to_q/to_k/to_v/to_out.0`` layers of SD1.5's
  UNet (their exact shapes and names, random weights, 94 M parameters) in a fresh process, ``get_peft_model`` with
  ``SodaConfig`` for each decomposition, and the memory of the frozen buffers.

    python -m benchmarks.train_step                  # full run, writes the "Train step" section of docs/benchmarks.md
    python -m benchmarks.train_step --quick          # smaller UNet, few steps, with BOFT
    python -m benchmarks.train_step --arms lora,ortho --steps 20 --warmup 3 --out docs/benchmarks.md
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
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import peft_ortho  # (registers ORTHO_LORA with peft)

from ._common import reset_peak_rss, status_kb, write_section

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ALL_ARMS = (
    "lora",
    "ortho",
    "block",
    "oft",
    "boft",
    "soda-svd-cayley",
    "soda-svd-stiefel",
    "soda-lq-cayley",
    "soda-lq-stiefel",
    "soda-svd-cayley-k16",
    "soda-svd-cayley-matched",
)
ARM_NAMES = {
    "lora": "peft LoRA r16",
    "ortho": "OrthoLora r16 (peft-ortho)",
    "block": "BlockLoRA r16, 4 blocks (peft-ortho)",
    "oft": "peft OFT block 64",
    "boft": "peft BOFT block 32",
    "soda-svd-cayley": "SODA svd, cayley",
    "soda-svd-stiefel": "SODA svd, stiefel",
    "soda-lq-cayley": "SODA lq, cayley",
    "soda-lq-stiefel": "SODA lq, stiefel",
    "soda-svd-cayley-k16": "SODA svd, cayley, spectrum_rank 16",
    "soda-svd-cayley-matched": "SODA svd, cayley, LoRA-sized factors",
}
ADAPTER_MARKERS = ("lora_", "oft_", "boft_", "soda_")
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

# SD1.5's attention projections: (block, transformer count, width); each transformer block has attn1 (self) and attn2
# (cross, to_k/to_v read the 768-wide text states).
SD15_ATTENTION = [
    ("down_blocks.0", 2, 320),
    ("down_blocks.1", 2, 640),
    ("down_blocks.2", 2, 1280),
    ("mid_block", 1, 1280),
    ("up_blocks.1", 3, 1280),
    ("up_blocks.2", 3, 640),
    ("up_blocks.3", 3, 320),
]


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


# peft's BOFT without its CUDA extension (CPU) runs a slow fallback: ~12× LoRA per step in a --quick run here, which
# would make the full run take well over 15 minutes on 2 cores. It runs by default with --quick, on request otherwise.
SLOW_ARMS = ("boft",)


def available_arms() -> tuple[str, ...]:
    return tuple(a for a in ALL_ARMS if a != "block" or hasattr(peft_ortho, "BlockLoraConfig"))


def default_arms(quick: bool) -> tuple[str, ...]:
    return tuple(a for a in available_arms() if quick or a not in SLOW_ARMS)


def unet_config(quick: bool) -> dict[str, Any]:
    return QUICK_UNET if quick else FULL_UNET


def build_unet(quick: bool) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**unet_config(quick))


def target_shapes(unet: torch.nn.Module) -> list[tuple[int, int]]:
    """``(in, out)`` of every adapted layer."""
    return [
        (m.in_features, m.out_features)
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(tuple(TARGETS))
    ]


def matched_factors(shapes: list[tuple[int, int]], rank: int) -> dict[str, list[int]]:
    """Per input width, two Kronecker factors ``(in/d, d)`` whose Cayley parameters plus the spectrum come closest to
    LoRA's ``rank·(in + out)`` (averaged over the layers of that width)."""
    by_width: dict[int, list[int]] = {}
    for n, out in shapes:
        by_width.setdefault(n, []).append(out)
    factors = {}
    for n, outs in by_width.items():
        target = statistics.mean(rank * (n + o) - min(n, o) for o in outs)

        def params(d: int, n: int = n) -> int:
            return d * (d - 1) // 2 + (n // d) * (n // d - 1) // 2

        d = min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(params(d) - target))
        factors[str(n)] = sorted([n // d, d])
    return factors


def peft_config(arm: str, rank: int, shapes: list[tuple[int, int]]):
    from peft import BOFTConfig, LoraConfig, OFTConfig

    targets = list(TARGETS)
    if arm == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    if arm == "ortho":
        return peft_ortho.OrthoLoraConfig(r=rank, lora_alpha=rank, target_modules=targets, concept_id="bench/rex")
    if arm == "block":
        return peft_ortho.BlockLoraConfig(r=rank, lora_alpha=rank, target_modules=targets, num_blocks=4, block_index=0)
    if arm == "oft":
        return OFTConfig(r=0, oft_block_size=64, target_modules=targets)
    if arm == "boft":
        return BOFTConfig(boft_block_size=32, target_modules=targets)
    _, decomposition, rotation, *extra = arm.split("-")
    kwargs: dict[str, Any] = {}
    if extra == ["k16"]:
        kwargs["spectrum_rank"] = rank
    elif extra == ["matched"]:
        kwargs["factors"] = matched_factors(shapes, rank)
    return peft_ortho.SodaConfig(target_modules=targets, decomposition=decomposition, rotation=rotation, **kwargs)


def make_batches(quick: bool, count: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` training batches (noisy latents, timesteps, text states, target noise), identical for all arms."""
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

    shapes = target_shapes(unet)
    t0 = time.perf_counter()
    model = get_peft_model(unet, peft_config(arm, rank, shapes))
    inject_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if arm.endswith("stiefel") or "-stiefel-" in arm:
        optimizer = peft_ortho.optim.make_optimizer(model, lr=lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr)
    return Arm(arm, model, optimizer, sum(p.numel() for p in params), inject_s)


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
    counts their forward FLOPs only, and they are the same frozen UNet convolutions in every arm.
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


def run_in_child(target, args: tuple) -> Any:
    """Run ``target(*args, conn)`` in a new process and return what it sends. Forked (Linux) before this process has
    run any torch kernel, so the child starts with the imports done and no OpenMP pool; a fresh interpreter elsewhere."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, send))
    proc.start()
    send.close()
    result = receive.recv()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{target.__name__}{args} failed (exit code {proc.exitcode})")
    return result


def measure_memory_repeated(args: argparse.Namespace, arms: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--memory-repeats`` new processes per arm, arms alternating; medians of peak delta and injection time."""
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for i in range(args.memory_repeats):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            runs[arm].append(run_in_child(memory_child, (arm, args.rank, args.quick, args.memory_steps, args.threads)))
            print(f"memory {arm}: {runs[arm][-1]['peak_delta_mb']:.1f} MB", flush=True)
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


# -------------------------------------------------------------------------------------------- SD1.5 decomposition


class _Projections(torch.nn.Module):
    """SD1.5's 128 attention projections under their UNet names (nested modules), nothing else."""

    def __init__(self):
        super().__init__()
        for block, count, width in SD15_ATTENTION:
            for t in range(count):
                for attn in ("attn1", "attn2"):
                    kv_in = width if attn == "attn1" else 768
                    parent = self
                    path = f"{block}.attentions.{t}.transformer_blocks.0.{attn}".split(".")
                    for part in path:
                        if not hasattr(parent, part):
                            parent.add_module(part, torch.nn.Module())
                        parent = getattr(parent, part)
                    parent.to_q = torch.nn.Linear(width, width, bias=False)
                    parent.to_k = torch.nn.Linear(kv_in, width, bias=False)
                    parent.to_v = torch.nn.Linear(kv_in, width, bias=False)
                    parent.to_out = torch.nn.ModuleList([torch.nn.Linear(width, width)])


def decomposition_child(decomposition: str, dtype: str, spectrum_rank, threads: int, conn) -> None:
    from peft import get_peft_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers = _Projections()
    n_params = sum(p.numel() for p in layers.parameters())
    cfg = peft_ortho.SodaConfig(
        target_modules=list(TARGETS),
        decomposition=decomposition,
        decomposition_dtype=dtype,
        spectrum_rank=spectrum_rank,
    )
    t0 = time.perf_counter()
    model = get_peft_model(layers, cfg)
    seconds = time.perf_counter() - t0
    frozen = sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if "soda_left" in n or "soda_right" in n
    )
    n_layers = len(model.base_model.soda_layers())
    conn.send({"seconds": seconds, "frozen_mb": frozen / 2**20, "base_mb": n_params * 4 / 2**20, "layers": n_layers})
    conn.close()


def measure_decomposition(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    cases = [("svd", "float32", None), ("lq", "float32", None), ("svd", "float32", 16)]
    if args.float64:
        cases.append(("svd", "float64", None))
    for decomposition, dtype, k in cases:
        r = run_in_child(decomposition_child, (decomposition, dtype, k, args.threads))
        r.update(decomposition=decomposition, dtype=dtype, spectrum_rank=k)
        print(f"decomposition {decomposition} {dtype} k={k}: {r['seconds']:.1f} s", flush=True)
        results.append(r)
    return results


# --------------------------------------------------------------------------------------------------------- report


def adapter_state_mb(model: torch.nn.Module) -> float:
    """Adapter tensors (frozen ones once; trainable ones with gradient and two optimizer moments), in MB: the
    analytic part of the memory. Frozen SODA decompositions and BOFT permutations are buffers and are included."""
    total = 0
    for name, p in model.named_parameters():
        if any(m in name for m in ADAPTER_MARKERS):
            total += p.numel() * p.element_size() * (4 if p.requires_grad else 1)
    for name, b in model.named_buffers():
        if any(m in name for m in ADAPTER_MARKERS):
            total += b.numel() * b.element_size()
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


def render(
    args: argparse.Namespace,
    arms: dict[str, Arm],
    memory: dict[str, dict],
    decomposition: list[dict[str, Any]],
    info: dict[str, Any],
) -> str:
    lora = arms["lora"]
    work = info["work"]
    med = {
        name: {k: statistics.median(getattr(a, k)) for k in ("step", "forward", "backward", "optim")}
        for name, a in arms.items()
    }
    paired = {name: [s / lo for s, lo in zip(a.step, lora.step)] for name, a in arms.items()}
    pmed = {name: statistics.median(v) for name, v in paired.items()}
    cfg = unet_config(args.quick)
    batch = QUICK_BATCH if args.quick else FULL_BATCH
    cmd = "python -m benchmarks.train_step" + (" --quick" if args.quick else "")
    cmd += f" --rank {args.rank} --steps {args.steps} --warmup {args.warmup}"
    if args.arms != ",".join(default_arms(args.quick)):
        cmd += f" --arms {args.arms}"
    if args.float64:
        cmd += " --float64"
    first = {name: a.first_loss for name, a in arms.items()}
    same_start = len(set(first.values())) == 1

    def ms(x: float) -> str:
        return f"{x * 1000:.0f} ms"

    rows = []
    for name, a in arms.items():
        lo, hi = iqr(a.step)
        m = med[name]
        plo, phi = iqr(paired[name])
        mem = memory.get(name)
        mem_text = (
            f"{mem['peak_delta_mb']:.0f} MB ({mem['peak_delta_mb'] / memory['lora']['peak_delta_mb']:.2f}×)"
            if mem
            else "—"
        )
        inj = f"{mem['inject_s']:.2f} s" if mem else f"{a.inject_s:.2f} s"
        ratio = "1" if name == "lora" else f"**{pmed[name]:.2f}×** ({plo:.2f}–{phi:.2f})"
        rows.append(
            f"| {ARM_NAMES[name]} | {a.trainable:,} ({a.trainable / lora.trainable:.2f}×) | {ms(m['step'])} "
            f"({ms(lo)}–{ms(hi)}) | {ratio} | {ms(m['forward'])} | {ms(m['backward'])} | {ms(m['optim'])} "
            f"| {mem_text} | {adapter_state_mb(a.model):.1f} MB | {inj} | {work[name][1]:.2f} |"
        )

    cfg_text = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
    lines = [
        "## Train step: peft-ortho tuners vs LoRA, OFT, BOFT",
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
        f"Arms (rank {args.rank} where there is one): see the script's docstring for the exact configs. Optimizer "
        "`AdamW(lr=1e-4)` over the parameters with `requires_grad`; the SODA Stiefel arms use "
        "`peft_ortho.optim.make_optimizer(model, lr=1e-4)` (AdamW + Stiefel Adam with QR retraction). A step is "
        "zero_grad + forward + MSE to the noise + backward + optimizer step. All arms start from the same weights and "
        f"see the same batches; first-step losses are {'identical in every arm' if same_start else '**not identical**: ' + json.dumps(first)} "
        f"({lora.first_loss:.6f}: every adapter is the identity at initialisation). After warm-up ({args.warmup} steps "
        f"per arm), {args.steps} steps per arm take turns (order rotated every round, reversed every other round); "
        'times are medians (interquartile range in brackets); "vs LoRA" is the median of the per-round ratios of '
        "back-to-back steps (IQR in brackets).",
        "",
        "| arm | trainable params | step (median, IQR) | vs LoRA (paired) | forward | backward | optimizer step "
        "| peak memory Δ | adapter state | get_peft_model | GFLOP (mm) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Peak memory Δ: each arm in its own new process, forked before the parent built anything "
        f"({memory['lora']['method']}): the process's peak RSS while injecting and training {args.memory_steps} steps, "
        f"minus its RSS after building the UNet and the batch; median of {args.memory_repeats} such processes per arm. "
        "\"Adapter state\": adapter tensors, frozen ones (SODA's decomposition buffers, OrthoLora's `lora_A`, BOFT's "
        "permutations) once, trainable ones with gradient and two optimizer moments. get_peft_model: median wall time "
        "in the same processes (for SODA: the decomposition). GFLOP (mm): `torch.profiler` FLOPs of mm/addmm/bmm in one "
        "extra untimed step (forward + backward; convolutions excluded, they are the same frozen UNet convolutions in "
        "every arm).",
    ]
    if decomposition:
        lines += [
            "",
            "SODA's one-off decomposition on SD1.5's attention layer set (the 128 `to_q/to_k/to_v/to_out.0` layers with "
            f"SD1.5's shapes and names, {decomposition[0]['base_mb']:.0f} MB of float32 weights, random values), "
            f"`get_peft_model` in a fresh process, {args.threads} threads:",
            "",
            "| decomposition | dtype | spectrum_rank | get_peft_model | frozen buffers | buffers / base weights |",
            "|---|---|---|---|---|---|",
        ]
        for r in decomposition:
            lines.append(
                f"| {r['decomposition']} | {r['dtype']} | {r['spectrum_rank'] or 'full'} | **{r['seconds']:.1f} s** "
                f"| {r['frozen_mb']:.0f} MB | {r['frozen_mb'] / r['base_mb']:.2f}× |"
            )
    lines += ["", *interpretation(args, arms, pmed, memory, decomposition, work)]
    return "\n".join(lines)


def interpretation(args, arms, pmed, memory, decomposition, work) -> list[str]:
    """Targets and reading of the numbers, with the measured values filled in."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    out = ["Targets (issues):", ""]
    if "ortho" in pmed:
        out.append(
            f"- OrthoLora step time ≤ 1.0× LoRA: {pmed['ortho']:.3f}× paired, {verdict(pmed['ortho'] <= 1.0)}; "
            f"trainable parameters ½ of LoRA: {arms['ortho'].trainable / arms['lora'].trainable:.3f}×, "
            f"{verdict(arms['ortho'].trainable <= 0.5 * arms['lora'].trainable)}."
        )
    soda = [a for a in pmed if a.startswith("soda")]
    if soda:
        boft = pmed.get("boft")
        for a in soda:
            below_boft = "" if boft is None else f"; below BOFT ({boft:.2f}×): {verdict(pmed[a] < boft)}"
            out.append(f"- {ARM_NAMES[a]}: step ≤ 1.3× LoRA: {pmed[a]:.2f}×, {verdict(pmed[a] <= 1.3)}{below_boft}.")
        full = [r for r in decomposition if r["spectrum_rank"] is None]
        for r in full:
            out.append(
                f"- SD1.5 attention-layer decomposition under 60 s ({r['decomposition']}, {r['dtype']}): "
                f"{r['seconds']:.1f} s, {verdict(r['seconds'] < 60)}."
            )
    if "oft" in pmed and soda:
        base = next((a for a in ("soda-svd-cayley", "soda-lq-cayley") if a in pmed), soda[0])
        out += [
            "",
            "Where SODA's cost over OFT comes from. The rotation part is cheaper than OFT's: SODA applies "
            "`R = R_1 ⊗ R_2` factor by factor to the activations, `in·(d_1 + d_2)` multiply-adds per token (320 → 16×20: "
            "36 per feature) where OFT block 64 does `in·64`, and it never builds a dense `in×in` matrix. The extra "
            "cost is the spectral term, which OFT does not have: `U_k (Δσ ⊙ V_kᵀ z)` is two GEMMs of `k·(in + out)` "
            "per token (LQ: one GEMM of `k·in`), plus their backward; at full spectrum (`k = min(in, out)`) that is "
            "about twice the frozen layer's own `in·out` for SVD and once for LQ. GFLOP (mm) above: "
            + ", ".join(f"{ARM_NAMES[a]} {work[a][1]:.1f}" for a in ("lora", "oft", *soda) if a in work)
            + ". What keeps it small: (1) each call computes the spectral term the cheaper of two exact ways, counted "
            "in multiply-adds for its token count (`forward_mode='auto'`): on the activations (`U_k (Δσ ⊙ V_kᵀ z)`: "
            "few tokens, small `k`) or by forming `W0 + S` once and running the frozen layer with it (many tokens, "
            "full spectrum; the backward then needs the weight gradient `dyᵀ z`); LQ's `S = Δ ⊙ Q_k` needs no GEMM "
            "at all, so LQ always takes the weight path and costs about one extra weight-gradient GEMM per layer; "
            "(2) the base layer runs once, on the rotated input `z = R x`, not once for `W0 x` and again for the "
            "delta; (3) the rotation is applied factor by factor, never as a dense matrix; (4) `spectrum_rank=k` "
            f"makes the spectral term a rank-k branch (`{ARM_NAMES['soda-svd-cayley-k16']}`: "
            f"{pmed.get('soda-svd-cayley-k16', float('nan')):.2f}× LoRA vs {pmed[base]:.2f}× for the full spectrum).",
        ]
    if "boft" not in pmed:
        out += [
            "",
            "peft BOFT was not run (default without `--quick`): without its CUDA extension peft's BOFT uses a slow "
            "fallback on CPU (11.8× LoRA per step in a `--quick` run on this machine), which alone would push the full "
            "run far past 15 minutes; add it with `--arms ...,boft`. The issue's reference (1.63× LoRA) was measured "
            "elsewhere.",
        ]
    if decomposition:
        out += [
            "",
            "Memory: the frozen decomposition is the dominant adapter memory of SODA (table above: `U` and `V` at full "
            "spectrum are about twice the adapted weights for SVD, `Q` about once for LQ); `spectrum_rank=k` keeps "
            "`k·(in + out)` (SVD) or `k·in` (LQ) per layer, the cheapest option. The buffers are stored in the base "
            "weights' dtype (half for half-precision models) and are not saved in the adapter file (recomputed at load).",
        ]
    return out


# ----------------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--arms",
        default=None,
        help=f"comma-separated arms (lora is always run; default: all but {', '.join(SLOW_ARMS)} without --quick); "
        f"available: {', '.join(available_arms())}",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per arm (default 8; 4 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per arm (default 1)")
    p.add_argument("--quick", action="store_true", help="smaller UNet and few steps (a few minutes)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads for every arm")
    p.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory process")
    p.add_argument("--memory-repeats", type=int, default=1, help="memory processes per arm (default 1)")
    p.add_argument("--float64", action="store_true", help="also time the SD1.5 decomposition in float64")
    p.add_argument("--no-decomposition", action="store_true", help="skip the SD1.5 decomposition timing")
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file whose train_step section is (re)written")
    args = p.parse_args()
    if args.steps is None:
        args.steps = 4 if args.quick else 8
    if args.warmup is None:
        args.warmup = 1
    if args.arms is None:
        args.arms = ",".join(default_arms(args.quick))
    if args.steps < 2 or args.warmup < 0 or args.memory_repeats < 1 or args.memory_steps < 1:
        p.error("need --steps >= 2, --warmup >= 0, --memory-repeats >= 1 and --memory-steps >= 1")
    names = [a for a in args.arms.split(",") if a]
    unknown = [a for a in names if a not in available_arms()]
    if unknown:
        p.error(f"unknown or unavailable arms {unknown}; available: {', '.join(available_arms())}")
    arm_names = tuple(dict.fromkeys(["lora", *names]))

    import diffusers
    import peft

    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    # Memory and decomposition first, in fresh processes, before this one runs any torch kernel (see run_in_child).
    memory = measure_memory_repeated(args, arm_names)
    decomposition = [] if args.no_decomposition else measure_decomposition(args)
    torch.set_num_threads(args.threads)

    unet = build_unet(args.quick)
    base_params = sum(p.numel() for p in unet.parameters())
    n_layers = len(target_shapes(unet))
    arms = {name: inject(copy.deepcopy(unet), name, args.rank) for name in arm_names}
    del unet
    batches = make_batches(args.quick, args.warmup + args.steps)

    for i in range(args.warmup):
        for arm in arms.values():
            train_step(arm, batches[i])
    for arm in arms.values():  # keep only the timed steps
        arm.step, arm.forward, arm.backward, arm.optim = [], [], [], []
    for i in range(args.steps):
        shift = i % len(arm_names)
        order = arm_names[shift:] + arm_names[:shift]
        for name in order if i % 2 == 0 else order[::-1]:
            train_step(arms[name], batches[args.warmup + i])
        print(
            f"step {i + 1}/{args.steps}: " + ", ".join(f"{n} {arms[n].step[-1] * 1000:.0f} ms" for n in arm_names),
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
    text = render(args, arms, memory, decomposition, info)
    print(text)
    write_section(args.out, START, END, text)


if __name__ == "__main__":
    main()
