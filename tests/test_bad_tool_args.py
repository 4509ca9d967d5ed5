"""Every tool in tools/ refuses a bad argument or config with one `error:` line on stderr (no traceback, exit code
not 0) and writes nothing; --debug or CAUSALVDM_DEBUG=1 shows the traceback instead. Each case is a real
subprocess that stops at argument parsing or config loading, so none runs a benchmark."""

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_entrypoint, run_in_parallel, selected_params

TINY = "configs/debug/tiny.py"

# (tool, arguments, text the error line must hold: the flag, or the file it is about)
CASES = {
    "ar-frames-0": ("benchmark_speedup.py", ["--config", TINY, "--frames", "0"], "--frames"),
    "ar-frames-1-generates-nothing": ("benchmark_speedup.py", ["--config", TINY, "--frames", "1"], "--frames"),
    "ar-denoise-steps-negative": ("benchmark_speedup.py", ["--config", TINY, "--denoise-steps", "-2"],
                                  "--denoise-steps"),
    "ar-forward-not-a-number": ("benchmark_step.py", ["--config", TINY, "--forward", "ten"], "--forward"),
    "ar-threads-0": ("benchmark_speedup.py", ["--config", TINY, "--threads", "0"], "--threads"),
    "ar-weight-scale-nan": ("benchmark_speedup.py", ["--config", TINY, "--weight-scale", "nan"], "--weight-scale"),
    "ar-modes-empty-entry": ("benchmark_speedup.py", ["--config", TINY, "--modes", "cache,"], "--modes"),
    "ar-modes-twice": ("benchmark_speedup.py", ["--config", TINY, "--modes", "cache,cache"], "--modes"),
    "ar-dtype-unknown": ("benchmark_step.py", ["--config", TINY, "--forward", "2", "--dtype", "float32,fp8"],
                         "--dtype"),
    "ar-config-missing": ("benchmark_speedup.py", ["--config", "configs/nowhere.py"], "configs/nowhere.py"),
    "data-steps-0": ("benchmark_data.py", ["--root", ".", "--steps", "0"], "--steps"),
    "data-repeats-0": ("benchmark_data.py", ["--root", ".", "--repeats", "0"], "--repeats"),
    "data-num-workers-negative": ("benchmark_data.py", ["--root", ".", "--num-workers", "-1"], "--num-workers"),
    "data-cache-bytes-float": ("benchmark_data.py", ["--root", ".", "--cache-bytes", "1.5"], "--cache-bytes"),
    "train-batch-size-0": ("benchmark_train.py", ["--config", TINY, "--batch-size", "0"], "--batch-size"),
    "train-steps-0": ("benchmark_train.py", ["--config", TINY, "--steps", "0"], "--steps"),
    "train-warmup-steps-negative": ("benchmark_train.py", ["--config", TINY, "--warmup-steps", "-1"],
                                    "--warmup-steps"),
    "train-peak-tflops-0": ("benchmark_train.py", ["--config", TINY, "--peak-tflops", "0"], "--peak-tflops"),
    "convert-src-missing": ("convert_checkpoint.py", ["--config", TINY, "--out", "x.safetensors"], "--src"),
    "convert-source-unknown": ("convert_checkpoint.py", ["--src", "a.pth", "--config", TINY, "--out",
                                                         "x.safetensors", "--source", "latte"], "--source"),
    "encode-batch-size-0": ("encode_latents.py", ["--config", TINY, "--out", "x", "--batch-size", "0"],
                            "--batch-size"),
    "encode-shard-size-negative": ("encode_latents.py", ["--config", TINY, "--out", "x", "--shard-size", "-4"],
                                   "--shard-size"),
    "plan-batch-size-0": ("plan_memory.py", ["--config", TINY, "--batch-size", "0"], "--batch-size"),
    "plan-num-gpus-0": ("plan_memory.py", ["--config", TINY, "--num-gpus", "0"], "--num-gpus"),
    "plan-gpu-mem-0": ("plan_memory.py", ["--config", TINY, "--gpu-mem", "0GB"], "--gpu-mem"),
    "plan-gpu-mem-nan": ("plan_memory.py", ["--config", TINY, "--gpu-mem", "nan"], "--gpu-mem"),
    "plan-gpu-mem-unit": ("plan_memory.py", ["--config", TINY, "--gpu-mem", "80XB"], "--gpu-mem"),
    "plan-config-missing": ("plan_memory.py", ["--config", "configs/nowhere.py"], "configs/nowhere.py"),
    "demo-frames-0": ("prepare_demo_data.py", ["--frames", "0"], "--frames"),
    "demo-size-1": ("prepare_demo_data.py", ["--size", "1"], "--size"),
    "videos-switch-at-0": ("demo_videos.py", ["plan", "--clips", "c.jsonl", "--switch-at", "0", "--out", "v.jsonl"],
                           "--switch-at"),
    "videos-clips-missing": ("demo_videos.py", ["report", "--clips", "nowhere.jsonl", "--samples", "."],
                             "nowhere.jsonl"),
    "cache-ar-steps-0": ("verify_cache.py", ["--config", TINY, "--ar-steps", "0"], "--ar-steps"),
    "cache-chunk-0": ("verify_cache.py", ["--config", TINY, "--chunk", "0"], "--chunk"),
    "cache-latent-size-0": ("verify_cache.py", ["--config", TINY, "--latent-size", "4", "0"], "--latent-size"),
    "cache-tol-nan": ("verify_cache.py", ["--config", TINY, "--tol", "nan"], "--tol"),
    "cache-bf16-tol-inf": ("verify_cache.py", ["--config", TINY, "--bf16-tol", "inf"], "--bf16-tol"),
    "cache-chunk-beyond-absolute-tpe": ("verify_cache.py", ["--config", TINY, "--tpe-mode", "absolute", "--chunk",
                                                            "40"], "--chunk"),
    "cache-view-beyond-cyclic-tpe": ("verify_cache.py", ["--config", TINY, "--chunk", "10", "--max-cond", "25"],
                                     "frames in view exceed max_tpe_len=33"),
    "cache-spatial-prefix-beyond-queue": ("verify_cache.py", ["--config", TINY, "--spatial-prefix", "prev_frames_4",
                                                              "--max-cond", "3", "--chunk", "4"], "--max-cond 3"),
    # Outputs and devices are checked where the flag is read, before any work whose figures would be lost.
    **{f"{tool}-json-{kind}": (f"{tool}.py", [*args, "--json", path], "--json")
       for tool, args in (("benchmark_speedup", ["--config", TINY]), ("benchmark_step", ["--config", TINY]),
                          ("benchmark_steady_state", ["--config", TINY]), ("benchmark_train", ["--config", TINY]),
                          ("plan_memory", ["--config", TINY]), ("eval_video", ["--real", ".", "--fake", "."]))
       for kind, path in (("folder", "configs"), ("under-a-file", "README.md/out.json"), ("empty", ""))},
    **{f"{tool}-out-{kind}": (f"{tool}.py", [*args, "--out", path], "--out")
       for tool, args in (("encode_latents", ["--config", TINY]), ("prepare_demo_data", []),
                          ("convert_checkpoint", ["--src", "a.pth", "--config", TINY]),
                          ("compare_student", ["--teacher", "t", "--student", "s", "--video", "v.mp4"]))
       for kind, path in (("under-a-file", "README.md/out"), ("the-wrong-kind", "configs" if tool == "convert_checkpoint"
                                                                                   else "README.md"))},
    **{f"{tool}-device-{device}": (f"{tool}.py", [*args, "--device", device], "--device")
       for tool, args in (("benchmark_speedup", ["--config", TINY]), ("benchmark_train", ["--config", TINY]),
                          ("encode_latents", ["--config", TINY, "--out", "x"]),
                          ("eval_video", ["--real", ".", "--fake", "."]))
       for device in ("gpu", "mps", "cuda:7" if torch.cuda.device_count() < 8 else "cuda:99")},
}


