"""The caption demo's plan and report (tools/demo_videos.py) around a real sampler run of a tiny caption model."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import causalvdm
from causalvdm.cli import demo_videos, sample
from causalvdm.config import load_config
from causalvdm.eval.metrics import nearest_psnr, psnr, token_grid_ratio
from causalvdm.models.utils import randomize_weights
from conftest import write_video

CONFIG = """
model = dict(type="CausalSTDiT", in_channels=12, hidden_size=32, depth=1, num_heads=2, mlp_ratio=2.0,
             caption_channels=8, model_max_length=6, tpe_mode="cyclic", max_tpe_len=9, output_refine=4)
vae = dict(type="PixelVAE", factor=2)
text_encoder = dict(type="WordHashEncoder", output_dim=8, model_max_length=6)
diffusion = dict(type="IDDPM", prediction_type="sample")
autoregressive = dict(chunk_size=4, max_cond_frames=5)
sample = dict(sampler="ddim", num_steps=2, num_frames=13, fps=6, image_size=(16, 16))
"""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Two 13-frame shots with captions, a random caption model, and the sampler's videos of the demo's plan."""
    root = tmp_path_factory.mktemp("demo")
    rng = np.random.default_rng(0)
    clips = root / "clips"
    clips.mkdir()
    for name, caption in (("sky", "a blue sky"), ("road", "a red car on a road")):
        base = rng.integers(0, 255, (1, 16, 24, 3))
        frames = np.clip(base + np.arange(13)[:, None, None, None] * rng.integers(-6, 6, (1, 1, 1, 3)), 0, 255)
        write_video(clips / f"{name}.mp4", frames.astype(np.uint8))
        with open(clips / "captions.jsonl", "a") as f:
            f.write(json.dumps({"path": f"{name}.mp4", "caption": caption}) + "\n")
    (root / "cfg.py").write_text(CONFIG)
    model = randomize_weights(causalvdm.build_model(load_config(root / "cfg.py").model), seed=0)
    (root / "ckpt").mkdir()
    for weights in ("model", "ema"):
        save_file(model.state_dict(), str(root / "ckpt" / f"{weights}.safetensors"))
    jobs, samples = root / "videos.jsonl", root / "samples"
    assert demo_videos.main(["plan", "--clips", str(clips / "captions.jsonl"), "--switch-at", "5",
                             "--out", str(jobs)]) == 0
    assert sample.main([str(root / "cfg.py"), "--ckpt", str(root / "ckpt"), "--manifest", str(jobs),
                        "--out", str(samples)]) == 0
    return root


def test_plan_continues_each_shot_and_switches_to_the_next(demo_run):
    rows = [json.loads(line) for line in (demo_run / "videos.jsonl").read_text().splitlines()]
    clips = demo_run / "clips"
    assert rows == [
        dict(name="sky", first_video=str(clips / "sky.mp4"), prompt="a blue sky"),
        dict(name="road", first_video=str(clips / "road.mp4"), prompt="a red car on a road"),
        dict(name="sky_to_road", first_video=str(clips / "sky.mp4"), prompt="a blue sky",
             prompts=[dict(frame=5, prompt="a red car on a road")]),
        dict(name="road_to_sky", first_video=str(clips / "road.mp4"), prompt="a red car on a road",
             prompts=[dict(frame=5, prompt="a blue sky")]),
    ]
    switched = json.loads((demo_run / "samples" / "sky_to_road.json").read_text())
    assert switched["settings"]["prompts"] == [dict(frame=5, prompt="a red car on a road")]


