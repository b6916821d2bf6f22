"""Choose the attention kernels' launch configurations by measurement, and write them into the repository.

    python bench/tune.py                   # the model's shape, bf16, causal, dropout 0.2 and 0
    python bench/tune.py --budget 120      # stop sweeping after 120 s (default 170)
    python bench/tune.py --dry-run         # measure and print, write nothing

For each case (dtype, head dim, causal, dropout) and each kernel (forward, dK/dV, dQ) it times the
candidates of `candidates()` at the model's shape (B, T, H, D) = (64, 256, 6, 64) with
triton.testing.do_bench (median, L2 flushed between calls), after a spot check against the default
configuration (same dropout mask, outputs within a bf16 tolerance), and keeps the fastest. The
backward kernels are timed through the whole backward with the other kernel at its default, so the
difference is the kernel under test. The result goes into kernels/attention_configs.py under the
GPU's architecture ('sm90'), with the card, date and versions, next to the entries of other
architectures; kernels.attention reads it at launch (no autotuning at start-up). About 50
candidates, each compiled once and timed once: about 2 minutes; --budget stops it in time, with every
kernel measured about as far as the others (the candidates run round-robin).

Without a GPU it says so in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import pprint
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kernels.attention import _DEFAULT_CONFIGS, _Config, config_key  # noqa: E402

TABLE_PATH = REPO / "kernels" / "attention_configs.py"
EXIT_NO_GPU = 2
MODEL_SHAPE = (64, 256, 6, 64)  # (B, T, H, D)
KERNELS = ("fwd", "dkdv", "dq")
SMEM_LIMIT = 227 * 1024  # bytes one block may use on sm_90


def _smem_estimate(kernel: str, cfg: _Config, block_d: int, elem_bytes: int = 2) -> int:
    """A rough upper bound of shared memory: the pipelined tiles of each loop plus the resident ones."""
    if kernel in ("fwd", "dq"):  # a query tile resident; K and V tiles pipelined
        return (cfg.block_m + 2 * cfg.num_stages * cfg.block_n) * block_d * elem_bytes
    # dK/dV: K and V resident; Q and dO tiles pipelined; P^T and dS^T staged for the MMA
    return (2 * cfg.block_n + 2 * cfg.num_stages * cfg.block_m) * block_d * elem_bytes \
        + 2 * cfg.block_m * cfg.block_n * elem_bytes


def candidates(kernel: str, block_d: int) -> list[_Config]:
    """The configurations tune.py times for one kernel: the default first, then a small grid.

    Every block size is a multiple of 16 (the dropout bits come in 16 x 16 tiles) and at least 64
    where it is the M of a warpgroup MMA (the queries of the forward and of dQ, the keys of dK and
    dV); 8 warps only where a tile has 128 rows for two warpgroups to share without computing the
    same thing twice; the estimated shared memory fits an sm_90 block.
    """
    grid = {
        "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                (128, 32, 8, 3), (128, 64, 4, 2), (128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3),
                (64, 64, 4, 4), (64, 32, 4, 3)],
        "dkdv": [(64, 64, 4, 1), (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 1), (32, 64, 4, 2),
                 (64, 128, 8, 1), (64, 128, 8, 2)],
        "dq": [(64, 64, 4, 1), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 4, 3),
               (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2)],
    }[kernel]
    default = _DEFAULT_CONFIGS[kernel][block_d]
    grid = [c for c in map(_Config._make, grid) if _smem_estimate(kernel, c, block_d) <= SMEM_LIMIT]
    return [default] + [c for c in grid if c != default]


# ------------------------------------------------------------------------------------------------
# The table file
# ------------------------------------------------------------------------------------------------

_HEADER = '''"""Measured launch configurations for the attention kernels: written by `python bench/tune.py`.

Keys: kernels.attention.config_key(arch, dtype, padded head dim, causal, dropout), e.g.
'sm90 bf16 D64 causal dropout'. Values: {'fwd' | 'dkdv' | 'dq': (BLOCK_M, BLOCK_N, num_warps,
num_stages)}. A kernel or a key that is missing here runs kernels.attention's defaults (chosen from
the static cost report), as does any GPU that was never tuned and Triton's interpreter.
"""
'''


def read_table(path: Path = TABLE_PATH) -> tuple[dict | None, dict]:
    """(MEASURED, TABLE) of a table file, by executing it in an empty namespace."""
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # our own generated file
    return namespace.get("MEASURED"), namespace["TABLE"]


def write_table(measured: dict | None, table: dict, path: Path = TABLE_PATH) -> None:
    """Write the table file: the header, MEASURED (card, date, versions per arch), TABLE sorted."""
    table = {key: {k: tuple(v) for k, v in sorted(entry.items())} for key, entry in sorted(table.items())}
    text = (_HEADER + "\n# {arch: {'card', 'date', 'torch', 'triton', 'cuda'}} of the run that wrote that arch's entries\n"
            + "MEASURED = " + pprint.pformat(measured, width=100, sort_dicts=True) + "\n\n"
            + "TABLE = " + pprint.pformat(table, width=100, sort_dicts=True) + "\n")
    path.write_text(text)


def merge(table: dict, chosen: dict) -> dict:
    """table with chosen's keys replaced (other keys, e.g. other architectures, kept)."""
    out = {k: dict(v) for k, v in table.items()}
    for key, entry in chosen.items():
        out.setdefault(key, {}).update(entry)
    return out


