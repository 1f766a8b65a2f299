"""The drop-in recipe of docs/diffusers_scripts.md: peft-ortho adapters inside diffusers' own DreamBooth scripts
(``train_dreambooth_lora_flux.py``, ``train_dreambooth_lora_sd3.py``), performing the calls those scripts make on tiny
transformers built from diffusers' test configurations.

Checked against the real integrations: ``transformer.add_adapter``, a DDP-wrapped training step, peft's
``get_peft_model_state_dict``, the pipelines' own ``save_lora_weights`` / ``load_lora_weights``, and compose's loader
for the statistics written beside the file.
"""

from __future__ import annotations

import gc

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from peft_ortho import InputStatistics, OrthoLoraConfig, testing
from peft_ortho.diffusers_lora import diffusers_lora_metadata
from peft_ortho.merging.load import load_adapter
from peft_ortho.merging.resolve import resolve

# train_dreambooth_lora_flux.py's default --lora_layers.
FLUX_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj"]
FLUX_TARGETS += ["attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj"]
FLUX_TARGETS += ["ff_context.net.2"]


def tiny_flux():
    """diffusers' ``FluxPipelineFastTests.get_dummy_components`` transformer (``peft_ortho.testing``'s), in train mode
    as the script holds it."""
    return testing.tiny_flux_transformer().train()


def flux_inputs(batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 8  # packed 4×4 latents, 8 text tokens
    return {
        "hidden_states": torch.randn(batch, tokens, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": torch.zeros(tokens, 3),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def _half(inputs: dict, part: slice) -> dict:
    return {
        k: v[part] if k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep") else v
        for k, v in inputs.items()
    }


def test_flux_dreambooth_recipe(tmp_path):
    """``transformer.add_adapter(OrthoLoraConfig(...))``, statistics recorded on the instance ("concept") and class
    ("prior") halves of a prior-preservation batch through the DDP wrapper accelerate puts around the transformer,
    one optimizer step, then ``get_peft_model_state_dict`` → ``FluxPipeline.save_lora_weights`` with the metadata line
    → ``load_lora_weights`` into a fresh pipeline: the same outputs as the trained transformer. compose finds the
    statistics beside the file. Without the metadata line (the script's ``_collate_lora_metadata``) loading fails
    loudly instead."""
    import torch.distributed as dist
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from torch.nn.parallel import DistributedDataParallel

    transformer = tiny_flux()
    transformer.requires_grad_(False)
    transformer.add_adapter(OrthoLoraConfig(r=4, lora_alpha=8, target_modules=FLUX_TARGETS, concept_id="alice/rex"))
    stats = InputStatistics({"transformer": transformer})  # before accelerator.prepare; keys as in the LoRA file
    params = [p for p in transformer.parameters() if p.requires_grad]
    assert params and all(".lora_B." in n for n, p in transformer.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    ddp = loss = None
    try:
        ddp = DistributedDataParallel(transformer)  # what accelerator.prepare returns with several processes
        batch = flux_inputs(4, seed=0)  # collate_fn order: 2 instance samples, then 2 class samples
        target = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(1))
        with stats.record("concept"):
            pred_instance = ddp(**_half(batch, slice(0, 2)))[0]
        with stats.record("prior"):
            pred_prior = ddp(**_half(batch, slice(2, 4)))[0]
        model_pred = torch.cat([pred_instance, pred_prior])
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)  # the script's loss, unchanged
        target, target_prior = torch.chunk(target, 2, dim=0)
        loss = (model_pred - target).pow(2).mean() + (model_pred_prior - target_prior).pow(2).mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
        optimizer.step()
        stats.all_reduce()
    finally:
        del ddp, loss  # free DDP's reducer before its process group
        gc.collect()
        dist.destroy_process_group()

    out = tmp_path / "rex-flux"
    lora_layers = get_peft_model_state_dict(transformer)
    FluxPipeline.save_lora_weights(
        str(out),
        transformer_lora_layers=lora_layers,
        transformer_lora_adapter_metadata=diffusers_lora_metadata(transformer.peft_config["default"]),
    )
    stats.save_pretrained(str(out))

    def fresh_pipeline():
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=tiny_flux(),
        )

    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(out))
    x = flux_inputs(2, seed=2)
    with torch.no_grad():
        ref = transformer(**x)[0]
        assert (ref - tiny_flux()(**x)[0]).abs().max() > 1e-3  # the adapter changed the model
        torch.testing.assert_close(pipe.transformer(**x)[0], ref, atol=1e-6, rtol=0)

    adapter = load_adapter(resolve(str(out)))
    assert adapter.statistics is not None
    layers = adapter.statistics.layers
    assert len(layers) == len(lora_layers) // 2 and all(k.startswith("transformer.") for k in layers)
    assert all(set(kinds) == {"concept", "prior"} for kinds in layers.values())

    # The script's own metadata line passes OrthoLoraConfig's fields, which diffusers' LoraConfig(**...) refuses.
    unchanged = tmp_path / "unchanged"
    FluxPipeline.save_lora_weights(
        str(unchanged), transformer_lora_layers=lora_layers, **_collate_lora_metadata({"transformer": transformer})
    )
    with pytest.raises(TypeError, match="LoraConfig"):
        fresh_pipeline().load_lora_weights(str(unchanged))


def tiny_sd3():
    """diffusers' ``StableDiffusion3PipelineFastTests.get_dummy_components`` transformer (``sample_size=32``)."""
    return testing.tiny_sd3_transformer(sample_size=32).train()


def test_sd3_recipe_needs_the_metadata_line(tmp_path):
    """``train_dreambooth_lora_sd3.py`` saves without metadata: diffusers then guesses ``lora_alpha = r`` and a LoRA
    trained with ``lora_alpha = 2r`` would load at half strength, silently. With the recipe's metadata line the
    loaded pipeline computes what the trained transformer computes."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = tiny_sd3()
    transformer.requires_grad_(False)
    targets = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"]
    targets += ["attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]  # the script's defaults
    config = OrthoLoraConfig(r=4, lora_alpha=8, target_modules=targets, slot=1, init_lora_weights=False)
    transformer.add_adapter(config)  # init_lora_weights=False: a non-zero B stands in for a trained adapter
    g = torch.Generator().manual_seed(0)
    x = {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=g),
        "pooled_projections": torch.randn(1, 64, generator=g),
        "timestep": torch.tensor([500.0]),
        "return_dict": False,
    }
    with torch.no_grad():
        ref = transformer(**x)[0]

    def loaded(folder, **metadata):
        StableDiffusion3Pipeline.save_lora_weights(
            str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer), **metadata
        )
        parts = {f"{n}{s}": None for n in ("text_encoder", "tokenizer") for s in ("", "_2", "_3")}
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=tiny_sd3(), **parts
        )
        pipe.load_lora_weights(str(folder))
        with torch.no_grad():
            return pipe.transformer(**x)[0]

    assert (loaded(tmp_path / "as-is") - ref).abs().max() > 1e-3
    recipe = diffusers_lora_metadata(transformer.peft_config["default"])
    torch.testing.assert_close(
        loaded(tmp_path / "recipe", transformer_lora_adapter_metadata=recipe), ref, atol=1e-6, rtol=0
    )
    assert "basis_seed" not in recipe and recipe["lora_alpha"] == 8 and recipe["r"] == 4
