"""The merge-fidelity benchmark's pieces on a toy configuration (never the real cache under studies/.cache)."""

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the fidelity benchmark's data (digits) ships with scikit-learn")

from studies.fidelity import concepts as C  # noqa: E402
from studies.fidelity import metrics as M  # noqa: E402
from studies.fidelity.base_model import BaseConfig, build_tokenizer, class_prompt, load_digits_data  # noqa: E402
from studies.fidelity.run import (  # noqa: E402
    START,
    RunConfig,
    choose_recipe,
    choose_setting,
    run,
    stats_settings,
    subsets,
    write_docs,
)


@pytest.fixture(scope="module")
def data():
    return load_digits_data()


# ------------------------------------------------------------------------------------------------ metric arithmetic


def test_retained_improvement_on_hand_made_numbers():
    assert M.retained_improvement(1.0, 0.6, 0.5) == pytest.approx(0.8)  # kept 0.4 of a 0.5 gain
    assert M.retained_improvement(1.0, 0.5, 0.5) == pytest.approx(1.0)  # the merge is as good as the single adapter
    assert M.retained_improvement(1.0, 1.0, 0.5) == pytest.approx(0.0)  # back to the base
    assert M.retained_improvement(1.0, 1.2, 0.5) == pytest.approx(-0.4)  # worse than no adapter
    assert M.retained_improvement(1.0, 0.4, 0.5) == pytest.approx(1.2)  # the others help this concept
    assert math.isnan(M.retained_improvement(1.0, 0.9, 1.0))  # the adapter learned nothing: nothing to retain
    assert math.isnan(M.retained_improvement(1.0, 0.9, 1.1))


def test_prior_drift_and_identity_accuracy_on_hand_made_numbers():
    assert M.prior_drift(0.2, 0.21) == pytest.approx(0.05)
    assert M.prior_drift(0.2, 0.19) == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="prior loss must be positive"):
        M.prior_drift(0.0, 0.1)
    assert M.identity_accuracy(np.array([10, 10, 3, 10]), 10) == 0.75
    assert M.identity_accuracy(np.array([1, 2]), 10) == 0.0
    with pytest.raises(ValueError, match="at least one prediction"):
        M.identity_accuracy(np.array([]), 10)


def test_denoise_loss_matches_a_reference_computation():
    class Shrink(torch.nn.Module):
        """Predicts ε̂ = 0.5 · x_t, so the loss has a closed form given x_t."""

        def forward(self, x, t, states):
            return type("Out", (), {"sample": 0.5 * x})()

    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    images = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ev = M.make_eval_set(images, ["p0", "p1"], [0, 1, 1], M.timestep_grid(4), seed=5)
    assert ev.x0.shape == (12, 1, 4, 4) and ev.t.tolist() == [125, 375, 625, 875] * 3
    assert ev.prompt_idx.tolist() == [0] * 4 + [1] * 8
    again = M.make_eval_set(images, ["p0", "p1"], [0, 1, 1], M.timestep_grid(4), seed=5)
    assert torch.equal(ev.noise, again.noise)  # fixed noises: every model sees the same inputs

    def encode(prompts):
        return torch.zeros(len(prompts), 2, 8)

    x_t = sched.add_noise(ev.x0, ev.noise, ev.t)
    reference = ((0.5 * x_t - ev.noise) ** 2).mean().item()
    assert M.denoise_loss(Shrink(), sched, encode, ev, batch=5) == pytest.approx(reference, rel=1e-6)


