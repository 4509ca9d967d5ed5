"""Train a causal ST-DiT with the clean-prefix objective, or distil a few-step student of a trained one (a config
with a `distill` section, causalvdm/distill); launched by scripts/train.sh through torchrun.

    bash scripts/train.sh configs/demo/overfit.py overfit_demo            # one CPU process or GPU 0
    bash scripts/train.sh CONFIG EXP 29500 0,1,2,3 --resume auto          # four GPUs, resume the newest checkpoint

Everything of a run goes to <outputs_dir>/<exp_name>/: config.py, train.log, metrics.jsonl, tensorboard/,
checkpoints/step_*/ (model, EMA, optimizer, schedule, step, data position, RNG), loss.png, samples/. The folder is
locked while the run lives; one that holds an earlier run needs --resume (continue it) or --overwrite (start over).
"""

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from causalvdm.cli.common import USER_ERRORS, ArgumentParser, debugging, error_line, one_line_errors
from causalvdm.config import add_config_args, load_config, require
from causalvdm.distill import DistillSettings
from causalvdm.distill.trainer import DistillTrainer
from causalvdm.registry import ConfigError
from causalvdm.training.distributed import any_process, init_distributed
from causalvdm.training.run_dir import claim_run_dir, config_paths
from causalvdm.training.settings import TrainSettings
from causalvdm.training.trainer import Trainer
from causalvdm.utils.io import plain_name
from causalvdm.utils.memory import keep_freed_memory

log = logging.getLogger("causalvdm.train")

GPU_IDS_ENV = "CAUSALVDM_GPU_IDS"  # set by scripts/train.sh to the GPU ids it was given


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: a config, the run's name, --resume and --cfg-options overrides."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("config", help="mmengine .py config (model, vae, text_encoder, diffusion, dataset, autoregressive, train)")
    parser.add_argument("--exp-name", help="run name; outputs go to <train.outputs_dir>/<exp-name> (default: config file stem)")
    parser.add_argument("--resume", help="'auto' continues from the newest complete checkpoint of the run (fresh start if "
                        "none); or a checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="the run folder holds an earlier run: delete its files "
                        "(checkpoints, logs, samples) and start over; without it or --resume such a folder is refused")
    add_config_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run training -> exit code: 0 done, 1 bad command line or config (one `error:` line), 2 bad config, data or
    checkpoint found while setting up the run (one ERROR line, also in train.log), 3 too many non-finite steps,
    130 stopped by Ctrl-C (after saving a checkpoint when it came during training)."""
    args = parse_args(argv)
    with one_line_errors():
        gpu_ids = os.environ.get(GPU_IDS_ENV)
        if gpu_ids and not torch.cuda.is_available():
            raise ConfigError(f"GPU ids {gpu_ids} given, but torch sees no CUDA device here (leave them out to train "
                              "on the CPU)")
    with one_line_errors():  # these errors name the file themselves
        cfg = load_config(args.config, args.cfg_options)
        require(cfg, "model", "diffusion", "dataset")
    with one_line_errors(prefix=f"{args.config}: "):
        settings = TrainSettings.from_cfg(cfg.get("train"))
        if "distill" in cfg:  # a few-step student of a teacher checkpoint (causalvdm/distill)
            DistillSettings.from_cfg(cfg.distill)
    exp_name = args.exp_name or Path(args.config).stem
    with one_line_errors(ValueError):
        plain_name(exp_name, "--exp-name")
    info = init_distributed()
    run_dir = Path(settings.outputs_dir) / exp_name
    lock, refusal = None, ""
    if info.is_main:
        try:
            lock = claim_run_dir(run_dir, args.resume, args.overwrite, config_paths(cfg.to_dict()))
        except ConfigError as err:
            refusal = str(err)
    if any_process(bool(refusal), info):  # every process stops, not only the one that found out
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(f"error: {refusal}" if refusal else 1)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    handler = logging.FileHandler(run_dir / "train.log") if info.is_main else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    keep_freed_memory()
    try:
        trainer = DistillTrainer if "distill" in cfg else Trainer
        code = trainer(cfg, settings, run_dir, info).fit(resume=args.resume)
        if dist.is_initialized():
            # Every rank ends here together: a rank that tears its process group down while another is still
            # writing the last checkpoint can abort at exit (gloo: "terminate called without an active exception").
            dist.barrier()
        return code
    except KeyboardInterrupt:  # Ctrl-C while setting up, or twice: nothing to save yet, or asked not to
        log.error("interrupted: no checkpoint written (a single Ctrl-C while training saves one)")
        return 130
    except USER_ERRORS as err:
        if debugging():
            raise
        log.error("%s%s", f"{args.config}: " if isinstance(err, ConfigError) else "", error_line(err))
        return 2
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
