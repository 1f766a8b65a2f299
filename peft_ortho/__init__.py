"""peft-ortho: adapters that merge without crosstalk, as peft tuners.

``import peft_ortho`` registers its tuners with peft, after which ``get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and transformers' ``load_adapter`` know them.
"""

from ._registry import PeftOrthoType, register_all
from .errors import (
    AdapterFileError,
    BasisError,
    BasisMismatchError,
    BlockError,
    IncompatibleAdaptersError,
    OutputExistsError,
    PeftOrthoError,
    UnsafeOutputError,
    UnsupportedAdapterError,
    UnsupportedFeatureError,
    UnsupportedLayerError,
)
from .export import save_diffusers, save_kohya
from .hub import model_card, push_to_hub
from .statistics import (
    KINDS,
    AdapterStatistics,
    InputStatistics,
    Moment,
    calibrate,
    compare_statistics,
    load_statistics,
)
from .tuners.block_lora import BlockLoraConfig, BlockLoraModel
from .tuners.ortho_lora import OrthoLoraConfig, OrthoLoraModel
from .tuners.soda import SodaConfig, SodaModel

register_all()

from . import continual, erasure, optim, statistics  # noqa: E402
from .compose import MergedAdapter, compose  # noqa: E402  (after registration: compose reads adapter configs)

__version__ = "0.1.0.dev0"

__all__ = [
    "KINDS",
    "AdapterFileError",
    "AdapterStatistics",
    "BasisError",
    "BasisMismatchError",
    "BlockError",
    "BlockLoraConfig",
    "BlockLoraModel",
    "IncompatibleAdaptersError",
    "InputStatistics",
    "MergedAdapter",
    "Moment",
    "OrthoLoraConfig",
    "OrthoLoraModel",
    "OutputExistsError",
    "PeftOrthoError",
    "PeftOrthoType",
    "SodaConfig",
    "SodaModel",
    "UnsafeOutputError",
    "UnsupportedAdapterError",
    "UnsupportedFeatureError",
    "UnsupportedLayerError",
    "__version__",
    "calibrate",
    "compare_statistics",
    "load_statistics",
    "model_card",
    "push_to_hub",
    "save_diffusers",
    "save_kohya",
    "compose",
    "continual",
    "erasure",
    "optim",
    "statistics",
]
