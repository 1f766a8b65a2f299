"""The LLM composition study's regularisers and merge (studies/llm_composition.py) on a tiny GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from peft_ortho import OrthoLoraConfig
from studies import llm_composition, llm_probes


@pytest.fixture(scope="module")
def study():
    return llm_composition


@pytest.fixture(scope="module")
def base(study):
    return study.build_base(width=32, steps=2, seed=0)


def adapted(study, base, slot: int, task: int, scale: float = 0.1):
    config = OrthoLoraConfig(
        slot=slot,
        r=4,
        lora_alpha=4,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        trainable_token_indices=[task],
    )
    model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(slot)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * scale)
    return model


def test_outside_slot_is_zero_inside_the_slot_and_full_outside(study, base):
    layer = next(m for m in adapted(study, base, 0, study.NEG).modules() if isinstance(m, LoraLayer))
    a = layer.lora_A["default"].weight  # (r, in), orthonormal rows
    x = torch.randn(3, 7, a.shape[1])
    inside = torch.randn(3, 7, a.shape[0]) @ a
    assert study.outside_slot(layer, inside, x).item() == pytest.approx(0.0, abs=1e-5)
    outside = torch.randn(3, 7, a.shape[1])
    outside = outside - (outside @ a.T) @ a
    expected = outside.pow(2).sum(-1).mean() / x.pow(2).sum(-1).mean()
    assert study.outside_slot(layer, outside, x).item() == pytest.approx(expected.item(), rel=1e-5)


def test_module_output_is_the_adapter_branch_energy(study, base):
    model = adapted(study, base, 0, study.NEG)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    x = torch.randn(2, 5, layer.lora_A["default"].weight.shape[1])
    with torch.no_grad():
        branch = layer(x) - layer.get_base_layer()(x)
        got = study.module_output(layer, x)
    assert got.item() == pytest.approx((branch.pow(2).sum(-1).mean() / x.pow(2).sum(-1).mean()).item(), rel=1e-4)
    assert got.item() > 0


def test_merged_deltas_reproduce_each_adapter_and_add_trigger_rows(study, base):
    models = [adapted(study, base, 0, study.NEG), adapted(study, base, 1, study.SUCC)]
    parts = [study.deltas(base, m) for m in models]
    assert any("wte" in k for k in parts[0]) and any("wte" in k for k in parts[1])
    ids = study.make_batch(study.NEG, 4, torch.Generator().manual_seed(0))[:, :-1]
    with torch.no_grad():
        alone = study.merged_model(base, parts, keep=lambda i, key: i == 0)(input_ids=ids).logits
        torch.testing.assert_close(alone, models[0](input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    merged = study.merged_model(base, parts)
    # Disjoint trigger rows: each adapter's row lands in the merged embedding untouched by the other.
    wte = merged.transformer.wte.weight
    for part, task in zip(parts, (study.NEG, study.SUCC)):
        delta = next(v for k, v in part.items() if "wte" in k)
        torch.testing.assert_close(wte[task], base.transformer.wte.weight[task] + delta[task])


def test_quick_run_prints_the_table(study, capsys):
    study.main(["--quick", "--recipes", "silent", "--seeds", "0"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| silent | 0 |"))
    cells = [float(c) for c in row.split("|")[3:8]]
    assert all(0.0 <= c <= 1.0 for c in cells)


@pytest.fixture(scope="module")
def probes():
    return llm_probes


def test_probe_answers_follow_each_task_token(probes):
    x = torch.tensor([[0, 1, 2, 3, 9]] * 6)
    tasks = torch.tensor([[probes.COPY], [probes.REV], [probes.NEG], [probes.SUCC], [probes.TA], [probes.TB]])
    alias = probes.answers(tasks, x, "alias")
    assert alias.tolist() == [
        [0, 1, 2, 3, 9],
        [9, 3, 2, 1, 0],
        [9, 8, 7, 6, 0],
        [1, 2, 3, 4, 0],
        [9, 8, 7, 6, 0],  # TA = NEG under a new name
        [1, 2, 3, 4, 0],  # TB = SUCC under a new name
    ]
    combo = probes.answers(tasks, x, "combo")
    assert combo[4].tolist() == [0, 6, 7, 8, 9]  # NEG of the reversed digits
    assert combo[5].tolist() == [0, 4, 3, 2, 1]  # SUCC of the reversed digits
    # Private training: the erasure pool never holds either person's new token.
    assert not {probes.TA, probes.TB} & set(probes.BASE_TASKS + probes.UNTRAINED)


def test_probe_quick_run_prints_the_table(probes, capsys):
    probes.main(["--quick", "--skills", "combo"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 |"))
    cells = [float(c) for c in row.split("|")[2:10]]
    assert len(cells) == 8 and all(0.0 <= c <= 1.0 for c in cells)
