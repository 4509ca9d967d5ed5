"""tools/benchmark_speedup.py, benchmark_steady_state.py, benchmark_step.py and benchmark_streams.py on the tiny
config: the printed summary lines and the JSON figures (no timing targets); the table of GPU peaks behind the MFU."""

import json
import math
import re
import types

import pytest
import torch

from causalvdm.utils.flops import peak_tflops
from causalvdm.benchmarks import speedup, steady_state, step, streams
from causalvdm.benchmarks.ar import frame_passes

TINY = "configs/debug/tiny.py"


def test_frame_passes_match_the_cost_model():
    # 81 frames, 1 given, chunks of 8 and 25 cached: the first three chunks see 1, 9, 17 frames, the rest 25
    recompute, cache = frame_passes(1, 10, 8, 25, 10)
    assert recompute == 10 * ((1 + 9 + 17) + 7 * 25 + 10 * 8) == 2820
    assert cache == 10 * 10 * 8 + 10 * 8 + 1 == 881


def test_compare_mode(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert speedup.main(["--config", TINY, "--frames", "41", "--denoise-steps", "2", "--json", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup=\S+ bound=\S+ ratio=\S+ frames=41 chunk=8 max_cond=25 denoise_steps=2", last), last
    figures = json.loads(out.read_text())
    assert figures["max_rel_diff"] < 1e-4  # cache and recompute agree before the first eviction
    assert len(figures["cache"]["chunk_times"]) == len(figures["recompute"]["chunk_times"]) == 5


def test_recompute_on_fewer_frames_compares_the_chunks_both_ran(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--config", TINY, "--frames", "33", "--recompute-frames", "17", "--modes", "cache,recompute",
            "--denoise-steps", "1", "--json", str(out)]
    assert speedup.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup=\S+ bound=\S+ ratio=\S+ frames=33 chunk=8 max_cond=25 denoise_steps=1", last), last
    figures = json.loads(out.read_text())
    cache, recompute = figures["cache"], figures["recompute"]
    assert (cache["frames"], recompute["frames"]) == (33, 17)
    assert (len(cache["chunk_times"]), len(recompute["chunk_times"]), figures["speedup_chunks"]) == (4, 2, 2)
    passes = frame_passes(1, 2, 8, 25, 1)  # over the prefill and the 2 chunks both ran
    assert figures["frame_passes"] == dict(recompute=passes[0], cache=passes[1])
    seconds = [r["prefill"] + sum(r["chunk_times"][:2]) for r in (recompute, cache)]
    assert math.isclose(figures["speedup"], seconds[0] / seconds[1])
    assert figures["max_rel_diff"] < 1e-4 and cache["warmup_seconds"] > 0 and "cudagraph_skips" not in figures


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 NVL", 835.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
                                        ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("Tesla T4", None)])
def test_dense_bf16_peak_by_gpu_name(name, peak):
    assert peak_tflops(name) == peak


def test_long_mode_with_control(tmp_path, capsys):
    out = tmp_path / "long.json"
    argv = ["--config", TINY, "--long", "6", "--denoise-steps", "1", "--control", "--json", str(out)]
    assert steady_state.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"long_chunks=6 slowest_over_fastest=\S+ rss_growth_mb=\S+ frames=49 chunk=8 max_cond=25 "
                        r"denoise_steps=1 control_slowest_over_fastest=\S+", last), last
    figures = json.loads(out.read_text())
    assert len(figures["chunk_times"]) == len(figures["minor_faults"]) == 6
    assert len(figures["control_seconds"]) == 3  # chunks 3, 4, 5 start with the queue of 25 full


def test_long_mode_too_short():
    with pytest.raises(SystemExit, match="too short"):
        steady_state.main(["--config", TINY, "--long", "3"])


def test_forward_mode_times_spatial_prefixes_side_by_side(tmp_path, capsys):
    out = tmp_path / "forward.json"
    argv = ["--config", TINY, "--forward", "2", "--spatial-prefix", "none,prev_frames_2", "--json", str(out)]
    assert step.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"forward float32=\S+ float32\+prev_frames_2=\S+ speedup_float32\+prev_frames_2=\S+", last), last
    variants = json.loads(out.read_text())["variants"]
    assert all(v["cache_vs_recompute_rel_diff"] < 1e-4 for v in variants.values())  # the cache equals its baseline
    with pytest.raises(SystemExit):
        step.main(["--config", TINY, "--forward", "2", "--spatial-prefix", "prev_frames_0"])


