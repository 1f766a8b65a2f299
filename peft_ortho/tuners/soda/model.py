"""``SodaModel``: peft ``BaseTuner`` for SODA (see ``SodaConfig`` and ``layer.py`` for the math)."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from torch import nn

from ...errors import AdapterFileError, BasisMismatchError, IncompatibleAdaptersError
from .._layers import refuse_mixed_batches
from .layer import SodaLayer, cayley, create_soda_module, inverse_cayley
from .lora_conversion import SodaExportReport, soda_lora_state_dict

_HALF = (torch.float16, torch.bfloat16)
# Rotation keys as earlier development versions wrote them, with the adapter name: ``….soda_rotation.<name>.skew.<j>``.
_LEGACY_ROTATION_KEY = re.compile(r"(\.soda_rotation)\.[^.]+(?:\.[^.]+)*?\.((?:skew|stiefel)\.\d+)$")


class SodaModel(BaseTuner):
    """Creates a SODA model (Zhang et al., WACV 2025) from a base model. See ``SodaConfig``.

    Beyond the usual peft API: ``delta_weights(adapter)`` (dense ``W − W0`` per layer) and
    ``add_spectral_combination(adapters, name)`` (sum the spectra, compose the rotations).
    """

    prefix: str = "soda_"
    tuner_layer_cls = SodaLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError("SodaConfig: target_modules must be given (e.g. ['to_q', 'to_k', 'to_v', 'to_out.0'])")
        return peft_config

    def _create_and_replace(
        self, soda_config, adapter_name, target, target_name, parent, current_key, *, parameter_name=None
    ) -> None:
        if parameter_name is not None:
            raise ValueError("SodaConfig does not support target_parameters")
        if isinstance(target, SodaLayer):
            target.update_layer(adapter_name, soda_config, current_key, inference_mode=soda_config.inference_mode)
            return
        new_module = create_soda_module(target, adapter_name, soda_config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Upcast the *trainable* half-precision tensors to float32, as peft does, but leave the frozen decomposition
        in the base model's dtype: peft's generic cast would also upcast those buffers (doubling their memory)."""
        if not autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if not isinstance(module, SodaLayer):
                continue
            spectrum = module.soda_spectrum.get(adapter_name) if adapter_name in module.soda_spectrum else None
            if spectrum is not None and spectrum.dtype in _HALF:
                module.soda_spectrum[adapter_name] = nn.Parameter(
                    spectrum.detach().float(), requires_grad=spectrum.requires_grad
                )
            if adapter_name in module.soda_rotation:
                rotation = module.soda_rotation[adapter_name]
                if any(p.dtype in _HALF for p in rotation.parameters()):
                    rotation.float()

    # --------------------------------------------------------------------------------------------------------- loading

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``<layer>.soda_rotation.<adapter>.skew.<j>`` → ``<layer>.soda_rotation.skew.<j>`` (and ``stiefel``).

        The rotation is a module holding a parameter list, so its adapter name sits third from the end, where peft's
        default (last or second to last) does not look; a key that kept it would load only under that same name.
        """
        head, marker, tail = key.rpartition(f".soda_rotation.{adapter_name}.")
        if marker:
            return f"{head}.soda_rotation.{tail}"
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _enable_peft_forward_hooks(self, *args, **kwargs):
        return refuse_mixed_batches("SODA", kwargs)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Accept files written before rotation keys dropped the adapter name, refuse incomplete or foreign SODA
        tensors, and check the base spectrum (below)."""
        state_dict = {_LEGACY_ROTATION_KEY.sub(r"\1.\2", k): v for k, v in state_dict.items()}
        remapped = cls._check_spectrum(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        current = model.state_dict()
        expected = _filter_state_dict_by_key_prefixes(current, prefixes)
        missing = sorted(k for k in expected if k not in remapped)
        unexpected = sorted(k for k in remapped if ".soda_" in k and k not in current)
        for keys, what in ((missing, "lacks the tensor"), (unexpected, "holds a tensor the model has no place for:")):
            if keys:
                layer = keys[0].removeprefix("base_model.model.").split(".soda_")[0]
                raise AdapterFileError(
                    f"the SODA state dict {what} {keys[0]!r}"
                    + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
                    + "; it was saved for other layers or settings, or is incomplete",
                    adapter=adapter_name,
                    layer=layer,
                )
        return remapped

    @classmethod
    def _check_spectrum(cls, model, config, adapter_name, state_dict):
        """Check that the base spectrum stored with the adapter matches the one just recomputed from the base weights.

        The decomposition is not saved; it is recomputed when the adapter is created. If the base model is not the one
        the adapter was trained on, ``U``/``V`` (or ``Q``) differ and the trained spectrum would be applied to the wrong
        directions: refuse, with the measured difference. Tolerance (relative to ``σ_max``): 1e-3 for float32/64 base
        weights, 2e-2 for half-precision ones (the same model in fp16 shifts σ by ~1e-3).
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        current = dict(model.named_buffers())
        suffix = f".soda_sigma.{adapter_name}"
        for key, saved in remapped.items():
            if not key.endswith(suffix) or key not in current:
                continue
            now = current[key]
            layer = key.removesuffix(suffix).removeprefix("base_model.model.")
            if tuple(saved.shape) != tuple(now.shape):
                raise BasisMismatchError(
                    f"the adapter was trained with {saved.shape[0]} spectrum entries here, the config gives "
                    f"{now.shape[0]}",
                    adapter=adapter_name,
                    layer=layer,
                )
            saved64, now64 = saved.detach().double().cpu(), now.detach().double().cpu()
            scale = now64.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
            rel = ((saved64 - now64).abs().max() / scale).item()
            tol = 2e-2 if now.dtype in _HALF else 1e-3
            if not rel <= tol:
                raise BasisMismatchError(
                    f"the base weights differ from those the adapter was trained on: their spectrum differs by "
                    f"{rel:.3g} (relative to σ_max; tolerance {tol:g}). SODA recomputes its frozen decomposition from "
                    "the base model, so load it onto the same base model",
                    adapter=adapter_name,
                    layer=layer,
                )
        return remapped

    # ---------------------------------------------------------------------------------------------------------- extras

    def soda_layers(self) -> dict[str, SodaLayer]:
        """``{module name: SODA layer}`` of the wrapped model."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, SodaLayer)}

    @torch.no_grad()
    def delta_weights(
        self, adapter_name: str = "default", dtype: Optional[torch.dtype] = None
    ) -> dict[str, torch.Tensor]:
        """The dense update ``W − W0`` of every layer holding ``adapter_name``.

        Args:
            adapter_name: the adapter.
            dtype: of the deltas (default: each base weight's).

        Returns:
            ``{module name: W − W0}``, each shaped like its base weight.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r} (have {sorted(self.peft_config)})")
        return {
            name: layer.get_delta_weight(adapter_name, dtype=dtype)
            for name, layer in self.soda_layers().items()
            if adapter_name in layer.soda_spectrum
        }

    def lora_state_dict(
        self, adapter_name: str = "default", *, rank: Optional[int] = 16, dtype: Optional[torch.dtype] = None
    ) -> tuple[dict[str, torch.Tensor], dict, SodaExportReport]:
        """The adapter as LoRA factors (SODA's ``LoraExport.SVD``): ``soda_lora_state_dict(self, ...)``.

        Args:
            adapter_name: the adapter to convert.
            rank: each layer's LoRA rank (best rank-``k`` approximation); None for exact.
            dtype: of the tensors (default: each base weight's dtype).

        Returns:
            ``(tensors, metadata, report)``, as ``peft_ortho.save_diffusers`` writes them.
        """
        return soda_lora_state_dict(self, adapter_name=adapter_name, rank=rank, dtype=dtype)

    @torch.no_grad()
    def add_spectral_combination(self, adapters: list[str], combination_name: str) -> None:
        """Add adapter ``combination_name`` = the adapters combined in SODA's own parametrisation:

            W = U diag(σ + Σ_i Δσ_i) Vᵀ · R_{a_1} R_{a_2} ⋯ R_{a_n}    (LQ: (L + Σ_i diag(Δ_i)) Q · R_{a_1} ⋯ R_{a_n})

        in the order given: the input is rotated by the *last* adapter's rotation first. Because the rotations are
        Kronecker products with the same factor sizes, the product is again one (``⊗_j M_j^{(1)} ⋯ M_j^{(n)}``), so the
        result is an ordinary SODA adapter (same config as ``adapters[0]``), exactly. It is not the sum of weight deltas
        (the default combination, ``set_adapter([...])``): the spectral deltas are rotated by every adapter's rotation.
        Cayley adapters need each composed factor without eigenvalue −1 (true unless the rotations are large).

        Args:
            adapters: the adapters to combine, in order; the same decomposition, spectrum rank and factor sizes on every
                layer.
            combination_name: the new adapter's name.
        """
        if len(adapters) < 1 or len(set(adapters)) != len(adapters):
            raise ValueError(f"give distinct adapter names, got {adapters!r}")
        for a in adapters:
            if a not in self.peft_config:
                raise ValueError(f"no adapter named {a!r} (have {sorted(self.peft_config)})")
        if combination_name in self.peft_config:
            raise ValueError(f"an adapter named {combination_name!r} already exists")
        configs = [self.peft_config[a] for a in adapters]
        for a, c in zip(adapters, configs):
            for field in ("peft_type", "decomposition", "spectrum_rank", "decomposition_dtype", "rotation"):
                if getattr(c, field) != getattr(configs[0], field):
                    raise IncompatibleAdaptersError(
                        f"{field} is {getattr(c, field)!r} but {adapters[0]!r} has {getattr(configs[0], field)!r}; "
                        "the spectral combination needs the same decomposition, spectrum rank and rotation mode",
                        adapter=a,
                    )
        layers = {n: m for n, m in self.soda_layers().items() if any(a in m.soda_spectrum for a in adapters)}
        for name, layer in layers.items():
            sizes = {layer.soda_settings[a]["sizes"] for a in adapters if a in layer.soda_settings}
            if len(sizes) > 1:
                raise IncompatibleAdaptersError(
                    f"the adapters use different Kronecker factor sizes here {sorted(sizes)}", layer=name
                )
        config = dataclasses.replace(configs[0], init_weights=True, target_modules=sorted(layers))
        self.peft_config[combination_name] = config
        self.inject_adapter(self.model, combination_name)
        for name, layer in layers.items():
            present = [a for a in adapters if a in layer.soda_spectrum]
            spectrum = layer.soda_spectrum[combination_name]
            spectrum.copy_(sum(layer.soda_spectrum[a].detach().to(spectrum.dtype) for a in present))
            target = layer.soda_rotation[combination_name]
            per_factor = [layer._rotation_mats(a, torch.float64) for a in present]
            for j, size in enumerate(target.sizes):
                m = torch.eye(size, dtype=torch.float64, device=spectrum.device)
                for mats in per_factor:
                    m = m @ mats[j].detach().to(m.device)
                if target.mode == "stiefel":
                    target.stiefel[j].copy_(m)
                    continue
                vec = inverse_cayley(m)
                if not torch.allclose(cayley(vec, size), m, atol=1e-8) or not torch.isfinite(vec).all():
                    raise IncompatibleAdaptersError(
                        "the composed rotation has an eigenvalue −1 and no Cayley parameters; combine rotation="
                        "'stiefel' adapters, or use the sum of weight deltas (set_adapter([...]))",
                        adapter=combination_name,
                        layer=name,
                    )
                target.skew[j].copy_(vec)
