"""Sample long videos autoregressively, chunk by chunk, through the shared KV cache; launched by scripts/sample.sh.

    bash scripts/sample.sh CONFIG --ckpt outputs/EXP/checkpoints/step_00010000 --first-image cat.png --num-frames 81
    bash scripts/sample.sh CONFIG --ckpt CKPT --first-video clip.mp4 --first-frames 1      # + PSNR against the clip
    NPROC_PER_NODE=4 bash scripts/sample.sh CONFIG --ckpt CKPT --manifest prompts.jsonl   # batch, 4 processes

Per video, into --out: NAME.mp4 (H.264, written while generating), NAME.png (contact sheet), NAME.json
(settings, seed, per-chunk timings, PSNR when the first frames come from a video). Defaults come from the
config's `sample` and `autoregressive` dicts; flags override them.
"""

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import causalvdm
from causalvdm.config import AutoregressiveSettings, add_config_args, load_config
from causalvdm.data.transforms import to_size, video_transform
from causalvdm.data.video_io import VideoReadError, iter_video_frames, read_image
from causalvdm.diffusion.samplers import SAMPLERS
from causalvdm.models.pretrained import extract_state_dict, load_pretrained
from causalvdm.registry import SCHEDULERS, TEXT_ENCODERS, VAES, ConfigError, build
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.sampling.generator import COMPILE_MODES, DTYPES, inference_dtype
from causalvdm.sampling.writer import ContactSheetCollector, StreamingVideoWriter, psnr, to_uint8
from causalvdm.utils.io import CheckpointError, iter_jsonl, load_weights
from causalvdm.utils.memory import keep_freed_memory

log = logging.getLogger("causalvdm.sample")


