"""The tiny text-to-image model the fidelity benchmark adapts: trained here, on the CPU, from scikit-learn's digits.

- Data: ``sklearn.datasets.load_digits`` (1797 grayscale 8×8 images, values 0..16, shipped inside the package),
  upscaled bilinearly to ``image_size``² and mapped to ``[-1, 1]``; split per class, deterministically, into a part
  the base model trains on, a part reserved for the personal concepts (the base never sees those images) and a
  held-out part (classifier validation and the prior-drift loss).
- Model: a diffusers ``UNet2DConditionModel`` (1 channel, **pixel space, no VAE**: at 16×16 a VAE would have
  nothing to compress, and a pixel-space model is honest for a model this small) conditioned by a transformers
  ``CLIPTextModel`` built from a config, and a word-level tokenizer written in code (one token per word, so every
  rare concept token is one embedding row that base training never touches).
- Training: the ordinary noise-prediction loss ``‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, c)‖²`` with a cosine
  ``DDPMScheduler``; the prompt is dropped (empty prompt) 10 % of the time so sampling can use classifier-free
  guidance. Both networks train jointly from scratch.
- Cache: ``save_pretrained`` layout (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) in a folder
  named by a hash of the config; built once, reloaded afterwards. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CACHE_VERSION = "fidelity-base-v1"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_WORDS = ("a", "photo", "of", "digit")


def class_prompt(digit: int) -> str:
    """The ordinary prompt of a digit class, e.g. ``"a photo of digit three"``."""
    return f"a photo of digit {DIGIT_WORDS[digit]}"


@dataclass(frozen=True)
class BaseConfig:
    """Everything that defines the base model; its hash names the cache folder."""

    image_size: int = 8
    block_out_channels: tuple[int, ...] = (32, 64)
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    text_layers: int = 2
    max_length: int = 10
    rare_tokens: int = 24  # vocabulary rows reserved for concept tokens ("sks0", "sks1", ...), never trained here
    train_steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    cond_dropout: float = 0.1
    num_train_timesteps: int = 1000
    split: tuple[float, float] = (0.6, 0.2)  # base / concept fractions per class; the rest is held out
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"version": CACHE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------- data


@dataclass
class DigitData:
    """Upscaled digits in ``[-1, 1]``, shape ``(n, 1, S, S)``, with labels ``(n,)``, split per class."""

    images: torch.Tensor
    labels: torch.Tensor
    base_idx: np.ndarray
    concept_idx: np.ndarray
    heldout_idx: np.ndarray

    def part(self, name: str, digit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = getattr(self, f"{name}_idx")
        if digit is not None:
            idx = idx[self.labels[idx].numpy() == digit]
        return self.images[idx], self.labels[idx]


def load_digits_data(image_size: int = 8, split: tuple[float, float] = (0.6, 0.2), seed: int = 0) -> DigitData:
    """scikit-learn's digits upscaled to ``image_size`` (bilinear), in ``[-1, 1]``, split deterministically per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    labels = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for d in range(10):
        idx = np.flatnonzero(digits.target == d)
        idx = idx[rng.permutation(len(idx))]
        n_base, n_concept = int(split[0] * len(idx)), int(split[1] * len(idx))
        parts[0] += idx[:n_base].tolist()
        parts[1] += idx[n_base : n_base + n_concept].tolist()
        parts[2] += idx[n_base + n_concept :].tolist()
    return DigitData(x, labels, *(np.array(sorted(p)) for p in parts))


# ----------------------------------------------------------------------------------------------------- model


def vocabulary(rare_tokens: int) -> list[str]:
    """The tokenizer's words: prompt words, digit words, then the rare concept tokens ``sks0 .. sks{n-1}``."""
    return [*PROMPT_WORDS, *DIGIT_WORDS, *(f"sks{i}" for i in range(rare_tokens))]


