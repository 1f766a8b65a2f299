"""peft-ortho: adapters that merge without crosstalk, as peft tuners.

``import peft_ortho`` registers its tuners with peft, after which ``get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and transformers' ``load_adapter`` know them.

Where things are: each tuner in ``tuners/<name>/`` (config, layer, model, its facts); the diffusers LoRA file in
``diffusers_lora``, the kohya file in ``kohya_lora``, LoRA file-format rules in ``lora_format``; model cards in
``cards``, Hub uploads in ``hub``; merging in ``merging`` (whose entry point is ``compose``); input statistics in
``statistics``; ``continual``, ``erasure`` and ``optim`` as named.
"""

from . import continual, erasure, merging, optim, statistics
from ._registry import register_all as register_all  # re-registers the tuners (notebook reloads)
from ._version import __version__
from .cards import model_card
from .diffusers_lora import save_diffusers
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
from .hub import push_to_hub
from .kohya_lora import save_kohya
from .merging import MergedAdapter, compose
from .peft_types import PeftOrthoType
from .statistics import (
    KINDS,
    AdapterStatistics,
    InputStatistics,
    Moment,
    calibrate,
    compare_statistics,
    load_statistics,
)

# Importing a tuner's package registers it with peft (its __init__ declares its facts): one line per tuner.
from .tuners.block_lora import BlockLoraConfig, BlockLoraModel
from .tuners.ortho_lora import OrthoLoraConfig, OrthoLoraModel
from .tuners.soda import SodaConfig, SodaModel

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
    "merging",
    "optim",
    "statistics",
]
