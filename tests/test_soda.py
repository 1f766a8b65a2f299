"""SODA tuner: exact identity at init, forward = dense reference, Kronecker math, merging, saving, export, errors."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

import peft_ortho
from peft_ortho import SodaConfig, testing
from peft_ortho.errors import AdapterFileError, BasisError, BasisMismatchError, UnsupportedLayerError
from peft_ortho.tuners.soda import auto_factors, export_lora, kron_apply, soda_lora_state_dict
from peft_ortho.tuners.soda.layer import cayley, inverse_cayley

TARGETS = ["lin0", "lin1", "conv", "conv1x1"]
MODES = [(d, r) for d in ("svd", "lq") for r in ("cayley", "stiefel")]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 32, generator=g), torch.randn(2, 16, 6, 6, generator=g)


def _run(model, x, img):
    with torch.no_grad():
        return model(x, img)


def _soda(mlp, **kw):
    return get_peft_model(copy.deepcopy(mlp), SodaConfig(target_modules=TARGETS, **kw))


def _dense_w(layer, adapters, spectral_sum=False):
    """Reference dense adapted weight (float64, 2-D) built from the layer's own decomposition, never from its forward.

    One adapter: SVD ``U diag(σ + Δσ) Vᵀ R``; LQ ``(L + diag(Δ)) Q R`` with ``L = W0 Qᵀ``.
    """
    w0 = layer.get_base_layer().weight.detach().double().flatten(1)
    a = adapters[0]
    right = layer.soda_right[a].double()
    delta = sum(layer.soda_spectrum[b].detach().double() for b in adapters)
    rot = torch.eye(w0.shape[1], dtype=torch.float64)
    for b in adapters:
        rot = rot @ layer.dense_rotation(b)
    if a in layer.soda_left:
        u, sigma = layer.soda_left[a].double(), layer.soda_sigma[a].double()
        k = sigma.shape[0]
        # the part of W0 outside the k kept singular directions stays as it is
        rest = w0 - (u * sigma) @ right
        return (rest + (u * (sigma + delta)) @ right) @ rot
    lower = w0 @ right.T  # L (first k columns): W0 = L Q for the full Q
    k = right.shape[0]
    lower[torch.arange(k), torch.arange(k)] += delta
    rest = w0 - (w0 @ right.T) @ right
    return (rest + lower @ right) @ rot


def _apply_dense(layer, w, x):
    base = layer.get_base_layer()
    bias = base.bias.detach().double() if base.bias is not None else None
    if isinstance(base, nn.Linear):
        return F.linear(x.double(), w, bias)
    kernel = w.reshape(base.weight.shape)
    return F.conv2d(x.double(), kernel, bias, base.stride, base.padding, base.dilation)


# ------------------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("decomposition,rotation", MODES)
@pytest.mark.parametrize("forward_mode", ["activations", "weight"])
def test_identity_at_init_is_exact(mlp, decomposition, rotation, forward_mode):
    x, img = _inputs()
    ref = _run(mlp, x, img)
    model = _soda(mlp, decomposition=decomposition, rotation=rotation, forward_mode=forward_mode)
    model.train()  # with gradients enabled too
    assert all(torch.equal(a, b) for a, b in zip(model(x, img), ref))
    out = _run(model, x, img)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))  # bit for bit, Linear, 3×3 conv and 1×1 conv
    for layer in model.base_model.soda_layers().values():
        assert torch.equal(layer.get_delta_weight("default"), torch.zeros_like(layer.get_base_layer().weight))


def test_identity_at_init_half_precision(mlp):
    x, img = _inputs()
    base = copy.deepcopy(mlp).to(torch.bfloat16)
    ref = _run(base, x.bfloat16(), img.bfloat16())
    model = get_peft_model(base, SodaConfig(target_modules=TARGETS))
    out = _run(model, x.bfloat16(), img.bfloat16())
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    layer = model.base_model.model.lin0
    assert layer.soda_right["default"].dtype == torch.bfloat16  # frozen decomposition stays in the model's dtype
    assert layer.soda_spectrum["default"].dtype == torch.float32  # trainable tensors upcast like peft's other tuners


# ------------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("decomposition,rotation", MODES)
@pytest.mark.parametrize("spectrum_rank", [None, 3])
@pytest.mark.parametrize("forward_mode", ["activations", "weight"])
def test_forward_equals_dense_reference(mlp, decomposition, rotation, spectrum_rank, forward_mode):
    model = _soda(
        mlp,
        decomposition=decomposition,
        rotation=rotation,
        init_weights=False,
        spectrum_rank=spectrum_rank,
        forward_mode=forward_mode,
    )
    x, img = _inputs(1)
    for name, layer in model.base_model.soda_layers().items():
        inp = x if name == "lin0" else torch.randn(5, 64) if name == "lin1" else img if name == "conv" else img[:, :8]
        ref = _apply_dense(layer, _dense_w(layer, ["default"]), inp)
        with torch.no_grad():
            out = layer(inp)
        assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max(), name
        # and the decomposition is one of W0: U diag(σ) Vᵀ (SVD, full) / L Q with L lower-trapezoidal, diag(L) = σ ≥ 0
        if spectrum_rank is None:
            w0 = layer.get_base_layer().weight.detach().double().flatten(1)
            right, sigma = layer.soda_right["default"].double(), layer.soda_sigma["default"].double()
            if decomposition == "svd":
                assert torch.allclose((layer.soda_left["default"].double() * sigma) @ right, w0, atol=1e-5)
            else:
                lower = w0 @ right.T
                assert torch.allclose(lower @ right, w0, atol=1e-5)
                assert torch.allclose(torch.triu(lower, 1), torch.zeros_like(lower), atol=1e-5)
                assert torch.allclose(torch.diagonal(lower), sigma, atol=1e-5) and (sigma >= 0).all()


def test_kron_apply_equals_dense_kronecker_product():
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(d, d, generator=g, dtype=torch.float64) for d in (3, 4, 5)]
    x = torch.randn(2, 7, 60, generator=g, dtype=torch.float64)
    dense = torch.kron(torch.kron(mats[0], mats[1]), mats[2])
    assert torch.allclose(kron_apply(x, mats), x @ dense.T, atol=1e-12)
    assert torch.allclose(kron_apply(x[..., :4], mats[1:2]), x[..., :4] @ mats[1].T, atol=1e-12)
    assert torch.equal(kron_apply(x, []), x)
    with pytest.raises(ValueError, match="product of factor sizes"):
        kron_apply(x, mats[:2])


def test_both_forward_paths_give_the_same_gradients(mlp):
    x, img = _inputs()
    grads = []
    for mode in ("activations", "weight"):
        model = _soda(mlp, init_weights=False, forward_mode=mode)
        y, z = model(x, img)
        (y.square().sum() + z.square().sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5), n


def test_auto_forward_path_follows_the_cost_model(mlp):
    model = _soda(mlp)
    lin0 = model.base_model.model.lin0  # 32 → 64, full spectrum k = 32
    few, many = torch.randn(2, 32), torch.randn(4096, 32)
    assert not lin0._use_weight_path(few, "default") and lin0._use_weight_path(many, "default")
    small_k = _soda(mlp, spectrum_rank=2).base_model.model.lin0
    assert not small_k._use_weight_path(many, "default")  # rank-2 term: stays on the activations


def test_auto_factors_and_cayley():
    assert auto_factors(320) == [16, 20] and auto_factors(768) == [24, 32] and auto_factors(1280) == [32, 40]
    assert auto_factors(4096, 3) == [16, 16, 16] and auto_factors(7) == [7] and auto_factors(1) == []
    v = 0.3 * torch.randn(10, dtype=torch.float64)
    r = cayley(v, 5)
    assert torch.allclose(r.T @ r, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(inverse_cayley(r), v, atol=1e-10)
    assert torch.equal(cayley(torch.zeros(10), 5), torch.eye(5))


def test_parameter_count_and_factor_sizes(mlp):
    model = _soda(mlp, factors={"32": [2, 16]}, spectrum_rank=4)
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert lin0.soda_rotation["default"].sizes == (2, 16) and lin1.soda_rotation["default"].sizes == (8, 8)
    assert lin0.soda_spectrum["default"].shape == (4,)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Cayley: d(d−1)/2 per factor; spectrum: 4 per layer; conv 16 channels → [4, 4]; 1×1 conv 8 → [2, 4]
    assert trainable == (1 + 120) + (28 + 28) + (6 + 6) + (1 + 6) + 4 * 4


@pytest.mark.parametrize("forward_mode", ["activations", "weight"])
def test_gradients_reach_spectrum_and_factors_only(mlp, forward_mode):
    model = _soda(mlp, init_weights=False, forward_mode=forward_mode)
    x, img = _inputs()
    y, z = model(x, img)
    (y.square().sum() + z.square().sum()).backward()
    for name, p in model.named_parameters():
        is_adapter = ".soda_spectrum." in name or ".soda_rotation." in name
        assert p.requires_grad == is_adapter, name
        if is_adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    for name, b in model.named_buffers():
        assert not b.requires_grad, name


# ------------------------------------------------------------------------------------------------------- stiefel


def test_plain_optimizer_on_stiefel_factors_warns_with_measured_error(mlp):
    model = _soda(mlp, rotation="stiefel", stiefel_check_every=2)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, img = _inputs()
    with pytest.warns(
        UserWarning, match=r"no longer orthogonal \(‖RᵀR − I‖_F = [0-9.e-]+ > 0\.0001\).*make_optimizer"
    ):
        for _ in range(4):
            opt.zero_grad()
            y, z = model(x, img)
            (y.sum() + z.sum()).backward()
            opt.step()


def test_stiefel_optimizer_keeps_factors_orthogonal_without_warning(mlp, recwarn):
    model = _soda(mlp, rotation="stiefel", stiefel_check_every=1)
    model.train()
    opt = peft_ortho.optim.make_optimizer(model, lr=0.05)
    x, img = _inputs()
    for _ in range(30):
        opt.zero_grad()
        y, z = model(x, img)
        (y.square().sum() + z.square().sum()).backward()
        opt.step()
    errors = [
        layer.soda_rotation["default"].orthogonality_error() for layer in model.base_model.soda_layers().values()
    ]
    assert max(errors) < 1e-5
    assert (
        max(
            layer.soda_rotation["default"]
            .stiefel[0]
            .detach()
            .sub(torch.eye(layer.soda_rotation["default"].sizes[0]))
            .abs()
            .max()
            for layer in model.base_model.soda_layers().values()
        )
        > 1e-3
    )
    assert not [w for w in recwarn if "orthogonal" in str(w.message)]


@pytest.mark.parametrize("rotation", ["cayley", "stiefel"])
def test_rotation_stays_orthogonal_over_many_training_steps(rotation):
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 16)), SodaConfig(target_modules=["0"], rotation=rotation))
    model.train()
    if rotation == "cayley":  # any optimizer: orthogonal by construction
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    else:
        opt = peft_ortho.optim.make_optimizer(model, lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    for _ in range(500):
        opt.zero_grad()
        (model(x) - target).square().mean().backward()
        opt.step()
    rotation_module = model.base_model.model[0].soda_rotation["default"]
    assert rotation_module.orthogonality_error() < 1e-5
    moved = max((m - torch.eye(m.shape[0])).abs().max().item() for m in rotation_module.matrices())
    assert moved > 0.05  # it did train


# ------------------------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("decomposition", ["svd", "lq"])
def test_merge_unmerge_and_merge_and_unload(mlp, decomposition):
    model = _soda(mlp, decomposition=decomposition, init_weights=False)
    x, img = _inputs()
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in model.base_model.soda_layers().items()}
    out = _run(model, x, img)
    model.merge_adapter()
    merged = _run(model, x, img)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(merged, out))
    model.unmerge_adapter()
    for n, m in model.base_model.soda_layers().items():
        assert torch.equal(m.get_base_layer().weight, weights[n])  # unmerge restores W0 bit for bit
    unloaded = model.merge_and_unload()
    assert not any(isinstance(m, peft_ortho.tuners.soda.SodaLayer) for m in unloaded.modules())
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(_run(unloaded, x, img), out))


def test_two_adapters_add_their_weight_deltas(mlp):
    model = _soda(mlp, init_weights=False)
    model.add_adapter("b", SodaConfig(target_modules=TARGETS, init_weights=False, decomposition="lq"))
    with torch.no_grad():  # make b clearly differ from default
        for layer in model.base_model.soda_layers().values():
            layer.soda_spectrum["b"].mul_(-2.0)
    model.base_model.set_adapter(["default", "b"])
    x, img = _inputs()
    out = _run(model, x, img)
    for name, layer in model.base_model.soda_layers().items():
        w0 = layer.get_base_layer().weight.detach().double().flatten(1)
        w = w0 + (_dense_w(layer, ["default"]) - w0) + (_dense_w(layer, ["b"]) - w0)
        inp = x if name == "lin0" else torch.randn(3, 64) if name == "lin1" else img if name == "conv" else img[:, :8]
        with torch.no_grad():
            assert (layer(inp).double() - _apply_dense(layer, w, inp)).abs().max() < 1e-5, name
    unloaded = model.merge_and_unload()  # merges both active adapters: the sum-of-deltas merge
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(_run(unloaded, x, img), out))


@pytest.mark.parametrize("rotation", ["cayley", "stiefel"])
def test_spectral_combination_sums_spectra_and_composes_rotations(mlp, rotation):
    model = _soda(mlp, init_weights=False, rotation=rotation)
    model.add_adapter("b", SodaConfig(target_modules=TARGETS, init_weights=False, rotation=rotation))
    with torch.no_grad():
        for layer in model.base_model.soda_layers().values():
            layer.soda_spectrum["b"].mul_(0.5)
            for p in layer.soda_rotation["b"].parameters():
                if rotation == "cayley":
                    p.mul_(-0.7)
                else:
                    p.copy_(p @ p.clone())  # R², another orthogonal factor
    model.base_model.add_spectral_combination(["default", "b"], "ab")
    model.base_model.set_adapter("ab")
    for name, layer in model.base_model.soda_layers().items():
        assert layer.soda_right["ab"] is layer.soda_right["default"]  # decomposition shared, not recomputed
        w = _dense_w(layer, ["default", "b"])  # U diag(σ + Δσ_a + Δσ_b) Vᵀ R_a R_b
        ref_w = _dense_w(layer, ["ab"])
        assert torch.allclose(w, ref_w, atol=1e-6), name


# ------------------------------------------------------------------------------------------------------- saving


def test_save_load_round_trip_recomputes_decomposition(mlp, tmp_path):
    model = _soda(mlp, init_weights=False)
    x, img = _inputs()
    out = _run(model, x, img)
    model.save_pretrained(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".soda_spectrum" in k or ".soda_rotation." in k or ".soda_sigma" in k for k in keys)
    assert json.load(open(tmp_path / "a" / "adapter_config.json"))["peft_type"] == "SODA"
    loaded = PeftModel.from_pretrained(copy.deepcopy(mlp), tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(_run(loaded, x, img), out))
    # decomposition in float64 instead: same adapter, same function to float32 precision ("deterministic enough")
    cfg64 = SodaConfig.from_pretrained(tmp_path / "a")
    cfg64.decomposition_dtype = "float64"
    cfg64.save_pretrained(tmp_path / "a")
    loaded64 = PeftModel.from_pretrained(copy.deepcopy(mlp), tmp_path / "a")
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(_run(loaded64, x, img), out))


def test_load_onto_other_base_weights_is_refused(mlp, tmp_path):
    _soda(mlp, init_weights=False).save_pretrained(tmp_path / "a")
    other = copy.deepcopy(mlp)
    with torch.no_grad():
        other.lin1.weight.mul_(1.1)
    with pytest.raises(BasisMismatchError, match=r"layer 'lin1'.*differ from those the adapter was trained on"):
        PeftModel.from_pretrained(other, tmp_path / "a")


def test_dtype_move_to_float64(mlp):
    model = _soda(mlp, init_weights=False)
    x, img = _inputs()
    ref = _run(mlp, x, img)
    out = _run(model, x, img)
    assert (out[0] - ref[0]).abs().max() > 1e-3
    model.double()
    out64 = _run(model, x.double(), img.double())
    assert out64[0].dtype == torch.float64 and (out64[0] - out[0].double()).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(mlp):
    with pytest.raises(BasisError, match=r"layer 'lin0'.*factor sizes \[3, 5\] multiply to 15.*32"):
        _soda(mlp, factors=[3, 5])
    with pytest.raises(BasisError, match=r"spectrum_rank 40 exceeds min\(out, in\) = 32"):
        _soda(mlp, spectrum_rank=40)
    bad = copy.deepcopy(mlp)
    with torch.no_grad():
        bad.lin1.weight[0, 0] = float("nan")
    with pytest.raises(BasisError, match=r"layer 'lin1'.*1 non-finite value"):
        get_peft_model(bad, SodaConfig(target_modules=["lin1"]))

    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

    with pytest.raises(UnsupportedLayerError, match=r"layer 'emb'.*Embedding is not supported"):
        get_peft_model(WithEmbedding(), SodaConfig(target_modules=["emb"]))
    with pytest.raises(ValueError, match="decomposition must be one of"):
        SodaConfig(target_modules=["x"], decomposition="qr")
    with pytest.raises(ValueError, match="factor sizes must be non-empty lists"):
        SodaConfig(target_modules=["x"], factors=[0, 4])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cayley_of_half_parameters_is_solved_in_float32(dtype):
    """LAPACK has no half-precision solve: the Cayley transform of a half vector is solved in float32 and rounded once,
    so it equals the float64 transform rounded to the dtype (and its inverse recovers the vector)."""
    vec = 0.3 * torch.randn(6, generator=torch.Generator().manual_seed(0))
    r = cayley(vec.to(dtype), 4)
    assert r.dtype == dtype
    want = cayley(vec.to(dtype).double(), 4)
    torch.testing.assert_close(r.double(), want, rtol=0, atol=2 * torch.finfo(dtype).eps)
    back = inverse_cayley(r)
    assert back.dtype == dtype
    torch.testing.assert_close(back.double(), vec.to(dtype).double(), rtol=0, atol=8 * torch.finfo(dtype).eps)


def test_incomplete_or_foreign_state_dict_is_refused(mlp):
    """A SODA state dict lacking a tensor of the adapter (e.g. a rotation dropped by a key rename), or holding one for
    a layer the model does not adapt, is refused by name before anything is loaded; a complete one loads."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = get_peft_model_state_dict(_soda(mlp, init_weights=False))
    model = _soda(mlp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in state.items() if k != "base_model.model.lin1.soda_rotation.skew.0"}
    with pytest.raises(AdapterFileError, match=r"adapter 'default', layer 'lin1'.*lacks the tensor"):
        set_peft_model_state_dict(model, missing)
    extra = {**state, "base_model.model.lin2.soda_spectrum": torch.zeros(3)}
    with pytest.raises(AdapterFileError, match=r"adapter 'default', layer 'lin2'.*no place for"):
        set_peft_model_state_dict(model, extra)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not set_peft_model_state_dict(model, state).unexpected_keys


