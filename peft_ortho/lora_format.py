"""LoRA file-format rules, in one place: key names, scales, configs, pipeline components and community layouts.

Every reader and writer in peft-ortho (``diffusers_lora``, ``kohya_lora``, ``merging``, ``hub``, ``continual``)
asks this module:

- **keys** — ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (``parse_lora_key``, ``pair_lora_keys``);
- **scales** — ``ΔW = s · B A`` with ``s = lora_alpha / r`` (``/ √r`` with rsLoRA), per-layer ``rank_pattern`` /
  ``alpha_pattern`` matched as peft matches them (``module_rank_alpha``, ``lora_scale``);
- **configs** — peft configs as JSON-ready dicts (``config_dict``) and what a plain ``LoraConfig`` cannot express
  (``PLAIN_LORA_REFUSALS``, ``plain_lora_refusal``);
- **components** — which pipeline attribute a model is (``infer_component``: a ``UNet2DConditionModel`` is the
  ``unet``, a ``FluxTransformer2DModel`` the ``transformer``, a ``CLIPTextModel`` the ``text_encoder``), whether a
  model is a diffusers or a transformers one, and which components a pipeline class loads LoRAs into
  (``check_loadable``: its ``_lora_loadable_modules``);
- **community files** — kohya / A1111 / ComfyUI / BFL / xlabs layouts converted with the model family's own
  diffusers converter (``convert_community``), and every key that stays unmapped refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from types import SimpleNamespace

import diffusers
from diffusers.loaders import lora_pipeline
from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.state_dict_utils import StateDictType
from peft.utils.other import get_pattern_key

from .errors import AdapterFileError, UnsupportedAdapterError

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PEFT_PREFIX = "base_model.model."

# Which peft types are LoRA factors, and how each exports, is each tuner's own fact (peft_ortho.peft_types.TunerFacts).

# init_lora_weights values that rewrite the *base* weights when the adapter is created: the saved lora_A/lora_B are
# then a delta against a modified base, not against the published one.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")

# Config fields a plain ``W + s·B A`` LoRA cannot express, and why.
PLAIN_LORA_REFUSALS = {
    "use_dora": "DoRA rescales the weights by a learned magnitude a plain LoRA cannot express",
    "modules_to_save": "modules_to_save replaces whole modules; a LoRA file holds only low-rank factors",
    "trainable_token_indices": "trainable token embeddings are not LoRA factors",
    "target_parameters": "LoRA on nn.Parameter targets is not a module LoRA",
    "layer_replication": "layer replication changes the base model's structure",
}

# Keys of peft adapter state dicts: ``<module>.lora_A.weight`` or, from a live model, ``<module>.lora_A.<name>.weight``.
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")


# ---------------------------------------------------------------------------------------------- keys, scales, configs


def parse_lora_key(key: str) -> re.Match | None:
    """``module``, ``kind`` (``lora_A``/``lora_B``), ``adapter`` (or None) and ``param`` of a LoRA key, else None."""
    return LORA_KEY.match(key)


def pair_lora_keys(keys: Iterable[str], strip: str, adapter: str | None) -> dict[str, tuple[str, str]]:
    """``{layer: (lora_A key, lora_B key)}`` for keys ``<strip><layer>.lora_A.weight`` / ``.lora_B.weight``.

    Any other key (biases, DoRA magnitudes, a key outside ``strip``) and a factor without its partner is an
    ``AdapterFileError`` naming it: a merge never drops a tensor silently.
    """
    a_keys, b_keys = {}, {}
    for key in keys:
        if not key.startswith(strip):
            raise AdapterFileError(f"unexpected tensor {key!r} (expected keys under {strip!r})", adapter=adapter)
        rest = key[len(strip) :]
        if rest.endswith(".lora_A.weight"):
            a_keys[rest[: -len(".lora_A.weight")]] = key
        elif rest.endswith(".lora_B.weight"):
            b_keys[rest[: -len(".lora_B.weight")]] = key
        else:
            raise AdapterFileError(
                f"unexpected tensor {key!r}: only lora_A/lora_B weights can be merged", adapter=adapter, layer=rest
            )
    for layer in sorted(a_keys.keys() ^ b_keys.keys()):
        missing = "lora_B" if layer in a_keys else "lora_A"
        raise AdapterFileError(f"{missing} weight is missing", adapter=adapter, layer=layer)
    return {layer: (a_keys[layer], b_keys[layer]) for layer in sorted(a_keys)}


def jsonable(value):
    """Sets → sorted lists, tuples → lists, enums → their values, all the way down (what ``json.dumps`` writes and
    ``json.loads`` gives back: a config saved and re-read compares equal to the live one)."""
    if isinstance(value, (set, frozenset)):
        return [jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return jsonable(value.value)
    return value


def config_dict(config, *, default_peft_type: str | None = "LORA") -> dict:
    """A peft config (or its dict) as a JSON-ready dict with ``peft_type`` a plain string.

    A dict without ``peft_type`` is taken as plain ``LoraConfig`` keyword arguments (diffusers' metadata layout) and
    gets ``default_peft_type``. ``None`` gives ``{}``.
    """
    if config is None:
        return {}
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: jsonable(v) for k, v in d.items()}
    peft_type = d.get("peft_type") or default_peft_type
    d["peft_type"] = None if peft_type is None else str(getattr(peft_type, "value", peft_type))
    return d


def module_rank_alpha(config: Mapping, module: str, default_r: int | None = None) -> tuple[int, float]:
    """``(r, lora_alpha)`` that peft gives ``module`` under ``config`` (the same pattern matching as peft)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", default_r))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", r))
    return r, alpha


