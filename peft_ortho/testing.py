"""Tiny models built from configs, for tests, examples, benchmarks and studies. Nothing here touches the network.

``tiny_sd_pipeline()`` returns a real ``diffusers.StableDiffusionPipeline`` (UNet2DConditionModel,
CLIPTextModel, a CLIP BPE tokenizer whose vocabulary is written in code, AutoencoderKL, DDIM scheduler)
small enough to run a denoising step in milliseconds on a CPU.
"""

from __future__ import annotations

import inspect
import json
import os
import string
import tempfile

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32, sample_size: int = 8, block_out_channels=(32, 64)):
    """A two-block ``UNet2DConditionModel`` (cross-attention in both blocks), random weights from ``seed``.

    Args:
        seed: seeds the random weights.
        cross_attention_dim: the text embedding width.
        sample_size: the latent size.
        block_out_channels: the two blocks' widths.

    Returns:
        The UNet.
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_text_encoder(seed: int = 0, hidden_size: int = 32, vocab_size: int = 1000):
    """A two-layer ``CLIPTextModel`` built from a config.

    Args:
        seed: seeds the random weights.
        hidden_size: its width.
        vocab_size: its vocabulary size.

    Returns:
        The text encoder.
    """
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_gpt2(
    seed: int = 0,
    width: int = 32,
    vocab_size: int = 100,
    n_positions: int = 32,
    eos_token_id: int | None = None,
    tie_word_embeddings: bool = True,
):
    """A two-layer, four-head ``GPT2LMHeadModel`` built from a config, no dropout, random weights from ``seed``.

    Args:
        seed: seeds the random weights.
        width: the hidden size (a multiple of 4).
        vocab_size: its vocabulary size.
        n_positions: the longest sequence it takes.
        eos_token_id: its begin- and end-of-sequence token (default: the last token of the vocabulary).
        tie_word_embeddings: whether the output head shares the token embedding.

    Returns:
        The model.
    """
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=width,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=tie_word_embeddings,
    )
    return GPT2LMHeadModel(config).eval()


def _byte_alphabet() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def _write_tokenizer_files(folder: str) -> None:
    # Byte-level BPE needs its byte -> printable-character alphabet (GPT-2's); a character vocabulary plus
    # end-of-word forms is enough for a working CLIP tokenizer (every word splits into characters).
    chars = _byte_alphabet()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for ch in chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = ["#version: 0.2"]
    for a in string.ascii_lowercase:
        for b in "aeiou":
            merges.append(f"{a} {b}</w>")
            vocab.setdefault(f"{a}{b}</w>", len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("\n".join(merges) + "\n")


def tiny_tokenizer(folder: str | None = None, model_max_length: int = 16):
    """A real ``CLIPTokenizer`` whose vocabulary (about 650 tokens) is written in code.

    Args:
        folder: where to write its files (default: a new temporary folder).
        model_max_length: the padded length.

    Returns:
        The tokenizer.
    """
    folder = folder or tempfile.mkdtemp(prefix="peft_ortho_tok_")
    _write_tokenizer_files(folder)
    return CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )


def tiny_vae(seed: int = 0):
    """A one-block ``AutoencoderKL`` with 4 latent channels, random weights from ``seed``.

    Args:
        seed: seeds the random weights.

    Returns:
        The VAE.
    """
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    ).eval()


def tiny_sd_pipeline(seed: int = 0):
    """A complete ``StableDiffusionPipeline`` of tiny random models, no safety checker.

    Args:
        seed: seeds the random weights.

    Returns:
        The pipeline.
    """
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        vae=tiny_vae(seed),
        scheduler=DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs(unet, batch: int = 2, seq: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic inputs for one UNet call: ``sample``, ``timestep``, ``encoder_hidden_states``.

    Args:
        unet: the UNet (its config gives the shapes).
        batch: the batch size.
        seq: the text length.
        seed: seeds the inputs.

    Returns:
        The keyword arguments of ``unet(**inputs)``.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    return {
        "sample": torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        "timestep": torch.tensor([10] * batch),
        "encoder_hidden_states": torch.randn(batch, seq, cfg.cross_attention_dim, generator=g),
    }


def tiny_sdxl_pipeline(seed: int = 0):
    """A complete ``StableDiffusionXLPipeline`` of tiny random models, shaped like diffusers' own SDXL pipeline test.

    As ``get_dummy_components``: a UNet with ``text_time`` added conditioning (``addition_time_embed_dim=8``, pooled
    width 32: ``projection_class_embeddings_input_dim = 6·8 + 32``), a ``CLIPTextModel`` and a
    ``CLIPTextModelWithProjection`` of width 32 (cross-attention width 64 = 32 + 32), a two-block VAE (latents at half
    the resolution) and an Euler scheduler. Tokenizers: :func:`tiny_tokenizer`.

    Args:
        seed: seeds the random weights.

    Returns:
        The pipeline.
    """
    unet = tiny_sdxl_unet(seed, layers_per_block=1, transformer_layers_per_block=(1, 1), norm_num_groups=8)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=1000,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Tiny members of the other model families, with the values of diffusers' own tests (tests/pipelines/...).
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_sdxl_unet(
    seed: int = 0,
    *,
    layers_per_block: int = 2,
    transformer_layers_per_block: tuple[int, int] = (1, 2),
    norm_num_groups: int = 1,
):
    """An SDXL-shaped ``UNet2DConditionModel``: text-time embedding, linear projections, cross-attention width 64 and
    80-wide added-condition embeddings.

    Args:
        seed: seeds the random weights.
        layers_per_block: layers per block.
        transformer_layers_per_block: transformer layers in each of the two blocks.
        norm_num_groups: group-norm groups.

    Returns:
        The UNet.
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=layers_per_block,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=transformer_layers_per_block,
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=norm_num_groups,
    ).eval()


