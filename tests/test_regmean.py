"""The statistics merge (``compose(..., method="regmean")``) and the report's predictions.

References are computed independently in float64 from the raw activations the statistics summarise: deltas from
peft's own LoRA layers (``get_delta_weight``), Grams ``XᵀX/n`` formed here, the closed form solved densely with
``torch.linalg.solve`` (no stacking), and output changes measured as ``‖D Xᵀ‖`` on the activations themselves.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import build
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from peft_ortho import BlockLoraConfig, IncompatibleAdaptersError, testing
from peft_ortho.merging import compose
from peft_ortho.merging.merge import PRIOR_TARGET, PRIOR_WEIGHT, RIDGE, RIDGE_FLOOR
from peft_ortho.statistics import AdapterStatistics, Moment

MLP_LAYERS = ["lin0", "lin1"]
FLOOR = RIDGE_FLOOR  # the documented relative floor added to the ridge


# ----------------------------------------------------------------------------------------------------- helpers


def lora(targets=MLP_LAYERS, **kw) -> LoraConfig:
    return LoraConfig(**{"r": 3, "lora_alpha": 5, "target_modules": targets, "init_lora_weights": False, **kw})


def peft_deltas(base, folder: str) -> dict[str, torch.Tensor]:
    """``(out, in)`` float64 ΔW per layer, as peft's own layer computes it."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            d = module.get_delta_weight("default").detach().double()
            out[name] = d.reshape(d.shape[0], -1)
    return out