def test_statistics_merge_settings_rule():
    trials = [
        {"options": {"prior_weight": 0.0}, "retained": 0.95, "prior_drift": 0.40},
        {"options": {"prior_weight": 1.0}, "retained": 0.90, "prior_drift": 0.14},
        {"options": {"prior_weight": 3.0}, "retained": 0.80, "prior_drift": 0.10},
    ]
    # Single adapters drift 10 %: within 1.5x are the last two; the better R of those wins, not the best R overall.
    assert choose_setting(trials, 0.10, 1.5)["options"] == {"prior_weight": 1.0}
    assert choose_setting(trials, 0.05, 1.5)["options"] == {"prior_weight": 3.0}  # none within: lowest drift
    with pytest.raises(ValueError, match="no statistics-merge setting"):
        choose_setting([], 0.1, 1.5)
    cfg = RunConfig(
        stats_grid=(("prior_weight", (0.0, 1.0, 3.0)), ("ridge", (1e-3,)), ("prior_target", ("own", "base")))
    )
    settings = [dict(s) for s in stats_settings(cfg)]
    assert len(settings) == 5 and {"prior_weight": 0.0, "ridge": 1e-3, "prior_target": "base"} not in settings


def test_recipe_rule_picks_the_lowest_loss_within_the_drift_bound():
    trials = [
        {"name": "a", "loss": 0.10, "prior_drift": 0.15},
        {"name": "b", "loss": 0.14, "prior_drift": 0.09},
        {"name": "c", "loss": 0.12, "prior_drift": 0.10},
    ]
    best, within = choose_recipe(trials, 0.10)
    assert best["name"] == "c" and within  # a has the lowest loss but drifts too much; c beats b on loss
    best, within = choose_recipe(trials, 0.05)
    assert best["name"] == "b" and not within  # none within: the lowest drift, and the rule says so


def test_evaluation_keys_ignore_the_recipe_probe_but_not_the_training():
    """Cached evaluations are named by what changes their numbers: trying more recipes (or on more concepts) must
    not throw away every evaluation, a different training recipe must."""
    from studies.fidelity.run import FULL

    key = FULL.eval_key("lora", 1e-2, (("n", 15),))
    probe = dataclasses.replace(FULL, recipe_grid=FULL.recipe_grid[:2], recipe_concepts=(15,), no_prior_concepts=())
    assert probe.eval_key("lora", 1e-2, (("n", 15),)) == key
    assert dataclasses.replace(FULL, prior_loss_weight=1.0).eval_key("lora", 1e-2, (("n", 15),)) != key
    assert FULL.eval_key("lora-distill", 1e-2, (("n", 15),)) != key  # another family: another training


def test_subsets_cover_every_concept():
    for n in (1, 2, 5, 10, 15):
        groups = subsets(15, n)
        assert len(groups) == math.ceil(15 / n)
        assert all(len(g) == n == len(set(g)) for g in groups)
        assert set().union(*map(set, groups)) == set(range(15))
    with pytest.raises(ValueError, match="N must be in"):
        subsets(5, 6)


# ------------------------------------------------------------------------------------------------ concepts


def test_concept_generator_is_deterministic_and_distinct(data):
    a = C.make_concepts(data, list(range(C.MAX_CONCEPTS)))
    b = C.make_concepts(load_digits_data(), list(range(C.MAX_CONCEPTS)))
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and x.prompt == y.prompt
    assert len(a) >= 16 and len({c.token for c in a}) == len(a)
    assert a[3].prompt == "a photo of sks3 digit three"
    # Concepts that share a digit class use disjoint images, from the split the base model never trains on.
    base_imgs, _ = data.part("base")
    pool, _ = data.part("concept", 0)
    assert torch.equal(a[0].images, -pool[:6]) and torch.equal(a[10].images, C.TRANSFORMS[10][1](pool[6:12]))
    assert not any(torch.equal(-x, y) for x in a[0].images for y in base_imgs[:200])
    # Every transformation changes a digit, and no two transformations agree on it: distinct identities.
    digit = data.part("concept", 8)[0][:4]
    outs = [fn(digit) for _, fn in C.TRANSFORMS]
    assert all(not torch.allclose(o, digit) for o in outs)
    assert all(not torch.allclose(outs[i], outs[j]) for i in range(len(outs)) for j in range(i))
    with pytest.raises(ValueError, match="concept index"):
        C.make_concept(data, C.MAX_CONCEPTS)


