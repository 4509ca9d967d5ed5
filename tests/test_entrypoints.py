"""Bad inputs through the entrypoints exactly as users call them: subprocesses of `python -m causalvdm.cli.train`,
`scripts/train.sh` (torchrun), `python -m causalvdm.cli.sample` and `scripts/sample.sh`.

Every case must exit non-zero with exactly one error line (an `error:` line, or one ERROR log line once the run has
started logging) that matches the case's pattern, no traceback, no torchrun report, and nothing written that a run
produces (checkpoints, metrics, videos). A module fixture runs the selected cases a few at a time, then each test
reads its outcome.
"""

import fcntl
import json
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from causalvdm.data.video_io import read_video_frames
from conftest import ROOT, run_entrypoint, run_in_parallel, selected_params
from test_sampling import sample_setup  # noqa: F401  (a fixture: tiny config, checkpoints, image, video)
from test_training import _config

TRAIN = ("-m", "causalvdm.cli.train", "{cfg}", "--exp-name", "run")
TRAIN_SH = ("scripts/train.sh", "{cfg}", "run", "{port}")
SAMPLE = ("-m", "causalvdm.cli.sample", "{scfg}", "--ckpt", "{ckpt2}", "--out", "{tmp}/out")
# What a run writes when it gets going: none of it may appear after a refused input.
PRODUCTS = ("*.mp4", "*.safetensors", "metrics.jsonl", "step_*")
UNWRITABLE = "/sys/causalvdm_out"  # sysfs refuses new folders even to root


@dataclass
class Case:
    """One bad input: the command (placeholders filled per case), the pattern its error line matches, and an
    optional `prepare(paths)` that sets the scene (it may return a handle kept open while the command runs)."""

    id: str
    argv: tuple
    expect: str
    prepare: Callable | None = None
    slow: bool = False  # needs a finished training run first


def _options(*pairs):
    return ("--cfg-options", *pairs)


def _manifest_row(**row):
    def prepare(p):
        (p["tmp"] / "bad.jsonl").write_text(json.dumps(row) + "\n")
    return prepare


def _unreadable_data(p):
    for i in range(3):
        (p["tmp"] / f"broken{i}.mp4").write_bytes(b"not a video")
    (p["tmp"] / "bad.jsonl").write_text("".join(json.dumps({"path": str(p["tmp"] / f"broken{i}.mp4"), "caption": ""})
                                                + "\n" for i in range(3)))


def _foreign_weights(p):
    save_file({"encoder.conv.weight": torch.zeros(3, 3)}, str(p["tmp"] / "foreign.safetensors"))


def _sample_jobs(**row):
    def prepare(p):
        (p["tmp"] / "jobs.jsonl").write_text(json.dumps(row) + "\n")
    return prepare


def _file_in_the_way(p):
    (p["tmp"] / "taken").write_text("a file, not a folder")


def _earlier_run(p):
    shutil.copytree(p["trained"], p["tmp"] / "outputs" / "run")


def _earlier_run_locked(p):
    _earlier_run(p)
    lock = open(p["tmp"] / "outputs" / "run" / ".lock", "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lock


def _earlier_run_with_newer_checkpoint(p):
    _earlier_run(p)
    ckpts = p["tmp"] / "outputs" / "run" / "checkpoints"
    shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000009")


def _sixteen_bit_image(p):
    Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)).save(p["tmp"] / "deep.png")