def record(model, layers, run) -> dict[str, torch.Tensor]:
    """Inputs each named layer sees while ``run(model)`` executes: ``{layer: X (n, in) float64}``."""
    seen: dict[str, list] = {name: [] for name in layers}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].detach().double().reshape(-1, args[0].shape[-1]))
        )
        for name in layers
    ]
    with torch.no_grad():
        run(model)
    for h in handles:
        h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def gram(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.shape[0]


def sketch_of(X: torch.Tensor, k: int) -> Moment:
    """Top-k eigenpairs of ``XᵀX/n`` and the mean of the rest (the sketch layout of ``Moment``)."""
    values, vectors = torch.linalg.eigh(gram(X))
    values, vectors = values.flip(0), vectors.flip(1)
    rest = values[k:]
    residual = float(rest.clamp_min(0).mean()) if rest.numel() else 0.0
    return Moment(X.shape[0], basis=vectors[:, :k].contiguous(), values=values[:k].clone(), residual=residual)


def to_stats(acts: dict[str, dict[str, torch.Tensor]], sketch: int | None = None) -> AdapterStatistics:
    """``{layer: {kind: X}}`` → ``AdapterStatistics`` of exact Grams (or sketches of rank ``sketch``)."""
    layers = {}
    for layer, kinds in acts.items():
        layers[layer] = {
            kind: Moment(X.shape[0], gram=gram(X)) if sketch is None else sketch_of(X, sketch)
            for kind, X in kinds.items()
        }
    return AdapterStatistics(layers=layers)


def mlp_acts(mlp, seed: int, kinds=("concept", "prior", "unconditional"), n: int = 40) -> dict:
    """Per-concept activations on the MLP: each concept's inputs live near its own 6-dim subspace."""
    g = torch.Generator().manual_seed(100 + seed)
    basis = torch.linalg.qr(torch.randn(32, 6, generator=g))[0]
    out: dict = {}
    for kind in kinds:
        if kind == "concept":
            x = torch.randn(n, 6, generator=g) @ basis.T * 2 + 0.1 * torch.randn(n, 32, generator=g)
        elif kind == "unconditional":
            x = torch.randn(n, 6, generator=g) @ basis.T * 0.5 + 0.3 * torch.randn(n, 32, generator=g)
        else:  # ordinary inputs, the same distribution for every concept (different samples)
            x = torch.randn(n, 32, generator=g)
        for layer, X in record(mlp, MLP_LAYERS, lambda m, x=x: m(x)).items():
            out.setdefault(layer, {})[kind] = X
    return out


def concept_gram(kinds: dict[str, torch.Tensor]) -> torch.Tensor:
    if "unconditional" in kinds:
        return (gram(kinds["concept"]) + gram(kinds["unconditional"])) / 2
    return gram(kinds["concept"])


def closed_form(deltas, weights, acts, layer, mu, ridge, prior_target):
    """``ΔW = (Σ w_i ΔW_i H_i)(Σ H_i [+ μ G_0] + λ̄ I)⁻¹`` densely in float64, from the activations."""
    H = []
    for a in acts:
        h = concept_gram(a[layer])
        if prior_target == "own" and "prior" in a[layer]:
            h = h + mu * gram(a[layer]["prior"])
        H.append(h)
    G = sum(H)
    if prior_target == "base":
        priors = [gram(a[layer]["prior"]) for a in acts if "prior" in a[layer]]
        if priors:
            G = G + mu * sum(priors) / len(priors)
    n = G.shape[0]
    G = G + (ridge + FLOOR) * torch.trace(G) / n * torch.eye(n, dtype=torch.float64)
    N = sum(w * d[layer] @ h for w, d, h in zip(weights, deltas, H))
    return torch.linalg.solve(G, N.T).T  # G symmetric: ΔW = N G⁻¹


def merged_deltas(merged) -> dict[str, torch.Tensor]:
    return {name: layer.delta_weight().double() for (_, name), layer in merged.layers.items()}


def rel_err(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


@pytest.fixture
def three(mlp, tmp_path):
    """Three plain LoRAs on the MLP with activations (concept, prior, unconditional) and weights ≠ 1."""
    folders = [build(mlp, lora(r=2 + i, lora_alpha=3 + i), tmp_path / f"c{i}", seed=i) for i in range(3)]
    acts = [mlp_acts(mlp, i) for i in range(3)]
    deltas = [peft_deltas(mlp, f) for f in folders]
    return folders, acts, deltas, [0.8, 1.3, -0.6]


# ----------------------------------------------------------------------------------------------------- the merge


@pytest.mark.parametrize("prior_target,mu,ridge", [("own", 1.0, RIDGE), ("base", 2.0, 0.05), ("own", 0.0, 0.0)])
def test_regmean_equals_dense_closed_form(mlp, three, prior_target, mu, ridge):
    folders, acts, deltas, weights = three
    stats = {f: to_stats(a) for f, a in zip(folders, acts)}
    merged = compose(
        folders, weights, "regmean", statistics=stats, prior_weight=mu, ridge=ridge, prior_target=prior_target
    )
    assert not merged.exact and "not Σ w_i ΔW_i" in merged.statement
    got = merged_deltas(merged)
    for layer in MLP_LAYERS:
        expected = closed_form(deltas, weights, acts, layer, mu, ridge, prior_target)
        assert rel_err(got[layer], expected) < 1e-5, layer
        assert merged.layers[(None, layer)].B.shape[1] == 2 + 3 + 4  # still a stacked LoRA of rank Σ r_i
    fused = merged.fuse(copy.deepcopy(mlp))
    for layer in MLP_LAYERS:
        expected = closed_form(deltas, weights, acts, layer, mu, ridge, prior_target)
        W = mlp.get_submodule(layer).weight.double()
        assert rel_err(fused.get_submodule(layer).weight.double() - W, expected) < 1e-5


def test_sketched_statistics_equal_exact_when_the_sketch_is_exact(mlp, three):
    """Concept inputs of rank ≤ k: a rank-k sketch with its residual is the Gram, so the merge is the same."""
    folders, _, _, weights = three
    acts = [{layer: {"concept": kinds["concept"][:5]} for layer, kinds in mlp_acts(mlp, i).items()} for i in range(3)]
    exact = compose(folders, weights, "regmean", statistics={f: to_stats(a) for f, a in zip(folders, acts)})
    sketched = compose(folders, weights, "regmean", statistics={f: to_stats(a, 5) for f, a in zip(folders, acts)})
    for layer in MLP_LAYERS:
        a, b = merged_deltas(exact)[layer], merged_deltas(sketched)[layer]
        assert rel_err(b, a) < 1e-6


def test_one_adapter_without_regularisation_is_its_delta_projected_onto_its_inputs(mlp, tmp_path):
    """μ = λ = 0, inputs of rank 4 < in (singular G): ΔW = ΔW_1 P, P the projector onto range(G_1)."""
    mlp = mlp.double()  # exactly rank-4 inputs (float32 rounding would add tiny but real directions)
    folder = build(mlp, lora(), tmp_path / "one", seed=7)
    delta = peft_deltas(mlp, folder)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 32, generator=g, dtype=torch.float64)
    acts = {layer: {"concept": X} for layer, X in record(mlp, MLP_LAYERS, lambda m: m(x)).items()}
    for stats in (to_stats(acts), to_stats(acts, 30)):  # the sketch holds every input direction (rank ≤ 30)
        merged = compose([folder], method="regmean", statistics={folder: stats}, prior_weight=0.0, ridge=0.0)
        for layer in MLP_LAYERS:
            X = acts[layer]["concept"]
            U, S, _ = torch.linalg.svd(X.T, full_matrices=False)
            U = U[:, S > S[0] * 1e-9]
            assert U.shape[1] < X.shape[1]  # really rank-deficient
            expected = delta[layer] @ (U @ U.T)
            assert rel_err(merged_deltas(merged)[layer], expected) < 1e-5, layer  # A' stored in float32


def test_prior_weight_trades_retention_for_drift(mlp, three):
    """More weight on ordinary inputs (``prior_target='base'``): smaller predicted drift, larger concept change."""
    folders, acts, _, weights = three
    stats = {f: to_stats(a) for f, a in zip(folders, acts)}
    reports = [
        compose(folders, weights, "regmean", statistics=stats, prior_target="base", prior_weight=mu).report
        for mu in (0.0, 10.0)
    ]
    change = [sum(c["output_change"] for c in r.concepts.values()) for r in reports]
    assert reports[1].drift["vs_single"] < reports[0].drift["vs_single"]
    assert change[1] > change[0]


# ----------------------------------------------------------------------------------------------------- choice of method


def test_auto_picks_regmean_only_when_every_adapter_carries_statistics(mlp, three):
    folders, acts, deltas, weights = three
    stats = {f: to_stats(a) for f, a in zip(folders, acts)}
    merged = compose(folders, weights, statistics=stats)
    assert merged.method == "regmean" and "Chosen by method='auto'" in merged.statement
    # with the documented defaults (chosen on the fidelity benchmark, docs/compose.md)
    assert (PRIOR_TARGET, PRIOR_WEIGHT, RIDGE) == ("base", 0.3, 1e-3)
    expected = closed_form(deltas, weights, acts, "lin0", PRIOR_WEIGHT, RIDGE, PRIOR_TARGET)
    assert rel_err(merged_deltas(merged)["lin0"], expected) < 1e-5

    none = compose(folders, weights)
    assert none.exact and "no adapter carries input statistics" in none.statement
    total = sum(w * d["lin0"] for w, d in zip(weights, deltas))
    assert rel_err(merged_deltas(none)["lin0"], total) < 1e-6

    # mixed: auto stacks exactly and names the adapter without statistics
    mixed = compose(folders, weights, statistics={f: stats[f] for f in folders[:2]})
    assert (
        mixed.exact and folders[2] in mixed.statement and "1 adapter(s) carry no input statistics" in mixed.statement
    )
    assert rel_err(merged_deltas(mixed)["lin0"], total) < 1e-6
    # explicit regmean on a mixed set: refused in one line naming that adapter
    with pytest.raises(IncompatibleAdaptersError) as info:
        compose(folders, weights, "regmean", statistics={f: stats[f] for f in folders[:2]})
    assert folders[2] in str(info.value) and folders[0] not in str(info.value).split("none for:")[1]
    assert "\n" not in str(info.value)


def test_refuses_missing_layer_statistics_wrong_width_and_bad_options(mlp, three):
    folders, acts, _, _ = three
    partial = to_stats(acts[0])
    del partial.layers["lin1"]
    stats = {folders[0]: partial, **{f: to_stats(a) for f, a in zip(folders[1:], acts[1:])}}
    with pytest.raises(IncompatibleAdaptersError) as info:
        compose(folders, method="regmean", statistics=stats)
    assert folders[0] in str(info.value) and "lin1" in str(info.value)
    wrong = to_stats(acts[0])
    wrong.layers["lin0"]["concept"] = Moment(3, gram=torch.eye(31, dtype=torch.float64))
    with pytest.raises(IncompatibleAdaptersError) as info:
        compose(folders, method="regmean", statistics={**stats, folders[0]: wrong})
    assert "lin0" in str(info.value) and "31" in str(info.value)
    with pytest.raises(IncompatibleAdaptersError, match="nobody"):
        compose(folders, statistics={"nobody": to_stats(acts[0])})
    for bad in ({"prior_weight": -1.0}, {"ridge": float("nan")}, {"prior_target": "mine"}):
        with pytest.raises(ValueError):
            compose(folders, method="regmean", **bad)


def test_calibration_arguments_are_validated(mlp, three):
    folders, *_ = three
    with pytest.raises(IncompatibleAdaptersError) as info:
        compose(folders, calibrate=mlp, prompts={"typo": "a photo of sks"})
    assert "'typo'" in str(info.value) and folders[0] in str(info.value)
    with pytest.raises(ValueError, match="calibrate"):
        compose(folders, prompts={folders[0]: "a photo of sks"})
    with pytest.raises(ValueError, match="prompts"):
        compose(folders, calibrate=mlp)


def test_calibration_computes_statistics_for_adapters_without(tmp_path):
    """``calibrate=pipe, prompts=...`` fills the statistics of an adapter that has none, then auto merges them."""
    from peft_ortho import statistics as stats_module

    if not hasattr(stats_module, "calibrate"):
        pytest.skip("peft_ortho.statistics.calibrate is not in this tree yet (built on the statistics branch)")
    pipe = testing.tiny_sd_pipeline()
    cfg = lora(targets=testing.UNET_TARGETS)
    folders = [build(pipe.unet, cfg, tmp_path / f"u{i}", seed=i) for i in range(2)]
    prompts = {folders[0]: "a photo of sks dog", folders[1]: "a painting in zwx style"}
    merged = compose(folders, calibrate=pipe, prompts=prompts)
    assert merged.method == "regmean" and merged.calibrated == folders
    assert all(a.statistics is not None for a in merged.adapters)
    assert set(merged.report.concepts) == set(folders)


# ----------------------------------------------------------------------------------------------------- exports


def unet_acts(unet, seed: int) -> dict:
    """Activations of the tiny UNet's attention layers for one concept (its own noise and text context)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k"))]
    names += [
        n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("to_v", "to_out.0"))
    ]
    out: dict = {}
    for kind, s in (("concept", seed), ("prior", 1000 + seed)):
        inputs = testing.unet_inputs(unet, seed=s)
        if kind == "concept":  # a concept-specific text context: low-rank text-side inputs
            inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"] + 2.0 * (seed + 1)
        for layer, X in record(unet, names, lambda m, inputs=inputs: m(**inputs)).items():
            out.setdefault(layer, {})[kind] = X
    return out


def test_exports_load_in_plain_peft_and_diffusers_and_reproduce_the_fused_model(tmp_path):
    pipe = testing.tiny_sd_pipeline()
    unet = pipe.unet
    cfg = lora(targets=testing.UNET_TARGETS)
    folders = [build(unet, cfg, tmp_path / f"u{i}", seed=i) for i in range(3)]
    stats = {f: to_stats(unet_acts(unet, i)) for i, f in enumerate(folders)}
    merged = compose(folders, [1.0, 0.5, 1.5], "regmean", statistics=stats)
    inputs = testing.unet_inputs(unet, seed=5)
    with torch.no_grad():
        fused = merged.fuse(copy.deepcopy(unet))(**inputs).sample
        base = unet(**inputs).sample
    assert (fused - base).abs().max() > 1e-4  # the merge does something

    peft_dir = merged.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(copy.deepcopy(unet), peft_dir)(**inputs).sample
    assert (loaded - fused).abs().max() < 1e-4

    file_dir = merged.save_diffusers(str(tmp_path / "diffusers"))
    fresh = testing.tiny_sd_pipeline()
    fresh.load_lora_weights(file_dir if os.path.isdir(file_dir) else os.path.dirname(file_dir))
    with torch.no_grad():
        via_diffusers = fresh.unet(**inputs).sample
    assert (via_diffusers - fused).abs().max() < 1e-4
    card = open(os.path.join(peft_dir, "README.md")).read()
    assert "regmean" in card and "not Σ w_i ΔW_i" in card and "output change" in card


def test_block_lora_terms_are_not_confined_after_the_statistics_merge(mlp, tmp_path):
    """``fuse`` must not take the block fast path: A'_i reads every input column (block_axis='in')."""
    configs = [
        BlockLoraConfig(
            r=2, target_modules=MLP_LAYERS, num_blocks=4, block_index=i, block_axis="in", init_lora_weights=False
        )
        for i in range(2)
    ]
    folders = [build(mlp, c, tmp_path / f"b{i}", seed=i) for i, c in enumerate(configs)]
    acts = [mlp_acts(mlp, i) for i in range(2)]
    deltas = []  # ΔW_i through peft: the tuner's own merge into the weights
    for f in folders:
        merged_model = PeftModel.from_pretrained(copy.deepcopy(mlp), f).merge_and_unload()
        deltas.append(
            {
                n: (merged_model.get_submodule(n).weight - mlp.get_submodule(n).weight).detach().double()
                for n in MLP_LAYERS
            }
        )
    merged = compose(
        folders,
        method="regmean",
        statistics={f: to_stats(a) for f, a in zip(folders, acts)},
        prior_weight=1.0,
        prior_target="own",
    )
    assert all(layer.blocks is None for layer in merged.layers.values())
    fused = merged.fuse(copy.deepcopy(mlp))
    for layer in MLP_LAYERS:
        expected = closed_form(deltas, [1.0, 1.0], acts, layer, 1.0, RIDGE, "own")
        got = fused.get_submodule(layer).weight.double() - mlp.get_submodule(layer).weight.double()
        assert rel_err(got, expected) < 1e-5
        single = deltas[0][layer]
        quarter = single.shape[1] // 4
        assert single[:, quarter:].abs().max() == 0  # adapter 0 alone changes only its input block…
        assert expected[:, quarter:].abs().max() > 1e-3 * expected.abs().max()  # …the merge reads every column


def test_stream_keeps_nothing_and_fuses_the_same(mlp, three):
    folders, acts, _, weights = three
    stats = {f: to_stats(a) for f, a in zip(folders, acts)}
    kept = compose(folders, weights, "regmean", statistics=stats)
    streamed = compose(folders, weights, "regmean", statistics=stats, stream=True)
    assert streamed.kept_layers is None  # nothing per layer (or per adapter) held after the checking pass
    a, b = kept.fuse(copy.deepcopy(mlp)), streamed.fuse(copy.deepcopy(mlp))
    for layer in MLP_LAYERS:
        assert torch.equal(a.get_submodule(layer).weight, b.get_submodule(layer).weight)
    assert streamed.kept_layers is None


# ----------------------------------------------------------------------------------------------------- the report


def direct_change(D: torch.Tensor, E: torch.Tensor, kinds: dict) -> tuple[float, float]:
    """``‖D X‖²`` and ``‖E X‖²`` per row on the actual activations (concept and unconditional averaged)."""
    parts = [kinds["concept"]] + ([kinds["unconditional"]] if "unconditional" in kinds else [])
    d2 = sum(float((X @ D.T).square().sum()) / X.shape[0] for X in parts) / len(parts)
    e2 = sum(float((X @ E.T).square().sum()) / X.shape[0] for X in parts) / len(parts)
    return d2, e2


@pytest.mark.parametrize("method,sketch", [("linear", None), ("regmean", None), ("regmean", 6), ("ties", None)])
def test_report_prediction_equals_direct_computation_on_activations(mlp, three, method, sketch):
    folders, acts, deltas, weights = three
    if sketch:  # make the sketch exact (inputs of rank ≤ 6 after truncation) so the direct computation is comparable
        acts = [{layer: {k: X[:6] for k, X in kinds.items()} for layer, kinds in a.items()} for a in acts]
    stats = {f: to_stats(a, sketch) for f, a in zip(folders, acts)}
    merged = compose(folders, weights, method, statistics=stats, base=mlp)
    report = merged.report
    got = merged_deltas(merged)
    for i, f in enumerate(folders):
        num = den = 0.0
        for layer in MLP_LAYERS:
            E = weights[i] * deltas[i][layer]
            d2, e2 = direct_change(got[layer] - E, E, acts[i][layer])
            assert report.output_change[f][layer] == pytest.approx((d2 / e2) ** 0.5, rel=1e-5)
            num, den = num + d2, den + e2
        assert report.concepts[f]["output_change"] == pytest.approx((num / den) ** 0.5, rel=1e-5)
        assert report.concepts[f]["retention"] == pytest.approx(1 - num / den, rel=1e-5, abs=1e-9)
    # drift on the pooled ordinary inputs, against the base weights and against the single adapters
    merged2 = single2 = base2 = 0.0
    for layer in MLP_LAYERS:
        priors = [a[layer]["prior"] for a in acts]
        W = mlp.get_submodule(layer).weight.detach().double()
        merged2 += sum(float((X @ got[layer].T).square().sum()) / X.shape[0] for X in priors) / 3
        base2 += sum(float((X @ W.T).square().sum()) / X.shape[0] for X in priors) / 3
        for i in range(3):
            E = weights[i] * deltas[i][layer]
            single2 += sum(float((X @ E.T).square().sum()) / X.shape[0] for X in priors) / 9
    assert report.drift["relative"] == pytest.approx((merged2 / base2) ** 0.5, rel=1e-5)
    assert report.drift["vs_single"] == pytest.approx((merged2 / single2) ** 0.5, rel=1e-5)
    text = str(report)
    assert "output change" in text and "‖ΔW X0‖/‖W X0‖" in text
    data = report.to_dict()
    assert set(data["concepts"]) == set(folders) and "relative" in data["drift"]


def test_report_predicts_that_a_plain_sum_of_many_adapters_fails(mlp, tmp_path):
    """Eight adapters on one 32-wide input: the exact sum's predicted retention is negative (and warned about);
    the statistics merge of the same adapters keeps far more."""
    folders = [build(mlp, lora(r=4, lora_alpha=8), tmp_path / f"n{i}", seed=20 + i) for i in range(8)]
    stats = {f: to_stats(mlp_acts(mlp, i, kinds=("concept", "prior"))) for i, f in enumerate(folders)}
    total = compose(folders, method="linear", statistics=stats).report
    regmean = compose(folders, method="regmean", statistics=stats, prior_weight=1.0, prior_target="own").report
    worst_sum, worst_regmean = total.worst_concept()[1], regmean.worst_concept()[1]
    assert worst_sum < 0 and "expect them to be lost" in str(total) and "try method='regmean'" in str(total)
    assert worst_regmean > worst_sum + 0.5
    assert "pass base=" in str(total)  # no base weights given: the alternative denominator is stated


def test_report_without_statistics_says_so_and_plot_and_json(mlp, three, tmp_path):
    folders, acts, _, _ = three
    plain = compose(folders).report
    assert "no input statistics" in str(plain) and plain.concepts == {}
    stats = {f: to_stats(a) for f, a in zip(folders, acts)}
    report = compose(folders, statistics=stats).report
    path = report.plot(str(tmp_path / "report.png"))
    assert os.path.getsize(path) > 1000
    report.to_json(str(tmp_path / "report.json"))
    assert '"basis_response"' in open(tmp_path / "report.json").read()


def test_fuse_measures_drift_against_the_weights_it_fuses_into(mlp, three):
    folders, acts, _, _ = three
    merged = compose(folders, statistics={f: to_stats(a) for f, a in zip(folders, acts)})
    assert "relative" not in merged.report.drift
    reference = compose(folders, statistics={f: to_stats(a) for f, a in zip(folders, acts)}, base=mlp).report
    merged.fuse(copy.deepcopy(mlp))
    assert merged.report.drift["relative"] == pytest.approx(reference.drift["relative"], rel=1e-9)


# ----------------------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-m", "peft_ortho.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_statistics_flags(mlp, three, tmp_path, capsys):
    from peft_ortho.cli import main

    folders, *_ = three
    # in a subprocess, as users run it: regmean on adapters without statistics is one line naming them, exit 1
    result = run_cli("inspect", *folders, "--method", "regmean")
    assert result.returncode == 1 and folders[0] in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_cli("inspect", *folders, "--ridge", "0.01", "--prior-weight", "2", "--prior-target", "base")
    assert result.returncode == 0 and "no input statistics" in result.stdout
    # the rest in-process (same parser and error path)
    assert main(["compose", *folders, "--out", str(tmp_path / "o"), "--prior-weight", "-1"]) == 1
    assert "prior_weight" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["inspect", *folders, "--prompt", f"{folders[0]}=a photo"]) == 1
    assert "--calibrate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["inspect", *folders, "--prior-target", "mine"])
    assert info.value.code == 2  # usage error


