"""Training: data and tokenizers, the trainer, and held-out evaluation."""
from .trainer import TrainConfig, Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train"]
