"""Train a causal ST-DiT with the clean-prefix objective; launched by scripts/train.sh through torchrun.

    bash scripts/train.sh configs/demo/overfit.py overfit_demo            # one CPU process or GPU 0
    bash scripts/train.sh CONFIG EXP 29500 0,1,2,3 --resume auto          # four GPUs, resume the newest checkpoint

Everything of a run goes to <outputs_dir>/<exp_name>/: config.py, train.log, metrics.jsonl, tensorboard/,
checkpoints/step_*/ (model, EMA, optimizer, schedule, step, data position, RNG), loss.png, samples/.
"""

import argparse
import logging
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

import causalvdm
from causalvdm.config import AutoregressiveSettings, add_config_args, load_config, require
from causalvdm.data import StatefulSampler, build_dataloader
from causalvdm.diffusion import clean_prefix_loss, prefix_lengths
from causalvdm.models.pretrained import build_model_from_config
from causalvdm.registry import DATASETS, SCHEDULERS, TEXT_ENCODERS, VAES, ConfigError, build
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.sampling.writer import StreamingVideoWriter, to_uint8
from causalvdm.training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from causalvdm.training.distributed import all_reduce_mean, any_process, init_distributed, parallelize, unwrap
from causalvdm.training.ema import EMA
from causalvdm.training.logger import RunLogger
from causalvdm.training.settings import TrainSettings, check_clip_shape
from causalvdm.utils.io import CheckpointError
from causalvdm.utils.memory import keep_freed_memory, peak_memory_mb

log = logging.getLogger("causalvdm.train")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="mmengine .py config (model, vae, text_encoder, diffusion, dataset, autoregressive, train)")
    parser.add_argument("--exp-name", help="run name; outputs go to <train.outputs_dir>/<exp-name> (default: config file stem)")
    parser.add_argument("--resume", help="'auto' continues from the newest complete checkpoint of the run (fresh start if "
                        "none); or a checkpoint directory")
    add_config_args(parser)
    return parser.parse_args(argv)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, micro-step, dataset index): same on every process layout."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (2**63 - 1)
    return value


