"""Every shipped config loads, validates against the registries and builds its model, so none rots."""

import pytest
import torch

import causalvdm
from causalvdm.config import AutoregressiveSettings, load_config
from causalvdm.distill import DistillSettings, FewStepDistillation
from causalvdm.models.pretrained import split_init_fields
from causalvdm.registry import DATASETS, SCHEDULERS, TEXT_ENCODERS, VAES, build, validate
from causalvdm.training.settings import TrainSettings
from conftest import ROOT

CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.py") if "_base_" not in p.parts)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_shipped_config_builds(path):
    cfg = load_config(path)
    model_cfg = split_init_fields(cfg.model)[0]
    big = "XL" in str(model_cfg["type"]) or "B/2" in str(model_cfg["type"])
    with torch.device("meta" if big else "cpu"):
        model = causalvdm.build_model(model_cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    for registry, key in ((VAES, "vae"), (TEXT_ENCODERS, "text_encoder"), (DATASETS, "dataset")):
        if key in cfg:
            validate(registry, cfg[key], key)  # weights and data are not shipped: check fields only
    if "diffusion" in cfg:
        build(SCHEDULERS, cfg.diffusion, "diffusion")
    if "train" in cfg:
        TrainSettings.from_cfg(cfg.train)
    ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
    if "distill" in cfg:  # the teacher is given on the command line; the student's steps must lie on the teacher's
        d = DistillSettings.from_cfg(dict(cfg.distill, teacher="teacher"))
        FewStepDistillation(build(SCHEDULERS, cfg.diffusion, "diffusion"), ar.chunk_size, ar.max_cond_frames,
                            ar.sink_frames, ar.prefix_perturb_t, d.num_steps, d.teacher_steps)
    if model.tpe_mode == "cyclic":
        assert ar.max_cond_frames + ar.chunk_size <= model.max_tpe_len, "frames in view would share a TPE index"
    if "dataset" in cfg and "vae" in cfg:
        inner = cfg.dataset
        while "dataset" in inner:  # through the wrappers (RepeatDataset, CaptionSwitchDataset)
            inner = inner["dataset"]
        assert inner["num_frames"] <= model.max_tpe_len


def test_paper_configs_follow_the_paper():
    for name in ("skytimelapse", "ucf101"):
        cfg = load_config(ROOT / "configs" / name / "xl2_256.py")
        assert cfg.model.type == "CausalSTDiT-XL/2" and cfg.model.max_tpe_len == 33
        assert cfg.dataset.num_frames == 33 and tuple(cfg.dataset.image_size) == (256, 256)
        assert cfg.autoregressive.chunk_size == 8 and cfg.autoregressive.prefix_perturb_t == 50
        assert cfg.train.lr == 2e-5 and cfg.train.mixed_precision == "bf16"