def test_tuning_concepts_share_no_image_or_token_with_the_benchmark(data):
    bench = C.make_concepts(data, list(range(15)))
    tuning = [C.make_tuning_concept(data, i) for i in C.TUNING_SET]
    assert torch.equal(tuning[0].images, C.make_concept(data, 15).images)  # the lr-tuning concept is one of them
    assert {c.token for c in tuning}.isdisjoint(c.token for c in bench)
    for t in tuning:
        assert t.label == 10 + C.TUNING_SET[t.index][0] and torch.equal(t.transform(t.images), t.transform(t.images))
        for b in bench:  # the same transformation on other images of the digit: no training image is shared
            assert not any(torch.equal(x, y) for x in t.images for y in b.images)
    with pytest.raises(ValueError, match="tuning concepts are"):
        C.make_tuning_concept(data, 3)


def test_classifier_dataset_labels_and_splits(data):
    x, y = C.classifier_dataset(data, "train", [0, 12])
    n_base = len(data.base_idx)
    assert x.shape[1] == 64 and set(y[:n_base].tolist()) == set(range(10))
    assert (y == 10).sum() == len(data.part("concept", 0)[0]) and (y == 22).sum() == len(data.part("concept", 2)[0])
    with pytest.raises(ValueError, match="'train' or 'val'"):
        C.classifier_dataset(data, "test", [0])


def test_tokenizer_gives_each_rare_token_one_id():
    tok = build_tokenizer(rare_tokens=4, max_length=10)
    ids = tok(["a photo of sks3 digit three", class_prompt(3)], padding="max_length", max_length=10).input_ids
    assert ids[0][:8] == [0, 3, 4, 5, tok.convert_tokens_to_ids("sks3"), 6, 10, 1]
    assert ids[1] == [0, 3, 4, 5, 6, 10, 1, 1, 1, 1]  # the class prompt lacks exactly the rare token
    assert tok.convert_tokens_to_ids("sks3") not in ids[1]


# ------------------------------------------------------------------------------------------------ DreamBooth training


def test_dreambooth_batch_holds_as_many_class_images_as_instance_images():
    from studies.fidelity.methods import dreambooth_batch

    instance = torch.arange(6.0).reshape(6, 1, 1, 1)
    pool = 100 + torch.arange(10.0).reshape(10, 1, 1, 1)
    prompts = [class_prompt(k % 3) for k in range(10)]
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        x, prior, prior_prompts = dreambooth_batch(instance, (pool, prompts), g)
        assert torch.equal(x, instance) and prior.shape == instance.shape
        values = [int(v) - 100 for v in prior.flatten().tolist()]
        assert len(set(values)) == 6 and set(values) <= set(range(10))  # without replacement, from the pool
        assert prior_prompts == [prompts[k] for k in values]  # each class image keeps its own class prompt
        seen |= set(values)
    assert seen == set(range(10))  # the whole pool is used over the steps
    x, prior, prior_prompts = dreambooth_batch(instance, None, g)
    assert prior is None and prior_prompts == [] and torch.equal(x, instance)
    with pytest.raises(ValueError, match="cannot fill a prior half"):
        dreambooth_batch(instance, (pool[:3], prompts[:3]), g)
    # More class images per step than instance images (the recipe probe's class_ratio 2 draws 12 of the pool).
    _, prior, prior_prompts = dreambooth_batch(instance, (pool, prompts), g, n_prior=9)
    assert prior.shape[0] == 9 and len(set(prior.flatten().tolist())) == 9 and len(prior_prompts) == 9
    with pytest.raises(ValueError, match="cannot fill a prior half of 11"):
        dreambooth_batch(instance, (pool, prompts), g, n_prior=11)
    with pytest.raises(ValueError, match="10 images but 9 prompts"):
        dreambooth_batch(instance, (pool, prompts[:9]), g)


