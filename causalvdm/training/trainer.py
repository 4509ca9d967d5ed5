"""The training loop: a `Trainer` built from a config and its `TrainSettings`, read top to bottom in `fit()`.

    trainer = Trainer(cfg, TrainSettings.from_cfg(cfg.train), Path("outputs/run"), init_distributed())
    trainer.fit(resume="auto")

`compute_loss(batch, micro)` is the objective (Ca2-VDM's clean-prefix loss); a trainer with another
objective (e.g. distillation) subclasses and overrides it, reusing the step, EMA, logging, checkpoints and resume.
"""

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from causalvdm.config import AutoregressiveSettings
from causalvdm.data import StatefulSampler, build_dataloader, default_num_workers
from causalvdm.diffusion import clean_prefix_loss, prefix_lengths
from causalvdm.models.pretrained import build_model_from_config, split_init_fields
from causalvdm.models.saved_config import check_saved_config
from causalvdm.registry import DATASETS, SCHEDULERS, TEXT_ENCODERS, VAES, ConfigError, build
from causalvdm.training.checkpoint import resolve_resume, restore_checkpoint, save_checkpoint, save_optimizer_shards
from causalvdm.training.distributed import DistInfo, all_reduce_mean, any_process, parallelize, unwrap
from causalvdm.training.ema import EMA
from causalvdm.training.logger import RunLogger
from causalvdm.training.memory_plan import estimate_line
from causalvdm.training.settings import TrainSettings, check_clip_shape, lr_factor
from causalvdm.training.stop import StopRequest
from causalvdm.training.validation import Validator
from causalvdm.utils.io import check_free_space, writable_dir
from causalvdm.utils.memory import peak_memory_mb
from causalvdm.utils.weights import CheckpointError

log = logging.getLogger("causalvdm.train")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, micro-step, dataset index): same on every process layout."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (2**63 - 1)
    return value


