# The paper's setting shared by the SkyTimelapse and UCF-101 configs: CausalSTDiT-XL/2 at 256x256,
# 33-frame clips, chunks of 8, a 25-frame cache queue, cyclic TPE, prefix perturbation at t=50,
# bf16, lr 2e-5. GPUs only. Weights are read from local directories (nothing is downloaded): put
# sd-vae-ft-ema and t5-v1_1-xxl under pretrained/, and optionally a checkpoint to start from.
model = dict(
    type="CausalSTDiT-XL/2",
    in_channels=4,
    caption_channels=4096,
    model_max_length=120,
    tpe_mode="cyclic",
    max_tpe_len=33,
    from_pretrained=None,  # e.g. "pretrained/OpenSora-v1-HQ-16x256x256.pth" or a PixArt-alpha XL/2 checkpoint
)
vae = dict(type="SDVAE", from_pretrained="pretrained/sd-vae-ft-ema", scaling_factor=0.18215, micro_batch_size=16)
text_encoder = dict(type="T5Encoder", from_pretrained="pretrained/t5-v1_1-xxl", model_max_length=120)
diffusion = dict(type="IDDPM", prediction_type="epsilon")
autoregressive = dict(chunk_size=8, max_cond_frames=25, prefix_perturb_t=50)
train = dict(
    seed=42,
    max_steps=100_000,
    batch_size=4,
    num_workers=8,
    lr=2e-5,
    warmup_steps=1000,
    grad_clip=1.0,
    ema_decay=0.9999,
    txt_dropout_prob=0.1,
    parallel="fsdp",
    mixed_precision="bf16",
    grad_checkpointing=True,
    log_every=50,
    ckpt_every=2000,
    keep_last=3,
    validation_every=5000,
)
sample = dict(sampler="iddpm", num_steps=100, cfg_scale=1.0, num_frames=81, fps=8, image_size=(256, 256))
