# Caption demo: a small causal ST-DiT learns three real 51-frame shots at 32x32 on a 2-core CPU, each with its
# caption, then continues each one from its first frame with the shared KV cache and turns towards another shot
# when the caption is switched (scripts/demo.sh runs it all; docs/demo.md shows what to expect).
# Pixels go through the lossless space-to-depth PixelVAE (factor 4) and 2x2 patches: a token is 8x8 pixels. The
# model predicts the clean frame (x-prediction), so it never has to carry the noise of a token's 192 values; its
# output head reads each token's neighbours, a residual conv pair over each output frame sees across token borders and
# the loss charges errors that jump at a border, so the tokens do not show as tiles; the sampler deblocks the small
# steps left at their borders. docs/demo_recipe.md says what else was tried and what each measured.
# The captions are encoded by WordHashEncoder (a fixed vector per word), so nothing is downloaded.
data_root = "data/demo_long"
chunk_size = 4

model = dict(
    type="CausalSTDiT",
    in_channels=48,  # PixelVAE factor 4: 3 * 4 * 4 channels at 8x8, so 4x4 = 16 tokens per frame
    patch_size=(1, 2, 2),
    hidden_size=256,
    depth=4,
    num_heads=4,
    mlp_ratio=4.0,
    caption_channels=64,
    model_max_length=24,
    tpe_mode="cyclic",
    max_tpe_len=9,
    learn_sigma=False,  # no variance head: the whole loss goes to the clean frame (DDIM does not use a variance)
    spatial_prefix="prev_frames_2",  # a chunk's spatial attention also reads the two frames before it (motion)
    head_kernel=3,  # the output head convolves the 4x4 token grid: a token's output sees its neighbours' features
    output_refine=64,
)
vae = dict(type="PixelVAE", factor=4)
text_encoder = dict(type="WordHashEncoder", output_dim=64, model_max_length=24)
# x-prediction: a clean frame, not the noise, per token; border_weight: an error that jumps from one token to the next
# costs more than the same error shared by both, so the tokens' borders do not show; spacing_power: the sampler's
# 25 steps moved towards low noise (the last at t = 17, not 39), for the same time (docs/diffusion.md)
diffusion = dict(type="IDDPM", prediction_type="sample", learn_sigma=False, border_weight=1.0, spacing_power=1.25)
dataset = dict(
    type="CaptionSwitchDataset",
    prob=0.15,  # some clips start with another shot's frames: the caption, not the past, decides what comes next
    chunk_size=chunk_size,
    dataset=dict(
        type="RepeatDataset",
        times=16,  # each shot 16 times per epoch, each copy its own 9-frame window: a batch holds 8 windows
        dataset=dict(
            type="VideoManifestDataset",
            root=data_root,
            manifest="captions.jsonl",  # the shots to learn; scripts/demo.sh writes it
            num_frames=9,  # a frame and two chunks: the model sees at most 5 frames before a chunk
            image_size=(32, 32),
            sample_interval=1,
            random_crop=False,
        ),
    ),
)
autoregressive = dict(chunk_size=chunk_size, max_cond_frames=5, prefix_perturb_t=0)
train = dict(
    seed=0,
    max_steps=2000,
    batch_size=8,
    num_workers=None,
    lr=7e-4,
    adam_betas=(0.9, 0.95),  # a shorter memory of the squared gradients: faster steps in a short run
    warmup_steps=50,
    lr_schedule="cosine",
    grad_clip=1.0,
    ema_decay=0.99,
    txt_dropout_prob=0.05,
    timestep_power=2.0,  # 55% of the chunks at t < 300 (30% uniform), where the fine detail is decided
    log_every=25,
    ckpt_every=500,
    keep_last=2,
)
# At a caption switch the cached frames are re-encoded under the new caption, as the switched training clips saw
# their first frames (without it the model keeps more of the old shot).
# crf 4: at 32x32 the mp4's 4x4 / 8x8 blocks are token-sized, and the default 18 adds block edges of its own.
# deblock: the small steps still left at token borders (where the street's cyclist passes) are softened as a codec's
# deblocking filter does, by at most 6 grey levels beside a border (sampling/deblock.py).
sample = dict(sampler="ddim", num_steps=25, cfg_scale=1.0, num_frames=51, fps=12, image_size=(32, 32),
              recache_on_switch=True, crf=4, deblock=1.0)
