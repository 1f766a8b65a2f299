"""Export LoRA-type adapters to the single-file layout diffusers' ``load_lora_weights`` reads.

An orthogonal adapter *is* a standard LoRA (``ΔW = s · B A`` with ``A`` frozen), so the export is lossless: the
``lora_A``/``lora_B`` tensors are written bit-for-bit, and the scale ``s`` (``lora_alpha / r``, per-layer patterns,
rsLoRA) travels in the file's metadata exactly as diffusers itself writes it.

The file (``pytorch_lora_weights.safetensors`` by default) holds:

- tensors ``<component>.<module>.lora_A.weight`` (``(r, in)``, or ``(r, C_in, kh, kw)`` for convs) and
  ``<component>.<module>.lora_B.weight`` (``(out, r)`` / ``(out, r, 1, 1)``), where ``<component>`` is the
  pipeline attribute (``unet``, ``text_encoder``, ``transformer``...) and ``<module>`` the module's name inside it —
  no ``base_model.model.`` prefix, no adapter name;
- safetensors metadata ``{"format": "pt", "lora_adapter_metadata": <json>}``, where the JSON is one flat object
  of plain ``peft.LoraConfig`` keyword arguments prefixed by component (``{"unet.r": 4, "unet.lora_alpha": 8,
  "text_encoder.r": 4, ...}``). diffusers (≥ 0.35) splits it by prefix and calls ``LoraConfig(**fields)``, so only
  fields ``LoraConfig`` accepts may appear (no ``basis_*``, no ``peft_type: ORTHO_LORA``);
- ``peft_ortho_adapter_config``: the original adapter configs per component (seed, slot, basis rows and checksums),
  which diffusers ignores and peft-ortho reads back to check provenance.

Loaders that ignore ``lora_adapter_metadata`` (diffusers < 0.35, other tools) assume ``lora_alpha = r``; for them
export with ``bake_scale=True``, which multiplies each ``lora_B`` by its scale and writes ``lora_alpha = r``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import save_file

from ._io import atomic_dir, check_finite, check_output, mmap_safetensors, read_adapter_folder, refuse_pickle
from .errors import AdapterFileError, UnsupportedAdapterError
from .tuners.block_lora.layout import lora_config_dict, pad_state_dict

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PEFT_ORTHO_METADATA_KEY = "peft_ortho_adapter_config"
PEFT_PREFIX = "base_model.model."

# peft types whose adapters are plain lora_A/lora_B pairs and export as they are.
LORA_LIKE_PEFT_TYPES = ("LORA", "ORTHO_LORA")
# ... and those that become one exactly once their block factor is zero-padded to the whole layer.
BLOCK_PEFT_TYPES = ("BLOCK_LORA",)

# init_lora_weights values that rewrite the *base* weights when the adapter is created: the saved lora_A/lora_B are
# then a delta against a modified base, not against the published one, and would load wrong in diffusers.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")

# Keys of peft adapter state dicts: ``<module>.lora_A.weight`` or, from a live model, ``<module>.lora_A.<name>.weight``.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")


# --------------------------------------------------------------------------------------------------------------------
# state dicts and metadata
# --------------------------------------------------------------------------------------------------------------------


def _check_component(component: str) -> str:
    # diffusers splits keys and metadata on the first "." to find the component.
    if not isinstance(component, str) or not component or "." in component:
        raise ValueError(
            f"component must be a pipeline attribute name such as 'unet' or 'text_encoder', got {component!r}"
        )
    return component


def to_diffusers_state_dict(
    peft_state_dict: Mapping[str, torch.Tensor],
    component: str,
    *,
    adapter_name: str | None = None,
    adapter: str | None = None,
) -> dict[str, torch.Tensor]:
    """peft adapter tensors → diffusers keys: ``<component>.<module>.lora_A.weight`` (tensors unchanged).

    Accepts the keys of ``adapter_model.safetensors`` / ``get_peft_model_state_dict`` (``base_model.model.<module>.
    lora_A.weight``) and those of a live model's ``state_dict()`` restricted to LoRA tensors (``<module>.lora_A.
    <adapter_name>.weight``). With adapter names in the keys, only ``adapter_name``'s tensors are kept (required when
    several adapters are present). Any other tensor (``modules_to_save``, DoRA magnitudes, embedding LoRAs, base
    weights) is refused: diffusers could not load it and dropping it silently would change the model.
    ``adapter`` only names the adapter in error messages.
    """
    _check_component(component)
    parsed = []
    for key, tensor in peft_state_dict.items():
        m = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if m is None:
            raise UnsupportedAdapterError(
                f"tensor {key!r} is not a lora_A/lora_B weight; diffusers can only load LoRA factors (pass the output "
                "of peft's get_peft_model_state_dict, and no modules_to_save / DoRA / embedding adapters)",
                adapter=adapter,
                layer=key,
            )
        parsed.append((m, tensor))
    names = {m["adapter"] for m, _ in parsed if m["adapter"] is not None}
    if names and adapter_name is None:
        if len(names) > 1:
            raise ValueError(f"the state dict holds several adapters {sorted(names)}; pass adapter_name")
        adapter_name = next(iter(names))
    out: dict[str, torch.Tensor] = {}
    for m, tensor in parsed:
        if m["adapter"] is not None and m["adapter"] != adapter_name:
            continue
        # detach + contiguous: safetensors writes the raw buffer; the values (and dtype) are unchanged.
        out[f"{component}.{m['module']}.{m['kind']}.{m['param']}"] = tensor.detach().to("cpu").contiguous()
    if not out:
        raise AdapterFileError(f"no LoRA tensors found for adapter name {adapter_name!r}", adapter=adapter)
    return out


def _config_dict(config) -> dict:
    if config is None:
        raise ValueError("a LoRA config (PeftConfig or its dict) is required")
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # A dict without peft_type is taken as plain LoraConfig keyword arguments (diffusers' own metadata layout).
    peft_type = d.get("peft_type") or "LORA"
    d["peft_type"] = str(getattr(peft_type, "value", peft_type))
    return d


def _jsonable(value):
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return value


def diffusers_lora_metadata(config, *, adapter: str | None = None) -> dict:
    """The plain ``peft.LoraConfig`` keyword arguments diffusers needs to rebuild ``config``'s LoRA exactly.

    ``config``: a ``LoraConfig``/``OrthoLoraConfig`` or its ``to_dict()`` (an ``adapter_config.json``). Returns the
    fields of ``dataclasses.fields(peft.LoraConfig)`` only — ``r``, ``lora_alpha``, ``rank_pattern``,
    ``alpha_pattern``, ``use_rslora``, ``target_modules``, ``lora_dropout``... — so that diffusers'
    ``LoraConfig(**metadata)`` works and gives every layer the same scale (``lora_alpha / r``, or ``/ √r`` with
    rsLoRA) as the original. ``peft_type`` is left out (``LoraConfig`` sets ``LORA``) and so are peft-ortho's basis
    fields; ``init_lora_weights`` is set to ``True`` because the loader overwrites every factor from the file anyway.
    Refuses (``UnsupportedAdapterError``) what a plain LoRA cannot reproduce: other peft types, DoRA,
    ``modules_to_save``, trainable tokens, target parameters, layer replication, base-modifying initialisations.
    """
    from peft import LoraConfig

    d = _config_dict(config)
    if d["peft_type"] in BLOCK_PEFT_TYPES:
        d = lora_config_dict(d)
    peft_type = d["peft_type"]
    if peft_type not in LORA_LIKE_PEFT_TYPES:
        raise UnsupportedAdapterError(
            f"peft_type {peft_type!r} cannot be exported to diffusers: only LoRA-type adapters "
            f"({', '.join(LORA_LIKE_PEFT_TYPES + BLOCK_PEFT_TYPES)}) are lora_A/lora_B pairs diffusers can load",
            adapter=adapter,
        )
    refusals = {
        "use_dora": "DoRA rescales the weights by a learned magnitude a plain LoRA cannot express",
        "modules_to_save": "modules_to_save replaces whole modules; diffusers LoRA files hold only low-rank factors",
        "trainable_token_indices": "trainable token embeddings are not LoRA factors",
        "target_parameters": "LoRA on nn.Parameter targets is not loadable by diffusers",
        "layer_replication": "layer replication changes the base model's structure",
    }
    for field, why in refusals.items():
        if d.get(field):
            raise UnsupportedAdapterError(
                f"{field}={d[field]!r} cannot be exported to diffusers: {why}", adapter=adapter
            )
    init = d.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnsupportedAdapterError(
            f"init_lora_weights={init!r} modified the base weights when the adapter was created, so its factors are "
            "not a delta against the original base model; convert it first (peft's save_pretrained("
            "path_initial_model_for_weight_conversion=...)) and export the converted adapter",
            adapter=adapter,
        )
    accepted = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    # LoraConfig sets its own peft_type; task heads don't apply to a pipeline component; inference_mode (True in
    # saved configs, False in live ones) is left to diffusers' default so both export the same file.
    dropped = {"peft_type", "task_type", "auto_mapping", "inference_mode"}
    meta = {k: _jsonable(v) for k, v in d.items() if k in accepted and k not in dropped}
    meta["init_lora_weights"] = True
    for key in ("target_modules", "exclude_modules"):  # peft stores these as sets: order carries no meaning
        if isinstance(meta.get(key), list):
            meta[key] = sorted(meta[key])
    # Round-trip through JSON now, so what is checked below is exactly what diffusers will read.
    meta = json.loads(json.dumps(meta, sort_keys=True))
    try:
        LoraConfig(**meta)
    except (TypeError, ValueError) as e:
        raise UnsupportedAdapterError(
            f"the config cannot be expressed as a plain peft LoraConfig ({e})", adapter=adapter
        ) from e
    return meta


def _module_rank_alpha(meta: dict, module: str) -> tuple[int, float]:
    """``(r, lora_alpha)`` that peft gives ``module`` under this config (same pattern matching as peft)."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = meta.get("rank_pattern") or {}, meta.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), meta["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), meta["lora_alpha"])
    return r, alpha


