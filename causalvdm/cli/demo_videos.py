"""The caption demo's videos: which ones to generate, and how close each came to the real shots.

    python tools/demo_videos.py plan --clips data/demo_long/captions.jsonl --out outputs/demo/samples/videos.jsonl
    bash scripts/sample.sh --ckpt CKPT --manifest outputs/demo/samples/videos.jsonl --out outputs/demo/samples
    python tools/demo_videos.py report --clips data/demo_long/captions.jsonl --samples outputs/demo/samples

`plan` writes the sampler's --manifest: each shot continued from its first frame under its own caption, and each
shot switched at --switch-at to the next shot's caption (the last to the first). `report` reads what the sampler
wrote (NAME.mp4 and NAME.json) and prints, per shot, PSNR against its real frames beside repeating the first frame
and the token-grid ratio of every generated frame beside the real frames'; per switch, how close the frames come to
the new caption's shot (PSNR against its nearest real frame) in the chunk before the switch and in the two after.
It writes it all to SAMPLES/report.json.

    python tools/demo_videos.py forced --clips data/demo_long/captions.jsonl --ckpt CKPT --out outputs/demo/forced.json

`forced` tells a model that never learned the shots from one whose own frames lead it astray: it makes every chunk
of every shot from that shot's real past frames (as many as the cache holds) under its caption, and prints each
chunk's PSNR against its real frames beside repeating the last real frame before it. Below that copy, the model has
not learned the shots; above it but with the continuation below, its own frames are what it goes wrong on. It also
keeps the token-grid ratio of every made frame beside the real frame's: tokens that show given the real past are the
model's own, not its drift's.
"""

import json
import logging
import sys
from pathlib import Path

import torch

from causalvdm.cli.common import USER_ERRORS, ArgumentParser, one_line_errors, output_file, positive_int
from causalvdm.data import read_manifest, video_transform
from causalvdm.data.video_io import iter_video_frames
from causalvdm.eval.metrics import nearest_psnr, psnr, token_grid_ratio
from causalvdm.pipeline import CausalVDMPipeline
from causalvdm.utils.io import write_json

log = logging.getLogger("causalvdm.demo")

SPANS = ((1, 16, "memorised window"), (17, 33, "beyond it"), (34, 50, "beyond it"))


def switch_name(old: str, new: str) -> str:
    """The video name of a switch from shot `old` to shot `new` (file stems)."""
    return f"{old}_to_{new}"


def plan(clips: list[dict], root: Path, switch_at: int) -> list[dict]:
    """Sampler manifest rows: one continuation per shot, then one switch from each shot to the next one."""
    rows = [dict(name=Path(c["path"]).stem, first_video=str(root / c["path"]), prompt=c["caption"]) for c in clips]
    for old, new in zip(clips, clips[1:] + clips[:1]):
        rows.append(dict(name=switch_name(Path(old["path"]).stem, Path(new["path"]).stem),
                         first_video=str(root / old["path"]), prompt=old["caption"],
                         prompts=[dict(frame=switch_at, prompt=new["caption"])]))
    return rows


