"""One training step and one evaluation batch at the model's shape, for every loop a user could run.

Loops (all in one run, on one card):
  seed              the seed's loop: reference backend, fp32, batches stacked on the host, AdamW
  torch-eager       torch backend (SDPA, F.layer_norm), bf16 autocast, fused AdamW, device batches
  torch-compile-rog the same under torch.compile(mode="reduce-overhead") (CUDA graphs)
  triton-eager      our kernels, bf16 autocast, fused AdamW, device batches, no CUDA graphs
  triton-graphs     the same with the whole step and the eval forward captured in CUDA graphs

Timed as a real loop: STEPS steps, one device synchronize at the end, after a warm-up that
compiles everything. Figures in extra_info: ms per step, tokens per second, MFU.
"""

import pytest
import torch

from bench.conftest import gpu_info, requires_cuda
from model import GPT, GPTConfig
from model.data import get_batch
from training.metrics import flops_per_token, mfu_peak
from training.runner import Batches, Precision, StepRunner

B, T = 64, 256
STEPS = 50
WARMUP = 5
LOOPS = ["seed", "torch-eager", "torch-compile-rog", "triton-eager", "triton-graphs"]


def _data(device):
    """Random characters stand in for the text: a step's time does not depend on which they are."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 65, (1_000_000,), generator=g)
    return data, data.to(device)


class _SeedLoop:
    """The seed's gpt.py loop, as written: host batches, fp32, plain AdamW."""

    def __init__(self, device):
        self.device = device
        self.host_data, _ = _data(device)
        self.model = GPT(GPTConfig(backend="reference")).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4)

    def _batch(self):
        ix = torch.randint(len(self.host_data) - T, (B,))
        x = torch.stack([self.host_data[i : i + T] for i in ix])
        y = torch.stack([self.host_data[i + 1 : i + T + 1] for i in ix])
        return x.to(self.device), y.to(self.device)

    def train_step(self):
        xb, yb = self._batch()
        _, loss = self.model(xb, yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def eval_batch(self):
        self.model.eval()
        xb, yb = self._batch()
        loss = self.model(xb, yb)[1]
        self.model.train()
        return loss


class _FastLoop:
    """Device batches, bf16 autocast, fused AdamW; the torch or triton backend; graphs or compile."""

    def __init__(self, device, backend, graphs=False, compile_mode=None):
        self.model = GPT(GPTConfig(backend=backend)).to(device)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, fused=True, capturable=graphs)
        _, data = _data(device)
        self.steps = StepRunner(self.model, optimizer, Batches(data, data, batch_size=B, block_size=T, eval_iters=1),
                                Precision(torch.bfloat16), graphs=graphs, compile_mode=compile_mode)
        self.data = data
        self.gen = torch.Generator(device=device).manual_seed(0)

    def train_step(self):
        return self.steps.train_step()

    @torch.no_grad()
    def eval_batch(self):
        self.model.eval()
        xb, yb = get_batch(self.data, B, T, self.gen)
        loss = self.steps.eval_loss(xb, yb)
        self.model.train()
        return loss


def _make(loop, device):
    if loop == "seed":
        return _SeedLoop(device)
    if loop == "torch-eager":
        return _FastLoop(device, "torch")
    if loop == "torch-compile-rog":
        return _FastLoop(device, "torch", compile_mode="reduce-overhead")
    if loop == "triton-eager":
        return _FastLoop(device, "triton")
    return _FastLoop(device, "triton", graphs=True)


def _timed_loop(fn, n):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n  # ms per call


@requires_cuda
@pytest.mark.parametrize("mode", ["train-step", "eval-batch"])
@pytest.mark.parametrize("loop", LOOPS)
def test_train_step(benchmark, loop, mode):
    device = torch.device("cuda")
    torch.manual_seed(0)
    runner = _make(loop, device)
    fn = runner.train_step if mode == "train-step" else runner.eval_batch
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    n = STEPS if loop != "seed" else STEPS // 2
    per_call = []
    benchmark.pedantic(lambda: per_call.append(_timed_loop(fn, n)), rounds=3, iterations=1)
    ms = sorted(per_call)[len(per_call) // 2]
    model = runner.model
    flops = flops_per_token(model, model.config) * B * T * (1 if mode == "train-step" else 1 / 3)
    peak = mfu_peak(device)
    benchmark.extra_info.update(gpu_info(torch.bfloat16 if loop != "seed" else torch.float32))
    benchmark.extra_info.update(
        loop=loop, mode=mode, ms_per_step=round(ms, 4), tokens_per_s=round(B * T / ms * 1000),
        mfu=round(flops / (ms / 1000) / peak, 4) if peak else None,
    )
