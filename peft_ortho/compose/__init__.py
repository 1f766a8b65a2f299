"""Hub-aware merging of adapters by name: ``compose(["alice/rex-ortho", "bob/mia@v1.2", "./style"])``.

Data flows one way: names → resolved local files (``resolve``) → adapters read lazily (``load``) → one pass that
checks and merges each layer (``check``, ``merge``) → an exported artifact (``export``) + a report (``report``).
"""

from __future__ import annotations

from functools import cached_property

from torch import nn

from ..errors import IncompatibleAdaptersError
from .check import CollisionWarning, check_configs, check_weights, warn_collisions
from .load import Adapter, UnknownScaleWarning, load_adapter
from .merge import DELTA_METHODS, METHODS, MergedLayer, iter_merged_layers
from .report import Report
from .resolve import Source, resolve, resolve_all

__all__ = ["CollisionWarning", "MergedAdapter", "Report", "Source", "UnknownScaleWarning", "compose", "resolve"]


class MergedAdapter:
    """The result of ``compose``: merged per-layer updates plus where they came from.

    ``layers`` maps ``(component, layer name)`` to a ``MergedLayer``; component is ``None`` for PEFT adapters and
    ``"unet"``/``"text_encoder"``/… for diffusers files. ``compose`` builds it in its one checking pass, unless
    ``stream=True``: then nothing is kept and ``fuse`` re-reads one layer at a time from the memory maps, so fusing
    N adapters needs memory for one layer's factors, not for all of them.
    """

    def __init__(self, adapters: list[Adapter], weights: list[float], method: str, svd_rank=None, **merge_options):
        self.adapters, self.weights, self.method = adapters, weights, method
        self.svd_rank = svd_rank
        self._merge_options = merge_options
        bases = {a.base_model for a in adapters if a.base_model}
        self.base_model = bases.pop() if len(bases) == 1 else None

    def _build(self, stream: bool) -> None:
        """The pass compose runs: check every tensor; keep the merged layers unless streaming."""
        if stream:
            for _ in iter_merged_layers(self.adapters, self.weights, self.method, merge=False, **self._merge_options):
                pass
            for adapter in self.adapters:  # verified; keep nothing that grows with the number of adapters
                adapter.__dict__.pop("_basis_spec", None)
        else:
            self.__dict__["layers"] = dict(self.iter_layers(check=True))

    @property
    def sources(self) -> list[Source]:
        return [a.source for a in self.adapters]

    @property
    def exact(self) -> bool:
        """True when the merged ΔW equals ``Σ w_i ΔW_i`` to float rounding (stacking)."""
        return self.method not in DELTA_METHODS

    @property
    def statement(self) -> str:
        """What is exact about this merge and what is not, in one sentence a user can act on."""
        ortho = sum(a.is_orthogonal for a in self.adapters)
        block = sum(a.is_block for a in self.adapters)
        plain = len(self.adapters) - ortho - block
        if not self.exact:
            return (
                f"{self.method} combines the deltas non-linearly: the result is not Σ w_i ΔW_i; LoRA exports re-factor "
                "it with a truncated SVD (relative error per layer in the card)."
            )
        text = "Exact: the merged ΔW equals Σ w_i ΔW_i (factors stacked, no approximation)."
        if block > 1:
            text += (
                f" The {block} BlockLoRA adapters change disjoint weights (their block layouts were checked), so "
                "there are no sign conflicts between them; they may still respond to each other's inputs (crosstalk "
                "in the report, which output erasure during training reduces)."
            )
        if plain and ortho:
            text += (
                f" {plain} plain LoRA(s) share input directions with every other adapter, so only the orthogonal "
                "adapters are free of crosstalk among themselves; see the report."
            )
        elif plain:
            text += (
                " Plain LoRAs are not orthogonal: the sum is exact but the concepts may interfere (see the report)."
            )
        return text

    def iter_layers(self, *, check: bool = False):
        """``((component, layer), MergedLayer)`` one at a time, each read and merged on the fly.

        Checks already ran in ``compose``; ``check=True`` repeats them.
        """
        return iter_merged_layers(self.adapters, self.weights, self.method, check=check, **self._merge_options)

    @cached_property
    def layers(self) -> dict[tuple[str | None, str], MergedLayer]:
        return dict(self.iter_layers())

    @cached_property
    def report(self) -> Report:
        return Report(self.adapters, self.weights, self.method)

    def by_component(self) -> dict[str | None, dict[str, MergedLayer]]:
        out: dict = {}
        for (component, name), layer in self.layers.items():
            out.setdefault(component, {})[name] = layer
        return out

    def card(self, *, diffusion: bool | None = None) -> str:
        from ..hub import model_card

        rows = [
            {
                "name": s.name,
                "repo_id": s.repo_id,
                "revision": s.revision,
                "commit": s.commit,
                "weight": w,
                "peft_type": a.peft_type,
            }
            for a, s, w in zip(self.adapters, self.sources, self.weights)
        ]
        summary = f"Merged with peft-ortho `compose` (method `{self.method}`). {self.statement}"
        if not self.exact:
            errors = {}
            for (comp, name), layer in self.layers.items():
                layer.factors(self.svd_rank)  # decomposed once; the file reuses it
                errors[name if comp is None else f"{comp}.{name}"] = layer.svd_error
            worst = max(errors, key=errors.get)
            summary += (
                f"\n\nRank-{self.svd_rank or 'Σr'} SVD of the merged deltas, relative Frobenius error per layer: "
                f"max {errors[worst]:.3g} (`{worst}`), mean {sum(errors.values()) / len(errors):.3g}.\n\n"
                + "\n".join(f"- `{k}`: {v:.3g}" for k, v in sorted(errors.items()))
            )
        summary += f"\n\n```\n{self.report}\n```"
        if diffusion is None:
            diffusion = any(c in ("unet", "transformer") for c in self.by_component())
        return str(
            model_card(
                None,
                base_model=self.base_model,
                sources=rows,
                summary=summary,
                diffusion=diffusion,
                task_type=self.task_type,
            )
        )

    @property
    def task_type(self) -> str | None:
        """The sources' peft ``task_type`` (``CAUSAL_LM``...) when they agree, so the merge loads the same way."""
        types = {a.config.get("task_type") for a in self.adapters} - {None}
        if len(types) > 1:
            raise IncompatibleAdaptersError(
                f"the adapters have different task_type values {sorted(map(str, types))}: they adapt different "
                "model heads and cannot be merged into one adapter"
            )
        return types.pop() if types else None

    @property
    def dtype(self):
        """The sources' stored dtype when they agree (float32 otherwise): the default precision of exports."""
        import torch

        dtypes = {t.dtype for a in self.adapters for t in a.tensors.values() if t.is_floating_point()}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def save_pretrained(self, out_dir: str, *, overwrite: bool = False, dtype=None) -> str:
        """A PEFT LoRA adapter (plain ``LoraConfig``; loads with ``PeftModel.from_pretrained``) + model card.

        The config keeps the sources' ``task_type``, so ``AutoPeftModelForCausalLM`` loads an LLM merge.
        ``dtype``: ``"fp16"``, ``"bf16"`` or ``"fp32"`` (default: the sources' dtype).
        """
        from .export import save_peft

        fan_in_fan_out = any(a.config.get("fan_in_fan_out") for a in self.adapters)  # GPT-2 style Conv1D targets
        return save_peft(
            out_dir,
            self.by_component(),
            self.base_model,
            self.svd_rank,
            self.card(),
            overwrite,
            fan_in_fan_out,
            task_type=self.task_type,
            dtype=dtype or self.dtype,
        )

    def save_diffusers(
        self, out_dir: str, *, component: str | None = None, overwrite: bool = False, pipeline=None, dtype=None
    ) -> str:
        """``pytorch_lora_weights.safetensors`` (+ model card) for ``pipe.load_lora_weights``; returns its path.

        PEFT-adapter layers go to ``component``, inferred from their names when None (``unet`` for UNet layers,
        ``transformer`` for Flux/SD3 ones). Components ``pipeline`` (a pipeline class, instance, name or family;
        inferred when None) would not load, and T5 text-encoder parts, are refused. ``dtype``: ``"fp16"``,
        ``"bf16"`` or ``"fp32"`` (default: the sources' dtype).
        """
        from .export import save_diffusers_file

        return save_diffusers_file(
            out_dir,
            self.by_component(),
            component,
            self.svd_rank,
            overwrite,
            pipeline=pipeline,
            dtype=dtype or self.dtype,
            card=self.card(diffusion=True),
        )

    def save_kohya(self, out_dir: str, *, overwrite: bool = False, dtype=None, component: str | None = None) -> str:
        """One kohya-format ``.safetensors`` (A1111 / ComfyUI / Civitai) for SD1.x / SDXL; returns its path.

        Written with ``diffusers.utils.convert_state_dict_to_kohya`` (``lora_unet_…``, ``lora_te_…`` /
        ``lora_te1_``/``lora_te2_`` keys, ``lora_down``/``lora_up`` and an ``alpha`` per layer that carries the
        scale). ``dtype``: ``"fp16"``, ``"bf16"``, ``"fp32"`` (default: the sources' dtype).
        """
        from .export import save_kohya_file

        return save_kohya_file(
            out_dir, self.by_component(), component, self.svd_rank, overwrite, dtype=dtype or self.dtype
        )

    def fuse(self, model: nn.Module, *, component: str | None = None) -> nn.Module:
        """Fold the merged update into ``model``'s weights in place (one GEMM per layer) and return it.

        ``model`` may be a diffusers pipeline: each component of the merge is fused into the pipeline's attribute of
        that name (``unet``, ``transformer``, ``text_encoder``...). For PEFT-adapter sources, ``component`` picks the
        pipeline attribute, inferred from the layer names when None (``transformer`` for Flux/SD3 layers).
        """
        from ..lora_format import infer_component
        from .export import fuse_layer, fuse_targets

        is_pipeline = hasattr(model, "components") and not isinstance(model, nn.Module)

        def module_for(comp, names):
            if is_pipeline:
                attr = comp or infer_component(modules=names, given=component)
                part = getattr(model, attr, None)
                if not isinstance(part, nn.Module):
                    raise IncompatibleAdaptersError(
                        f"the merge has a {attr!r} part but the {type(model).__name__} has no such component"
                    )
                return part
            if comp is not None and comp != component and hasattr(model, comp):
                return getattr(model, comp)
            return model

        shapes: dict = {}
        for adapter in self.adapters:
            for comp, name in adapter.layers():
                shapes.setdefault(comp, {})[name] = adapter.delta_shape((comp, name))
        targets = {comp: fuse_targets(module_for(comp, list(s)), s) for comp, s in shapes.items()}  # checked first
        stream = self.__dict__.get("layers")
        for (comp, name), layer in stream.items() if stream is not None else self.iter_layers():
            fuse_layer(*targets[comp][name], layer)
        return model


