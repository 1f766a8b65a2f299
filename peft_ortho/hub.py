"""Model cards and Hub uploads for peft-ortho adapters.

``PeftModel.save_pretrained`` writes peft's generic card template (``library_name: peft``, no base model for
models built from a config, no method tag, a page of "More Information Needed"), and ``PeftModel.push_to_hub`` under
transformers 5 replaces it with ``library_name: transformers``. Neither says that the adapter needs
``import peft_ortho`` to load, nor which shared basis it was drawn from — which is exactly what a collaborator needs
to know before merging. So peft-ortho writes its own card and uploads with ``huggingface_hub`` directly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence

from ._io import atomic_dir, mmap_safetensors, read_adapter_folder
from .errors import AdapterFileError
from .export import collect_diffusers_lora, write_diffusers_file
from .lora_format import (
    BLOCK_PEFT_TYPES,
    DIFFUSERS_WEIGHT_NAME,
    LORA_LIKE_PEFT_TYPES,
    PEFT_PREFIX,
    component_kind,
    config_dict,
)
from .statistics import STATISTICS_NAME, AdapterStatistics, load_statistics, save_statistics

METHOD_TAGS = {
    "ORTHO_LORA": ("orthogonal-adaptation", "Orthogonal adaptation (Po et al., CVPR 2024, arXiv 2312.02432)"),
    "BLOCK_LORA": ("blocklora", "BlockLoRA (Zhu et al., 2025, arXiv 2503.08575)"),
    "SODA": ("soda", "SODA"),
    "LORA": ("lora", "LoRA (Hu et al., 2021)"),
}
PEFT_ORTHO_TYPES = ("ORTHO_LORA", "BLOCK_LORA", "SODA")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _config_dict(config) -> dict:
    return config_dict(config, default_peft_type=None)


def hub_base_model(base_model: str | None) -> str | None:
    """``base_model`` if it is a Hub repo id; None for a local path (a card for the Hub never shows local paths)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not base_model or os.path.isabs(base_model) or base_model.startswith((".", "~")) or os.path.exists(base_model):
        return None
    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return None
    return base_model


