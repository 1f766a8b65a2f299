"""The diffusers LoRA file: what ``pipe.load_lora_weights`` reads, and ``save_diffusers``, which writes one.

Each tuner says how it becomes a LoRA (``TunerFacts.lora_export``), and ``save_diffusers`` follows it:

- as is (LoRA, OrthoLoRA): an orthogonal adapter *is* a standard LoRA (``ΔW = s · B A`` with ``A`` frozen), so the
  export is lossless: the ``lora_A``/``lora_B`` tensors are written bit-for-bit, and the scale ``s``
  (``lora_alpha / r``, per-layer patterns, rsLoRA) travels in the file's metadata exactly as diffusers writes it;
- padded blocks (BlockLoRA): each stored block is zero-padded to the whole layer, also exact;
- SVD (SODA): the dense update ``ΔW`` of each layer is factored by its tuner's LoRA conversion
  (``peft_ortho.tuners.soda.lora_conversion``), rank ``svd_rank`` or exactly, the error in the card.

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
import os
from collections.abc import Iterable, Mapping

import torch
from diffusers.loaders.lora_base import _pack_dict_with_prefix
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import save_file

from ._io import atomic_dir, check_finite, check_output, mmap_safetensors, read_adapter_folder, refuse_pickle
from ._registry import lora_types, tuner_facts
from .cards import model_card
from .errors import AdapterFileError, UnsupportedAdapterError
from .lora_format import (
    DIFFUSERS_WEIGHT_NAME,
    LORA_ADAPTER_METADATA_KEY,
    PEFT_PREFIX,
    check_loadable,
    config_dict,
    infer_component,
    jsonable,
    lora_scale,
    metadata_json,
    module_rank_alpha,
    parse_lora_key,
    plain_lora_refusal,
)
from .peft_types import LoraExport
from .tuners.block_lora.layout import lora_config_dict, pad_state_dict

__all__ = [
    "PEFT_ORTHO_METADATA_KEY",
    "collect_diffusers_lora",
    "convert_by_svd",
    "diffusers_lora_metadata",
    "resolve_dtype",
    "save_diffusers",
    "to_diffusers_state_dict",
    "write_diffusers_file",
]

PEFT_ORTHO_METADATA_KEY = "peft_ortho_adapter_config"
# The rank of an SVD export (SODA) when none is given; None exports exactly.
SVD_RANK = 16


# -------------------------------------------------------------------------------------------- state dicts and metadata


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

    Any tensor that is not a LoRA factor (``modules_to_save``, DoRA magnitudes, embedding LoRAs, base weights) is
    refused: diffusers could not load it and dropping it silently would change the model.

    Args:
        peft_state_dict: the keys of ``adapter_model.safetensors`` / ``get_peft_model_state_dict``
            (``base_model.model.<module>.lora_A.weight``), or a live model's ``state_dict()`` restricted to LoRA tensors
            (``<module>.lora_A.<adapter_name>.weight``).
        component: the pipeline attribute (``unet``, ``text_encoder``, ``transformer``...).
        adapter_name: with adapter names in the keys, only this adapter's tensors are kept (required when several are).
        adapter: names the adapter in error messages.

    Returns:
        ``{"<component>.<module>.lora_A.weight": tensor, ...}``, detached, on the CPU, contiguous.
    """
    _check_component(component)
    parsed = []
    for key, tensor in peft_state_dict.items():
        m = parse_lora_key(key.removeprefix(PEFT_PREFIX))
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


