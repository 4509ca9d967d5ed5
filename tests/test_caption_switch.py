"""Training clips that switch captions: CaptionSwitchDataset's splices, exact against the clips they are cut from."""

import pytest
import torch

from causalvdm.data import CaptionSwitchDataset

INNER = dict(type="VideoManifestDataset", manifest="manifest.jsonl", num_frames=9, image_size=12)


def test_switched_items_are_another_captions_frames_then_their_own(video_root):
    ds = CaptionSwitchDataset(dict(INNER, root=str(video_root)), prob=1.0, chunk_size=4, seed=3)
    inner = [ds.dataset[i]["video"] for i in range(len(ds))]
    seen = set()
    for index in range(len(ds)):
        item = ds[index]
        s = item["switch_at"]
        assert s in (1, 5) and item["caption"] == f"clip {index}"
        assert torch.equal(item["video"][:, s:], inner[index][:, s:])
        sources = [j for j, v in enumerate(inner) if torch.equal(item["video"][:, :s], v[:, :s])]
        assert sources and index not in sources  # the first frames are another caption's clip
        assert torch.equal(ds[index]["video"], item["video"])  # the same draw every time within an epoch
        seen.add(s)
    assert seen == {1, 5}
    first_epoch = [ds[i]["video"] for i in range(len(ds))]
    ds.set_epoch(1)  # new draws: other clips, switch frames or clip starts
    assert any(not torch.equal(ds[i]["video"], first_epoch[i]) for i in range(len(ds)))


def test_switch_probability_and_errors(video_root, tmp_path):
    whole = CaptionSwitchDataset(dict(INNER, root=str(video_root)), prob=0.0, chunk_size=4)
    for index in range(len(whole)):
        item = whole[index]
        assert item["switch_at"] == 0 and torch.equal(item["video"], whole.dataset[index]["video"])
    some = CaptionSwitchDataset(dict(type="RepeatDataset", times=25, dataset=dict(INNER, root=str(video_root))),
                                prob=0.25, chunk_size=4)
    share = sum(some[i]["switch_at"] > 0 for i in range(len(some))) / len(some)
    assert 0.15 < share < 0.35
    (tmp_path / "manifest.jsonl").write_text('{"path": "a.mp4", "caption": "one"}\n')
    with pytest.raises(ValueError, match="at least two different captions, got 1"):
        CaptionSwitchDataset(dict(INNER, root=str(tmp_path)), prob=0.5, chunk_size=4)
    with pytest.raises(ValueError, match=r"prob must be in \[0, 1\], got 1.5"):
        CaptionSwitchDataset(dict(INNER, root=str(video_root)), prob=1.5, chunk_size=4)