def lora_scale(config: Mapping, module: str, r: int) -> float:
    """``s`` of ``ΔW = s · B A`` for ``module`` whose tensors have rank ``r``; refuses a rank the config contradicts."""
    r_cfg, alpha = module_rank_alpha(config, module, default_r=r)
    if r_cfg != r:
        raise AdapterFileError(f"config says rank {r_cfg} but the tensors have rank {r}", layer=module)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def plain_lora_refusal(config: Mapping) -> str | None:
    """Why ``config`` (a config dict) is not a plain ``W + s·B A`` LoRA, or None when it is."""
    for field, why in PLAIN_LORA_REFUSALS.items():
        if config.get(field):
            return f"{field}={config[field]!r}: {why}"
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        return (
            f"init_lora_weights={init!r} modified the base weights when the adapter was created, so its factors are "
            "not a delta against the original base model; convert it first (peft's save_pretrained("
            "path_initial_model_for_weight_conversion=...)) and use the converted adapter"
        )
    return None


# ------------------------------------------------------------------------------------- models and pipeline components


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _library_of(model) -> set[str]:
    return {c.__module__.split(".")[0] for c in type(_base(model)).__mro__}


def is_diffusers_model(model) -> bool:
    """Whether ``model`` (or a ``PeftModel``'s base) is a diffusers model (UNet, DiT, VAE...)."""
    return "diffusers" in _library_of(model)


def is_transformers_model(model) -> bool:
    """Whether ``model`` (or a ``PeftModel``'s base) is a transformers model and not a diffusers one."""
    libs = _library_of(model)
    return "transformers" in libs and "diffusers" not in libs


def is_causal_lm(model) -> bool:
    """A transformers language model (``*ForCausalLM`` / ``*LMHeadModel``): no diffusers pipeline loads its LoRA."""
    name = type(_base(model)).__name__
    return is_transformers_model(model) and ("CausalLM" in name or "LMHead" in name)


# Module names only diffusers' UNets and diffusion transformers have (checked in this order: a UNet's attention
# blocks hold ``transformer_blocks`` too, but never at the top level).
_UNET_TOP = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.")
_DIT_TOP = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder", "pos_embed.")
_CLIP_TOP = ("text_model.", "encoder.layers.")
_T5_PART = re.compile(r"(^|\.)(encoder\.block\.\d+\.layer\.\d+\.|SelfAttention\.|DenseReluDense\.)")
_LLM_TOP = re.compile(r"^(model\.layers\.|transformer\.h\.|model\.decoder\.layers\.|gpt_neox\.layers\.|h\.\d+\.)")


def component_of_modules(modules: Iterable[str]) -> str | None:
    """``"unet"``, ``"transformer"`` or ``"text_encoder"`` from module names alone; None when they do not say."""
    modules = list(modules)
    if any(m.startswith(_UNET_TOP) for m in modules):
        return "unet"
    if any(m.startswith(_DIT_TOP) for m in modules):
        return "transformer"
    if any(m.startswith(_CLIP_TOP) for m in modules) and not any(_T5_PART.search(m) for m in modules):
        return "text_encoder"
    return None