@dataclass
class SampleSettings:
    """What sampling reads from `cfg.sample`, every default declared here; CLI flags override them."""

    sampler: str = "iddpm"  # iddpm | ddim | dpm-solver++
    num_steps: int = 100
    cfg_scale: float = 1.0
    num_frames: int | None = None  # frames of each video, given ones included (default: model.max_tpe_len)
    fps: int = 8
    image_size: int | tuple | None = None  # (H, W) of the frames (default: dataset.image_size)
    seed: int = 0
    mode: str = "cache"  # cache | recompute (the baseline without a cache)
    prompt: str = ""
    first_image: str | None = None
    first_video: str | None = None
    first_frames: int = 1  # frames taken from first_video
    eval_len: int | None = None  # PSNR summary over frames [n0, eval_len) (default: model.max_tpe_len)
    ckpt: str | None = None
    weights: str = "ema"  # ema | model: which weights of a training checkpoint directory
    dtype: str = "auto"  # weights and KV cache: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    compile: str | None = None  # torch.compile mode of the per-step model call (None: eager)

    @classmethod
    def from_cfg(cls, sample_cfg, overrides: dict) -> "SampleSettings":
        """Validate `cfg.sample` against the declared fields, then apply the non-None CLI overrides."""
        given = dict(sample_cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ConfigError(f"sample: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "first_image" in overrides or "first_video" in overrides:  # a source on the command line replaces the config's
            given.pop("first_image", None)
            given.pop("first_video", None)
        settings = cls(**{**given, **overrides})
        if settings.weights not in ("ema", "model"):
            raise ConfigError(f"sample.weights must be 'ema' or 'model', got {settings.weights!r}")
        if settings.first_image and settings.first_video:
            raise ConfigError("give a first image or a first video, not both")
        if settings.sampler not in SAMPLERS:  # checked before the (slow) model is built
            raise ConfigError(f"unknown sampler {settings.sampler!r} (known: {', '.join(SAMPLERS)})")
        if settings.first_frames < 1:
            raise ConfigError(f"first_frames must be >= 1, got {settings.first_frames}")
        if settings.dtype != "auto" and settings.dtype not in DTYPES:
            raise ConfigError(f"sample.dtype must be auto or one of {', '.join(DTYPES)}, got {settings.dtype!r}")
        if settings.compile is not None and settings.compile not in COMPILE_MODES:
            raise ConfigError(f"sample.compile must be one of {', '.join(COMPILE_MODES)}, got {settings.compile!r}")
        return settings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="mmengine .py config (model, vae, text_encoder, diffusion, autoregressive, sample)")
    parser.add_argument("--ckpt", help="training checkpoint directory (with model.safetensors / ema.safetensors) or one "
                        ".safetensors/.pt state-dict file (default: sample.ckpt; none: untrained or model.from_pretrained)")
    parser.add_argument("--weights", choices=["ema", "model"], help="weights of a checkpoint directory (default: ema)")
    parser.add_argument("--prompt", help="text prompt (default: sample.prompt; empty: the null caption, no guidance; "
                        "ignored by an unconditional model)")
    parser.add_argument("--first-image", help="image giving the first frame; resized (short side) and centre-cropped "
                        "to the config's image size")
    parser.add_argument("--first-video", help="video whose first --first-frames frames are given; the rest are the "
                        "reference for per-frame PSNR")
    parser.add_argument("--first-frames", type=int, help="frames taken from --first-video (default 1)")
    parser.add_argument("--num-frames", type=int, help="frames of the video, given ones included (default: sample.num_frames)")
    parser.add_argument("--fps", type=int, help="frame rate of the mp4 (default: sample.fps)")
    parser.add_argument("--seed", type=int, help="seed of all sampling noise (default: sample.seed)")
    parser.add_argument("--sampler", help="iddpm | ddim | dpm-solver++ (default: sample.sampler)")
    parser.add_argument("--num-steps", type=int, help="denoising steps per chunk (default: sample.num_steps)")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale, 1 = none (default: sample.cfg_scale)")
    parser.add_argument("--mode", choices=["cache", "recompute"], help="'cache' (shared KV cache) or 'recompute' "
                        "(baseline: conditioning frames recomputed at every step)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], help="weights and KV cache (default auto: bfloat16 on "
                        "CUDA, float32 on the CPU); latents and the sampler stay float32")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, help="torch.compile the "
                        "per-step model call (mode default; reduce-overhead adds CUDA graphs); pays off on GPUs, "
                        "slower on CPUs")
    parser.add_argument("--eval-len", type=int, help="PSNR mean over the frames before this index (default: model.max_tpe_len, "
                        "the training clip length)")
    parser.add_argument("--out", help="output folder (default: outputs/<config stem>/samples)")
    parser.add_argument("--name", help="file name stem of the outputs (default: the first image/video's stem, else 'sample')")
    parser.add_argument("--manifest", help="batch mode: a .jsonl file, one video per row: {first_image | first_video, "
                        "prompt, name, first_frames, seed} (all optional; relative paths are relative to the manifest). "
                        "Rows are split over torchrun processes; videos whose mp4 exists are skipped")
    add_config_args(parser)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- building
def load_checkpoint_weights(model, ckpt: str, weights: str) -> Path:
    """Load a training checkpoint directory's ema/model weights or a state-dict file into `model`, strictly."""
    path = Path(ckpt)
    if path.is_dir():
        file = path / f"{weights}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{path}: no {file.name} in this directory (not a training checkpoint?)")
    elif path.is_file():
        file = path
    else:
        raise CheckpointError(f"{path}: checkpoint not found")
    state = extract_state_dict(load_weights(file), file)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
                if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        first = (reshaped or missing or unexpected)[0]
        raise CheckpointError(f"{file}: not a checkpoint of this model architecture ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(reshaped)} mis-shaped keys, e.g. {first})")
    model.load_state_dict(state)
    return file


def image_size_of(cfg, settings: SampleSettings, vae) -> tuple[int, int]:
    """(H, W) of the frames: sample.image_size, else dataset.image_size, else latent_size x VAE factor."""
    if settings.image_size is not None:
        size = to_size(settings.image_size)
    elif cfg.get("dataset") is not None and cfg.dataset.get("image_size") is not None:
        size = to_size(cfg.dataset.image_size)
    elif cfg.get("latent_size") is not None:
        size = tuple(int(s) * vae.downsample for s in cfg.latent_size)
    else:
        raise ConfigError(f"{cfg.filename}: set sample.image_size (no dataset.image_size or latent_size to derive it)")
    multiple = vae.downsample * 2  # latents must split into 2x2 patches
    if size[0] % multiple or size[1] % multiple:
        raise ConfigError(f"image size {size} must be a multiple of {multiple} (VAE factor x patch size)")
    return size


