"""Quickstart: two people train two concepts with orthogonal adapters, then anyone merges them and loads the result
into a plain diffusers pipeline. Offline, on a tiny Stable Diffusion built from configs; about half a minute on a CPU.

    python examples/quickstart.py [--steps 40] [--out quickstart-output]

What it does:
1. builds a tiny ``StableDiffusionPipeline`` (random weights; nothing is downloaded);
2. trains an ``OrthoLoraConfig`` adapter on the UNet for each of two concepts ("rex": warm blobs, "mia": cool
   stripes) on different slots of the shared basis (seed 0), recording each adapted layer's input statistics
   (``InputStatistics``: the concept's batches, the same latents under the empty prompt, and ordinary inputs) and
   saving them beside the adapter. The two collaborators agreed on slots 0 and 1; ``concept_id="..."`` hashes a name
   to a slot instead, which on this tiny model's 32-wide layers (8 slots) would collide one time in eight —
   ``compose`` would then warn with the number of shared rows;
3. merges both with ``peft_ortho.compose`` (``auto``: the statistics merge, since both carry statistics) and prints
   the report, which predicts each concept's output change and the drift on ordinary inputs — next to the
   prediction for the exact sum of the same adapters;
4. writes a diffusers LoRA file and loads it with the real ``pipe.load_lora_weights`` into a fresh pipeline;
5. checks that pipeline's UNet reproduces the merged model, and that each concept's loss stays improved.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

import peft_ortho
from peft_ortho import InputStatistics, OrthoLoraConfig, compose
from peft_ortho.testing import UNET_TARGETS, tiny_sd_pipeline

CONCEPTS = {"rex": "a photo of rex", "mia": "a photo of mia"}


def concept_images(name: str, n: int = 8, size: int = 8, seed: int = 0) -> torch.Tensor:
    """A few ``(n, 3, size, size)`` images in [-1, 1] with a look the base model has never seen."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        jitter = 0.2 * torch.randn(3, 1, 1, generator=g)
        if name == "rex":  # a warm round blob
            blob = torch.exp(-(xx**2 + yy**2) * 3)
            img = torch.stack([blob, 0.5 * blob, -blob]) + jitter
        else:  # cool diagonal stripes
            stripes = torch.sin((xx + yy) * 6)
            img = torch.stack([-stripes.abs(), 0.3 * stripes, stripes.abs()]) + jitter
        images.append(img.clamp(-1, 1))
    return torch.stack(images)


def encode(pipe, prompt: str, n: int) -> torch.Tensor:
    ids = pipe.tokenizer(
        [prompt] * n, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def denoising_loss(unet, scheduler, latents, context, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
    noisy = scheduler.add_noise(latents, noise, t)
    return F.mse_loss(unet(noisy, t, context).sample, noise)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--out", default="quickstart-output")
    args = p.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)

    pipe = tiny_sd_pipeline()
    print(f"peft-ortho {peft_ortho.__version__}: tiny StableDiffusionPipeline built from configs (offline)")
    data = {}
    for name, prompt in CONCEPTS.items():
        with torch.no_grad():
            latents = pipe.vae.encode(concept_images(name)).latent_dist.mean * pipe.vae.config.scaling_factor
        data[name] = (latents, encode(pipe, prompt, latents.shape[0]))

    from peft import get_peft_model

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ordinary = pipe.vae.encode(torch.rand(8, 3, 8, 8, generator=g) * 2 - 1).latent_dist.mean
        ordinary = ordinary * pipe.vae.config.scaling_factor
    generic, empty = encode(pipe, "a photo", 8), encode(pipe, "", 8)

    folders = {}
    for slot, name in enumerate(CONCEPTS):
        # Each person starts from the same base and the same basis seed, on their own slot.
        unet = copy.deepcopy(pipe.unet).train()
        config = OrthoLoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=UNET_TARGETS, slot=slot)
        unet = get_peft_model(unet, config)
        stats = InputStatistics(unet)  # hooks on the adapted layers: second moments of their inputs, nothing else
        optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=3e-3)
        latents, context = data[name]
        before = denoising_loss(unet, pipe.scheduler, latents, context).item()
        for step in range(args.steps):
            with stats.record("concept"):
                loss = denoising_loss(unet, pipe.scheduler, latents, context, seed=step + 1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        after = denoising_loss(unet, pipe.scheduler, latents, context).item()
        with torch.no_grad():
            with stats.record("unconditional"):  # what classifier-free guidance runs beside the prompt
                denoising_loss(unet, pipe.scheduler, latents, empty)
            with stats.record("prior"):  # ordinary inputs: other images under a generic prompt
                denoising_loss(unet, pipe.scheduler, ordinary, generic)
        folders[name] = os.path.join(args.out, name)
        unet.save_pretrained(folders[name])
        stats.save_pretrained(folders[name], overwrite=True)  # adapter_statistics.safetensors beside the adapter
        rows = unet.peft_config["default"].basis_rows
        print(f"trained {name!r}: loss {before:.4f} -> {after:.4f} in {args.steps} steps; basis rows {rows}")

    merged = compose(list(folders.values()), progress=False, base=pipe.unet)
    print(merged.statement)
    print(merged.report)
    exact_sum = compose(list(folders.values()), method="linear", progress=False, base=pipe.unet).report
    for concept, c in exact_sum.concepts.items():
        kept = merged.report.concepts[concept]["retention"]
        print(
            f"predicted retention of {os.path.basename(concept)!r}: exact sum {c['retention']:.3f}, {merged.method} {kept:.3f}"
        )
    lora_dir = merged.save_diffusers(os.path.join(args.out, "rex+mia-diffusers"), overwrite=True)
    print(f"wrote {lora_dir}")

    # The loading side: a plain diffusers pipeline, no peft-ortho needed to read the file.
    fresh = tiny_sd_pipeline()
    fresh.load_lora_weights(os.path.dirname(lora_dir) if os.path.isfile(lora_dir) else lora_dir)
    reference = merged.fuse(copy.deepcopy(pipe.unet))
    for name in CONCEPTS:
        latents, context = data[name]
        with torch.no_grad():
            loaded = denoising_loss(fresh.unet, fresh.scheduler, latents, context).item()
            fused = denoising_loss(reference, pipe.scheduler, latents, context).item()
            base = denoising_loss(pipe.unet, pipe.scheduler, latents, context).item()
        print(f"{name!r}: base loss {base:.4f}, merged (diffusers load_lora_weights) {loaded:.4f}, fused {fused:.4f}")
    image = fresh(CONCEPTS["rex"], num_inference_steps=4, height=8, width=8, output_type="np").images[0]
    print(f"generated an image of {CONCEPTS['rex']!r} with the merged LoRA: shape {image.shape}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