def _cell(value) -> str:
    text = "" if value is None else str(value)
    if os.path.isabs(text):  # a local file: its name says what it was; the path is nobody else's business
        text = os.path.basename(os.path.normpath(text))
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: Sequence[Mapping]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _provenance(d: dict) -> str:
    """The basis facts a collaborator compares before merging: seed, algorithm, slot, rows and checksums."""
    lines = [
        "## Basis provenance",
        "",
        "Adapters merge without crosstalk only if they were drawn from the same basis (same `basis`, `basis_seed` "
        "and `basis_algorithm`) on different rows. Compare these values with yours before merging; "
        "`peft_ortho.compose` checks them, and the checksums, automatically.",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for field in ("basis", "basis_seed", "basis_algorithm", "slot", "concept_id", "r", "lora_alpha"):
        if field in d:
            lines.append(f"| `{field}` | `{_cell(json.dumps(d[field]))}` |")
    rows, sums = d.get("basis_rows") or {}, d.get("basis_checksums") or {}
    if rows or sums:
        lines += ["", "| layer shape (`in/r`) | basis rows | checksum |", "|---|---|---|"]
        for key in sorted(set(rows) | set(sums), key=lambda k: [int(x) for x in k.split("/")] if "/" in k else [k]):
            r = rows.get(key)
            shown = "" if r is None else (f"{r[0]}–{r[-1]}" if r == list(range(r[0], r[0] + len(r))) else str(r))
            lines.append(f"| `{key}` | {shown} | `{sums.get(key, '')}` |")
    return "\n".join(lines)


def model_card(
    config=None,
    *,
    base_model: str | None = None,
    extra_tags: Iterable[str] = (),
    sources: Sequence[Mapping] | None = None,
    summary: str | None = None,
    repo_id: str | None = None,
    diffusers_weight_name: str | None = None,
    diffusion: bool | None = None,
    instance_prompt: str | None = None,
    widget: Sequence[Mapping] | None = None,
    task_type: str | None = None,
    statistics: AdapterStatistics | None = None,
):
    """A ``huggingface_hub.ModelCard`` for a peft-ortho (or plain LoRA) adapter.

    Metadata: ``library_name: peft``; ``base_model`` (the argument, else ``config.base_model_name_or_path``); tags
    ``peft-ortho``, the method (``orthogonal-adaptation``...), ``lora`` for LoRA-type adapters, ``diffusers`` when a
    diffusers file is shipped (``diffusers_weight_name``), then ``extra_tags``. Body: what the adapter is, how to load
    it (``import peft_ortho`` then ``PeftModel.from_pretrained``; ``pipe.load_lora_weights`` for the diffusers file),
    the basis provenance (seed, algorithm, slot, rows, checksums), and optionally a ``summary`` paragraph and a
    ``sources`` table (one row per mapping, columns in first-seen order; used by ``compose`` for merged adapters).
    ``config``: a peft config, its dict, or ``None`` (a merged plain LoRA described by ``sources``).

    The Hub's conventions are kept: like peft, the tag ``base_model:adapter:<base_model>`` (the Hub's adapter
    relation) and a ``pipeline_tag`` — ``text-generation`` for causal-LM adapters (``task_type``, or the config's),
    ``text-to-image`` for diffusion LoRAs (``diffusion``; True by default when a diffusers file is shipped), which
    also get diffusers' training tags (``text-to-image``, ``diffusers-training``, ``template:sd-lora``), the
    ``instance_prompt`` (trigger words) and an optional ``widget`` (``[{"text": prompt, "output": {"url":
    "image.png"}}]``). A ``base_model`` that is a local path, not a Hub repo id, is left out of the metadata, and
    local absolute paths in ``sources`` are shown by their last component only.
    ``statistics``: the adapter's input statistics, shipped as ``adapter_statistics.safetensors``: the card says what
    the file holds, its kinds, layers and input counts.
    """
    from huggingface_hub import ModelCard, ModelCardData

    d = _config_dict(config)
    peft_type = d.get("peft_type") or "LORA"
    base_model = hub_base_model(base_model or d.get("base_model_name_or_path") or None)
    task_type = task_type or d.get("task_type")
    if diffusion is None:
        diffusion = diffusers_weight_name is not None
    source_types = {str(s.get("peft_type")) for s in sources or () if s.get("peft_type")}
    tags = ["peft-ortho"]
    for t in [peft_type, *sorted(source_types)]:
        if t in METHOD_TAGS and METHOD_TAGS[t][0] not in tags and t != "LORA":
            tags.append(METHOD_TAGS[t][0])
    if peft_type in LORA_LIKE_PEFT_TYPES + BLOCK_PEFT_TYPES:
        tags.append("lora")
    if diffusers_weight_name:
        tags.append("diffusers")
    pipeline_tag = None
    if diffusion:
        pipeline_tag = "text-to-image"
        tags += [t for t in ("text-to-image", "diffusers-training", "template:sd-lora") if t not in tags]
    elif task_type == "CAUSAL_LM":
        pipeline_tag = "text-generation"
    if base_model:
        tags.append(f"base_model:adapter:{base_model}")
    tags += [t for t in extra_tags if t not in tags]

    name = repo_id or "<repo_id>"
    method = METHOD_TAGS.get(peft_type, (None, peft_type))[1]
    needs_plugin = peft_type in PEFT_ORTHO_TYPES
    parts = [f"# {repo_id.split('/')[-1] if repo_id else 'peft-ortho adapter'}", ""]
    if summary:
        parts += [summary, ""]
    parts += [
        f"A [PEFT](https://github.com/huggingface/peft) adapter of type `{peft_type}` — {method} — made with "
        f"peft-ortho{f', for `{base_model}`' if base_model else ''}.",
    ]
    if peft_type == "ORTHO_LORA":
        parts += [
            "",
            "It is a standard LoRA (`ΔW = (lora_alpha / r) · B A` per layer) whose down-projection `A` is frozen to "
            "rows of an orthogonal basis shared through a seed; only `B` was trained. Adapters drawn from the same "
            "basis on different rows read orthogonal input subspaces, so they can be summed without crosstalk.",
        ]
    if peft_type == "BLOCK_LORA":
        parts += [
            "",
            f"A LoRA confined to block {d.get('resolved_block')} of {d.get('num_blocks')} along the "
            f"`{d.get('block_axis')}` axis of every adapted layer (both factors trained, only the block stored). "
            "Adapters in different blocks change disjoint weights, so they sum exactly, without sign conflicts.",
        ]
    if instance_prompt:
        parts += ["", "## Trigger words", "", f"Use `{instance_prompt}` in the prompt to trigger the concept."]
    parts += ["", "## How to load", "", "```python"]
    if needs_plugin:
        parts.append("import peft_ortho  # registers the peft-ortho adapter types with peft: import it first")
    parts += [
        "from peft import PeftModel",
        "",
        f"model = PeftModel.from_pretrained(base_model, {name!r})",
        "```",
    ]
    if needs_plugin:
        parts += [
            "",
            f"Without `import peft_ortho`, peft does not know the `{peft_type}` adapter type and fails with a "
            f"`KeyError: '{peft_type}'`. Install it with `pip install peft-ortho`.",
        ]
    if diffusers_weight_name:
        parts += [
            "",
            f"The repository also holds `{diffusers_weight_name}`, the same LoRA in the layout diffusers reads "
            "(scale included), so plain diffusers loads it without peft-ortho:",
            "",
            "```python",
            f"pipe.load_lora_weights({name!r}, weight_name={diffusers_weight_name!r})",
            "```",
        ]
    if peft_type == "ORTHO_LORA":
        parts += ["", _provenance(d)]
    if statistics is not None:
        parts += ["", _statistics_section(statistics)]
    if sources:
        parts += ["", "## Sources", "", _table(sources)]
    parts += ["", "## Framework versions", "", *_versions()]
    extra = {}
    if instance_prompt:
        extra["instance_prompt"] = instance_prompt
    if widget:
        extra["widget"] = [dict(w) for w in widget]
    data = ModelCardData(library_name="peft", base_model=base_model, tags=tags, pipeline_tag=pipeline_tag, **extra)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts) + "\n")