def component_kind(model=None, modules: Iterable[str] = ()) -> str | None:
    """``"unet"``, ``"transformer"``, ``"text_encoder"``, ``"llm"`` (a language model) or None (cannot tell)."""
    if model is not None:
        base = _base(model)
        if is_diffusers_model(base):
            return "unet" if "UNet" in type(base).__name__ else "transformer"
        if is_causal_lm(base):
            return "llm"
        if is_transformers_model(base):
            return "text_encoder"
        modules = list(modules) or [n for n, _ in base.named_modules() if n]
    modules = list(modules)
    if any(_LLM_TOP.match(m) for m in modules):
        return "llm"
    return component_of_modules(modules)


def infer_component(
    model=None, *, modules: Iterable[str] = (), given: str | None = None, adapter: str | None = None
) -> str:
    """The pipeline attribute an adapter on ``model`` (or on a model with these ``modules``) belongs to.

    A ``UNet2DConditionModel`` is the ``unet``, any other diffusers model (Flux, SD3, ...) the ``transformer``, a
    ``CLIPTextModel`` the ``text_encoder``. ``given`` (the user's ``component``) is checked against that: a Flux
    adapter named ``unet`` would be ignored by the pipeline, so it is refused. A second text encoder (SDXL's
    ``CLIPTextModelWithProjection``) is ambiguous and must be given; a language model, or layers of unknown layout
    without ``given``, are refused (``UnsupportedAdapterError``): no diffusers pipeline would load their keys.
    """
    kind = component_kind(model, modules)
    cls = type(_base(model)).__name__ if model is not None else None
    if kind == "llm":
        raise UnsupportedAdapterError(
            f"the adapter is on a language model{f' ({cls})' if cls else ''}; diffusers pipelines cannot load it — "
            "keep it as a PEFT adapter (save_pretrained / --format peft)",
            adapter=adapter,
        )
    if given is not None:
        if not isinstance(given, str) or not given or "." in given:
            raise ValueError(f"component must be a pipeline attribute name such as 'unet', got {given!r}")
        given_kind = "text_encoder" if given.startswith("text_encoder") else given
        if kind is not None and given_kind != kind:
            raise UnsupportedAdapterError(
                f"the adapter's layers are a {cls or kind} ({kind}) but component={given!r}: the pipeline would "
                f"ignore every key; pass component={kind!r} (or leave it out to infer it)",
                adapter=adapter,
            )
        return given
    if kind is None:
        raise UnsupportedAdapterError(
            "cannot tell which pipeline component these layers belong to (no UNet, diffusion-transformer or CLIP "
            "text-encoder layer names); pass component='unet' / 'transformer' / 'text_encoder'",
            adapter=adapter,
        )
    if kind == "text_encoder" and cls not in (None, "CLIPTextModel"):
        raise UnsupportedAdapterError(
            f"the adapter is on a {cls}: which text encoder of the pipeline it is cannot be told from the model "
            "(SDXL's second encoder is 'text_encoder_2'); pass component='text_encoder' / 'text_encoder_2' / ...",
            adapter=adapter,
        )
    return kind


# The pipeline each model family's LoRAs load into, by diffusers class name.
FAMILY_PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
}
FAMILIES = tuple(FAMILY_PIPELINES)


def family_of_layers(layers: Mapping[str, Iterable[str]]) -> str | None:
    """The model family of ``{component: layer names}`` (diffusers names), or None when they do not tell."""
    if "transformer" in layers:
        names = list(layers["transformer"])
        if any(n.startswith("single_transformer_blocks.") or n.startswith("x_embedder") for n in names):
            return "flux"
        if any(n.startswith("pos_embed.") for n in names):
            return "sd3"
        return None
    if "unet" in layers:
        names = list(layers["unet"])
        if "text_encoder_2" in layers or any(n.startswith("add_embedding.") for n in names):
            return "sdxl"
        return "sd"
    return None


def family_of_pipeline(pipeline) -> str | None:
    """The model family of a diffusers pipeline (class or instance; subclasses too), or None for anything else."""
    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    by_pipeline = {name: family for family, name in FAMILY_PIPELINES.items()}
    return next((by_pipeline[c.__name__] for c in cls.__mro__ if c.__name__ in by_pipeline), None)


