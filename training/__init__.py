"""What train.py's loop is built from, and what tests and benchmarks import (never train.py itself).

- config:     RunConfig, the one dataclass that the flags, their defaults and --help come from;
              the checks; where and how the run computes (Execution)
- runner:     StepRunner, the training step and the evaluation (eager, compiled, CUDA graphs),
              and the non-finite check that is also the ranks' agreement
- checkpoint: save, load and resume checkpoints; CheckpointWriter writes them off the training thread
- metrics:    MFU, the progress line's rates, durations, notes, LossPlot
- dist:       data-parallel set-up and teardown (Ranks: rank, world_size, local_rank)
- interrupt:  Ctrl-C and SIGTERM: stop at the next safe point, or at once on the second

Data flows one way: train.py -> training -> model -> kernels.
"""