class Trainer:
    """Trains `cfg.model` on `cfg.dataset`, writing logs, checkpoints and samples to `run_dir`.

    Counters that a checkpoint records (step, epoch, consumed, nonfinite_total) live on the trainer. Another
    objective overrides `compute_loss` (and `build` for extra models, e.g. a frozen teacher) and keeps the rest.
    """

    def __init__(self, cfg, settings: TrainSettings, run_dir: Path, info: DistInfo):
        self.cfg, self.settings, self.run_dir, self.info = cfg, settings, Path(run_dir), info
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
        s = settings
        self.use_bf16 = s.mixed_precision == "bf16" or (s.mixed_precision == "auto" and info.device.type == "cuda")
        self.autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()
        self.step, self.epoch, self.consumed, self.nonfinite_total = 0, 0, 0, 0
        self.nonfinite_run, self.skipped_files = 0, 0
        self.stop = StopRequest()
        self._vae = None

    # ---- set-up

    def build(self) -> None:
        """Components from the config's registries, the wrapped model, optimizer, LR schedule and EMA."""
        s, info = self.settings, self.info
        torch.manual_seed(s.seed)
        model = build_model_from_config(self.cfg.model)
        model.grad_checkpointing = s.grad_checkpointing
        self.diffusion = build(SCHEDULERS, self.cfg.diffusion, "diffusion")
        self.text_encoder = build(TEXT_ENCODERS, self.cfg.get("text_encoder", dict(type="NullTextEncoder")),
                                  "text_encoder")
        self.dataset = build(DATASETS, self.cfg.dataset, "dataset")
        log.info("model: %.2fM parameters, %d training clips, %d process(es) on %s",
                 sum(p.numel() for p in model.parameters()) / 1e6, len(self.dataset), info.world_size, info.device)
        self.model = parallelize(model, s.parallel, info, bf16=self.use_bf16)
        self.core = unwrap(self.model)
        # fused: one kernel for the whole update on GPU (the CPU keeps the default, reference implementation)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                                           betas=tuple(s.adam_betas), fused=info.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: lr_factor(i, s.warmup_steps, s.max_steps, s.lr_schedule))
        self.ema = EMA(self.core, s.ema_decay)

    def resume(self, resume: str | None) -> None:
        """Load weights, EMA, optimizer, schedule, counters and RNG from `--resume auto` or a checkpoint path."""
        path = resolve_resume(resume, self.ckpt_dir)
        if path is None:
            if resume:
                log.info("--resume %s: no complete checkpoint in %s, starting fresh", resume, self.ckpt_dir)
            return
        check_saved_config(path, self.cfg)
        state = restore_checkpoint(path, self.ckpt_dir, self.model, self.core, self.optimizer, self.ema)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        self.nonfinite_total = state["nonfinite_total"]
        torch.set_rng_state(state["rng_cpu"])
        log.info("resumed from %s (step %d, epoch %d, %d samples into it)", path, self.step, self.epoch, self.consumed)

    def batches(self):
        """Endless batches over epochs from the recorded data position, as (batch, epoch, consumed-after)."""
        s, info = self.settings, self.info
        sampler = StatefulSampler(len(self.dataset), info.rank, info.world_size, s.seed)
        if len(sampler) < s.batch_size:
            raise ConfigError(f"dataset: {len(sampler)} clip(s) per process, fewer than train.batch_size="
                              f"{s.batch_size}; wrap it in dict(type='RepeatDataset', dataset=..., times=N)")
        return self._epochs(sampler, self.epoch, self.consumed)

    @property
    def num_workers(self) -> int:
        """train.num_workers, else the machine's default for the ranks on this node (torchrun's LOCAL_WORLD_SIZE)."""
        if self.settings.num_workers is not None:
            return self.settings.num_workers
        return default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), self.info.device.type == "cuda")

    def _epochs(self, sampler: StatefulSampler, epoch: int, consumed: int):
        s = self.settings
        while True:
            sampler.set_epoch(epoch, consumed)
            self.dataset.set_epoch(epoch)
            for batch in build_dataloader(self.dataset, s.batch_size, self.num_workers, sampler, s.seed):
                consumed += len(batch["index"])
                yield batch, epoch, consumed
            epoch, consumed = epoch + 1, 0

    @property
    def vae(self):
        """The VAE, built on first use: training from cached latents never touches it."""
        if self._vae is None:
            self._vae = build(VAES, self.cfg.vae, "vae").to(self.info.device).eval()
        return self._vae

    def encode(self, batch: dict) -> torch.Tensor:
        """Clean latents (B, C, T, h, w) of a batch: cached ones, or the VAE's encoding of its video."""
        if "latents" in batch:
            return batch["latents"].to(self.info.device)
        with torch.no_grad(), self.autocast:
            return self.vae.encode(batch["video"].to(self.info.device)).float()

    # ---- one step

    def next_batch(self) -> dict:
        """The next batch, advancing the data position (epoch, consumed) that checkpoints record."""
        batch, epoch, self.consumed = next(self.data)
        if epoch != self.epoch:
            log.info("epoch %d done; unreadable files skipped so far: %d", self.epoch, self.skipped_files)
            self.epoch = epoch
        self.skipped_files += int(batch["skipped"].sum())
        return batch

    def compute_loss(self, batch: dict, micro: int) -> dict:
        """The objective on one micro-batch -> dict(loss=scalar tensor with grad, other scalars to log).

        Every random draw is seeded by (seed, step, micro, sample index), so it does not depend on the process layout.
        """
        s = self.settings
        x0 = self.encode(batch)
        with torch.no_grad():
            y, mask = self.text_encoder.encode(list(batch["caption"]))
        lengths = prefix_lengths(x0.shape[2], self.ar.chunk_size)
        step_gen = torch.Generator().manual_seed(sample_seed(s.seed, self.step, micro))
        prefix_len = lengths[int(torch.randint(len(lengths), (1,), generator=step_gen))]
        gens = [torch.Generator().manual_seed(sample_seed(s.seed, self.step, micro, int(i))) for i in batch["index"]]
        with self.autocast:
            out = clean_prefix_loss(self.model, self.diffusion, x0, y=y, mask=mask, chunk_size=self.ar.chunk_size,
                                    prefix_len=prefix_len, prefix_perturb_t=self.ar.prefix_perturb_t,
                                    txt_dropout_prob=s.txt_dropout_prob, generators=gens, tpe_offsets=s.tpe_offsets,
                                    sink_frames=self.ar.sink_frames, switch_at=batch.get("switch_at"),
                                    timestep_power=s.timestep_power)
        return dict(out, prefix_len=prefix_len)

    def train_step(self) -> tuple[dict, torch.Tensor]:
        """One optimizer step over `grad_accum_steps` micro-batches -> (means of compute_loss's scalars, grad norm),
        tensors left on the device.

        A step whose loss or gradient is non-finite on any process leaves weights, optimizer and EMA untouched.
        """
        s = self.settings
        means = {}
        for micro in range(s.grad_accum_steps):
            batch = self.next_batch()
            last = micro == s.grad_accum_steps - 1
            # DDP all-reduces gradients in backward: only once, on the last micro-batch
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                out = self.compute_loss(batch, micro)
                (out["loss"] / s.grad_accum_steps).backward()
            for key, value in out.items():
                value = value.detach() if torch.is_tensor(value) else value
                means[key] = means.get(key, 0.0) + value / s.grad_accum_steps
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm over all shards, the same on every process
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(means["loss"]) & torch.isfinite(grad_norm)
        finite = bool(self.to_host(dict(finite=finite))["finite"])
        if any_process(not finite, self.info):
            self.nonfinite_run += 1
            self.nonfinite_total += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step + 1,
                        self.nonfinite_run)
        else:
            self.nonfinite_run = 0
            self.optimizer.step()
            self.ema.update(self.core)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return means, grad_norm

    @staticmethod
    def to_host(values: dict) -> dict:
        """Device scalars -> Python floats, in one transfer: the one place the loop reads the device on the host (a
        CPU-GPU sync point), for the non-finite check of every step and the logged means at log steps."""
        names = [key for key, value in values.items() if torch.is_tensor(value)]
        read = torch.stack([values[key].float() for key in names]).tolist() if names else []
        return {**values, **dict(zip(names, read))}

    # ---- logging, checkpoints, samples

    def log_window(self, window: dict, steps: int, seconds: float, grad_norm: torch.Tensor) -> None:
        """Log the means of the last `steps` steps' scalars (over all processes) with run-wide figures."""
        window = self.to_host({**window, "grad_norm": grad_norm})
        grad_norm = window.pop("grad_norm")
        metrics = {key: all_reduce_mean(total / steps, self.info) for key, total in window.items()}
        metrics.update(grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0],
                       steps_per_s=steps / max(seconds, 1e-9), memory_gb=peak_memory_mb(self.info.device) / 1024,
                       skipped_files=self.skipped_files, nonfinite_steps=self.nonfinite_total)
        if self.info.is_main:
            self.run_logger.log(self.step, metrics)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")

    def checkpoint(self) -> None:
        """Save on the main process (when sharded, every process its optimizer shard first); a failed write (a full
        disk) stops every process with one line, older checkpoints intact."""
        model_state = get_model_state_dict(self.model, options=FULL)
        ema_state = self.ema.state_dict()
        train_state = dict(step=self.step, epoch=self.epoch, consumed=self.consumed,
                           scheduler=self.scheduler.state_dict(), nonfinite_total=self.nonfinite_total,
                           rng_cpu=torch.get_rng_state())
        failure = ""
        if self.settings.parallel == "fsdp" and self.info.world_size > 1:  # the optimizer state split over processes
            failure = save_optimizer_shards(self.ckpt_dir, self.step, self.model, self.optimizer, self.info)
        else:
            train_state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer, options=FULL)
        if self.info.is_main and not failure:
            try:
                path = save_checkpoint(self.ckpt_dir, self.step, model_state, ema_state, train_state,
                                       self.cfg.pretty_text, self.settings.keep_last)
                self.run_logger.plot_loss()
                log.info("saved %s", path)
            except OSError as err:
                failure = str(err) or type(err).__name__
        if any_process(bool(failure), self.info):
            raise CheckpointError(f"writing the step-{self.step} checkpoint failed ({failure or 'on the main process'})"
                                  f"; earlier checkpoints in {self.ckpt_dir} are intact: free space and rerun with "
                                  "--resume auto")

    def validation_schedule(self) -> tuple[str, int]:
        """The sampler and steps of validation clips: train.validation_sampler / validation_steps."""
        return self.settings.validation_sampler, self.settings.validation_steps

    def validate(self) -> None:
        """Sample a clip from the first frame of the first training clip with the EMA weights, into samples/."""
        ema_state = self.ema.state_dict()  # a collective under FSDP: every rank takes part
        if self.info.is_main:
            self.validator.sample(ema_state, self.first_latents[:, :, :1], self.first_clip["caption"],
                                  self.settings.seed, self.run_dir / "samples" / f"step_{self.step:08d}.mp4")

    # ---- the loop

    def preflight(self) -> None:
        """Check before step 1 what the run needs later, so a mistake costs seconds, not the hours before it shows:
        one clip through the VAE and the model's shape rules, the validation settings, writable folders and disk
        space for one checkpoint."""
        s, info = self.settings, self.info
        self.first_clip = self.dataset[0]  # also fails (one line) when no item of the dataset can be read
        self.first_latents = self.encode({k: v[None] for k, v in self.first_clip.items() if k in ("video", "latents")})
        check_clip_shape(self.core, tuple(self.first_latents.shape[1:]), self.ar)
        if s.validation_every:  # builds the VAE now
            self.validator = Validator(split_init_fields(self.cfg.model)[0], self.core, self.vae, self.diffusion,
                                       self.text_encoder, self.ar, self.validation_schedule(),
                                       s.validation_frames or 2 * self.core.max_tpe_len, s.validation_every,
                                       info.device)
        if not info.is_main:
            return
        writable_dir(self.ckpt_dir, "the checkpoint folder")
        if s.validation_every:
            writable_dir(self.run_dir / "samples", "the samples folder")
        # model + EMA + AdamW's two moments, float32 (the optimizer state is what makes a checkpoint large)
        check_free_space(self.run_dir, 16 * sum(p.numel() for p in self.core.parameters()), "one checkpoint")
        log.info(estimate_line(self.cfg, "train", info.device.type, s.batch_size, info.world_size))

    def save_config(self) -> None:
        """config.py of the run, written when it starts; a resumed run keeps it (each checkpoint holds the config it
        was written with) and says when its own config differs."""
        path = self.run_dir / "config.py"
        if not path.is_file():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.dump(str(path))
        elif path.read_text() != self.cfg.pretty_text:
            log.warning("the config differs from the run's %s (kept); each checkpoint holds the config it was written "
                        "with", path)

    def fit(self, resume: str | None = None) -> int:
        """Train to `max_steps` -> exit code: 0 done (or saved after SIGTERM), 130 saved after Ctrl-C, 3 too many
        non-finite steps in a row."""
        s, info = self.settings, self.info
        self.build()
        self.resume(resume)
        self.data = self.batches()
        self.preflight()
        if info.is_main:
            self.save_config()
        self.run_logger = RunLogger(self.run_dir, s.wandb, self.cfg.to_dict(), resume_step=self.step) \
            if info.is_main else None
        self.stop.install()
        self.model.train()
        if isinstance(self.text_encoder, torch.nn.Module):
            self.text_encoder.to(info.device)

        window, window_steps, window_start = {}, 0, time.time()  # sums over the steps since the last log line
        self.bar = tqdm(total=s.max_steps, initial=self.step, disable=not info.is_main, desc="train",
                        dynamic_ncols=True)
        try:
            while self.step < s.max_steps:
                means, grad_norm = self.train_step()
                self.bar.update(1)
                window_steps += 1
                for key, value in means.items():
                    window[key] = window.get(key, 0.0) + value
                if self.step % s.log_every == 0 or self.step == s.max_steps or self.nonfinite_run:
                    self.log_window(window, window_steps, time.time() - window_start, grad_norm)
                    window, window_steps, window_start = {}, 0, time.time()
                if self.nonfinite_run >= s.max_nonfinite_steps:
                    log.error("stopping: %d non-finite steps in a row; the last good checkpoint in %s is intact",
                              self.nonfinite_run, self.ckpt_dir)
                    return 3
                pre_empted = any_process(self.stop.requested, info)  # every rank saves and exits together
                if self.step % s.ckpt_every == 0 or self.step == s.max_steps or pre_empted:
                    self.checkpoint()
                if pre_empted:
                    log.info("%s: checkpoint saved at step %d, exiting", self.stop.signal or "stop", self.step)
                    return self.stop.exit_code
                if s.validation_every and self.step % s.validation_every == 0:
                    self.validate()
            log.info("done: %d steps; skipped unreadable files: %d; non-finite steps: %d", self.step,
                     self.skipped_files, self.nonfinite_total)
            return 0
        finally:
            self.bar.close()
            if self.run_logger is not None:
                self.run_logger.close()