def pipeline_class(pipeline):
    """A diffusers pipeline class from a class, an instance, a class name or a family (``"flux"``...)."""
    if pipeline is None:
        return None
    if isinstance(pipeline, str):
        name = FAMILY_PIPELINES.get(pipeline, pipeline)
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ValueError(f"unknown pipeline {pipeline!r}: give a diffusers pipeline class or one of {FAMILIES}")
        return cls
    return pipeline if isinstance(pipeline, type) else type(pipeline)


def loadable_components() -> set[str]:
    """Every component name some diffusers pipeline loads LoRAs into (the union of ``_lora_loadable_modules``)."""
    names: set[str] = set()
    for obj in vars(lora_pipeline).values():
        if isinstance(obj, type):
            names.update(getattr(obj, "_lora_loadable_modules", None) or ())
    return names


def check_components(components: Iterable[str], *, adapter: str | None = None) -> None:
    """Refuse a diffusers-layout file whose keys start with a part no diffusers pipeline has (e.g. BFL's
    ``diffusion_model.``): loaded, it would do nothing."""
    known = loadable_components()
    for component in components:
        if component not in known:
            raise AdapterFileError(
                f"keys start with {component + '.'!r}, which is no diffusers pipeline component (a layout diffusers "
                "cannot convert, e.g. BFL's diffusion_model.… with lora_A/lora_B names)",
                adapter=adapter,
                layer=component,
            )


def check_loadable(layers: Mapping[str, Iterable[str]], pipeline=None, *, adapter: str | None = None) -> str | None:
    """Refuse components the target pipeline would drop; return the pipeline class name checked against.

    ``layers``: ``{component: layer names}``. ``pipeline``: a diffusers pipeline (class, instance, class name) or a
    family name; when None it is inferred from the layers (``family_of_layers``). Every component must be in the
    pipeline class's ``_lora_loadable_modules`` (diffusers ignores the others with a log line only), and a T5 text
    encoder part is refused by name: no diffusers LoRA loader reads T5 factors (Flux's ``text_encoder_2``, SD3's
    ``text_encoder_3``).
    """
    for component, names in layers.items():
        t5 = next((n for n in names if _T5_PART.search(n)), None)
        if t5 is not None:
            raise UnsupportedAdapterError(
                f"{component} is a T5 text encoder (layer {t5!r}); diffusers' LoRA loaders do not load T5 factors, "
                "so the pipeline would silently drop them — leave this component out of the export",
                adapter=adapter,
                layer=f"{component}.{t5}",
            )
    if pipeline is None:
        family = family_of_layers(layers)
        if family is None:
            return None
        pipeline = family
    cls = pipeline_class(pipeline)
    loadable = list(getattr(cls, "_lora_loadable_modules", []) or [])
    if not loadable:
        raise UnsupportedAdapterError(f"{cls.__name__} does not load LoRA weights", adapter=adapter)
    for component in layers:
        if component not in loadable:
            raise UnsupportedAdapterError(
                f"{cls.__name__} loads LoRAs only into {loadable}; its load_lora_weights would silently drop the "
                f"{component!r} part — leave it out or export for another pipeline",
                adapter=adapter,
                layer=component,
            )
    return cls.__name__


# -------------------------------------------------------------------------------------------------- community layouts

# Layer names a diffusers model of each component has (leaf modules LoRAs target); converted names must match.
_UNET_LAYER = re.compile(
    r"^(?:conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]"
    r"|(?:down_blocks\.\d+\.(?:attentions\.\d+|resnets\.\d+|downsamplers\.0)"
    r"|up_blocks\.\d+\.(?:attentions\.\d+|resnets\.\d+|upsamplers\.0)"
    r"|mid_block\.(?:attentions\.\d+|resnets\.\d+))\."
    r"(?:proj_in|proj_out|conv|conv1|conv2|time_emb_proj|conv_shortcut"
    r"|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))))$"
)
_DIT_LAYER = re.compile(
    r"^(?:x_embedder|context_embedder|proj_out|norm_out\.linear|pos_embed\.proj"
    r"|time_text_embed\.(?:timestep_embedder|text_embedder|guidance_embedder)\.linear_[12]"
    r"|transformer_blocks\.\d+\.(?:attn2?\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff(?:_context)?\.net\.(?:0\.proj|2)|norm1(?:_context)?\.linear)"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear))$"
)
_CLIP_LAYER = re.compile(
    r"^(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$|^text_projection$"
)