def _group_modules(tensors: Mapping[str, torch.Tensor], component: str) -> dict[str, dict[str, str]]:
    """``{module: {"lora_A.weight": key, "lora_B.weight": key, ...}}`` for component-relative keys, else an error."""
    modules: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = _LORA_KEY.match(key)
        if m is None or m["adapter"] is not None or key.startswith(PEFT_PREFIX):
            raise ValueError(
                f"{component}: tensor key {key!r} is not '<module>.lora_A.weight' / '<module>.lora_B.weight' "
                "(component-relative, no 'base_model.model.' prefix, no adapter name)"
            )
        modules.setdefault(m["module"], {})[f"{m['kind']}.{m['param']}"] = key
    return modules


def _checked_component(component: str, tensors: Mapping[str, torch.Tensor], meta: dict, adapter: str | None) -> dict:
    """Validate one component's tensors against its metadata; return the metadata diffusers will use.

    Every module needs both factors with matching rank, the rank the config gives it, and must be targeted by the
    config (otherwise the config's ``target_modules`` is replaced by the exact module list).
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = _group_modules(tensors, component)
    config = LoraConfig(**meta)
    for module, keys in sorted(modules.items()):
        layer = f"{component}.{module}"
        if "lora_A.weight" not in keys or "lora_B.weight" not in keys:
            missing = "lora_B" if "lora_A.weight" in keys else "lora_A"
            raise AdapterFileError(f"{missing} weight is missing", adapter=adapter, layer=layer)
        a, b = tensors[keys["lora_A.weight"]], tensors[keys["lora_B.weight"]]
        if a.ndim < 2 or b.ndim < 2 or a.shape[0] != b.shape[1]:
            raise AdapterFileError(
                f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not factors of one rank",
                adapter=adapter,
                layer=layer,
            )
        r, _ = _module_rank_alpha(meta, module)
        if r != a.shape[0]:
            raise AdapterFileError(
                f"the config gives this layer rank {r} but its tensors have rank {a.shape[0]}",
                adapter=adapter,
                layer=layer,
            )
        if "lora_B.bias" in keys and not meta.get("lora_bias"):
            raise AdapterFileError(
                "lora_B.bias present but the config has lora_bias=False", adapter=adapter, layer=layer
            )
    if not all(bool(check_target_module_exists(config, module)) for module in modules):
        # e.g. "all-linear", or patterns diffusers would resolve differently: name the modules exactly instead.
        meta = {**meta, "target_modules": sorted(modules), "exclude_modules": None}
        meta.update(layers_to_transform=None, layers_pattern=None)
    return meta


def _bake_scale(tensors: dict[str, torch.Tensor], meta: dict, component: str) -> tuple[dict, dict]:
    """Multiply each ``lora_B`` by its layer's scale and return metadata with scale 1 (``lora_alpha = r``)."""
    out = dict(tensors)
    for module, keys in _group_modules(tensors, component).items():
        r, alpha = _module_rank_alpha(meta, module)
        scale = alpha / math.sqrt(r) if meta.get("use_rslora") else alpha / r
        for k in ("lora_B.weight", "lora_B.bias"):
            if k in keys:
                b = tensors[keys[k]]
                out[keys[k]] = (b.double() * scale).to(b.dtype).contiguous()
    rank_pattern = dict(meta.get("rank_pattern") or {})
    return out, {**meta, "lora_alpha": meta["r"], "alpha_pattern": rank_pattern, "use_rslora": False}


