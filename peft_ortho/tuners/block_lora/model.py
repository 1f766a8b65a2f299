"""``BlockLoraModel``: peft ``BaseTuner`` for BlockLoRA. See ``BlockLoraConfig``."""

from __future__ import annotations

import hashlib
import random
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ...errors import BlockError
from ...lora_format import PEFT_PREFIX, parse_lora_key
from .._layers import check_supported_layer, refuse_mixed_batches
from .layer import BlockLoraLayer, layer_widths
from .layout import block_span, concept_block, layout_entry, spans_overlap


def _layer_of(key: str) -> str:
    """``base_model.model.<layer>.lora_A.weight`` → ``<layer>`` (lora_format's key rule)."""
    m = parse_lora_key(key.removeprefix(PEFT_PREFIX))
    return m["module"] if m else key


def _factors_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the ``lora_A``/``lora_B`` tensors (layer, factor, dtype, shape and bytes) of a state dict."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state_dict if ".lora_A." in k or ".lora_B." in k):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key.removeprefix('base_model.model.')}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_block(config) -> int:
    """The block index the adapter uses (recorded in ``config.resolved_block`` the first time)."""
    if config.concept_id is not None:
        block = concept_block(config.concept_id, config.num_blocks)
    elif config.block_index == "random":
        block = config.resolved_block
        if block is None:
            block = random.SystemRandom().randrange(config.num_blocks)
            config.block_drawn_here = True  # see BlockLoraModel._remap_adapter_state_dict_for_load
    else:
        block = int(config.block_index)
    if config.resolved_block is not None and config.resolved_block != block:
        raise BlockError(
            f"the config records block {config.resolved_block} but its settings give block {block} "
            f"(block_index={config.block_index!r}, concept_id={config.concept_id!r}, num_blocks={config.num_blocks})"
        )
    config.resolved_block = block
    return block


def layer_block(config, base_layer, adapter_name: str, layer_name: str) -> tuple[int, int]:
    """This layer's ``[start, end)``, checked against the rank and against the layout the config records."""
    n_out, n_in, kernel = layer_widths(base_layer)
    axis = config.block_axis
    n = n_out if axis == "out" else n_in
    if n < config.num_blocks:
        raise BlockError(
            f"{n} {'output' if axis == 'out' else 'input'} channels cannot be split into num_blocks="
            f"{config.num_blocks} blocks; lower num_blocks or exclude this layer",
            adapter=adapter_name,
            layer=layer_name,
        )
    start, end = block_span(n, config.num_blocks, resolve_block(config))
    # rank(ΔW) <= min(rows, columns) of the block's update: a larger r only adds parameters that cannot help.
    rows, cols = (end - start, n_in * kernel) if axis == "out" else (n_out, (end - start) * kernel)
    if config.r > min(rows, cols):
        raise BlockError(
            f"rank {config.r} is too large for this layer's block, a {rows}×{cols} update (at most rank "
            f"{min(rows, cols)}); lower r or num_blocks",
            adapter=adapter_name,
            layer=layer_name,
        )
    entry = layout_entry(n, start, end)
    recorded = (config.block_layout or {}).get(layer_name)
    if recorded is not None and list(recorded) != entry:
        raise BlockError(
            f"the config records block [width, start, end] = {list(recorded)} for this layer but the model gives "
            f"{entry}: the adapter was made for another base model",
            adapter=adapter_name,
            layer=layer_name,
        )
    config.block_layout = {**(config.block_layout or {}), layer_name: entry}
    return start, end


class BlockLoraModel(BaseTuner):
    """Creates a BlockLoRA model from a base model: per targeted layer a LoRA confined to one block.

    Everything a peft user expects works as for LoRA: several named adapters, ``set_adapter``,
    ``disable_adapter()``, ``merge_adapter``/``unmerge_adapter``/``merge_and_unload``, ``save_pretrained`` /
    ``PeftModel.from_pretrained`` (after ``import peft_ortho``).
    """

    prefix: str = "lora_"
    tuner_layer_cls = BlockLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self, config, adapter_name, target, target_name, parent, current_key, *, parameter_name=None, **kwargs
    ) -> None:
        if current_key is None:
            raise ValueError("BlockLoraModel needs the module's key to record its block layout")
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        check_supported_layer(base_layer, adapter_name, current_key, "BlockLoraConfig")
        span = layer_block(config, base_layer, adapter_name, current_key)
        self._warn_overlaps(config, adapter_name, current_key, span)
        layer_kwargs = dict(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            block_axis=config.block_axis,
            block_span=span,
            inference_mode=config.inference_mode,
        )
        if isinstance(target, BlockLoraLayer):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise BlockError(
                f"the layer already holds a {type(target).__name__} adapter; BlockLoRA cannot be stacked on another "
                "tuner's layer",
                adapter=adapter_name,
                layer=current_key,
            )
        new_module = BlockLoraLayer(target)
        new_module.update_layer(adapter_name, **layer_kwargs)
        if adapter_name not in self.active_adapters:  # an added adapter is not trainable until set_adapter
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _enable_peft_forward_hooks(self, *args, **kwargs):
        return refuse_mixed_batches("BlockLoRA", kwargs)

    def _warn_overlaps(self, config, adapter_name: str, layer_name: str, span: tuple[int, int]) -> None:
        """Two adapters of one model in overlapping blocks are legitimate (e.g. comparing two trainings) but will not
        merge: say so once per adapter pair."""
        for other_name, other in self.peft_config.items():
            if other_name == adapter_name or getattr(other, "peft_type", None) != config.peft_type:
                continue
            recorded = (other.block_layout or {}).get(layer_name)
            if (
                recorded is not None
                and other.block_axis == config.block_axis
                and spans_overlap(tuple(recorded[1:]), span)
                and other_name not in config.overlap_warned
            ):
                config.overlap_warned.add(other_name)
                warnings.warn(
                    f"adapter {adapter_name!r} uses the same block as adapter {other_name!r} (layer {layer_name!r}, "
                    f"channels [{span[0]}, {span[1]})): they train the same weights and cannot be merged exactly. "
                    "Use distinct block_index / concept_id values for concepts meant to be merged.",
                    UserWarning,
                    stacklevel=5,
                )

    # ---------------------------------------------------------------------------------------------- provenance on load
    #
    # A BlockLoRA state dict does not record its block: the factors of every block have the same shapes. Loaded into
    # an adapter whose block was given (block_index=int, concept_id) or read from a saved config (resolved_block), the
    # block is the one the tensors were trained in. But an adapter created from block_index="random" drew a fresh block
    # in this process, and a state dict trained elsewhere would land, silently, in the wrong block. Such an adapter
    # accepts only state dicts it saved itself (recognised by their SHA-256), and refuses the others.

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.block_drawn_here:
            keyed = {cls._remove_adapter_name_from_key(k, adapter_name): v for k, v in out.items()}
            config.saved_digests.add(_factors_digest(keyed))
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        if config.block_drawn_here and _factors_digest(state_dict) not in config.saved_digests:
            layers = sorted(_layer_of(k) for k in state_dict if ".lora_A." in k)
            raise BlockError(
                f"this adapter drew block {config.resolved_block} at random when it was created, and a state dict "
                "does not record which block it was trained in, so it cannot be loaded here safely. Load it with its "
                "saved config (PeftModel.from_pretrained, or load_adapter under a new adapter name), or create the "
                "adapter with block_index set to the block it was trained in",
                adapter=adapter_name,
                layer=layers[0] if layers else None,
            )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        if config.bias != "none":
            raise ValueError("BlockLoraModel supports only bias='none'")
