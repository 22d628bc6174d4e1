"""The training loop and its checkpoints."""
from fastlora.train.trainer import Trainer, TrainingDiverged, evaluate_loss

__all__ = ["Trainer", "TrainingDiverged", "evaluate_loss"]
