"""Video evaluation (causalvdm.eval, tools/eval_video.py): the Fréchet distance against scipy's sqrtm and a closed
form, SSIM / PSNR against scikit-image's numbers, the TorchScript detector path with a tiny random network of I3D's
call interface, and the command line end to end, on its own and on videos made by batch sampling."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from causalvdm.cli import eval_video
from causalvdm.eval import (EvalSettings, FeatureExtractor, chunk_windows, evaluate, feature_stats, frame_stats,
                            frechet_distance, fvd, fvd_clip, list_videos, load_i3d, nearest_psnr, psnr, ssim)
from causalvdm.sampling.writer import StreamingVideoWriter
from causalvdm.utils.weights import CheckpointError
from conftest import run_entrypoint, run_in_parallel
from test_sampling import sample_setup  # noqa: F401  (a fixture: tiny config, checkpoint, real.mp4)


class TinyI3D(torch.nn.Module):
    """I3D's TorchScript call interface (B, 3, T, H, W) -> (B, 6) features, with random weights."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=3, stride=2)
        self.fc = torch.nn.Linear(8, 6)

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        if rescale:  # [0, 255] -> [-1, 1], as the I3D file does
            x = x / 127.5 - 1
        if resize:
            x = F.interpolate(x, size=[x.shape[2], 16, 16], mode="trilinear", align_corners=False)
        logits = self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))  # (B, 6)
        return logits if return_features else logits.softmax(dim=-1)


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "tiny_i3d.pt"
    torch.jit.script(TinyI3D().eval()).save(str(path))
    return path


def _features(seed, n=40, d=6, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * scale
    return rng.normal(size=(n, d)) @ mixing + shift  # (n, d), correlated


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    mu1, s1 = feature_stats(_features(0))
    mu2, s2 = feature_stats(_features(1, scale=1.5, shift=0.3))
    covmean = linalg.sqrtm(s1 @ s2)  # the pytorch-fid reference
    reference = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(reference, rel=1e-6)  # symmetric


def test_frechet_distance_closed_form_and_zero():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # diagonal covariances
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    for n in (40, 4):  # full rank, and singular (fewer samples than features)
        mu, sigma = feature_stats(_features(3, n=n))
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma * np.nan, mu, sigma)


def _smooth_pair():
    """Two 24x20 frames with structure (SSIM far from 0 and 1), and the same with Gaussian noise (sigma 20)."""
    yy, xx = np.mgrid[:24, :20]
    base = 128 + 80 * (np.sin(xx / 3.0) * np.cos(yy / 4.0))[..., None] * np.array([1, 0.5, -0.7])
    a = np.stack([base, base[::-1]]).clip(0, 255).astype(np.uint8)  # (2, 24, 20, 3)
    b = (a + np.random.default_rng(0).normal(0, 20, a.shape)).round().clip(0, 255).astype(np.uint8)
    return torch.from_numpy(a), torch.from_numpy(b)


def test_ssim_and_psnr_match_scikit_image():
    a, b = _smooth_pair()
    # skimage 0.26 structural_similarity(a[t], b[t], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    # data_range=255, channel_axis=-1) and peak_signal_noise_ratio(a[t], b[t], data_range=255), t = 0, 1
    torch.testing.assert_close(ssim(a, b), torch.tensor([0.5917820618916712, 0.5788903296080348], dtype=torch.float64),
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(psnr(a, b), torch.tensor([22.188182903363938, 22.0920781103504]), rtol=1e-6, atol=0)
    torch.testing.assert_close(ssim(a.double() / 255, b.double() / 255), ssim(a, b))  # float frames in [0, 1]
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert psnr(a, a).tolist() == [100.0, 100.0]  # the sampler's cap for identical frames
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :10], b[:, :10])


def test_frame_stats():
    frames = torch.zeros(3, 4, 4, 3, dtype=torch.uint8)
    frames[1, ..., 0] = 30  # red rises by 30, then falls back
    stats = frame_stats(frames)
    assert stats["mean"] == pytest.approx([10, 0, 0]) and stats["std"][1:] == [0, 0]
    assert stats["mean_abs_diff"] == pytest.approx(10.0)  # |30| on one channel of three, twice, over two steps
    assert frame_stats(frames[:1])["mean_abs_diff"] is None
    frames = torch.randint(0, 256, (21, 5, 7, 3), dtype=torch.uint8)  # several FRAMES_AT_ONCE groups
    x = frames.permute(0, 3, 1, 2).double()  # (T, 3, H, W)
    stats = frame_stats(frames)
    assert stats["mean"] == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), rel=1e-12)
    assert stats["std"] == pytest.approx(x.std(dim=(0, 2, 3), correction=0).tolist(), rel=1e-12)
    assert stats["mean_abs_diff"] == pytest.approx((x[1:] - x[:-1]).abs().mean().item(), rel=1e-12)