def _statistics_section(stats: AdapterStatistics) -> str:
    """What ``adapter_statistics.safetensors`` holds: one row per kind (layers, input rows, exact vs sketched)."""
    lines = [
        "## Input statistics",
        "",
        f"`{STATISTICS_NAME}` holds, for each of the {len(stats.layers)} adapted layers, the mean second moment "
        "`G = XᵀX / n` of the inputs the layer saw while training (no inputs, images or prompts themselves): "
        "exact for narrow layers, a low-rank eigen-sketch with its residual trace for wide ones. "
        '`peft_ortho.compose(..., method="regmean")` uses them to merge this adapter with others while keeping what '
        "each does on its own inputs. Layout: peft-ortho's `docs/statistics.md`.",
        "",
        "| kind | layers | input rows per layer (min – max) | stored exactly / sketched |",
        "|---|---|---|---|",
    ]
    for kind in stats.kinds():
        moments = [m[kind] for m in stats.layers.values() if kind in m]
        counts = [m.count for m in moments]
        sketched = sum(m.is_sketch for m in moments)
        lines.append(
            f"| `{kind}` | {len(moments)} | {min(counts):,} – {max(counts):,} | {len(moments) - sketched} / {sketched} |"
        )
    return "\n".join(lines)


def _as_statistics(statistics, adapter: str) -> AdapterStatistics:
    from .statistics import InputStatistics

    if isinstance(statistics, InputStatistics):
        return statistics.statistics()
    if isinstance(statistics, AdapterStatistics):
        return statistics
    if isinstance(statistics, (str, os.PathLike)):
        return load_statistics(statistics, adapter=adapter)
    raise TypeError(
        f"statistics must be InputStatistics, AdapterStatistics or a path, not {type(statistics).__name__}"
    )


