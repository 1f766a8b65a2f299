"""``OrthoLoraModel``: peft's ``LoraModel`` whose ``lora_A`` is frozen to a shared, seeded basis."""

from __future__ import annotations

import warnings

from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer

from ...errors import BasisMismatchError
from ...lora_format import PEFT_PREFIX, parse_lora_key
from .._layers import check_supported_layer
from .layer import expected_basis, init_orthogonal_lora, matches_basis, write_basis


class OrthoLoraModel(LoraModel):
    """Creates an orthogonal-adaptation model (Po et al., 2024) from a base model. See ``OrthoLoraConfig``.

    Everything else (forward, merge/unmerge, several adapters, saving) is peft's LoRA: ``ΔW = s · B A``.
    """

    prefix: str = "lora_"

    def _create_and_replace(
        self, lora_config, adapter_name, target, target_name, parent, current_key, *, parameter_name=None
    ) -> None:
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        check_supported_layer(base_layer, adapter_name, current_key, "OrthoLoraConfig")
        self._warn_reused_random_rows(lora_config, adapter_name)
        super()._create_and_replace(
            lora_config, adapter_name, target, target_name, parent, current_key, parameter_name=parameter_name
        )
        module = target if isinstance(target, LoraLayer) else getattr(parent, target_name)
        init_orthogonal_lora(module, adapter_name, lora_config, current_key)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft upcasts bf16/fp16 adapters to float32 once they exist: write the basis again where the cast happened.

        The basis was written in the base layer's dtype; upcasting that copy would leave a float32 ``lora_A`` holding
        the bfloat16-rounded basis (rows orthogonal only to ~1e-3). Rewriting from float64 rounds once, to the final
        dtype. Only layers whose dtype the cast changed are rewritten, so weights loaded from a checkpoint (peft casts
        again after loading) stay exactly as loaded.
        """
        config = self.peft_config.get(adapter_name) if isinstance(self.peft_config, dict) else None
        layers = {
            name: (module, module.lora_A[adapter_name].weight.dtype)
            for name, module in self.model.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A
        }
        super()._cast_adapter_dtype(adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if config is None:
            return
        for name, (module, dtype) in layers.items():
            if module.lora_A[adapter_name].weight.dtype != dtype:
                write_basis(module, adapter_name, config, name)

    def _warn_reused_random_rows(self, config, adapter_name: str) -> None:
        """``slot="random"`` draws rows once and records them in the config: reusing that config object for another
        adapter gives it the *same* rows, a full collision. Say so once, where it happens."""
        if config.slot != "random":
            return
        owner = (id(self.model), adapter_name)
        if config.random_rows_owner is None:
            config.random_rows_owner = owner
        if config.random_rows_owner != owner and not config.random_rows_warned:
            config.random_rows_warned = True
            warnings.warn(
                f"adapter {adapter_name!r}: this OrthoLoraConfig(slot='random') already drew its rows for another "
                "adapter, so both get the same rows and collide completely when merged. Create a new "
                "OrthoLoraConfig per concept (or use distinct `slot`s / `concept_id`s).",
                UserWarning,
                stacklevel=4,
            )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Refuse a checkpoint whose ``lora_A`` tensors are not the basis its config names (bit-exact check).

        Bit-exact up to rounding: a ``lora_A`` stored as the basis rounded to any float dtype (float64, float32,
        bfloat16, float16) is accepted, since dtype moves before saving (``.double()``, bf16 and back) are legitimate.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for key, tensor in remapped.items():
            m = parse_lora_key(key.removeprefix(PEFT_PREFIX))
            if m is None or m["kind"] != "lora_A" or m["param"] != "weight":
                continue
            layer = m["module"]
            r, n = tensor.shape[0], tensor[0].numel()
            a64 = expected_basis(config, n, r, adapter_name, layer).reshape(tensor.shape)
            if not matches_basis(tensor, a64):
                err = (tensor.detach().cpu().double() - a64).abs().max().item()
                raise BasisMismatchError(
                    f"the checkpoint's lora_A differs from the basis its config names (max abs diff {err:.3g}); "
                    "the file was edited or belongs to another config",
                    adapter=adapter_name,
                    layer=layer,
                )
        return remapped
