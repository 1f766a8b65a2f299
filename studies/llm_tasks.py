"""The LLM studies' tasks: digit sequences for a 2-layer GPT-2 built from a config, each trained on a CPU in minutes.

A sequence is ``[task, x_1..x_L, SEP, y_1..y_L]``: a task token, ``L`` digits in ``0..K-1``, a separator and the
answer the task gives for those digits; a model must produce ``y`` greedily from the prompt ``[task, x, SEP]``. It is
the format of the teaching example ``examples/llm_skills.py`` (which keeps its own short copy for its reader). Each
study names its own task tokens and their ``answers(tasks, x)``; the sequences, the model, its pretraining, the loss
and the accuracy come from here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from peft_ortho.testing import tiny_gpt2

K = 10  # digits 0..K-1
L = 5  # digits per sequence
PROMPT = L + 2  # task, x and SEP: what the model is given
TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2's Conv1D layers: attention in/out, MLP in/out

# (tasks (n, 1), x (n, L)) -> y (n, L): the answer under each row's task token.
Answers = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (task token or (n, 1) tokens, n, generator) -> (n, 2L + 2) sequences.
Batches = Callable[[object, int, torch.Generator], torch.Tensor]


def sequences(tasks, n: int, generator: torch.Generator, answers: Answers, sep: int) -> torch.Tensor:
    """``(n, 2L + 2)`` int64 sequences ``[task, x, SEP, y]`` with ``x`` uniform digits and ``y = answers(tasks, x)``;
    ``tasks`` is one task token or an ``(n, 1)`` tensor of them."""
    x = torch.randint(0, K, (n, L), generator=generator)
    tasks = torch.full((n, 1), tasks) if isinstance(tasks, int) else tasks
    return torch.cat([tasks, x, torch.full((n, 1), sep), answers(tasks, x)], 1)


def base_model(seed: int, width: int, vocab_size: int, sep: int):
    """A freshly initialised 2-layer GPT-2 for these sequences (``peft_ortho.testing.tiny_gpt2``), with an untied
    output head: a trained trigger row must not also move the output head."""
    return tiny_gpt2(seed, width, vocab_size, n_positions=2 * L + 2, eos_token_id=sep, tie_word_embeddings=False)


def answer_loss(model, seq: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the answer positions ``y_1..y_L`` only, averaged."""
    logits = model(input_ids=seq[:, :-1]).logits  # position j predicts token j + 1
    target = seq[:, 1:].masked_fill(torch.arange(seq.shape[1] - 1) < PROMPT - 1, -100)  # the prompt is given
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)


def pretrain(model, batch: Callable[[torch.Generator], torch.Tensor], steps: int, lr: float, seed: int, **adamw):
    """All weights, AdamW (``adamw``: its options) on ``answer_loss(batch(generator))`` for ``steps`` steps, the
    generator seeded with ``seed``; returns the model in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, **adamw)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        answer_loss(model, batch(g)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def accuracy(model, task, batches: Batches, n: int = 500, seed: int = 1234) -> float:
    """Per-token accuracy (3 decimals) of the greedy answers to ``n`` fresh ``batches(task, n, ·)``; chance ``1/K``."""
    seq = batches(task, n, torch.Generator().manual_seed(seed))
    answer = seq[:, :PROMPT]
    with torch.no_grad():
        for _ in range(L):
            answer = torch.cat([answer, model(input_ids=answer).logits[:, -1:].argmax(-1)], 1)
    return round((answer[:, PROMPT:] == seq[:, PROMPT:]).float().mean().item(), 3)