@pytest.mark.parametrize("family", ["lora", "ortho-disjoint-erasure"])
def test_every_training_step_feeds_the_class_prompt_with_class_images(tmp_path, family):
    """Spy on the UNet's forwards: each step runs the instance images under the concept prompt (erased samples under
    a foreign one) and as many class images under the class prompt; without a pool, no class forward at all."""
    from studies.fidelity.base_model import build_models, encode
    from studies.fidelity.methods import train_adapter

    cfg = BaseConfig(train_steps=1, block_out_channels=(16, 32))
    unet, text_encoder, tokenizer, scheduler = build_models(cfg)
    base = type("Base", (), {"unet": unet, "scheduler": scheduler})()
    base.encode = lambda prompts: encode(text_encoder, tokenizer, prompts)
    concept = C.make_concept(load_digits_data(), 3, images_per_concept=2)
    pool = (torch.full((5, 1, 8, 8), 0.25), [class_prompt(3)] * 5)
    class_state = base.encode([class_prompt(3)])[0]
    calls = []

    def spy(module, args, kwargs):
        x, states = args[0], args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        calls.append((len(x), [bool(torch.equal(s, class_state)) for s in states], torch.is_grad_enabled()))

    unet.register_forward_pre_hook(spy, with_kwargs=True)  # deep-copied with the UNet into the trainer
    kw = dict(rank=1, steps=2, lr=1e-3, repeats=2, seed=0, num_blocks=8, erasure_prompts=["a photo of digit one"])
    out = train_adapter(base, concept, family, out_dir=str(tmp_path / "a"), class_images=pool, **kw)
    training = [c for c in calls if c[2]]  # forwards with autograd (the erasure teacher and CFG recording have none)
    prior = [c for c in training if all(c[1])]
    assert len(prior) == 2 and all(n == 4 for n, _, _ in prior)  # one class half per step, as big as the instance half
    assert sum(n for n, _, _ in training) == 2 * (4 + 4)  # nothing else trains: instance half + prior half
    assert out["final_prior_loss"] > 0
    calls.clear()
    train_adapter(base, concept, family, out_dir=str(tmp_path / "b"), class_images=None, **kw)
    assert not any(all(c[1]) for c in calls)


def test_distilled_prior_regresses_the_class_half_onto_the_frozen_base(tmp_path):
    """``class_target="base"`` (family ``lora-distill``): the prior term's target is the base's own prediction, so at
    the first step, where the adapter is still the identity, the prior loss is exactly 0; the noise target's is
    not. After a step the adapter has moved and the term is positive."""
    from studies.fidelity.base_model import build_models, encode
    from studies.fidelity.methods import class_target, train_adapter

    assert class_target("lora-distill") == "base" and class_target("lora") == "noise"
    cfg = BaseConfig(train_steps=1, block_out_channels=(16, 32))
    unet, text_encoder, tokenizer, scheduler = build_models(cfg)
    base = type("Base", (), {"unet": unet, "scheduler": scheduler})()
    base.encode = lambda prompts: encode(text_encoder, tokenizer, prompts)
    concept = C.make_concept(load_digits_data(), 3, images_per_concept=2)
    pool = (torch.rand(6, 1, 8, 8) * 2 - 1, [class_prompt(3)] * 6)
    kw = dict(rank=1, lr=1e-2, repeats=1, seed=0, class_images=pool, record_statistics=False)
    first = {t: train_adapter(base, concept, "lora", steps=1, out_dir=str(tmp_path / t), class_target=t, **kw)
             for t in ("base", "noise")}  # fmt: skip
    assert first["base"]["final_prior_loss"] == 0.0 and first["noise"]["final_prior_loss"] > 0.1
    later = train_adapter(base, concept, "lora", steps=3, out_dir=str(tmp_path / "later"), class_target="base", **kw)
    assert 0 < later["final_prior_loss"] < first["noise"]["final_prior_loss"]


# ------------------------------------------------------------------------------------------------ end to end


