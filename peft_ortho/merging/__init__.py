"""Hub-aware merging of adapters by name: ``compose(["alice/rex-ortho", "bob/mia@v1.2", "./style"])``.

Data flows one way: names → resolved local files (``resolve``) → adapters read lazily (``load``) → one pass that
checks and merges each layer (``check``, ``merge``) → a saved artifact (``save``) or fused weights (``fuse``) + a
report (``report``). ``compose`` (also ``peft_ortho.compose``) is the entry point; ``sequential`` is the
output-matching merge.
"""

from __future__ import annotations

import torch
from torch import nn

from .._io import check_output
from ..cards import model_card
from ..errors import IncompatibleAdaptersError
from ..lora_format import component_kind, family_of_pipeline, infer_component
from ..statistics import AdapterStatistics, calibration_inputs
from ..statistics import calibrate as run_calibration
from .check import CollisionWarning, check_configs, check_weights, warn_collisions
from .fuse import check_fusable, fuse_layer, fuse_targets
from .load import Adapter, UnknownScaleWarning, load_adapter
from .merge import (
    DELTA_METHODS,
    EXACT_METHODS,
    METHODS,
    PRIOR_TARGET,
    PRIOR_WEIGHT,
    RIDGE,
    SEQUENTIAL_PRIOR_WEIGHT,
    STATISTICS_METHODS,
    MergedLayer,
    RegMeanOptions,
    iter_merged_layers,
)
from .report import Report, base_energies
from .resolve import Source, resolve, resolve_all
from .save import save_diffusers_file, save_kohya_file, save_peft
from .sequential import sequential_merge

__all__ = ["CollisionWarning", "MergedAdapter", "Report", "Source", "UnknownScaleWarning", "compose", "resolve"]