def _layer_grammar(component: str) -> re.Pattern | None:
    if component == "unet":
        return _UNET_LAYER
    if component == "transformer":
        return _DIT_LAYER
    if component.startswith("text_encoder"):
        return _CLIP_LAYER
    return None


def check_converted_layers(layers: Mapping[str, Iterable[str]], *, adapter: str | None = None) -> None:
    """Refuse a converted layer name no diffusers model of its component has (a key the converter left unmapped).

    A converter that does not know a key's layout passes it through with an invented name (``down_blocks.4.1...``);
    loaded, it would do nothing. ``layers``: ``{component: layer names}``.
    """
    for component, names in layers.items():
        grammar = _layer_grammar(component)
        if grammar is None:
            raise AdapterFileError(
                f"the converted file has a {component!r} part, which no supported pipeline has",
                adapter=adapter,
                layer=component,
            )
        for name in names:
            if not grammar.match(name):
                raise AdapterFileError(
                    f"the key stays unmapped after conversion: {component}.{name} is not a layer of a diffusers "
                    f"{component}; the file's layout is not one this family's converter knows",
                    adapter=adapter,
                    layer=f"{component}.{name}",
                )


_LOHA = re.compile(r"\.hada_(?:w[12]_[ab]|t[12])$")
_LOKR = re.compile(r"\.lokr_(?:w[12](?:_[ab])?|t2)$")
_SGM = re.compile(r"^lora_unet_(?:input_blocks|middle_block|output_blocks)_")
_FLUX_NATIVE = re.compile(r"^(?:diffusion_model\.|lora_unet_|lora_transformer_)?(?:double_blocks|single_blocks)[._]")


def community_format(keys: Iterable[str]) -> str:
    """Name the layout of a single-file LoRA from its keys.

    One of ``"diffusers"`` (``<component>.<layer>.lora_A.weight``), ``"loha"`` / ``"lokr"`` (LyCORIS), ``"dora"``
    (DoRA magnitudes), ``"kohya-sdxl-sgm"`` (sd-scripts' SDXL names ``lora_unet_input_blocks_4_1_…``),
    ``"kohya-sdxl"``, ``"flux"`` (kohya ``lora_unet_double_blocks_…``, BFL ``diffusion_model.double_blocks…``,
    xlabs ``double_blocks.0.processor…``), ``"kohya"`` (SD1.x ``lora_unet_``/``lora_te_``), ``"diffusers-old"``.
    """
    keys = list(keys)
    if any(_LOHA.search(k) for k in keys):
        return "loha"
    if any(_LOKR.search(k) for k in keys):
        return "lokr"
    if any("dora_scale" in k or k.endswith(".lora_magnitude_vector") for k in keys):
        return "dora"
    if any(_FLUX_NATIVE.match(k) or ".processor." in k for k in keys):
        return "flux"
    if any(_SGM.match(k) for k in keys):
        return "kohya-sdxl-sgm"
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return "kohya-sdxl"
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k for k in keys):
        return "diffusers"
    return "diffusers-old"


_FAMILY_MIXINS = {
    "sd": "StableDiffusionLoraLoaderMixin",
    "sdxl": "StableDiffusionXLLoraLoaderMixin",
    "flux": "FluxLoraLoaderMixin",
    "sd3": "SD3LoraLoaderMixin",
}
_FORMAT_FAMILY = {"kohya-sdxl-sgm": "sdxl", "kohya-sdxl": "sdxl", "flux": "flux", "kohya": "sd"}


_DOWN = re.compile(r"^(?P<m>.+?)\.(?:lora_down|lora\.down|lora_linear_layer\.down|down|lora_A)\.weight$")
_UP_NAMES = ("lora_up", "lora.up", "lora_linear_layer.up", "up", "lora_B")


