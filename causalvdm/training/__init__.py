"""Training: the Trainer (the loop), run settings, distributed set-up and wrapping, EMA, checkpoints, logging."""

from causalvdm.training.settings import TrainSettings
from causalvdm.training.trainer import Trainer

__all__ = ["TrainSettings", "Trainer"]
