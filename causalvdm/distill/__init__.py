"""Few-step distillation: a student that samples a chunk in 1-4 DDIM steps, trained from a teacher checkpoint by ODE
regression with self-rollout through the KV cache (objective.py); `DistillTrainer` runs it on the Trainer."""

from causalvdm.distill.objective import DistillSettings, FewStepDistillation, context_spans, matched_steps, ode_solve

__all__ = ["DistillSettings", "DistillTrainer", "FewStepDistillation", "context_spans", "matched_steps", "ode_solve"]


def __getattr__(name: str):
    # The trainer brings torch.distributed.checkpoint: loaded when asked for (as causalvdm.training does).
    if name == "DistillTrainer":
        from causalvdm.distill.trainer import DistillTrainer

        return DistillTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