def _delta_energy(tensors: Mapping, alphas: Mapping[str, float] | None = None) -> dict[str, float]:
    """``{module: ‖s · B A‖_F²}`` for every down/up pair in any LoRA layout, in float64, without forming ``B A``.

    ``‖B A‖² = Σ (BᵀB) ⊙ (A Aᵀ)`` costs ``O(r²(out + in))``. Splitting a fused layer's ΔW by rows (Flux's qkv, SD3's
    ``linear1``) or permuting rows keeps the total, so a converter that drops a layer changes it. The scale is
    ``alpha / r`` when the file (``<module>.alpha``, or ``alphas``) records one, else 1.
    """
    out = {}
    for key, down in tensors.items():
        m = _DOWN.match(key)
        if m is None:
            continue
        module = m["m"]
        kind = key[len(module) + 1 : -len(".weight")]
        up_key = f"{module}.{_UP_NAMES[('lora_down', 'lora.down', 'lora_linear_layer.down', 'down', 'lora_A').index(kind)]}.weight"
        up = tensors.get(up_key)
        if up is None:
            continue
        a = down.reshape(down.shape[0], -1).double()
        b = up.reshape(up.shape[0], -1).double()
        alpha = tensors.get(f"{module}.alpha")
        if alpha is None:  # diffusers' converters key alphas by the down-projection: "<module>.….down.weight.alpha"
            alpha = (alphas or {}).get(f"{key}.alpha", (alphas or {}).get(f"{module}.alpha"))
        scale = 1.0 if alpha is None else float(alpha) / a.shape[0]
        out[module] = scale**2 * float(((b.T @ b) * (a @ a.T)).sum())
    return out


def convert_community(
    tensors: Mapping, *, family: str | None = None, unet_config=None, adapter: str | None = None
) -> tuple[dict, dict[str, float], str]:
    """A non-peft single-file LoRA → ``({<component>.<layer>.lora_A/B.weight: tensor}, {<component>.<layer>: alpha},
    family)`` with the family's own diffusers converter.

    ``family``: ``"sd"``, ``"sdxl"``, ``"flux"`` or ``"sd3"``; inferred from the keys when None (sd-scripts' SGM
    names are SDXL, ``double_blocks`` are Flux). SDXL's SGM block numbers depend on ``layers_per_block``
    (``unet_config``: the base UNet's config; SDXL's own ``layers_per_block=2`` when None). LoHa, LoKr and DoRA
    files are refused in one line naming the format; so is any key the converter drops (it only logs) or leaves
    with a name no diffusers layer has. Alphas are returned for the layers whose scale the converter left out of
    the tensors (kohya SD/SDXL); Flux converters fold it into the factors.
    """
    fmt = community_format(tensors)
    if fmt in ("loha", "lokr"):
        example = next(k for k in tensors if (_LOHA if fmt == "loha" else _LOKR).search(k))
        raise UnsupportedAdapterError(
            f"LyCORIS {'LoHa' if fmt == 'loha' else 'LoKr'} file (key {example!r}): its ΔW is a "
            f"{'Hadamard' if fmt == 'loha' else 'Kronecker'} product, not the B·A product a LoRA merge stacks; "
            "compose merges LoRA / LoCon files only",
            adapter=adapter,
        )
    if fmt == "dora":
        example = next(k for k in tensors if "dora_scale" in k or k.endswith("magnitude_vector"))
        raise UnsupportedAdapterError(
            f"DoRA file (key {example!r}): the learned magnitude rescales W, which a LoRA merge cannot express "
            "(diffusers would drop it with a log line)",
            adapter=adapter,
        )
    inferred = _FORMAT_FAMILY.get(fmt)
    if family is None:
        family = inferred or "sd"
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if inferred is not None and inferred != family and not (inferred == "sd" and family == "sdxl"):
        raise AdapterFileError(
            f"the file is a {fmt} LoRA ({inferred}) but family={family!r} was given", adapter=adapter
        )
    if family == "sd3" and fmt != "diffusers-old":
        key = next(iter(tensors))
        raise AdapterFileError(
            f"diffusers has no converter for this SD3 layout (key {key!r}); only diffusers-format SD3 LoRAs load",
            adapter=adapter,
            layer=key,
        )
    if family == "sdxl" and unet_config is None:
        unet_config = SimpleNamespace(layers_per_block=2)  # SDXL base / refiner
    mixin = getattr(diffusers.loaders, _FAMILY_MIXINS[family])

    def run(part):
        if family == "flux":
            return mixin.lora_state_dict(dict(part), return_alphas=True)
        if family == "sd3":
            return mixin.lora_state_dict(dict(part)), None
        if family == "sdxl":
            return mixin.lora_state_dict(dict(part), unet_config=unet_config)
        return mixin.lora_state_dict(dict(part))

    try:
        state_dict, network_alphas = run(tensors)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise AdapterFileError(f"not a {family} LoRA layout diffusers can convert ({first})", adapter=adapter) from e
    network_alphas = network_alphas or {}
    # diffusers' converters drop what they do not know with at most a log line (Flux's T5 `lora_te2_` layers,
    # unknown `lora_unet_` blocks): the ΔW energy of the file must survive the conversion.
    before = _delta_energy(tensors)
    after = _delta_energy(state_dict, network_alphas)
    total_before, total_after = sum(before.values()), sum(after.values())
    if abs(total_before - total_after) > 1e-4 * max(total_before, 1e-30):
        dropped = [m for m in sorted(before) if not _delta_energy(_converted_alone(run, tensors, m))]
        raise AdapterFileError(
            f"diffusers' {family} converter drops {len(dropped) or 'some'} layer(s) of this file "
            f"({100 * (1 - total_after / total_before):.0f}% of its ΔW), which the pipeline would not load",
            adapter=adapter,
            layer=dropped[0] if dropped else None,
        )
    out, alphas = {}, {}
    for component in sorted({k.split(".", 1)[0] for k in state_dict}):

        def convert(part, component=component):
            if any(".lora_A." in k or ".lora_B." in k for k in part):
                return part
            if component == "unet":
                return convert_unet_state_dict_to_peft(part)
            # diffusers only infers the old layout when `to_out_lora` keys exist: name it explicitly.
            return convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS_OLD)

        part = {k[len(component) + 1 :]: v for k, v in state_dict.items() if k.startswith(component + ".")}
        try:
            out.update({f"{component}.{k}": v for k, v in convert(part).items()})
            for key, alpha in network_alphas.items():
                if key.startswith(component + ".") and key.endswith(".alpha"):
                    down = key[len(component) + 1 : -len(".alpha")]
                    (converted,) = convert({down: None}) if ".lora_A" not in down else (down,)
                    layer = converted.rsplit(".lora_A", 1)[0]
                    alphas[normalise_text_encoder_key(f"{component}.{layer}")] = float(alpha)
        except Exception as e:
            raise AdapterFileError(f"could not convert the {component} LoRA keys ({e})", adapter=adapter) from e
    layers: dict[str, set] = {}
    for key in out:
        m = parse_lora_key(key)
        if m is None:
            raise AdapterFileError(f"the key stays unmapped after conversion: {key!r}", adapter=adapter, layer=key)
        component, _, layer = m["module"].partition(".")
        layers.setdefault(component, set()).add(layer)
    check_converted_layers(layers, adapter=adapter)
    return out, alphas, family