def write_diffusers_file(
    out_dir: str | os.PathLike,
    tensors_by_component: Mapping[str, Mapping[str, torch.Tensor]],
    metadata_by_component: Mapping[str, object],
    *,
    overwrite: bool = False,
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
    adapter_configs: Mapping[str, dict] | None = None,
    adapter: str | Mapping[str, str] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
) -> str:
    """Write one diffusers LoRA file into ``out_dir`` (atomically) and return its path.

    ``tensors_by_component``: ``{"unet": {"<module>.lora_A.weight": A, "<module>.lora_B.weight": B, ...}, ...}``
    with keys relative to the component (diffusers' layout minus the component prefix) and peft's stored shapes.
    ``metadata_by_component``: per component, a ``LoraConfig``, an ``OrthoLoraConfig`` or a config dict; it is
    reduced to plain ``LoraConfig`` fields with ``diffusers_lora_metadata`` and checked against the tensors (rank per
    layer, targeting), so a file diffusers would load with a wrong scale is never written. ``adapter_configs``:
    optional full configs per component, stored for provenance under ``peft_ortho_adapter_config``. Tensors must be
    finite. ``out_dir`` must be empty or absent unless ``overwrite``; it is replaced in one rename on success and
    left untouched on failure. ``adapter`` (one name, or one per component) names the adapter in errors.
    ``inputs``: paths the tensors were read from; ``out_dir`` may not be, contain or lie inside any of them.
    """
    check_output(out_dir, inputs)
    if not tensors_by_component:
        raise ValueError("nothing to export: no component has LoRA tensors")
    if set(metadata_by_component) != set(tensors_by_component):
        raise ValueError(
            f"metadata components {sorted(metadata_by_component)} do not match tensor components "
            f"{sorted(tensors_by_component)}"
        )
    state_dict: dict[str, torch.Tensor] = {}
    flat_meta: dict = {}
    for component, tensors in tensors_by_component.items():
        _check_component(component)
        name = adapter.get(component) if isinstance(adapter, Mapping) else adapter
        if not tensors:
            raise ValueError(f"component {component!r} has no tensors")
        check_finite({f"{component}.{k}": v for k, v in tensors.items()}, adapter=name)
        meta = diffusers_lora_metadata(metadata_by_component[component], adapter=name)
        meta = _checked_component(component, tensors, meta, name)
        # diffusers' _pack_dict_with_prefix: "<component>.<field>" keys in one flat object.
        flat_meta.update({f"{component}.{k}": v for k, v in meta.items()})
        state_dict.update({f"{component}.{k}": v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    file_metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(flat_meta, indent=2, sort_keys=True),
    }
    if adapter_configs:
        provenance = {c: {k: _jsonable(v) for k, v in _config_dict(cfg).items()} for c, cfg in adapter_configs.items()}
        file_metadata[PEFT_ORTHO_METADATA_KEY] = json.dumps(provenance, sort_keys=True, default=str)
    if os.path.basename(weight_name) != weight_name or not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name must be a plain '*.safetensors' file name, got {weight_name!r}")
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        save_file(state_dict, os.path.join(tmp, weight_name), metadata=file_metadata)
    return os.path.join(os.path.abspath(os.fspath(out_dir)), weight_name)


# --------------------------------------------------------------------------------------------------------------------
# reading adapters: live models and saved folders
# --------------------------------------------------------------------------------------------------------------------


def _read_adapter_folder(folder: str, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """``(config dict, peft state dict, name for errors)`` of a saved adapter folder (safetensors only)."""
    name = os.fspath(folder)
    if adapter_name != "default" and os.path.isfile(os.path.join(folder, adapter_name, "adapter_config.json")):
        folder = os.path.join(folder, adapter_name)  # PeftModel.save_pretrained puts other adapters in sub-folders
    if os.path.isfile(folder):
        refuse_pickle(folder, adapter=name)
        raise AdapterFileError(
            "expected an adapter folder (adapter_config.json + adapter_model.safetensors)", adapter=name
        )
    config, weights = read_adapter_folder(folder, adapter=name)
    tensors, _ = mmap_safetensors(weights, adapter=name)
    return config, tensors, name


def _base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_component_matches_model(model, component: str, name: str) -> None:
    """Refuse an export whose keys would not match the pipeline part the model is (diffusers would ignore them)."""
    base = _base_of(model)
    is_diffusers = any(c.__module__.startswith("diffusers.") for c in type(base).__mro__)
    is_transformers = any(c.__module__.startswith("transformers.") for c in type(base).__mro__)
    if is_transformers and not is_diffusers and component in ("unet", "transformer"):
        raise ValueError(
            f"adapter {name!r} is on a transformers model ({type(base).__name__}) but component={component!r}; "
            "pass component='text_encoder' (or 'text_encoder_2', ...)"
        )
    if is_diffusers and component.startswith("text_encoder"):
        raise ValueError(
            f"adapter {name!r} is on a diffusers model ({type(base).__name__}) but component={component!r}; "
            "pass component='unet' or 'transformer'"
        )


def _read_live_adapter(model, adapter_name: str, component: str) -> tuple[object, dict[str, torch.Tensor], str]:
    from peft import get_peft_model_state_dict

    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping):
        raise TypeError(
            f"expected a PeftModel, a model with injected peft adapters, or an adapter folder; got {type(model).__name__}"
        )
    if adapter_name not in configs:
        raise AdapterFileError(
            f"the model has no adapter of this name (it has {sorted(configs)})", adapter=adapter_name
        )
    config = configs[adapter_name]
    diffusers_lora_metadata(config, adapter=adapter_name)  # refuse unsupported types before touching tensors
    _check_component_matches_model(model, component, adapter_name)
    return config, get_peft_model_state_dict(model, adapter_name=adapter_name), adapter_name


def collect_diffusers_lora(
    model_or_dir, component: str = "unet", *, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], object, str]:
    """One adapter's tensors in component-relative diffusers keys, its config, and its name for messages.

    ``model_or_dir``: a ``PeftModel``, a model with injected adapters (``get_peft_model``/``add_adapter``), or a
    saved adapter folder. Tensors are the adapter's own (bit-exact), keyed ``<module>.lora_A.weight``.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        config, peft_state_dict, name = _read_adapter_folder(os.fspath(model_or_dir), adapter_name)
        diffusers_lora_metadata(config, adapter=name)
    else:
        config, peft_state_dict, name = _read_live_adapter(model_or_dir, adapter_name, component)
    config_dict = _config_dict(config)
    if config_dict["peft_type"] in BLOCK_PEFT_TYPES:  # stored as blocks; diffusers needs the whole layers' factors
        peft_state_dict = pad_state_dict(config_dict, peft_state_dict, adapter=name)
    prefixed = to_diffusers_state_dict(peft_state_dict, component, adapter=name)
    check_finite(prefixed, adapter=name)
    tensors = {k.removeprefix(f"{component}."): v for k, v in prefixed.items()}
    return tensors, config, name


def save_diffusers(
    model_or_dir,
    out_dir: str | os.PathLike,
    component: str = "unet",
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
    bake_scale: bool = False,
) -> str:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(out_dir)``; return its path.

    ``model_or_dir``: a ``PeftModel`` (e.g. ``get_peft_model(pipe.unet, OrthoLoraConfig(...))``), a model with
    injected adapters, a saved adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``; pickled
    weights are refused), or a mapping ``{component: model_or_dir}`` to put e.g. the UNet's and the text encoder's
    adapters into one file (``component`` is then ignored). Works for ``OrthoLoraConfig`` and plain ``LoraConfig``
    adapters; other peft types, NaN/Inf weights and missing files raise peft-ortho errors naming the adapter (and
    layer). The tensors are written unchanged and the scale travels in the metadata, so the loaded pipeline computes
    exactly what the peft model does; ``bake_scale=True`` instead folds each layer's scale into ``lora_B`` for
    loaders that ignore the metadata (diffusers < 0.35, other tools), at the cost of one rounding per weight.
    Written atomically: an interrupted export leaves ``out_dir`` as it was.
    """
    sources = dict(model_or_dir) if isinstance(model_or_dir, Mapping) else {component: model_or_dir}
    if not sources:
        raise ValueError("nothing to export: the mapping of components is empty")
    inputs = [os.fspath(s) for s in sources.values() if isinstance(s, (str, os.PathLike))]
    check_output(out_dir, inputs)  # before anything is read
    tensors_by_component, metadata_by_component, configs, names = {}, {}, {}, {}
    for comp, source in sources.items():
        _check_component(comp)
        tensors, config, name = collect_diffusers_lora(source, comp, adapter_name=adapter_name)
        meta = diffusers_lora_metadata(config, adapter=name)
        if bake_scale:
            tensors, meta = _bake_scale(tensors, meta, comp)
        tensors_by_component[comp], metadata_by_component[comp] = tensors, meta
        configs[comp], names[comp] = config, name
    return write_diffusers_file(
        out_dir,
        tensors_by_component,
        metadata_by_component,
        overwrite=overwrite,
        weight_name=weight_name,
        adapter_configs=configs,
        adapter=names,
        inputs=inputs,
    )