TRAIN_CASES = [
    # settings of the wrong type or out of range (class 3 and 4 of the issue)
    Case("lr not a number", TRAIN + _options("train.lr=abc"), r"train\.lr must be a finite number, got 'abc'"),
    Case("lr nan", TRAIN + _options("train.lr=nan"), r"train\.lr must be a finite number"),
    Case("lr negative", TRAIN + _options("train.lr=-1"), r"train\.lr must be >= 0, got -1"),
    Case("max_steps fractional", TRAIN + _options("train.max_steps=1.5"), r"train\.max_steps must be an integer"),
    Case("batch size 0", TRAIN + _options("train.batch_size=0"), r"train\.batch_size must be >= 1, got 0"),
    Case("warm-up negative", TRAIN + _options("train.warmup_steps=-1"), r"train\.warmup_steps must be >= 0"),
    Case("ema decay above 1", TRAIN + _options("train.ema_decay=1.5"), r"train\.ema_decay must be in \[0, 1\]"),
    Case("text dropout 2", TRAIN + _options("train.txt_dropout_prob=2"), r"train\.txt_dropout_prob must be in"),
    Case("grad clip 0", TRAIN + _options("train.grad_clip=0"), r"train\.grad_clip must be > 0"),
    Case("timestep power 0", TRAIN + _options("train.timestep_power=0"), r"train\.timestep_power must be > 0"),
    Case("adam beta 1.5", TRAIN + _options("train.adam_betas=(0.9,1.5)"), r"train\.adam_betas must be two numbers"),
    Case("adam betas not a pair", TRAIN + _options("train.adam_betas=0.9"), r"train\.adam_betas must be"),
    Case("parallel not a string", TRAIN + _options("train.parallel=1"), r"train\.parallel must be a string"),
    Case("wandb not a bool", TRAIN + _options("train.wandb=yes"), r"train\.wandb must be True or False"),
    Case("validation sampler unknown", TRAIN + _options("train.validation_sampler=euler"),
         r"train\.validation_sampler must be one of ddim, dpm-solver\+\+, iddpm"),
    Case("validation steps 0", TRAIN + _options("train.validation_steps=0"), r"train\.validation_steps must be >= 1"),
    Case("model depth not a number", TRAIN + _options("model.depth=abc"), r"model\.depth must be an integer, got 'abc'"),
    Case("model width fractional", TRAIN + _options("model.hidden_size=32.5"), r"model\.hidden_size must be an integer"),
    Case("model patch not a triple", TRAIN + _options("model.patch_size=(2,2)"),
         r"model\.patch_size must be tuple\[int, int, int\]"),
    Case("dataset frames not a number", TRAIN + _options("dataset.num_frames=abc"),
         r"dataset\.num_frames must be an integer"),
    Case("dataset size a word", TRAIN + _options("dataset.image_size=big"),
         r"dataset\.image_size must be an integer or tuple\[int, int\]"),
    Case("border weight negative", TRAIN + _options("diffusion.border_weight=-1"),
         r"border_weight must be a finite number >= 0, got -1"),
    Case("spacing power 0", TRAIN + _options("diffusion.spacing_power=0"),
         r"spacing_power must be a finite number > 0, got 0"),
    Case("prediction type a number", TRAIN + _options("diffusion.prediction_type=5"),
         r"diffusion\.prediction_type must be a string"),
    Case("chunk size 0", TRAIN + _options("autoregressive.chunk_size=0"), r"autoregressive\.chunk_size must be >= 1"),
    Case("chunk size a word", TRAIN + _options("autoregressive.chunk_size=big"),
         r"autoregressive\.chunk_size must be an integer"),
    Case("prefix perturbation negative", TRAIN + _options("autoregressive.prefix_perturb_t=-1"),
         r"autoregressive\.prefix_perturb_t must be >= 0"),
    # checked before step 1 rather than at the first validation, hours later
    Case("validation clip beyond absolute TPE", TRAIN + _options("model.tpe_mode=absolute", "train.validation_every=1"),
         r"train\.validation_every=1 samples 18 frames .* absolute TPE covers max_tpe_len=9"),
    # writes outside where asked (class 2)
    Case("exp name climbing out", ("-m", "causalvdm.cli.train", "{cfg}", "--exp-name", "../escaped"),
         r"--exp-name '\.\./escaped' must be a plain name"),
    Case("exp name absolute", ("-m", "causalvdm.cli.train", "{cfg}", "--exp-name", "/tmp/escaped"),
         r"must be a plain name"),
    Case("manifest row climbing out of the root", TRAIN + _options("dataset.manifest={tmp}/bad.jsonl"),
         r"bad\.jsonl: line 1: path '\.\./clip0\.mp4' is outside the dataset root",
         _manifest_row(path="../clip0.mp4", caption="")),
    Case("manifest row absolute elsewhere", TRAIN + _options("dataset.manifest={tmp}/bad.jsonl"),
         r"line 1: path '/etc/hostname' is outside the dataset root", _manifest_row(path="/etc/hostname", caption="")),
    Case("manifest row path a number", TRAIN + _options("dataset.manifest={tmp}/bad.jsonl"),
         r"line 1: missing or empty field 'path'", _manifest_row(path=5, caption="")),
    Case("manifest row caption a number", TRAIN + _options("dataset.manifest={tmp}/bad.jsonl"),
         r"line 1: missing field 'caption'", _manifest_row(path="clip0.mp4", caption=5)),
    Case("outputs folder is a file", TRAIN + _options("train.outputs_dir={tmp}/taken"),
         r"taken/run: cannot create the run folder", _file_in_the_way),
    Case("outputs folder not writable", TRAIN + _options(f"train.outputs_dir={UNWRITABLE}"),
         r"cannot create the run folder \(Operation not permitted|Permission denied"),
    # stack traces before (class 3)
    Case("every item unreadable", TRAIN + _options("dataset.manifest={tmp}/bad.jsonl", "dataset.allow_outside_root=True",
                                                   "train.batch_size=1"),
         r"none of the 3 items under .* can be read", _unreadable_data),
    Case("pretrained file of another model", TRAIN + _options("model.from_pretrained={tmp}/foreign.safetensors"),
         r"foreign\.safetensors: no tensor of it fits the model \(1 keys \(encoder\.conv\.weight\)\)",
         _foreign_weights),
    Case("resume and overwrite together", TRAIN + ("--resume", "auto", "--overwrite"),
         r"--resume continues a run and --overwrite deletes it"),
    Case("resume from a folder that is no checkpoint", TRAIN + ("--resume", "{tmp}"),
         r"not a complete checkpoint directory"),
    Case("unknown flag", TRAIN + ("--epochs", "3"), r"unrecognized arguments: --epochs 3"),
    Case("option without a value", TRAIN + _options("train.lr"), r"argument --cfg-options: 'train\.lr' is not KEY=VALUE"),
    # through torchrun, as scripts/train.sh runs it
    Case("launcher: missing config", ("scripts/train.sh", "{tmp}/nope.py", "run", "{port}"),
         r"nope\.py: config file not found"),
    Case("launcher: bad setting", TRAIN_SH + _options("train.batch_size=0"), r"train\.batch_size must be >= 1"),
    Case("launcher: data outside the root", TRAIN_SH + _options("dataset.manifest={tmp}/bad.jsonl"),
         r"outside the dataset root", _manifest_row(path="../clip0.mp4", caption="")),
    # lost work (class 1): an earlier run in the folder
    Case("rerun of an earlier run", TRAIN_SH, r"holds an earlier run \(checkpoints up to step_00000002\); pass "
         r"--resume auto", _earlier_run, slow=True),
    Case("run folder in use", TRAIN_SH + ("--resume", "auto"), r"in use by another run", _earlier_run_locked,
         slow=True),
    Case("resume with another architecture", TRAIN + ("--resume", "auto") + _options("model.depth=3"),
         r"model\.safetensors: not a checkpoint of this model architecture", _earlier_run, slow=True),
    Case("resume behind newer checkpoints", TRAIN + ("--resume", "{tmp}/outputs/run/checkpoints/step_00000002"),
         r"holds checkpoints after step 2 \(up to step_00000009\)", _earlier_run_with_newer_checkpoint, slow=True),
]

