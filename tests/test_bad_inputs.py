"""Every bad input we know of gets one line that says what is wrong and where, never a bare stack trace.

Each case is tried against the real entrypoint (scripts/train.py or scripts/sample.py, in-process) or
the real component: TRAIN_CASES (config overrides), the manifest cases, missing top-level and
component fields, missing and unparsable config files, truncated and incomplete checkpoints, a prompt
longer than the tokenizer limit, an unknown registry type, bad model input shapes, and SAMPLE_CASES.
"""

import json
import logging
import re
import shutil

import pytest
import torch

from causalvdm.registry import ConfigError, build, TEXT_ENCODERS
from test_sampling import sample_setup  # noqa: F401  (a fixture: tiny config, checkpoints, image, video)
from test_training import _config

# (case, --cfg-options overrides, message expected in the single ERROR line)
TRAIN_CASES = [
    ("unknown model type", ["model.type=NoSuchModel"], r"model\.type: unknown model type 'NoSuchModel'"),
    ("unknown vae type", ["vae.type=NoSuchVAE"], r"vae\.type: unknown vae type 'NoSuchVAE'"),
    ("unknown diffusion field", ["diffusion.steps=10"], r"diffusion: unknown field\(s\) steps for IDDPM"),
    ("unknown dataset field", ["dataset.colour=1"], r"dataset: unknown field\(s\) colour for VideoManifestDataset"),
    ("unknown train field", ["train.lrr=0.1"], r"train: unknown field\(s\) lrr"),
    ("bad train value", ["train.parallel=zero3"], r"train\.parallel must be 'ddp' or 'fsdp'"),
    ("bad prediction type", ["diffusion.prediction_type=x0"], r"diffusion \(IDDPM\): .*prediction_type"),
    ("image size not a multiple of VAE factor x patch", ["dataset.image_size=(10,10)"],
     r"dataset\.image_size gives 5x5 latents, not a multiple of the 2x2 patch"),
    ("latent channels differ from the model", ["model.in_channels=4"],
     r"model\.in_channels=4, but the VAE gives 12 latent channels"),
    ("clip longer than the TPE table", ["dataset.num_frames=12"],
     r"dataset\.num_frames=12 exceeds model\.max_tpe_len=9 \(cyclic TPE\)"),
    ("chunk larger than the clip allows", ["autoregressive.chunk_size=9"],
     r"dataset\.num_frames=9 must hold one clean frame plus a chunk of autoregressive\.chunk_size=9"),
    ("missing pretrained checkpoint", ["model.from_pretrained=/nonexistent/init.pth"], r"/nonexistent/init\.pth"),
    ("missing T5 folder", ["text_encoder.from_pretrained=/nonexistent/t5"],
     r"/nonexistent/t5.*text_encoder\.from_pretrained"),
    ("missing data root", ["dataset.root=/nonexistent/videos"], r"/nonexistent/videos: dataset root is not a directory"),
    ("batch larger than the dataset", ["train.batch_size=64"], r"fewer than train\.batch_size=64"),
    # layouts no sampler could use, found before step 1 instead of after the run
    ("queue and chunk beyond the cyclic TPE", ["autoregressive.max_cond_frames=8"],
     r"autoregressive: cyclic TPE: max_cond_frames \+ chunk_size = 12 frames in view exceed max_tpe_len=9"),
    ("sink beyond the cyclic TPE", ["autoregressive.sink_frames=2", "autoregressive.max_cond_frames=4"],
     r"autoregressive: cyclic TPE: sink_frames \+ max_cond_frames \+ chunk_size = 10 frames in view"),
    ("spatial prefix longer than the queue", ["model.spatial_prefix=prev_frames_4", "autoregressive.max_cond_frames=3"],
     r"autoregressive: spatial_prefix='prev_frames_4' reads more frames than the max_cond_frames=3"),
    ("misspelt section", ["trian.lr=1e-4"], r"unknown section 'trian' \(did you mean 'train'\?\)"),
]


