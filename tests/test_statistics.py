"""Input statistics: recording (Linear, Conv2d, Conv1D; kinds; DDP; checkpointing; compile), the file (round trip,
sketch bound, hostile files), travel with the adapter (save, push, card, Hub cache, compose's loader) and calibration.

Every Gram is checked against a float64 computation written independently of the code under test: activations
captured by separate hooks, convolution patches cut out by explicit slicing rather than ``F.unfold``.
"""

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import torch
from conftest import sd_lora_pair
from hubcache import populate_hub_cache
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import peft_ortho
from peft_ortho import AdapterFileError, InputStatistics, Moment, OrthoLoraConfig, load_statistics, testing
from peft_ortho.merging.load import load_adapter
from peft_ortho.merging.resolve import resolve
from peft_ortho.statistics import (
    STATISTICS_NAME,
    AdapterStatistics,
    calibrate,
    compare_statistics,
    save_statistics,
    sketch_moment,
)

# ------------------------------------------------------------------------------------------------ references


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Conv input patches ``(n, C·kh·kw)`` by explicit slicing of the zero-padded input (no ``F.unfold``)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    x = torch.nn.functional.pad(x.double(), (pw, pw, ph, ph))
    H, W = x.shape[2], x.shape[3]
    oh, ow = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(x.shape[0]):
        for i in range(oh):
            for j in range(ow):
                window = x[b, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                rows.append(window.reshape(-1))
    return torch.stack(rows)


def _reference(inputs: list[torch.Tensor], base: nn.Module) -> tuple[torch.Tensor, int]:
    """``(XᵀX / n, n)`` over captured inputs, computed as a sum of outer products of float64 rows."""
    rows = torch.cat(
        [_patches(x, base) if isinstance(base, nn.Conv2d) else x.double().reshape(-1, x.shape[-1]) for x in inputs]
    )
    return torch.einsum("ni,nj->ij", rows, rows) / rows.shape[0], rows.shape[0]


class _Capture:
    """Inputs of chosen modules, captured by separate forward hooks."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.inputs = {name: [] for name in modules}
        self.handles = [
            m.register_forward_hook(
                lambda mod, args, out, name=name: self.inputs[name].append(args[0].detach().clone())
            )
            for name, m in modules.items()
        ]

    def close(self):
        for h in self.handles:
            h.remove()


class ConvNet(nn.Module):
    """Linear + strided/padded/dilated k×k convs (the shapes a LoRA on a UNet's resnets meets)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 16)
        self.conv_a = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.conv_b = nn.Conv2d(5, 4, (3, 2), stride=(1, 2), padding=(2, 1))  # peft's LoRA conv has no dilation

    def forward(self, x, img):
        return self.lin(x), self.conv_b(self.conv_a(img))


def _base_modules(peft_model, names):
    root = peft_model.base_model.model
    return {n: root.get_submodule(n).get_base_layer() for n in names}


# ------------------------------------------------------------------------------------------------ recording


@pytest.mark.parametrize("config", ["lora", "ortho"])
def test_linear_and_conv_grams_equal_an_independent_float64_computation(config):
    torch.manual_seed(0)
    names = ["lin", "conv_a", "conv_b"]
    if config == "lora":
        cfg = LoraConfig(r=2, target_modules=names, init_lora_weights=False)
    else:
        cfg = OrthoLoraConfig(r=2, target_modules=names, slot=1)
    model = get_peft_model(ConvNet(), cfg)
    stats = InputStatistics(model, product_dtype=torch.float64)
    assert sorted(stats.layer_names) == sorted(names)
    capture = _Capture(_base_modules(model, names))
    g = torch.Generator().manual_seed(1)
    with stats.record("concept"):
        for _ in range(3):
            model(torch.randn(2, 7, 12, generator=g), torch.randn(2, 3, 9, 8, generator=g))
    capture.close()
    result = stats.statistics()
    for name in names:
        G, n = _reference(capture.inputs[name], _base_modules(model, [name])[name])
        m = result.moment(name, "concept")
        assert m.count == n and not m.is_sketch
        torch.testing.assert_close(m.gram, G, rtol=1e-12, atol=1e-14)
        assert torch.equal(m.gram, m.gram.T)
    # The conv statistic is in the order peft flattens a kernel: A G Aᵀ is the mean squared LoRA-A output.
    conv = model.base_model.model.conv_a
    A = conv.lora_A["default"].weight.double().reshape(2, -1)
    img = torch.randn(2, 3, 9, 8, generator=g)
    h = torch.nn.functional.conv2d(img.double(), conv.lora_A["default"].weight.double(), stride=2, padding=1)
    stats2 = InputStatistics(model, product_dtype=torch.float64)
    with stats2.record("prior"):
        model(torch.randn(1, 1, 12), img)
    m = stats2.statistics().moment("conv_a", "prior")
    torch.testing.assert_close(A @ m.gram @ A.T, torch.einsum("bchw,bdhw->cd", h, h) / m.count, rtol=1e-10, atol=1e-12)


def test_dilated_and_reflect_padded_conv_patches():
    from peft_ortho.statistics import _rows

    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 3))
    torch.testing.assert_close(_rows(conv, x), _patches(x, conv), rtol=0, atol=0)
    # Its output is exactly the patches times the flattened kernel (peft's flattening order).
    out = conv(x).double() - conv.bias.double()[:, None, None]
    flat = _rows(conv, x) @ conv.weight.double().reshape(4, -1).T
    torch.testing.assert_close(flat, out.permute(0, 2, 3, 1).reshape(-1, 4), rtol=1e-6, atol=1e-6)
    reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    out = reflect(x).double() - reflect.bias.double()[:, None, None]
    flat = _rows(reflect, x) @ reflect.weight.double().reshape(4, -1).T
    torch.testing.assert_close(flat, out.permute(0, 2, 3, 1).reshape(-1, 4), rtol=1e-6, atol=1e-6)


