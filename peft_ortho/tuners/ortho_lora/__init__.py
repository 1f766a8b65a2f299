from .config import OrthoLoraConfig
from .model import OrthoLoraModel

__all__ = ["OrthoLoraConfig", "OrthoLoraModel"]
