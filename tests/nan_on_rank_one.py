"""train.py with a NaN training loss on rank 1 alone from iteration 25 on: for the test that the ranks of
a torchrun run agree on stopping (tests/test_training.py). Not a test module itself.

The loss's value turns NaN while its gradient stays finite, so the other rank's weights and losses stay
finite: only the agreement can stop it.
"""

import os
import runpy
import sys
from pathlib import Path

import torch

from model import GPT

BAD_FROM = 25  # the first bad iteration: training forwards are one per step with --grad-accum 1

if os.environ.get("RANK") == "1":
    forward = GPT.forward
    calls = 0

    def poisoned(self, idx, targets=None):
        global calls
        logits, loss = forward(self, idx, targets)
        if self.training and loss is not None:
            calls += 1
            if calls > BAD_FROM:
                loss = loss + (torch.full_like(loss, float("nan")) - loss).detach()  # NaN value, finite gradient
        return logits, loss

    GPT.forward = poisoned

script = Path(__file__).resolve().parent.parent / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