def build_tokenizer(rare_tokens: int, max_length: int):
    """A word-level ``PreTrainedTokenizerFast`` written in code: ``<bos> words <eos> <pad>...``; unknown words raise.

    CLIP's BPE would split an unseen word into characters the base has seen; one token per word makes each concept
    token a single embedding row that base training never updates (the analogue of a rare token in a large model).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    vocab = {tok: i for i, tok in enumerate([*special, *vocabulary(rare_tokens)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        model_max_length=max_length,
    )


def build_models(cfg: BaseConfig):
    """``(unet, text_encoder, tokenizer, scheduler)`` with fresh weights from ``cfg.seed``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(cfg.rare_tokens, cfg.max_length)
    torch.manual_seed(cfg.seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.cross_attention_dim,
            intermediate_size=2 * cfg.cross_attention_dim,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=cfg.max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    n = len(cfg.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=16,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=True
    )
    return unet, text_encoder, tokenizer, scheduler


@torch.no_grad()
def encode(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Text states ``(B, max_length, hidden)`` of the prompts (padded to ``max_length``)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    return text_encoder(ids.input_ids).last_hidden_state


def noisy(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`` (the scheduler's ``add_noise``)."""
    return scheduler.add_noise(x0, noise, t)


@dataclass
class TinyT2I:
    """The trained base: networks, tokenizer, scheduler, data and where it is cached."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    data: DigitData
    cfg: BaseConfig
    folder: str
    info: dict

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode(self.text_encoder, self.tokenizer, prompts)


def train_base(cfg: BaseConfig, data: DigitData, log=print) -> tuple[object, object, object, object, dict]:
    """Train UNet and text encoder jointly on the base split with the noise-prediction loss (Adam, no weight decay).

    Weight decay stays off so the rare-token rows, which get exactly zero gradient, keep their initial values.
    """
    unet, text_encoder, tokenizer, scheduler = build_models(cfg)
    x_all, y_all = data.part("base")
    prompts = [class_prompt(d) for d in range(10)]
    ids = tokenizer([*prompts, ""], padding="max_length", max_length=cfg.max_length, return_tensors="pt").input_ids
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.train_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(cfg.seed)
    unet.train(), text_encoder.train()
    start, losses = time.perf_counter(), []
    for step in range(cfg.train_steps):
        pick = torch.randint(len(x_all), (cfg.batch_size,), generator=g)
        x0, y = x_all[pick], y_all[pick].clone()
        y[torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout] = 10  # the empty prompt
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        states = text_encoder(ids[y]).last_hidden_state
        pred = unet(noisy(scheduler, x0, noise, t), t, states).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, cfg.train_steps // 10) == 0:
            log(f"  base step {step + 1}/{cfg.train_steps}: loss {np.mean(losses[-100:]):.4f}")
    unet.eval(), text_encoder.eval()
    info = {"train_seconds": time.perf_counter() - start, "final_loss": float(np.mean(losses[-200:]))}
    return unet, text_encoder, tokenizer, scheduler, info


def load_or_build(cfg: BaseConfig, cache_dir: str, log=print) -> TinyT2I:
    """The base model for ``cfg``: reloaded from ``cache_dir/base-<hash>`` or trained once and saved there."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    from peft_ortho._io import atomic_dir

    data = load_digits_data(cfg.image_size, cfg.split, cfg.seed)
    folder = os.path.join(cache_dir, f"base-{cfg.key()}")
    if not os.path.isfile(os.path.join(folder, "info.json")):
        log(f"training the base model ({cfg.train_steps} steps, batch {cfg.batch_size}) -> {folder}")
        unet, text_encoder, tokenizer, scheduler, info = train_base(cfg, data, log)
        with atomic_dir(folder, overwrite=True) as tmp:
            unet.save_pretrained(os.path.join(tmp, "unet"))
            text_encoder.save_pretrained(os.path.join(tmp, "text_encoder"))
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
            with open(os.path.join(tmp, "info.json"), "w") as f:
                json.dump({"config": dataclasses.asdict(cfg), **info}, f, indent=1)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(folder, "tokenizer"))
    scheduler = DDPMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    unet.requires_grad_(False), text_encoder.requires_grad_(False)
    with open(os.path.join(folder, "info.json")) as f:
        info = json.load(f)
    return TinyT2I(unet, text_encoder, tokenizer, scheduler, data, cfg, folder, info)


@torch.no_grad()
def sample(
    unet,
    scheduler_config,
    states: torch.Tensor,
    uncond: torch.Tensor,
    *,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    image_size: int = 8,
) -> torch.Tensor:
    """DDIM samples ``(B, 1, S, S)`` in ``[-1, 1]`` with classifier-free guidance.

    ``ε̂ = ε_u + guidance · (ε_c − ε_u)``; ``states`` ``(B, L, H)`` are the prompts' text states, ``uncond``
    ``(1, L, H)`` the empty prompt's. The initial noise comes from ``seed`` so every method samples from the same
    noise.
    """
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(steps)
    b = states.shape[0]
    x = torch.randn(b, 1, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    cond = torch.cat([uncond.expand(b, -1, -1), states])
    for t in ddim.timesteps:
        eps_u, eps_c = unet(torch.cat([x, x]), t, cond).sample.chunk(2)
        x = ddim.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x.clamp(-1, 1)
