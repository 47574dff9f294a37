"""Flax NNX decoder models and Hugging Face checkpoint I/O."""

from fusejax.models.config import ModelConfig, ModelConfigError
from fusejax.models.hf_io import CheckpointError, load_pretrained, model_shardings, save_pretrained
from fusejax.models.transformer import Transformer

__all__ = [
    "CheckpointError",
    "ModelConfig",
    "ModelConfigError",
    "Transformer",
    "load_pretrained",
    "model_shardings",
    "save_pretrained",
]