TOY = RunConfig(
    base=BaseConfig(train_steps=8, batch_size=8, block_out_channels=(16, 32)),
    concepts=3,
    ns=(1, 3),
    steps=4,
    sweep=(),
    num_blocks=8,
    eval_timesteps=2,
    samples_per_concept=2,
    sample_steps=2,
    prior_images_per_class=1,
    class_images=4,
    stats_grid=(("prior_weight", (0.0, 1.0)), ("ridge", (1e-3,)), ("prior_target", ("own", "base"))),
    methods=(
        "lora-sum",
        "lora-avg",
        "peft-ties",
        "ortho-disjoint",
        "ortho-disjoint-erasure",
        "block",
        "lora-stats",
        "lora-stats-calibrated",
        "lora-sequential",
    ),
    sequential_ns=(3,),
    recipe_grid=((1.0, 1, 4, 1e-2), (2.0, 2, 4, 1e-2)),
    no_prior_concepts=(0,),
)


def test_quick_run_end_to_end_on_a_toy_budget(tmp_path):
    logs = []
    results = run(TOY, str(tmp_path / "cache"), log=logs.append)
    summary = results["summary"]
    measured = [m for m in TOY.methods if m in summary]
    assert {"lora-sum", "lora-avg", "peft-ties", "ortho-disjoint"} <= set(measured)
    assert set(summary["lora-sequential"]) == {3}  # measured at sequential_ns only
    for name in measured:
        if name == "lora-sequential":
            assert summary[name][3]["evaluations"] == 3
            continue
        assert set(summary[name]) == {1, 3}
        assert summary[name][3]["evaluations"] == 3  # one merge of all three, each concept evaluated in it
        # N = 1 is the single adapter itself for every weight-space method (peft turns one adapter into "linear",
        # weight 1); the statistics merge of one adapter is its projection onto its recorded inputs.
        if "stats" not in name:
            assert summary[name][1]["retained"] == pytest.approx(1.0, abs=1e-4)
    rows = [r for r in results["rows"] if r["method"] == "lora-sum" and r["n"] == 3]
    base, single = results["base"]["loss"], results["single_loss"]["lora"]
    for r in rows:  # the table's number is the formula applied to the measured losses
        i = r["concept"]
        assert r["retained"] == pytest.approx((base[i] - r["merged_loss"]) / (base[i] - single[i]))
    # Averaging three LoRAs is the sum scaled by 1/3: a different merged model, hence a different loss.
    avg = {r["concept"]: r["merged_loss"] for r in results["rows"] if r["method"] == "lora-avg" and r["n"] == 3}
    assert all(avg[r["concept"]] != r["merged_loss"] for r in rows)
    families = {m["family"] for m in results["methods"]}
    # Each concept once per family (the statistics merge's settings are chosen on the same lora adapters).
    # ... plus the recipe probe's two trainings of the tuning concept and one adapter without prior preservation.
    assert sum("trained" in line for line in logs) == 3 * len(families) + 2 + 1
    recipe = results["recipe"]
    assert len(recipe["trials"]) == 2 and recipe["chosen"] in recipe["trials"]
    assert choose_recipe(recipe["trials"], TOY.recipe_drift_max) == (recipe["chosen"], recipe["within"])
    assert recipe["families"] == []  # neither trial is TOY's own training recipe (weight 2, 1× class images, 4 steps)
    (nop,) = results["no_prior"]
    assert nop["concept"] == 0 and nop["with"] == results["single"]["lora"][0]["prior_drift"]
    assert nop["without"] != nop["with"]  # a different adapter (no class half in its batches)

    # The statistics merge: settings chosen by the rule from the tuning trials, used by every statistics row, and
    # the report's predictions paired with measured retention.
    tuned = results["stats_tuning"]
    assert len(tuned["trials"]) == 3  # μ = 0 once (the target is moot), μ = 1 with either target
    best = choose_setting(tuned["trials"], tuned["single_prior_drift"], TOY.drift_allowance)
    assert [list(kv) for kv in best["options"].items()] == tuned["chosen"]
    stats_rows = [r for r in results["rows"] if r["method"] == "lora-stats"]
    assert stats_rows and all(r["predicted"] is not None for r in stats_rows)
    # The report predicts the exact sum too (its adapters carry statistics); peft's merges make no report.
    assert all(r["predicted"] is not None for r in rows)
    assert all(r["predicted"] is None for r in results["rows"] if r["method"] == "peft-ties")
    pairs = [r for r in results["rows"] if r["predicted"] is not None and r["n"] > 1]
    ranks = [np.argsort(np.argsort([r[k] for r in pairs])) for k in ("predicted", "retained")]
    rho = np.corrcoef(*ranks)[0, 1]  # Spearman without ties = Pearson of the ranks
    assert results["prediction"]["all"]["spearman"] == pytest.approx(rho)
    calibrated = [r for r in results["rows"] if r["method"] == "lora-stats-calibrated" and r["n"] == 3]
    assert {r["merged_loss"] for r in calibrated} != {r["merged_loss"] for r in stats_rows if r["n"] == 3}

    # Cached: a second run trains nothing and measures the same numbers.
    logs2 = []
    one = dataclasses.replace(TOY, methods=("ortho-disjoint",), ns=(3,))
    again = run(one, str(tmp_path / "cache"), log=logs2.append)
    assert not any("trained" in line for line in logs2)
    assert again["summary"]["ortho-disjoint"][3]["retained"] == pytest.approx(summary["ortho-disjoint"][3]["retained"])

    # The docs section is written between its markers; the rest of the page is kept.
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\nkept text\n")
    results["machine"] = "test"
    from studies.fidelity.concepts import make_concepts

    write_docs(results, make_concepts(load_digits_data(), [0, 1, 2]), "python -m studies.fidelity.run", str(docs))
    page = (docs / "benchmarks.md").read_text()
    assert "kept text" in page and START in page and "Retained improvement" in page
    assert "**DreamBooth recipe**" in page and "Per-stage runtimes" in page and "without prior preservation" in page
    for png in ("fidelity_base_samples.png", "fidelity_retained.png", "fidelity_concepts.png"):
        assert os.path.getsize(docs / png) > 1000