def test_conv1d_grams_and_kinds_stay_separate(tiny_gpt2):
    model = get_peft_model(tiny_gpt2, LoraConfig(r=2, target_modules=["c_attn", "c_proj"], init_lora_weights=False))
    stats = InputStatistics(model, product_dtype=torch.float64)
    layers = stats.layer_names
    assert "transformer.h.0.attn.c_attn" in layers and "transformer.h.1.mlp.c_proj" in layers
    capture = {}
    for kind, seed in (("concept", 0), ("prior", 1), ("unconditional", 2)):
        c = _Capture(_base_modules(model, layers))
        with stats.record(kind):
            model(input_ids=torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(seed)))
        c.close()
        capture[kind] = c.inputs
    model(input_ids=torch.randint(0, 100, (2, 9)))  # not recording: counted nowhere
    with torch.inference_mode():  # inference tensors (no version counter) are recorded too
        again = InputStatistics(model, product_dtype=torch.float64)
        with again.record("concept"):
            model(input_ids=torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0)))
        again.remove()
    for name in layers:
        assert torch.equal(
            again.statistics().moment(name, "concept").gram, stats.statistics().moment(name, "concept").gram
        )
    result = stats.statistics()
    assert result.kinds() == ["concept", "prior", "unconditional"]
    for kind, inputs in capture.items():
        for name in layers:
            G, n = _reference(inputs[name], None)
            m = result.moment(name, kind)
            assert m.count == n == 18
            torch.testing.assert_close(m.gram, G, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="unknown statistics kind 'style'"):
        with stats.record("style"):
            pass
    with pytest.raises(RuntimeError, match="do not nest"):
        with stats.record("concept"), stats.record("prior"):
            pass
    with pytest.raises(RuntimeError, match="no adapted layer saw an input"):
        with stats.record("concept"):
            pass


def test_hooks_cost_nothing_outside_record_and_remove_cleanly(tiny_gpt2):
    model = get_peft_model(tiny_gpt2, LoraConfig(r=2, target_modules=["c_attn"]))
    stats = InputStatistics(model)
    ids = torch.randint(0, 100, (1, 5))
    for _ in range(3):
        model(input_ids=ids)
    assert stats.state_dict() == {}  # nothing accumulated, nothing allocated
    stats.remove()
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="removed"):
        with stats.record("concept"):
            pass


def test_layer_names_match_the_weight_files_for_injected_and_diffusers_adapters(tmp_path):
    unet = testing.tiny_unet()
    unet.add_adapter(LoraConfig(r=2, target_modules=testing.UNET_TARGETS))  # diffusers' add_adapter
    names = set(InputStatistics(unet).layer_names)
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    keys = get_peft_model_state_dict(unet)
    assert names == {k.rsplit(".lora_A", 1)[0] for k in keys if ".lora_A." in k}
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=keys)
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        file_layers = {k.rsplit(".lora_A", 1)[0] for k in f.keys() if ".lora_A." in k}
    assert {f"unet.{n}" for n in names} == file_layers

    # Several components: names carry the component, as in a diffusers file.
    te = testing.tiny_text_encoder()
    te = inject_adapter_in_model(LoraConfig(r=2, target_modules=testing.TEXT_ENCODER_TARGETS), te)
    both = InputStatistics({"unet": unet, "text_encoder": te})
    assert {n for n in both.layer_names if n.startswith("unet.")} == {f"unet.{n}" for n in names}
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" in both.layer_names
    with pytest.raises(ValueError, match="pass adapter_name"):
        m = get_peft_model(testing.tiny_unet(), LoraConfig(r=2, target_modules=["to_q"]))
        m.add_adapter("other", LoraConfig(r=2, target_modules=["to_k"]))
        InputStatistics(m)
    assert set(InputStatistics(m, adapter_name="other").layer_names) == {
        n for n, _ in m.base_model.model.named_modules() if n.endswith("to_k")
    }


def test_shared_inputs_share_one_moment_and_match_per_layer_references():
    unet = get_peft_model(testing.tiny_unet(), LoraConfig(r=2, target_modules=testing.UNET_TARGETS))
    stats = InputStatistics(unet, product_dtype=torch.float64)
    names = stats.layer_names
    capture = _Capture(_base_modules(unet, names))
    with stats.record("concept"):
        unet(**testing.unet_inputs(unet))
    capture.close()
    result = stats.statistics()
    for name in names:
        G, n = _reference(capture.inputs[name], None)
        assert result.moment(name, "concept").count == n
        torch.testing.assert_close(result.moment(name, "concept").gram, G, rtol=1e-12, atol=1e-14)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    q, k, v = (result.moment(f"{block}.attn1.{p}", "concept") for p in ("to_q", "to_k", "to_v"))
    assert q is k is v  # self-attention: one input, one moment
    cross = {id(result.moment(n, "concept")) for n in names if "attn2.to_k" in n or "attn2.to_v" in n}
    assert len(cross) == 1  # every block's cross-attention reads the same prompt embedding
    blocks = {n.rsplit(".attn", 1)[0] for n in names}
    assert stats._products == 4 * len(blocks) + 1  # computed once per distinct input: 4 per block + the prompt

    # The default: float32 products of the float32 inputs (float64 sums), the same statistics to float32 rounding.
    for fast in (InputStatistics(unet), InputStatistics(unet, product_dtype=torch.float32)):
        with fast.record("concept"):
            unet(**testing.unet_inputs(unet))
        for name in names:
            m, ref = fast.statistics().moment(name, "concept"), result.moment(name, "concept")
            assert m.gram.dtype == torch.float64
            assert float((m.gram - ref.gram).norm() / ref.gram.norm()) < 1e-6


