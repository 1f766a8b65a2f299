"""Randomized Output Erasure: a training regulariser that keeps an adapter silent outside its concept.

On a random fraction ``p`` of the samples of each batch the concept prompt is replaced by a *foreign* prompt (the
prior-class prompt, or one drawn uniformly from a pool the user gives), and the loss on those samples pulls the
adapted model's prediction onto the prediction of the frozen base model for the same input. The base model is the
same module with every peft adapter disabled (:func:`adapters_disabled`), so no second copy of the model is held
in memory. Works with any peft adapter that can be disabled (``OrthoLoraConfig``, ``BlockLoraConfig``, plain
``LoraConfig``, ...), any model, a plain PyTorch loop or ``accelerate``.

For a batch of ``B`` samples with erased mask ``e ∈ {0, 1}^B``, prediction ``ŷ``, regression target ``y`` and
teacher prediction ``ŷ⁰`` (base model, adapters off, no gradient) the loss is::

    L = 1/B · Σ_i [ (1 − e_i) · mse(ŷ_i, y_i) + e_i · w · mse(ŷ_i, ŷ⁰_i) ]        mse = mean over non-batch dims

Its gradient on an erased sample is ``2w/(B·D) · (ŷ_i − ŷ⁰_i)`` back through the adapter only: the adapter learns
to produce ``ΔW x ≈ 0`` on foreign inputs, which is what removes prior-class drift and cross-talk between merged
adapters (docs/methods.md, "Randomized Output Erasure" and "A limit to plan around").

Typical loop (``unet``, ``encode`` and the noise schedule are the caller's)::

    erasure = OutputErasure(p=0.25, weight=1.0, class_prompt="a photo of a dog", seed=0)
    for batch in loader:
        prompts, erased = erasure.swap(batch["prompts"])          # (list[str], bool tensor (B,))
        cond = encode(prompts)
        pred = unet(noisy, t, cond).sample                        # student: adapters on, grads on
        base = erasure.teacher(unet, lambda: unet(noisy[erased], t[erased], cond[erased]).sample)
        loss = erasure.loss(pred, target, erased, base)
        loss.backward()

Cost: the teacher runs one extra forward, without autograd, on the erased samples only (``p·B`` on average), and
no extra model memory. With a frozen base the backward computes weight gradients only for the adapter, so it costs
about one forward, and a step with erasure costs about ``1 + p/2`` plain steps (measured on a small UNet on CPU: a
teacher pass over the whole batch costs 0.6 of a training step, i.e. ``p = 0.25`` adds about 15 %).
"""

from __future__ import annotations

import numbers
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .errors import UnsupportedAdapterError

__all__ = ["OutputErasure", "adapters_disabled", "adapter_layers"]

T = TypeVar("T")