def _run_train(train_script, cfg, overrides, caplog, extra=()):
    """Run the trainer; -> (exit code, error lines). Config-level errors exit before logging starts."""
    caplog.clear()
    argv = [str(cfg), "--exp-name", "bad", *extra] + (["--cfg-options", *overrides] if overrides else [])
    try:
        code = train_script.main(argv)
    except SystemExit as stop:
        return 2, [str(stop.code)]
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("case, overrides, message", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_training_config(case, overrides, message, tmp_path, video_root, t5_dir, train_script, caplog):
    cfg = _config(tmp_path, video_root, t5_dir)
    code, errors = _run_train(train_script, cfg, overrides, caplog)
    assert code == 2, case
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert str(cfg) in errors[0]  # where: the config file
    assert re.search(message, errors[0]), errors[0]


@pytest.mark.parametrize("content, message", [
    ("", r"manifest has no rows"),
    ('{"path": "clip0.mp4", "caption": "a"}\nnot json\n', r"line 2: invalid JSON"),
    ('{"caption": "a"}\n', r"line 1: missing or empty field 'path'"),
    ('{"path": "clip0.mp4"}\n', r"line 1: missing field 'caption'"),
], ids=["empty", "malformed", "no path", "no caption"])
def test_bad_manifests(content, message, tmp_path, video_root, t5_dir, train_script, caplog):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(content)
    cfg = _config(tmp_path, video_root, t5_dir)
    code, errors = _run_train(train_script, cfg, [f"dataset.manifest={manifest}"], caplog)
    assert code == 2 and len(errors) == 1
    assert str(manifest) in errors[0] and re.search(message, errors[0]), errors[0]


def test_missing_top_level_field(tmp_path, video_root, t5_dir, train_script):
    cfg = _config(tmp_path, video_root, t5_dir)
    text = cfg.read_text()
    cfg.write_text(text[: text.index("dataset = ")] + text[text.index("autoregressive = "):])
    with pytest.raises(SystemExit, match=r"error: .*train_cfg\.py: missing field 'dataset'"):
        train_script.main([str(cfg)])


def test_missing_field_of_a_component(tmp_path, video_root, t5_dir, train_script, caplog):
    cfg = _config(tmp_path, video_root, t5_dir)
    cfg.write_text(cfg.read_text().replace(f'root="{video_root}", ', ""))
    code, errors = _run_train(train_script, cfg, [], caplog)
    assert code == 2 and "dataset: missing field(s) root for VideoManifestDataset" in errors[0]


def test_missing_and_unparsable_config_files(tmp_path, train_script):
    with pytest.raises(SystemExit, match=r"error: .*nope\.py: config file not found"):
        train_script.main([str(tmp_path / "nope.py")])
    broken = tmp_path / "broken.py"
    broken.write_text("model = dict(\n")
    with pytest.raises(SystemExit, match=r"error: .*broken\.py: cannot parse config"):
        train_script.main([str(broken)])


def test_truncated_checkpoint_to_resume(tmp_path, video_root, t5_dir, train_script, caplog):
    cfg = _config(tmp_path, video_root, t5_dir, steps=2, ckpt_every=2)
    assert train_script.main([str(cfg), "--exp-name", "trunc"]) == 0
    ckpt = tmp_path / "outputs" / "trunc" / "checkpoints" / "step_00000002"
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, errors = _run_train(train_script, cfg, [], caplog, extra=("--resume", str(ckpt)))
    assert code == 2 and len(errors) == 1
    assert "model.safetensors: not a readable checkpoint" in errors[0]
    code, errors = _run_train(train_script, cfg, [], caplog, extra=("--resume", str(tmp_path)))
    assert code == 2 and "not a complete checkpoint directory" in errors[0]


def test_prompt_longer_than_tokenizer_limit_warns_once(t5_dir, caplog):
    encoder = build(TEXT_ENCODERS, dict(type="T5Encoder", from_pretrained=str(t5_dir), model_max_length=8), "text_encoder")
    with caplog.at_level(logging.WARNING):
        y, mask = encoder.encode(["a prompt that is much longer than eight byte tokens", "short"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "longer than model_max_length=8" in warnings[0]
    assert y.shape[1] == 8 and mask[0].all()


def test_unknown_registry_type_lists_known_ones():
    with pytest.raises(ConfigError, match=r"^text_encoder\.type: unknown text_encoder type 'T6' \(known: .*T5Encoder"):
        build(TEXT_ENCODERS, dict(type="T6"), "text_encoder")


def test_model_rejects_bad_shapes(make_model):
    model = make_model()
    with pytest.raises(ValueError, match=r"latent size 5x4 is not a multiple of the patch size 2x2"):
        model(torch.randn(1, 4, 2, 5, 4), torch.zeros(1, 2, dtype=torch.long))
    cache = model.new_cache(1, 4, chunk_size=2)
    with pytest.raises(ValueError, match=r"3 frames in one call, but the cache stages at most chunk_size=2"):
        model.write_cache(torch.randn(1, 4, 3, 4, 4), cache)
    with pytest.raises(ValueError, match=r"beyond max_tpe_len=33 in 'absolute' TPE mode"):
        make_model(tpe_mode="absolute")(torch.randn(1, 4, 34, 2, 2), torch.zeros(1, 34, dtype=torch.long))


# (case, sample.py flags, message expected in the single "error:" line)
SAMPLE_CASES = [
    ("missing checkpoint", ["--ckpt", "{root}/nowhere"], "checkpoint not found"),
    ("checkpoint of another architecture", ["--ckpt", "{root}/ckpt3"], "not a checkpoint of this model architecture"),
    ("unknown sampler", ["--ckpt", "{root}/ckpt2", "--sampler", "euler"], "unknown sampler 'euler'"),
    ("unreadable first image", ["--ckpt", "{root}/ckpt2", "--first-image", "{root}/cfg2.py"], "cannot read image"),
    ("missing first image", ["--ckpt", "{root}/ckpt2", "--first-image", "{root}/none.png"], "none.png"),
    ("more given frames than the video has", ["--ckpt", "{root}/ckpt2", "--first-video", "{root}/real.mp4",
                                              "--first-frames", "30"], "has 20 frames, --first-frames asks for 30"),
    ("chunk and queue beyond the cyclic TPE", ["--ckpt", "{root}/ckpt2", "--cfg-options",
                                               "autoregressive.max_cond_frames=16"],
     "max_cond_frames + chunk_size = 20 frames in view exceed max_tpe_len=17"),
    ("unknown sample field", ["--ckpt", "{root}/ckpt2", "--cfg-options", "sample.steps=3"],
     "sample: unknown field(s) steps"),
    ("output name climbing out of --out", ["--ckpt", "{root}/ckpt2", "--name", "../escaped"],
     "--name '../escaped' must be a plain name"),
    ("absolute output name", ["--ckpt", "{root}/ckpt2", "--name", "/tmp/escaped"], "must be a plain name"),
    # flags that the settings in force would ignore
    ("first frames without a first video", ["--ckpt", "{root}/ckpt2", "--first-image", "{root}/first.png",
                                            "--first-frames", "2"], "--first-frames takes frames from a first video"),
    ("eval length without a first video", ["--ckpt", "{root}/ckpt2", "--eval-len", "8"],
     "--eval-len sets the PSNR range against a first video's real frames"),
    ("recache without a switch", ["--ckpt", "{root}/ckpt2", "--recache-on-switch"],
     "--recache-on-switch re-encodes at prompt switches, and there are none"),
    ("a name for a whole manifest", ["--ckpt", "{root}/ckpt2", "--manifest", "{root}/cfg2.py", "--name", "x"],
     "--name names a single video"),
    ("weights of a single weights file", ["--ckpt", "{root}/ckpt2/ema.safetensors", "--weights", "model"],
     "--weights picks ema or model weights of a training checkpoint directory"),
    ("a misspelt section", ["--ckpt", "{root}/ckpt2", "--cfg-options", "sampel.num_steps=3"],
     "unknown section 'sampel' (did you mean 'sample'?)"),
    ("an output folder that is a file", ["--ckpt", "{root}/ckpt2", "--out", "{root}/cfg2.py"], "is a file, not a folder"),
]


@pytest.mark.parametrize("case, extra, message", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_bad_sampling_input(case, extra, message, sample_setup, tmp_path):
    from causalvdm.cli import sample

    argv = [str(sample_setup / "cfg2.py"), "--out", str(tmp_path)] + [a.format(root=sample_setup) for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not list(tmp_path.glob("*.mp4"))


# (what the config in use changes, the override, the error's start) for a checkpoint that keeps its config.py
MEANING_CASES = [
    ("prediction type", "diffusion.prediction_type=v_prediction",
     "diffusion.prediction_type is 'epsilon' in the checkpoint's config.py but 'v_prediction'"),
    ("learned sigma", "diffusion.learn_sigma=False", "diffusion.learn_sigma is True in the checkpoint's config.py"),
    ("TPE mode", "model.tpe_mode=rope", "model.tpe_mode is 'cyclic' in the checkpoint's config.py but 'rope'"),
    ("TPE length", "model.max_tpe_len=33", "model.max_tpe_len is 17 in the checkpoint's config.py but 33"),
    ("sink", "autoregressive.sink_frames=1", "autoregressive.sink_frames is 0 in the checkpoint's config.py but 1"),
    ("spatial prefix", "model.spatial_prefix=first_frame", "model.spatial_prefix is None in the checkpoint's config.py"),
    ("patch size", "model.patch_size=(1,1,1)", "model.patch_size is (1, 2, 2) in the checkpoint's config.py"),
    ("channels", "model.in_channels=4", "model.in_channels is 12 in the checkpoint's config.py but 4"),
]


def _checkpoint_with_its_config(sample_setup, tmp_path):
    """A copy of the fixture's checkpoint ckpt2 that keeps the config it was made with, as training writes one."""
    ckpt = tmp_path / "step_00000002"
    shutil.copytree(sample_setup / "ckpt2", ckpt)
    shutil.copy(sample_setup / "cfg2.py", ckpt / "config.py")
    return ckpt


@pytest.mark.parametrize("case, override, message", MEANING_CASES, ids=[c[0] for c in MEANING_CASES])
def test_a_checkpoint_is_read_as_what_its_config_says(case, override, message, sample_setup, tmp_path):
    from causalvdm.cli import sample

    ckpt = _checkpoint_with_its_config(sample_setup, tmp_path)
    argv = [str(sample_setup / "cfg2.py"), "--ckpt", str(ckpt), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv + ["--cfg-options", override])
    text = str(exit_info.value.code)
    assert text.startswith(f"error: {ckpt}: {message}") and "\n" not in text, text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("with_config", [True, False], ids=["config-given", "ckpt-only"])
def test_a_hugging_face_folder_is_not_taken_for_a_checkpoint(with_config, sample_setup, t5_dir, tmp_path):
    from causalvdm.cli import sample

    argv = ([str(sample_setup / "cfg2.py")] if with_config else []) + ["--ckpt", str(t5_dir), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    assert str(exit_info.value.code) == (f"error: {t5_dir}: not a causalvdm checkpoint: its config.json has no "
                                         "'model' section; a Hugging Face model folder (model_type 't5')?")


def test_settings_that_only_change_sampling_may_differ_from_the_checkpoints(sample_setup, tmp_path):
    from causalvdm.cli import sample

    ckpt = _checkpoint_with_its_config(sample_setup, tmp_path)
    assert sample.main([str(sample_setup / "cfg2.py"), "--ckpt", str(ckpt), "--out", str(tmp_path), "--num-steps", "1",
                        "--sampler", "iddpm", "--num-frames", "6", "--cfg-options", "sample.cfg_scale=2.0"]) == 0


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "sub/escaped", ".."])
def test_manifest_names_stay_in_the_output_folder(name, sample_setup, tmp_path):
    from causalvdm.cli import sample

    out = tmp_path / "out"
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"name": name}) + "\n")
    argv = [str(sample_setup / "cfg2.py"), "--ckpt", str(sample_setup / "ckpt2"), "--out", str(out), "--manifest",
            str(manifest)]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    text = str(exit_info.value.code)
    assert text.startswith(f"error: {manifest}: line 1: name ") and "must be a plain name" in text, text
    assert not list(tmp_path.rglob("*.mp4"))


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "a/b"])
def test_exp_name_stays_in_the_outputs_folder(name, tmp_path, video_root, t5_dir, train_script):
    cfg = _config(tmp_path, video_root, t5_dir)
    with pytest.raises(SystemExit, match=r"error: --exp-name .* must be a plain name"):
        train_script.main([str(cfg), "--exp-name", name])
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "outputs").exists()


