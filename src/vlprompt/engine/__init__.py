"""Training, evaluation and run orchestration."""

from .evaluate import accuracy_report, classify
from .features import encode_items
from .schedule import batches_per_epoch, coop_lr, default_epochs
from .trainer import TrainSettings, train_prompt

__all__ = ["accuracy_report", "classify", "encode_items", "batches_per_epoch", "coop_lr", "default_epochs",
           "TrainSettings", "train_prompt"]