def diffusers_lora_metadata(config, *, adapter: str | None = None) -> dict:
    """The plain ``peft.LoraConfig`` keyword arguments diffusers needs to rebuild ``config``'s LoRA exactly.

    ``peft_type`` is left out (``LoraConfig`` sets ``LORA``) and so are peft-ortho's basis fields;
    ``init_lora_weights`` is set to ``True`` because the loader overwrites every factor from the file anyway. A
    BlockLoRA config becomes the config of its zero-padded LoRA.

    Args:
        config: a ``LoraConfig``/``OrthoLoraConfig``/``BlockLoraConfig`` or its ``to_dict()`` (an
            ``adapter_config.json``).
        adapter: names the adapter in error messages.

    Returns:
        The fields of ``dataclasses.fields(peft.LoraConfig)`` only (``r``, ``lora_alpha``, ``rank_pattern``,
        ``alpha_pattern``, ``use_rslora``, ``target_modules``, ``lora_dropout``...), so that diffusers'
        ``LoraConfig(**metadata)`` works and gives every layer the same scale (``lora_alpha / r``, or ``/ √r`` with
        rsLoRA) as the original.

    Raises:
        UnsupportedAdapterError: for what a plain LoRA cannot reproduce: other peft types (a SODA config says to pass
            the live model), DoRA, ``modules_to_save``, trainable tokens, target parameters, layer replication,
            base-modifying initialisations.
    """
    if config is None:
        raise ValueError("a LoRA config (PeftConfig or its dict) is required")
    d = config_dict(config)
    facts = tuner_facts(d["peft_type"])
    if facts is not None and facts.lora_export is LoraExport.PADDED_BLOCKS:
        d = lora_config_dict(d)
    elif facts is None or facts.lora_export is not LoraExport.AS_IS:
        if facts is not None and facts.lora_export is LoraExport.SVD:
            why = (
                "its update depends on the base weights; pass the live model (PeftModel on its base) to "
                "save_diffusers, which converts it by SVD (svd_rank=)"
            )
        else:
            why = f"only LoRA-type adapters ({', '.join(lora_types(LoraExport.AS_IS, LoraExport.PADDED_BLOCKS))}) are"
            why += " lora_A/lora_B pairs diffusers can load"
        raise UnsupportedAdapterError(
            f"peft_type {d['peft_type']!r} cannot be exported to diffusers from its config: {why}", adapter=adapter
        )
    refusal = plain_lora_refusal(d)
    if refusal is not None:
        raise UnsupportedAdapterError(f"cannot be exported as a plain LoRA: {refusal}", adapter=adapter)
    accepted = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    # LoraConfig sets its own peft_type; task heads don't apply to a pipeline component; inference_mode (True in
    # saved configs, False in live ones) is left to diffusers' default so both export the same file.
    dropped = {"peft_type", "task_type", "auto_mapping", "inference_mode"}
    meta = {k: jsonable(v) for k, v in d.items() if k in accepted and k not in dropped}
    meta["init_lora_weights"] = True
    # diffusers 0.36 reads these two unconditionally (KeyError when absent).
    meta.setdefault("rank_pattern", {})
    meta.setdefault("alpha_pattern", {})
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


def group_lora_modules(tensors: Mapping[str, torch.Tensor], component: str) -> dict[str, dict[str, str]]:
    """``{module: {"lora_A.weight": key, "lora_B.weight": key, ...}}`` for component-relative keys, else an error."""
    modules: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = parse_lora_key(key)
        if m is None or m["adapter"] is not None or key.startswith(PEFT_PREFIX):
            raise ValueError(
                f"{component}: tensor key {key!r} is not '<module>.lora_A.weight' / '<module>.lora_B.weight' "
                "(component-relative, no 'base_model.model.' prefix, no adapter name)"
            )
        modules.setdefault(m["module"], {})[f"{m['kind']}.{m['param']}"] = key
    return modules


def checked_metadata(component: str, tensors: Mapping[str, torch.Tensor], meta: dict, adapter: str | None) -> dict:
    """Validate one component's tensors against its metadata; return the metadata diffusers will use.

    Every module needs both factors with matching rank, the rank the config gives it, and must be targeted by the
    config (otherwise the config's ``target_modules`` is replaced by the exact module list).
    """
    modules = group_lora_modules(tensors, component)
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
        r, _ = module_rank_alpha(meta, module)
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