def _stage_statistics(folder: str, statistics, adapter: str) -> AdapterStatistics | None:
    """Write (or keep) ``adapter_statistics.safetensors`` in the staged folder, checked against the adapter's keys."""
    path = os.path.join(folder, STATISTICS_NAME)
    if statistics is None:
        if not os.path.isfile(path):
            return None
        stats = load_statistics(path, adapter=adapter)  # copied from the source folder: validate before shipping
    else:
        stats = _as_statistics(statistics, adapter)
    from safetensors import safe_open

    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):  # peft saves a non-default adapter in a subfolder
        raise AdapterFileError(
            f"{STATISTICS_NAME} goes beside adapter_model.safetensors, which this save put in a subfolder; save the "
            "adapter as the default one",
            adapter=adapter,
        )
    with safe_open(weights, framework="pt") as f:
        keys = [k.removeprefix("base_model.model.") for k in f.keys()]
    for layer in stats.layers:
        if not any(k.startswith(layer + ".") for k in keys):
            raise AdapterFileError(
                f"{STATISTICS_NAME} has statistics for a layer the adapter does not have", adapter=adapter, layer=layer
            )
    if statistics is not None:
        save_statistics(stats, path, overwrite=True)  # the staging folder is ours
    return stats


def _versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    lines = [f"- peft-ortho {__version__}"]
    for package in ("peft", "diffusers", "transformers", "torch"):
        try:
            lines.append(f"- {package} {version(package)}")
        except PackageNotFoundError:  # pragma: no cover - optional for a given adapter
            pass
    return lines


def _stage(
    model,
    folder: str,
    *,
    include_diffusers: bool,
    component: str | None,
    card_kwargs: dict,
    save_kwargs: dict,
    statistics=None,
):
    """Write the adapter files, the statistics, the diffusers file (when loadable) and our README.md into ``folder``."""
    if save_kwargs.get("safe_serialization") is False:
        raise ValueError("peft-ortho saves safetensors only (a pickle can run arbitrary code when loaded)")
    if isinstance(model, (str, os.PathLike)):
        src = os.fspath(model)
        config, weights = read_adapter_folder(src, adapter=src)  # validated; pickles refused
        mmap_safetensors(weights, adapter=src)  # a well-formed safetensors file (its values are checked on write)
        for f in ADAPTER_FILES:
            shutil.copyfile(os.path.join(src, f), os.path.join(folder, f))
        if statistics is None and os.path.isfile(os.path.join(src, STATISTICS_NAME)):
            shutil.copyfile(os.path.join(src, STATISTICS_NAME), os.path.join(folder, STATISTICS_NAME))
        adapter_name = "default"
        from safetensors import safe_open

        with safe_open(os.path.join(src, "adapter_model.safetensors"), framework="pt") as f:
            modules = [k.removeprefix(PEFT_PREFIX).split(".lora_", 1)[0] for k in f.keys()]
        kind = component_kind(modules=modules)
        diffusers_component = include_diffusers and (component is not None or kind in ("unet", "transformer"))
    else:
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            # A model with adapters injected in place (diffusers' add_adapter) would save its full weights here.
            raise TypeError(
                f"expected a PeftModel or a saved adapter folder, got {type(model).__name__}; wrap the model with "
                "get_peft_model, or export its adapter with peft_ortho.save_diffusers"
            )
        save_kwargs = {**save_kwargs, "safe_serialization": True}
        model.save_pretrained(folder, **save_kwargs)
        selected = save_kwargs.get("selected_adapters")
        adapter_name = selected[0] if selected else getattr(model, "active_adapter", "default")
        config = model.peft_config[adapter_name]
        kind = component_kind(model)
        diffusers_component = include_diffusers and (component is not None or kind in ("unet", "transformer"))
    stats = _stage_statistics(
        folder, statistics, adapter=str(model) if isinstance(model, (str, os.PathLike)) else adapter_name
    )
    peft_type = _config_dict(config).get("peft_type")
    weight_name = None
    tensors = None
    # Only a denoiser (UNet / DiT) adapter gets a diffusers file unasked; a text encoder one when its component is
    # named; an LLM adapter never (naming a component for one is refused by collect_diffusers_lora).
    if diffusers_component and peft_type in LORA_LIKE_PEFT_TYPES + BLOCK_PEFT_TYPES:
        tensors, cfg, name, diffusers_component = collect_diffusers_lora(model, component, adapter_name=adapter_name)
    if tensors is not None:
        staging = tempfile.mkdtemp(dir=folder)
        try:
            path = write_diffusers_file(
                os.path.join(staging, "out"),
                {diffusers_component: tensors},
                {diffusers_component: cfg},
                adapter_configs={diffusers_component: cfg},
                adapter=name,
            )
            os.replace(path, os.path.join(folder, DIFFUSERS_WEIGHT_NAME))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        weight_name = DIFFUSERS_WEIGHT_NAME
    # Replaces the README.md peft's save_pretrained just wrote (its generic template).
    if kind in ("unet", "transformer"):
        card_kwargs = {"diffusion": True, **card_kwargs}
    card = model_card(config, diffusers_weight_name=weight_name, statistics=stats, **card_kwargs)
    card.save(os.path.join(folder, "README.md"))


