"""The one GPU report: tests on the GPU, benchmarks against the peers, a short training comparison.

    python bench/report.py            # about 5 minutes on an H100; data/input.txt must be present

Stages, in subprocesses with time limits, so one that fails or overruns still leaves the others'
figures:
  1. side by side: the kernel and model tests on the GPU (bf16 included: tests/test_attention.py,
     tests/test_layernorm.py, tests/test_model_triton.py, in shards), and a short training
     comparison: --max-iters 500 with the triton backend in bf16 and the reference backend in fp32,
     same seed, their val losses side by side;
  2. then alone, one file after another: the benchmarks (pytest bench --benchmark-only):
     attention, LayerNorm at the model's width, the training step and evaluation batch of every
     loop.
It prints a table last, appends a dated section to bench/RESULTS.md, and writes that section, the
raw figures (JSON) and a PNG comparing ours with the peers to --out-dir (the PNG needs matplotlib; without it,
`python bench/report.py --plot-only JSON PNG` draws it later from the JSON on another machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
# Attention at both shapes; LayerNorm at the model's width only (its compiled peers take long to
# build); every training-step loop.
# Each with its time limit in seconds; the whole report stays within about 5 minutes.
BENCH_SELECTION = [
    ("bench/test_bench_attention.py", None, 60),
    ("bench/test_bench_layernorm.py", "16384x384", 60),
    ("bench/test_bench_train_step.py", None, 100),
]
# The tests (in shards) and the training comparison run side by side, their Triton compiles on
# separate cores; the benchmarks then run alone, one file after another, so nothing disturbs them.
TEST_SHARDS = {
    "attention-dropout": ["tests/test_attention.py", "-k", "dropout or seed or kept or mask"],
    "attention-rest": ["tests/test_attention.py", "-k", "not (dropout or seed or kept or mask)"],
    "layernorm": ["tests/test_layernorm.py"],
    "model-triton": ["tests/test_model_triton.py"],
}
PARALLEL_STAGE_TIMEOUT_S = 150
STEP_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)$")


def _run_all(cmds: dict, timeout: float) -> dict:
    """Run the commands side by side in the repository root; {name: (returncode or 'timeout', stdout,
    stderr, seconds)}. Whatever is still running at the deadline is killed."""
    import tempfile

    t0 = time.perf_counter()
    procs = {}
    for name, cmd in cmds.items():
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True), out, err)
    results = {}
    for name, (proc, out, err) in procs.items():
        try:
            code = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "timeout"
        out.seek(0)
        err.seek(0)
        results[name] = (code, out.read(), err.read(), time.perf_counter() - t0)
    return results


def _test_commands():
    return {name: [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
            for name, args in TEST_SHARDS.items()}


def _training_commands(iters, eval_interval, eval_iters):
    runs = {"triton-bf16": ["--backend", "triton", "--dtype", "bfloat16"],
            "reference-fp32": ["--backend", "reference", "--dtype", "float32", "--no-cuda-graphs"]}
    return {f"train:{name}": [sys.executable, "train.py", *flags, "--max-iters", str(iters), "--eval-interval",
                              str(eval_interval), "--eval-iters", str(eval_iters), "--sample-tokens", "0",
                              "--log-interval", "0", "--out", f"/tmp/report-{name}.pth"]
            for name, flags in runs.items()}


def summarize_tests(results):
    counts, failures, codes, secs = {}, [], {}, 0.0
    for name, (code, out, _, t) in results.items():
        codes[name] = code
        secs = max(secs, t)
        last = next((ln for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|skipped)", ln)), "")
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last):
            counts[word] = counts.get(word, 0) + int(n)
        failures += [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    summary = ", ".join(f"{n} {w}" for w, n in counts.items())
    bad = {k: v for k, v in codes.items() if v != 0}
    if bad:
        summary += f" (shards not clean: {bad})"
    return {"summary": summary, "failures": failures[:20], "seconds": round(secs, 1), "returncodes": codes}


def summarize_training(results, cmds):
    runs = {}
    for key, (code, out, err, secs) in results.items():
        name = key.removeprefix("train:")
        steps = [(int(m[1]), float(m[2]), float(m[3])) for m in map(STEP_LINE.match, out.splitlines()) if m]
        runs[name] = {"returncode": code, "steps": steps, "wall_s": round(secs, 1),
                      "command": " ".join(["python", *cmds[key][1:]]), "error": err[-800:] if code != 0 else ""}
    return runs


def run_benchmarks(out_dir):
    results, notes = [], []
    for path, select, timeout in BENCH_SELECTION:
        json_path = out_dir / (Path(path).stem + ".json")
        cmd = [sys.executable, "-m", "pytest", path, "--benchmark-only", "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={json_path}"]
        if select:
            cmd += ["-k", select]
        code, out, err, secs = _run_all({path: cmd}, timeout)[path]
        notes.append(f"{path}: {code} in {secs:.0f} s")
        if json_path.exists():
            for b in json.loads(json_path.read_text())["benchmarks"]:
                results.append({"name": b["name"], **b["extra_info"]})
        elif code != 0:
            notes.append((out + err)[-1500:])
    return results, notes


# ----------------------------------------------------------------------------- tables


def _fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def attention_table(results):
    rows = [r for r in results if r.get("name", "").startswith("test_bench_attention")]
    providers = ["triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "reference"]
    keys = sorted({(tuple(r["shape"]), r["dropout_p"], r["mode"]) for r in rows})
    lines = ["| shape (B,T,H,D) | dropout | mode | " + " | ".join(f"{p} us" for p in providers)
             + " | ours vs best SDPA |", "|" + "---|" * (len(providers) + 4)]
    for shape, p, mode in keys:
        us = {r["provider"]: r["do_bench_median_us"] for r in rows
              if (tuple(r["shape"]), r["dropout_p"], r["mode"]) == (shape, p, mode)}
        peers = [us[k] for k in providers[1:4] if k in us]
        ratio = f"{min(peers) / us['triton']:.2f}x" if peers and "triton" in us else "-"
        lines.append(f"| {shape} | {p} | {mode} | " + " | ".join(_fmt(us.get(k)) for k in providers) + f" | {ratio} |")
    return lines


def layernorm_table(results):
    rows = [r for r in results if r.get("name", "").startswith("test_bench_layernorm")]
    keys = sorted({(r["op"], r["mode"], r["dtype"], tuple(r["shape"])) for r in rows})
    lines = ["| op | mode | dtype | shape | ours us (GB/s) | peers us | best peer / ours |", "|---|---|---|---|---|---|---|"]
    for op, mode, dtype, shape in keys:
        sel = {r["provider"]: r for r in rows if (r["op"], r["mode"], r["dtype"], tuple(r["shape"])) == (op, mode, dtype, shape)}
        ours = sel.get("triton")
        peers = {k: v["do_bench_median_us"] for k, v in sel.items() if k != "triton"}
        peer_txt = ", ".join(f"{k} {v:.1f}" for k, v in sorted(peers.items()))
        ratio = f"{min(peers.values()) / ours['do_bench_median_us']:.2f}x" if ours and peers else "-"
        ours_txt = f"{ours['do_bench_median_us']:.1f} ({ours['gb_per_s']:.0f})" if ours else "-"
        lines.append(f"| {op} | {mode} | {dtype.removeprefix('torch.')} | {shape} | {ours_txt} | {peer_txt} | {ratio} |")
    return lines


def train_step_table(results):
    rows = [r for r in results if r.get("name", "").startswith("test_train_step")]
    by = {(r["loop"], r["mode"]): r for r in rows}
    loops = ["seed", "torch-eager", "torch-compile-rog", "triton-eager", "triton-graphs"]
    lines = ["| loop | ms / step | tok/s | MFU | ms / eval batch | triton-graphs is faster by |",
             "|---|---|---|---|---|---|"]
    ours = by.get(("triton-graphs", "train-step"))
    for loop in loops:
        step, ev = by.get((loop, "train-step")), by.get((loop, "eval-batch"))
        if not step and not ev:
            continue
        ms = _fmt(step["ms_per_step"], 2) if step else "-"
        tok_s = f"{step['tokens_per_s']:,}" if step else "-"
        mfu = f"{step['mfu']:.1%}" if step and step.get("mfu") is not None else "-"
        ev_ms = _fmt(ev["ms_per_step"], 2) if ev else "-"
        speed = f"{step['ms_per_step'] / ours['ms_per_step']:.2f}x" if step and ours else "-"
        lines.append(f"| {loop} | {ms} | {tok_s} | {mfu} | {ev_ms} | {speed} |")
    return lines


def training_table(runs):
    names = list(runs)
    steps = sorted({s for r in runs.values() for s, _, _ in r["steps"]})
    lines = ["| step | " + " | ".join(f"{n} val" for n in names) + " | difference |",
             "|" + "---|" * (len(names) + 2)]
    for step in steps:
        vals = [next((v for s, _, v in runs[n]["steps"] if s == step), None) for n in names]
        diff = f"{vals[0] - vals[1]:+.4f}" if len(vals) == 2 and None not in vals else "-"
        lines.append(f"| {step} | " + " | ".join(_fmt(v, 4) for v in vals) + f" | {diff} |")
    for n in names:
        status = "" if runs[n]["returncode"] == 0 else f" (exit {runs[n]['returncode']}: {runs[n]['error'][-200:]})"
        lines.append(f"\n{n}: `{runs[n]['command']}`{status}")
    lines.append("\n(These runs share the GPU with the tests, so their times are not reported.)")
    return lines


def plot(report, png_path):
    """Bar charts, ours against the peers: attention and LayerNorm GPU time, training step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["benchmarks"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    att = [r for r in res if r["name"].startswith("test_bench_attention") and r["shape"][1] == 256 and r["dropout_p"] == 0.2]
    for ax, rows, label, key in (
        (axes[0], att, "attention (64,256,6,64) bf16 p=0.2: us", lambda r: f"{r['provider']}\n{r['mode']}"),
        (axes[1], [r for r in res if r["name"].startswith("test_bench_layernorm") and "bfloat16" in r["dtype"]],
         "LayerNorm (16384,384) bf16: us", lambda r: f"{r['provider']}\n{'add+ln' if r['op'] == 'add_layer_norm' else 'ln'} {r['mode']}"),
    ):
        ax.barh([key(r) for r in rows], [r["do_bench_median_us"] for r in rows],
                color=["tab:red" if r["provider"] == "triton" else "tab:gray" for r in rows])
        ax.set_title(label)
        ax.tick_params(axis="y", labelsize=7)
    steps = [r for r in res if r["name"].startswith("test_train_step") and r["mode"] == "train-step"]
    axes[2].barh([r["loop"] for r in steps], [r["ms_per_step"] for r in steps],
                 color=["tab:red" if r["loop"].startswith("triton") else "tab:gray" for r in steps])
    axes[2].set_title("training step: ms")
    fig.suptitle(f"{report['gpu']} | {report['date']} | torch {report['torch']} triton {report['triton']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def render(report) -> str:
    parts = [f"## {report['date']}: {report['gpu']}", "",
             f"torch {report['torch']}, Triton {report['triton']}, CUDA {report['cuda']}, Python {report['python']}. "
             f"Command: `{report['command']}`.", "",
             f"Tests on the GPU ({', '.join(sorted({a[0] for a in TEST_SHARDS.values()}))}): "
             f"{report['tests'].get('summary') or 'not run'} "
             f"in {report['tests'].get('seconds')} s."]
    parts += [f"- {f}" for f in report["tests"].get("failures", [])]
    parts += ["", "Attention, GPU time (triton.testing.do_bench median), causal, bf16:", "",
              *attention_table(report["benchmarks"]), "",
              "LayerNorm, GPU time (do_bench median) and our GB/s:", "", *layernorm_table(report["benchmarks"]), "",
              "Training step (B=64, T=256, the model's shape; a loop of 50 steps, one synchronize):", "",
              *train_step_table(report["benchmarks"]), "",
              "Short training comparison (same seed):", "", *training_table(report["training"]), ""]
    if report["bench_notes"]:
        parts += ["Benchmark stages: " + "; ".join(n for n in report["bench_notes"] if len(n) < 200), ""]
    return "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "report")),
                   help="where the JSON and PNG go [$OUT, else bench/report]")
    p.add_argument("--iters", type=int, default=500, help="training comparison steps [500]")
    p.add_argument("--skip", action="append", default=[], choices=["tests", "bench", "training"],
                   help="leave out a stage (repeatable)")
    p.add_argument("--no-results-md", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--plot-only", nargs=2, metavar=("JSON", "PNG"), help="only draw the PNG from a saved report")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(json.loads(Path(args.plot_only[0]).read_text()), args.plot_only[1])
        return 0

    import torch
    import triton

    if not torch.cuda.is_available():
        print("bench/report.py: error: needs a CUDA GPU (the tests and benchmarks run elsewhere too: "
              "pytest; pytest bench --benchmark-only)", file=sys.stderr)
        return 2
    if "training" not in args.skip and not (ROOT / "data" / "input.txt").exists():
        print("bench/report.py: error: data/input.txt is missing (copy tiny Shakespeare there, or --skip training)",
              file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "command": "python bench/report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tests": {}, "benchmarks": [], "bench_notes": [], "training": {},
    }
    cmds = {}
    if "tests" not in args.skip:
        cmds.update(_test_commands())
    if "training" not in args.skip:
        cmds.update(_training_commands(args.iters, args.iters // 2, 50))
    if cmds:
        done = _run_all(cmds, PARALLEL_STAGE_TIMEOUT_S)
        tests = {k: v for k, v in done.items() if not k.startswith("train:")}
        if tests:
            report["tests"] = summarize_tests(tests)
            print(f"tests: {report['tests']['summary']} ({report['tests']['seconds']} s)", file=sys.stderr, flush=True)
        training = {k: v for k, v in done.items() if k.startswith("train:")}
        if training:
            report["training"] = summarize_training(training, cmds)
    if "bench" not in args.skip:
        report["benchmarks"], report["bench_notes"] = run_benchmarks(args.out_dir)
        print("benchmarks: " + "; ".join(n for n in report["bench_notes"] if len(n) < 200), file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    json_path = args.out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=1))
    try:
        plot(report, args.out_dir / "report.png")
    except ImportError:
        print(f"no matplotlib here: draw the PNG later with python bench/report.py --plot-only {json_path} report.png",
              file=sys.stderr)
    text = render(report)
    (args.out_dir / "RESULTS-section.md").write_text(text + "\n")
    if not args.no_results_md:
        with RESULTS_MD.open("a") as f:
            f.write("\n" + text + "\n")
    print(text)
    print(f"report: {report['seconds']} s; raw figures in {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
