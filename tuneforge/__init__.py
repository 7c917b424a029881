"""tuneforge: fine-tune language models with composable strategies, and measure what they forget."""

import os

import torch

# DeepSpeed, when installed, is imported by transformers at model load; without GPUs it warns on every
# process unless told its accelerator. A user's own setting wins.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

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