SAMPLE_CASES = [
    Case("frames 0", SAMPLE + ("--num-frames", "0"), r"argument --num-frames: must be >= 1, got 0"),
    Case("frames negative", SAMPLE + ("--num-frames", "-3"), r"argument --num-frames: must be >= 1"),
    Case("guidance nan", SAMPLE + ("--cfg-scale", "nan"), r"argument --cfg-scale: must be finite"),
    Case("guidance infinite", SAMPLE + ("--cfg-scale", "inf"), r"argument --cfg-scale: must be finite"),
    Case("guidance negative", SAMPLE + ("--cfg-scale", "-1"), r"argument --cfg-scale: must be >= 0"),
    Case("fps 0", SAMPLE + ("--fps", "0"), r"argument --fps: must be >= 1"),
    Case("crf 0", SAMPLE + ("--crf", "0"), r"argument --crf: must be in \[1, 51\], got 0"),
    Case("config crf 52", SAMPLE + _options("sample.crf=52"), r"sample\.crf must be in \[1, 51\], got 52"),
    Case("steps 0", SAMPLE + ("--num-steps", "0"), r"argument --num-steps: must be >= 1"),
    Case("given frames 0", SAMPLE + ("--first-frames", "0"), r"argument --first-frames: must be >= 1"),
    Case("seed negative", SAMPLE + ("--seed", "-1"), r"argument --seed: must be >= 0"),
    Case("deblocking negative", SAMPLE + ("--deblock", "-1"), r"argument --deblock: must be >= 0"),
    Case("config deblocking negative", SAMPLE + _options("sample.deblock=-0.5"), r"sample\.deblock must be >= 0"),
    Case("eval length 0", SAMPLE + ("--eval-len", "0"), r"argument --eval-len: must be >= 1"),
    Case("steps a word", SAMPLE + ("--num-steps", "many"), r"argument --num-steps: expected an integer, got 'many'"),
    Case("unknown mode", SAMPLE + ("--mode", "fast"), r"argument --mode: invalid choice: 'fast'"),
    Case("config frames 0", SAMPLE + _options("sample.num_frames=0"), r"sample\.num_frames must be >= 1, got 0"),
    Case("config fps 0", SAMPLE + _options("sample.fps=0"), r"sample\.fps must be >= 1, got 0"),
    Case("config guidance a word", SAMPLE + _options("sample.cfg_scale=strong"),
         r"sample\.cfg_scale must be a finite number, got 'strong'"),
    Case("config mode unknown", SAMPLE + _options("sample.mode=fast"), r"sample\.mode must be 'cache' or 'recompute'"),
    Case("output folder is a file", SAMPLE[:-1] + ("{tmp}/taken",), r"taken: --out is a file, not a folder",
         _file_in_the_way),
    Case("output folder not writable", SAMPLE[:-1] + (UNWRITABLE,), r"--out is not writable"),
    Case("name climbing out", SAMPLE + ("--name", "../escaped"), r"--name '\.\./escaped' must be a plain name"),
    Case("job seed a word", SAMPLE + ("--manifest", "{tmp}/jobs.jsonl"), r"line 1: seed must be an integer, got 'abc'",
         _sample_jobs(seed="abc")),
    Case("job given frames 0", SAMPLE + ("--manifest", "{tmp}/jobs.jsonl"), r"line 1: seed must be >= 0 and "
         r"first_frames >= 1", _sample_jobs(first_frames=0)),
    Case("job prompt a number", SAMPLE + ("--manifest", "{tmp}/jobs.jsonl"), r"line 1: prompt must be a string",
         _sample_jobs(prompt=5)),
    Case("job unknown field", SAMPLE + ("--manifest", "{tmp}/jobs.jsonl"), r"line 1: unknown field\(s\) frames",
         _sample_jobs(frames=3)),
    Case("job name climbing out", SAMPLE + ("--manifest", "{tmp}/jobs.jsonl"), r"line 1: name '\.\./x' must be a plain",
         _sample_jobs(name="../x")),
    # prompt switches: checked even by this unconditional model, which then ignores them
    Case("prompt switch off a chunk boundary", SAMPLE + ("--prompt-at", "6", "x"),
         r"prompt switch at frame 6 is not a chunk boundary \(chunks of 4 from frame 0\): the nearest are 4 and 8"),
    Case("prompt switch frame a word", SAMPLE + ("--prompt-at", "end", "x"),
         r"argument --prompt-at: FRAME expected an integer, got 'end'"),
    Case("job prompt switch without a frame", SAMPLE + ("--manifest", "{tmp}/jobs.jsonl"),
         r'line 1: prompts\[0\] must be \{"frame": FRAME, "prompt": TEXT\}', _sample_jobs(prompts=[{"prompt": "x"}])),
    Case("checkpoint of another model", SAMPLE[:3] + ("--ckpt", "{ckpt3}", "--out", "{tmp}/out"),
         r"not a checkpoint of this model architecture"),
    Case("launcher: two processes, bad setting", ("scripts/sample.sh",) + SAMPLE[2:] + ("--fps", "0"),
         r"argument --fps: must be >= 1"),
    Case("launcher: two processes, bad job", ("scripts/sample.sh",) + SAMPLE[2:] + ("--manifest", "{tmp}/jobs.jsonl"),
         r"line 1: seed must be an integer", _sample_jobs(seed="abc")),
]

