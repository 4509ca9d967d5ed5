"""Sample long videos autoregressively, chunk by chunk, through the shared KV cache (`causalvdm-sample`).

    bash scripts/sample.sh CONFIG --ckpt outputs/EXP/checkpoints/step_00010000 --first-image cat.png --num-frames 81
    bash scripts/sample.sh --ckpt outputs/EXP/checkpoints/step_00010000 --first-image cat.png   # the run's config
    bash scripts/sample.sh CONFIG --ckpt CKPT --first-video clip.mp4 --first-frames 1      # + PSNR against the clip
    NPROC_PER_NODE=4 bash scripts/sample.sh CONFIG --ckpt CKPT --manifest prompts.jsonl   # batch, 4 processes

Per video, into --out: NAME.mp4 (H.264, written while generating), NAME.png (contact sheet: numbered frames, the
real ones above when the first frames come from a video), NAME_drift.png (per-chunk drift statistics), NAME.json
(settings, seed, per-chunk timings and drift statistics, PSNR when the first frames come from a video). A statistic
leaving its reference band is logged once (causalvdm/sampling/drift.py). Defaults come from the
config's `sample` and `autoregressive` dicts; flags override them. Without CONFIG, --ckpt must be a training
checkpoint directory or a save_pretrained folder, and the config saved with it is used.
"""

import argparse
import logging
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from causalvdm.cli.common import (ArgumentParser, debugging, error_line, non_negative_float, non_negative_int,
                                  one_line_errors, positive_int, x264_crf)
from causalvdm.config import add_config_args, load_config
from causalvdm.data.video_io import VideoReadError
from causalvdm.models.kv_quant import CACHE_DTYPES
from causalvdm.pipeline import CausalVDMPipeline
from causalvdm.registry import ConfigError, check_type
from causalvdm.sampling.generator import COMPILE_MODES
from causalvdm.sampling.drift import plot_drift
from causalvdm.sampling.recorder import VideoRecorder
from causalvdm.sampling.settings import SampleSettings, check_prompts
from causalvdm.sampling.writer import StreamingVideoWriter
from causalvdm.utils.dtypes import DTYPES
from causalvdm.utils.io import iter_jsonl, plain_name, writable_dir, write_json
from causalvdm.utils.memory import keep_freed_memory
from causalvdm.utils.weights import PIPELINE_CONFIG, pretrained_config_path
from causalvdm.training.memory_plan import estimate_line