@dataclass
class Components:
    """Everything built once per process and shared by its videos."""

    model: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: object | None
    generator: AutoregressiveGenerator
    image_size: tuple[int, int]
    num_frames: int
    eval_len: int
    device: torch.device


def build_components(cfg, settings: SampleSettings, device: torch.device) -> Components:
    """Model (with its weights), VAE, text encoder, diffusion and the generator; raises one-line errors."""
    model_cfg = dict(cfg.model)
    pretrained = model_cfg.pop("from_pretrained", None)
    model = causalvdm.build_model(model_cfg)
    if settings.ckpt:
        file = load_checkpoint_weights(model, settings.ckpt, settings.weights)
        log.info("weights: %s", file)
    elif pretrained:
        load_pretrained(model, pretrained)
    else:
        log.warning("no --ckpt: sampling from untrained weights")
    model.to(device).eval()

    vae = build(VAES, cfg.get("vae"), "vae").to(device).eval()
    if vae.out_channels != model.in_channels:
        raise ConfigError(f"vae has {vae.out_channels} latent channels, model.in_channels is {model.in_channels}")
    text_encoder = None
    if model.caption_channels:
        text_encoder = build(TEXT_ENCODERS, cfg.get("text_encoder"), "text_encoder")
        if text_encoder.output_dim != model.caption_channels:
            raise ConfigError(f"text_encoder.output_dim={text_encoder.output_dim} but model.caption_channels="
                              f"{model.caption_channels}")
        if isinstance(text_encoder, torch.nn.Module):
            text_encoder.to(device)
    diffusion = build(SCHEDULERS, cfg.get("diffusion"), "diffusion")
    ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
    try:
        generator = AutoregressiveGenerator(model, diffusion, settings.sampler, settings.num_steps, ar.chunk_size,
                                            ar.max_cond_frames, settings.cfg_scale, ar.prefix_perturb_t,
                                            mode=settings.mode, progress=True,
                                            dtype=inference_dtype(settings.dtype, device), compile=settings.compile or False)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return Components(model, vae, text_encoder, generator, image_size_of(cfg, settings, vae),
                      settings.num_frames or model.max_tpe_len, settings.eval_len or model.max_tpe_len, device)


# ------------------------------------------------------------------------------------------ one video
@dataclass
class Job:
    """One video to generate: its output name, caption, seed and given frames."""

    name: str
    prompt: str
    seed: int
    first_image: str | None = None
    first_video: str | None = None
    first_frames: int = 1


def first_pixels(job: Job, size: tuple[int, int]):
    """The given frames as pixels (3, n0, H, W) in [-1, 1], and the iterator of the video's later frames (or None)."""
    if job.first_image:
        frame = read_image(job.first_image)  # (H, W, 3) uint8
        if frame.shape[:2] != size:
            log.info("%s: %dx%d resized and centre-cropped to %dx%d", job.first_image, frame.shape[1], frame.shape[0],
                     size[1], size[0])
        return video_transform(torch.from_numpy(frame.copy())[None], size), None
    if job.first_video:
        frames = iter_video_frames(job.first_video)
        given = [f for _, f in zip(range(job.first_frames), frames)]
        if len(given) < job.first_frames:
            raise VideoReadError(f"{job.first_video}: has {len(given)} frames, --first-frames asks for {job.first_frames}")
        if given[0].shape[:2] != size:
            log.info("%s: %dx%d frames resized and centre-cropped to %dx%d", job.first_video, given[0].shape[1],
                     given[0].shape[0], size[1], size[0])
        return video_transform(torch.from_numpy(np.stack(given)), size), frames
    log.warning("no first image or video: the first chunk is generated from the prompt alone "
                "(the model is trained with at least one given frame)")
    return torch.zeros(3, 0, *size), None