_CHECKED_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _peft_classes() -> tuple[type, ...]:
    # modules_to_save / trainable-token wrappers are trained copies that peft also switches off with the adapters.
    return (BaseTunerLayer, AuxiliaryTrainingWrapper)


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every peft adapter layer in ``model``, in ``model.named_modules()`` order.

    Finds ``BaseTunerLayer`` (LoRA, OrthoLoRA, BlockLoRA, LoHa, ...) and ``AuxiliaryTrainingWrapper``
    (``modules_to_save``, trainable tokens) modules wherever peft put them: inside a ``PeftModel``, in a model whose
    layers were injected in place (``inject_adapter_in_model``, diffusers' ``add_adapter``), or under a wrapper that
    exposes ``named_modules()`` (DDP, FSDP, ``accelerator.prepare``, ``torch.compile``).

    Args:
        model: the model to search.

    Returns:
        A list of ``(qualified name, module)``.
    """
    classes = _peft_classes()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, classes)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: run ``model`` as its frozen base, every peft adapter layer in it switched off.

    Inside the block each adapter layer computes its base layer only (``y = W x``). On exit every layer gets back the
    enabled/disabled state it had on entry, also when the block raises, so nested use and a model whose adapters were
    already disabled behave. Only the layer's disable flag is touched: unlike peft's ``enable_adapters``, no
    ``requires_grad`` flag changes (peft's toggle would re-enable gradients on frozen factors such as OrthoLoRA's
    ``lora_A`` and, under DDP, change the set of parameters that expect a gradient in the middle of a step).

    Args:
        model: a model holding peft adapter layers.

    Raises:
        ValueError: ``model`` holds no peft adapter layer (the "base" would be the trained model itself).
        UnsupportedAdapterError: an adapter is merged into the base weights (disabling it would mean unmerging and
            re-merging the weights at every call; unmerge first).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            f"adapters_disabled: {type(model).__name__} has no peft adapter layer, so there is no adapter to "
            "disable and the teacher would equal the student. Add an adapter first (get_peft_model, "
            "inject_adapter_in_model or diffusers' add_adapter); prompt-learning methods are not supported."
        )
    for name, layer in layers:
        merged = list(getattr(layer, "merged_adapters", []) or [])
        if merged:
            raise UnsupportedAdapterError(
                "is merged into the base weights, so the base model cannot be recovered by switching the adapter "
                "off; call unmerge_adapter() (or train unmerged) before using output erasure",
                adapter=", ".join(merged),
                layer=name,
            )
    previous = [layer._disable_adapters for _, layer in layers]
    try:
        for _, layer in layers:
            layer._disable_adapters = True
        yield model
    finally:
        for (_, layer), was_disabled in zip(layers, previous):
            layer._disable_adapters = was_disabled


class OutputErasure:
    """Randomized Output Erasure (docs/methods.md): swap prompts at random and regress erased samples on the base.

    Args:
        p: probability, per sample, that its prompt is replaced by a foreign prompt, in ``[0, 1]``. ``p=0`` never
            erases (the loss is the plain regression loss), ``p=1`` erases every sample.
        weight: ``w ≥ 0``, the weight of the erasure term relative to the regression term.
        foreign_prompts: pool of foreign prompts; each erased sample gets one drawn uniformly (with replacement).
            Use prompts of what the adapter must leave unchanged: the prior class, other concepts, neighbours.
        class_prompt: shorthand for a pool of one prompt (the prior-class prompt, e.g. ``"a photo of a dog"``).
            Give exactly one of ``foreign_prompts`` and ``class_prompt``.
        seed: seed of this object's own generator. The draws never touch (or depend on) torch's, numpy's or
            Python's global random state, so the same seed gives the same masks and prompts in every run. With
            several processes pass ``seed + process_index`` if the ranks should draw independent masks.

    Reproducibility across a checkpoint: ``state_dict()`` / ``load_state_dict()`` save and restore the generator
    (tensors and plain values only, no pickle of this class needed); ``accelerator.register_for_checkpointing``
    accepts this object as is.
    """

    def __init__(
        self,
        p: float = 0.25,
        weight: float = 1.0,
        foreign_prompts: Sequence[str] | None = None,
        class_prompt: str | None = None,
        seed: int = 0,
    ):
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"OutputErasure: p must be a probability in [0, 1], got {p!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not float(weight) >= 0.0:
            raise ValueError(f"OutputErasure: weight must be a number >= 0, got {weight!r}")
        if weight == float("inf"):
            raise ValueError("OutputErasure: weight must be finite")
        if (foreign_prompts is None) == (class_prompt is None):
            raise ValueError(
                "OutputErasure: give exactly one of foreign_prompts (a pool of prompts) and class_prompt "
                "(the prior-class prompt, a pool of one)"
            )
        if class_prompt is not None:
            pool = [class_prompt]
        elif isinstance(foreign_prompts, str):
            raise TypeError(
                "OutputErasure: foreign_prompts must be a list of prompts, not one string (a string would be read "
                "as a pool of single characters); use class_prompt= for a single prompt"
            )
        else:
            pool = list(foreign_prompts)
        if not pool:
            raise ValueError("OutputErasure: the foreign prompt pool is empty; give at least one foreign prompt")
        bad = [x for x in pool if not isinstance(x, str)]
        if bad:
            raise TypeError(f"OutputErasure: foreign prompts must be strings, got {type(bad[0]).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"OutputErasure: seed must be an int, got {seed!r}")
        self.p = float(p)
        self.weight = float(weight)
        self.foreign_prompts: list[str] = pool
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.last_erased: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"OutputErasure(p={self.p}, weight={self.weight}, foreign_prompts=<{len(self.foreign_prompts)} prompts>, "
            f"seed={self.seed})"
        )

    # -------------------------------------------------------------------------------------------------------- sampling
    def draw(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the erased mask and the foreign prompt indices for a batch, without touching any prompt.

        Both are drawn for every sample, so the generator advances by the same amount whatever ``p`` and the outcome: the
        draws of a later batch do not depend on what an earlier batch erased. Use this to swap precomputed prompt
        embeddings instead of strings (``emb[erased] = pool_emb[index[erased]]``).

        Args:
            batch_size: the number of samples.

        Returns:
            ``(erased, index)``: ``erased`` a CPU ``torch.bool`` tensor ``(batch_size,)``, each entry ``True`` with
            probability ``p`` independently; ``index`` a CPU ``int64`` tensor ``(batch_size,)`` of uniform indices into
            ``foreign_prompts`` (meaningful where ``erased``).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"OutputErasure.draw: batch_size must be an int >= 0, got {batch_size!r}")
        # u ∈ [0, 1): u < 0 is never true (p = 0 never erases), u < 1 always is (p = 1 always erases).
        erased = torch.rand(batch_size, generator=self.generator) < self.p
        index = torch.randint(len(self.foreign_prompts), (batch_size,), generator=self.generator)
        self.last_erased = erased
        return erased, index

    def swap(self, prompts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        """Replace each prompt, with probability ``p``, by a foreign prompt drawn uniformly from the pool.

        Args:
            prompts: the batch's prompts, a list (or tuple) of ``B`` strings.

        Returns:
            ``(new_prompts, erased)``: a new list of ``B`` strings (the input is not modified) and a CPU
            ``torch.bool`` tensor of shape ``(B,)``, ``True`` where the prompt was replaced. Move it next to the
            batch (``erased = erased.to(device)``) before indexing accelerator tensors with it. The mask is also
            kept as ``self.last_erased`` for :meth:`teacher`.
        """
        if isinstance(prompts, str):
            raise TypeError("OutputErasure.swap: prompts must be a list of strings (one per sample), not one string")
        prompts = list(prompts)
        erased, index = self.draw(len(prompts))
        new = [
            self.foreign_prompts[j] if e else prompt for prompt, e, j in zip(prompts, erased.tolist(), index.tolist())
        ]
        return new, erased

    # --------------------------------------------------------------------------------------------------------- teacher
    def teacher(
        self, model: nn.Module, fn: Callable[..., T], *args: Any, erased: torch.Tensor | None = None, **kwargs: Any
    ) -> T | None:
        """Run ``fn(*args, **kwargs)`` as the frozen base model: every peft adapter in ``model`` off, no autograd.

        ``fn`` should evaluate the model on the erased samples only (``x[erased]``): the teacher's cost is then
        one forward pass without autograd over ``p·B`` samples on average (no activations kept for a backward),
        and no second copy of the model exists. ``model`` is the module whose adapters are switched off
        (:func:`adapters_disabled`): a ``PeftModel``, a diffusers model with injected adapters, or its
        DDP/accelerate wrapper. Training/eval mode is left alone: if the base has active dropout the teacher
        samples its own mask.

        Two equivalent spellings::

            base = erasure.teacher(unet, lambda: unet(noisy[erased], t[erased], cond[erased]).sample)
            base = erasure.teacher(model, model, x[erased], c[erased])   # fn(*args): no closure in the loop

        Args:
            model: the model holding the adapters.
            fn: callable computing the teacher prediction from ``*args, **kwargs``.
            erased: keyword only; the batch's erased mask, by default the mask of the last :meth:`swap` /
                :meth:`draw`.

        Returns:
            ``fn``'s result (no gradient history), or ``None`` without calling ``fn`` when no sample of the batch
            is erased.
        """
        if erased is None:
            erased = self.last_erased
            if erased is None:
                raise RuntimeError("OutputErasure.teacher: no erased mask; call swap() first or pass erased=")
        if not bool(erased.any()):
            return None
        self._warn_if_base_trainable(model)
        with adapters_disabled(model), torch.no_grad():
            return fn(*args, **kwargs)

    def _warn_if_base_trainable(self, model: nn.Module) -> None:
        # The teacher is "frozen" only if the optimizer cannot move the base weights. Checked once per model (and
        # not once per OutputErasure: scripts may build one per step).
        if model in _CHECKED_MODELS:
            return
        _CHECKED_MODELS.add(model)
        adapter_params = set()
        for _, layer in adapter_layers(model):
            base = (
                layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "original_module", None)
            )
            base_ids = {id(q) for q in base.parameters()} if base is not None and base is not layer else set()
            adapter_params.update(id(q) for q in layer.parameters() if id(q) not in base_ids)
        trainable = [n for n, q in model.named_parameters() if q.requires_grad and id(q) not in adapter_params]
        if trainable:
            warnings.warn(
                f"OutputErasure: {len(trainable)} base parameter(s) outside the adapters are trainable (e.g. "
                f"{trainable[0]!r}); disabling the adapters then does not give the frozen base model, so the erasure "
                "teacher drifts with training. Freeze them (or set the LoRA bias to 'none').",
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------------------------------------ loss
    def loss(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        erased: torch.Tensor,
        base: torch.Tensor | None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Regression loss on kept samples plus ``weight`` × distillation onto the base on erased samples.

        Args:
            pred: student prediction, shape ``(B, ...)``, adapters on, with gradient.
            target: regression target ``(B, ...)`` (noise, velocity, ...); its erased rows are ignored.
            erased: ``torch.bool`` mask ``(B,)`` from :meth:`swap`.
            base: teacher prediction for the erased samples only, shape ``(E, ...)`` with ``E = erased.sum()``, as
                returned by :meth:`teacher`; ``None`` allowed when ``E = 0``.
            reduction: ``"mean"`` (a scalar, mean over the ``B`` samples) or ``"none"`` (the ``(B,)`` per-sample
                losses, e.g. to apply min-SNR weights before averaging).

        Returns:
            ``1/B · Σ_i [(1 − e_i) mse(pred_i, target_i) + e_i · weight · mse(pred_i, base_i)]`` in float32, with
            ``mse`` the mean over the non-batch dimensions. The denominator is always ``B``, so the scale of the
            regression term does not jump with the number of samples erased in a batch.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"OutputErasure.loss: reduction must be 'mean' or 'none', got {reduction!r}")
        if pred.shape != target.shape:
            raise ValueError(f"OutputErasure.loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if pred.dim() == 0:
            raise ValueError("OutputErasure.loss: pred needs a batch dimension")
        erased = erased.to(device=pred.device, dtype=torch.bool)
        if erased.shape != pred.shape[:1]:
            raise ValueError(
                f"OutputErasure.loss: erased mask has shape {tuple(erased.shape)}, expected ({pred.shape[0]},)"
            )
        n_erased = int(erased.sum())
        if n_erased and base is None:
            raise ValueError(f"OutputErasure.loss: {n_erased} sample(s) erased but no teacher prediction (base=None)")
        if n_erased and tuple(base.shape) != (n_erased, *pred.shape[1:]):
            raise ValueError(
                f"OutputErasure.loss: base has shape {tuple(base.shape)}, expected {(n_erased, *pred.shape[1:])} "
                "(the teacher prediction of the erased samples only)"
            )
        # float32 like diffusers' training scripts: an fp16/bf16 mse loses the small residuals erasure acts on.
        pred32 = pred.float()
        # The erased rows' target is replaced by the teacher, so one per-sample mse serves both terms.
        goal = target.float().clone()  # a copy: the erased rows are overwritten below
        if n_erased:
            goal[erased] = base.detach().float().to(pred.device)
        per_sample = F.mse_loss(pred32, goal, reduction="none").flatten(1).mean(1)
        per_sample = per_sample * torch.where(erased, self.weight, 1.0)
        return per_sample if reduction == "none" else per_sample.mean()

    # ----------------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The generator state and settings (a CPU ``uint8`` tensor and plain values), to resume the same masks."""
        return {
            "generator_state": self.generator.get_state(),
            "seed": self.seed,
            "p": self.p,
            "weight": self.weight,
            "num_foreign_prompts": len(self.foreign_prompts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator saved by :meth:`state_dict`; the next draws continue exactly where it stopped.

        ``p``, ``weight`` and the pool are the constructor's: a pool of a different size would draw other prompts from
        the same state, so that is refused.

        Args:
            state: what ``state_dict()`` returned.
        """
        if "generator_state" not in state:
            raise ValueError("OutputErasure.load_state_dict: no 'generator_state' in the state")
        n = state.get("num_foreign_prompts", len(self.foreign_prompts))
        if n != len(self.foreign_prompts):
            raise ValueError(
                f"OutputErasure.load_state_dict: the state was saved with {n} foreign prompts, this object has "
                f"{len(self.foreign_prompts)}; the resumed draws would not match"
            )
        self.generator.set_state(state["generator_state"])