def test_two_random_adapters_differ(mlp):
    """``init_weights=False`` values are seeded by adapter *and* layer name: two adapters on one layer differ."""
    model = _soda(mlp, init_weights=False)
    model.add_adapter("b", SodaConfig(target_modules=TARGETS, init_weights=False))
    lin0 = model.base_model.model.lin0
    assert not torch.equal(lin0.soda_spectrum["default"], lin0.soda_spectrum["b"])


# ------------------------------------------------------------------------------------------------------- export


def test_low_rank_export_error_matches_discarded_singular_values(mlp):
    model = _soda(mlp, init_weights=False)
    tensors, meta, report = soda_lora_state_dict(model, rank=3)
    total, lost = 0.0, 0.0
    for name, layer in model.base_model.soda_layers().items():
        delta = layer.get_delta_weight("default", dtype=torch.float64)
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        expected = (s[3:].square().sum().sqrt() / s.square().sum().sqrt()).item()
        assert report.layers[name]["relative_error"] == pytest.approx(expected, rel=1e-9)
        a, b = tensors[f"{name}.lora_A.weight"].double(), tensors[f"{name}.lora_B.weight"].double()
        approx = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        measured = torch.linalg.matrix_norm(approx - delta.reshape(approx.shape)) / s.square().sum().sqrt()
        assert measured.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
        total, lost = total + s.square().sum().item(), lost + s[3:].square().sum().item()
    assert report.relative_error == pytest.approx((lost / total) ** 0.5, rel=1e-9)
    assert meta["r"] == 3 and meta["lora_alpha"] == 3
    _, _, exact = soda_lora_state_dict(model, rank=None)
    assert exact.relative_error == 0.0