# ------------------------------------------------------------------------------------------------
# Measurement (GPU)
# ------------------------------------------------------------------------------------------------

def _inputs(dtype, shape, device):
    B, T, H, D = shape
    qkv = torch.randn((B, T, 3, H, D), dtype=dtype, device=device)  # (B, T, 3, H, D), as the model packs
    do = torch.randn((B, T, H, D), dtype=dtype, device=device)  # (B, T, H, D)
    return (*qkv.unbind(2), do)


def _runner(kernel, cfg, case, tensors):
    """A zero-argument function running the kernel under test with cfg (the others at their defaults)."""
    from kernels.attention import _attn_backward, _attn_forward, configs_for
    dtype, D, causal, p = case
    q, k, v, do = tensors
    seed_t = torch.tensor([1234], dtype=torch.int64, device=q.device)
    scale = D ** -0.5
    seed_arg = seed_t if p > 0 else None
    defaults = configs_for(q.device, dtype, D, causal, p > 0)
    if kernel == "fwd":
        return lambda: _attn_forward(q, k, v, p, causal, scale, seed_arg, True, _config=cfg)
    o, lse = _attn_forward(q, k, v, p, causal, scale, seed_arg, True, _config=defaults["fwd"])
    configs = (cfg, defaults["dq"]) if kernel == "dkdv" else (defaults["dkdv"], cfg)
    return lambda: _attn_backward(do, q, k, v, o, lse, p, causal, scale, seed_arg, _configs=configs)


def _close(got, want) -> bool:
    """Outputs of two block shapes agree to bf16/fp16 rounding (their summation orders differ)."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        if g.numel() == 0:
            continue
        scale = w.float().abs().max().item() + 1e-6
        if not torch.isfinite(g).all() or (g.float() - w.float()).abs().max().item() > 2e-2 * scale:
            return False
    return True


def tune(cases, budget_s: float, shape=MODEL_SHAPE) -> dict:
    """{config_key: {kernel: _Config}} of the fastest candidates that pass the spot check.

    Candidates run round-robin over the (case, kernel) groups, the defaults first, so that when the
    budget runs out every group has been measured as far as the others.
    """
    import triton.testing
    from kernels.attention import _arch, _block_d
    device = torch.device("cuda")
    arch = _arch(device)
    start = time.perf_counter()
    groups = []  # (case, kernel, tensors, candidates)
    for case in cases:
        dtype, D, causal, p = case
        tensors = _inputs(dtype, shape[:3] + (D,), device)
        groups += [(case, kernel, tensors, candidates(kernel, _block_d(D))) for kernel in KERNELS]
    timed: dict = {}  # (case, kernel) -> [(us, cfg)], the default's first
    reference: dict = {}  # (case, kernel) -> the default's outputs
    for rank in range(max(len(g[3]) for g in groups)):
        for case, kernel, tensors, cands in groups:
            if rank >= len(cands):
                continue
            if time.perf_counter() - start > budget_s:
                print(f"budget of {budget_s:.0f} s spent after {rank} candidates a kernel")
                return _choose(timed, arch)
            cfg = cands[rank]
            fn = _runner(kernel, cfg, case, tensors)
            try:
                out = fn()  # compiles on first use
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - a candidate that does not compile or launch is skipped
                print(f"  skip {kernel} {tuple(cfg)}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                continue
            if rank == 0:
                reference[(case, kernel)] = out
            elif (case, kernel) not in reference or not _close(out, reference[(case, kernel)]):
                print(f"  skip {kernel} {tuple(cfg)}: disagrees with the default configuration")
                continue
            us = triton.testing.do_bench(fn, return_mode="median") * 1e3
            timed.setdefault((case, kernel), []).append((us, cfg))
    print(f"measured every candidate in {time.perf_counter() - start:.0f} s")
    return _choose(timed, arch)


def _choose(timed: dict, arch: str) -> dict:
    from kernels.attention import _block_d
    chosen: dict = {}
    for (case, kernel), results in timed.items():
        dtype, D, causal, p = case
        key = config_key(arch, dtype, _block_d(D), causal, p > 0)
        best_us, best = min(results, key=lambda t: t[0])
        default_us, _ = results[0]
        chosen.setdefault(key, {})[kernel] = best
        print(f"{key:<32} {kernel:<5} {tuple(best)}  {best_us:8.2f} us  (default {default_us:.2f} us, "
              f"{len(results)} timed)")
    return chosen


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=170.0, help="seconds for compiling and timing (default 170)")
    ap.add_argument("--dry-run", action="store_true", help="measure and print, do not write the table")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/tune.py needs a CUDA GPU to time the kernels; none is visible here", file=sys.stderr)
        return EXIT_NO_GPU
    import triton
    from kernels.attention import _arch
    D = MODEL_SHAPE[3]
    cases = [(torch.bfloat16, D, True, 0.2), (torch.bfloat16, D, True, 0.0)]
    chosen = tune(cases, args.budget)
    if args.dry_run:
        return 0
    measured, table = read_table()
    measured = dict(measured or {})
    measured[_arch(torch.device("cuda"))] = {
        "card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "shape": MODEL_SHAPE}
    table = merge(table, {k: {kk: tuple(vv) for kk, vv in v.items()} for k, v in chosen.items()})
    write_table(measured, table)
    print(f"wrote {TABLE_PATH.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