def read_pixels(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Every frame of a video as uint8 (T, H, W, 3); resized and centre-cropped to `size` as the sampler does."""
    frames = torch.stack([torch.from_numpy(f) for f in iter_video_frames(path)])
    if size is None or tuple(frames.shape[1:3]) == size:
        return frames
    pixels = video_transform(frames, size)  # (3, T, H, W) in [-1, 1]
    return ((pixels.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def shot_report(name: str, samples: Path, real: torch.Tensor) -> dict:
    """PSNR spans and token-grid ratios of the continuation NAME against its real frames (T, H, W, 3)."""
    sidecar = json.loads((samples / f"{name}.json").read_text(encoding="utf-8"))
    metrics, token = sidecar["metrics"], tuple(sidecar["drift"]["token"])
    spans = []
    for first, last, what in SPANS:
        pairs = [(g, b) for f, g, b in zip(metrics["frames"], metrics["psnr"], metrics["psnr_repeat_last"])
                 if first <= f <= last]
        if pairs:
            generated, repeat = (sum(v) / len(pairs) for v in zip(*pairs))
            spans.append(dict(frames=[first, last], what=what, psnr=generated, psnr_repeat_first=repeat))
    video = read_pixels(samples / f"{name}.mp4")
    given = sidecar["given_frames"]
    return dict(name=name, spans=spans, token=list(token),
                token_grid=token_grid_ratio(video[given:], token).tolist(),
                token_grid_real=token_grid_ratio(real[:len(video)], token).tolist())


def switch_report(name: str, samples: Path, old: torch.Tensor, new: torch.Tensor, switch_at: int, chunk: int) -> dict:
    """Per-chunk PSNR of the switch video NAME against the nearest real frame of the old and of the new shot."""
    video = read_pixels(samples / f"{name}.mp4")
    to_old, to_new = nearest_psnr(video, old), nearest_psnr(video, new)
    windows = [("before", switch_at - chunk), ("chunk 1 after", switch_at), ("chunk 2 after", switch_at + chunk)]
    rows = [dict(window=label, frames=[start, start + chunk - 1], psnr_new=float(to_new[start:start + chunk].mean()),
                 psnr_old=float(to_old[start:start + chunk].mean())) for label, start in windows]
    rise = max(r["psnr_new"] for r in rows[1:]) - rows[0]["psnr_new"]
    return dict(name=name, switch_at=switch_at, chunks=rows, rise_new=rise,
                psnr_new=to_new.tolist(), psnr_old=to_old.tolist())


def forced_report(pipe: CausalVDMPipeline, name: str, real: torch.Tensor, caption: str, seed: int) -> dict:
    """Every chunk of the shot `real` (T, H, W, 3) uint8 made from its real past frames (at most the cache's
    max_cond_frames) -> dict(name, token, chunks=[dict(frames=[first, last], psnr, psnr_repeat_last, token_grid,
    token_grid_real)]): mean PSNRs in dB, and the token-grid ratio of each made frame and of the real one."""
    k, context = pipe.autoregressive.chunk_size, pipe.autoregressive.max_cond_frames
    token = pipe.token_pixels
    pixels = real.permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W) in [-1, 1], as the pipeline takes them
    chunks = []
    for start in range(1, real.shape[0] - k + 1, k):
        first = max(0, start - context)
        video = pipe(first_video=pixels[:, first:start + k], first_frames=start - first,
                     num_frames=start - first + k, prompt=caption, seed=seed)
        made, truth = torch.from_numpy(video[start - first:]), real[start:start + k]
        chunks.append(dict(frames=[start, start + k - 1], psnr=float(psnr(made, truth).mean()),
                           psnr_repeat_last=float(psnr(real[start - 1:start].expand_as(truth), truth).mean()),
                           token_grid=token_grid_ratio(made, token).tolist(),
                           token_grid_real=token_grid_ratio(truth, token).tolist()))
    return dict(name=name, token=list(token), chunks=chunks)


def print_forced(shots: list[dict]) -> None:
    """Per shot, each chunk's PSNR made from the real past / repeating the last real frame, their means, and the
    largest token-grid ratio of the made frames beside the real ones'."""
    for shot in shots:
        chunks = shot["chunks"]
        cells = " ".join(f"{c['frames'][0]}:{c['psnr']:.1f}/{c['psnr_repeat_last']:.1f}" for c in chunks)
        made, copy = (sum(c[key] for c in chunks) / len(chunks) for key in ("psnr", "psnr_repeat_last"))
        grid, grid_real = (max(g for c in chunks for g in c[key]) for key in ("token_grid", "token_grid_real"))
        print(f"{shot['name']:<24} mean {made:.2f}/{copy:.2f} dB   token grid max {grid:.2f} / real {grid_real:.2f}   "
              f"by first frame of the chunk: {cells}")


def print_report(report: dict) -> None:
    """The report as short tables on stdout."""
    print(f"{'shot':<24} " + "  ".join(f"{f'frames {a}-{b}':>15}" for a, b, _ in SPANS) + "   token grid, max")
    print(f"{'':<24} " + "  ".join(f"{'gen/repeat dB':>15}" for _ in SPANS) + "   generated / real")
    for shot in report["shots"]:
        spans = "  ".join(f"{s['psnr']:7.2f}/{s['psnr_repeat_first']:<7.2f}" for s in shot["spans"])
        print(f"{shot['name']:<24} {spans}   {max(shot['token_grid']):.2f} / {max(shot['token_grid_real']):.2f}")
    for switch in report["switches"]:
        cells = ", ".join(f"{r['window']} {r['psnr_new']:.2f} (old shot {r['psnr_old']:.2f})" for r in switch["chunks"])
        print(f"{switch['name']} at frame {switch['switch_at']}: PSNR to the new shot's nearest frame: {cells}; "
              f"rise {switch['rise_new']:+.2f} dB")


def main(argv=None) -> int:
    """`plan`, `report` or `forced` for the caption demo (see the module docstring) -> exit status."""
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "write the sampler's --manifest of the demo's videos"),
                       ("report", "compare the generated videos with the real shots"),
                       ("forced", "make each chunk of each shot from its real past frames and compare")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--clips", required=True, help="the shots the model learned: a .jsonl manifest of "
                         "{\"path\", \"caption\"} rows, paths relative to it (data/demo_long/captions.jsonl)")
        if name != "forced":
            sub.add_argument("--switch-at", type=positive_int, default=17, help="the frame where a switch video takes "
                             "the next shot's caption; it must start a chunk (default 17: chunk 4 after 1 given frame)")
    commands.choices["plan"].add_argument("--out", type=output_file, required=True, help="the manifest to write")
    report_args = commands.choices["report"]
    report_args.add_argument("--samples", required=True, help="the sampler's --out folder")
    report_args.add_argument("--chunk-size", type=positive_int, default=4, help="frames per chunk (default 4)")
    forced_args = commands.choices["forced"]
    forced_args.add_argument("--ckpt", required=True, help="the model: a checkpoint or pretrained folder")
    forced_args.add_argument("--out", type=output_file, required=True, help="the .json to write the figures to")
    forced_args.add_argument("--seed", type=int, default=0, help="noise seed of every chunk (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    clips_file = Path(args.clips)
    with one_line_errors(ValueError, prefix="--clips: "):
        clips = read_manifest(clips_file)
        if len(clips) < 2 and args.command != "forced":
            raise ValueError(f"{clips_file}: a switch needs at least two shots, got {len(clips)}")
    root = clips_file.parent
    if args.command == "plan":
        with open(args.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in plan(clips, root.resolve(), args.switch_at))
        log.info("wrote %s", args.out)
        return 0

    if args.command == "forced":
        with one_line_errors(*USER_ERRORS, ValueError, OSError):
            pipe = CausalVDMPipeline.from_pretrained(args.ckpt)
            shots = [forced_report(pipe, Path(c["path"]).stem, read_pixels(root / c["path"], pipe.image_size),
                                   c["caption"], args.seed) for c in clips]
        print_forced(shots)
        write_json(Path(args.out), dict(shots=shots))
        log.info("wrote %s", args.out)
        return 0

    samples = Path(args.samples)
    with one_line_errors(*USER_ERRORS, ValueError, KeyError, OSError):
        size = tuple(json.loads((samples / f"{Path(clips[0]['path']).stem}.json").read_text())["size"])
        real = {Path(c["path"]).stem: read_pixels(root / c["path"], size) for c in clips}
        names = list(real)
        report = dict(shots=[shot_report(n, samples, real[n]) for n in names],
                      switches=[switch_report(switch_name(old, new), samples, real[old], real[new], args.switch_at,
                                              args.chunk_size) for old, new in zip(names, names[1:] + names[:1])])
    print_report(report)
    write_json(samples / "report.json", report)
    log.info("wrote %s", samples / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
