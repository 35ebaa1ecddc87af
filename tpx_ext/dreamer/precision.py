"""Mixed precision for the agent's three updates (`precision`: 32, bf16, 16).

The forward passes run under torch.autocast; the losses, lambda-returns and the estimator's
node statistics stay in float32/64 (the fused op takes the autocast dtypes, graph.loss()
divides the grad scale out of its statistics). float16 scales each loss with its own
GradScaler, whose state the checkpoints keep.
"""

import contextlib

import torch

PRECISIONS = ("32", "bf16", "16")


class Precision:
    def __init__(self, precision: str, device):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.device_type = torch.device(device).type
        self.dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)

    def autocast(self):
        """The context of a forward pass: autocast to the chosen dtype, or nothing at 32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A grad scaler for one optimizer: active at 16, a pass-through otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.precision == "16")