def test_clips_and_chunk_windows():
    frames = torch.randint(0, 256, (5, 12, 20, 3), dtype=torch.uint8)
    clip = fvd_clip(frames, 8)
    assert clip.shape == (3, 5, 8, 8) and clip.dtype == torch.float32
    torch.testing.assert_close(fvd_clip(frames, 12), frames[:, :, 4:16].permute(3, 0, 1, 2).float())  # centre square
    # 1 given frame, chunks of 4, 8-frame windows ending with each chunk (the first moved to [0, 8))
    assert chunk_windows(14, 8, 4, 1) == [dict(chunk=0, frames=[1, 5], window=[0, 8]),
                                          dict(chunk=1, frames=[5, 9], window=[1, 9]),
                                          dict(chunk=2, frames=[9, 13], window=[5, 13])]
    assert chunk_windows(4, 8, 4, 1) == []


def test_torchscript_detector_fvd(i3d_file, tmp_path):
    detector = load_i3d(i3d_file, "cpu")
    gen = torch.Generator().manual_seed(0)
    videos = torch.rand(12, 3, 8, 16, 16, generator=gen) * 200  # 0-255 scale clips
    features = {}
    for batch_size in (5, 12):  # batching across videos does not change a clip's features
        extractor = FeatureExtractor(detector, batch_size)
        for v in videos:
            extractor.add("real", v)
            extractor.add("brighter", v + 55)
        features[batch_size] = {k: extractor.features(k) for k in ("real", "brighter")}
    np.testing.assert_allclose(features[5]["real"], features[12]["real"], rtol=1e-5, atol=1e-6)
    real, brighter = features[5]["real"], features[5]["brighter"]
    assert real.shape == (12, 6)
    assert abs(fvd(real, real)) < 1e-9 and fvd(real, brighter) > 1e-3

    state = tmp_path / "i3d_state.pt"
    torch.save(TinyI3D().state_dict(), state)
    with pytest.raises(CheckpointError, match="only a TorchScript I3D"):
        load_i3d(state)
    with pytest.raises(CheckpointError, match="file not found"):
        load_i3d(tmp_path / "missing.pt")


def _write_video(path, frames):
    with StreamingVideoWriter(path, 6, frames.shape[2], frames.shape[1]) as writer:
        writer.write(frames)


