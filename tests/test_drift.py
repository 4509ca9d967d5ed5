"""Drift monitor (statistics by hand, the band rule, one warning per statistic; pipeline and CLI outputs) and the
readable contact sheet (tile size, real row, frame numbers, bounded memory)."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_sampling import sample_setup  # noqa: F401  (a fixture: tiny config, checkpoints, image, video)

from causalvdm.eval.metrics import token_grid_ratio
from causalvdm.sampling.drift import BAND_FLOORS, DriftMonitor, frame_values, reference_band
from causalvdm.sampling.writer import LABEL_HEIGHT, ContactSheetCollector


def _grey(values) -> np.ndarray:
    """A grey frame (H, W, 3) uint8 from values (H, W)."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=2)


def test_statistics_by_hand():
    constant = np.empty((6, 5, 3), np.uint8)
    constant[:] = (100, 50, 25)
    ramp = _grey(np.tile(10 * np.arange(8), (8, 1)))  # 0, 10, ..., 70 along x: a linear ramp has no Laplacian
    parabola = _grey(np.tile(np.arange(16) ** 2, (6, 1)))  # x^2: Laplacian (x+1)^2 + (x-1)^2 - 2x^2 = 2
    checker = _grey(255 * (np.indices((6, 6)).sum(0) % 2))  # Laplacian 4 * 255 - 8v = +-1020
    red_checker = checker.copy()
    red_checker[..., 1:] = 0  # luma 0.299 * 255 on the bright squares
    v = frame_values(np.stack([constant]))
    assert v["mean"] == [[100.0, 50.0, 25.0]] and v["std"] == [[0.0, 0.0, 0.0]]
    assert v["sharpness"] == [0.0] and v["change"] == [None]  # no frame before the first
    v = frame_values(np.stack([ramp, ramp]))
    assert v["mean"][0] == pytest.approx([35.0] * 3) and v["std"][0] == pytest.approx([10 * math.sqrt(5.25)] * 3)
    assert v["sharpness"] == pytest.approx([0.0, 0.0], abs=1e-9) and v["change"][1] == 0.0
    sharp = [frame_values(f[None])["sharpness"][0] for f in (parabola, checker, red_checker)]
    assert sharp == pytest.approx([2.0, 1020.0, 4 * 0.299 * 255])
    # change: against `previous` for the first frame, then frame to frame; half the pixels +40 -> 20
    dark, light = _grey(np.full((4, 4), 10)), _grey(np.full((4, 4), 30))
    half = light.copy()
    half[:2] += 40
    assert frame_values(np.stack([light, half]), previous=dark)["change"] == [20.0, 20.0]


def _smooth(size: int = 64, shift: int = 0) -> np.ndarray:
    """A smooth photograph-like grey frame (size, size, 3) uint8, panned by `shift` pixels."""
    y, x = np.mgrid[:size, :size].astype(np.float64) + np.array([0, shift])[:, None, None]
    return _grey(np.round(128 + 60 * np.sin(x / 7) + 50 * np.cos(y / 9)))


