"""Every Triton kernel compiles for an H100 (sm_90), through ptxas to a cubin, without a GPU; the
static cost report runs and adds up; the SASS loop parser finds loops.

The slow tests run `bench/compile_check.py` in a subprocess (without TRITON_INTERPRET, which
conftest.py sets for this process), compiled ahead of time by the installed Triton:
- `--quick`: each kernel once per precision path (fp32, bf16) with every flag off and with every
  flag on. The full grid of dtypes, head dims, widths and flags is `python bench/compile_check.py`.
- `--cost --quick --json`: the model's training calls with dropout, one variant of each kernel,
  with the SASS read back. The whole report is `python bench/compile_check.py --cost`.
The parser test needs no compiler: it reads hand-written SASS.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compile_check import ISSUE_RATE, analyze_sass, dot_paths, find_loops, parse_sass

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "compile_check.py"
EXIT_UNAVAILABLE = 77  # compile_check.py: no CUDA backend or no runnable ptxas in this Triton


def _run_compile_check(*args):
    pytest.importorskip("triton", reason="needs the triton package (Linux only)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--jobs", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode == EXIT_UNAVAILABLE:
        pytest.skip(f"this Triton cannot compile for sm_90 here: {proc.stderr.strip()}")
    report = f"stdout (tail):\n{proc.stdout[-8000:]}\nstderr (tail):\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"compile_check.py exited {proc.returncode}\n{report}"
    return proc, report


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    proc, report = _run_compile_check("--quick")
    total = re.search(r"total: (\d+) variants, (\d+) ok, (\d+) failed", proc.stdout)
    assert total, f"no summary line\n{report}"
    n, ok, failed = map(int, total.groups())
    assert ok == n and failed == 0, report
    # The summary table has a row per kernel: all eight must have been captured and compiled.
    rows = re.findall(r"^((?:attention|layernorm)\.\w+)\s+(\d+)\s+(\d+)\s+(\d+)", proc.stdout, re.MULTILINE)
    expected = {f"attention.{k}" for k in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                                           "_dropout_mask_kernel")}
    expected |= {f"layernorm.{k}" for k in ("_ln_fwd_kernel", "_ln_bwd_kernel", "_ln_bwd_reduce_kernel",
                                           "_dropout_mask_kernel")}
    assert {name for name, *_ in rows} == expected, f"kernels compiled: {sorted(r[0] for r in rows)}\n{report}"


# The kernels a training step launches, and those among them that loop (and so have SASS loops).
# A kernel renamed, added or given loops belongs here and in compile_check.py's TRIP_MODELS.
COST_KERNELS = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_ln_fwd_kernel", "_ln_bwd_kernel",
                "_ln_bwd_reduce_kernel"}
LOOPING_KERNELS = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_ln_bwd_kernel",
                   "_ln_bwd_reduce_kernel"}
MMA_KERNELS = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}  # kernels with tl.dot


@pytest.mark.slow
def test_cost_report_adds_up(tmp_path):
    out = tmp_path / "cost.json"
    proc, report = _run_compile_check("--cost", "--quick", "--json", str(out))
    records = json.loads(out.read_text())
    assert {r["kernel"] for r in records} == COST_KERNELS, report
    for r in records:
        name = f"{r['kernel']} {r['variant']}"
        assert "error" not in r, f"{name}: {r['error']}"
        for key, kind in (("kernel", str), ("variant", str), ("regs", int), ("smem", int), ("spill_bytes", int),
                          ("loop_instructions", list), ("warp_instructions", int), ("issue_us", float),
                          ("straight_instructions", int), ("trips", list), ("programs", int), ("warps", int),
                          ("grid", list)):
            assert isinstance(r[key], kind), f"{name}: {key} = {r[key]!r}, not a {kind.__name__}"
        assert r["hgmma"] in (True, False, None), f"{name}: hgmma = {r['hgmma']!r}"
        assert r["variant"].startswith(("bf16 D=64 causal dropout", "x=bf16 w,b=fp32 C=384")), name
        assert r["spill_bytes"] == 0 and r["local_memory"] == {"ldl": 0, "stl": 0}, f"{name} spills: {r}"
        assert r["regs"] > 0 and r["straight_instructions"] > 0, name
        # Loops: present where the kernel loops, every body non-empty, one trip total per body.
        assert bool(r["loop_instructions"]) == (r["kernel"] in LOOPING_KERNELS), f"{name}: {r['loop_instructions']}"
        assert all(isinstance(n, int) and n > 0 for n in r["loop_instructions"]), name
        assert len(r["trips"]) == len(r["loop_instructions"]) and all(t > 0 for t in r["trips"]), name
        # warp_instructions is the sum it claims: every program runs the straight-line code once and
        # each loop body its trips, on every warp.
        assert r["programs"] == r["grid"][0] * r["grid"][1] * r["grid"][2], name
        per_warp = r["programs"] * r["straight_instructions"] + sum(
            n * t for n, t in zip(r["loop_instructions"], r["trips"]))
        assert r["warp_instructions"] == r["warps"] * per_warp > 0, name
        assert r["issue_us"] == pytest.approx(r["warp_instructions"] / ISSUE_RATE * 1e6, abs=1e-3), name
        # Every tl.dot of a bf16 attention kernel runs on the tensor cores as wgmma (HGMMA).
        assert r["hgmma"] is (True if r["kernel"] in MMA_KERNELS else None), f"{name}: hgmma {r['hgmma']}, {r['dots']}"
    assert "| attention backward, dropout |" in proc.stdout, report  # the per-call sums


# cuobjdump -sass layout, hand-written: a prologue, a loop (0x40-0x60) with a forward branch inside
# it that is not a loop, a nested pair (outer 0x90-0x100, inner 0xb0-0xd0, the outer with a second
# back edge), EXIT, and the trap (a branch to itself) with its alignment padding.
SASS = """
        code for sm_90a
                Function : _toy_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
                                                                               /* 0x000fe20000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                          /* 0x0000000000007919 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;         /* 0x000000100000780c */
        /*0030*/               @P0 BRA 0x70 ;                                  /* 0x0000000000000947 */
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;            /* 0x0000000402047981 */
        /*0050*/              @!P1 BRA 0x60 ;                                  /* 0x0000000000000947 */
        /*0060*/              @!P2 BRA 0x40 ;                                  /* 0xfffffffc00008947 */
        /*0070*/                   STG.E.U16 desc[UR4][R2.64], R4 ;            /* 0x0000000402007986 */
        /*0080*/                   NOP ;                                       /* 0x0000000000007918 */
        /*0090*/                   IADD3 R8, R8, 0x1, RZ ;                     /* 0x0000000108087810 */
        /*00a0*/              @!P3 BRA 0xf0 ;                                  /* 0x0000000000000947 */
        /*00b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ; /* 0x0 */
        /*00c0*/                   STL [R1], R24 ;                             /* 0x0 */
        /*00d0*/               @P4 BRA 0xb0 ;                                  /* 0xfffffffc00000947 */
        /*00e0*/               @P5 BRA 0x90 ;                                  /* 0xfffffffc00000947 */
        /*00f0*/                   LDG.E.64.CONSTANT R10, desc[UR4][R2.64] ;   /* 0x0 */
        /*0100*/              @!P6 BRA 0x90 ;                                  /* 0xfffffffc00000947 */
        /*0110*/                   EXIT ;                                      /* 0x000000000000794d */
        /*0120*/                   BRA 0x120;                                  /* 0xfffffffc00fc7947 */
        /*0130*/                   NOP;                                        /* 0x0000000000007918 */
        /*0140*/                   NOP;                                        /* 0x0000000000007918 */
