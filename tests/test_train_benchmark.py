"""tools/benchmark_train.py on the tiny config (figures against the cost formula), and an FSDP2 bf16 step on the CPU
and on one GPU."""

import json
import math
import os
import re

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import causalvdm
from causalvdm.benchmarks.train import Workload, main, process_group, synthetic_batch, train_step
from causalvdm.config import AutoregressiveSettings, load_config
from causalvdm.diffusion import clean_prefix_loss
from causalvdm.models.utils import randomize_weights
from causalvdm.registry import SCHEDULERS, build
from causalvdm.training.distributed import parallelize
from causalvdm.training.settings import TrainSettings
from causalvdm.utils.flops import forward_flops

TINY = "configs/debug/tiny.py"
LINE = r"train_bench steps_per_s=\S+ tokens_per_s=\S+ tflops=\S+ mfu=n/a peak_mb=\S+ grad_checkpointing=(on|off)"


def test_tiny_fsdp_both_checkpointing_modes(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["--config", TINY, "--device", "cpu", "--parallel", "fsdp", "--grad-checkpointing", "both",
            "--steps", "2", "--warmup-steps", "1", "--json", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [re.fullmatch(LINE, line).group(1) for line in lines] == ["on", "off"]
    assert "RANK" not in os.environ and not dist.is_initialized()  # the one-process group left no trace

    figures = json.loads(out.read_text())
    model = causalvdm.build_model(dict(load_config(TINY).model))
    # 33 frames, chunks of 8: the prefix is fixed to 25, so all 33 frames are fed; 4x4 latents, 2x2 patches: S = 4
    assert (figures["frames_fed"], figures["prefix_len"], figures["tokens_per_frame"]) == (33, 25, 4)
    assert figures["tokens_per_step"] == 4 * 33 * 4
    assert figures["flops_per_step"] == 3 * forward_flops(model, 4, 33, 4, 4, text_tokens=6)
    assert figures["peak_tflops"] is None  # no MFU on a CPU without --peak-tflops
    for run in figures["runs"]:
        assert run["status"] == "ok" and run["loss_finite"] and run["mfu"] is None and run["peak_mb"] > 0
        assert math.isclose(run["steps_per_s"], 2 / run["seconds"])
        assert math.isclose(run["tokens_per_s"], figures["tokens_per_step"] * run["steps_per_s"])
        assert math.isclose(run["tflops"], figures["flops_per_step"] * run["steps_per_s"] / 1e12)


def test_forward_flops_are_torch_count_of_the_step():
    """The per-step cost is torch's own count of the forward the benchmark feeds (math attention, whose products
    FlopCounterMode counts; it skips the fused CPU kernel), with the prefix fixed at 25 of 33 frames."""
    model = randomize_weights(causalvdm.build_model(dict(load_config(TINY).model)), seed=0).train()
    x0, y, mask = synthetic_batch(model, 2, 33, 4, 4, torch.device("cpu"), seed=0)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    diffusion = build(SCHEDULERS, dict(type="IDDPM"), "diffusion")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        clean_prefix_loss(model, diffusion, x0, y=y, mask=mask, chunk_size=8, prefix_len=25, prefix_perturb_t=50,
                          txt_dropout_prob=0.1, generators=generators)
    assert counter.get_total_flops() == forward_flops(model, 2, 33, 4, 4, text_tokens=6)


def test_peak_override_gives_mfu(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["--config", TINY, "--device", "cpu", "--parallel", "none", "--steps", "1", "--warmup-steps", "0",
            "--peak-tflops", "2", "--json", str(out)]
    assert main(argv) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["grad_checkpointing"] is False  # the tiny config's train.grad_checkpointing (the default)
    assert math.isclose(run["mfu"], run["tflops"] / 2)
    assert re.search(r" mfu=\d\.\d{3} ", capsys.readouterr().out)


@pytest.mark.parametrize("options, message", [
    (["dataset.num_frames=5"], r"5 frames \(dataset.num_frames, else model.max_tpe_len\) cannot hold"),
    (["latent_size=(5,4)"], r"latent_size 5x4 is not a multiple of the 2x2 patch"),
    (["model.depthh=2"], r"depthh"),
])
def test_bad_config_is_one_line(options, message):
    with pytest.raises(SystemExit, match=rf"^error: {TINY}: .*{message}"):
        main(["--config", TINY, "--device", "cpu", "--cfg-options", *options])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fsdp2_bf16_step(device):
    """One trainer step of a small text-conditioned model, FSDP2 with its bf16 policy in a one-process group (gloo
    on the CPU, NCCL on a GPU), bf16 autocast."""
    cfg = load_config(TINY)
    device = torch.device(device)
    with process_group("fsdp", device) as info:
        model = randomize_weights(causalvdm.build_model(dict(cfg.model)), seed=0)  # every parameter gets a gradient
        model = parallelize(model, "fsdp", info, bf16=True).train()  # the benchmark's FSDP2 bf16 policy
        before = {name: p.full_tensor().clone() for name, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # only gradients move weights
        w = Workload(2, (17, 8, 8), 9, build(SCHEDULERS, dict(type="IDDPM"), "diffusion"), AutoregressiveSettings(),
                     TrainSettings(txt_dropout_prob=0.0), torch.autocast(device.type, dtype=torch.bfloat16), bf16=True,
                     tokens_per_step=0, flops_per_step=0, peak_tflops=None)
        loss = train_step(model, optimizer, synthetic_batch(model, 2, 17, 8, 8, info.device, seed=0), 0, w)
        after = {name: p.full_tensor() for name, p in model.named_parameters()}
    assert math.isfinite(loss) and info.device.type == device.type
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    # The null caption is used only for dropped captions (none at probability 0).
    assert unchanged == ["y_embedder.y_embedding"], unchanged
