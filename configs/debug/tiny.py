# A tiny causal ST-DiT for tests and tools: builds and runs in milliseconds on a CPU.
model = dict(
    type="CausalSTDiT",
    in_channels=4,
    patch_size=(1, 2, 2),
    hidden_size=32,
    depth=2,
    num_heads=2,
    mlp_ratio=2.0,
    caption_channels=16,
    model_max_length=6,
    tpe_mode="cyclic",
    max_tpe_len=33,
)
latent_size = (4, 4)  # latent (H, W) used by tools/verify_cache.py