log = logging.getLogger("causalvdm.sample")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="?", help="mmengine .py config (model, vae, text_encoder, diffusion, "
                        "autoregressive, sample); default: the one saved with --ckpt")
    parser.add_argument("--ckpt", help="training checkpoint directory (with model.safetensors / ema.safetensors), a "
                        "save_pretrained folder or one .safetensors/.pt state-dict file (default: sample.ckpt; none: "
                        "untrained or model.from_pretrained)")
    parser.add_argument("--weights", choices=["ema", "model"], help="weights of a checkpoint directory (default: ema)")
    parser.add_argument("--prompt", help="text prompt (default: sample.prompt; empty: the null caption, no guidance; "
                        "ignored by an unconditional model)")
    parser.add_argument("--prompt-at", nargs=2, action="append", metavar=("FRAME", "PROMPT"), help="from frame FRAME "
                        "on, the prompt is PROMPT; FRAME must start a chunk, n0 + i * chunk_size (41 = chunk 5 after 1 "
                        "given frame in chunks of 8); repeatable (default: sample.prompts)")
    parser.add_argument("--recache-on-switch", action=argparse.BooleanOptionalAction, help="at a prompt switch, "
                        "re-encode the cached frames in view under the new prompt (one t = 0 pass), instead of keeping "
                        "their keys/values (default: sample.recache_on_switch, off; recompute mode always re-encodes)")
    parser.add_argument("--first-image", help="image giving the first frame; resized (short side) and centre-cropped "
                        "to the config's image size")
    parser.add_argument("--first-video", help="video whose first --first-frames frames are given; the rest are the "
                        "reference for per-frame PSNR")
    parser.add_argument("--first-frames", type=positive_int, help="frames taken from --first-video (default 1)")
    parser.add_argument("--num-frames", type=positive_int, help="frames of the video, given ones included (default: sample.num_frames)")
    parser.add_argument("--fps", type=positive_int, help="frame rate of the mp4 (default: sample.fps)")
    parser.add_argument("--crf", type=x264_crf,
                        help="H.264 quality of the mp4, x264 CRF 1-51, lower is closer to the frames; small frames "
                             "need a low one (default: sample.crf, 18)")
    parser.add_argument("--deblock", type=non_negative_float, metavar="STRENGTH", help="soften the small steps the "
                        "model's token grid leaves at token borders of the generated frames, as a video codec's "
                        "deblocking filter does at its block borders; 0 off, 1 the demo's strength; the model's "
                        "latents are not changed (default: sample.deblock, 0)")
    parser.add_argument("--seed", type=non_negative_int, help="seed of all sampling noise (default: sample.seed)")
    parser.add_argument("--sampler", help="iddpm | ddim | dpm-solver++ (default: sample.sampler)")
    parser.add_argument("--num-steps", type=positive_int, help="denoising steps per chunk (default: sample.num_steps)")
    parser.add_argument("--cfg-scale", type=non_negative_float, help="classifier-free guidance scale, >= 0; 1 = none (default: sample.cfg_scale)")
    parser.add_argument("--mode", choices=["cache", "recompute"], help="'cache' (shared KV cache) or 'recompute' "
                        "(baseline: conditioning frames recomputed at every step)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], help="weights and KV cache (default auto: bfloat16 on "
                        "CUDA, float32 on the CPU); latents and the sampler stay float32")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, help="torch.compile the "
                        "per-step model call (mode default; reduce-overhead adds CUDA graphs); pays off on GPUs, "
                        "slower on CPUs")
    parser.add_argument("--cache-dtype", choices=list(CACHE_DTYPES), help="store the KV cache in 8 bits (a bf16 "
                        "scale per token and head: about half the bytes of bf16); default: the weights' dtype")
    parser.add_argument("--eval-len", type=positive_int, help="PSNR mean over the frames before this index (default: model.max_tpe_len, "
                        "the training clip length)")
    parser.add_argument("--out", help="output folder (default: outputs/<config stem, or the checkpoint's run>/samples)")
    parser.add_argument("--name", help="file name stem of the outputs (default: the first image/video's stem, else 'sample')")
    parser.add_argument("--manifest", help="batch mode: a .jsonl file, one video per row: {first_image | first_video, "
                        "prompt, prompts, name, first_frames, seed} (all optional; prompts: [{frame, prompt}] "
                        "switches as --prompt-at; relative paths are relative to the manifest). "
                        "Rows are split over torchrun processes; a rerun skips the videos it finished (mp4 and "
                        "sidecar .json written)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of the same name in --out from an "
                        "earlier run (without it a single video refuses to, and --manifest skips finished rows)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if not args.config and not args.ckpt:
        parser.error("give a config, or --ckpt with a checkpoint directory (its saved config is used)")
    try:  # --prompt-at as sample.prompts entries
        args.prompts = [dict(frame=non_negative_int(frame), prompt=prompt) for frame, prompt in args.prompt_at or []]
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --prompt-at: FRAME {err}")
    args.prompts = args.prompts or None  # none given: the config's
    return args


def check_flags_apply(args, settings: SampleSettings) -> None:
    """Fail with one line on a flag that the settings in force would ignore (asked for, so it must do something)."""
    if args.manifest and args.name:
        raise ConfigError("--name names a single video; with --manifest each row has its own 'name'")
    ckpt = Path(settings.ckpt) if settings.ckpt else None
    if args.weights and ckpt and not (ckpt.is_dir() and not (ckpt / PIPELINE_CONFIG).exists()):
        raise ConfigError(f"--weights picks ema or model weights of a training checkpoint directory; {ckpt} holds "
                          "one set of weights")
    if args.first_frames and not settings.first_video and not args.manifest:
        raise ConfigError("--first-frames takes frames from a first video; give --first-video")
    if args.eval_len and not settings.first_video and not args.manifest:
        raise ConfigError("--eval-len sets the PSNR range against a first video's real frames; give --first-video")
    if args.recache_on_switch and not settings.prompts and not args.manifest:
        raise ConfigError("--recache-on-switch re-encodes at prompt switches, and there are none: add --prompt-at")


@dataclass
class Job:
    """One video to generate: its output name, caption, seed and given frames."""

    name: str
    prompt: str
    seed: int
    first_image: str | None = None
    first_video: str | None = None
    first_frames: int = 1
    prompts: tuple[dict, ...] = ()  # prompt switches, {"frame": j, "prompt": "..."} each


def run_job(job: Job, pipe: CausalVDMPipeline, out_dir: Path, config_path: str) -> dict:
    """Generate one video into out_dir/NAME.{mp4,png,json} and NAME_drift.png -> the sidecar dict."""
    h, w = pipe.image_size
    mp4 = out_dir / f"{job.name}.mp4"
    recorder = VideoRecorder()
    chunks = pipe.iter_chunks(first_image=job.first_image, first_video=job.first_video, first_frames=job.first_frames,
                              prompt=job.prompt, prompts=job.prompts, seed=job.seed, recorder=recorder)
    with StreamingVideoWriter(mp4, pipe.defaults.fps, w, h, crf=pipe.defaults.crf) as writer:
        for frames in chunks:  # (t, H, W, 3) uint8
            writer.write(frames)
        recorder.contact_sheet.save(out_dir / f"{job.name}.png")  # before the mp4 is complete: a rerun redoes both
    plot_drift(pipe.info["drift"], out_dir / f"{job.name}_drift.png", title=job.name)
    sidecar = dict(config=config_path, name=job.name, **pipe.info, video=mp4.name, contact_sheet=f"{job.name}.png",
                   drift_plot=f"{job.name}_drift.png")
    if "metrics" in sidecar:
        metrics = sidecar["metrics"] = sidecar.pop("metrics")  # last, after the file names
        log.info("%s: PSNR over frames %d-%d: %.2f dB (repeating the last given frame: %.2f dB)", job.name,
                 sidecar["given_frames"], min(metrics["eval_len"], metrics["frames"][-1] + 1) - 1,
                 metrics["psnr_mean_eval"], metrics["psnr_repeat_last_mean_eval"])
    sidecar["drift"] = sidecar.pop("drift")  # last: one record per chunk
    write_json(out_dir / f"{job.name}.json", sidecar)  # last and atomic: it marks the set complete
    return sidecar


def outputs_of(name: str, out_dir: Path) -> list[Path]:
    """The files a job named `name` writes into out_dir (the sidecar NAME.json last)."""
    return [out_dir / f"{name}{suffix}" for suffix in (".mp4", ".png", "_drift.png", ".json")]


def complete(name: str, out_dir: Path) -> bool:
    """True when an earlier run finished job `name`: its sidecar, written last, and its video are there."""
    return (out_dir / f"{name}.json").is_file() and (out_dir / f"{name}.mp4").is_file()


def read_jobs(manifest: str, settings: SampleSettings) -> list[Job]:
    """Rows of a .jsonl manifest (fields of Job, all optional) -> jobs; relative paths are taken relative to the
    manifest's folder. A bad row is a one-line ConfigError naming the file, line and field."""
    path = Path(manifest)
    if not path.is_file():
        raise ConfigError(f"{path}: manifest not found")
    root = path.parent
    types = {f.name: f.type for f in fields(Job)}
    jobs, names = [], set()
    try:
        rows = list(iter_jsonl(path))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for line_no, row in rows:
        where = f"{path}: line {line_no}"
        unknown = sorted(set(row) - set(types))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(types)})")
        for field, value in row.items():
            check_type(f"{where}: {field}", value, types[field])
        if row.get("seed", 0) < 0 or row.get("first_frames", 1) < 1:
            raise ConfigError(f"{where}: seed must be >= 0 and first_frames >= 1")
        if row.get("first_image") and row.get("first_video"):
            raise ConfigError(f"{where}: give first_image or first_video, not both")
        source = row.get("first_image") or row.get("first_video")
        name = row.get("name") or f"{len(jobs):05d}" + (f"_{Path(source).stem}" if source else "")
        try:
            plain_name(name, "name")
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        if name in names:
            raise ConfigError(f"{where}: duplicate name {name!r}")
        names.add(name)
        jobs.append(Job(
            name=name, prompt=row.get("prompt", settings.prompt), seed=row.get("seed", settings.seed),
            first_image=str(root / row["first_image"]) if row.get("first_image") else None,
            first_video=str(root / row["first_video"]) if row.get("first_video") else None,
            first_frames=row.get("first_frames", settings.first_frames),
            prompts=check_prompts(row["prompts"], f"{where}: prompts") if "prompts" in row else settings.prompts,
        ))
    return jobs


