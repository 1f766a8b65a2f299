"""Shared fixtures: tiny models built from configs, no network."""

import copy
import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

import peft_ortho  # noqa: E402,F401  (registers the tuners)
from peft_ortho import testing  # noqa: E402

# Tiny models: one thread per xdist worker beats two workers fighting over two cores with two threads each.
torch.set_num_threads(1)


class MLP(nn.Module):
    """Linear + k×k Conv2d + 1×1 Conv2d model with a plain ``forward``; ``in`` widths 32, 16·9, 8."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(32, 64)
        self.lin1 = nn.Linear(64, 32)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.conv1x1 = nn.Conv2d(8, 8, 1)

    def forward(self, x, img=None):
        y = self.lin1(torch.relu(self.lin0(x)))
        if img is None:
            return y
        return y, self.conv1x1(self.conv(img))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def tiny_unet():
    return testing.tiny_unet()


@pytest.fixture
def tiny_pipe():
    return testing.tiny_sd_pipeline()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)).eval()


FAMILY_BUILDERS = {
    "sd": ("unet", testing.tiny_unet),
    "sdxl": ("unet", testing.tiny_sdxl_unet),
    "flux": ("transformer", testing.tiny_flux_transformer),
    "sd3": ("transformer", testing.tiny_sd3_transformer),
}


@pytest.fixture(params=sorted(FAMILY_BUILDERS))
def family(request):
    """``(family, component, builder)`` for each diffusion family: SD1.5, SDXL, Flux, SD3 (tiny configs)."""
    component, builder = FAMILY_BUILDERS[request.param]
    return request.param, component, builder


# ------------------------------------------------------------------------------------- helpers shared by tests
# (imported as ``from conftest import ...``; pytest puts tests/ on sys.path)


@pytest.fixture(scope="module")
def unet0():
    """The tiny SD UNet (seed 0), built once per test module; tests ``build`` adapters on copies of it."""
    return testing.tiny_unet()


def build(base, config, path, seed: int = 0) -> str:
    """``get_peft_model`` on a copy of ``base`` (random ``lora_B`` from ``seed``), saved to ``path``."""
    torch.manual_seed(seed)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(str(path))
    return str(path)


def edit_config(folder, **changes) -> None:
    """Overwrite fields of the ``adapter_config.json`` in ``folder`` (a broken or foreign config, by hand)."""
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def sd_lora_pair(unet_alpha: float, te_alpha: float):
    """``(unet, text_encoder)`` peft models of the tiny SD1.5 pipeline, rank-2 LoRAs with random (non-zero) factors."""
    unet = get_peft_model(
        testing.tiny_unet(),
        LoraConfig(r=2, lora_alpha=unet_alpha, target_modules=testing.UNET_TARGETS, init_lora_weights=False),
    )
    te = get_peft_model(
        testing.tiny_text_encoder(),
        LoraConfig(r=2, lora_alpha=te_alpha, target_modules=testing.TEXT_ENCODER_TARGETS, init_lora_weights=False),
    )
    return unet, te


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(folder: str, name: str):
    """``examples/<name>.py`` (``folder``: ``"examples"``) imported as a module by its path, to call its ``main``."""
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", os.path.join(ROOT, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