def test_recorded_statistics_files_drive_auto_and_the_cli(mlp, tmp_path):
    """Statistics recorded with ``InputStatistics`` and saved beside each adapter: ``compose`` (auto) reads them and
    merges with regmean, and ``peft-ortho inspect`` prints the predictions."""
    from peft_ortho import InputStatistics

    folders = []
    for i in range(2):
        torch.manual_seed(i)
        model = get_peft_model(copy.deepcopy(mlp), lora())
        stats = InputStatistics(model)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            with stats.record("concept"):
                model(torch.randn(16, 32, generator=g) + 3 * i)
            with stats.record("prior"):
                model(torch.randn(16, 32, generator=g))
        folder = str(tmp_path / f"rec{i}")
        model.save_pretrained(folder)
        stats.save_pretrained(folder)
        folders.append(folder)
    merged = compose(folders)
    assert merged.method == "regmean" and set(merged.report.concepts) == set(folders)
    result = run_cli("inspect", *folders, "--prior-target", "base", "--prior-weight", "0.5")
    assert result.returncode == 0, result.stderr
    assert "Statistics merge (regmean)" in result.stdout and "μ=0.5" in result.stdout
    assert "output change" in result.stdout and "retention" in result.stdout


# ------------------------------------------------------------------------------- the report's batched factor path