def fold_scale(tensors: dict[str, torch.Tensor], meta: dict, component: str) -> tuple[dict, dict]:
    """Multiply each ``lora_B`` by its layer's scale and return metadata with scale 1 (``lora_alpha = r``)."""
    out = dict(tensors)
    for module, keys in group_lora_modules(tensors, component).items():
        r, alpha = module_rank_alpha(meta, module)
        scale = lora_scale(meta, module, r)
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
    pipeline=None,
    dtype: str | torch.dtype | None = None,
    card: str | None = None,
    inputs: Iterable[str | os.PathLike] = (),
) -> str:
    """Write one diffusers LoRA file into ``out_dir`` (atomically) and return its path.

    Each component's metadata is reduced to plain ``LoraConfig`` fields with ``diffusers_lora_metadata`` and checked
    against the tensors (rank per layer, targeting), so a file diffusers would load with a wrong scale is never
    written. Tensors must be finite. ``out_dir`` is replaced in one rename on success and left untouched on failure.

    Args:
        out_dir: the folder to write; empty or absent unless ``overwrite``.
        tensors_by_component: ``{"unet": {"<module>.lora_A.weight": A, "<module>.lora_B.weight": B, ...}, ...}``,
            keys relative to the component (diffusers' layout minus the component prefix), peft's stored shapes.
        metadata_by_component: per component, a ``LoraConfig``, an ``OrthoLoraConfig`` or a config dict.
        overwrite: replace a non-empty ``out_dir``.
        weight_name: the file name (a plain ``*.safetensors`` name).
        adapter_configs: optional full configs per component, stored for provenance under
            ``peft_ortho_adapter_config``.
        adapter: one name, or one per component, naming the adapter in errors.
        pipeline: the diffusers pipeline (class, instance, class name, or family ``"sd"``/``"sdxl"``/``"flux"``/
            ``"sd3"``) the file is for; every component must be one its ``load_lora_weights`` reads
            (``_lora_loadable_modules``), else the file is refused, naming the component. When None it is inferred
            from the layer names where they tell (Flux's single blocks, SDXL's second text encoder); T5 text-encoder
            parts are always refused.
        dtype: ``"fp16"``, ``"bf16"``, ``"fp32"`` (or a torch dtype) to write; default the tensors' own. Values a
            narrower dtype cannot hold are refused by layer.
        card: text of a ``README.md`` written beside the file.
        inputs: paths the tensors were read from; ``out_dir`` may not be, contain or lie inside any of them.

    Returns:
        The absolute path of the written file.
    """
    check_output(out_dir, inputs)
    if not tensors_by_component:
        raise ValueError("nothing to export: no component has LoRA tensors")
    if set(metadata_by_component) != set(tensors_by_component):
        raise ValueError(
            f"metadata components {sorted(metadata_by_component)} do not match tensor components "
            f"{sorted(tensors_by_component)}"
        )
    names = adapter if isinstance(adapter, Mapping) else {}
    one_name = None if isinstance(adapter, Mapping) else adapter
    check_loadable(
        {c: [m.rsplit(".lora_", 1)[0] for m in t] for c, t in tensors_by_component.items()},
        pipeline,
        adapter=one_name or (", ".join(sorted(set(names.values()))) or None),
    )
    target_dtype = resolve_dtype(dtype)
    state_dict: dict[str, torch.Tensor] = {}
    flat_meta: dict = {}
    for component, tensors in tensors_by_component.items():
        _check_component(component)
        name = names.get(component, one_name)
        if not tensors:
            raise ValueError(f"component {component!r} has no tensors")
        check_finite({f"{component}.{k}": v for k, v in tensors.items()}, adapter=name)
        meta = diffusers_lora_metadata(metadata_by_component[component], adapter=name)
        meta = checked_metadata(component, tensors, meta, name)
        flat_meta.update(_pack_dict_with_prefix(meta, component))  # diffusers' "<component>.<field>" layout
        part = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if target_dtype is not None:
            part = {k: v.to(target_dtype).contiguous() for k, v in part.items()}
            check_finite({f"{component}.{k}": v for k, v in part.items()}, adapter=name)  # overflow in fp16
        state_dict.update(_pack_dict_with_prefix(part, component))
    file_metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: metadata_json(flat_meta)}
    if adapter_configs:
        provenance = {c: config_dict(cfg) for c, cfg in adapter_configs.items()}
        file_metadata[PEFT_ORTHO_METADATA_KEY] = json.dumps(provenance, sort_keys=True, default=str)
    if os.path.basename(weight_name) != weight_name or not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name must be a plain '*.safetensors' file name, got {weight_name!r}")
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        save_file(state_dict, os.path.join(tmp, weight_name), metadata=file_metadata)
        if card is not None:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card)
    return os.path.join(os.path.abspath(os.fspath(out_dir)), weight_name)


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype a ``dtype=`` argument names.

    Args:
        dtype: ``"fp16"`` / ``"bf16"`` / ``"fp32"``, a floating torch dtype, or None.

    Returns:
        The torch dtype; None stays None.
    """
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or a floating torch dtype), got {dtype!r}")


# -------------------------------------------------------------------------------- reading adapters: models and folders


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


def _read_live_adapter(model, adapter_name: str) -> tuple[object, dict[str, torch.Tensor], str]:
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
    return config, get_peft_model_state_dict(model, adapter_name=adapter_name), adapter_name


def collect_diffusers_lora(
    model_or_dir, component: str | None = None, *, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], object, str, str]:
    """One lossless adapter's tensors in component-relative diffusers keys (a BlockLoRA block zero-padded).

    Args:
        model_or_dir: a ``PeftModel``, a model with injected adapters (``get_peft_model``/``add_adapter``), or a saved
            adapter folder.
        component: the pipeline attribute; inferred from the model (or the folder's layer names) when None, and
            checked against them when given (``lora_format.infer_component``).
        adapter_name: the adapter to read.

    Returns:
        ``(tensors, config, name, component)``: the adapter's own tensors (bit-exact), keyed
        ``<module>.lora_A.weight``; its config; its name for messages; its component.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        config, peft_state_dict, name = _read_adapter_folder(os.fspath(model_or_dir), adapter_name)
        diffusers_lora_metadata(config, adapter=name)
        modules = [k.removeprefix(PEFT_PREFIX).split(".lora_", 1)[0] for k in peft_state_dict]
        component = infer_component(modules=modules, given=component, adapter=name)
    else:
        config, peft_state_dict, name = _read_live_adapter(model_or_dir, adapter_name)
        component = infer_component(model_or_dir, given=component, adapter=name)
    as_dict = config_dict(config)
    facts = tuner_facts(as_dict["peft_type"])
    if facts is not None and facts.lora_export is LoraExport.PADDED_BLOCKS:  # diffusers needs whole layers' factors
        peft_state_dict = pad_state_dict(as_dict, peft_state_dict, adapter=name)
    prefixed = to_diffusers_state_dict(peft_state_dict, component, adapter=name)
    check_finite(prefixed, adapter=name)
    tensors = {k.removeprefix(f"{component}."): v for k, v in prefixed.items()}
    return tensors, config, name, component


def _live_facts(source, adapter_name: str):
    """The facts of a live model's adapter ``adapter_name`` (None for a folder, or a model without that adapter)."""
    configs = getattr(source, "peft_config", None)
    if isinstance(source, (str, os.PathLike)) or not isinstance(configs, Mapping) or adapter_name not in configs:
        return None
    return tuner_facts(config_dict(configs[adapter_name]).get("peft_type"))


def convert_by_svd(
    model,
    component: str | None = None,
    *,
    adapter_name: str = "default",
    svd_rank: int | None = SVD_RANK,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], dict, dict, str, object]:
    """A live adapter whose tuner exports by SVD (SODA), as LoRA factors: ``(tensors, metadata, provenance,
    component, report)``.

    Args:
        model: a ``PeftModel`` (or the tuner model) holding the adapter, on the base weights it was trained on.
        component: the pipeline attribute; inferred from the model when None, checked against it when given.
        adapter_name: the adapter to convert.
        svd_rank: the rank of each layer's LoRA (its best rank-k approximation); None for an exact full-rank LoRA.
        dtype: of the tensors (rounded once from the float64 factors); default each base weight's dtype.

    Returns:
        Component-relative tensors, plain ``LoraConfig`` fields (scale 1), the config stored for provenance (with
        the error report under ``"<peft_type>_export"``, e.g. ``"soda_export"``), the component, and the tuner's
        report (``relative_error``, ``max_layer_error``, per layer). The tuner does the conversion: its model class
        has ``lora_state_dict(adapter_name, rank=..., dtype=...)`` (``SodaModel.lora_state_dict``).
    """
    component = infer_component(model, given=component, adapter=adapter_name)
    tuner = getattr(model, "base_model", model)
    if not callable(getattr(tuner, "lora_state_dict", None)):
        raise UnsupportedAdapterError(
            "this adapter exports by SVD through its peft model (its tuner's lora_state_dict); wrap the model with "
            "get_peft_model / PeftModel.from_pretrained instead of injecting the adapter in place",
            adapter=adapter_name,
        )
    tensors, metadata, report = tuner.lora_state_dict(adapter_name, rank=svd_rank, dtype=dtype)
    config = config_dict(model.peft_config[adapter_name])
    provenance = {**config, f"{str(config['peft_type']).lower()}_export": report.to_dict()}
    return tensors, metadata, provenance, component, report


