"""``OrthoLoraModel``: peft's ``LoraModel`` whose ``lora_A`` is frozen to a shared, seeded basis."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer

from ...errors import BasisMismatchError
from .layer import check_supported_layer, expected_basis, init_orthogonal_lora


class OrthoLoraModel(LoraModel):
    """Creates an orthogonal-adaptation model (Po et al., 2024) from a base model. See ``OrthoLoraConfig``.

    Everything else (forward, merge/unmerge, several adapters, saving) is peft's LoRA: ``ΔW = s · B A``.
    """

    prefix: str = "lora_"

    def _create_and_replace(
        self, lora_config, adapter_name, target, target_name, parent, current_key, *, parameter_name=None
    ) -> None:
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        check_supported_layer(base_layer, adapter_name, current_key)
        super()._create_and_replace(
            lora_config, adapter_name, target, target_name, parent, current_key, parameter_name=parameter_name
        )
        module = target if isinstance(target, LoraLayer) else getattr(parent, target_name)
        init_orthogonal_lora(module, adapter_name, lora_config, current_key)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Refuse a checkpoint whose ``lora_A`` tensors are not the basis its config names (bit-exact check)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for key, tensor in remapped.items():
            if ".lora_A." not in key or not key.endswith(".weight"):
                continue
            layer = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            r, n = tensor.shape[0], tensor[0].numel()
            expected = expected_basis(config, n, r, adapter_name, layer).reshape(tensor.shape).to(tensor.dtype)
            if not torch.equal(tensor.cpu(), expected):
                err = (tensor.cpu().double() - expected.double()).abs().max().item()
                raise BasisMismatchError(
                    f"the checkpoint's lora_A differs from the basis its config names (max abs diff {err:.3g}); "
                    "the file was edited or belongs to another config",
                    adapter=adapter_name,
                    layer=layer,
                )
        return remapped