def run_job(job: Job, comp: Components, settings: SampleSettings, out_dir: Path, config_path: str,
            show_progress: bool) -> dict:
    """Generate one video into out_dir/NAME.{mp4,png,json} -> the sidecar dict."""
    start = time.perf_counter()
    gen, vae, device = comp.generator, comp.vae, comp.device
    pixels, later_frames = first_pixels(job, comp.image_size)  # (3, n0, H, W)
    n0 = pixels.shape[1]
    h, w = comp.image_size
    f = vae.downsample
    with torch.inference_mode():
        if n0:
            first = vae.encode(pixels[None].to(device))  # (1, C, n0, h, w)
        else:
            first = torch.zeros(1, comp.model.in_channels, 0, h // f, w // f, device=device)
        y = mask = None
        if comp.text_encoder is not None and job.prompt:
            y, mask = comp.text_encoder.encode([job.prompt])
    if comp.num_frames < n0:
        raise ValueError(f"--num-frames {comp.num_frames} is fewer than the {n0} given frames")

    last_given = pixels[:, -1:] if n0 else None  # (3, 1, H, W) for the repeat-last-frame baseline
    scores, baseline, compared = [], [], []
    collector = ContactSheetCollector(comp.num_frames)
    mp4 = out_dir / f"{job.name}.mp4"
    with StreamingVideoWriter(mp4, settings.fps, w, h) as writer:
        if n0:
            with torch.inference_mode():
                frames = to_uint8(vae.decode(first)[0])
            writer.write(frames)
            collector.add(frames)
        chunks = gen.iter_chunks(first, comp.num_frames, y, mask, seed=job.seed)
        total = gen.num_chunks(n0, comp.num_frames)
        for latents in tqdm(chunks, total=total, desc=job.name, disable=not show_progress):
            with torch.inference_mode():
                video = vae.decode(latents)[0]  # (3, k, H, W)
            index = writer.num_frames
            frames = to_uint8(video)
            writer.write(frames)
            collector.add(frames)
            if later_frames is not None:
                real = [f for _, f in zip(range(video.shape[1]), later_frames)]
                if real:
                    real = video_transform(torch.from_numpy(np.stack(real)), comp.image_size)  # (3, r, H, W)
                    scores += psnr(video[:, : real.shape[1]].cpu(), real).tolist()
                    baseline += psnr(last_given.expand_as(real), real).tolist()
                    compared += range(index, index + real.shape[1])
        collector.save(out_dir / f"{job.name}.png")

    sidecar = dict(
        config=config_path, name=job.name, prompt=job.prompt, seed=job.seed, first_image=job.first_image,
        first_video=job.first_video, given_frames=n0, frames=writer.num_frames, fps=settings.fps, size=[h, w],
        settings={**asdict(settings), "seed": job.seed, "prompt": job.prompt},
        autoregressive=dict(chunk_size=gen.chunk_size, max_cond_frames=gen.max_cond_frames,
                            prefix_perturb_t=gen.prefix_perturb_t),
        device=str(device), prefill_seconds=gen.prefill_time, chunk_seconds=gen.chunk_times,
        total_seconds=time.perf_counter() - start, video=mp4.name, contact_sheet=f"{job.name}.png",
    )
    if compared:
        sidecar["metrics"] = psnr_summary(compared, scores, baseline, comp.eval_len)
        log.info("%s: PSNR over frames %d-%d: %.2f dB (repeating the last given frame: %.2f dB)", job.name, n0,
                 min(comp.eval_len, compared[-1] + 1) - 1, sidecar["metrics"]["psnr_mean_eval"],
                 sidecar["metrics"]["psnr_repeat_last_mean_eval"])
    (out_dir / f"{job.name}.json").write_text(json.dumps(sidecar, indent=2))
    return sidecar


def psnr_summary(frames: list[int], scores: list[float], baseline: list[float], eval_len: int) -> dict:
    """Per-frame PSNR lists and their means over frames < eval_len and over all compared frames."""
    in_eval = [i for i, f in enumerate(frames) if f < eval_len] or list(range(len(frames)))
    return dict(
        frames=frames, psnr=scores, psnr_repeat_last=baseline, eval_len=eval_len,
        psnr_mean_eval=float(np.mean([scores[i] for i in in_eval])),
        psnr_repeat_last_mean_eval=float(np.mean([baseline[i] for i in in_eval])),
        psnr_mean_all=float(np.mean(scores)), psnr_repeat_last_mean_all=float(np.mean(baseline)),
    )


# ------------------------------------------------------------------------------------------ jobs
def read_jobs(manifest: str, settings: SampleSettings) -> list[Job]:
    """Rows of a .jsonl manifest -> jobs; relative paths are taken relative to the manifest's folder."""
    path = Path(manifest)
    if not path.is_file():
        raise ConfigError(f"{path}: manifest not found")
    root = path.parent
    jobs, names = [], set()
    try:
        rows = list(iter_jsonl(path))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for line_no, row in rows:
        unknown = sorted(set(row) - {"first_image", "first_video", "prompt", "name", "first_frames", "seed"})
        if unknown:
            raise ConfigError(f"{path}: line {line_no}: unknown field(s) {', '.join(unknown)}")
        if row.get("first_image") and row.get("first_video"):
            raise ConfigError(f"{path}: line {line_no}: give first_image or first_video, not both")
        source = row.get("first_image") or row.get("first_video")
        name = str(row.get("name") or f"{len(jobs):05d}" + (f"_{Path(source).stem}" if source else ""))
        if name in names:
            raise ConfigError(f"{path}: line {line_no}: duplicate name {name!r}")
        names.add(name)
        jobs.append(Job(
            name=name, prompt=row.get("prompt", settings.prompt), seed=int(row.get("seed", settings.seed)),
            first_image=str(root / row["first_image"]) if row.get("first_image") else None,
            first_video=str(root / row["first_video"]) if row.get("first_video") else None,
            first_frames=int(row.get("first_frames", settings.first_frames)),
        ))
    return jobs


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s" if world > 1 else "%(asctime)s %(message)s")
    keep_freed_memory()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    overrides = dict(ckpt=args.ckpt, weights=args.weights, prompt=args.prompt, first_image=args.first_image,
                     first_video=args.first_video, first_frames=args.first_frames, num_frames=args.num_frames,
                     fps=args.fps, seed=args.seed, sampler=args.sampler, num_steps=args.num_steps,
                     cfg_scale=args.cfg_scale, mode=args.mode, eval_len=args.eval_len, dtype=args.dtype,
                     compile=args.compile)
    try:
        cfg = load_config(args.config, args.cfg_options)
        settings = SampleSettings.from_cfg(cfg.get("sample"), overrides)
        comp = build_components(cfg, settings, device)
        if args.manifest:
            jobs = read_jobs(args.manifest, settings)[rank::world]
        else:
            source = settings.first_image or settings.first_video
            name = args.name or (Path(source).stem if source else "sample")
            jobs = [Job(name, settings.prompt, settings.seed, settings.first_image, settings.first_video,
                        settings.first_frames)]
    except (ConfigError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    out_dir = Path(args.out or Path("outputs") / Path(args.config).stem / "samples")

    failed = 0
    for job in jobs:
        if args.manifest and (out_dir / f"{job.name}.mp4").exists():
            log.info("%s: exists, skipped", job.name)
            continue
        try:
            sidecar = run_job(job, comp, settings, out_dir, args.config, show_progress=rank == 0)
        except (VideoReadError, ValueError) as err:
            if not args.manifest:
                sys.exit(f"error: {err}")
            log.error("%s: %s", job.name, err)
            failed += 1
            continue
        print(f"{out_dir / sidecar['video']}: {sidecar['frames']} frames in {sidecar['total_seconds']:.1f}s")
    if failed:
        log.error("%d of %d videos failed", failed, len(jobs))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
