"""Run logging on the main process: console/file, metrics.jsonl, tensorboard, optional offline wandb, loss curve PNG."""

import json
import logging
from pathlib import Path

from causalvdm.registry import ConfigError

log = logging.getLogger("causalvdm.train")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that does not parse (torn by a crash mid-write) is skipped with a warning."""
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            log.warning("%s: line %d is not complete JSON (a crash mid-write?), skipped", path, line_no)
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


class RunLogger:
    """Writes scalar metrics of a run; `metrics.jsonl` is the source of truth the loss curve is drawn from."""

    def __init__(self, run_dir: Path, use_wandb: bool, config: dict, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step)  # a killed run may have logged past its last checkpoint
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self.wandb = None
        if use_wandb:
            try:
                import wandb
            except ImportError as err:
                raise ConfigError("train.wandb=True needs wandb: pip install -e '.[wandb]'") from err
            self.wandb = wandb.init(mode="offline", dir=str(run_dir), project="causalvdm", name=run_dir.name,
                                    config=config, resume="allow")

    def _truncate_after(self, step: int) -> None:
        """Drop the rows after `step` (a killed run may have logged past its last checkpoint) and a torn last line."""
        if self.metrics_path.exists():
            kept = [row for row in read_metrics(self.metrics_path) if row["step"] <= step]
            self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def log(self, step: int, metrics: dict) -> None:
        """Record scalars for `step` everywhere and print one console line."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        log.info("step %d  %s", step, "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def plot_loss(self) -> Path | None:
        """Draw loss.png from metrics.jsonl -> its path; None before the first logged step (nothing to draw)."""
        if not self.metrics_path.is_file():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = read_metrics(self.metrics_path)
        path = self.run_dir / "loss.png"
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.set_title(self.run_dir.name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
