# Overfit demo: a small causal ST-DiT memorises one real 17-frame clip at 32x32 on a 2-core CPU, then
# continues the clip from its first frame with the shared KV cache (scripts/demo.sh runs it all).
# Pixels go through the lossless space-to-depth PixelVAE, so no neural autoencoder is needed. The
# width must exceed the values per token (2x2 patches of 48 channels = 192): below it the model cannot
# pass the noisy input through, and v/epsilon prediction fails at low noise levels.
data_root = "data/demo"

model = dict(
    type="CausalSTDiT",
    in_channels=48,  # PixelVAE factor 4: 3 * 4 * 4 channels at 8x8, so 16 tokens per frame
    hidden_size=256,  # > 192 values per token, see above
    depth=4,
    num_heads=4,
    mlp_ratio=4.0,
    caption_channels=0,
    tpe_mode="cyclic",
    max_tpe_len=17,
)
vae = dict(type="PixelVAE", factor=4)
text_encoder = dict(type="NullTextEncoder")
diffusion = dict(type="IDDPM", prediction_type="v_prediction")
dataset = dict(
    type="RepeatDataset",
    times=1000,
    dataset=dict(
        type="VideoManifestDataset",
        root=data_root,
        manifest="overfit.jsonl",  # one clip; scripts/demo.sh writes it
        num_frames=17,
        image_size=(32, 32),
        sample_interval=1,
        random_crop=False,
    ),
)
autoregressive = dict(chunk_size=4, max_cond_frames=13, prefix_perturb_t=0)
train = dict(
    seed=0,
    max_steps=2000,  # about 10 minutes on 2 cores
    batch_size=8,
    num_workers=None,  # the machine's default: 0 on a CPU (the model uses every core), more with a GPU
    lr=6e-4,
    warmup_steps=50,
    lr_schedule="cosine",  # ends at a low rate: carphone frames 1-16 at 31.8 dB (29.9 constant, 1,200 steps)
    grad_clip=1.0,
    ema_decay=0.99,
    txt_dropout_prob=0.0,
    log_every=25,
    ckpt_every=500,
    keep_last=2,
)
sample = dict(sampler="ddim", num_steps=25, cfg_scale=1.0, num_frames=51, fps=12, image_size=(32, 32))
