from .config import BlockLoraConfig
from .layer import BlockLoraLayer
from .model import BlockLoraModel

__all__ = ["BlockLoraConfig", "BlockLoraLayer", "BlockLoraModel"]