def test_streams_table_and_ratio_line(tmp_path, capsys):
    """tools/benchmark_streams.py: a row per stream count and cache storage, the pool's bytes (8-bit below the
    model's dtype), the work per frame equal at every count, and the 8-over-1 line."""
    out = tmp_path / "streams.json"
    argv = ["--config", TINY, "--text", "--streams", "1,8", "--chunks", "2", "--denoise-steps", "2",
            "--cache-dtypes", "model,int8", "--json", str(out)]
    assert streams.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"streams_8_over_1=\S+ p95_8_over_1=\S+", last), last
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert [(row["streams"], row["cache"]) for row in rows] == [(1, "model"), (8, "model"), (1, "int8"), (8, "int8")]
    assert figures["streams_8_over_1"] == rows[1]["fps"] / rows[0]["fps"]
    assert figures["p95_8_over_1"] == rows[1]["p95"] / rows[0]["p95"]
    assert rows[2]["pool_mb"] < rows[0]["pool_mb"] and rows[1]["pool_mb"] == 8 * rows[0]["pool_mb"]
    for row in rows:
        assert row["fps"] > 0 and row["p95"] >= row["p50"] > 0 and row["seq_fps"] > 0
        assert math.isclose(row["gflops"] / row["fps"], rows[0]["gflops"] / rows[0]["fps"])


def test_streams_stagger_and_ways_of_writing(tmp_path, monkeypatch):
    """--stagger opens the streams that many ticks apart; --writes runs a row per way of writing, each on an engine
    built with it (gather: True, span: False)."""
    made = []

    class Engine(streams.StreamEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ticks, self.opened_at = 0, []
            made.append(self)

        def open(self, *args, **kwargs):
            self.opened_at.append(self.ticks)
            return super().open(*args, **kwargs)

        def step(self):
            self.ticks += 1
            return super().step()

    monkeypatch.setattr(streams, "StreamEngine", Engine)
    out = tmp_path / "streams.json"
    argv = ["--config", TINY, "--streams", "3", "--chunks", "1", "--denoise-steps", "2", "--stagger", "2",
            "--writes", "gather,span", "--no-sequential", "--json", str(out)]
    assert streams.main(argv) == 0
    assert [row["writes"] for row in json.loads(out.read_text())["rows"]] == ["gather", "span"]
    assert [engine.gather_writes for engine in made] == [True, False]
    for engine in made:  # the warm-up round, then the timed one
        first, second = engine.opened_at[:3], engine.opened_at[3:]
        assert first == [0, 2, 4] and [t - second[0] for t in second] == [0, 2, 4], engine.opened_at


def test_streams_refuses_a_compile_mode_the_engine_does_not_use(capsys):
    """The engine compiles its tick in the default mode: a mode with CUDA graphs is refused, not silently dropped."""
    with pytest.raises(SystemExit):
        streams.main(["--config", TINY, "--compile", "reduce-overhead"])
    assert "default mode (no CUDA graphs)" in capsys.readouterr().err


def test_streams_baseline_leaves_out_its_warm_up(monkeypatch):
    """The one-after-another baseline runs an untimed stream first: the first generator's slow chunk (its kernel
    plans) is in neither the frames counted nor the p95 latency."""
    made = []

    class Generator:
        def __init__(self):
            self.chunk_times = []
            made.append(self)

        def iter_chunks(self, first, frames, y=None, mask=None, seed=0):
            for _ in range((frames - first.shape[2]) // 4):
                self.chunk_times.append(100.0 if len(made) == 1 else 0.01)
                yield torch.zeros(1, 1, 4, 1, 1)

    monkeypatch.setattr(streams, "make_generator", lambda *args: Generator())
    ar = types.SimpleNamespace(chunk_size=4)
    figures = streams.run_sequential(None, None, None, ar, 3, 2, torch.zeros(1, 1, 1, 1, 1), (None, None))
    assert len(made) == 4 and made[0].chunk_times == [100.0]  # the warm-up: one chunk
    assert figures["p95"] == 0.01 and sum(len(g.chunk_times) for g in made[1:]) == 3 * 2