"""


def test_sass_parser_finds_loops_and_nesting():
    instrs = parse_sass(SASS)
    assert len(instrs) == 21 and instrs[0].opcode == "LDC" and instrs[3].pred == "@P0"
    assert instrs[3].operands == "0x70" and instrs[15].opcode == "LDG.E.64.CONSTANT"
    loops, warnings = find_loops(instrs[:18])
    assert warnings == []
    assert [(instrs[l["head"]].addr, instrs[l["tail"]].addr) for l in loops] == [(0x40, 0x60), (0x90, 0x100),
                                                                                  (0xB0, 0xD0)]
    assert [l["size"] for l in loops] == [3, 8, 3]
    assert [l["depth"] for l in loops] == [0, 0, 1]
    # The outer loop's own instructions exclude its inner loop's body.
    assert [l["instructions"] for l in loops] == [3, 5, 3]

    cost = analyze_sass(SASS)
    assert cost["instructions"] == 18  # the trap and the padding after it never run
    assert cost["loop_instructions"] == [3, 5, 3]
    assert cost["straight_instructions"] == 18 - 3 - 8  # outside every loop
    assert cost["ldg"] == {128: 1, 64: 1} and cost["stg"] == {16: 1}
    assert (cost["ldl"], cost["stl"], cost["hgmma_sass"]) == (0, 1, 1)
    assert cost["loop_hgmma"] == [0, 0, 1]  # in the inner loop only
    assert instrs[11].opcode == "HGMMA.64x64x16.F32.BF16" and cost["hgmma_shapes"] == ["64x64x16"]


def test_sass_parser_without_loops():
    text = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in
                     enumerate(["S2R R0, SR_TID.X", "@P0 BRA 0x30", "FADD R1, R1, R2", "EXIT", "BRA 0x40"]))
    cost = analyze_sass(text)
    assert cost["loop_instructions"] == [] and cost["instructions"] == cost["straight_instructions"] == 4


def test_dot_paths():
    bf16 = "%qk = tt.dot %q, %k, %c, inputPrecision = tf32 : tensor<64x64xbf16> * tensor<64x64xbf16> -> ..."
    fp32 = "%qk = tt.dot %q, %k, %c, inputPrecision = ieee : tensor<64x64xf32> * tensor<64x64xf32> -> ..."
    wgmma = "%qk = ttng.warp_group_dot %q, %k, %c {isAsync = true} : ...\n%x = ttng.warp_group_dot_wait %qk"
    assert dot_paths(f"{bf16}\n{bf16}", f"{wgmma}\n{wgmma}", hgmma_sass=8) == (True, 2, 2)
    assert dot_paths(f"{bf16}\n{bf16}", wgmma, hgmma_sass=4) == (False, 2, 1)  # one dot left on mma v2
    assert dot_paths(bf16, wgmma, hgmma_sass=0) == (False, 1, 1)  # no HGMMA in the SASS
    assert dot_paths(fp32, "", hgmma_sass=0) == (None, 1, 0)  # the exact FMA path, by design
    assert dot_paths("", "", hgmma_sass=0) == (None, 0, 0)  # no dot at all
