# Few-step student of the caption demo's model (causalvdm/distill; scripts/demo.sh with DISTILL=1 runs it): the
# student starts from the teacher's weights and learns to make a chunk in 3 DDIM steps, regressing the end points of
# the teacher's 24-step DDIM ODE; half of its training contexts are its own rollouts through the KV cache. About 5
# minutes on 2 CPU cores (each step runs the teacher's 24 steps and the student's rollout).
#   bash scripts/train.sh configs/demo/distill.py distill 29517 \
#       --cfg-options distill.teacher=outputs/caption_demo/checkpoints/step_00002000
_base_ = ["captions.py"]

distill = dict(
    teacher="",  # the teacher's checkpoint directory: given on the command line (see above)
    num_steps=3,  # 3 + 1 commit model calls per chunk against the teacher's 25 + 1
    teacher_steps=24,  # a multiple of num_steps, so every student timestep lies on the teacher's trajectory
    rollout_prob=0.5,
)
train = dict(max_steps=300, batch_size=4, lr=1e-4, warmup_steps=20, lr_schedule="constant", ema_decay=0.95,
             log_every=20, ckpt_every=150)
# A checkpoint of this run samples with the student's schedule (DDIM, distill.num_steps) unless flags say otherwise.