def tiny_flux_transformer(seed: int = 0):
    """A ``FluxTransformer2DModel`` with one double and one single block (inner width 32).

    Args:
        seed: seeds the random weights.

    Returns:
        The transformer.
    """
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()


def tiny_sd3_transformer(seed: int = 0, sample_size: int = 8):
    """An ``SD3Transformer2DModel`` with one joint block (inner width 32).

    Args:
        seed: seeds the random weights.
        sample_size: the side of its position grid.

    Returns:
        The transformer.
    """
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    ).eval()


def family_inputs(model, batch: int = 2, seed: int = 0) -> dict:
    """Deterministic inputs for one call of a tiny SD / SDXL UNet or Flux / SD3 transformer.

    Args:
        model: the model (or a peft model around it).
        batch: the batch size.
        seed: seeds the inputs.

    Returns:
        The keyword arguments of ``model(**inputs)``.
    """
    g = torch.Generator().manual_seed(seed)
    cls = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    cfg = model.config
    if cls == "FluxTransformer2DModel":
        img, txt = 16, 5
        return {
            "hidden_states": torch.randn(batch, img, cfg.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(batch, txt, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.full((batch,), 0.5),
            "img_ids": torch.randn(img, 3, generator=g),
            "txt_ids": torch.zeros(txt, 3),
        }
    if cls == "SD3Transformer2DModel":
        return {
            "hidden_states": torch.randn(batch, cfg.in_channels, 4, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.full((batch,), 10),
        }
    inputs = unet_inputs(model, batch=batch, seed=seed)
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    return inputs


def family_output(model, inputs: dict) -> torch.Tensor:
    """The model's output on ``inputs``, without gradients.

    Args:
        model: a tiny UNet or transformer.
        inputs: from ``family_inputs``.

    Returns:
        ``model(**inputs).sample``.
    """
    with torch.no_grad():
        return model(**inputs).sample


def empty_pipeline(family: str, **components):
    """The family's diffusers pipeline holding only ``components``, for LoRA loading.

    Args:
        family: ``"sd"``, ``"sdxl"``, ``"flux"`` or ``"sd3"``.
        **components: the parts to hold (e.g. ``transformer=...``); the others are None.

    Returns:
        The pipeline.
    """
    cls = {
        "sd": diffusers.StableDiffusionPipeline,
        "sdxl": diffusers.StableDiffusionXLPipeline,
        "flux": diffusers.FluxPipeline,
        "sd3": diffusers.StableDiffusion3Pipeline,
    }[family]
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    kwargs = {n: components.get(n) for n in names if n not in ("requires_safety_checker", "image_encoder")}
    if "requires_safety_checker" in names:
        kwargs["requires_safety_checker"] = False
    return cls(**kwargs)