def compose(
    names: list[str],
    weights: list[float] | None = None,
    method: str = "auto",
    *,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    density: float = 0.5,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    allow_different_base: bool = False,
    stream: bool = False,
    component: str | None = None,
    progress: bool = True,
    family: str | None = None,
    base=None,
) -> MergedAdapter:
    """Merge adapters given by name (Hub repo id ``owner/name[@revision]``, local folder, or ``.safetensors`` file).

    ``method="auto"`` stacks the factors: exact for every LoRA, interference-free for orthogonal adapters on distinct
    slots. ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"svd"`` combine plain LoRAs in delta space with peft's
    ``merge_utils``. Raises, naming the adapter and the layer, on anything it cannot merge correctly; warns
    (``CollisionWarning``) when orthogonal adapters share basis rows. ``stream=True`` keeps peak memory independent
    of the number of adapters (for ``fuse`` of very many), at the cost of a second read of the files. When PEFT
    adapter folders are merged with diffusers files (which name their components), the folders' layers belong to
    ``component`` (inferred from their layer names when None: ``unet`` or ``transformer``).

    Community single files (kohya, A1111, ComfyUI, BFL and xlabs Flux) are read with their model family's diffusers
    converter: ``family`` (``"sd"``, ``"sdxl"``, ``"flux"``, ``"sd3"``), or the family of ``base`` (a diffusers
    pipeline, whose UNet config also fixes SDXL's block numbering), or inferred from the keys. A key that stays
    unmapped, and LoHa / LoKr / DoRA files, are refused by name. A diffusers file that records no scale warns
    (``UnknownScaleWarning``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {METHODS}")
    if not names:
        raise ValueError("compose needs at least one adapter name")
    family, unet_config = _family_of_base(base, family)
    sources = resolve_all(list(names), token=token, cache_dir=cache_dir, progress=progress)
    adapters = [load_adapter(s, family=family, unet_config=unet_config) for s in sources]
    from ..lora_format import component_kind, infer_component

    folder_kinds = {
        component_kind(modules=[n for c, n in a.layers() if c is None])
        for a in adapters
        if any(c is None for c, _ in a.layers())
    }
    # Name the folders' component when they meet diffusers files, or when they adapt different parts (a UNet and a
    # text-encoder adapter): one unnamed group would put the text encoder's layers under the UNet.
    if any(c is not None for a in adapters for c, _ in a.layers()) or len(folder_kinds) > 1:
        for adapter in adapters:
            if any(c is None for c, _ in adapter.layers()):
                names_ = [n for c, n in adapter.layers() if c is None]
                adapter.assign_component(infer_component(modules=names_, given=component, adapter=adapter.name))
    weights = check_weights(adapters, weights)
    check_configs(adapters, allow_different_base=allow_different_base)
    merged = MergedAdapter(
        adapters, weights, method, svd_rank=svd_rank, density=density, majority_sign_method=majority_sign_method
    )
    merged._build(stream)
    warn_collisions(adapters, weights)  # after the checks: the crosstalk it reports is measured on valid tensors
    return merged


def _family_of_base(base, family: str | None):
    """``(family, unet_config)`` from a diffusers pipeline (or its UNet) and/or an explicit family."""
    if base is None:
        return family, None
    from ..lora_format import FAMILY_PIPELINES

    unet = getattr(base, "unet", base if hasattr(base, "config") and "UNet" in type(base).__name__ else None)
    unet_config = getattr(unet, "config", None)
    by_pipeline = {v: k for k, v in FAMILY_PIPELINES.items()}
    inferred = next((by_pipeline[c.__name__] for c in type(base).__mro__ if c.__name__ in by_pipeline), None)
    if family is not None and inferred is not None and family != inferred:
        raise ValueError(f"family={family!r} but the base is a {type(base).__name__} ({inferred})")
    return family or inferred, unet_config
