"""tools/gpu_check.sh rehearsed on the CPU under the device machine's limits: at most 8 files come back from $OUT,
the time budget holds, the report is whole JSON, and a step stopped by its timeout keeps the rows it measured."""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 120  # seconds: the CPU path takes about half of it on an idle 2-core machine


def timeout_process(marker: str) -> int | None:
    """The pid of the running `timeout` whose command line holds `marker`, None if there is none."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if argv[0] == b"timeout" and marker.encode() in b" ".join(argv):
            return int(proc.name)
    return None


def test_cpu_rehearsal_keeps_the_limits_and_a_timed_out_step_keeps_its_rows(tmp_path):
    out = tmp_path / "out"
    train_json = out / "train.json"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_BUDGET=str(BUDGET), PYTHON=sys.executable)
    start = time.monotonic()
    with open(tmp_path / "stdout.log", "w") as log:
        script = subprocess.Popen(["bash", "tools/gpu_check.sh"], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        # Once the training benchmark has written its first run (checkpointing on), its timeout fires as its own
        # timer would: SIGALRM makes `timeout` stop the step and exit 124, mid-way through the second run, whatever
        # the machine's speed.
        alarmed = None
        while script.poll() is None:
            if alarmed is None and train_json.is_file() and json.loads(train_json.read_text())["runs"]:
                alarmed = timeout_process(str(train_json))
                assert alarmed is not None, "the training step ended before its timeout could fire"
                os.kill(alarmed, signal.SIGALRM)
            time.sleep(0.01)  # a tiny model's second run can end within a tenth of a second of the first
    wall = time.monotonic() - start
    output = (tmp_path / "stdout.log").read_text()
    assert alarmed is not None, output
    assert script.returncode == 1, output  # a step timed out

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(p.parent == out and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["budget"] == BUDGET and report["seconds"] <= BUDGET and wall <= BUDGET + 3, (report["seconds"], wall)

    steps = {name: s["status"] for name, s in report["steps"].items()}
    assert steps["env"] == steps["imports"] == steps["ar_eager"] == "ok", output
    assert steps["train"] == "timeout" and steps["ar_compiled"] == "skipped" and not report["ok"]
    assert steps["streams"] == "ok" and report["streams"]["streams_8_over_1"] > 0, output
    assert steps["pytest_cuda"] in ("ok", "timeout", "skipped")  # the last step gets what the budget has left
    assert report["environment"]["cuda_available"] is False and report["environment"]["imports"]["missing"] == {}

    # The training step kept the run it had finished; the run it was in when stopped left nothing half-written.
    (run,) = report["train"]["runs"]
    assert run["status"] == "ok" and run["grad_checkpointing"] is True and run["steps_per_s"] > 0
    assert run["mfu_vs_matmul"] == run["tflops"] / report["matmul"]["tflops"]
    cache, recompute = report["ar_eager"]["cache"], report["ar_eager"]["recompute"]
    assert (cache["frames"], recompute["frames"], report["ar_eager"]["speedup_chunks"]) == (25, 17, 2)
    assert report["ar_eager"]["max_rel_diff"] < 1e-4 and cache["mfu_vs_matmul"] > 0
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = set(logs.getnames())
    assert {"steps.tsv", "logs/env.log", "logs/train.log", "logs/ar_eager.log", "logs/streams.log"} <= names, names
