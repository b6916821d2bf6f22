"""Measured launch configurations for the attention kernels: written by `python bench/tune.py`.

Keys: kernels.attention.config_key(arch, dtype, padded head dim, causal, dropout), e.g.
'sm90 bf16 D64 causal dropout'. Values: {'fwd' | 'dkdv' | 'dq': (BLOCK_M, BLOCK_N, num_warps,
num_stages)}. A kernel or a key that is missing here runs kernels.attention's defaults (chosen from
the static cost report), as does any GPU that was never tuned and Triton's interpreter.
"""

MEASURED = None  # {'card', 'date', 'torch', 'triton', 'cuda'} of the run that wrote TABLE

TABLE = {}
