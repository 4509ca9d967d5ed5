"""The distillation run: the Trainer with a frozen teacher and the few-step objective (causalvdm/distill/objective.py).

    bash scripts/train.sh configs/demo/distill.py distill 29517 --cfg-options distill.teacher=outputs/overfit_demo/checkpoints/step_00002000

A config with a `distill` section trains this way (scripts/train.py picks the trainer); checkpoints, EMA, resume,
logging and validation are the Trainer's. The student starts from the teacher's weights.
"""

import logging

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from causalvdm.diffusion import prefix_lengths
from causalvdm.diffusion.samplers import STUDENT_SAMPLER
from causalvdm.distill.objective import DistillSettings, FewStepDistillation
from causalvdm.models.pretrained import split_init_fields
from causalvdm.models.saved_config import check_saved_config
from causalvdm.registry import MODELS, build
from causalvdm.training.ema import EMA
from causalvdm.training.trainer import Trainer, sample_seed
from causalvdm.utils.weights import load_checkpoint_weights

log = logging.getLogger("causalvdm.distill")


class DistillTrainer(Trainer):
    """Trains a few-step student from `cfg.distill.teacher`; see FewStepDistillation for the objective."""

    def __init__(self, cfg, settings, run_dir, info):
        super().__init__(cfg, settings, run_dir, info)
        self.distill = DistillSettings.from_cfg(cfg.get("distill"))
        # The run's config.py and every checkpoint's say how the student samples, so a pipeline loading one needs
        # nothing of distillation to know.
        cfg.merge_from_dict({"sample.sampler": STUDENT_SAMPLER, "sample.num_steps": self.distill.num_steps})

    def build(self) -> None:
        """The Trainer's components, the frozen teacher and the student initialised from it (EMA included)."""
        super().build()
        d = self.distill
        self.teacher = build(MODELS, split_init_fields(self.cfg.model)[0], "model")
        check_saved_config(d.teacher, self.cfg)
        log.info("teacher: %s", load_checkpoint_weights(self.teacher, d.teacher, d.teacher_weights))
        self.teacher.to(self.info.device).eval().requires_grad_(False)
        set_model_state_dict(self.model, self.teacher.state_dict(), options=StateDictOptions(full_state_dict=True))
        self.ema = EMA(self.core, self.settings.ema_decay)
        self.objective = FewStepDistillation(self.diffusion, self.ar.chunk_size, self.ar.max_cond_frames,
                                             self.ar.sink_frames, self.ar.prefix_perturb_t, d.num_steps,
                                             d.teacher_steps)
        log.info("student: %s %d steps per chunk, from the teacher's %d-step ODE; own rollout as context with "
                 "probability %g", STUDENT_SAMPLER, d.num_steps, d.teacher_steps, d.rollout_prob)

    def validation_schedule(self) -> tuple[str, int]:
        """Validation clips sample as the student will: DDIM with distill.num_steps."""
        return STUDENT_SAMPLER, self.distill.num_steps

    def compute_loss(self, batch: dict, micro: int) -> dict:
        """The distillation loss on one micro-batch; the prefix length and rollout choice are drawn per micro-batch,
        every other draw per sample (seeded by seed, step, micro, index as the Trainer's)."""
        s, k = self.settings, self.ar.chunk_size
        x0 = self.encode(batch)
        with torch.no_grad():
            y, mask = self.text_encoder.encode(list(batch["caption"]))
        lengths = prefix_lengths(x0.shape[2], k)
        step_gen = torch.Generator().manual_seed(sample_seed(s.seed, self.step, micro))
        prefix_len = lengths[int(torch.randint(len(lengths), (1,), generator=step_gen))]
        rollout = prefix_len > 1 and bool(torch.rand((), generator=step_gen) < self.distill.rollout_prob)
        draws = [self.objective.draw(x0.shape[1:2] + x0.shape[3:], prefix_len, rollout,
                                     torch.Generator().manual_seed(sample_seed(s.seed, self.step, micro, int(i))))
                 for i in batch["index"]]
        with self.autocast:
            x_in, t_in, target = self.objective.targets(self.teacher, x0, prefix_len, draws, y, mask)
            # the student's context through the wrapped model's forward, as FSDP2 gathers its weights there
            cache, _ = self.objective.context(self.model, x0[:, :, :1], None if rollout else x0, prefix_len, draws,
                                              y, mask)
            losses = self.objective.loss(self.model, x_in, t_in, target, cache, y, mask)
        real = x0[:, :, prefix_len:prefix_len + k].float()
        return dict(loss=losses.mean(), prefix_len=prefix_len, rollout=float(rollout),
                    teacher_mse_to_real=((target - real) ** 2).mean().detach())