def save_diffusers(
    model_or_dir,
    out_dir: str | os.PathLike,
    component: str | None = None,
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
    bake_scale: bool = False,
    pipeline=None,
    dtype: str | torch.dtype | None = None,
    card: bool = True,
    svd_rank: int | None = SVD_RANK,
) -> str:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(out_dir)``; return its path.

    Each tuner is exported as its facts say (``TunerFacts.lora_export``). Plain ``LoraConfig`` and ``OrthoLoraConfig``
    adapters: the tensors are written unchanged and the scale travels in the metadata, so the loaded pipeline computes
    exactly what the peft model does. ``BlockLoraConfig``: each block zero-padded to its layer, exact. ``SodaConfig``
    (a live model only: its update depends on the base weights): each layer's ``ΔW`` factored by ``convert_by_svd``,
    the error per layer in the card and the file's provenance. Other peft types, NaN/Inf weights and missing files
    raise peft-ortho errors naming the adapter (and layer). Written atomically: an interrupted export leaves
    ``out_dir`` as it was.

    Args:
        model_or_dir: a ``PeftModel`` (e.g. ``get_peft_model(pipe.unet, OrthoLoraConfig(...))``), a model with
            injected adapters, a saved adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``; pickled
            weights are refused), or a mapping ``{component: model_or_dir}`` to put e.g. the UNet's and the text
            encoder's adapters into one file.
        out_dir: the folder to write; empty or absent unless ``overwrite``.
        component: the pipeline attribute (ignored for a mapping). Inferred from the model when None (a
            ``UNet2DConditionModel`` is the ``unet``, a ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` the
            ``transformer``, a ``CLIPTextModel`` the ``text_encoder``) and checked against it when given;
            language-model adapters are refused.
        adapter_name: the adapter to export.
        overwrite: replace a non-empty ``out_dir``.
        weight_name: the file name.
        bake_scale: fold each layer's scale into ``lora_B`` for loaders that ignore the metadata (diffusers < 0.35,
            other tools), at the cost of one rounding per weight.
        pipeline: the pipeline the file is for (inferred from the layers when None); every component must be one it
            loads LoRAs into, and T5 text-encoder parts are refused (see ``write_diffusers_file``).
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"`` to write (default: the adapter's own).
        card: also write a ``README.md`` model card following the Hub's diffusers-LoRA conventions.
        svd_rank: for tuners exported by SVD (SODA): each layer's best rank-``k`` LoRA, or None for exact (full rank).

    Returns:
        The absolute path of the written file.
    """
    sources = list(model_or_dir.items()) if isinstance(model_or_dir, Mapping) else [(component, model_or_dir)]
    if not sources:
        raise ValueError("nothing to export: the mapping of components is empty")
    inputs = [os.fspath(s) for _, s in sources if isinstance(s, (str, os.PathLike))]
    check_output(out_dir, inputs)  # before anything is read
    tensors_by_component, metadata_by_component, configs, names, reports = {}, {}, {}, {}, {}
    for comp, source in sources:
        facts = _live_facts(source, adapter_name)
        if facts is not None and facts.lora_export is LoraExport.SVD:
            tensors, meta, config, comp, reports[comp] = convert_by_svd(
                source, comp, adapter_name=adapter_name, svd_rank=svd_rank
            )
            name = adapter_name  # scale 1: bake_scale changes nothing
        else:
            tensors, config, name, comp = collect_diffusers_lora(source, comp, adapter_name=adapter_name)
            meta = diffusers_lora_metadata(config, adapter=name)
            if bake_scale:
                tensors, meta = fold_scale(tensors, meta, comp)
        if comp in tensors_by_component:
            raise ValueError(f"two adapters are for component {comp!r}; pass a mapping {{component: adapter}}")
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
        pipeline=pipeline,
        dtype=dtype,
        card=_single_adapter_card(configs, reports, weight_name) if card else None,
        inputs=inputs,
    )


def _single_adapter_card(configs: Mapping, reports: Mapping, weight_name: str) -> str:
    (component, *_) = configs
    if len(configs) > 1:  # one card for the pipeline's parts: describe the denoiser's adapter
        component = next((c for c in ("unet", "transformer") if c in configs), component)
    summary = None
    if reports:
        parts = []
        for comp, report in sorted(reports.items()):
            mode = "exactly, at full rank" if report.rank is None else f"by its best rank-{report.rank} LoRA per layer"
            parts.append(
                f"`{comp}`: converted {mode}; relative Frobenius error of ΔW {report.relative_error:.3g} overall, "
                f"{report.max_layer_error:.3g} in the worst layer."
            )
        summary = f"`{weight_name}` approximates the adapter by SVD (the peft adapter itself is exact). " + " ".join(
            parts
        )
    return str(model_card(configs[component], diffusers_weight_name=weight_name, diffusion=True, summary=summary))