def test_export_loads_in_diffusers_and_matches(tmp_path):
    pipe = testing.tiny_sd_pipeline()
    inputs = testing.unet_inputs(pipe.unet)
    unet = get_peft_model(pipe.unet, SodaConfig(target_modules=testing.UNET_TARGETS, init_weights=False))
    with torch.no_grad():
        expected = unet(**inputs).sample
    report = export_lora(unet, tmp_path / "exact", rank=None)
    assert report.relative_error == 0.0 and os.path.isfile(report.path)
    fresh = testing.tiny_sd_pipeline()
    with torch.no_grad():
        base = fresh.unet(**inputs).sample
    fresh.load_lora_weights(str(tmp_path / "exact"))
    with torch.no_grad():
        loaded = fresh.unet(**inputs).sample
    assert (expected - base).abs().max() > 1e-2  # the adapter does something
    assert (loaded - expected).abs().max() < 1e-4 * expected.abs().max()
    low = export_lora(unet, tmp_path / "rank4", rank=4)
    assert 0 < low.relative_error < 1 and str(low).startswith("SODA → LoRA export (rank 4)")
    with safe_open(str(tmp_path / "rank4" / "pytorch_lora_weights.safetensors"), "pt") as f:
        provenance = json.loads(f.metadata()["peft_ortho_adapter_config"])
    assert provenance["unet"]["peft_type"] == "SODA"
    assert provenance["unet"]["soda_export"]["relative_error"] == pytest.approx(low.relative_error)


# ------------------------------------------------------------------------------------------------- LAPACK threads


def test_lapack_runs_single_threaded_only_when_asked_or_oversubscribed(monkeypatch):
    """CPU SVD/QR drop to one thread only where the cores are measured oversubscribed (or the variable asks)."""
    from peft_ortho.tuners.soda import layer

    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.delenv(layer.LAPACK_THREADS_ENV, raising=False)
        monkeypatch.setattr(layer.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # idle machine: keep the threads
        with layer._lapack_threads(cpu):
            assert torch.get_num_threads() == 2
        monkeypatch.setattr(layer.os, "getloadavg", lambda: (1e6, 0.0, 0.0))  # far more runnable than cores
        with layer._lapack_threads(cpu):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # restored
        monkeypatch.setenv(layer.LAPACK_THREADS_ENV, "0")  # never, even when oversubscribed
        with layer._lapack_threads(cpu):
            assert torch.get_num_threads() == 2
        monkeypatch.setattr(layer.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        monkeypatch.setenv(layer.LAPACK_THREADS_ENV, "1")  # always
        with layer._lapack_threads(cpu):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