def _random_moment(g, width: int, sketch: bool) -> Moment:
    if not sketch:
        X = torch.randn(3 * width, width, generator=g, dtype=torch.float64)
        return Moment(3 * width, gram=X.T @ X / (3 * width))
    k = min(5, width - 1)
    U = torch.linalg.qr(torch.randn(width, k, generator=g, dtype=torch.float64))[0]
    values = torch.linspace(4.0, 1.0, k, dtype=torch.float64)
    return Moment(100, basis=U, values=values, residual=0.2)


def _dense_gram(m: Moment) -> torch.Tensor:
    """``G`` written out here: exact, or ``U diag(σ) Uᵀ + ρ (I − U Uᵀ)``."""
    if m.gram is not None:
        return m.gram
    U = m.basis
    return U @ torch.diag(m.values) @ U.T + m.residual * (torch.eye(U.shape[0], dtype=torch.float64) - U @ U.T)


@pytest.mark.parametrize("sketch", [False, True], ids=["exact", "sketch"])
@pytest.mark.parametrize("method", ["linear", "regmean", "ties"])  # stacked (same A), stacked (solved A), dense ΔW
def test_report_batched_path_equals_dense_computation(mlp, tmp_path, method, sketch):
    """Every number of the report against a float64 computation from the dense ΔW, E_i and G of each layer, on
    Linear and Conv2d (k×k and 1×1) layers, unequal ranks and weights ≠ 1 (one negative)."""
    targets = ["lin0", "lin1", "conv", "conv1x1"]
    folders = [build(mlp, lora(targets, r=2 + i, lora_alpha=3 + i), tmp_path / f"c{i}", seed=i) for i in range(3)]
    weights = [0.8, 1.3, -0.6]
    g = torch.Generator().manual_seed(7)
    widths = {"lin0": 32, "lin1": 64, "conv": 16 * 9, "conv1x1": 8}
    stats = {
        f: AdapterStatistics(
            layers={
                layer: {kind: _random_moment(g, w, sketch) for kind in ("concept", "unconditional", "prior")}
                for layer, w in widths.items()
            }
        )
        for f in folders
    }
    merged = compose(folders, weights, method, statistics=stats, base=mlp)
    report = merged.report
    num = torch.zeros(3, dtype=torch.float64)
    den = torch.zeros(3, dtype=torch.float64)
    drift = [0.0, 0.0, 0.0]  # ‖ΔW X0‖², mean_i ‖E_i X0‖², ‖W X0‖²
    for (_, layer), ml in merged.layers.items():
        dW = ml.delta.double() if ml.delta is not None else ml.B.double() @ ml.A.double()
        facs = [a.factors((None, layer), dtype=torch.float64) for a in merged.adapters]
        E = [w * f.scale * f.B @ f.A for w, f in zip(weights, facs)]
        s = [stats[f].layers[layer] for f in folders]
        for i, f in enumerate(folders):
            G = (_dense_gram(s[i]["concept"]) + _dense_gram(s[i]["unconditional"])) / 2
            D = dW - E[i]
            d2, e2 = float(torch.trace(D @ G @ D.T)), float(torch.trace(E[i] @ G @ E[i].T))
            assert report.output_change[f][layer] == pytest.approx((d2 / e2) ** 0.5, rel=1e-9, abs=1e-12)
            num[i] += d2
            den[i] += e2
        G0 = sum(_dense_gram(x["prior"]) for x in s) / 3
        W = mlp.get_submodule(layer).weight.detach().double().reshape(dW.shape[0], -1)
        m2, s2 = float(torch.trace(dW @ G0 @ dW.T)), sum(float(torch.trace(e @ G0 @ e.T)) for e in E) / 3
        entry = report.layers[layer]
        assert entry["drift"]["vs_single"] == pytest.approx((m2 / s2) ** 0.5, rel=1e-9)
        assert entry["drift"]["relative"] == pytest.approx((m2 / float(torch.trace(W @ G0 @ W.T))) ** 0.5, rel=1e-9)
        drift = [drift[0] + m2, drift[1] + s2, drift[2] + float(torch.trace(W @ G0 @ W.T))]
        # basis relations and sign conflicts, from the dense deltas and the down-projections
        for i, fi in enumerate(folders):
            own = float((E[i] @ facs[i].A.T).square().sum())
            for j, fj in enumerate(folders):
                if i == j:
                    continue
                cross = float((E[j] @ facs[i].A.T).square().sum())
                assert entry["basis_response"][f"{fi} <- {fj}"] == pytest.approx((cross / own) ** 0.5, rel=1e-9)
                if i < j:
                    overlap = float((facs[i].A @ facs[j].A.T).norm()) / (facs[i].rank * facs[j].rank) ** 0.5
                    assert entry["overlap"][f"{fi} | {fj}"] == pytest.approx(overlap, rel=1e-9)
                    both = (E[i] != 0) & (E[j] != 0)
                    expected = float(((E[i] * E[j] < 0) & both).sum()) / float(both.sum())
                    assert entry["sign_conflicts"][f"{fi} | {fj}"] == expected
    for i, f in enumerate(folders):
        assert report.concepts[f]["output_change"] == pytest.approx(float(num[i] / den[i]) ** 0.5, rel=1e-9)
    assert report.drift["vs_single"] == pytest.approx((drift[0] / drift[1]) ** 0.5, rel=1e-9)
    assert report.drift["relative"] == pytest.approx((drift[0] / drift[2]) ** 0.5, rel=1e-9)
    assert report.drift["layers"] == len(targets)
