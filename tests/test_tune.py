"""bench/tune.py off the GPU: its candidates, the table file it writes, and its one-line refusal.

The timing itself needs a GPU; what it writes is read by kernels.attention.configs_for, whose
entries tests/test_attention.py runs under every configuration (same dropout mask, correct results).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import tune
from kernels.attention import _DEFAULT_CONFIGS, _Config, config_key, configs_for

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kernel", tune.KERNELS)
@pytest.mark.parametrize("block_d", [16, 32, 64, 128])
def test_candidates_are_valid_and_start_with_the_default(kernel, block_d):
    cands = tune.candidates(kernel, block_d)
    assert cands[0] == _DEFAULT_CONFIGS[kernel][block_d]
    assert len(cands) == len(set(cands)) >= 4
    for c in cands:
        assert isinstance(c, _Config)
        assert c.block_m % 16 == 0 and c.block_n % 16 == 0, f"{c}: dropout tiles are 16 x 16"
        assert c.num_warps in (4, 8) and 1 <= c.num_stages <= 4
        mma_rows = c.block_m if kernel != "dkdv" else c.block_n
        if (kernel, block_d) != ("dkdv", 128):  # see _DEFAULT_CONFIGS: 8 warps there share dK and dV by D
            assert mma_rows >= 16 * c.num_warps, f"{c}: warps would compute the same rows twice"
        assert tune._smem_estimate(kernel, c, block_d) <= tune.SMEM_LIMIT


def test_table_round_trip_keeps_other_architectures(tmp_path):
    path = tmp_path / "attention_configs.py"
    old = {"sm80 bf16 D64 causal dropout": {"fwd": (64, 64, 4, 2)},
           "sm90 bf16 D64 causal dropout": {"fwd": (128, 64, 8, 3), "dq": (64, 64, 4, 2)}}
    tune.write_table({"sm80": {"card": "A100"}}, old, path)
    measured, table = tune.read_table(path)
    assert measured == {"sm80": {"card": "A100"}} and table == old
    chosen = {"sm90 bf16 D64 causal dropout": {"fwd": (128, 128, 8, 2), "dkdv": (64, 64, 4, 1)}}
    merged = tune.merge(table, chosen)
    tune.write_table({"sm80": {"card": "A100"}, "sm90": {"card": "H100"}}, merged, path)
    measured, table = tune.read_table(path)
    assert table["sm80 bf16 D64 causal dropout"] == {"fwd": (64, 64, 4, 2)}
    assert table["sm90 bf16 D64 causal dropout"] == {"fwd": (128, 128, 8, 2), "dkdv": (64, 64, 4, 1),
                                                     "dq": (64, 64, 4, 2)}
    assert set(measured) == {"sm80", "sm90"}
    # The file is importable Python with the layout kernels.attention reads.
    namespace = {}
    exec(path.read_text(), namespace)
    assert namespace["TABLE"] == table and namespace["__doc__"].startswith("Measured launch configurations")


def test_the_repository_table_is_valid():
    measured, table = tune.read_table()
    for key, entry in table.items():
        arch, dtype, d, *flags = key.split()
        assert arch.startswith("sm") and dtype in ("fp32", "fp16", "bf16") and d[0] == "D", key
        assert set(flags) <= {"causal", "dropout"}, key
        assert set(entry) <= set(tune.KERNELS), key
        for cfg in entry.values():
            c = _Config(*cfg)
            assert c.block_m % 16 == 0 and c.block_n % 16 == 0, (key, c)
        assert measured and arch in measured, f"{key}: no card and versions recorded for {arch}"


def test_configs_for_uses_the_table_on_its_arch_only(monkeypatch):
    import kernels.attention as attn
    import kernels.attention_configs as table_module
    key = config_key("sm90", torch.bfloat16, 64, True, True)
    monkeypatch.setattr(table_module, "TABLE", {key: {"fwd": (64, 32, 4, 2)}})
    monkeypatch.setattr(attn, "_arch", lambda device: "sm90")
    got = configs_for("cuda", torch.bfloat16, 64, True, True)
    assert got["fwd"] == _Config(64, 32, 4, 2) and got["dq"] == _DEFAULT_CONFIGS["dq"][64]
    assert configs_for("cuda", torch.bfloat16, 64, True, False)["fwd"] == _DEFAULT_CONFIGS["fwd"][64]
    monkeypatch.setattr(attn, "_arch", lambda device: "sm80")
    assert configs_for("cuda", torch.bfloat16, 64, True, True)["fwd"] == _DEFAULT_CONFIGS["fwd"][64]


def test_fp32_runs_small_unpipelined_tiles():
    cfgs = configs_for("cpu", torch.float32, 128, True, True)
    assert all(c.block_m <= 64 and c.num_stages == 1 for c in cfgs.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "tune.py")], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == tune.EXIT_NO_GPU
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "needs a CUDA GPU" in proc.stderr