def test_default_float32_products_are_within_the_documented_bound():
    """Default products run in the inputs' float32 (float64 sums): elementwise within ``γ_n |X|ᵀ|X|`` of the exact
    float64 product (the bound for any summation order), relative Frobenius error ≤ 1e-6 per batch (measured ~1e-7);
    float64 inputs keep float64 products; a reduced float32 matmul precision setting is neither used nor changed."""
    u = 2.0**-24
    for rows, width in ((154, 768), (8192, 320)):  # one prompt pair's tokens; 2 × 64×64 latent tokens
        model = get_peft_model(nn.Sequential(nn.Linear(width, 8)), LoraConfig(r=2, target_modules=["0"]))
        g = torch.Generator().manual_seed(width)
        mix = torch.eye(width) + 0.1 * torch.randn(width, width, generator=g) / width**0.5
        X = ((torch.randn(rows, width, generator=g) * (1 + torch.rand(width, generator=g)) + 0.5) @ mix).float()
        stats = InputStatistics(model)
        with torch.no_grad(), stats.record("concept"):
            model(X)
        got = stats.state_dict()["local/concept/0/sum"]  # Σ XᵀX itself (wide layers are stored sketched)
        X64 = X.double()
        exact, bound = X64.T @ X64, (rows * u / (1 - rows * u)) * (X64.abs().T @ X64.abs())
        assert bool(((got - exact).abs() <= bound + 1e-300).all())
        assert float((got - exact).norm() / exact.norm()) <= 1e-6
        # float64 inputs: float64 products, as before
        model64 = copy.deepcopy(model).double()
        stats64 = InputStatistics(model64)
        with torch.no_grad(), stats64.record("concept"):
            model64(X64)
        torch.testing.assert_close(stats64.state_dict()["local/concept/0/sum"], exact, rtol=1e-12, atol=0)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        reduced = InputStatistics(model)
        with torch.no_grad(), reduced.record("concept"):
            model(X)
        assert torch.get_float32_matmul_precision() == "medium"  # restored after the product
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(reduced.state_dict()["local/concept/0/sum"], got)


def test_state_dict_resumes_bit_identically_and_load_checks_before_changing_anything(tiny_gpt2, tmp_path):
    """``state_dict`` → a safetensors file → ``load_state_dict`` into a fresh recorder, then more recording: bit for
    bit what one uninterrupted recorder holds (local and already-reduced parts both); bad states are refused."""
    from safetensors.torch import load_file

    model = get_peft_model(tiny_gpt2, LoraConfig(r=2, target_modules=["c_attn", "c_proj"]))
    batches = [torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(s)) for s in range(5)]

    def feed(stats, which):
        for i in which:
            with stats.record("prior" if i == 2 else "concept"):
                model(input_ids=batches[i])
            if i == 1:
                stats.all_reduce()  # single process: moves what was recorded to the reduced part

    whole = InputStatistics(model)
    feed(whole, range(5))
    whole.remove()
    first = InputStatistics(model)
    feed(first, range(3))
    state = first.state_dict()
    first.remove()
    parts = {key.split("/")[0] for key in state}
    assert parts == {"local", "reduced"}
    key = next(k for k in state if k.endswith("/sum"))
    assert state[key].dtype == torch.float64 and state[key.replace("/sum", "/count")].dtype == torch.int64
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "state.safetensors"))
    loaded = load_file(str(tmp_path / "state.safetensors"))
    resumed = InputStatistics(model)
    resumed.load_state_dict(loaded)
    for v in loaded.values():
        v.zero_()  # the recorder copied: the caller's tensors are not aliased
    feed(resumed, range(3, 5))
    assert _bit_identical(resumed.statistics(), whole.statistics())
    assert resumed.state_dict().keys() == whole.state_dict().keys()

    before = resumed.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    good = dict(state)
    layer = key.split("/")[2]
    bad_cases = {
        "unknown layer": {**good, key.replace(layer, "transformer.h.9.attn.c_attn"): state[key]},
        "no count": {k: v for k, v in good.items() if k != key.replace("/sum", "/count")},
        "shape": {**good, key: state[key][:-1]},
        "dtype": {**good, key: state[key].float()},
        "negative count": {**good, key.replace("/sum", "/count"): torch.tensor(-1)},
        "non-finite": {**good, key: torch.full_like(state[key], float("nan"))},
        "unknown part": {**good, "elsewhere/" + key.split("/", 1)[1]: state[key]},
    }
    for case, bad in bad_cases.items():
        with pytest.raises(ValueError, match="statistics state"):
            resumed.load_state_dict(bad)
        after = resumed.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), case


def test_layers_the_tuners_do_not_support_are_refused_by_their_check():
    """One check for the tuners and the statistics (``tuners/_layers.py``): an Embedding LoRA is refused by name."""
    from peft_ortho import UnsupportedLayerError

    model = get_peft_model(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(UnsupportedLayerError, match="Embedding is not supported by input statistics") as info:
        InputStatistics(model)
    assert info.value.layer == "0"


# ------------------------------------------------------------------------------------------------ DDP, checkpointing, compile


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputations_are_not_counted(tiny_gpt2, reentrant):
    def run(checkpointing):
        base = copy.deepcopy(tiny_gpt2)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        base.train()
        base.config.attn_pdrop = base.config.resid_pdrop = base.config.embd_pdrop = 0.0
        for m in base.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn", "c_fc"], lora_dropout=0.0))
        if checkpointing and reentrant:
            model.enable_input_require_grads()
        stats = InputStatistics(model)
        calls = []
        probe = model.base_model.model.transformer.h[0].attn.c_attn.register_forward_pre_hook(
            lambda *a: calls.append(1)
        )
        for seed in range(2):
            ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))
            with stats.record("concept"):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()  # recomputation happens here, inside the record block
        probe.remove()
        return stats.statistics(), len(calls)

    plain, plain_calls = run(False)
    ckpt, ckpt_calls = run(True)
    assert ckpt_calls > plain_calls  # the layer really ran again during backward
    for name, by_kind in plain.layers.items():
        assert ckpt.moment(name, "concept").count == by_kind["concept"].count
        torch.testing.assert_close(ckpt.moment(name, "concept").gram, by_kind["concept"].gram, rtol=1e-12, atol=0)


