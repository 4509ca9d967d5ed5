# The model of tools/benchmark_speedup.py, benchmark_step.py and benchmark_steady_state.py on a CPU: CausalSTDiT-S/2
# on 32x32 latents (a 256x256 video through an SD VAE), unconditional, cyclic TPE over 33 frames, chunks of 8 with a
# 25-frame cache queue.
model = dict(
    type="CausalSTDiT-S/2",
    in_channels=4,
    caption_channels=0,
    tpe_mode="cyclic",
    max_tpe_len=33,
)
latent_size = (32, 32)
diffusion = dict(type="IDDPM", prediction_type="epsilon")
autoregressive = dict(chunk_size=8, max_cond_frames=25, prefix_perturb_t=0)