def _tiled(frame: np.ndarray, token: int, spread: float, seed: int) -> np.ndarray:
    """`frame` with an offset of its own on each token x token square, as a model whose tokens err independently."""
    rng = np.random.default_rng(seed)
    h, w = frame.shape[:2]
    offsets = np.kron(rng.normal(0, spread, (h // token, w // token)), np.ones((token, token)))
    return np.clip(np.round(frame.astype(np.float64) + offsets[..., None]), 0, 255).astype(np.uint8)


def test_token_grid_ratio_by_hand():
    """Border step / inner step of luma: 1 with no grid; the steps of a known image counted by hand."""
    smooth, flat = _smooth(), _grey(np.full((16, 16), 90))
    assert token_grid_ratio(torch.from_numpy(smooth[None]), (8, 8)).item() == pytest.approx(1.0, abs=0.1)
    assert token_grid_ratio(torch.from_numpy(flat[None]), (8, 8)).item() == 1.0
    # a 16x16 frame of two 8-wide halves, 0 and 80: 16 border steps of 80 across x, every other step 0
    halves = _grey(np.repeat([[0] * 8 + [80] * 8], 16, axis=0))
    border, inner = 16 * 80 / (16 + 16), 0.0  # 16 rows x 1 border column, 16 columns x 1 border row
    expected = (border + 1e-3) / (inner + 1e-3)
    assert token_grid_ratio(torch.from_numpy(halves[None]), (8, 8)).item() == pytest.approx(expected)
    assert math.isnan(token_grid_ratio(torch.from_numpy(flat[None, :8, :8]), (8, 8)).item())  # one token: no border
    tiled = [token_grid_ratio(torch.from_numpy(_tiled(smooth, 8, spread, 0)[None]), (8, 8)).item()
             for spread in (2.0, 6.0, 12.0)]
    assert 1.05 < tiled[0] < tiled[1] < tiled[2] and tiled[2] > 1.5  # grows with the offsets' size


def test_monitor_bands_token_grid_from_the_given_frames(caplog):
    given = np.stack([_smooth(shift=k) for k in range(8)])  # eight real frames, panning
    monitor = DriftMonitor(token=(8, 8))
    monitor.add(given, given=True)
    clean = monitor.add(np.stack([_smooth(shift=k) for k in range(8, 12)]))
    with caplog.at_level(logging.WARNING, logger="causalvdm.drift"):
        tiled = monitor.add(np.stack([_tiled(_smooth(shift=k), 8, 12.0, k) for k in range(12, 16)]))
    low, high = monitor.summary()["band"]["token_grid"]
    assert low < 1.0 < high and high - low >= 2 * BAND_FLOORS["token_grid"] - 1e-12
    assert clean["token_grid"] == pytest.approx(1.0, abs=0.1) and "token_grid" not in clean["out_of_band"]
    assert tiled["token_grid"] > high and "token_grid" in tiled["out_of_band"]
    assert "drift: token_grid left its reference band at chunk 1" in caplog.text
    assert "token_grid" not in DriftMonitor().add(given, given=True)  # without a token size: not measured


def test_band_rule():
    band = reference_band([1.0, 2.0, 3.0, 4.0], k=3.0, floor=0.0)  # mean 2.5, population std sqrt(1.25)
    np.testing.assert_allclose(band, [[2.5 - 3 * math.sqrt(1.25), 2.5 + 3 * math.sqrt(1.25)]])
    assert reference_band([1.0, 2.0, 3.0, 4.0], k=3.0, floor=5.0).tolist() == [[-2.5, 7.5]]
    assert reference_band([[1, 10], [3, 10]], k=1.0, floor=0.5).tolist() == [[1.0, 3.0], [9.5, 10.5]]  # per column

    # 8 given frames of grey 100..107: mean 103.5, 3 x std 6.87 < the floor of 8 -> [95.5, 111.5]
    monitor = DriftMonitor()
    monitor.add(np.stack([_grey(np.full((4, 4), 100 + i)) for i in range(8)]), given=True)
    assert monitor.band is None  # known once the given frames are done, at the first generated chunk
    monitor.add(np.stack([_grey(np.full((4, 4), 103))] * 4))
    assert monitor.reference_count == 8
    np.testing.assert_allclose(monitor.band["mean"], [[95.5, 111.5]] * 3)
    np.testing.assert_allclose(monitor.band["std"], [[-BAND_FLOORS["std"], BAND_FLOORS["std"]]] * 3)
    # change: 7 pairs of 1 grey level -> mean 1, std 0 -> 1 +- 3
    np.testing.assert_allclose(monitor.band["change"], [[1 - BAND_FLOORS["change"], 1 + BAND_FLOORS["change"]]])
    with pytest.raises(ValueError, match="before"):
        monitor.add(_grey(np.zeros((4, 4)))[None], given=True)


@pytest.mark.parametrize("given, reference", [(0, 8), (1, 8), (10, 10)])
def test_reference_frames(given, reference):
    """The given frames when there are enough of them, else the first 8 frames of the video, given ones first."""
    rng = np.random.default_rng(0)
    monitor = DriftMonitor()
    if given:
        monitor.add(rng.integers(0, 256, (given, 8, 8, 3), dtype=np.uint8), given=True)
    for _ in range(3):
        monitor.add(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    summary = monitor.summary()
    assert summary["reference_frames"] == reference and summary["band"] is not None
    assert [c["chunk"] for c in summary["chunks"]] == [None] * bool(given) + [0, 1, 2]
    assert summary["chunks"][-1]["start"] == given + 8


def _video(brighten: int, chunks: int = 12, seed: int = 0):
    """Given frames, then chunks of 4 frames of one textured scene plus noise, `brighten` grey levels more each chunk."""
    rng = np.random.default_rng(seed)
    scene = rng.integers(40, 120, (16, 16, 3))

    def frames(n, level):
        return (scene + level + rng.integers(-3, 4, (n, 16, 16, 3))).clip(0, 255).astype(np.uint8)

    yield frames(2, 0), True
    for c in range(chunks):
        yield frames(4, brighten * c), False


@pytest.mark.parametrize("brighten", [0, 6])
def test_one_warning_per_statistic(brighten, caplog):
    """A video getting brighter chunk by chunk: the mean leaves its band once, one warning line; a stable one: none."""
    monitor = DriftMonitor()
    with caplog.at_level(logging.WARNING, logger="causalvdm.drift"):
        for frames, given in _video(brighten):
            monitor.add(frames, given=given)
    summary = json.loads(json.dumps(monitor.summary()))  # JSON-ready as the sidecar stores it
    warnings = [r.getMessage() for r in caplog.records if r.name == "causalvdm.drift"]
    if not brighten:
        assert warnings == [] and summary["left_band"] == {}
        assert all(c["out_of_band"] == [] for c in summary["chunks"])
        return
    assert len(warnings) == 1 and warnings[0].startswith("drift: mean left its reference band at chunk"), warnings
    first = summary["left_band"]["mean"]["chunk"]
    assert first >= 2 and f"chunk {first} " in warnings[0]
    flagged = [c["chunk"] for c in summary["chunks"] if "mean" in c["out_of_band"]]
    assert flagged == list(range(first, 12))  # every later chunk is marked, only the first is logged
    assert all(c["out_of_band"] in ([], ["mean"]) for c in summary["chunks"])


def test_monitor_memory_is_constant():
    """1,000 frames: per-chunk numbers only; the one array held is the last frame (for the next chunk's change)."""
    rng = np.random.default_rng(0)
    monitor = DriftMonitor()
    chunk = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    for _ in range(125):
        monitor.add(chunk)
    assert len(monitor.chunks) == 125 and monitor.chunks[-1]["start"] == 992
    arrays = [v for v in vars(monitor).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 1 and arrays[0].shape == (32, 32, 3)


# ------------------------------------------------------------------------------------------- contact sheet
def _tiles(sheet: np.ndarray, rows: int, columns: int, tile: int, pad: int = 4):
    """Tile (r, c) of a contact sheet and the label strip under it."""
    cell = tile + LABEL_HEIGHT
    out = {}
    for r in range(rows):
        for c in range(columns):
            top, left = pad + r * (cell + pad), pad + c * (tile + pad)
            out[r, c] = sheet[top:top + tile, left:left + tile], sheet[top + tile:top + cell, left:left + tile]
    return out


def test_contact_sheet_tiles_real_row_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (13, 16, 16, 3), dtype=np.uint8)
    real = rng.integers(0, 256, (11, 16, 16, 3), dtype=np.uint8)  # the reference ends two frames early
    collector = ContactSheetCollector(13, count=4)
    collector.add(video[:1], real=real[:1], given=True)
    for start in range(1, 13, 4):
        collector.add(video[start:start + 4], real=real[start:start + 4])
    assert sorted(collector.frames) == [0, 4, 8, 12] and sorted(collector.real) == [0, 4, 8]
    collector.save(tmp_path / "sheet.png", columns=4)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    tile = 128  # 16 px frames, upscaled 8x (nearest) to reach 128 on the short side
    assert sheet.shape == (2 * (tile + LABEL_HEIGHT) + 3 * 4, 4 * tile + 5 * 4, 3)
    tiles = _tiles(sheet, 2, 4, tile)
    for c, i in enumerate([0, 4, 8, 12]):
        np.testing.assert_array_equal(tiles[1, c][0], video[i].repeat(8, 0).repeat(8, 1))  # generated row below
        if i in collector.real:
            np.testing.assert_array_equal(tiles[0, c][0], real[i].repeat(8, 0).repeat(8, 1))  # real row above
        for r in (0, 1):
            assert tiles[r, c][1].std() > 10  # the frame number is written under every tile
    assert (tiles[0, 3][0] == 224).all()  # no real frame 12: a blank tile
    long = ContactSheetCollector(16, count=8)
    long.add(video[:8], real=real[:4])
    long.add(video[5:13])
    long.save(tmp_path / "long.png", columns=4)  # the second row of 4 frames has no real ones: no real row above it
    assert Image.open(tmp_path / "long.png").size[1] == 3 * (tile + LABEL_HEIGHT) + 4 * 4

    # without real frames: one row, no real row; frames of 200x300 keep their size
    plain = ContactSheetCollector(3, count=3)
    plain.add(rng.integers(0, 256, (3, 200, 300, 3), dtype=np.uint8))
    plain.save(tmp_path / "plain.png", columns=4)
    assert Image.open(tmp_path / "plain.png").size == (3 * 300 + 4 * 4, 200 + LABEL_HEIGHT + 2 * 4)


def test_contact_sheet_memory_is_bounded():
    """999 frames and their real ones offered 8 at a time: 8 of each kept, the evenly spaced ones."""
    collector = ContactSheetCollector(999)
    for start in range(0, 999, 8):
        frames = np.full((min(8, 999 - start), 8, 8, 3), 0, np.uint8)
        frames[:, 0, 0, 0] = np.arange(start, start + len(frames)) % 256  # each frame knows its index
        collector.add(frames, real=frames[:5])
    assert sorted(collector.frames) == collector.indices and len(collector.indices) == 8
    assert collector.indices[0] == 0 and collector.indices[-1] == 998
    assert all(collector.frames[i][0, 0, 0] == i % 256 for i in collector.indices)
    assert set(collector.real) <= set(collector.indices)


# ------------------------------------------------------------------------------------------- pipeline + CLI
def test_pipeline_and_cli_drift_outputs(sample_setup, tmp_path):
    """pipe.info["drift"] holds one record per chunk (PSNR where real frames exist); the CLI writes NAME_drift.png,
    the sidecar's drift record and a contact sheet with the real frames above the generated ones."""
    from causalvdm import CausalVDMPipeline
    from causalvdm.cli.sample import main
    from causalvdm.config import load_config
    from causalvdm.pipeline import SampleSettings

    root = sample_setup
    cfg = load_config(root / "cfg2.py")
    pipe = CausalVDMPipeline.from_config(cfg, SampleSettings.from_cfg(cfg.sample, dict(ckpt=str(root / "ckpt2"))))
    chunks = list(pipe.iter_chunks(first_video=root / "real.mp4", first_frames=2, num_frames=14, seed=1))
    drift = pipe.info["drift"]
    assert [(c["start"], c["frames"], c["given"]) for c in drift["chunks"]] == [
        (0, 2, True), (2, 4, False), (6, 4, False), (10, 4, False)]
    assert drift["chunks"] is pipe.drift.chunks and drift["reference_frames"] == 8 and drift["band"] is not None
    assert drift["chunks"][0]["psnr"] is None and all(c["psnr"] is not None for c in drift["chunks"][1:])
    assert np.mean(pipe.info["metrics"]["psnr"][:4]) == pytest.approx(drift["chunks"][1]["psnr"])
    mean = frame_values(np.concatenate(chunks)[2:6])["mean"]
    assert drift["chunks"][1]["mean"] == pytest.approx(np.mean(mean, axis=0).tolist())
    grid = token_grid_ratio(torch.from_numpy(np.concatenate(chunks)[2:6]), (4, 4))  # PixelVAE x2, 2x2 patch
    assert drift["chunks"][1]["token_grid"] == pytest.approx(grid.mean().item()) and "token_grid" in drift["band"]
    assert sorted(pipe.contact_sheet.real) == sorted(pipe.contact_sheet.frames)  # the 20-frame video covers all 14

    assert main([str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--first-video", str(root / "real.mp4"),
                 "--first-frames", "2", "--seed", "1", "--out", str(tmp_path), "--name", "vid"]) == 0
    sidecar = json.loads((tmp_path / "vid.json").read_text())
    assert sidecar["drift_plot"] == "vid_drift.png" and list(sidecar)[-1] == "drift"
    assert sidecar["drift"]["chunks"] == json.loads(json.dumps(drift["chunks"]))  # same numbers as the Python API
    assert Image.open(tmp_path / "vid_drift.png").size[1] > 400  # five panels (mean, std, sharpness, change, psnr)
    sheet = Image.open(tmp_path / "vid.png")
    assert sheet.size == (4 * 128 + 5 * 4, 4 * (128 + LABEL_HEIGHT) + 5 * 4)  # 8 frames: 2 x (real row + generated)

    assert main([str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--first-image", str(root / "first.png"),
                 "--out", str(tmp_path), "--name", "img"]) == 0
    assert Image.open(tmp_path / "img.png").size == (4 * 128 + 5 * 4, 2 * (128 + LABEL_HEIGHT) + 3 * 4)  # no real row
    assert (tmp_path / "img_drift.png").is_file()
