"""tuneforge: fine-tune language models with composable strategies, and measure what they forget."""

from tuneforge.api import load_adapter, prepare, save_adapter
from tuneforge.errors import ConfigError, DataError, ModelError, TrainingError, TuneforgeError

__all__ = [
    "ConfigError",
    "DataError",
    "ModelError",
    "TrainingError",
    "TuneforgeError",
    "load_adapter",
    "prepare",
    "save_adapter",
]
__version__ = "0.1.0"