def save_pretrained(
    model,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    include_diffusers: bool = False,
    component: str | None = None,
    base_model: str | None = None,
    extra_tags: Iterable[str] = (),
    instance_prompt: str | None = None,
    statistics=None,
    **kwargs,
) -> str:
    """``model.save_pretrained(out_dir, **kwargs)`` with peft-ortho's model card as ``README.md``; returns the folder.

    ``model``: a ``PeftModel`` (``kwargs`` go to its ``save_pretrained``; safetensors only) or a saved adapter
    folder. With ``include_diffusers`` and a diffusers-loadable LoRA, ``pytorch_lora_weights.safetensors`` is
    written too, under ``component`` (inferred when None: ``unet`` for a UNet, ``transformer`` for Flux/SD3, ...;
    an LLM adapter gets no diffusers file, and naming a component for one is refused). ``statistics``
    (``InputStatistics``, ``AdapterStatistics`` or the path of a statistics file) is written as
    ``adapter_statistics.safetensors``; a source folder's own statistics file is kept (validated). Either way the
    card lists it, and layers the adapter does not have are refused. ``instance_prompt``: the trigger words, in the
    card's metadata and body. Written into a temporary folder and moved into place: an interrupted save leaves
    ``out_dir`` as it was.
    """
    card_kwargs = {"base_model": base_model, "extra_tags": tuple(extra_tags), "instance_prompt": instance_prompt}
    inputs = [os.fspath(model)] if isinstance(model, (str, os.PathLike)) else []
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        _stage(
            model,
            tmp,
            include_diffusers=include_diffusers,
            component=component,
            card_kwargs=card_kwargs,
            save_kwargs=kwargs,
            statistics=statistics,
        )
    return os.path.abspath(os.fspath(out_dir))


def push_to_hub(
    model,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    include_diffusers: bool = True,
    component: str | None = None,
    api=None,
    base_model: str | None = None,
    extra_tags: Iterable[str] = (),
    instance_prompt: str | None = None,
    statistics=None,
    **kwargs,
):
    """Upload the adapter, its statistics, peft-ortho's card and (when loadable) the diffusers file to ``repo_id``.

    ``statistics``: as in ``save_pretrained`` (given, or the source folder's ``adapter_statistics.safetensors``).

    Stages everything in a temporary folder (see ``save_pretrained``), creates the repo if needed
    (``create_repo(exist_ok=True, private=private)``), creates the branch ``revision`` if given, and uploads the
    folder in one commit with ``upload_folder``. ``api``: an ``HfApi`` instance or subclass to use instead of
    ``HfApi(token=token)``. Returns ``upload_folder``'s ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    if api is None:
        api = HfApi(token=token)
    elif isinstance(api, type):
        api = api(token=token)
    card_kwargs = {
        "base_model": base_model,
        "extra_tags": tuple(extra_tags),
        "repo_id": repo_id,
        "instance_prompt": instance_prompt,
    }
    with tempfile.TemporaryDirectory(prefix="peft_ortho_push_") as tmp:
        _stage(
            model,
            tmp,
            include_diffusers=include_diffusers,
            component=component,
            card_kwargs=card_kwargs,
            save_kwargs=kwargs,
            statistics=statistics,
        )
        api.create_repo(repo_id=repo_id, exist_ok=True, private=private, repo_type="model")
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or "Upload peft-ortho adapter",
            revision=revision,
            repo_type="model",
        )
