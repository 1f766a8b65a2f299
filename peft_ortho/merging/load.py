"""Local files → ``Adapter``: config, per-layer LoRA factors and scales, read lazily from safetensors.

Accepted layouts, all normalised to ``{component: {layer: (lora_A key, lora_B key)}}``:

- a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``; keys
  ``base_model.model.<layer>.lora_A.weight``), component ``None``;
- a diffusers LoRA file (``unet.<layer>.lora_A.weight``, ``text_encoder.…``; alpha from the
  ``lora_adapter_metadata`` header or ``.alpha`` tensors);
- a kohya / older diffusers file, converted with diffusers' own converters (``lora_state_dict``).

Tensors are zero-copy views of a private memory map of each file: pages are read when a layer is used, so holding
many adapters costs little and a merge reads each weight once.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch

from .._io import mmap_safetensors, read_adapter_folder
from .._registry import lora_types, tuner_facts
from .._validate import check_name, check_scale, validate_adapter_config
from ..errors import AdapterFileError
from ..lora_format import (
    LORA_ADAPTER_METADATA_KEY,
    PEFT_PREFIX,
    check_components,
    convert_community,
    lora_scale,
    normalise_text_encoder_key,
    pair_lora_keys,
)
from ..peft_types import LoraExport, PeftOrthoType
from ..statistics import (
    STATISTICS_NAME,
    STATISTICS_SUFFIX,
    AdapterStatistics,
    check_statistics,
    is_statistics_file,
    layer_key,
    load_statistics,
)
from ..tuners.block_lora.layout import block_entry, check_block_factor, pad_factor, stored_dim
from .resolve import Source


class UnknownScaleWarning(UserWarning):
    """A LoRA file does not record its scale (``lora_alpha``); it is read with ``lora_alpha = r``."""


@dataclass
class LayerFactors:
    """One layer of one adapter: ``ΔW = scale · B A`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)`` (flattened).

    ``a_shape``/``b_shape`` keep the stored shapes (``(r, C, kh, kw)`` / ``(out, r, 1, 1)`` for convs) for export.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    stored_dtype: torch.dtype = torch.float32

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class Adapter:
    """One adapter read from disk: where it came from, its config, and its layers' factors (memory-mapped views)."""

    source: Source
    config: dict
    peft_type: str
    layer_keys: dict[tuple[str | None, str], tuple[str, str]]
    scales: dict[tuple[str | None, str], float]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    # Per-layer input statistics (recorded by the trainer, or computed by ``compose(..., calibrate=...)``); the
    # statistics merge (``method="regmean"``) and the report's predictions need them.
    statistics: AdapterStatistics | None = field(default=None, repr=False)
    # Caches of the checks (``merging.check``): the basis the config names, and the layers by input width.
    basis_spec: object | None = field(default=None, repr=False, compare=False)
    width_index: dict[int, set] | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def is_orthogonal(self) -> bool:
        return self.peft_type == PeftOrthoType.ORTHO_LORA.value

    @property
    def is_block(self) -> bool:
        """True for an adapter stored as one block of each layer (BlockLoRA): its factors are padded to read them."""
        facts = tuner_facts(self.peft_type)
        return facts is not None and facts.lora_export is LoraExport.PADDED_BLOCKS

    def block(self, layer: tuple[str | None, str]) -> tuple[str, int, int, int] | None:
        """``(axis, width, start, end)`` of a BlockLoRA adapter's block on ``layer`` (from its config); else None."""
        if not self.is_block:
            return None
        n, start, end = block_entry(self.config, layer[1], adapter=self.name)
        return self.config.get("block_axis", "out"), n, start, end

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def layers(self) -> list[tuple[str | None, str]]:
        return list(self.layer_keys)

    def assign_component(self, component: str) -> None:
        """Place a PEFT-folder adapter (component ``None``) under ``component``, to merge it with diffusers files.

        Its statistics, keyed by the folder's layer names, are re-keyed ``"component.layer"`` alike.
        """
        if self.statistics is not None and any(c is None for c, _ in self.layer_keys):
            self.statistics = self.statistics.with_prefix(component)
        self.layer_keys = {(c if c is not None else component, n): v for (c, n), v in self.layer_keys.items()}
        self.width_index = None
        self.scales = {(c if c is not None else component, n): v for (c, n), v in self.scales.items()}

    def delta_shape(self, layer: tuple[str | None, str]) -> tuple[int, int]:
        """``(out, in)`` of the layer's ΔW (from shapes only; nothing is read)."""
        a, b = self._stored(layer, pad=False)
        out, n_in = b.shape[0], math.prod(a.shape[1:])
        block = self.block(layer)
        if block is not None:  # the stored factor holds only the block: the layer's width is in the layout
            axis, n = block[:2]
            out, n_in = (n, n_in) if axis == "out" else (out, n * math.prod(a.shape[2:]))
        return out, n_in

    def _stored(self, layer: tuple[str | None, str], pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_B)`` as stored; a block adapter's block factor zero-padded to the whole layer if ``pad``."""
        a_key, b_key = self.layer_keys[layer]
        a, b = self.tensors[a_key], self.tensors[b_key]
        block = self.block(layer)
        if block is None:
            return a, b
        axis, n, start, end = block
        kind, _ = stored_dim(axis)
        factor = b if kind == "lora_B" else a
        check_block_factor(factor, axis, (n, start, end), adapter=self.name, layer=layer[1])
        if pad:
            factor = pad_factor(factor, axis, start, n)
        return (a, factor) if kind == "lora_B" else (factor, b)

    def factors(self, layer: tuple[str | None, str], dtype: torch.dtype = torch.float32) -> LayerFactors:
        a, b = self._stored(layer)
        return LayerFactors(
            A=a.reshape(a.shape[0], -1).to(dtype),
            B=b.reshape(b.shape[0], -1).to(dtype),
            scale=self.scales[layer],
            a_shape=tuple(a.shape),
            b_shape=tuple(b.shape),
            stored_dtype=a.dtype,
        )


def _scale(config: dict, layer: str, r: int) -> float:
    return lora_scale(config, layer, r)


def _pair_keys(keys, strip: str, adapter: str) -> dict[str, tuple[str, str]]:
    return pair_lora_keys(keys, strip, adapter)


def _check_factors(tensors: dict, pairs: dict[str, tuple[str, str]], adapter: str) -> None:
    """Both factors floating point, at least 2-D, of rank ≥ 1 (shapes only; nothing is read)."""
    for layer, keys in pairs.items():
        for key in keys:
            t = tensors[key]
            if not t.is_floating_point() or t.ndim < 2 or t.shape[0 if key == keys[0] else 1] == 0:
                raise AdapterFileError(
                    f"tensor {key!r} of shape {tuple(t.shape)} and dtype {t.dtype} is not a LoRA factor "
                    "(floating point, at least 2-D, rank at least 1)",
                    adapter=adapter,
                    layer=layer,
                )


def load_adapter(source: Source, *, family: str | None = None, unet_config=None) -> Adapter:
    """Read one resolved source (config + tensor index; tensors stay lazy), with its statistics when it has them.

    ``family`` (``"sd"``, ``"sdxl"``, ``"flux"``, ``"sd3"``) and ``unet_config`` pick the diffusers converter for a
    community single-file LoRA (kohya, A1111, ComfyUI, BFL, XLabs); inferred from its keys when None.

    Statistics (``Adapter.statistics``) are read from ``adapter_statistics.safetensors`` in a PEFT folder; for a
    single LoRA file ``x.safetensors`` from the sibling ``x.statistics.safetensors``, or from
    ``adapter_statistics.safetensors`` beside it when it is the folder's only LoRA file (a diffusers LoRA folder or
    Hub repo). They are validated (``load_statistics``) and must name only the adapter's layers, at their widths.
    """
    if os.path.isdir(source.path):
        adapter = _load_peft_folder(source)
    else:
        adapter = _load_single_file(source, family=family, unet_config=unet_config)
    path = statistics_path(source.path)
    if path is not None:
        stats = load_statistics(path, adapter=source.name)
        widths = {layer_key(c, n): adapter.delta_shape((c, n))[1] for c, n in adapter.layers()}
        check_statistics(stats, widths, adapter=source.name)
        adapter.statistics = stats
    return adapter


def statistics_path(path: str) -> str | None:
    """The statistics file that belongs to an adapter folder or single LoRA file, if there is one."""
    if os.path.isdir(path):
        candidate = os.path.join(path, STATISTICS_NAME)
        return candidate if os.path.isfile(candidate) else None
    sibling = path[: -len(".safetensors")] + STATISTICS_SUFFIX if path.endswith(".safetensors") else None
    if sibling is not None and os.path.isfile(sibling):
        return sibling
    folder = os.path.dirname(path)
    beside = os.path.join(folder, STATISTICS_NAME)
    if os.path.isfile(beside):
        weights = [f for f in os.listdir(folder) if f.endswith(".safetensors") and not is_statistics_file(f)]
        if weights == [os.path.basename(path)]:
            return beside
    return None


def _load_peft_folder(source: Source) -> Adapter:
    folder, name = source.path, source.name
    config, weights = read_adapter_folder(folder, adapter=name)
    peft_type = str(config.get("peft_type"))
    facts = tuner_facts(peft_type)
    if facts is None or not facts.stores_lora_factors:  # an SVD-exported tuner's update needs its base weights
        supported = lora_types(LoraExport.AS_IS, LoraExport.PADDED_BLOCKS)
        raise AdapterFileError(
            f"peft_type {peft_type!r} cannot be merged (supported: {', '.join(supported)})", adapter=name
        )
    tensors, _ = mmap_safetensors(weights, adapter=name)
    for key in tensors:
        check_name(key, adapter=name)
    pairs = _pair_keys(tensors, PEFT_PREFIX, name)
    _check_factors(tensors, pairs, name)
    layer_keys, scales = {}, {}
    for layer, (a_key, b_key) in pairs.items():
        layer_keys[(None, layer)] = (a_key, b_key)
        try:
            scales[(None, layer)] = _scale(config, layer, tensors[a_key].shape[0])
        except AdapterFileError as e:
            raise AdapterFileError(str(e), adapter=name) from e
    return Adapter(source, config, peft_type, layer_keys, scales, tensors)


def _load_single_file(source: Source, *, family: str | None = None, unet_config=None) -> Adapter:
    path, name = source.path, source.name
    tensors, metadata = mmap_safetensors(path, adapter=name)
    for key in tensors:
        check_name(key, adapter=name)
    meta_config = _read_lora_metadata(metadata, name)
    if not any(".lora_A." in k for k in tensors):
        tensors, alphas, family = convert_community(tensors, family=family, unet_config=unet_config, adapter=name)
        alphas = {k: float(check_scale(a, field="alpha")) for k, a in alphas.items()}
    else:
        alphas = {
            normalise_text_encoder_key(k[: -len(".alpha")]): _alpha_value(v, k, name)
            for k, v in tensors.items()
            if k.endswith(".alpha")
        }
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
        if meta_config is None and not alphas:
            warnings.warn(
                f"adapter {name!r}: the file records no scale (no {LORA_ADAPTER_METADATA_KEY} header, no .alpha "
                "tensors), so it is read with lora_alpha = r (scale 1), as diffusers reads it; if it was trained "
                "with lora_alpha != r the merge is off by alpha/r — re-save it with its alpha (e.g. "
                "save_lora_weights(..., unet_lora_adapter_metadata=...)) to be sure",
                UnknownScaleWarning,
                stacklevel=3,
            )
    # transformers 5's CLIPTextModel has no ``text_model.`` level; older files (kohya, diffusers < 0.35) do. One
    # spelling per layer, so the same module from two files is recognised as one layer.
    tensors = {normalise_text_encoder_key(k): v for k, v in tensors.items()}
    components = sorted({k.split(".", 1)[0] for k in tensors})
    check_components(components, adapter=name)
    layer_keys, scales = {}, {}
    for component in components:
        pairs = _pair_keys([k for k in tensors if k.startswith(component + ".")], component + ".", name)
        _check_factors(tensors, pairs, name)
        comp_meta = _component_metadata(meta_config, component)
        if comp_meta is not None:
            validate_adapter_config(comp_meta, adapter=name, source=f"lora_adapter_metadata ({component})")
        for layer, (a_key, b_key) in pairs.items():
            r = tensors[a_key].shape[0]
            if comp_meta is not None:
                scale = _scale(comp_meta, layer, r)
            else:
                alpha = alphas.get(f"{component}.{layer}", alphas.get(a_key[: -len(".weight")], r))
                scale = alpha / r
            layer_keys[(component, layer)] = (a_key, b_key)
            scales[(component, layer)] = scale
    config = {"peft_type": "LORA", "base_model_name_or_path": None, "format": "single-file", "family": family}
    return Adapter(source, config, "LORA", layer_keys, scales, tensors)


def _read_lora_metadata(metadata: dict[str, str], name: str) -> dict | None:
    """The ``lora_adapter_metadata`` object diffusers writes into the file's header, or None."""
    text = metadata.get("lora_adapter_metadata")
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise AdapterFileError(f"lora_adapter_metadata is not valid JSON ({e})", adapter=name) from e
    if not isinstance(meta, dict):
        raise AdapterFileError(
            f"lora_adapter_metadata holds a JSON {type(meta).__name__}, not an object", adapter=name
        )
    return meta


def _alpha_value(tensor, key: str, name: str) -> float:
    """A kohya-style ``<layer>.alpha`` tensor: one finite number."""
    if tensor.numel() != 1:
        raise AdapterFileError(f"alpha tensor has {tensor.numel()} values, expected 1", adapter=name, layer=key)
    try:
        return float(check_scale(float(tensor.reshape(()).double()), field="alpha"))
    except AdapterFileError as e:
        raise AdapterFileError(str(e), adapter=name, layer=key) from e


def _component_metadata(meta: dict | None, component: str) -> dict | None:
    """diffusers writes per-component LoraConfig dicts as ``{"unet.r": 4, ...}`` or nested; accept both."""
    if meta is None:
        return None
    if component in meta and isinstance(meta[component], dict):
        return meta[component]
    prefixed = {k[len(component) + 1 :]: v for k, v in meta.items() if k.startswith(component + ".")}
    return prefixed or (meta if "r" in meta else None)
