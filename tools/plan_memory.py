"""Plan memory before a run: the expected peak of training and of sampling, per part, and what fits a GPU.

    python tools/plan_memory.py --config configs/ucf101/xl2_256.py --batch-size 4 --num-gpus 8 --gpu-mem 80GB
    python tools/plan_memory.py --config configs/demo/overfit.py --device cpu --json outputs/plan.json
    python tools/plan_memory.py --config configs/demo/overfit.py --measure train   # run a real step here, compare

Nothing is allocated: the model is built on the meta device (causalvdm.training.memory_plan). Training, per process:
fp32 weights, gradients, AdamW's two fp32 moments and the fp32 EMA (FSDP2 shards all four by the number of GPUs
and gathers one block at a time; DDP keeps full copies plus its gradient buckets), and the activations autograd
saves for the largest clean-prefix step (the longest prefix plus one chunk, up to dataset.num_frames), counted
on meta tensors, with and without gradient checkpointing; CUDA means bf16 autocast, the CPU fp32. Sampling:
weights and KV cache in the sampling dtype (bf16 on CUDA), one chunk's call with and without guidance (2B rows),
and the SD VAE's decode micro-batch. --measure runs the real thing in this process on the CPU (random data)
and prints the measured peak resident memory above the process's baseline next to the estimate.
"""

import argparse
import json
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from causalvdm.cli.common import ArgumentParser, one_line_errors, output_file, positive_int  # noqa: E402
from causalvdm.config import add_config_args, load_config  # noqa: E402
from causalvdm.models.pretrained import split_init_fields  # noqa: E402
from causalvdm.registry import ConfigError  # noqa: E402
from causalvdm.training.memory_plan import CPU_BASELINE_MB, fits, sample_plan, train_plan  # noqa: E402
from causalvdm.utils.io import write_json  # noqa: E402

log = logging.getLogger("causalvdm.plan_memory")

CALIBRATION = """calibration on this 2-core CPU (fp32; MiB above the process baseline; --measure reproduces each row):
  config (--cfg-options)                                   mode    batch  estimate  measured
  configs/debug/tiny.py (latent_size=(16,16))              train       1        41        32  (+28%, noise-sized)
  configs/debug/tiny.py (latent_size=(16,16), cfg 4.0)     sample      1        94        90  (+5%)
  configs/demo/overfit.py                                  train       8       572       539  (+6%; 459 in a rerun)
  configs/demo/overfit.py                                  sample      1       112       104  (+8%)
  configs/bench/cpu_s2.py                                  sample      1       572       585  (-2%)
  configs/bench/cpu_s2.py                                  sample      2       941       994  (-5%)
  configs/bench/cpu_s2.py (latent (16,16), max_tpe_len 17) train       1      1302      1394  (-7%)
GPU (bf16): live tensors with bf16 activations, against max_memory_allocated on an H200 (XL/2, batch 4 of 33
frames, FSDP2 on one GPU, no EMA): 80,397 MiB estimated vs 78,595 measured (+2%); with gradient checkpointing
17,949 vs 14,712 (+22%).
"""


def parse_size_mb(text: str) -> float:
    """'80GB', '80GiB', '81920MB' or a bare number of GiB -> MiB (GB read as GiB, as nvidia-smi's figures are).

    An argparse type: anything else, or a size that is not finite and > 0, is an ArgumentTypeError.
    """
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"G": 1024.0, "M": 1.0, "T": 1024.0**2}
    number, unit = (value[:-1], units[value[-1]]) if value and value[-1] in units else (value, 1024.0)
    try:
        mb = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 80GB, 80GiB or 81920MB, got {text!r}") from None
    if not (math.isfinite(mb) and mb > 0):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
    return mb


def measure(cfg, mode: str, batch_size: int, steps: int = 2) -> dict:
    """Run `steps` real training steps (or a prefill and one chunk of sampling, two denoising steps) on the CPU with random data.

    Returns the process's resident memory before building anything and its peak, in MiB.
    """
    import torch

    import causalvdm
    from causalvdm.config import AutoregressiveSettings
    from causalvdm.diffusion import clean_prefix_loss
    from causalvdm.registry import SCHEDULERS, build
    from causalvdm.training.ema import EMA
    from causalvdm.training.settings import TrainSettings
    from causalvdm.utils.memory import keep_freed_memory, peak_memory_mb, proc_status_mb, reset_peak_memory
    from causalvdm.training.memory_plan import latent_hw, train_frames

    cpu = torch.device("cpu")
    keep_freed_memory()  # as the trainer and sampler do
    ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
    h, w = latent_hw(cfg)
    torch.manual_seed(0)
    reset_peak_memory(cpu)
    baseline = proc_status_mb("VmRSS")
    model = causalvdm.build_model(split_init_fields(cfg.model)[0])
    diffusion = build(SCHEDULERS, cfg.get("diffusion", dict(type="IDDPM")), "diffusion")
    c, cc, length = model.in_channels, model.caption_channels, model.model_max_length
    y = torch.randn(batch_size, length, cc) if cc else None
    if mode == "train":
        settings = TrainSettings.from_cfg(cfg.get("train"))
        frames, prefix = train_frames(cfg, ar.chunk_size)
        model.grad_checkpointing = settings.grad_checkpointing
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ema = EMA(model, 0.99)
        x0 = torch.randn(batch_size, c, frames, h, w)
        for step in range(steps):
            gens = [torch.Generator().manual_seed(step * batch_size + i) for i in range(batch_size)]
            out = clean_prefix_loss(model, diffusion, x0, y=y, mask=None, chunk_size=ar.chunk_size, prefix_len=prefix,
                                    prefix_perturb_t=ar.prefix_perturb_t, txt_dropout_prob=0.1, generators=gens)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema.update(model)
            optimizer.zero_grad(set_to_none=True)
    else:
        from causalvdm.sampling import AutoregressiveGenerator

        scale = dict(cfg.get("sample") or {}).get("cfg_scale", 1.0)
        generator = AutoregressiveGenerator(model.eval(), diffusion, "ddim", 2, ar.chunk_size, ar.max_cond_frames,
                                            cfg_scale=scale, prefix_perturb_t=ar.prefix_perturb_t)
        first = torch.randn(batch_size, c, 1, h, w)
        generator.generate(first, 1 + ar.chunk_size, y=y, seed=0)  # the cache is allocated whole at the prefill
    return dict(baseline_mb=baseline, peak_mb=peak_memory_mb(cpu))