def test_torch_compile_records_the_same_statistics(tiny_gpt2):
    import torch._dynamo

    torch._dynamo.reset()
    fresh = copy.deepcopy(tiny_gpt2)
    model = get_peft_model(tiny_gpt2, LoraConfig(r=2, target_modules=["c_attn"]))
    eager = InputStatistics(model)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with eager.record("concept"):
        model(input_ids=ids)
    expected = eager.statistics()
    eager.remove()

    stats = InputStatistics(model)  # created before compiling, as documented
    compiled = torch.compile(model, backend="aot_eager")
    compiled(input_ids=ids)  # compiled while not recording
    assert stats.state_dict() == {}
    with stats.record("concept"):
        compiled(input_ids=ids)
    compiled(input_ids=ids)  # and back: not counted
    got = stats.statistics()
    for name, by_kind in expected.layers.items():
        assert got.moment(name, "concept").count == by_kind["concept"].count
        torch.testing.assert_close(got.moment(name, "concept").gram, by_kind["concept"].gram, rtol=1e-12, atol=0)
    stats.remove()

    # Statistics created after compiling would never see an input: refused, not silently empty.
    torch._dynamo.reset()
    late_model = get_peft_model(fresh, LoraConfig(r=2, target_modules=["c_attn"]))
    late_compiled = torch.compile(late_model, backend="aot_eager")
    late_compiled(input_ids=ids)
    late = InputStatistics(late_compiled)
    with pytest.raises(RuntimeError, match="before compiling"):
        with late.record("concept"):
            late_compiled(input_ids=ids)
    torch._dynamo.reset()


_DDP_SCRIPT = textwrap.dedent(
    """
    import datetime, sys, torch, torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel
    import peft_ortho
    from peft_ortho import InputStatistics

    rank, world, rendezvous, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    model = DistributedDataParallel(get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"])))
    stats = InputStatistics(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 6, generator=g) for _ in range(4)]
    for step, x in enumerate(batches):
        if step % world != rank:
            continue  # the data each rank sees: a DistributedSampler's split
        with stats.record("concept" if step < 2 else "prior"):
            model(x).sum().backward()
    if world > 1:
        try:
            stats.save_pretrained(out + "-unsynced")
            raise SystemExit("saved without all_reduce")
        except RuntimeError:
            pass
    stats.all_reduce()
    stats.save_pretrained(out)
    del model
    dist.destroy_process_group()
    """
)


