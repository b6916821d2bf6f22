"""What a run reports: MFU, the progress line, durations, notes, and the loss plot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# Dense bf16/fp16 tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name().
# Most specific first. MFU is reported against these whatever the run's dtype.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12),
    ("T4", 65e12),
)


def note(msg: str) -> None:
    """A line on standard error for the person running it."""
    print(f"note: {msg}", file=sys.stderr, flush=True)


def mfu_peak(device: torch.device) -> float | None:
    """The card's dense bf16 peak in FLOP/s, or None (a CPU, or a card not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)


def flops_per_token(model, config) -> int:
    """Training FLOPs per token: 6 per parameter plus attention's 12 * L * T * C (as nanoGPT counts)."""
    return 6 * model.num_parameters() + 12 * config.n_layer * config.block_size * config.n_embd


def fmt_seconds(s: float) -> str:
    """1234 -> '20m34s'; 5000 -> '1h23m20s'."""
    s = int(round(max(s, 0.0)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def rates(seconds: float, steps: int, tokens_per_step: int, flops_per_step: float, peak: float | None) -> str:
    """'12.3 ms/iter | 1,234 tok/s | MFU 4.5%' for `steps` steps in `seconds`; n/a where there is nothing
    to divide (no steps, no time, no known peak), never a negative or meaningless rate."""
    if steps <= 0 or seconds <= 0:
        return "n/a ms/iter | n/a tok/s | MFU n/a"
    per_step = seconds / steps
    mfu = f"{flops_per_step / per_step / peak:.1%}" if peak else "n/a"
    return f"{1000 * per_step:.1f} ms/iter | {tokens_per_step / per_step:,.0f} tok/s | MFU {mfu}"


class LossPlot:
    """The train and val loss curves, redrawn as a PNG at every evaluation (atomically: a temporary
    file, then a rename)."""

    def __init__(self, path: Path, title: str):
        import matplotlib

        matplotlib.use("Agg")
        self.path, self.title = path, title

    def write(self, history) -> None:
        """history: [(step, train loss, val loss), ...]."""
        import matplotlib.pyplot as plt

        steps = [h[0] for h in history]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(steps, [h[1] for h in history], marker="o", label="train")
        ax.plot(steps, [h[2] for h in history], marker="o", label="val")
        ax.set_title(self.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean over the evaluation batches)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.path.with_name(self.path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.path)
