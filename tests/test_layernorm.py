"""kernels.layer_norm and kernels.add_layer_norm against the float64 reference, forward and every
gradient, plus dropout bits, determinism, the inference path and bad input."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import layernorm as ln
from kernels import reference as ref
from kernels.dropout import dropout_threshold
from tests.conftest import DTYPES, assert_matches_reference
from tests.test_dropout import layernorm_keep_np

SHAPES = [
    pytest.param((1, 3), id="1x3"),
    pytest.param((7, 33), id="7x33"),
    pytest.param((2, 5, 384), id="2x5x384"),
    pytest.param((3, 1000), id="3x1000"),
    pytest.param((2, 4097), id="2x4097"),
    pytest.param((4, 8192), id="4x8192"),
]


def _run(fn, tensors, cotangents):
    """Outputs of fn(*tensors) and the gradients of sum(out * cotangent) for each input tensor.

    A cotangent of None leaves that output out of the loss (it gets no gradient from it).
    """
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    used = [(o, c) for o, c in zip(outs, cotangents) if c is not None]
    torch.autograd.backward([o for o, _ in used], [c for _, c in used])
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


def _compare(kernel_fn, ref_fn, tensors, cotangents, out_names, in_names, torch_fn=None):
    """Kernel vs reference (float64), with the same computation in the kernel's dtypes as the
    yardstick: ref_fn itself, or torch_fn (PyTorch's own op) when given."""
    out_dtype = tensors[0].dtype
    outs, grads = _run(kernel_fn, tensors, cotangents)
    outs64, grads64 = _run(ref_fn, [t.double() if t is not None else None for t in tensors],
                           [c.double() if c is not None else None for c in cotangents])
    # Same computation in the kernel's dtypes; outputs cast to x's dtype as the kernel stores them
    # (fp32 parameters would otherwise promote them).
    torch_fn = torch_fn or ref_fn
    outs_kd, grads_kd = _run(lambda *a: tuple(o.to(out_dtype) for o in _as_tuple(torch_fn(*a))),
                             tensors, cotangents)
    for name, o, o64, okd in zip(out_names, outs, outs64, outs_kd):
        assert_matches_reference(name, o, o64, okd)
    for name, t, g, g64, gkd in zip(in_names, tensors, grads, grads64, grads_kd):
        if t is None:
            continue
        if g64 is None:  # the loss does not depend on t (y unused): its gradient is zero
            assert g is None or not g.any(), f"{name}: nonzero gradient, expected none"
            continue
        assert g is not None, f"{name}: no gradient"
        assert_matches_reference(name, g, g64, gkd)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _inputs(shape, dtype, device, affine="weight+bias", param_dtype=None):
    C = shape[-1]
    param_dtype = param_dtype or dtype
    x = torch.randn(shape, device=device).to(dtype)  # (..., C)
    w = (1 + 0.5 * torch.randn(C, device=device)).to(param_dtype) if "weight" in affine else None  # (C,)
    b = (0.5 * torch.randn(C, device=device)).to(param_dtype) if "bias" in affine else None  # (C,)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_reference(shape, dtype, device):
    x, w, b = _inputs(shape, dtype, device)
    dy = torch.randn(shape, device=device).to(dtype)
    _compare(kernels.layer_norm, ref.layer_norm, [x, w, b], [dy], ["y"], ["dx", "dweight", "dbias"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_column(dtype, device):
    """C = 1: xhat = 0, so y = bias and dx = 0 exactly. (The fp16 reference is no yardstick here:
    its rsqrt backward cubes rsqrt(eps) ~ 316 past fp16's range and returns nan.)"""
    x, w, b = _inputs((5, 1), dtype, device)
    dy = torch.randn(5, 1, device=device).to(dtype)
    (y,), (dx, dw, db) = _run(kernels.layer_norm, [x, w, b], [dy])
    assert torch.equal(y, b.expand(5, 1)) and torch.equal(dx, torch.zeros_like(dx))
    assert torch.equal(dw, torch.zeros_like(dw))
    torch.testing.assert_close(db, dy.double().sum(0).to(dtype))
    if dtype == torch.float32:
        _compare(kernels.layer_norm, ref.layer_norm, [x, w, b], [dy], ["y"], ["dx", "dweight", "dbias"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_layer_norm_without_weight_or_bias(affine, dtype, device):
    x, w, b = _inputs((7, 33), dtype, device, affine)
    dy = torch.randn(7, 33, device=device).to(dtype)
    _compare(kernels.layer_norm, ref.layer_norm, [x, w, b], [dy], ["y"], ["dx", "dweight", "dbias"])


def _hard_rows(kind, shape, dtype, device):
    """Rows that are hard on the statistics, in dtype: "constant" rows (each its own value, of
    magnitude 500 to 1000, so that a sum of C of them rounds in fp32), or "large-mean" rows (such a
    mean and a spread of 16 units in the last place of 1000 in dtype, so the mean cancels all but a
    few bits)."""
    rows, C = shape
    ulp = torch.finfo(dtype).eps * 512  # the spacing of dtype's values in [512, 1024)
    mean = (500 + 500 * torch.rand(rows, 1, device=device)) * torch.randn(rows, 1, device=device).sign()
    spread = 0.0 if kind == "constant" else 16 * ulp * torch.randn(rows, C, device=device)
    return (mean.expand(rows, C) + spread).to(dtype)  # (rows, C)


def _torch_layer_norm(x, w=None, b=None):
    return F.layer_norm(x, x.shape[-1:], w, b, 1e-5)


def _torch_add_layer_norm(x, r, w=None, b=None):
    s = r + x
    return F.layer_norm(s, s.shape[-1:], w, b, 1e-5), s


HARD_SHAPES = [pytest.param((24, 384), id="24x384"), pytest.param((5, 1000), id="5x1000")]


@pytest.mark.parametrize("kind", ["constant", "large-mean"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", HARD_SHAPES)
def test_layer_norm_hard_rows(shape, dtype, kind, device):
    """Constant rows and rows with a large mean and a tiny spread, against float64, no worse than
    twice PyTorch's own F.layer_norm in dtype (the reference ops in half precision overflow rstd^3
    in backward on such rows). On constant rows PyTorch returns the bias exactly, and so must we."""
    x = _hard_rows(kind, shape, dtype, device)
    _, w, b = _inputs(shape, dtype, device)
    dy = torch.randn(shape, device=device).to(dtype)
    _compare(kernels.layer_norm, ref.layer_norm, [x, w, b], [dy], ["y"], ["dx", "dweight", "dbias"],
             torch_fn=_torch_layer_norm)
    if kind == "constant":
        assert torch.equal(kernels.layer_norm(x, w, b), b.expand(shape)), "y != bias on constant rows"


@pytest.mark.parametrize("kind", ["constant", "large-mean", "sub-ulp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", HARD_SHAPES)
def test_add_layer_norm_hard_rows(shape, dtype, kind, device):
    """Constant rows as the residual, and x = 0 (constant), a spread of 16 units in the last place
    of the residual (large-mean) or of a quarter of one (sub-ulp, where s is mostly the rounding of
    r + x). s is rounded to dtype when stored: the statistics must come from the stored s, which is
    what backward reads."""
    r = _hard_rows("constant", shape, dtype, device)  # (rows, C)
    ulp = torch.finfo(dtype).eps * 512  # of r's values in [512, 1024)
    spread = {"constant": 0.0, "large-mean": 16 * ulp, "sub-ulp": ulp / 4}[kind]
    x = (spread * torch.randn(shape, device=device)).to(dtype)  # (rows, C)
    _, w, b = _inputs(shape, dtype, device)
    dy, ds = torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)
    _compare(kernels.add_layer_norm, ref.add_layer_norm, [x, r, w, b], [dy, ds], ["y", "s"],
             ["dx", "dresidual", "dweight", "dbias"], torch_fn=_torch_add_layer_norm)
    if kind == "constant":
        assert torch.equal(kernels.add_layer_norm(x, r, w, b)[0], b.expand(shape)), "y != bias on constant rows"


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_normalizes_the_stored_s(dtype, device):
    """y, dresidual, dweight and dbias are layer_norm's, and its gradients', at s as stored (rounded
    to dtype), the value backward reads: against float64 at that s, no worse than twice F.layer_norm
    in dtype at that s. Rows with a large mean and a spread of a quarter unit in the last place
    make s mostly the rounding of residual + x, so statistics of the unrounded sum would not do."""
    shape = (24, 384)
    r = _hard_rows("constant", shape, dtype, device)  # (rows, C)
    x = (torch.finfo(dtype).eps * 128 * torch.randn(shape, device=device)).to(dtype)  # (rows, C)
    _, w, b = _inputs(shape, dtype, device)
    dy = torch.randn(shape, device=device).to(dtype)
    (y, s), (_, dres, dw, db) = _run(kernels.add_layer_norm, [x, r, w, b], [dy, None])
    (y64,), (ds64, dw64, db64) = _run(ref.layer_norm, [s.double(), w.double(), b.double()], [dy.double()])
    (y_kd,), (ds_kd, dw_kd, db_kd) = _run(_torch_layer_norm, [s, w, b], [dy])
    for name, got, want, yardstick in [("y", y, y64, y_kd), ("dresidual", dres, ds64, ds_kd),
                                       ("dweight", dw, dw64, dw_kd), ("dbias", db, db64, db_kd)]:
        assert_matches_reference(name, got, want, yardstick)


@pytest.mark.parametrize("x_dtype", [p for p in DTYPES if p.id != "fp32"])
@pytest.mark.parametrize("shape", [pytest.param((7, 33), id="7x33"), pytest.param((2, 5, 384), id="2x5x384")])
def test_fp32_params_with_half_x(shape, x_dtype, device):
    """Autocast training keeps fp32 parameters: y and dx in x's dtype, dweight/dbias in fp32."""
    x, w, b = _inputs(shape, x_dtype, device, param_dtype=torch.float32)
    dy = torch.randn(shape, device=device).to(x_dtype)
    _compare(kernels.layer_norm, ref.layer_norm, [x, w, b], [dy], ["y"], ["dx", "dweight", "dbias"])
    r = torch.randn(shape, device=device).to(x_dtype)
    _compare(kernels.add_layer_norm, ref.add_layer_norm, [x, r, w, b], [dy, dy], ["y", "s"],
             ["dx", "dresidual", "dweight", "dbias"])


@pytest.mark.parametrize("grads", ["y+s", "y", "s"])
@pytest.mark.parametrize("dropout_p", [pytest.param(0.0, id="p0"), pytest.param(0.2, id="p0.2")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param(s, id="x".join(map(str, s)))
                                   for s in [(1, 3), (7, 33), (2, 5, 384), (2, 4097)]])
def test_add_layer_norm_matches_reference(shape, dtype, dropout_p, grads, device):
    """grads names the outputs the loss uses: "s" alone sends no gradient through y, "y" none into s."""
    x, w, b = _inputs(shape, dtype, device)
    r = torch.randn(shape, device=device).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype) if "y" in grads else None
    ds = torch.randn(shape, device=device).to(dtype) if "s" in grads else None
    rows, C = x.numel() // shape[-1], shape[-1]
    keep = ln.dropout_keep_mask(1234, rows, C, dropout_p, device) if dropout_p > 0 else None  # (rows, C)
    # The kernels drop with p quantized to 1/65536 and scale by 1 / (1 - that p): so does the reference.
    p_eff = dropout_threshold(dropout_p).p
    _compare(lambda *a: kernels.add_layer_norm(*a, dropout_p=dropout_p, seed=1234),
             lambda *a: ref.add_layer_norm(*a, dropout_p=p_eff, keep_mask=keep),
             [x, r, w, b], [dy, ds], ["y", "s"], ["dx", "dresidual", "dweight", "dbias"])


class _GridSpy:
    """Stands in for a kernel and records the grid of each launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def run(self, *args, grid, **kwargs):  # the launchers call kernel.run(..., grid=grid, warmup=False)
        self.grids.append(grid)
        return self.kernel.run(*args, grid=grid, **kwargs)

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def _many_rows_shape(device):
    """(rows, 256) with a ragged last row block and more than twice as many row blocks as backward
    programs can be (about 300 rows in the interpreter, which runs 8; more on a GPU, where the
    bound is 32 programs an SM)."""
    n_cols = 256
    rows_per_block = ln._config(n_cols).rows
    if device.type == "cuda":
        max_progs = torch.cuda.get_device_properties(device).multi_processor_count * ln._MAX_BLOCKS_PER_SM
    else:
        max_progs = ln._INTERPRETER_PROGRAMS
    return rows_per_block * (2 * max_progs + 3) - 5, n_cols


def _check_backward_grid(spy, shape):
    """The backward ran with several programs, each folding at least two row blocks."""
    n_blocks = math.ceil(shape[0] / ln._config(shape[1]).rows)
    (n_progs,), = spy.grids
    assert 1 < n_progs and 2 * n_progs < n_blocks, f"{n_progs} programs for {n_blocks} row blocks"


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm_dropout"])
def test_many_rows_several_programs(op, device, monkeypatch):
    """Several backward programs each fold several row blocks into their partial sums."""
    spy = _GridSpy(ln._ln_bwd_kernel)
    monkeypatch.setattr(ln, "_ln_bwd_kernel", spy)
    shape = _many_rows_shape(device)
    x, w, b = _inputs(shape, torch.float32, device)
    dy = torch.randn(shape, device=device)
    if op == "layer_norm":
        _compare(kernels.layer_norm, ref.layer_norm, [x, w, b], [dy], ["y"], ["dx", "dweight", "dbias"])
    else:
        r, ds = torch.randn(shape, device=device), torch.randn(shape, device=device)
        keep = ln.dropout_keep_mask(7, *shape, 0.3, device)  # (rows, C)
        _compare(lambda *a: kernels.add_layer_norm(*a, dropout_p=0.3, seed=7),
                 lambda *a: ref.add_layer_norm(*a, dropout_p=dropout_threshold(0.3).p, keep_mask=keep),
                 [x, r, w, b], [dy, ds], ["y", "s"], ["dx", "dresidual", "dweight", "dbias"])
    _check_backward_grid(spy, shape)


@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias"])
def test_dweight_dbias_bitwise_repeatable(affine, device, monkeypatch):
    """The grid sized to what is resident, the per-program partials and their one reduction give the
    same bits on every run."""
    spy = _GridSpy(ln._ln_bwd_kernel)
    monkeypatch.setattr(ln, "_ln_bwd_kernel", spy)
    shape = _many_rows_shape(device)
    x, w, b = _inputs(shape, torch.float32, device, affine)
    dy = torch.randn(shape, device=device)
    (_, (_, dw1, db1)), (_, (_, dw2, db2)) = [_run(kernels.layer_norm, [x, w, b], [dy]) for _ in range(2)]
    for name, g1, g2, t in (("dweight", dw1, dw2, w), ("dbias", db1, db2, b)):
        assert (g1 is None) == (t is None), name
        if t is not None:
            assert g1.any() and torch.equal(g1, g2), name
    spy.grids[1:] = []
    _check_backward_grid(spy, shape)


def _binomial_close(keep, prob, what):
    """The count of True in keep is within 6 standard deviations of keep.numel() * prob."""
    n, count = keep.numel(), keep.sum().item()
    sigma = math.sqrt(n * prob * (1 - prob))
    assert abs(count - n * prob) <= 6 * sigma, f"{what}: {count} of {n}, expected {n * prob:.0f} +- {sigma:.0f}"


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(dropout_p, device):
    n_rows, n_cols = 256, 1000
    keep = ln.dropout_keep_mask(99, n_rows, n_cols, dropout_p, device)  # (rows, C)
    assert keep.dtype == torch.bool and keep.shape == (n_rows, n_cols)
    keep = keep.cpu()
    q = 1 - dropout_threshold(dropout_p).p
    _binomial_close(keep, q, "kept")
    # Each of the eight slices of a Philox call (row % 2, col % 4), and two slices of one call
    # together, look independent.
    slices = [keep[h::2, c::4] for h in range(2) for c in range(4)]
    for i, sl in enumerate(slices):
        _binomial_close(sl, q, f"kept at slice {i}")
    for i, j in itertools.combinations(range(8), 2):
        _binomial_close(slices[i] & slices[j], q * q, f"kept at slices {i} and {j}")


def test_dropout_bits_do_not_depend_on_tiling(device, monkeypatch):
    """The bits depend on (seed, row, col) only: not on ROWS, BLOCK_C, the grid, the number of rows
    or the seed's type; forward and backward apply them under any tiling."""
    n_rows, n_cols, p = 37, 33, 0.5
    want = ln.dropout_keep_mask(5, n_rows, n_cols, p, device)  # (rows, C)
    assert 0 < want.sum() < want.numel()
    assert torch.equal(ln.dropout_keep_mask(5, 3, n_cols, p, device), want[:3])
    assert torch.equal(ln.dropout_keep_mask(torch.tensor(5), n_rows, n_cols, p, device), want)
    x, r = torch.ones(n_rows, n_cols, device=device), torch.zeros(n_rows, n_cols, device=device)
    # Tiles of 32 columns (two, the second masked past C), 16 (three) or 64 (one), with one row a
    # program (no pairs), or four or eight (pairs of rows in a thread; 37 rows end in half a pair);
    # the mask kernel's own column blocks of 8, 32 and 64.
    for cfg, (block_c, rows) in [(ln._Config(32, 1, 1), (8, 1)), (ln._Config(16, 4, 2), (32, 4)),
                                 (ln._Config(64, 8, 4), (64, 16))]:
        monkeypatch.setattr(ln, "_config", lambda c, cfg=cfg: cfg)
        monkeypatch.setattr(ln, "_mask_config", lambda c, bc=block_c, rs=rows: (bc, rs))
        tiling = f"{cfg}, mask BLOCK_C={block_c}, ROWS={rows}"
        assert torch.equal(ln.dropout_keep_mask(5, n_rows, n_cols, p, device), want), tiling
        # s = r + x * keep / (1 - p) = 2 keep, and with the loss sum(s), dx = keep / (1 - p) = 2 keep.
        (_, s), (dx, _, _, _) = _run(lambda *a: kernels.add_layer_norm(*a, dropout_p=p, seed=5),
                                     [x, r, None, None], [None, torch.ones_like(x)])
        assert torch.equal(s, 2 * want.float()) and torch.equal(dx, 2 * want.float()), tiling


def _ln_keep_np(seed: int, rows: np.ndarray, cols: np.ndarray, p: float) -> np.ndarray:
    """The layer-norm layout of kernels/dropout.py's docstring in NumPy (tests/test_dropout.py's)."""
    return layernorm_keep_np(seed, rows, cols, dropout_threshold(p).threshold)


@pytest.mark.parametrize("n_rows, n_cols", [(37, 129), (7, 33), (5, 64), (9, 3), (6, 1)],
                         ids=["37x129", "7x33", "5x64", "9x3", "6x1"])
@pytest.mark.parametrize("seed", [0, 2**40 + 12345, 2**63 - 1])  # the seed's high half matters too
def test_dropout_bits_are_philox_of_seed_row_and_col(seed, n_rows, n_cols, device):
    """Bit-exact against an independent NumPy Philox (tests/test_dropout.py's, itself checked
    against Random123's known answers), rows past 2^32 included."""
    p = 0.3
    keep = ln.dropout_keep_mask(seed, n_rows, n_cols, p, device)  # (rows, C)
    expected = _ln_keep_np(seed, np.arange(n_rows)[:, None], np.arange(n_cols)[None, :], p)  # (rows, C)
    assert np.array_equal(keep.cpu().numpy(), expected)
    # Rows from 2^33 on: the pair index's high word is a counter word too.
    far = ln._keep_mask(seed, 2**33 + 1, n_rows, n_cols, p, device)  # (rows, C)
    rows = 2**33 + 1 + np.arange(n_rows)[:, None]  # (rows, 1)
    assert np.array_equal(far.cpu().numpy(), _ln_keep_np(seed, rows, np.arange(n_cols)[None, :], p))


@pytest.mark.parametrize("n_cols", [1, 33, 384, 1000, 4097])
@pytest.mark.parametrize("n_rows", [1, 6, 37])
def test_kernels_apply_dropout_keep_mask(n_rows, n_cols, device):
    """dropout_keep_mask is exactly what forward and backward apply, for widths that are and are
    not multiples of the pieces (128 columns) and of a call's 4 columns, odd row counts included."""
    p = 0.5  # a threshold of 2^15: p is exact and the scale 2
    want = ln.dropout_keep_mask(21, n_rows, n_cols, p, device)  # (rows, C)
    assert 0 < want.sum() < want.numel() or want.numel() < 8
    x, r = torch.ones(n_rows, n_cols, device=device), torch.zeros(n_rows, n_cols, device=device)
    # s = r + x * keep * 2, and with the loss sum(s), dx = 2 keep, dresidual = 1.
    (_, s), (dx, dres, _, _) = _run(lambda *a: kernels.add_layer_norm(*a, dropout_p=p, seed=21),
                                    [x, r, None, None], [None, torch.ones_like(x)])
    assert torch.equal(s, 2 * want.float()) and torch.equal(dx, 2 * want.float())
    assert torch.equal(dres, torch.ones_like(dres))


def test_same_seed_same_bits_other_seed_different(device):
    x, w, b = _inputs((16, 64), torch.float32, device)
    r, dy, ds = (torch.randn(16, 64, device=device) for _ in range(3))
    run = lambda seed: _run(lambda *a: kernels.add_layer_norm(*a, dropout_p=0.5, seed=seed),  # noqa: E731
                            [x, r, w, b], [dy, ds])
    (outs1, grads1), (outs2, grads2), (outs3, _) = run(11), run(11), run(12)
    for a, b_ in zip(outs1 + grads1, outs2 + grads2):
        assert torch.equal(a, b_)
    assert not torch.equal(outs1[1], outs3[1])
    keep11 = ln.dropout_keep_mask(11, 16, 64, 0.5, device)
    torch.testing.assert_close(outs1[1], r + x * keep11 / 0.5)


def test_every_seed_bit_matters(device):
    """64-bit keys: seeds that differ in one bit only, low or high word, give different masks."""
    base = ln.dropout_keep_mask(12345, 16, 64, 0.5, device)  # (rows, C)
    for bit in (0, 31, 32, 62):
        assert not torch.equal(ln.dropout_keep_mask(12345 ^ (1 << bit), 16, 64, 0.5, device), base), bit


def test_seed_none_repeatable_under_manual_seed(device):
    x, r = torch.randn(16, 64, device=device), torch.randn(16, 64, device=device)
    draw = lambda: kernels.add_layer_norm(x, r, dropout_p=0.5)[1]  # noqa: E731
    torch.manual_seed(3)
    s1, s2 = draw(), draw()
    torch.manual_seed(3)
    s3 = draw()
    assert torch.equal(s1, s3), "seed=None is not repeatable under torch.manual_seed"
    assert not torch.equal(s1, s2), "seed=None drew the same bits twice"


def test_seed_none_backward_uses_forward_bits(device):
    x, r = torch.randn(16, 64, device=device), torch.randn(16, 64, device=device)
    (_, s), (dx, dres, _, _) = _run(lambda *a: kernels.add_layer_norm(*a, dropout_p=0.5),
                                    [x, r, None, None], [torch.randn(16, 64, device=device), None])
    kept = s != r  # x is nonzero, so exactly the kept elements moved s
    assert 0 < kept.sum() < kept.numel()
    assert torch.equal(dx != 0, kept)
    torch.testing.assert_close(dx, torch.where(kept, dres / 0.5, 0.0))


def test_non_contiguous_inputs(device):
    x = torch.randn(33, 7, device=device).t()  # (7, 33), non-contiguous
    r = torch.randn(33, 7, device=device).t()  # (7, 33), non-contiguous
    w = torch.randn(66, device=device)[::2]  # (33,), non-contiguous
    b = torch.randn(33, device=device)
    dy = torch.randn(33, 7, device=device).t()
    assert not (x.is_contiguous() or r.is_contiguous() or w.is_contiguous() or dy.is_contiguous())
    _compare(kernels.layer_norm, ref.layer_norm, [x, w, b], [dy], ["y"], ["dx", "dweight", "dbias"])
    _compare(kernels.add_layer_norm, ref.add_layer_norm, [x, r, w, b], [dy, dy], ["y", "s"],
             ["dx", "dresidual", "dweight", "dbias"])


@pytest.mark.parametrize("how", ["no_grad", "no_requires_grad", "training"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_stats_saved_only_for_training(op, how, device, monkeypatch):
    """Inference (no_grad, or nothing requires grad) neither builds a graph nor writes mean/rstd;
    its outputs are bitwise those of the training path."""
    save_stats_seen = []

    def spy(*args):
        save_stats_seen.append(args[-1])
        return launcher(*args)

    launcher = ln._ln_forward
    monkeypatch.setattr(ln, "_ln_forward", spy)
    x, w, b = _inputs((7, 33), torch.float32, device)
    r = torch.randn(7, 33, device=device)
    call = (lambda x_: kernels.layer_norm(x_, w, b)) if op == "layer_norm" else \
        (lambda x_: kernels.add_layer_norm(x_, r, w, b, dropout_p=0.2, seed=3))
    with torch.set_grad_enabled(how != "no_grad"):
        outs = _as_tuple(call(x.clone().requires_grad_(how != "no_requires_grad")))
    assert save_stats_seen == [how == "training"]
    assert all((o.grad_fn is not None) == (how == "training") for o in outs)
    if how != "training":
        for o, t in zip(outs, _as_tuple(call(x.clone().requires_grad_()))):
            assert torch.equal(o, t.detach())


def test_zero_rows(device):
    x, w, b = _inputs((0, 8), torch.float32, device)
    outs, (dx, dw, db) = _run(kernels.layer_norm, [x, w, b], [torch.empty(0, 8, device=device)])
    assert outs[0].shape == (0, 8) and dx.shape == (0, 8)
    assert torch.equal(dw, torch.zeros(8, device=device)) and torch.equal(db, torch.zeros(8, device=device))


BAD_INPUTS = [
    pytest.param(lambda x, dev: kernels.layer_norm(x, torch.ones(9, device=dev)), ValueError,
                 r"weight must have shape \(C,\) = \(8,\), got \(9,\)", id="weight-shape"),
    pytest.param(lambda x, dev: kernels.layer_norm(x, None, torch.ones(2, 8, device=dev)), ValueError,
                 r"bias must have shape \(C,\) = \(8,\), got \(2, 8\)", id="bias-shape"),
    pytest.param(lambda x, dev: kernels.add_layer_norm(x, torch.randn(4, 9, device=dev)), ValueError,
                 r"residual must have x's shape \(4, 8\), got \(4, 9\)", id="residual-shape"),
    pytest.param(lambda x, dev: kernels.add_layer_norm(x, x.half()), TypeError,
                 r"residual must have x's dtype torch.float32, got torch.float16", id="residual-dtype"),
    pytest.param(lambda x, dev: kernels.layer_norm(x, eps=0.0), ValueError, r"eps must be > 0, got 0.0",
                 id="eps-zero"),
    pytest.param(lambda x, dev: kernels.add_layer_norm(x, x, eps=-1e-5), ValueError,
                 r"eps must be > 0, got -1e-05", id="eps-negative"),
    pytest.param(lambda x, dev: kernels.layer_norm(x, eps="1e-5"), TypeError, r"eps must be a float, got str",
                 id="eps-str"),
    pytest.param(lambda x, dev: kernels.layer_norm(x.long()), TypeError,
                 r"x must be float32, float16 or bfloat16, got torch.int64", id="x-int"),
    pytest.param(lambda x, dev: kernels.add_layer_norm(x, x.int()), TypeError,
                 r"residual must be float32, float16 or bfloat16, got torch.int32", id="residual-int"),
    pytest.param(lambda x, dev: kernels.layer_norm(x, torch.ones(8, dtype=torch.int32, device=dev)), TypeError,
                 r"weight must be float32, float16 or bfloat16, got torch.int32", id="weight-int"),
    pytest.param(lambda x, dev: kernels.layer_norm([[1.0, 2.0]]), TypeError,
                 r"x must be a torch.Tensor, got list", id="x-list"),
    pytest.param(lambda x, dev: kernels.add_layer_norm(x, x, dropout_p=1.0), ValueError,
                 r"dropout_p must be in \[0, 1\), got 1.0", id="p-one"),
    pytest.param(lambda x, dev: kernels.add_layer_norm(x, x, dropout_p=-0.1), ValueError,
                 r"dropout_p must be in \[0, 1\), got -0.1", id="p-negative"),
    pytest.param(lambda x, dev: kernels.add_layer_norm(x, x, dropout_p=0.1, seed="7"), TypeError,
                 r"seed must be an int, a 1-element integer tensor or None, got str", id="seed-str"),
    pytest.param(lambda x, dev: kernels.layer_norm(x, torch.ones(8, device="meta")), ValueError,
                 r"weight is on meta, x on (cpu|cuda)", id="weight-device"),
    pytest.param(lambda x, dev: kernels.add_layer_norm(x, x, None, torch.ones(8, device="meta")), ValueError,
                 r"bias is on meta, x on (cpu|cuda)", id="bias-device"),
    pytest.param(lambda x, dev: kernels.add_layer_norm(x, x.to("meta")), ValueError,
                 r"residual is on meta, x on (cpu|cuda)", id="residual-device"),
    pytest.param(lambda x, dev: kernels.layer_norm(torch.ones(1, ln.MAX_COLS + 1, device=dev)), ValueError,
                 r"last dimension C in \[1, 16384\], got shape \(1, 16385\)", id="C-too-large"),
    pytest.param(lambda x, dev: kernels.layer_norm(torch.ones(4, 0, device=dev)), ValueError,
                 r"last dimension C in \[1, 16384\], got shape \(4, 0\)", id="C-zero"),
]


@pytest.mark.parametrize("call, exc, match", BAD_INPUTS)
def test_bad_input_raises(call, exc, match, device):
    with pytest.raises(exc, match=match):
        call(torch.randn(4, 8, device=device), device)


def test_dropout_keep_mask_bad_input():
    """Sizes checked as attention's mask checks them (a negative size gave torch's "negative dimension",
    a float size a TypeError from inside torch.empty)."""
    from kernels.layernorm import dropout_keep_mask

    for n_rows, n_cols in ((-1, 8), (4.0, 8), (4, True)):
        with pytest.raises(ValueError, match=r"n_(rows|cols) must be a non-negative int"):
            dropout_keep_mask(0, n_rows, n_cols, 0.1, "cpu")
    assert dropout_keep_mask(0, 0, 8, 0.1, "cpu").shape == (0, 8)


@pytest.mark.parametrize("residual, dropout_p", [(False, 0.0), (True, 0.0), (True, 0.2)],
                         ids=["layer_norm", "add", "add-dropout"])
def test_custom_ops_pass_opcheck(residual, dropout_p, device):
    """The torch.library registrations (schema, fake tensors, autograd) that torch.compile relies on."""
    x = torch.randn(6, 33, device=device, requires_grad=True)
    r = torch.randn(6, 33, device=device, requires_grad=True) if residual else None
    w = torch.randn(33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    seed = torch.tensor([5], device=device) if dropout_p else None
    torch.library.opcheck(ln._ln_forward_op, (x, r, w, b, 1e-5, dropout_p, seed, True))


def test_compiles_without_graph_breaks(device):
    """fullgraph=True fails on any graph break; the compiled op gives the eager op's values."""
    x = torch.randn(4, 7, 48, device=device, requires_grad=True)
    r = torch.randn(4, 7, 48, device=device, requires_grad=True)
    w = torch.randn(48, device=device, requires_grad=True)

    def f(x, r):
        y, s = ln.add_layer_norm(x, r, w, None, 1e-5, 0.2, 11)
        return ln.layer_norm(y * s, w).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(x, r)
    got.backward()
    grads = (x.grad.clone(), r.grad.clone(), w.grad.clone())
    x.grad = r.grad = w.grad = None
    want = f(x, r)
    want.backward()
    assert torch.equal(got, want)
    for name, g, h in zip(("dx", "dresidual", "dweight"), grads, (x.grad, r.grad, w.grad)):
        assert torch.equal(g, h), name