def _bit_identical(a: AdapterStatistics, b: AdapterStatistics) -> bool:
    def same(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return a.layers.keys() == b.layers.keys() and all(
        a.layers[k].keys() == b.layers[k].keys()
        and all(
            x.count == y.count
            and x.residual == y.residual
            and all(same(getattr(x, t), getattr(y, t)) for t in ("gram", "basis", "values"))
            for x, y in ((a.layers[k][kind], b.layers[k][kind]) for kind in a.layers[k])
        )
        for k in a.layers
    )


def _run_ranks(tmp_path, world: int, tag: str) -> list[str]:
    script = tmp_path / "ddp_stats.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    rendezvous = tmp_path / f"rendezvous-{tag}"
    outs = [str(tmp_path / f"{tag}-rank{r}") for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(world), str(rendezvous), outs[r]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, out.decode()[-3000:]
    finally:
        for p in procs:  # never leave a rank waiting on a collective
            if p.poll() is None:
                p.kill()
    return [os.path.join(o, STATISTICS_NAME) for o in outs]


def test_two_ddp_ranks_sum_to_the_single_process_statistics(tmp_path):
    two = _run_ranks(tmp_path, 2, "two")
    (one,) = _run_ranks(tmp_path, 1, "one")
    ranks = [load_statistics(p, adapter="two") for p in two]
    assert _bit_identical(ranks[0], ranks[1])  # both ranks hold bit-identical sums
    a, b = ranks[0], load_statistics(one, adapter="one")
    assert sorted(a.layers) == sorted(b.layers) == ["0", "2"]
    for layer in ("0", "2"):
        for kind in ("concept", "prior"):
            assert a.moment(layer, kind).count == b.moment(layer, kind).count == 6
            # The sums are added in another order (rank-wise, then across ranks): equal to float64 rounding.
            torch.testing.assert_close(a.moment(layer, kind).gram, b.moment(layer, kind).gram, rtol=1e-14, atol=1e-15)


# ------------------------------------------------------------------------------------------------ sketch + file


def _psd(n: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    G = (Q * spectrum) @ Q.T
    return (G + G.T) / 2


def test_sketch_error_is_bounded_by_the_largest_dropped_eigenvalue_and_keeps_the_trace():
    n = 200
    spectrum = torch.logspace(2, -3, n, dtype=torch.float64)
    G = _psd(n, spectrum)
    for k in (1, 8, 16, 64):
        m = sketch_moment(G, 100, exact_max=0, rank=k, lossless_rank=0)
        assert m.is_sketch and m.basis.shape == (n, k)
        err = torch.linalg.matrix_norm(G - m.dense(), ord=2)
        bound = spectrum[k]  # λ_{k+1}, descending order
        assert err <= bound + 1e-6 * spectrum[0], (k, float(err), float(bound))
        assert math.isclose(m.trace(), float(G.trace()), rel_tol=1e-12)
        assert math.isclose(float(m.dense().trace()), float(G.trace()), rel_tol=1e-6)
        M = torch.randn(3, n, dtype=torch.float64)
        torch.testing.assert_close(m.right_multiply(M), M @ m.dense(), rtol=1e-10, atol=1e-10)
    # Exactly low-rank inputs (a prompt's 77 tokens): kept losslessly, residual 0.
    X = torch.randn(77, n, dtype=torch.float64)
    low = X.T @ X / 77
    m = sketch_moment(low, 77, exact_max=0, rank=16, lossless_rank=128)
    assert m.basis.shape == (n, 77) and m.residual == 0.0
    torch.testing.assert_close(m.dense(), low, rtol=0, atol=1e-6 * float(low.diagonal().max()))


def test_round_trip_is_bit_identical_and_shared_moments_are_stored_once(tmp_path):
    G = _psd(40, torch.linspace(1, 0, 40, dtype=torch.float64) ** 3)
    exact = Moment(count=7, gram=G)
    sketch = sketch_moment(_psd(300, torch.logspace(1, -2, 300, dtype=torch.float64), 1), 12345)
    stats = AdapterStatistics(
        {"a.to_q": {"concept": sketch, "prior": exact}, "a.to_k": {"concept": sketch}, "b": {"unconditional": exact}},
        adapter="rex",
    )
    path = stats.save_pretrained(tmp_path)
    loaded = load_statistics(tmp_path, adapter="rex")
    assert loaded.adapter == "rex" and loaded.layers.keys() == stats.layers.keys()
    for layer, by_kind in stats.layers.items():
        assert loaded.layers[layer].keys() == by_kind.keys()
        for kind, m in by_kind.items():
            got = loaded.moment(layer, kind)
            assert got.count == m.count and got.residual == m.residual and got.is_sketch == m.is_sketch
            for attr in ("gram", "basis", "values"):
                a, b = getattr(m, attr), getattr(got, attr)
                assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
    assert loaded.moment("a.to_q", "concept") is loaded.moment("a.to_k", "concept")
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == ["0.basis", "0.values", "1.gram"]
    # Saving what was loaded writes the same tensors and metadata (safetensors orders its header by hash: compare
    # contents, not bytes).
    again = save_statistics(loaded, tmp_path / "again.safetensors")
    with safe_open(path, "pt") as f, safe_open(again, "pt") as g:
        assert f.metadata() == g.metadata() and sorted(f.keys()) == sorted(g.keys())
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    with pytest.raises(FileExistsError):
        stats.save_pretrained(tmp_path)


def _sd15_attention_shapes() -> dict[str, tuple[int, int]]:
    """``{layer: (in, out)}`` of SD1.5's 128 attention projections (its 16 transformer blocks)."""
    blocks = []
    for i, width in enumerate((320, 640, 1280)):
        blocks += [(f"down_blocks.{i}.attentions.{j}.transformer_blocks.0", width) for j in range(2)]
    blocks.append(("mid_block.attentions.0.transformer_blocks.0", 1280))
    for i, width in enumerate((1280, 640, 320), start=1):
        blocks += [(f"up_blocks.{i}.attentions.{j}.transformer_blocks.0", width) for j in range(3)]
    shapes = {}
    for block, d in blocks:
        for attn in ("attn1", "attn2"):
            kv_in = 768 if attn == "attn2" else d
            shapes.update(
                {
                    f"{block}.{attn}.to_q": (d, d),
                    f"{block}.{attn}.to_k": (kv_in, d),
                    f"{block}.{attn}.to_v": (kv_in, d),
                    f"{block}.{attn}.to_out.0": (d, d),
                }
            )
    return shapes


def test_sd15_attention_statistics_file_is_smaller_than_the_rank16_adapter(tmp_path):
    """All three kinds, SD1.5's real attention shapes: image-side inputs full rank (sketched at rank 16), text-side
    inputs exactly low rank (77 tokens of one prompt), shared where the model feeds layers the same tensor."""
    shapes = _sd15_attention_shapes()
    assert len(shapes) == 128
    adapter = {}
    for layer, (n_in, n_out) in shapes.items():
        adapter[f"base_model.model.{layer}.lora_A.weight"] = torch.zeros(16, n_in)
        adapter[f"base_model.model.{layer}.lora_B.weight"] = torch.zeros(n_out, 16)
    save_file(adapter, str(tmp_path / "adapter_model.safetensors"))
    adapter_bytes = os.path.getsize(tmp_path / "adapter_model.safetensors")

    g = torch.Generator().manual_seed(0)

    def moment(n, k):
        """What ``sketch_moment`` stores for an input of rank ≥ ``k`` (rank-16 sketch) or exactly ``k`` (lossless)."""
        U, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        values = torch.rand(k, generator=g, dtype=torch.float64).sort(descending=True).values
        return Moment(count=4096, basis=U.float().double(), values=values, residual=0.0 if k == 77 else 1e-3)

    layers = {}
    for kind in ("concept", "prior", "unconditional"):
        text = moment(768, 77)  # the prompt embedding every cross-attention k/v reads
        for block in {layer.rsplit(".attn", 1)[0] for layer in shapes}:
            d = shapes[f"{block}.attn1.to_q"][0]
            attn1, attn1_out, attn2_q, attn2_out = (moment(d, 16) for _ in range(4))  # full rank: sketched
            for name, m in {
                "attn1.to_q": attn1,
                "attn1.to_k": attn1,
                "attn1.to_v": attn1,
                "attn1.to_out.0": attn1_out,
                "attn2.to_q": attn2_q,
                "attn2.to_k": text,
                "attn2.to_v": text,
                "attn2.to_out.0": attn2_out,
            }.items():
                layers.setdefault(f"{block}.{name}", {})[kind] = m
    assert all(m.is_sketch for by in layers.values() for m in by.values())
    assert layers["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]["concept"].basis.shape == (768, 77)
    path = AdapterStatistics(layers).save_pretrained(tmp_path / "stats")
    stats_bytes = os.path.getsize(path)
    assert stats_bytes <= adapter_bytes, (stats_bytes, adapter_bytes)
    assert 10_200_000 < stats_bytes < 10_500_000  # ≈ 10.3 MB, as docs/statistics.md computes
    assert load_statistics(path, adapter="sd15").moment(
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k", "prior"
    )
    assert adapter_bytes > 12_000_000  # 3,188,736 float32 values: the arithmetic in docs/statistics.md


def _bad_file(tmp_path, mutate) -> str:
    """A valid two-layer statistics file, then ``mutate(tensors, metadata)`` and written raw."""
    G = _psd(6, torch.linspace(2, 0.1, 6, dtype=torch.float64))
    sk = sketch_moment(_psd(200, torch.logspace(1, -2, 200, dtype=torch.float64)), 50)
    stats = AdapterStatistics({"lin": {"concept": Moment(5, gram=G)}, "proj": {"prior": sk}})
    path = save_statistics(stats, tmp_path / "ok.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    mutate(tensors, metadata)
    out = str(tmp_path / "bad" / STATISTICS_NAME)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out, metadata=metadata)
    return out


def _meta(key, fn):
    def mutate(tensors, metadata):
        value = json.loads(metadata[key])
        fn(value)
        metadata[key] = json.dumps(value)

    return mutate


BAD_FILES = {
    "asymmetric gram": (
        lambda t, m: t["0.gram"].__setitem__((0, 1), t["0.gram"][0, 1] + 1e-9),
        "lin",
        "not symmetric",
    ),
    "nan gram": (lambda t, m: t["0.gram"].__setitem__((2, 2), float("nan")), "lin", "non-finite"),
    "inf values": (lambda t, m: t["1.values"].__setitem__(0, float("inf")), "proj", "non-finite"),
    "negative diagonal": (
        lambda t, m: t["0.gram"].__setitem__((1, 1), -1.0),
        "lin",
        "negative diagonal",
    ),
    "negative eigenvalue": (lambda t, m: t["1.values"].__setitem__(0, -1.0), "proj", "negative eigenvalues"),
    "gram shape": (lambda t, m: t.__setitem__("0.gram", torch.zeros(6, 5, dtype=torch.float64)), "lin", "shape"),
    "gram dtype": (lambda t, m: t.__setitem__("0.gram", t["0.gram"].float()), "lin", "dtype F32"),
    "basis not orthonormal": (lambda t, m: t["1.basis"].mul_(1.01), "proj", "not orthonormal"),
    "basis wider than layer": (
        lambda t, m: t.__setitem__("1.basis", torch.zeros(200, 201)),
        "proj",
        "shape",
    ),
    "values length": (lambda t, m: t.__setitem__("1.values", t["1.values"][:-1].clone()), "proj", "shape"),
    "zero count": (_meta("moments", lambda v: v[0].__setitem__("count", 0)), "lin", "positive integer"),
    "float count": (_meta("moments", lambda v: v[0].__setitem__("count", 5.0)), "lin", "positive integer"),
    "bool count": (_meta("moments", lambda v: v[0].__setitem__("count", True)), "lin", "positive integer"),
    "string width": (_meta("moments", lambda v: v[1].__setitem__("in_features", "200")), "proj", "in_features"),
    "negative residual": (_meta("moments", lambda v: v[1].__setitem__("residual", -0.5)), "proj", "residual"),
    "sketch flag": (_meta("moments", lambda v: v[0].__setitem__("sketch", "no")), "lin", "sketch must be"),
    "extra field": (_meta("moments", lambda v: v[0].__setitem__("code", "x")), "lin", "exactly"),
    "unknown kind": (
        _meta("layers", lambda v: v["lin"].__setitem__("style", v["lin"].pop("concept"))),
        "lin",
        "unknown kind",
    ),
    "index out of range": (_meta("layers", lambda v: v["proj"].__setitem__("prior", 7)), "proj", "not one of"),
    "string index": (_meta("layers", lambda v: v["proj"].__setitem__("prior", "1")), "proj", "not one of"),
    "layer name": (_meta("layers", lambda v: v.__setitem__("../../x", v.pop("lin"))), None, "bad layer name"),
    "orphan moment": (_meta("layers", lambda v: v.pop("lin")), None, "belongs to no layer"),
    "extra tensor": (lambda t, m: t.__setitem__("9.gram", torch.eye(2, dtype=torch.float64)), None, "unexpected"),
    "missing tensor": (lambda t, m: t.pop("1.values"), None, "missing"),
    "wrong format": (lambda t, m: m.__setitem__("format", "something-else"), None, "expected"),
    "future version": (lambda t, m: m.__setitem__("format_version", "2"), None, "not supported"),
    "moments not json": (lambda t, m: m.__setitem__("moments", "[{"), None, "not valid JSON"),
    "layers not a dict": (lambda t, m: m.__setitem__("layers", "[]"), None, "JSON dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_every_kind_of_bad_statistics_file_is_refused_naming_adapter_and_layer(tmp_path, case):
    mutate, layer, message = BAD_FILES[case]
    path = _bad_file(tmp_path, mutate)
    with pytest.raises(AdapterFileError, match=message) as info:
        load_statistics(path, adapter="alice/rex")
    assert info.value.adapter == "alice/rex" and "'alice/rex'" in str(info.value)
    if layer is not None:
        assert info.value.layer == layer and f"'{layer}'" in str(info.value)


def test_truncated_missing_and_pickled_statistics_files_are_refused(tmp_path):
    path = _bad_file(tmp_path, lambda t, m: None)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        load_statistics(path, adapter="rex")
    with pytest.raises(AdapterFileError, match="no such file"):
        load_statistics(tmp_path / "nowhere", adapter="rex")
    with pytest.raises(AdapterFileError, match="pickled"):
        load_statistics(tmp_path / "stats.bin", adapter="rex")


# ------------------------------------------------------------------------------------------------ travel with the adapter


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _recorded_unet_adapter():
    model = get_peft_model(
        testing.tiny_unet(),
        LoraConfig(r=2, lora_alpha=2, target_modules=testing.UNET_TARGETS, init_lora_weights=False),
    )
    stats = InputStatistics(model)
    with stats.record("concept"):
        model(**testing.unet_inputs(model, seed=0))
    with stats.record("prior"):
        model(**testing.unet_inputs(model, seed=1))
    return model, stats


def _lora_layers(peft_model) -> dict:
    from peft import get_peft_model_state_dict

    return {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(peft_model).items()}


def _equal_statistics(a: AdapterStatistics, b: AdapterStatistics) -> bool:
    return a.layers.keys() == b.layers.keys() and all(
        a.layers[k].keys() == b.layers[k].keys()
        and all(
            x.count == y.count and torch.equal(x.dense(), y.dense())
            for x, y in ((a.layers[k][kind], b.layers[k][kind]) for kind in a.layers[k])
        )
        for k in a.layers
    )


def test_statistics_travel_through_save_push_card_hub_cache_and_compose(tmp_path, offline):
    from huggingface_hub import ModelCard
    from test_hub import RecordingApi

    model, stats = _recorded_unet_adapter()
    expected = stats.statistics()
    out = peft_ortho.hub.save_pretrained(model, tmp_path / "rex", statistics=stats, include_diffusers=True)
    assert STATISTICS_NAME in os.listdir(out)
    card = ModelCard.load(os.path.join(out, "README.md")).text
    assert "## Input statistics" in card and f"`{STATISTICS_NAME}`" in card
    n_layers = len(expected.layers)
    count = expected.counts("concept")[0]
    assert (
        f"| `concept` | {n_layers} | {min(expected.counts('concept')):,} – {max(expected.counts('concept')):,} |"
        in card
    )
    assert "| `prior` |" in card and "| `unconditional` |" not in card and count > 0

    # Push from the saved folder: the statistics go along (validated), and the card lists them.
    api = RecordingApi()
    peft_ortho.push_to_hub(out, "alice/rex", api=api)
    assert STATISTICS_NAME in api.uploaded
    assert api.uploaded[STATISTICS_NAME] == open(os.path.join(out, STATISTICS_NAME), "rb").read()
    assert "## Input statistics" in ModelCard(api.uploaded["README.md"].decode()).text

    # Pull by name from a real cache, offline: compose's resolution fetches the file and the loader reads it.
    cache = str(tmp_path / "cache")
    populate_hub_cache(cache, "alice/rex", api.uploaded, revision="v1")
    source = resolve("alice/rex@v1", cache_dir=cache)
    assert os.path.isfile(os.path.join(source.path, STATISTICS_NAME))
    adapter = load_adapter(source)
    assert adapter.statistics is not None and adapter.statistics.adapter == "alice/rex@v1"
    assert _equal_statistics(adapter.statistics, expected)
    merged = peft_ortho.compose(["alice/rex@v1"], cache_dir=cache, progress=False)
    assert merged.adapters[0].statistics is not None

    # A diffusers-only repo (one LoRA file + statistics): the statistics file is not taken for a second LoRA.
    diffusers_only = {k: v for k, v in api.uploaded.items() if k in ("pytorch_lora_weights.safetensors",)}
    prefixed = expected.with_prefix("unet")
    save_statistics(prefixed, tmp_path / "pref.safetensors")
    diffusers_only[STATISTICS_NAME] = open(tmp_path / "pref.safetensors", "rb").read()
    populate_hub_cache(cache, "alice/rex-diffusers", diffusers_only)
    source = resolve("alice/rex-diffusers", cache_dir=cache)
    assert source.path.endswith("pytorch_lora_weights.safetensors")
    assert _equal_statistics(load_adapter(source).statistics, prefixed)

    # A saved folder without statistics passed none: nothing invented.
    plain = peft_ortho.hub.save_pretrained(model, tmp_path / "plain")
    assert (
        STATISTICS_NAME not in os.listdir(plain)
        and "Input statistics" not in open(os.path.join(plain, "README.md")).read()
    )
    assert load_adapter(resolve(plain)).statistics is None


def test_statistics_that_do_not_belong_to_the_adapter_are_refused(tmp_path):
    model, stats = _recorded_unet_adapter()
    wrong = AdapterStatistics({"not.a.layer": {"concept": Moment(3, gram=torch.eye(32, dtype=torch.float64))}})
    with pytest.raises(AdapterFileError, match="layer the adapter does not have") as info:
        peft_ortho.hub.save_pretrained(model, tmp_path / "x", statistics=wrong)
    assert info.value.layer == "not.a.layer" and not (tmp_path / "x").exists()

    folder = peft_ortho.hub.save_pretrained(model, tmp_path / "rex", statistics=stats)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    narrow = AdapterStatistics({layer: {"concept": Moment(3, gram=torch.eye(8, dtype=torch.float64))}})
    save_statistics(narrow, os.path.join(folder, STATISTICS_NAME), overwrite=True)
    with pytest.raises(AdapterFileError, match="8 wide but the layer has 32") as info:
        load_adapter(resolve(folder))
    assert info.value.layer == layer and info.value.adapter == folder

    # Single files: the documented sibling name; a statistics file is never taken for a LoRA.
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lone"), unet_lora_layers=_lora_layers(model), weight_name="rex.safetensors"
    )
    save_statistics(stats.statistics().with_prefix("unet"), tmp_path / "lone" / "rex.statistics.safetensors")
    adapter = load_adapter(resolve(str(tmp_path / "lone" / "rex.safetensors")))
    assert _equal_statistics(adapter.statistics, stats.statistics().with_prefix("unet"))
    with pytest.raises(AdapterFileError, match="is a statistics file"):
        resolve(str(tmp_path / "lone" / "rex.statistics.safetensors"))
    # A PEFT folder merged with a diffusers file: its statistics are re-keyed with the component too.
    save_statistics(stats.statistics(), os.path.join(str(tmp_path / "rex"), STATISTICS_NAME), overwrite=True)
    peft_folder = load_adapter(resolve(str(tmp_path / "rex")))
    peft_folder.assign_component("unet")
    assert set(peft_folder.statistics.layers) == {f"unet.{n}" for n in stats.statistics().layers}


# ------------------------------------------------------------------------------------------------ calibration


def _digest(modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode() + v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _pipe_state(pipe):
    mods = [pipe.unet, pipe.text_encoder, pipe.vae]
    return (
        _digest(mods),
        [m.training for p in mods for m in p.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for p in mods for m in p.modules()],
        json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str),
        getattr(pipe.scheduler, "num_inference_steps", None),
    )


def test_calibration_leaves_the_pipeline_bit_unchanged_and_matches_recorded_statistics(tmp_path):
    from diffusers import StableDiffusionPipeline

    unet, te = sd_lora_pair(unet_alpha=4, te_alpha=2)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lora"),
        unet_lora_layers=_lora_layers(unet),
        text_encoder_lora_layers=_lora_layers(te),
    )
    adapter = load_adapter(resolve(str(tmp_path / "lora")))
    pipe = testing.tiny_sd_pipeline()
    pipe.unet.train()  # a flag calibration must restore
    before = _pipe_state(pipe)
    cal = calibrate(adapter, pipe, "a photo of sks dog", steps=3, num_images=2, prior_prompt="a photo of a dog")
    assert _pipe_state(pipe) == before
    assert not any(type(m).__module__.startswith("peft") for m in pipe.unet.modules())
    assert cal.kinds() == ["concept", "prior", "unconditional"]
    assert {k for k in cal.layers} == {f"{c}.{n}" for c, n in adapter.layers()}

    # The same procedure with the adapter loaded the ordinary way (peft) and recorded by InputStatistics.
    ref_pipe = testing.tiny_sd_pipeline()
    ref_pipe.load_lora_weights(str(tmp_path / "lora"))
    rec = InputStatistics({"unet": ref_pipe.unet, "text_encoder": ref_pipe.text_encoder})
    tok, g = ref_pipe.tokenizer, torch.Generator().manual_seed(0)

    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return ref_pipe.text_encoder(ids.input_ids)[0]

    with torch.no_grad():
        with rec.record("concept"):
            cond = encode(["a photo of sks dog"] * 2)
        with rec.record("unconditional"):
            uncond = encode([""] * 2)
        sched = copy.deepcopy(ref_pipe.scheduler)
        sched.set_timesteps(3)
        latents = torch.randn(2, 4, 8, 8, generator=g) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            with rec.record("concept"):
                ec = ref_pipe.unet(x, t, encoder_hidden_states=cond).sample
            with rec.record("unconditional"):
                eu = ref_pipe.unet(x, t, encoder_hidden_states=uncond).sample
            latents = sched.step(eu + 7.5 * (ec - eu), t, latents).prev_sample
    recorded = rec.statistics()
    for kind in ("concept", "unconditional"):
        fit = compare_statistics(cal, recorded, adapter, kind=kind)
        assert len(fit) == len(adapter.layers())
        assert max(f["relative_error"] for f in fit.values()) < 1e-5, kind
        assert min(f["overlap"] for f in fit.values()) > 0.999, kind
    # A different prompt gives measurably different statistics: the comparison is not vacuous.
    other = calibrate(adapter, pipe, "zzz qqq", steps=3, num_images=2)
    fit = compare_statistics(other, recorded, adapter)
    assert max(f["relative_error"] for f in fit.values()) > 1e-2

    # A pipeline with an adapter loaded is refused (its statistics would not be the base's).
    with pytest.raises(peft_ortho.PeftOrthoError, match="has adapters loaded"):
        calibrate(adapter, ref_pipe, "a photo of sks dog")


def test_calibration_on_a_causal_lm(tiny_gpt2, tmp_path):
    model = get_peft_model(
        copy.deepcopy(tiny_gpt2), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    )
    model.save_pretrained(str(tmp_path / "skill"))
    adapter = load_adapter(resolve(str(tmp_path / "skill")))
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    before = _digest([tiny_gpt2])
    cal = calibrate(adapter, tiny_gpt2, ids, prior_prompt=ids.flip(1))
    assert _digest([tiny_gpt2]) == before and not any(m._forward_hooks for m in tiny_gpt2.modules())
    stats = InputStatistics(model)
    with torch.no_grad(), stats.record("concept"):
        model(input_ids=ids)
    fit = compare_statistics(cal, stats.statistics(), adapter)
    assert set(fit) == {n for _, n in adapter.layers()}
    assert max(f["relative_error"] for f in fit.values()) < 1e-6
    assert cal.moment("transformer.h.1.attn.c_attn", "prior").count == 30


def test_calibrating_a_peft_folder_on_a_pipeline_finds_its_component_and_refuses_foreign_layers(tmp_path):
    unet = get_peft_model(testing.tiny_unet(), LoraConfig(r=2, target_modules=["to_k"], init_lora_weights=False))
    unet.save_pretrained(str(tmp_path / "rex"))
    adapter = load_adapter(resolve(str(tmp_path / "rex")))
    pipe = testing.tiny_sd_pipeline()
    cal = calibrate(adapter, pipe, "a photo of sks dog", steps=1, num_images=1)
    assert set(cal.layers) == {n for _, n in adapter.layers()}  # keyed like the folder's own weight file
    assert cal.kinds() == ["concept", "unconditional"]
    # The same adapter against a model that lacks its layers: refused by name, nothing run.
    with pytest.raises(peft_ortho.PeftOrthoError, match="no component of the pipeline has all") as info:
        calibrate(adapter, _Pipe(nn.Sequential(nn.Linear(2, 2))), "x")
    assert info.value.adapter == str(tmp_path / "rex")


class _Pipe:
    """The shape of a diffusers pipeline (``components``) around modules that are not a UNet."""

    def __init__(self, module):
        self.components = {"unet": module}
