"""Hub uploads for peft-ortho adapters: ``save_pretrained`` and ``push_to_hub`` with peft-ortho's model card.

``PeftModel.push_to_hub`` under transformers 5 replaces the card with ``library_name: transformers``, and no peft
upload ships the diffusers file or the input statistics. So peft-ortho stages the adapter files, its statistics,
the diffusers file (when loadable) and its own card (``peft_ortho.cards.model_card``) in a temporary folder and
uploads it with ``huggingface_hub`` directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable

from huggingface_hub import HfApi
from peft import PeftModel
from safetensors import safe_open

from ._io import atomic_dir, mmap_safetensors, read_adapter_folder
from ._registry import tuner_facts
from .cards import model_card
from .diffusers_lora import collect_diffusers_lora, write_diffusers_file
from .errors import AdapterFileError
from .lora_format import DIFFUSERS_WEIGHT_NAME, PEFT_PREFIX, component_kind, config_dict
from .statistics import STATISTICS_NAME, AdapterStatistics, InputStatistics, load_statistics, save_statistics

__all__ = ["model_card", "push_to_hub", "save_pretrained"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _as_statistics(statistics, adapter: str) -> AdapterStatistics:
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
        with safe_open(os.path.join(src, "adapter_model.safetensors"), framework="pt") as f:
            modules = [k.removeprefix(PEFT_PREFIX).split(".lora_", 1)[0] for k in f.keys()]
        kind = component_kind(modules=modules)
        diffusers_component = include_diffusers and (component is not None or kind in ("unet", "transformer"))
    else:
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
    facts = tuner_facts(config_dict(config, default_peft_type=None).get("peft_type"))
    weight_name = None
    tensors = None
    # Only a denoiser (UNet / DiT) adapter gets a diffusers file unasked; a text encoder one when its component is
    # named; an LLM adapter never (naming a component for one is refused by collect_diffusers_lora).
    # Only a lossless export is shipped unasked: an SVD-exported tuner (SODA) needs its rank chosen (save_diffusers).
    if diffusers_component and facts is not None and facts.stores_lora_factors:
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

    Written into a temporary folder and moved into place: an interrupted save leaves ``out_dir`` as it was.

    Args:
        model: a ``PeftModel`` (``kwargs`` go to its ``save_pretrained``; safetensors only) or a saved adapter folder.
        out_dir: the folder to write; empty or absent unless ``overwrite``.
        overwrite: replace a non-empty ``out_dir``.
        include_diffusers: also write ``pytorch_lora_weights.safetensors`` for an adapter stored as LoRA factors.
        component: the diffusers component (inferred when None: ``unet`` for a UNet, ``transformer`` for Flux/SD3,
            ...; an LLM adapter gets no diffusers file, and naming a component for one is refused).
        base_model: the card's base model.
        extra_tags: more Hub tags for the card.
        instance_prompt: the trigger words, in the card's metadata and body.
        statistics: ``InputStatistics``, ``AdapterStatistics`` or the path of a statistics file, written as
            ``adapter_statistics.safetensors``; a source folder's own statistics file is kept (validated). Either way
            the card lists it, and layers the adapter does not have are refused.
        **kwargs: passed to ``PeftModel.save_pretrained``.

    Returns:
        The absolute path of ``out_dir``.
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

    Stages everything in a temporary folder (see ``save_pretrained``), creates the repo if needed
    (``create_repo(exist_ok=True, private=private)``), creates the branch ``revision`` if given, and uploads the
    folder in one commit with ``upload_folder``.

    Args:
        model: a ``PeftModel`` or a saved adapter folder.
        repo_id: the Hub repository.
        token: the Hub token (default: the logged-in one).
        private: create the repository private.
        commit_message: default ``"Upload peft-ortho adapter"``.
        revision: the branch to upload to (created if needed).
        include_diffusers: also upload the diffusers file when the adapter has one.
        component: the diffusers component (as in ``save_pretrained``).
        api: an ``HfApi`` instance or subclass to use instead of ``HfApi(token=token)``.
        base_model: the card's base model.
        extra_tags: more Hub tags for the card.
        instance_prompt: the trigger words.
        statistics: as in ``save_pretrained`` (given, or the source folder's ``adapter_statistics.safetensors``).
        **kwargs: passed to ``PeftModel.save_pretrained``.

    Returns:
        ``upload_folder``'s ``CommitInfo``.
    """
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
