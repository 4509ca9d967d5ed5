import pytest
import torch

from causalvdm.models.positional import apply_rope, rope_cos_sin, tpe_index


def test_cyclic_inference_index_wraps():
    positions = torch.arange(100)
    index = tpe_index(positions, "cyclic", 33)
    assert index.shape == (1, 100)
    assert torch.equal(index[0], positions % 33)


def test_cyclic_training_offsets_shift_every_sample():
    positions = torch.arange(33)
    offset = torch.tensor([0, 5, 32])
    index = tpe_index(positions, "cyclic", 33, offset)
    for b, o in enumerate(offset.tolist()):
        assert torch.equal(index[b], (positions + o) % 33)
        assert sorted(index[b].tolist()) == list(range(33))  # a rotation: every index once


def test_absolute_rejects_positions_beyond_table():
    assert torch.equal(tpe_index(torch.arange(33), "absolute", 33)[0], torch.arange(33))
    with pytest.raises(ValueError, match="beyond max_tpe_len=33"):
        tpe_index(torch.arange(34), "absolute", 33)


@pytest.mark.numerics
def test_rope_scores_depend_on_relative_position_only():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), 8)
        ck, sk = rope_cos_sin(torch.tensor([pk]), 8)
        return (apply_rope(q[:1], cq, sq) * apply_rope(k[:1], ck, sk)).sum()

    assert torch.allclose(score(3, 1), score(103, 101), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


@pytest.mark.numerics
def test_model_training_offsets_are_random_and_applied(make_model):
    model = make_model(tpe_mode="cyclic")
    draws = torch.stack([model.sample_tpe_offset(4, torch.Generator().manual_seed(s)) for s in range(5)])
    assert draws.min() >= 0 and draws.max() < model.max_tpe_len
    assert len(set(draws.flatten().tolist())) > 5
    assert make_model(tpe_mode="rope").sample_tpe_offset(4) is None

    x = torch.randn(2, 4, 5, 4, 4)
    t = torch.zeros(2, 5, dtype=torch.long)
    base = model(x, t)
    full_turn = torch.full((2,), model.max_tpe_len)
    assert torch.allclose(model(x, t, tpe_offset=full_turn), base, atol=1e-6)
    assert not torch.allclose(model(x, t, tpe_offset=torch.tensor([3, 3])), base, atol=1e-4)


def test_cyclic_rows_with_a_frame_sink_never_collide():
    """Sink frames keep rows 0..s-1 whatever the offset; every window of L - s consecutive rolling frames takes the
    other L - s rows exactly once, so the frames in view (sink + at most L - s rolling) never share a row."""
    sink, length = 3, 11
    positions = torch.arange(200)
    for offset in (None, torch.tensor([0, 5, 17])):
        rows = tpe_index(positions, "cyclic", length, offset, sink)
        assert torch.equal(rows[:, :sink], torch.arange(sink).expand(rows.shape[0], -1))
        rolling = rows[:, sink:]
        assert rolling.min() >= sink and rolling.max() < length
        for start in range(0, 200 - sink - (length - sink)):
            window = rolling[:, start:start + length - sink]
            assert all(len(set(r.tolist())) == length - sink for r in window)
    assert torch.equal(tpe_index(positions, "cyclic", length), tpe_index(positions, "cyclic", length, sink=0))
