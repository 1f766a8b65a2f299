"""The benchmark's measurements: denoising loss on fixed noises, retained improvement, prior drift, identity.

All losses are the ordinary noise-prediction MSE ``mean ‖ε − ε_θ(x_t, t, c)‖²`` on a fixed evaluation set (images
× a fixed grid of timesteps × noises drawn from a fixed seed), so base, single-concept and merged models are compared
on exactly the same inputs and the differences are not sampling noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .concepts import classifier_dataset


def retained_improvement(base_loss: float, merged_loss: float, single_loss: float) -> float:
    """``(L_base − L_merged) / (L_base − L_single)``: 1 when the merge keeps all of what the adapter learned, 0 when
    the concept is back to the base model, negative when the merge is worse than no adapter.

    NaN when the single adapter did not improve on the base (``L_single ≥ L_base``): there is nothing to retain.
    """
    gain = base_loss - single_loss
    if not gain > 0:
        return math.nan
    return (base_loss - merged_loss) / gain


def prior_drift(base_prior_loss: float, merged_prior_loss: float) -> float:
    """Relative change of the loss on ordinary class prompts: ``(L_merged − L_base) / L_base`` (0.05 = 5 % worse)."""
    if not base_prior_loss > 0:
        raise ValueError(f"the base model's prior loss must be positive, got {base_prior_loss}")
    return (merged_prior_loss - base_prior_loss) / base_prior_loss


@dataclass
class EvalSet:
    """Fixed denoising inputs: ``x0`` ``(n, 1, S, S)``, ``noise`` like it, timesteps ``t`` ``(n,)``, and the index of
    each sample's prompt in ``prompts`` (``prompt_idx`` ``(n,)``)."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    prompts: list[str]
    prompt_idx: torch.Tensor


def make_eval_set(images: torch.Tensor, prompts: list[str], prompt_idx, timesteps: list[int], seed: int) -> EvalSet:
    """Every image at every timestep of ``timesteps``, with noises from ``seed``: ``len(images)·len(timesteps)``
    samples. ``prompt_idx`` gives each image's prompt (an int for all)."""
    k = len(timesteps)
    if isinstance(prompt_idx, int):
        prompt_idx = [prompt_idx] * len(images)
    x0 = images.repeat_interleave(k, 0)
    g = torch.Generator().manual_seed(seed)
    return EvalSet(
        x0=x0,
        noise=torch.randn(x0.shape, generator=g),
        t=torch.tensor(timesteps, dtype=torch.long).repeat(len(images)),
        prompts=list(prompts),
        prompt_idx=torch.as_tensor(prompt_idx, dtype=torch.long).repeat_interleave(k, 0),
    )


def timestep_grid(k: int, num_train_timesteps: int = 1000) -> list[int]:
    """``k`` timesteps evenly spread over ``(0, T)``: midpoints of ``k`` equal bins."""
    return [int((j + 0.5) * num_train_timesteps / k) for j in range(k)]


@torch.no_grad()
def denoise_loss(unet, scheduler, encode, ev: EvalSet, batch: int = 512) -> float:
    """Mean noise-prediction MSE of ``unet`` over the evaluation set (``encode``: prompts → text states)."""
    states = encode(ev.prompts)
    total = 0.0
    for s in range(0, len(ev.x0), batch):
        sl = slice(s, s + batch)
        x_t = scheduler.add_noise(ev.x0[sl], ev.noise[sl], ev.t[sl])
        pred = unet(x_t, ev.t[sl], states[ev.prompt_idx[sl]]).sample
        total += float((pred - ev.noise[sl]).square().mean(dim=(1, 2, 3)).sum())
    return total / len(ev.x0)


class IdentityClassifier:
    """Which of the plain digits (labels 0..9) or concepts (label ``10 + i``) an image shows.

    A multinomial logistic regression on the pixels (``S·S`` features in ``[-1, 1]``), trained on plain digits of the
    base split and each concept's transformation applied to every digit of its class in the concept split, validated
    on held-out digits nobody trained on. Validate before trusting it on generated images: ``validation`` holds the
    overall and per-label accuracy.
    """

    def __init__(self, data, concept_indices: list[int], seed: int = 0):
        from sklearn.linear_model import LogisticRegression

        x, y = classifier_dataset(data, "train", concept_indices)
        self.model = LogisticRegression(max_iter=3000, C=1.0, random_state=seed)
        self.model.fit(x.numpy(), y.numpy())
        xv, yv = classifier_dataset(data, "val", concept_indices)
        pred = self.model.predict(xv.numpy())
        yv = yv.numpy()
        self.validation = {
            "accuracy": float((pred == yv).mean()),
            "n": int(len(yv)),
            "per_label": {int(lab): float((pred[yv == lab] == lab).mean()) for lab in np.unique(yv)},
        }

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Labels ``(n,)`` of images ``(n, 1, S, S)``."""
        return self.model.predict(images.reshape(len(images), -1).numpy())


def identity_accuracy(predicted: np.ndarray, label: int) -> float:
    """Fraction of ``predicted`` labels equal to ``label`` (for concept ``i``: ``label = 10 + i``)."""
    predicted = np.asarray(predicted)
    if predicted.size == 0:
        raise ValueError("identity_accuracy needs at least one prediction")
    return float((predicted == label).mean())