def test_a_full_disk_while_writing_a_video_is_one_line(sample_setup, tmp_path, monkeypatch):
    import errno

    from causalvdm.cli import sample
    from causalvdm.sampling import writer

    def full(self, frames):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "first.mp4"))

    monkeypatch.setattr(writer.StreamingVideoWriter, "write", full)
    argv = [str(sample_setup / "cfg2.py"), "--ckpt", str(sample_setup / "ckpt2"), "--out", str(tmp_path),
            "--first-image", str(sample_setup / "first.png")]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    assert str(exit_info.value.code) == f"error: {tmp_path / 'first.mp4'}: No space left on device"


def test_pipeline_call_checks_its_arguments(sample_setup):
    from causalvdm.config import load_config
    from causalvdm.pipeline import CausalVDMPipeline, SampleSettings

    cfg = load_config(sample_setup / "cfg2.py")
    pipe = CausalVDMPipeline.from_config(cfg, SampleSettings.from_cfg(cfg.get("sample")), torch.device("cpu"))
    for kwargs, message in ((dict(num_frames=0), r"sample\.num_frames must be >= 1, got 0"),
                            (dict(cfg_scale=float("nan")), r"sample\.cfg_scale must be a finite number"),
                            (dict(num_steps=-1), r"sample\.num_steps must be >= 1"),
                            (dict(mode="fast"), r"sample\.mode must be 'cache' or 'recompute'"),
                            (dict(deblock=-1.0), r"sample\.deblock must be >= 0, got -1\.0")):
        with pytest.raises(ConfigError, match=message):
            pipe(**kwargs)