def default_out_dir(args) -> Path:
    """outputs/<config stem>/samples; with only --ckpt, the run's name (outputs/RUN/checkpoints/step_N) or the
    save_pretrained folder's name stands for the stem."""
    if args.config:
        return Path("outputs") / Path(args.config).stem / "samples"
    ckpt = Path(args.ckpt).resolve()
    return Path("outputs") / (ckpt.name if (ckpt / PIPELINE_CONFIG).is_file() else ckpt.parent.parent.name) / "samples"


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
                     fps=args.fps, crf=args.crf, seed=args.seed, sampler=args.sampler, num_steps=args.num_steps,
                     cfg_scale=args.cfg_scale, mode=args.mode, eval_len=args.eval_len, dtype=args.dtype,
                     compile=args.compile, prompts=args.prompts, recache_on_switch=args.recache_on_switch,
                     cache_dtype=args.cache_dtype, deblock=args.deblock)
    with one_line_errors():
        config_path = str(args.config or pretrained_config_path(args.ckpt))
        cfg = load_config(config_path, args.cfg_options)
        settings = SampleSettings.from_cfg(cfg.get("sample"), overrides)
        check_flags_apply(args, settings)
        if args.manifest:
            jobs = read_jobs(args.manifest, settings)[rank::world]
        else:
            source = settings.first_image or settings.first_video
            name = args.name or (Path(source).stem if source else "sample")
            try:
                plain_name(name, "--name")
            except ValueError as err:
                raise ConfigError(str(err)) from None
            jobs = [Job(name, settings.prompt, settings.seed, settings.first_image, settings.first_video,
                        settings.first_frames, settings.prompts)]
        out_dir = writable_dir(args.out or default_out_dir(args), "--out" if args.out else "the output folder")
        earlier = [path for path in outputs_of(jobs[0].name, out_dir) if path.exists()] if jobs else []
        if not args.manifest and earlier and not args.overwrite:
            raise ConfigError(f"{earlier[0]}: exists (an earlier sample); pass --overwrite to replace it, or choose "
                              "another --name or --out")
        log.info(estimate_line(cfg, "sample", device.type, 1, cfg_scale=settings.cfg_scale))
        pipe = CausalVDMPipeline.from_config(cfg, settings, device, progress=rank == 0)

    try:
        failed = run_jobs(jobs, pipe, out_dir, config_path, args)
    except KeyboardInterrupt:  # finished videos are whole; the one in progress has no sidecar and its mp4 was dropped
        log.error("interrupted: a rerun of the same --manifest redoes only the unfinished videos; a single video "
                  "needs --overwrite if some of its files were written")
        return 130
    if failed:
        log.error("%d of %d videos failed", failed, len(jobs))
    return 1 if failed else 0


def run_jobs(jobs: list[Job], pipe: CausalVDMPipeline, out_dir: Path, config_path: str, args) -> int:
    """Generate each job not finished by an earlier run (batch mode) -> the number that failed."""
    failed = 0
    for job in jobs:
        if args.manifest and not args.overwrite and complete(job.name, out_dir):
            log.info("%s: done in an earlier run, skipped", job.name)
            continue
        try:
            sidecar = run_job(job, pipe, out_dir, config_path)
        except (VideoReadError, ValueError, OSError) as err:  # a bad given image or video, too short, a full disk
            if debugging():
                raise
            if not args.manifest:
                sys.exit(f"error: {error_line(err)}")
            log.error("%s: %s", job.name, error_line(err))
            failed += 1
            continue
        print(f"{out_dir / sidecar['video']}: {sidecar['frames']} frames in {sidecar['total_seconds']:.1f}s")
    return failed


if __name__ == "__main__":
    sys.exit(main())