class MergedAdapter:
    """The result of ``compose``: merged per-layer updates plus where they came from.

    ``layers`` maps ``(component, layer name)`` to a ``MergedLayer``; component is ``None`` for PEFT adapters and
    ``"unet"``/``"text_encoder"``/… for diffusers files. ``compose`` builds it in its one checking pass, unless
    ``stream=True``: then nothing is kept and ``fuse`` re-reads one layer at a time from the memory maps, so fusing
    N adapters needs memory for one layer's factors, not for all of them.

    Args:
        adapters: the loaded adapters (``merging.load.Adapter``).
        weights: one per adapter.
        method: the resolved merge method.
        svd_rank: the rank of re-factored deltas (lossy methods); None for ``Σ r_i``.
        requested_method: the method the caller asked for (``"auto"`` is resolved into ``method``).
        calibrated: the adapters whose statistics ``compose`` computed (``calibrate=``).
        **merge_options: the method's options (``density``, ``prior_weight``, ``ridge``...).
    """

    def __init__(
        self,
        adapters: list[Adapter],
        weights: list[float],
        method: str,
        svd_rank=None,
        *,
        requested_method: str | None = None,
        calibrated: list[str] | None = None,
        **merge_options,
    ):
        self.adapters, self.weights, self.method = adapters, weights, method
        self.requested_method = requested_method or method
        self.calibrated = list(calibrated or [])  # adapters whose statistics compose computed (calibrate=)
        self.svd_rank = svd_rank
        self._merge_options = merge_options
        # tr(W G_0 Wᵀ) per layer of the base model, when one was given (base=, calibrate=, fuse): the report's drift
        self._base_energy: dict | None = None
        # The merged layers when kept (compose builds them unless stream=True), and the report once computed.
        self.kept_layers: dict[tuple[str | None, str], MergedLayer] | None = None
        self._report: Report | None = None
        bases = {a.base_model for a in adapters if a.base_model}
        self.base_model = bases.pop() if len(bases) == 1 else None

    def _build(self, stream: bool) -> None:
        """The pass compose runs: check every tensor; keep the merged layers unless streaming."""
        if stream:
            for _ in iter_merged_layers(self.adapters, self.weights, self.method, merge=False, **self._merge_options):
                pass
            for adapter in self.adapters:  # verified; keep nothing that grows with the number of adapters
                adapter.basis_spec = None
        else:
            self.kept_layers = dict(self.iter_layers(check=True))

    @property
    def sources(self) -> list[Source]:
        return [a.source for a in self.adapters]

    @property
    def input_paths(self) -> list[str]:
        """The files and folders this merge reads: no output may be, contain or lie inside one of them."""
        return [s.path for s in self.sources]

    @property
    def exact(self) -> bool:
        """True when the merged ΔW equals ``Σ w_i ΔW_i`` to float rounding (stacking)."""
        return self.method in EXACT_METHODS

    @property
    def statement(self) -> str:
        """What is exact about this merge and what is not, in one sentence a user can act on."""
        ortho = sum(a.is_orthogonal for a in self.adapters)
        block = sum(a.is_block for a in self.adapters)
        plain = len(self.adapters) - ortho - block
        if self.method in STATISTICS_METHODS:
            o = self._merge_options
            own = o.get("prior_target", PRIOR_TARGET) == "own"
            target = (
                "over its whole training distribution (its prior inputs included)"
                if own
                else "and the base's output on the pooled ordinary (prior) inputs"
            )
            text = (
                "Statistics merge (regmean): per layer, the least-squares update that keeps each adapter's output on "
                f"its own recorded inputs {target} (prior_weight μ={o.get('prior_weight', PRIOR_WEIGHT):g}, "
                f"ridge λ={o.get('ridge', RIDGE):g}); it is not Σ w_i ΔW_i. Stored as a stacked LoRA of rank Σ r_i "
                "(new down-projections, the adapters' own up-projections), so every export is exact for it; the "
                "report predicts each concept's output change."
            )
            if self.requested_method == "auto":
                text += " Chosen by method='auto' because every adapter carries input statistics."
            if self.calibrated:
                text += f" Statistics computed here by calibration for: {', '.join(self.calibrated)}."
            if block:
                text += " BlockLoRA terms now read every input channel: they are no longer confined to their blocks."
            return text
        if self.method == "sequential":
            return (
                "Sequential merge: layer by layer in forward order, the least-squares ΔW that reproduces each single "
                "adapter's layer outputs on its calibration batches through the partly merged model; it is not "
                "Σ w_i ΔW_i. ΔW is dense per layer: fuse is exact, LoRA exports re-factor it with a truncated SVD "
                "(relative error per layer in the card)."
            )
        if not self.exact:
            return (
                f"{self.method} combines the deltas non-linearly: the result is not Σ w_i ΔW_i; LoRA exports re-factor "
                "it with a truncated SVD (relative error per layer in the card)."
            )
        text = (
            "Exact: the merged ΔW equals Σ w_i ΔW_i (factors stacked, no approximation). Exact weights are not kept "
            "behaviour: each adapter also acts on the other concepts' inputs (the report predicts how much when the "
            "adapters carry input statistics)."
        )
        if block > 1:
            text += (
                f" The {block} BlockLoRA adapters change disjoint weights (their block layouts were checked), so "
                "there are no sign conflicts between them; they may still respond to each other's inputs (the "
                "report's predicted output change, with input statistics; output erasure during training reduces it)."
            )
        if plain and ortho:
            text += (
                f" {plain} plain LoRA(s) share input directions with every other adapter, so only the orthogonal "
                "adapters read disjoint input directions among themselves; see the report."
            )
        elif plain:
            text += (
                " Plain LoRAs are not orthogonal: the sum is exact but the concepts may interfere (see the report)."
            )
        if self.requested_method == "auto":
            missing = [a.name for a in self.adapters if a.statistics is None]
            if len(missing) == len(self.adapters):
                text += (
                    " method='auto' stacked exactly because no adapter carries input statistics (record them while "
                    "training, or pass calibrate= and prompts=, for the statistics merge)."
                )
            elif missing:
                text += (
                    f" method='auto' stacked exactly because {len(missing)} adapter(s) carry no input statistics "
                    f"({', '.join(missing)}); the statistics merge needs them for every adapter."
                )
        return text

    def iter_layers(self, *, check: bool = False):
        """The merged layers one at a time, each read and merged on the fly.

        Args:
            check: repeat the checks ``compose`` already ran.

        Returns:
            An iterator of ``((component, layer), MergedLayer)``.
        """
        return iter_merged_layers(self.adapters, self.weights, self.method, check=check, **self._merge_options)

    @property
    def layers(self) -> dict[tuple[str | None, str], MergedLayer]:
        """Every merged layer, computed once (``compose`` keeps them, unless ``stream=True``)."""
        if self.kept_layers is None:
            self.kept_layers = dict(self.iter_layers())
        return self.kept_layers

    @property
    def report(self) -> Report:
        """Predicted output change per concept (from statistics) and basis relations; see ``Report``."""
        if self._report is None:
            kept = self.kept_layers
            layers = kept.items() if kept is not None else self.iter_layers()
            self._report = Report(
                self.adapters, self.weights, self.method, layers=layers, base_energy=self._base_energy
            )
        return self._report

    def _fuse_targets(self, model, component: str | None = None) -> dict:
        """``{component: {layer: (weight, transposed)}}`` in ``model`` (module or pipeline), every shape checked."""

        def module_for(comp, names):
            if hasattr(model, "components") and not isinstance(model, nn.Module):  # a diffusers pipeline
                # PEFT folders (comp None) go to `component`, inferred from their layer names when None.
                name = comp or infer_component(modules=names, given=component)
                part = getattr(model, name, None)
                if not isinstance(part, nn.Module):
                    raise IncompatibleAdaptersError(
                        f"the pipeline has no {name!r} component to fuse into (it has "
                        f"{sorted(k for k, v in model.components.items() if isinstance(v, nn.Module))})"
                    )
                return part
            if comp is not None and comp != component and hasattr(model, comp):
                return getattr(model, comp)
            return model

        shapes: dict = {}
        for adapter in self.adapters:
            for comp, name in adapter.layers():
                shapes.setdefault(comp, {})[name] = adapter.delta_shape((comp, name))
        return {comp: fuse_targets(module_for(comp, list(s)), s) for comp, s in shapes.items()}

    def set_base(self, model, *, component: str | None = None) -> None:
        """Measure ``‖W X_0‖`` on ``model``'s weights for the report's drift (cheap: products with the statistics).

        Called by ``compose(..., base=model)`` / ``calibrate=`` and by ``fuse`` before it changes any weight.

        Args:
            model: the base model or pipeline.
            component: the pipeline attribute PEFT-adapter layers belong to (inferred when None).
        """
        if not any(a.statistics is not None for a in self.adapters):
            return
        targets = self._fuse_targets(model, component)
        views = {(comp, name): t for comp, by_name in targets.items() for name, t in by_name.items()}
        self._base_energy = base_energies(self.adapters, views)
        self._report = None  # recomputed with the drift relative to the base

    def by_component(self) -> dict[str | None, dict[str, MergedLayer]]:
        out: dict = {}
        for (component, name), layer in self.layers.items():
            out.setdefault(component, {})[name] = layer
        return out

    def card(self, *, diffusion: bool | None = None) -> str:
        """The model card every save of this merge writes: its sources, the statement, the report and, for the
        delta-space methods, the truncated SVD's error per layer.

        Args:
            diffusion: write the diffusers conventions (``text-to-image``, ``diffusers-training``...); ``None``: when
                the merge adapts a ``unet`` or a ``transformer``.

        Returns:
            The card's markdown, YAML metadata included.
        """
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
        if self.method in DELTA_METHODS:
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
        dtypes = {t.dtype for a in self.adapters for t in a.tensors.values() if t.is_floating_point()}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def save_pretrained(self, out_dir: str, *, overwrite: bool = False, dtype=None) -> str:
        """A PEFT LoRA adapter (plain ``LoraConfig``; loads with ``PeftModel.from_pretrained``) + model card.

        The config keeps the sources' ``task_type``, so ``AutoPeftModelForCausalLM`` loads an LLM merge.

        Args:
            out_dir: the folder to write; empty or absent unless ``overwrite``.
            overwrite: replace a non-empty ``out_dir``.
            dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"`` (default: the sources' dtype).

        Returns:
            The absolute path of ``out_dir``.
        """
        fan_in_fan_out = any(a.config.get("fan_in_fan_out") for a in self.adapters)  # GPT-2 style Conv1D targets
        check_output(out_dir, self.input_paths)  # before the merge is computed for it
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
            inputs=self.input_paths,
        )

    def save_diffusers(
        self, out_dir: str, *, component: str | None = None, overwrite: bool = False, pipeline=None, dtype=None
    ) -> str:
        """``pytorch_lora_weights.safetensors`` (+ model card) for ``pipe.load_lora_weights``; returns its path.

        Args:
            out_dir: the folder to write; empty or absent unless ``overwrite``.
            component: where PEFT-adapter layers go, inferred from their names when None (``unet`` for UNet layers,
                ``transformer`` for Flux/SD3 ones).
            overwrite: replace a non-empty ``out_dir``.
            pipeline: a pipeline class, instance, name or family (inferred when None); components it would not load, and
                T5 text-encoder parts, are refused.
            dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"`` (default: the sources' dtype).

        Returns:
            The absolute path of the written file.
        """
        check_output(out_dir, self.input_paths)
        return save_diffusers_file(
            out_dir,
            self.by_component(),
            component,
            self.svd_rank,
            overwrite,
            pipeline=pipeline,
            dtype=dtype or self.dtype,
            card=self.card(diffusion=True),
            inputs=self.input_paths,
        )

    def save_kohya(self, out_dir: str, *, overwrite: bool = False, dtype=None, component: str | None = None) -> str:
        """One kohya-format ``.safetensors`` (A1111 / ComfyUI / Civitai) for SD1.x / SDXL; returns its path.

        Written with ``diffusers.utils.convert_state_dict_to_kohya`` (``lora_unet_…``, ``lora_te_…`` /
        ``lora_te1_``/``lora_te2_`` keys, ``lora_down``/``lora_up`` and an ``alpha`` per layer that carries the scale).

        Args:
            out_dir: the folder to write; empty or absent unless ``overwrite``.
            overwrite: replace a non-empty ``out_dir``.
            dtype: ``"fp16"``, ``"bf16"``, ``"fp32"`` (default: the sources' dtype).
            component: where PEFT-adapter layers go (inferred when None).

        Returns:
            The absolute path of the written file.
        """
        check_output(out_dir, self.input_paths)
        return save_kohya_file(
            out_dir,
            self.by_component(),
            component,
            self.svd_rank,
            overwrite,
            dtype=dtype or self.dtype,
            card=self.card(diffusion=True),
            inputs=self.input_paths,
        )

    def fuse(self, model: nn.Module, *, component: str | None = None) -> nn.Module:
        """Fold the merged update into ``model``'s weights in place (one GEMM per layer) and return it.

        Every layer is found and checked (shapes, a finite result in the weight's dtype) before the first changes.

        Args:
            model: a module, or a diffusers pipeline: each component of the merge is fused into the pipeline's attribute
                of that name (``unet``, ``transformer``, ``text_encoder``...).
            component: for PEFT-adapter sources, the pipeline attribute, inferred from the layer names when None
                (``transformer`` for Flux/SD3 layers).

        Returns:
            ``model``.
        """
        targets = self._fuse_targets(model, component)  # all checked first
        kept = self.kept_layers

        def layers():
            return kept.items() if kept is not None else self.iter_layers()

        # Every fused weight must stay finite in its dtype (an fp16 model overflows at 65504): proven for all layers
        # before the first one is changed, so a refusal leaves the model as it was.
        for (comp, name), layer in layers():
            check_fusable(*targets[comp][name], layer, layer_name=name)
        if self._base_energy is None:  # the report's drift relative to these weights, measured before they change
            self.set_base(model, component=component)
        for (comp, name), layer in layers():
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
    prior_weight: float | None = None,
    ridge: float = RIDGE,
    prior_target: str = PRIOR_TARGET,
    statistics: dict | None = None,
    calibrate=None,
    prompts: dict[str, str] | None = None,
    base=None,
    allow_different_base: bool = False,
    stream: bool = False,
    component: str | None = None,
    progress: bool = True,
    inputs: dict | None = None,
    prior_inputs: list | None = None,
    refine_steps: int = 0,
    refine_lr: float = 1e-3,
    refine_balance: bool = False,
    family: str | None = None,
) -> MergedAdapter:
    """Merge adapters given by name (Hub repo id ``owner/name[@revision]``, local folder, or ``.safetensors`` file).

    Methods: ``"linear"`` stacks the factors, exact for every LoRA (``ΔW = Σ w_i ΔW_i``). ``"regmean"`` merges for
    behaviour from each adapter's input statistics: per layer
    ``ΔW = (Σ_i w_i ΔW_i H_i)(Σ_i H_i [+ μ G_0] + λ̄ I)⁻¹``, stored as a stacked LoRA (docs/compose.md, "Statistics
    merge"). ``"auto"`` is ``"regmean"`` when every adapter carries statistics and ``"linear"`` otherwise (the
    statement says which and why). ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"svd"`` combine plain LoRAs in
    delta space with peft's ``merge_utils``.

    Args:
        names: adapters to merge.
        weights: one per adapter (default 1.0 each).
        method: see above.
        prior_weight: μ ≥ 0, the weight of ordinary ("prior") inputs. ``None``: the method's default, 0.3 for the
            statistics merge (``merge.PRIOR_WEIGHT``), 1.0 for ``"sequential"``.
        ridge: λ ≥ 0 relative to ``tr(G)/in`` (default 1e-3); 0 gives the minimum-norm least-squares solution.
        prior_target: ``"base"`` (default) asks for the base's behaviour on the pooled prior inputs (``H_i = G_i``
            and the term ``μ G_0``); ``"own"`` keeps each adapter's own behaviour on the prior inputs it was trained
            on (``H_i = G_i + μ P_i``). The defaults were chosen on the fidelity benchmark (docs/compose.md).
        statistics: ``{adapter name: AdapterStatistics}`` to use instead of (or for adapters without) a statistics
            file, e.g. recorded in this process; names must be adapters of this merge.
        calibrate: a pipeline or model to compute statistics with (``peft_ortho.statistics.calibrate``) for the
            adapters that carry none and have a prompt in ``prompts``; also the base for the report's drift.
        prompts: ``{adapter name: trigger prompt (or list of prompts)}`` for ``calibrate``; names must be adapters of
            this merge. With ``method="sequential"`` and a pipeline as ``calibrate``, instead of ``inputs``: each
            adapter's calibration batches are the UNet calls of its own guided sampling of its prompt
            (``statistics.calibration_inputs``: no training images needed).
        base: a model or pipeline whose weights ``W`` the report's drift ``‖ΔW X_0‖ / ‖W X_0‖`` uses.
        stream: keep peak memory independent of the number of adapters (for ``fuse`` of very many), at the cost of
            a second read of the files.
        component: the diffusers component PEFT adapter folders belong to when merged with diffusers files
            (inferred from their layer names when None: ``unet``, ``transformer``, ``text_encoder``).
        family: ``"sd"``, ``"sdxl"``, ``"flux"`` or ``"sd3"``: the diffusers converter for community single files
            (kohya, A1111, ComfyUI, BFL and XLabs Flux). Default: the family of ``base`` when it is a pipeline
            (whose UNet config also fixes SDXL's block numbering), else inferred from the keys. A key that stays
            unmapped, and LoHa / LoKr / DoRA files, are refused by name; a diffusers file that records no scale
            warns (``UnknownScaleWarning``).
        inputs: for ``method="sequential"``: ``{adapter name: [batch, ...]}``, each adapter's calibration batches
            (tensors, dicts of keyword arguments or tuples for ``calibrate``, the base model); ``prior_inputs``:
            ordinary batches on which the base's outputs are kept (weight ``prior_weight``; ``ridge`` is λ);
            ``refine_steps``: end-to-end output-matching steps after the closed form (``merging.sequential``),
            ``refine_lr`` their Adam learning rate, ``refine_balance`` weighs each adapter's term by the inverse of
            its own effect on its batches.

    Returns:
        A ``MergedAdapter``. Raises, naming the adapter and the layer, on anything it cannot merge correctly; warns
        (``CollisionWarning``) when orthogonal adapters share basis rows.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {METHODS}")
    if not names:
        raise ValueError("compose needs at least one adapter name")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    if prior_weight is None:
        prior_weight = SEQUENTIAL_PRIOR_WEIGHT if method == "sequential" else PRIOR_WEIGHT
    RegMeanOptions(prior_weight, ridge, prior_target)  # refuse bad values before reading anything
    if prompts is not None and calibrate is None:
        raise ValueError("prompts= needs calibrate=<pipeline or model> to run them through")
    family, unet_config = _family_of_base(base, family)
    sources = resolve_all(list(names), token=token, cache_dir=cache_dir, progress=progress)
    adapters = [load_adapter(s, family=family, unet_config=unet_config) for s in sources]
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
    if statistics:
        by_name = _by_name(adapters, statistics, "statistics")
        for name, stats in statistics.items():
            if not isinstance(stats, AdapterStatistics):
                raise IncompatibleAdaptersError(
                    f"statistics= needs AdapterStatistics, got {type(stats).__name__}", adapter=name
                )
            by_name[name].statistics = stats
    if method == "sequential":  # layer by layer through the partly merged model (merging.sequential)
        if calibrate is None or stream or bool(inputs) == bool(prompts):
            raise ValueError(
                "method='sequential' needs calibrate=<base model> and inputs={adapter: [batches]}, or "
                "calibrate=<pipeline> and prompts={adapter: prompt}"
            )
        model = calibrate
        if prompts:  # each adapter's own sampling trajectory on its prompt (statistics.calibration_inputs)
            if getattr(calibrate, "unet", None) is None:
                raise ValueError(
                    "method='sequential' with prompts= needs calibrate=<a diffusers pipeline with a unet>"
                )
            by_name = _by_name(adapters, prompts, "prompts")
            inputs = {name: calibration_inputs(by_name[name], calibrate, p) for name, p in prompts.items()}
            model = calibrate.unet
        merged = MergedAdapter(adapters, weights, method, svd_rank=svd_rank)
        merged.kept_layers = sequential_merge(
            adapters,
            weights,
            model,
            inputs,
            prior=prior_inputs,
            mu=prior_weight,
            lam=ridge,
            refine_steps=refine_steps,
            refine_lr=refine_lr,
            refine_balance=refine_balance,
        )
        return merged
    calibrated = _calibrate(adapters, calibrate, prompts) if calibrate is not None else []
    resolved = _resolve_method(method, adapters)
    merged = MergedAdapter(
        adapters,
        weights,
        resolved,
        svd_rank=svd_rank,
        requested_method=method,
        calibrated=calibrated,
        density=density,
        majority_sign_method=majority_sign_method,
        **(
            {"prior_weight": prior_weight, "ridge": ridge, "prior_target": prior_target}
            if resolved == "regmean"
            else {}
        ),
    )
    merged._build(stream)
    warn_collisions(adapters, weights)  # after the checks: the basis response it reports is measured on valid tensors
    if base is not None or calibrate is not None:
        merged.set_base(base if base is not None else calibrate, component=component)
    return merged


def _resolve_method(method: str, adapters: list[Adapter]) -> str:
    """``"auto"`` → ``"regmean"`` when every adapter carries statistics; ``"regmean"`` refuses when one does not."""
    missing = [a.name for a in adapters if a.statistics is None]
    if method == "auto":
        return "regmean" if not missing else "auto"
    if method in STATISTICS_METHODS and missing:
        raise IncompatibleAdaptersError(
            f"method={method!r} needs input statistics for every adapter; none for: {', '.join(missing)} (record "
            "them while training, pass calibrate=<pipeline> and prompts={name: prompt}, or choose method='linear')"
        )
    return method


def _by_name(adapters: list[Adapter], given: dict, argument: str) -> dict[str, Adapter]:
    """``{name: adapter}``, refusing keys of ``given`` that name no adapter of this merge."""
    by_name = {a.name: a for a in adapters}
    unknown = sorted(set(given) - set(by_name), key=str)
    if unknown:
        raise IncompatibleAdaptersError(
            f"{argument}= names no adapter of this merge: {', '.join(map(repr, unknown))} (adapters: "
            f"{', '.join(map(repr, by_name))})"
        )
    return by_name


def _calibrate(adapters: list[Adapter], target, prompts: dict[str, str] | None) -> list[str]:
    """Statistics for the adapters without any, from ``prompts``, by ``peft_ortho.statistics.calibrate``.

    Adapters that carry recorded statistics keep them (a prompt for them is not used). Returns the names calibrated.
    """
    if not prompts:
        raise ValueError("calibrate= needs prompts={adapter name: trigger prompt} for the adapters without statistics")
    _by_name(adapters, prompts, "prompts")
    for name, prompt in prompts.items():
        texts = [prompt] if isinstance(prompt, str) else prompt
        if (
            not isinstance(texts, (list, tuple))
            or not texts
            or not all(isinstance(t, str) and t.strip() for t in texts)
        ):
            raise IncompatibleAdaptersError(
                "the calibration prompt must be a non-empty string or list of strings", adapter=name
            )
    todo = [a for a in adapters if a.statistics is None and a.name in prompts]
    if not todo:
        return []
    for adapter in todo:
        adapter.statistics = run_calibration(adapter, target, prompts[adapter.name])
    return [a.name for a in todo]


def _family_of_base(base, family: str | None):
    """``(family, unet_config)`` from a diffusers pipeline (or its UNet) and/or an explicit family."""
    if base is None:
        return family, None
    unet = getattr(base, "unet", base if isinstance(base, nn.Module) and component_kind(base) == "unet" else None)
    unet_config = getattr(unet, "config", None)
    inferred = family_of_pipeline(base)
    if family is not None and inferred is not None and family != inferred:
        raise ValueError(f"family={family!r} but the base is a {type(base).__name__} ({inferred})")
    return family or inferred, unet_config