CASES = TRAIN_CASES + SAMPLE_CASES
ENV = {"scripts/sample.sh": {"NPROC_PER_NODE": "2"}}


def _outcome(case: Case, paths: dict, port: int):
    """Run one case in its own folder -> (CompletedProcess, files it left that a run produces)."""
    tmp = paths["base"] / re.sub(r"\W+", "_", case.id)
    tmp.mkdir()
    p = dict(paths, tmp=tmp, cfg=_config(tmp, paths["data"], paths["t5"]), port=port)
    handle = case.prepare(p) if case.prepare else None
    before = {f for pattern in PRODUCTS for f in tmp.rglob(pattern)}
    try:
        argv = [str(a).format(**p) for a in case.argv]
        result = run_entrypoint(*argv, cwd=tmp, env=ENV.get(argv[0]))
    finally:
        if handle is not None:
            handle.close()
    after = {f for pattern in PRODUCTS for f in tmp.rglob(pattern)}
    return result, sorted(after - before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, video_root, t5_dir):
    """A finished two-step run (checkpoint at step 2) that the run-folder cases copy as "an earlier run"."""
    base = tmp_path_factory.mktemp("trained")
    result = run_entrypoint("-m", "causalvdm.cli.train", _config(base, video_root, t5_dir, steps=2, ckpt_every=2),
                            "--exp-name", "run")
    assert result.returncode == 0, result.stderr[-2000:]
    return base / "outputs" / "run"


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, video_root, t5_dir, sample_setup):
    """The outcome of every selected case of this module, run a few at a time."""
    selected = selected_params(request, "case")
    paths = dict(base=tmp_path_factory.mktemp("cases"), data=video_root, t5=t5_dir, scfg=sample_setup / "cfg2.py",
                 ckpt2=sample_setup / "ckpt2", ckpt3=sample_setup / "ckpt3")
    if any(case.slow for case in selected):
        paths["trained"] = request.getfixturevalue("trained")
    ports = range(29600, 29600 + len(selected))  # torchrun's static rendezvous: one port per case in flight
    results = run_in_parallel(lambda job: _outcome(job[0], paths, job[1]), list(zip(selected, ports)))
    return {case.id: result for case, result in zip(selected, results)}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input_gets_one_line(case, outcomes):
    result, products = outcomes[case.id]
    errors = [line for line in result.stderr.splitlines() if re.search(r"\berror\b|\bERROR\b", line)]
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.search(case.expect, errors[0]), errors[0]
    assert not products, products