def _converted_alone(run, tensors: Mapping, module: str) -> dict:
    """What the converter makes of one module's tensors alone ({} when it drops or refuses them)."""
    part = {k: v for k, v in tensors.items() if k.startswith(module + ".")}
    try:
        state_dict, _ = run(part)
    except Exception:
        return {}
    return state_dict


CLIP_TEXT_MODEL_LEVEL = "text_model."


def normalise_text_encoder_key(key: str) -> str:
    """``text_encoder.text_model.encoder…`` → ``text_encoder.encoder…``: one spelling per CLIP layer.

    transformers 5's ``CLIPTextModel`` has no ``text_model.`` level; older files (kohya, diffusers < 0.35) have it.
    """
    component, _, rest = key.partition(".")
    if component.startswith("text_encoder") and rest.startswith(CLIP_TEXT_MODEL_LEVEL):
        return f"{component}.{rest[len(CLIP_TEXT_MODEL_LEVEL) :]}"
    return key


def with_text_model_level(key: str) -> str:
    """``text_encoder.encoder…`` → ``text_encoder.text_model.encoder…``: the spelling kohya readers expect (the
    inverse of ``normalise_text_encoder_key``; other components' keys are returned unchanged)."""
    component, _, rest = key.partition(".")
    if component.startswith("text_encoder") and not rest.startswith(CLIP_TEXT_MODEL_LEVEL):
        return f"{component}.{CLIP_TEXT_MODEL_LEVEL}{rest}"
    return key


def find_module(root, name: str):
    """The submodule of ``root`` a file's layer ``name`` means, or None.

    Layers are spelled without CLIP's ``text_model.`` level (``normalise_text_encoder_key``); a text encoder that
    still nests its layers under ``text_model.`` is looked up there too, so both spellings find the one module.
    """
    for candidate in (name, f"{CLIP_TEXT_MODEL_LEVEL}{name}"):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def metadata_json(flat: Mapping) -> str:
    """The ``lora_adapter_metadata`` header value: one JSON object, keys sorted (what diffusers writes)."""
    return json.dumps(dict(flat), indent=2, sort_keys=True)