def batches(loader_for_epoch, epoch: int, consumed: int):
    """Endless batches over epochs; yields (batch, epoch, consumed-after) so checkpoints record the data position."""
    while True:
        loader = loader_for_epoch(epoch, consumed)
        for batch in loader:
            consumed += len(batch["index"])
            yield batch, epoch, consumed
        epoch, consumed = epoch + 1, 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.cfg_options)  # these errors name the file themselves
        require(cfg, "model", "diffusion", "dataset")
    except ConfigError as err:
        sys.exit(f"error: {err}")
    try:
        settings = TrainSettings.from_cfg(cfg.get("train"))
    except ConfigError as err:
        sys.exit(f"error: {args.config}: {err}")
    info = init_distributed()
    exp_name = args.exp_name or Path(args.config).stem
    run_dir = Path(settings.outputs_dir) / exp_name
    ckpt_dir = run_dir / "checkpoints"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.dump(str(run_dir / "config.py"))
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    handler = logging.FileHandler(run_dir / "train.log") if info.is_main else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    keep_freed_memory()
    try:
        return train(cfg, settings, args, info, run_dir, ckpt_dir)
    except (ConfigError, CheckpointError) as err:
        log.error("%s: %s", args.config, err)
        return 2
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, settings: TrainSettings, args, info, run_dir: Path, ckpt_dir: Path) -> int:
    torch.manual_seed(settings.seed)
    ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
    ar_size, prefix_perturb_t = ar.chunk_size, ar.prefix_perturb_t
    use_bf16 = settings.mixed_precision == "bf16" or (settings.mixed_precision == "auto" and info.device.type == "cuda")
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # ---- components, all from the config's registries
    model = build_model_from_config(cfg.model)
    model.grad_checkpointing = settings.grad_checkpointing
    diffusion = build(SCHEDULERS, cfg.diffusion, "diffusion")
    text_encoder = build(TEXT_ENCODERS, cfg.get("text_encoder", dict(type="NullTextEncoder")), "text_encoder")
    dataset = build(DATASETS, cfg.dataset, "dataset")
    vae = None  # see get_vae()
    log.info("model: %.2fM parameters, %d training clips, %d process(es) on %s",
             sum(p.numel() for p in model.parameters()) / 1e6, len(dataset), info.world_size, info.device)

    model = parallelize(model, settings.parallel, info)
    core = unwrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                  betas=tuple(settings.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0)
    ema = EMA(core, settings.ema_decay)

    # ---- resume
    step, epoch, consumed, nonfinite_total = 0, 0, 0, 0
    resume_from = resolve_resume(args.resume, ckpt_dir)
    if resume_from is not None:
        model_state, ema_state, state = load_checkpoint(resume_from)
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        ema.load_state_dict(ema_state)
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, consumed = state["step"], state["epoch"], state["consumed"]
        nonfinite_total = state["nonfinite_total"]
        torch.set_rng_state(state["rng_cpu"])
        log.info("resumed from %s (step %d, epoch %d, %d samples into it)", resume_from, step, epoch, consumed)
    elif args.resume:
        log.info("--resume %s: no complete checkpoint in %s, starting fresh", args.resume, ckpt_dir)

    sampler = StatefulSampler(len(dataset), info.rank, info.world_size, settings.seed)
    sampler.set_epoch(0)
    if len(sampler) < settings.batch_size:
        raise ConfigError(f"dataset: {len(sampler)} clip(s) per process, fewer than train.batch_size="
                          f"{settings.batch_size}; wrap it in dict(type='RepeatDataset', dataset=..., times=N)")

    def loader_for_epoch(ep: int, start: int):
        sampler.set_epoch(ep, start)
        dataset.set_epoch(ep)
        return build_dataloader(dataset, settings.batch_size, settings.num_workers, sampler, settings.seed)

    data_iter = batches(loader_for_epoch, epoch, consumed)
    run_logger = RunLogger(run_dir, settings.wandb, cfg.to_dict(), resume_step=step) if info.is_main else None

    stop = {"sigterm": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))  # cluster pre-emption: save, then exit

    def checkpoint() -> None:
        """Save on the main process; a failed write (a full disk) stops every process, older checkpoints intact."""
        model_state = get_model_state_dict(model, options=FULL)
        optim_state = get_optimizer_state_dict(model, optimizer, options=FULL)
        ema_state = ema.state_dict()
        failure = ""
        if info.is_main:
            train_state = dict(step=step, epoch=epoch, consumed=consumed, optimizer=optim_state,
                               scheduler=scheduler.state_dict(), nonfinite_total=nonfinite_total,
                               rng_cpu=torch.get_rng_state())
            try:
                path = save_checkpoint(ckpt_dir, step, model_state, ema_state, train_state, cfg.pretty_text,
                                       settings.keep_last)
                run_logger.plot_loss()
                log.info("saved %s", path)
            except OSError as err:
                failure = str(err) or type(err).__name__
        if any_process(bool(failure), info):
            raise CheckpointError(f"writing the step-{step} checkpoint failed ({failure or 'on the main process'}); "
                                  f"earlier checkpoints in {ckpt_dir} are intact: free space and rerun with --resume auto")

    def get_vae():
        """The VAE, built on first use: training from cached latents never touches it."""
        nonlocal vae
        if vae is None:
            vae = build(VAES, cfg.vae, "vae").to(info.device).eval()
        return vae

    def encode(batch) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(info.device)
        with torch.no_grad(), autocast:
            return get_vae().encode(batch["video"].to(info.device)).float()

    def validate() -> None:
        """Sample a clip from the first frame of the first training clip with the EMA weights, into samples/."""
        ema_state = ema.state_dict()  # a collective under FSDP: every rank takes part
        if not info.is_main:
            return
        val_model = causalvdm.build_model({k: v for k, v in cfg.model.items() if k != "from_pretrained"})
        val_model.load_state_dict(ema_state)
        val_model.to(info.device).eval()
        generator = AutoregressiveGenerator(val_model, diffusion, settings.validation_sampler, settings.validation_steps,
                                            ar.chunk_size, ar.max_cond_frames, prefix_perturb_t=ar.prefix_perturb_t)
        with torch.no_grad():
            y, mask = text_encoder.encode([first["caption"]])
        latents = generator.generate(first_latents[:, :, :1], settings.validation_frames or 2 * core.max_tpe_len,
                                     y, mask, seed=settings.seed)
        with torch.no_grad():
            video = get_vae().decode(latents)[0]  # (3, T, H, W)
        path = run_dir / "samples" / f"step_{step:08d}.mp4"
        with StreamingVideoWriter(path, 8, video.shape[-1], video.shape[-2]) as writer:
            writer.write(to_uint8(video))
        log.info("validation clip: %s", path)

    # ---- the loop
    first = dataset[0]  # pre-flight: one clip through the VAE, so a shape mistake fails now in one line
    first_latents = encode({k: v[None] for k, v in first.items() if k in ("video", "latents")})
    check_clip_shape(core, tuple(first_latents.shape[1:]), ar_size)
    model.train()
    if isinstance(text_encoder, torch.nn.Module):
        text_encoder.to(info.device)
    nonfinite_run, skipped_files, window_start, window_steps = 0, 0, time.time(), 0
    window = dict(loss=0.0, mse=0.0, vb=0.0)  # sums over the steps since the last log line
    bar = tqdm(total=settings.max_steps, initial=step, disable=not info.is_main, desc="train", dynamic_ncols=True)
    while step < settings.max_steps:
        loss_sum, mse_sum, vb_sum = 0.0, 0.0, 0.0
        for micro in range(settings.grad_accum_steps):
            batch, batch_epoch, consumed = next(data_iter)
            if batch_epoch != epoch:
                log.info("epoch %d done; unreadable files skipped so far: %d", epoch, skipped_files)
                epoch = batch_epoch
            skipped_files += int(batch["skipped"].sum())
            x0 = encode(batch)
            with torch.no_grad():
                y, mask = text_encoder.encode(list(batch["caption"]))
            lengths = prefix_lengths(x0.shape[2], ar_size)
            step_gen = torch.Generator().manual_seed(sample_seed(settings.seed, step, micro))
            prefix_len = lengths[int(torch.randint(len(lengths), (1,), generator=step_gen))]
            gens = [torch.Generator().manual_seed(sample_seed(settings.seed, step, micro, int(i)))
                    for i in batch["index"]]
            last = micro == settings.grad_accum_steps - 1
            sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync, autocast:
                out = clean_prefix_loss(model, diffusion, x0, y=y, mask=mask, ar_size=ar_size, prefix_len=prefix_len,
                                        prefix_perturb_t=prefix_perturb_t, txt_dropout_prob=settings.txt_dropout_prob,
                                        generators=gens)
                (out["loss"] / settings.grad_accum_steps).backward()
            loss_sum += out["loss"].item() / settings.grad_accum_steps
            mse_sum += out["mse"] / settings.grad_accum_steps
            vb_sum += out["vb"] / settings.grad_accum_steps

        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        finite = math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm))
        if any_process(not finite, info):
            nonfinite_run += 1
            nonfinite_total += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step + 1, nonfinite_run)
        else:
            nonfinite_run = 0
            optimizer.step()
            ema.update(core)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        window_steps += 1
        for key, value in (("loss", loss_sum), ("mse", mse_sum), ("vb", vb_sum)):
            window[key] += value
        bar.update(1)

        if step % settings.log_every == 0 or step == settings.max_steps or nonfinite_run:
            elapsed = time.time() - window_start
            metrics = {key: all_reduce_mean(total / window_steps, info) for key, total in window.items()}
            metrics.update(grad_norm=float(grad_norm),
                           lr=scheduler.get_last_lr()[0], steps_per_s=window_steps / max(elapsed, 1e-9),
                           memory_gb=peak_memory_mb(info.device) / 1024, prefix_len=prefix_len, skipped_files=skipped_files,
                           nonfinite_steps=nonfinite_total)
            if info.is_main:
                run_logger.log(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            window_start, window_steps = time.time(), 0
            window = dict.fromkeys(window, 0.0)
        if nonfinite_run >= settings.max_nonfinite_steps:
            log.error("stopping: %d non-finite steps in a row; the last good checkpoint in %s is intact",
                      nonfinite_run, ckpt_dir)
            return 3
        pre_empted = any_process(stop["sigterm"], info)
        if step % settings.ckpt_every == 0 or step == settings.max_steps or pre_empted:
            checkpoint()
        if pre_empted:
            log.info("SIGTERM: checkpoint saved at step %d, exiting", step)
            return 0
        if settings.validation_every and step % settings.validation_every == 0:
            validate()
    bar.close()
    if info.is_main:
        log.info("done: %d steps; skipped unreadable files: %d; non-finite steps: %d", step, skipped_files, nonfinite_total)
        run_logger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