@pytest.mark.parametrize("script, argv", [("scripts/demo.sh", ("--bogus",)), ("scripts/demo.sh", ("one", "two")),
                                          ("scripts/setup.sh", ("--upgrade",))])
def test_a_stray_argument_stops_a_script_before_it_starts(script, argv, tmp_path):
    # A flag the demo does not know would otherwise name its experiment and start 15 minutes of work; the timeout
    # fails the test long before that.
    result = run_entrypoint(script, *argv, cwd=tmp_path, timeout=30)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and argv[0] in errors[0], result.stderr
    assert not result.stdout and not (ROOT / "outputs" / argv[0]).exists()
    usage = run_entrypoint(script, "--help", cwd=tmp_path, timeout=30)
    assert usage.returncode == 0 and f"bash {script}" in usage.stdout, usage.stderr


def test_debug_shows_the_traceback(tmp_path):
    for argv, env in ((("-m", "causalvdm.cli.train", "nope.py", "--debug"), None),
                      (("-m", "causalvdm.cli.sample", "nope.py"), {"CAUSALVDM_DEBUG": "1"}),
                      (("scripts/train.sh", "nope.py", "run", "29677", "--debug"), None)):
        result = run_entrypoint(*argv, cwd=tmp_path, env=env)
        assert result.returncode != 0 and "Traceback" in result.stderr and "config file not found" in result.stderr


def test_a_sixteen_bit_first_image_is_not_white(sample_setup, tmp_path):
    _sixteen_bit_image(dict(tmp=tmp_path))
    result = run_entrypoint(*[a.format(scfg=sample_setup / "cfg2.py", ckpt2=sample_setup / "ckpt2", tmp=tmp_path)
                              for a in SAMPLE], "--first-image", tmp_path / "deep.png", "--num-frames", "1",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    frame = read_video_frames(tmp_path / "out" / "deep.mp4", [0])[0].numpy()  # (H, W, 3) uint8, through H.264
    assert abs(int(np.median(frame)) - (40000 >> 8)) <= 3  # 156, not 255


def test_a_torn_metrics_line_does_not_stop_a_resume(trained, tmp_path, video_root, t5_dir):
    shutil.copytree(trained, tmp_path / "outputs" / "run")
    metrics = tmp_path / "outputs" / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo')  # killed mid-write
    cfg = _config(tmp_path, video_root, t5_dir, steps=3, ckpt_every=3)
    result = run_entrypoint("-m", "causalvdm.cli.train", cfg, "--exp-name", "run", "--resume", "auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "line 3 is not complete JSON" in result.stderr
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