def test_report_measures_the_sampled_videos(demo_run, capsys):
    samples, clips = demo_run / "samples", demo_run / "clips"
    assert demo_videos.main(["report", "--clips", str(clips / "captions.jsonl"), "--samples", str(samples),
                             "--switch-at", "5"]) == 0
    report = json.loads((samples / "report.json").read_text())
    real = {name: demo_videos.read_pixels(clips / f"{name}.mp4", (16, 16)) for name in ("sky", "road")}
    sky = report["shots"][0]
    sidecar = json.loads((samples / "sky.json").read_text())
    psnr = dict(zip(sidecar["metrics"]["frames"], sidecar["metrics"]["psnr"]))
    assert sky["name"] == "sky" and sky["token"] == [4, 4]  # PixelVAE factor 2 x 2x2 patches
    assert [s["frames"] for s in sky["spans"]] == [[1, 16]]  # 13 frames: the later spans have no frames
    assert sky["spans"][0]["psnr"] == pytest.approx(np.mean([psnr[f] for f in range(1, 13)]))
    video = demo_videos.read_pixels(samples / "sky.mp4")
    assert sky["token_grid"] == token_grid_ratio(video[1:], (4, 4)).tolist()
    assert sky["token_grid_real"] == token_grid_ratio(real["sky"], (4, 4)).tolist()
    switch = report["switches"][0]
    assert switch["name"] == "sky_to_road" and [r["frames"] for r in switch["chunks"]] == [[1, 4], [5, 8], [9, 12]]
    to_new = nearest_psnr(demo_videos.read_pixels(samples / "sky_to_road.mp4"), real["road"])
    assert switch["chunks"][1]["psnr_new"] == pytest.approx(float(to_new[5:9].mean()))
    assert switch["rise_new"] == pytest.approx(max(switch["chunks"][1]["psnr_new"], switch["chunks"][2]["psnr_new"])
                                               - switch["chunks"][0]["psnr_new"])
    assert torch.isfinite(torch.tensor(switch["psnr_old"])).all()
    out = capsys.readouterr().out
    assert "sky_to_road at frame 5" in out and "road_to_sky at frame 5" in out


def test_report_errors_name_the_file(demo_run, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"path": "sky.mp4", "caption": "a blue sky"}) + "\n")
    with pytest.raises(SystemExit, match="a switch needs at least two shots, got 1"):
        demo_videos.main(["plan", "--clips", str(one), "--out", str(tmp_path / "v.jsonl")])
    with pytest.raises(SystemExit, match="sky.json"):
        demo_videos.main(["report", "--clips", str(demo_run / "clips" / "captions.jsonl"), "--samples",
                          str(tmp_path)])


def test_forced_makes_each_chunk_from_the_real_past(demo_run, capsys):
    clips, ckpt, out = demo_run / "clips", demo_run / "ckpt", demo_run / "forced.json"
    (ckpt / "config.py").write_text((demo_run / "cfg.py").read_text())
    assert demo_videos.main(["forced", "--clips", str(clips / "captions.jsonl"), "--ckpt", str(ckpt),
                             "--out", str(out), "--seed", "3"]) == 0
    sky = json.loads(out.read_text())["shots"][0]
    assert sky["name"] == "sky" and [c["frames"] for c in sky["chunks"]] == [[1, 4], [5, 8], [9, 12]]
    assert sky["token"] == [4, 4]  # PixelVAE factor 2 x 2x2 patches
    real = demo_videos.read_pixels(clips / "sky.mp4", (16, 16))
    pipe = causalvdm.CausalVDMPipeline.from_pretrained(ckpt)
    for chunk in sky["chunks"][:2]:  # past frames that all fit the cache: the sampler's own way in, from the file
        start = chunk["frames"][0]
        video = pipe(first_video=str(clips / "sky.mp4"), first_frames=start, num_frames=start + 4,
                     prompt="a blue sky", seed=3)
        made, truth = torch.from_numpy(video[start:]), real[start:start + 4]
        assert chunk["psnr"] == pytest.approx(float(psnr(made, truth).mean()), abs=1e-4)
        assert chunk["psnr_repeat_last"] == pytest.approx(float(psnr(real[start - 1:start].expand_as(truth),
                                                                     truth).mean()))
        assert chunk["token_grid"] == token_grid_ratio(made, (4, 4)).tolist()
        assert chunk["token_grid_real"] == token_grid_ratio(truth, (4, 4)).tolist()
    grid = max(g for c in sky["chunks"] for g in c["token_grid"])
    grid_real = max(g for c in sky["chunks"] for g in c["token_grid_real"])
    assert f"token grid max {grid:.2f} / real {grid_real:.2f}" in capsys.readouterr().out
