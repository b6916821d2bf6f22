"""bench/report.py's tables and plot, from figures shaped like the benchmarks' extra_info."""

import json

import pytest

from bench import report as rep


def _report():
    att = [{"name": f"test_bench_attention[{p}]", "provider": p, "mode": "fwd+bwd", "shape": [64, 256, 6, 64],
            "dropout_p": 0.2, "do_bench_median_us": us}
           for p, us in (("triton", 100.0), ("sdpa-flash", 250.0), ("sdpa-cudnn", 200.0), ("reference", 800.0))]
    ln = [{"name": f"test_bench_layernorm[{p}]", "op": "layer_norm", "provider": p, "mode": "fwd",
           "shape": [16384, 384], "dtype": "torch.bfloat16", "do_bench_median_us": us, "gb_per_s": gbs}
          for p, us, gbs in (("triton", 10.0, 2500.0), ("torch", 30.0, 830.0))]
    step = [{"name": f"test_train_step[{loop}-{mode}]", "loop": loop, "mode": mode, "ms_per_step": ms,
             "tokens_per_s": int(16384 / ms * 1000), "mfu": 0.3}
            for loop, ms in (("seed", 40.0), ("torch-compile-rog", 6.6), ("triton-graphs", 4.0))
            for mode in ("train-step", "eval-batch")]
    training = {"triton-bf16": {"steps": [(0, 4.2, 4.21), (250, 2.0, 2.05)], "timing": "time: 9 s", "wall_s": 10,
                                "command": "python train.py", "returncode": 0},
                "reference-fp32": {"steps": [(0, 4.2, 4.2), (250, 2.0, 2.07)], "timing": "time: 30 s", "wall_s": 31,
                                   "command": "python train.py", "returncode": 0}}
    return {"date": "2026-11-28 07:00 UTC", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6.0",
            "cuda": "13.0", "python": "3.12", "command": "python bench/report.py",
            "tests": {"summary": "300 passed", "seconds": 60, "failures": []},
            "benchmarks": att + ln + step, "bench_notes": [], "training": training}


def test_render_computes_ratios_from_the_same_run():
    text = rep.render(_report())
    assert "| (64, 256, 6, 64) | 0.2 | fwd+bwd | 100.0 | 250.0 | 200.0 | - | 800.0 | 2.00x |" in text
    assert "| layer_norm | fwd | bfloat16 | (16384, 384) | 10.0 (2500) | torch 30.0 | 3.00x |" in text
    assert "| torch-compile-rog | 6.60 |" in text and "| 1.65x |" in text
    assert "| 250 | 2.0500 | 2.0700 | -0.0200 |" in text
    assert text.startswith("## 2026-11-28 07:00 UTC: NVIDIA H100 80GB HBM3")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "r.png"
    rep.plot(_report(), path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_plot_only_from_saved_json(tmp_path):
    pytest.importorskip("matplotlib")
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(_report()))
    assert rep.main(["--plot-only", str(saved), str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").exists()


def test_parallel_stage_collects_each_command(tmp_path):
    """Commands run side by side; a pytest summary is read back; an overrun is killed and says so."""
    passing = tmp_path / "test_ok.py"
    passing.write_text("def test_a():\n    pass\n\ndef test_b():\n    assert 1\n")
    failing = tmp_path / "test_bad.py"
    failing.write_text("def test_c():\n    assert 0\n")
    import sys

    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    done = rep._run_all({"ok": [*pytest_cmd, str(passing)], "bad": [*pytest_cmd, str(failing)],
                         "slow": [sys.executable, "-c", "import time; time.sleep(60)"]}, timeout=10)
    assert done["slow"][0] == "timeout"
    summary = rep.summarize_tests({k: v for k, v in done.items() if k != "slow"})
    assert summary["summary"].startswith("2 passed, 1 failed") or summary["summary"].startswith("1 failed, 2 passed")
    assert "shards not clean: {'bad': 1}" in summary["summary"]
    assert any("test_c" in f for f in summary["failures"])