@pytest.fixture(scope="module")
def video_sets(tmp_path_factory):
    """real/ and fake/ with three 12-frame 16x16 videos each, same names; the fake ones brighter and noisier; a
    contact-sheet PNG beside the fake mp4s, as the sampler leaves them."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        real = np.repeat(rng.integers(30, 200, (12, 16, 16, 1)), 3, axis=3)
        fake = (real + 30 + rng.normal(0, 15, real.shape)).clip(0, 255)
        _write_video(root / "real" / f"{name}.mp4", real.astype(np.uint8))
        _write_video(root / "fake" / f"{name}.mp4", fake.astype(np.uint8))
    for folder, name in (("one", "a"), ("renamed", "x")):  # a set of one video; one with no name of the real set
        (root / folder).mkdir()
        shutil.copy(root / "fake" / "a.mp4", root / folder / f"{name}.mp4")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "fake" / "a.png")
    return root


def test_list_videos(video_sets, tmp_path):
    assert [v.name for v in list_videos(video_sets / "fake")] == ["a", "b", "c"]  # the PNG is not a video
    frames = tmp_path / "frames" / "clip0"
    frames.mkdir(parents=True)
    for i in (10, 2, 1):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(frames / f"f_{i}.png")
    (videos,) = list_videos(tmp_path / "frames")
    assert videos.name == "clip0" and [p.name for p in videos.frames] == ["f_1.png", "f_2.png", "f_10.png"]
    manifest = tmp_path / "set.jsonl"
    manifest.write_text(json.dumps({"path": "frames/clip0"}) + "\n" + json.dumps({"path": "nowhere.mp4"}) + "\n")
    with pytest.raises(ValueError, match="line 2: .*nowhere.mp4: not found"):
        list_videos(manifest)


def test_eval_video_end_to_end(video_sets, i3d_file, tmp_path):
    out = tmp_path / "eval.json"
    result = run_entrypoint("tools/eval_video.py", "--real", video_sets / "real", "--fake", video_sets / "fake",
                            "--i3d", i3d_file, "--num-frames", "8", "--size", "16", "--chunk-size", "2",
                            "--given-frames", "1", "--pairs", "--batch-size", "4", "--device", "cpu", "--json", out,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    res = json.loads(out.read_text())
    assert res["real"]["videos"] == res["fake"]["videos"] == 3
    assert res["fvd"] > 0 and len(res["fvd_per_chunk"]) == 5  # (12 - 1) // 2 complete chunks
    last = res["fvd_per_chunk"][-1]
    assert last == dict(chunk=4, frames=[9, 11], window=[3, 11], fvd=last["fvd"]) and last["fvd"] >= 0
    assert res["pairs"]["count"] == 3 and res["pairs"]["videos"][0]["frames"] == [1, 12]
    assert 10 < res["pairs"]["psnr"] < 40 and 0 < res["pairs"]["ssim"] < 1
    assert res["fake"]["mean"][0] > res["real"]["mean"][0] + 20  # the fake videos are brighter
    assert "FVD (8 frames from frame 0, 16x16)" in result.stdout and "per-chunk FVD" in result.stdout


def test_eval_video_bad_inputs(video_sets, i3d_file):
    real, fake = video_sets / "real", video_sets / "fake"
    cases = {  # arguments, text the one error line must hold
        "missing-folder": (["--real", video_sets / "nowhere", "--fake", fake], "--real: "),
        "chunks-without-i3d": (["--real", real, "--fake", fake, "--chunk-size", "4"], "--chunk-size"),
    }
    results = run_in_parallel(lambda case: run_entrypoint("tools/eval_video.py", *cases[case][0], timeout=120), cases)
    for case, result in zip(cases, results):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode != 0 and "Traceback" not in result.stderr, (case, result.stderr)
        assert len(lines) == 1 and "error: " in lines[0] and cases[case][1] in lines[0], (case, result.stderr)
    assert "nowhere: no such folder or .jsonl manifest" in results[0].stderr

    # caught before any decoding, in the same one_line_errors as the subprocess cases
    detector = load_i3d(i3d_file)
    with pytest.raises(ValueError, match="fewer than the 40 of an FVD clip"):
        evaluate(list_videos(real), list_videos(fake), EvalSettings(num_frames=40), detector)
    with pytest.raises(ValueError, match="at least 2 videos in each set, the generated set has 1"):
        evaluate(list_videos(real), list_videos(video_sets / "one"), EvalSettings(num_frames=8), detector)
    with pytest.raises(ValueError, match="no complete chunk of 20"):
        evaluate(list_videos(real), list_videos(fake), EvalSettings(num_frames=8, chunk_size=20), detector)
    with pytest.raises(ValueError, match="no generated video has the name"):
        evaluate(list_videos(real), list_videos(video_sets / "renamed"), EvalSettings(pairs=True))


def test_batch_sampling_then_eval(sample_setup, i3d_file, tmp_path):  # noqa: F811
    root = sample_setup
    for name in ("a", "b"):
        (tmp_path / "real").mkdir(exist_ok=True)
        shutil.copy(root / "real.mp4", tmp_path / "real" / f"{name}.mp4")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"first_video": f"real/{n}.mp4", "name": n, "seed": s}) + "\n"
                            for s, n in enumerate("ab")))
    result = run_entrypoint("-m", "causalvdm.cli.sample", root / "cfg2.py", "--ckpt", root / "ckpt2", "--manifest",
                            jobs, "--out", tmp_path / "fake", timeout=180)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "eval.json"
    assert eval_video.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--i3d", str(i3d_file),
                            "--num-frames", "8", "--size", "16", "--chunk-size", "4", "--given-frames", "1",
                            "--pairs", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [v["frames"] for v in res["videos"]["fake"]] == [14, 14]  # 1 given + 13 generated, 16x16
    assert [c["window"] for c in res["fvd_per_chunk"]] == [[0, 8], [1, 9], [5, 13]]
    assert all(np.isfinite(c["fvd"]) for c in res["fvd_per_chunk"]) and np.isfinite(res["fvd"])
    assert res["pairs"]["count"] == 2 and res["pairs"]["videos"][0]["frames"] == [1, 14]


def test_eval_video_measures_token_grid_artifacts(tmp_path, capsys):
    """--token-size: real-looking videos score about 1, the same videos with an offset per 8x8 square clearly above."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:64, :64].astype(np.float64)
    for name in ("a", "b"):
        frames = np.stack([128 + 60 * np.sin((x + 2 * t) / 7) + 50 * np.cos(y / 9) for t in range(8)])  # (8, 64, 64)
        tiles = np.kron(rng.normal(0, 14, (8, 8, 8)), np.ones((1, 8, 8)))  # one offset per frame and 8x8 square
        for folder, video in (("real", frames), ("fake", frames + tiles)):
            pixels = np.repeat(video.clip(0, 255).round().astype(np.uint8)[..., None], 3, axis=3)
            _write_video(tmp_path / folder / f"{name}.mp4", pixels)
    out = tmp_path / "eval.json"
    assert eval_video.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--token-size", "8",
                            "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["real"]["token_grid"] == pytest.approx(1.0, abs=0.15) and res["fake"]["token_grid"] > 1.5
    assert all(v["token_grid"] > 1.5 for v in res["videos"]["fake"])
    assert "token-grid ratio (8 px; about 1 for real)" in capsys.readouterr().out


def test_nearest_psnr_picks_the_closest_reference_frame():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 256, (5, 8, 8, 3), generator=gen, dtype=torch.uint8)
    noisy = (reference[[3, 0]].int() + torch.randint(-9, 10, (2, 8, 8, 3), generator=gen)).clamp(0, 255).to(torch.uint8)
    frames = torch.cat([reference[2:3], noisy])
    got = nearest_psnr(frames, reference)
    assert got[0] == 100.0  # identical to reference frame 2
    assert torch.equal(got[1:], psnr(noisy, reference[[3, 0]]))  # each noisy copy is nearest its own source
    with pytest.raises(ValueError, match=r"differ in shape: \(8, 8, 3\) vs \(4, 8, 3\)"):
        nearest_psnr(frames, reference[:, :4])
