"""Model cards for peft-ortho adapters and merges, following the Hub's conventions.

``PeftModel.save_pretrained`` writes peft's generic card template (``library_name: peft``, no base model for
models built from a config, no method tag, a page of "More Information Needed"), and ``PeftModel.push_to_hub`` under
transformers 5 replaces it with ``library_name: transformers``. Neither says that the adapter needs
``import peft_ortho`` to load, nor which shared basis it was drawn from — which is exactly what a collaborator needs
to know before merging. So peft-ortho writes its own card (``model_card``), from the facts each tuner declares
(``peft_ortho.peft_types.TunerFacts``: title, citation, tag, card note).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ._registry import tuner_facts
from ._version import __version__
from .lora_format import config_dict
from .peft_types import LORA_FACTS, PeftOrthoType
from .statistics import STATISTICS_NAME, AdapterStatistics

__all__ = ["hub_base_model", "model_card"]


class _Fields(dict):
    """``str.format_map`` source for a card note: the config's fields, ``?`` for a missing one."""

    def __missing__(self, key: str) -> str:
        return "?"


def _config_dict(config) -> dict:
    return config_dict(config, default_peft_type=None)


def hub_base_model(base_model: str | None) -> str | None:
    """A base model fit for a card's metadata.

    Args:
        base_model: a Hub repo id or a local path (or None).

    Returns:
        ``base_model`` if it is a Hub repo id; None for a local path (a card for the Hub never shows local paths).
    """
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
    """A ``huggingface_hub.ModelCard`` for a peft-ortho (or plain LoRA) adapter, or a merge.

    Metadata: ``library_name: peft``; ``base_model``; tags ``peft-ortho``, the method's tag from the tuner's facts
    (``orthogonal-adaptation``...), ``lora`` for adapters stored as LoRA factors, ``diffusers`` when a diffusers file
    is shipped, then ``extra_tags``. Body: what the adapter is (the tuner's title, citation and card note), how to load
    it (``import peft_ortho`` then ``PeftModel.from_pretrained``; ``pipe.load_lora_weights`` for the diffusers file),
    the basis provenance (seed, algorithm, slot, rows, checksums), and optionally a summary and a sources table.

    The Hub's conventions are kept: like peft, the tag ``base_model:adapter:<base_model>`` (the Hub's adapter
    relation) and a ``pipeline_tag``: ``text-generation`` for causal-LM adapters, ``text-to-image`` for diffusion
    LoRAs, which also get diffusers' training tags (``text-to-image``, ``diffusers-training``, ``template:sd-lora``).
    A ``base_model`` that is a local path, not a Hub repo id, is left out of the metadata, and local absolute paths in
    ``sources`` are shown by their last component only.

    Args:
        config: a peft config, its dict, or None (a merged plain LoRA described by ``sources``).
        base_model: the base model (default ``config.base_model_name_or_path``).
        extra_tags: more Hub tags.
        sources: one mapping per merged adapter, a table row each (columns in first-seen order; used by ``compose``).
        summary: a paragraph at the top of the body.
        repo_id: the repository the card is for (its title and the loading snippet).
        diffusers_weight_name: the diffusers file shipped beside the adapter, if any.
        diffusion: a diffusion LoRA (default: True when a diffusers file is shipped).
        instance_prompt: the trigger words, in the metadata and the body.
        widget: ``[{"text": prompt, "output": {"url": "image.png"}}]`` for the Hub's widget.
        task_type: peft's task type (default the config's); ``CAUSAL_LM`` gives ``text-generation``.
        statistics: the adapter's input statistics, shipped as ``adapter_statistics.safetensors``: the card says what
            the file holds, its kinds, layers and input counts.

    Returns:
        The card (``str(card)`` is the ``README.md`` text).
    """
    d = _config_dict(config)
    peft_type = d.get("peft_type") or "LORA"
    base_model = hub_base_model(base_model or d.get("base_model_name_or_path") or None)
    task_type = task_type or d.get("task_type")
    if diffusion is None:
        diffusion = diffusers_weight_name is not None
    source_types = {str(s.get("peft_type")) for s in sources or () if s.get("peft_type")}
    facts = tuner_facts(peft_type)
    tags = ["peft-ortho"]
    for t in [peft_type, *sorted(source_types)]:
        f = tuner_facts(t)
        if f is not None and f.tag not in tags and f is not LORA_FACTS:
            tags.append(f.tag)
    if facts is not None and facts.stores_lora_factors:
        tags.append(LORA_FACTS.tag)
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
    method = facts.method if facts is not None else peft_type
    needs_plugin = facts is not None and facts.needs_plugin
    parts = [f"# {repo_id.split('/')[-1] if repo_id else 'peft-ortho adapter'}", ""]
    if summary:
        parts += [summary, ""]
    parts += [
        f"A [PEFT](https://github.com/huggingface/peft) adapter of type `{peft_type}` — {method} — made with "
        f"peft-ortho{f', for `{base_model}`' if base_model else ''}.",
    ]
    if facts is not None and facts.card_note:
        parts += ["", facts.card_note.format_map(_Fields(d))]
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
    if peft_type == PeftOrthoType.ORTHO_LORA:
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


def _versions() -> list[str]:
    lines = [f"- peft-ortho {__version__}"]
    for package in ("peft", "diffusers", "transformers", "torch"):
        try:
            lines.append(f"- {package} {version(package)}")
        except PackageNotFoundError:  # pragma: no cover - optional for a given adapter
            pass
    return lines