def error_lines(result) -> list[str]:
    """The non-blank lines of a finished run's stderr."""
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def outcomes(request):
    """The result of every selected case, run a few at a time."""
    selected = selected_params(request, "case")
    results = run_in_parallel(lambda case: run_entrypoint(f"tools/{CASES[case][0]}", *CASES[case][1], timeout=120),
                              selected)
    return dict(zip(selected, results))


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_is_one_error_line(case, outcomes):
    result, names = outcomes[case], CASES[case][2]
    lines = error_lines(result)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and "error: " in lines[0] and names in lines[0], result.stderr


def test_convert_that_loads_nothing_fails_and_writes_nothing(tmp_path):
    src, out = tmp_path / "unrelated.safetensors", tmp_path / "out" / "init.safetensors"
    save_file({"encoder.conv.weight": torch.zeros(2, 2), "decoder.bias": torch.zeros(2)}, src)
    result = run_entrypoint("tools/convert_checkpoint.py", "--src", src, "--config", TINY, "--out", out, timeout=120)
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}: no tensor of it"), result.stderr
    assert "2 keys" in lines[0] and "decoder.bias" in lines[0], lines[0]
    assert [p.name for p in tmp_path.iterdir()] == [src.name]  # no output, no temporary file


def test_encode_of_no_readable_video_fails_and_writes_no_index(tmp_path):
    root = tmp_path / "ucf"
    (root / "Swing").mkdir(parents=True)
    (root / "Swing" / "v0.avi").write_bytes(b"not a video")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"vae = dict(type='PixelVAE', factor=2)\n"
                   f"dataset = dict(type='ClassFolderDataset', root={str(root)!r}, num_frames=3, image_size=12, "
                   f"sample_interval=2, random_crop=False)\n")
    out = tmp_path / "latents"
    result = run_entrypoint("tools/encode_latents.py", "--config", cfg, "--out", out, "--device", "cpu", timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = error_lines(result)[-1]  # after the warning about the video and tqdm's bar
    assert last.startswith(f"error: {cfg}: ClassFolderDataset: none of the 1 videos under") and "v0.avi" in last, last
    assert not (out / "index.json").exists()


@pytest.mark.parametrize("flag, env", [(["--debug"], None), ([], {"CAUSALVDM_DEBUG": "1"})], ids=["flag", "env"])
def test_debug_shows_the_traceback(flag, env):
    args = ["tools/verify_cache.py", "--config", "configs/nowhere.py", *flag]
    result = run_entrypoint(*args, env=env, timeout=120)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr, result.stderr
    assert error_lines(result)[-1] == "causalvdm.registry.ConfigError: configs/nowhere.py: config file not found"
