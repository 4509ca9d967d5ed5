"""Training: the Trainer (the loop), run settings, distributed set-up and wrapping, EMA, checkpoints, logging."""

from causalvdm.training.settings import TrainSettings

__all__ = ["TrainSettings", "Trainer"]


def __getattr__(name: str):
    # The Trainer brings torch.distributed.checkpoint (~1 s of imports): loaded when asked for, so sampling and the
    # settings checks that only need TrainSettings start faster.
    if name == "Trainer":
        from causalvdm.training.trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