# ------------------------------------------------------------------------------------------------ statistics


def test_training_records_each_kind_and_calibration_copies_the_adapter(tmp_path):
    """Recorded statistics hold the three kinds; a calibrated copy keeps the adapter's files byte for byte and its
    text-side statistics are the Gram of the concept prompt's text states (a float64 computation done here)."""
    pytest.importorskip("peft_ortho.statistics", reason="needs the statistics recorder")
    from peft_ortho.statistics import calibrate, load_statistics  # noqa: F401
    from studies.fidelity.run import Benchmark

    bench = Benchmark(TOY, str(tmp_path / "cache"), log=lambda *_: None)
    folder = bench.train("lora", 1e-2, 1)
    recorded = load_statistics(folder, adapter="c01")
    layer = next(k for k in recorded.layers if k.endswith("attn2.to_k"))
    assert set(recorded.layers[layer]) == {"concept", "prior", "unconditional"}
    # Every step records as many concept rows as prior rows (the DreamBooth batch is half and half).
    assert recorded.layers[layer]["concept"].count == recorded.layers[layer]["prior"].count
    out = bench.calibrated(folder, 1)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(folder, name), "rb").read()
    calibrated = load_statistics(out, adapter="c01")
    states = bench.base.encode([bench.concept(1).prompt])[0].double()  # (tokens, 32): what every to_k reads
    reference = states.T @ states / len(states)
    # Products of float32 inputs are taken in float32 (summed in float64): within 1e-6 of the float64 reference.
    dense = calibrated.moment(layer, "concept").dense()
    assert torch.linalg.matrix_norm(dense - reference) <= 1e-6 * torch.linalg.matrix_norm(reference)
    assert not torch.allclose(recorded.moment(layer, "prior").dense(), reference, rtol=1e-3)
    assert bench.calibrated(folder, 1) == out  # cached


