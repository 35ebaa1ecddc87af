"""Run outputs: metrics as JSONL (one object per line, each with "step") and TensorBoard
scalars, plus evaluation GIFs. JSONL is the source of truth for `python -m tpx_ext.plot`."""

import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

from ..extras import needs
from .atomic import atomic_write

METRICS_FILE = "metrics.jsonl"


class Logger:
    def __init__(self, run_dir: str, tensorboard: bool, resume_step: Optional[int] = None):
        """resume_step: drop the records written after this step by a run that was killed
        after its last checkpoint, so the resumed run does not log them twice. None (a new
        run): start the metrics afresh, also over those of a run in this directory that
        stopped before its first checkpoint (whose steps the new run repeats)."""
        self.path = os.path.join(run_dir, METRICS_FILE)
        if resume_step is not None and os.path.exists(self.path):
            truncate_after(self.path, resume_step)
        self._file = open(self.path, "w" if resume_step is None else "a")
        self._tb = None
        if tensorboard:
            with needs("dreamer"):
                from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the killed run's events after the checkpoint in TensorBoard
            # (a new run's: all of them).
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"),
                                     purge_step=0 if resume_step is None else resume_step)

    def write(self, step: int, record: Dict[str, object]) -> None:
        record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, list):  # a profile over the horizon: a few steps of it
                    for t in sorted({0, len(value) // 2, len(value) - 1}):
                        self._tb.add_scalar(f"{key}/step{t}", value[t], step)
                elif isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    """JSON-ready: tensors and arrays to floats or lists of floats (NaN stays NaN)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return float(value) if value.ndim == 0 else [float(v) for v in value.ravel()]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def read_metrics(path: str):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_after(path: str, step: int) -> None:
    keep = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda f: f.write("".join(keep).encode()))


def save_gif(path: str, frames: Sequence[np.ndarray], fps: int = 25) -> None:
    """frames: [3, H, W] or [H, W, 3] uint8 arrays."""
    with needs("dreamer"):
        from PIL import Image  # matplotlib depends on pillow

    images = [Image.fromarray(f.transpose(1, 2, 0) if f.shape[0] == 3 else f) for f in frames]
    atomic_write(path, lambda f: images[0].save(f, format="GIF", save_all=True,
                                                append_images=images[1:],
                                                duration=int(1000 / fps), loop=0))
