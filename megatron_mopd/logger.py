"""Where a run's numbers go: `RUN_DIR/metrics.jsonl`, TensorBoard, optionally W&B.

`metrics.jsonl` has one JSON object per step (`{"step": 3, "loss": ..., ...}`). On
resume, rows for steps after the resumed checkpoint are dropped first, so the file of a
resumed run equals that of an uninterrupted one. Only the logging rank (global rank 0)
writes; other ranks get a `MetricsLogger` that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from megatron_mopd.errors import UserError


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class MetricsLogger:
    """Appends step metrics to `metrics.jsonl` and mirrors scalars to TensorBoard / W&B."""

    def __init__(
        self,
        run_dir: str,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.eval_path = os.path.join(run_dir, "eval.jsonl")
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        try:
            os.makedirs(run_dir, exist_ok=True)
            with open(self.path, "a"):
                pass
        except OSError as e:
            raise UserError(f"run_dir {run_dir}: not writable: {e.strerror}") from None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print(
                    "logging.wandb_project is set but wandb is not installed "
                    "(pip install wandb); continuing without it",
                    file=sys.stderr,
                )
            else:
                self._wandb = wandb.init(project=wandb_project, config=config, dir=run_dir)

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps > `step` (called when resuming from checkpoint `step`)."""
        if not self.enabled:
            return
        for path in (self.path, self.eval_path):
            if not os.path.exists(path):
                continue
            keep = []
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= step:
                            keep.append(line)
                    except (ValueError, KeyError):
                        pass  # a half-written last line from a crash
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        """Write one row (`kind="eval"` rows go to eval.jsonl) and mirror scalars."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        path = self.eval_path if kind == "eval" else self.path
        with open(path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                if self._tb is not None:
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._tb is not None:
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        """Flush and close the writers."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