def test_recipe_section_says_when_the_adapters_are_not_trained_with_the_chosen_recipe():
    """A rerun whose probe picks another recipe than the configured one must not claim the adapters use it."""
    from studies.fidelity.report import recipe_section

    def trial(weight, ratio, steps, lr, loss):
        return {"prior_loss_weight": weight, "class_ratio": ratio, "steps": steps, "lr": lr, "loss": loss,
                "base_loss": 0.44, "identity": 0.9, "prior_drift": 0.09, "train_seconds": 50.0}  # fmt: skip

    configured, other = trial(2.0, 1, 120, 1e-2, 0.16), trial(2.0, 2, 240, 5e-3, 0.15)
    config = {"images_per_concept": 6, "repeats": 1, "prior_loss_weight": 2.0, "class_ratio": 1, "steps": 120}
    for best, claimed in ((configured, True), (other, False)):
        families = ["lora"] if claimed else []  # what the run finds trained with the chosen recipe
        results = {
            "recipe": {
                "trials": [configured, other],
                "chosen": best,
                "within": True,
                "drift_max": 0.1,
                "families": families,
            },
            "config": config,
            "lrs": {"lora": 1e-2},
            "concepts": [],
        }
        text = "\n".join(recipe_section(results))
        assert ("every adapter below is trained with it" in text) is claimed
        assert ("the adapters below are not" in text) is not claimed
    # The distilled prior chosen, and its family in the run: that family is named, the others' target stated.
    distilled = {**configured, "target": "base", "loss": 0.14}
    results = {
        "recipe": {
            "trials": [configured, distilled],
            "chosen": distilled,
            "within": True,
            "drift_max": 0.1,
            "families": ["lora-distill"],
        },
        "config": config,
        "lrs": {"lora": 1e-2, "lora-distill": 1e-2},
        "concepts": [],
    }
    text = "\n".join(recipe_section(results))
    assert "the `lora-distill` adapters below are trained with it" in text and "noise target" in text
    assert "every adapter below" not in text


def test_trajectory_batch_is_the_adapters_guided_sampling_with_the_benchmarks_sampler(tmp_path):
    """The trajectory calibration batch: ``calibration_inputs`` of the adapter with the benchmark's sampler (its
    steps and guidance, tested against peft's own layers in test_sequential), all steps in one batch, from a noise
    the identity measurement does not use."""
    from peft_ortho.merging.load import load_adapter
    from peft_ortho.merging.resolve import resolve
    from peft_ortho.statistics import calibration_inputs
    from studies.fidelity.run import Benchmark

    bench = Benchmark(TOY, str(tmp_path / "cache"), log=lambda *_: None)
    folder = bench.train("lora", 1e-2, 1)
    k, steps = 2, TOY.sample_steps
    batch = bench.trajectory_batch(folder, 1, k)
    assert {len(v) for v in batch.values()} == {2 * k * steps}
    calls = calibration_inputs(
        load_adapter(resolve(folder)), bench.pipeline, bench.concept(1).prompt, steps=steps, num_images=k,
        guidance_scale=TOY.guidance, seed=60_000 + 1,
    )  # fmt: skip
    for key, value in batch.items():
        assert torch.equal(value, torch.cat([c[key] for c in calls]))
    size = TOY.base.image_size
    noise = torch.randn(k, 1, size, size, generator=torch.Generator().manual_seed(60_000 + 1))
    assert torch.equal(batch["sample"][:k], noise)  # DDIM: init_noise_sigma 1, no input scaling
    identity_noise = torch.randn(k, 1, size, size, generator=torch.Generator().manual_seed(10_000 + 1))
    assert not torch.allclose(batch["sample"][:k], identity_noise)
    assert bench.trajectory_batch(folder, 1, k) is batch  # computed once per adapter
    prior = bench.prior_trajectory_batch()  # the base's own sampling of the ten class prompts
    calls = calibration_inputs(None, bench.pipeline, [class_prompt(d) for d in range(10)], steps=steps,
                               guidance_scale=TOY.guidance, seed=61_000)  # fmt: skip
    assert {len(v) for v in prior.values()} == {2 * 10 * steps}
    assert all(torch.equal(prior[key], torch.cat([c[key] for c in calls])) for key in prior)
