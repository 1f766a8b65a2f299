"""Personal concepts the base model has never seen, made deterministically from the digits.

Concept ``i`` is a *digit class rendered with a fixed, distinctive transformation* (inverted, framed, rotated,
striped, shrunk into a corner, ...) and named by its own rare token ``sks<i>``: prompt
``"a photo of sks<i> digit <class>"``. The base model trains only on plain digits and never sees the token, so its
loss on a concept's images is high and its samples for the concept prompt are plain digits (identity accuracy near
0). An adapter trained on the concept's few images learns the transformation *for its token*.

Why this makes "does concept i survive a merge with 14 others" measurable and not saturated: several concepts share
a digit class (concepts 0 and 10 are both zeros), every concept prompt has the same words apart from the token and the
class, and each transformation is a large, classifiable change of the image. An adapter that is not silent outside its
own token pushes its transformation onto the other concepts' images (crosstalk, visible in the loss and in the
classifier's verdict), and a merge that dilutes an adapter (averaging) removes its transformation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base_model import DIGIT_WORDS, DigitData

Transform = Callable[[torch.Tensor], torch.Tensor]


def _overlay(mask_fn: Callable[[int], torch.Tensor]) -> Transform:
    # Strokes are +1 on a -1 background: an overlay is the pixelwise max with a fixed pattern.
    return lambda x: torch.maximum(x, mask_fn(x.shape[-1]).to(x.dtype) * 2 - 1)


def _stripes(axis: int) -> Callable[[int], torch.Tensor]:
    def mask(s: int) -> torch.Tensor:
        m = torch.zeros(s, s)
        if axis == 0:
            m[:: max(2, s // 3), :] = 1
        else:
            m[:, :: max(2, s // 3)] = 1
        return m

    return mask


def _frame(s: int) -> torch.Tensor:
    m = torch.ones(s, s)
    m[1:-1, 1:-1] = 0
    return m


def _corner_dot(s: int) -> torch.Tensor:
    m = torch.zeros(s, s)
    k = max(1, s // 4)
    m[:k, -k:] = 1
    return m


def _diagonal(s: int) -> torch.Tensor:
    return torch.eye(s).flip(-1)


def _bottom_bar(s: int) -> torch.Tensor:
    m = torch.zeros(s, s)
    m[-1, :] = 1
    return m


def _small(x: torch.Tensor) -> torch.Tensor:
    s = x.shape[-1]
    out = torch.full_like(x, -1.0)
    out[..., : s // 2, : s // 2] = F.avg_pool2d(x.reshape(-1, 1, s, s), 2).reshape(*x.shape[:-2], s // 2, s // 2)
    return out


def _checker(x: torch.Tensor) -> torch.Tensor:
    s = x.shape[-1]
    keep = (torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0
    return torch.where(keep, x, torch.full_like(x, -1.0))


def _dilate(x: torch.Tensor) -> torch.Tensor:
    s = x.shape[-1]
    return F.max_pool2d(x.reshape(-1, 1, s, s), 3, stride=1, padding=1).reshape(x.shape)


def _half_invert(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[..., : x.shape[-1] // 2] = -out[..., : x.shape[-1] // 2]
    return out


def _shift(x: torch.Tensor) -> torch.Tensor:
    k = max(1, x.shape[-1] // 4)
    out = torch.full_like(x, -1.0)
    out[..., k:] = x[..., :-k]
    return out


# (name, transformation, digit class). Order matters: it is the concept index. The digit is i % 10, and each
# transformation was placed on a digit it visibly changes (a mirrored 1 or an upside-down 0 would still be a plain
# digit; the concept classifier's validation accuracy in the docs checks that every concept is distinguishable).
TRANSFORMS: list[tuple[str, Transform]] = [
    ("inverted", lambda x: -x),
    ("framed", _overlay(_frame)),
    ("rotated", lambda x: torch.rot90(x, 1, (-2, -1))),
    ("mirrored", lambda x: x.flip(-1)),
    ("upside-down", lambda x: x.flip(-2)),
    ("h-striped", _overlay(_stripes(0))),
    ("small", _small),
    ("checkered", _checker),
    ("dotted", _overlay(_corner_dot)),
    ("v-striped", _overlay(_stripes(1))),
    ("slashed", _overlay(_diagonal)),
    ("transposed", lambda x: x.transpose(-1, -2)),
    ("bold", _dilate),
    ("half-inverted", _half_invert),
    ("shifted", _shift),
    ("underlined", _overlay(_bottom_bar)),  # index 15: the learning-rate tuning concept, not in the benchmark
]
MAX_CONCEPTS = len(TRANSFORMS)


@dataclass
class Concept:
    """One personal concept: ``images`` ``(k, 1, S, S)`` in ``[-1, 1]`` (its training and evaluation images)."""

    index: int
    token: str
    digit: int
    transform_name: str
    images: torch.Tensor
    transform_index: int | None = None  # which of TRANSFORMS (the index itself unless a tuning concept says else)

    def __post_init__(self):
        if self.transform_index is None:
            self.transform_index = self.index

    @property
    def label(self) -> int:
        """The identity classifier's label of this concept's images: ``10 + transform index``."""
        return 10 + self.transform_index

    @property
    def prompt(self) -> str:
        return f"a photo of {self.token} digit {DIGIT_WORDS[self.digit]}"

    @property
    def name(self) -> str:
        return f"{self.token} ({self.transform_name} {self.digit})"

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return TRANSFORMS[self.transform_index][1](x)


def make_concept(data: DigitData, index: int, images_per_concept: int = 6) -> Concept:
    """Concept ``index``: its transformation applied to ``images_per_concept`` images of its digit.

    The images come from the data's *concept* split (never seen by the base model); concepts that share a digit
    (``i`` and ``i + 10``) take disjoint images. Deterministic: the same data and index give the same tensors.
    """
    if not 0 <= index < MAX_CONCEPTS:
        raise ValueError(f"concept index must be in [0, {MAX_CONCEPTS}), got {index}")
    digit = index % 10
    pool, _ = data.part("concept", digit)
    start = (index // 10) * images_per_concept
    if start + images_per_concept > len(pool):
        raise ValueError(f"digit {digit} has only {len(pool)} concept images; asked for {start + images_per_concept}")
    name, fn = TRANSFORMS[index]
    return Concept(index, f"sks{index}", digit, name, fn(pool[start : start + images_per_concept]).contiguous())


# The tuning set: concepts that choose the statistics merge's settings and are never merged in the benchmark. Index
# 15 (underlined 5) plus four of the benchmark's transformations on other images of their digit (offset 12: the
# benchmark's concepts use images 0–11) under their own tokens: token index -> (transform index, image offset).
TUNING_SET = {15: (15, 6), 16: (0, 12), 17: (3, 12), 18: (6, 12), 19: (12, 12)}


def make_tuning_concept(data: DigitData, index: int, images_per_concept: int = 6) -> Concept:
    """Tuning concept ``index`` (a key of ``TUNING_SET``): token ``sks<index>``, its transformation's digit and
    images disjoint from every benchmark concept's."""
    if index not in TUNING_SET:
        raise ValueError(f"tuning concepts are {sorted(TUNING_SET)}, got {index}")
    t, offset = TUNING_SET[index]
    digit = t % 10
    pool, _ = data.part("concept", digit)
    if offset + images_per_concept > len(pool):
        raise ValueError(f"digit {digit} has only {len(pool)} concept images; asked for {offset + images_per_concept}")
    name, fn = TRANSFORMS[t]
    imgs = fn(pool[offset : offset + images_per_concept]).contiguous()
    return Concept(index, f"sks{index}", digit, name, imgs, transform_index=t)


def make_concepts(data: DigitData, indices: list[int], images_per_concept: int = 6) -> list[Concept]:
    return [make_concept(data, i, images_per_concept) for i in indices]


def classifier_dataset(data: DigitData, part: str, concept_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled images for the identity classifier, ``(n, S·S)`` and ``(n,)``: plain digits (labels 0..9) and each
    concept's transformation applied to *every* image of its digit (label ``10 + concept index``).

    ``part="train"``: plain digits from the base split, transformed digits from the concept split.
    ``part="val"``: both from the held-out split, digits that neither the base model nor any concept used.
    """
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    plain_split, concept_split = ("base", "concept") if part == "train" else ("heldout", "heldout")
    plain, labels = data.part(plain_split)
    xs, ys = [plain], [labels]
    for i in concept_indices:
        imgs, _ = data.part(concept_split, i % 10)
        xs.append(TRANSFORMS[i][1](imgs)), ys.append(torch.full((len(imgs),), 10 + i))
    x = torch.cat(xs)
    return x.reshape(len(x), -1), torch.cat(ys)