def print_train(plan: dict, gpu_mem_mb: float) -> None:
    print(f"training: {plan['params'] / 1e6:.1f}M parameters, batch {plan['batch_size']} per process, "
          f"{plan['frames']} frames of {plan['latent'][0]}x{plan['latent'][1]} latents, {plan['num_gpus']} process(es), "
          f"{plan['device']} ({'bf16 autocast' if plan['device'] == 'cuda' else 'fp32'}); MiB per process")
    print(f"  {'variant':<10} {'weights':>9} {'grads':>9} {'optim':>9} {'ema':>9} {'extra':>8} {'activ.':>9} "
          f"{'bwd work':>9} {'TOTAL':>9} {'max batch':>10}")
    room = fits(plan, gpu_mem_mb)
    for name, p in plan["plans"].items():
        print(f"  {name:<10} {p['weights']:9.0f} {p['grads']:9.0f} {p['optimizer']:9.0f} {p['ema']:9.0f} "
              f"{p['extra']:8.0f} {p['activations']:9.0f} {p['backward_work']:9.0f} {p['total']:9.0f} "
              f"{room[name]['max_batch_size']:10d}")
    chosen = plan["parallel"] + ("+ckpt" if plan["grad_checkpointing"] else "")
    print(f"  (the config runs {chosen}; extra = DDP gradient buckets, autocast's bf16 weight copies, or FSDP2's "
          f"gathered block; max batch per process for {gpu_mem_mb / 1024:.0f} GiB)")


def print_sample(plan: dict, gpu_mem_mb: float) -> None:
    print(f"sampling: batch {plan['batch_size']}, {plan['max_cond_frames']} cached frames + chunks of "
          f"{plan['chunk_size']}, {plan['latent'][0]}x{plan['latent'][1]} latents, {plan['device']}"
          f"{' (the config uses guidance)' if plan['guided'] else ''}; MiB")
    print(f"  {'variant':<12} {'weights':>9} {'KV cache':>9} {'text KV':>8} {'activ.':>8} {'VAE dec':>8} "
          f"{'TOTAL':>9} {'max batch':>10} {'max cond':>9}")
    room = fits(plan, gpu_mem_mb)
    for name, p in plan["plans"].items():
        print(f"  {name:<12} {p['weights']:9.0f} {p['kv_cache']:9.1f} {p['text_kv']:8.1f} {p['activations']:8.1f} "
              f"{p['vae_decode']:8.0f} {p['total']:9.0f} {room[name]['max_batch_size']:10d} "
              f"{room[name]['max_cond_frames']:9d}")
    if plan["tpe_mode"] == "cyclic":
        print(f"  (cyclic TPE also caps max_cond_frames at max_tpe_len - chunk_size = "
              f"{plan['max_tpe_len'] - plan['chunk_size']})")


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, epilog=CALIBRATION)
    parser.add_argument("--config", required=True, help="mmengine .py config")
    parser.add_argument("--batch-size", type=positive_int, help="per process (default: train.batch_size; sampling: 1)")
    parser.add_argument("--num-gpus", type=positive_int, default=1, help="processes the batch is spread over "
                        "(default 1)")
    parser.add_argument("--gpu-mem", type=parse_size_mb, default="80GB", help="memory per GPU for the 'what fits' "
                        "columns (default 80GB)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: bf16 autocast training and bf16 sampling; cpu: all fp32 plus the process baseline")
    parser.add_argument("--json", type=output_file, help="also write the plan to this JSON file (checked first)")
    parser.add_argument("--measure", choices=["train", "sample"],
                        help="run that on this CPU and print measured vs estimated MiB above the baseline (JSON line)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # A config the planner cannot use: its errors name the file or the config field.
    with one_line_errors(ConfigError, ValueError):
        cfg = load_config(args.config, args.cfg_options)
        if args.measure == "train":
            batch = args.batch_size or dict(cfg.get("train") or {}).get("batch_size", 1)
            estimate = train_plan(cfg, batch, 1, "cpu")["plans"]
            variant = "ddp+ckpt" if dict(cfg.get("train") or {}).get("grad_checkpointing") else "ddp"
        elif args.measure == "sample":
            batch = args.batch_size or 1
            estimate = sample_plan(cfg, batch, "cpu")["plans"]
            variant = "guidance" if sample_plan(cfg, batch, "cpu")["guided"] else "no guidance"
        else:
            train = train_plan(cfg, args.batch_size, args.num_gpus, args.device)
            sample = sample_plan(cfg, args.batch_size or 1, args.device)

    if args.measure:
        result = measure(cfg, args.measure, batch)
        result.update(config=args.config, mode=args.measure, batch_size=batch,
                      measured_mb=result["peak_mb"] - result["baseline_mb"],
                      estimate_mb=estimate[variant]["total"] - CPU_BASELINE_MB)
        print(json.dumps(result))
        return 0

    print_train(train, args.gpu_mem)
    print_sample(sample, args.gpu_mem)
    if args.json:
        write_json(args.json, dict(train=train, sample=sample, gpu_mem_mb=args.gpu_mem))
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
