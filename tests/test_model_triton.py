"""The triton backend in the model: against the reference backend, training, compile, state dicts."""

import pytest
import torch

import train
from model import GPT, GPTConfig
from tests.conftest import assert_matches_reference
from tests.test_model import TINY, SeedGPT, _randomize
from tests.test_train_cli import TINY_FLAGS

BACKENDS = ["reference", "torch", "triton"]


def _models(device, **overrides):
    """The same random weights in a float64 reference model, a float32 reference and a float32 triton model."""
    cfg = {**TINY, "n_embd": 32, "n_head": 2, **overrides}
    ref64 = GPT(GPTConfig(**cfg, backend="reference")).double()
    _randomize(ref64)
    ref32 = GPT(GPTConfig(**cfg, backend="reference"))
    tri32 = GPT(GPTConfig(**cfg, backend="triton"))
    state = {k: v.float() for k, v in ref64.state_dict().items()}
    ref32.load_state_dict(state, strict=True)
    tri32.load_state_dict(state, strict=True)
    return ref64.to(device), ref32.to(device), tri32.to(device)


@pytest.mark.parametrize("T", [16, 7], ids=["T16", "T7"])
def test_triton_backend_matches_reference(T, device):
    """Logits, loss and every parameter's gradient, each by name, against a float64 reference."""
    ref64, ref32, tri32 = _models(device)
    idx = torch.randint(0, 11, (3, T), device=device)
    targets = torch.randint(0, 11, (3, T), device=device)
    outs = {name: m(idx, targets) for name, m in (("ref64", ref64), ("ref32", ref32), ("tri32", tri32))}
    assert_matches_reference("logits", outs["tri32"][0], outs["ref64"][0], outs["ref32"][0])
    assert_matches_reference("loss", outs["tri32"][1], outs["ref64"][1], outs["ref32"][1])
    for _, loss in outs.values():
        loss.backward()
    params = zip(ref64.named_parameters(), ref32.parameters(), tri32.parameters())
    for (name, p64), p32, ptri in params:
        assert_matches_reference(f"grad {name}", ptri.grad, p64.grad, p32.grad)


def test_triton_backend_matches_the_seed_module(device):
    """A state dict in the seed's own layout loads into the triton backend, with the seed's logits."""
    seed_model = SeedGPT(**TINY).double()
    _randomize(seed_model)
    model = GPT(GPTConfig(**TINY, backend="triton"))
    model.load_state_dict(seed_model.state_dict(), strict=True)
    ref32 = GPT(GPTConfig(**TINY, backend="reference"))
    ref32.load_state_dict(seed_model.state_dict(), strict=True)
    idx = torch.randint(0, 11, (2, 16))
    want, _ = seed_model(idx, idx)
    got = model.to(device)(idx.to(device))[0].cpu()
    assert_matches_reference("logits", got, want, ref32(idx)[0])


def test_state_dicts_cross_backends_strict():
    models = {b: GPT(GPTConfig(**TINY, backend=b)) for b in BACKENDS}
    for src in BACKENDS:
        for dst in BACKENDS:
            models[dst].load_state_dict(models[src].state_dict(), strict=True)
            for (name, a), b in zip(models[src].state_dict().items(), models[dst].state_dict().values()):
                assert torch.equal(a, b), (src, dst, name)


def test_triton_training_with_dropout_lowers_the_loss(device):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, block_size=16, n_embd=32, n_head=2, n_layer=1, dropout=0.2,
                          backend="triton")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # A repeating pattern: predictable, so the loss can fall far in a few steps.
    data = torch.arange(8, device=device).repeat(4, 3)[:, :17]  # (4, 17)
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(15):
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_eval_mode_is_deterministic_and_draws_no_random_numbers(device):
    model = GPT(GPTConfig(**{**TINY, "dropout": 0.5}, backend="triton")).to(device).eval()
    idx = torch.randint(0, 11, (2, 16), device=device)
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b = model(idx)[0], model(idx)[0]
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_compiles_without_graph_breaks(backend, device):
    """torch.compile(fullgraph=True) traces the whole model, forward and backward, for every backend."""
    model = GPT(GPTConfig(**{**TINY, "dropout": 0.0}, backend=backend)).to(device)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    idx = torch.randint(0, 11, (2, 16), device=device)
    logits, loss = compiled(idx, idx)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want_logits, want_loss = model(idx, idx)
    want_loss.backward()
    torch.testing.assert_close(logits, want_logits)
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(g, p.grad, msg=lambda m: f"{name}: {m}")


def _on(device):
    """TINY_FLAGS for the test's device: the interpreter on the CPU, compiled kernels on a GPU."""
    flags = list(TINY_FLAGS)
    flags[flags.index("--device") + 1] = device.type
    return flags


def test_train_py_with_the_triton_backend(tmp_path, capsys, device):
    corpus = tmp_path / "input.txt"
    corpus.write_text(("All the world's a stage, and all the men and women merely players.\n" * 40))
    out = tmp_path / "m.pth"
    flags = [*_on(device), "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--batch-size", "4",
             "--data", str(corpus), "--out", str(out), "--backend", "triton", "--dtype", "float32"]
    assert train.main(flags) == 0
    stdout, stderr = capsys.readouterr()
    assert ("Triton's interpreter" in stderr) == (device.type == "cpu")
    vals = [float(ln.split()[-1]) for ln in stdout.splitlines() if ln.startswith("step ")]
    assert len(vals) == 3 and vals[-1] < vals[0]
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["backend"] == "triton"
    # The checkpoint loads into the reference backend as it is.
    ref = GPT(GPTConfig(**{**ckpt["config"], "backend": "reference"}))
    ref.load_state_dict(ckpt["model"], strict=True)


def test_train_py_compile_with_the_triton_backend(tmp_path, capsys, device):
    """--compile runs the whole loop through torch.compile (inductor) with our registered ops inside."""
    corpus = tmp_path / "input.txt"
    corpus.write_text(("Now is the winter of our discontent made glorious summer.\n" * 40))
    flags = [*_on(device), "--max-iters", "10", "--eval-interval", "5", "--eval-iters", "2", "--batch-size", "4",
             "--sample-tokens", "5", "--data", str(corpus), "--out", str(tmp_path / "m.pth"), "--backend", "triton",
             "--dtype", "float32", "--compile"]
    assert train.main(flags) == 0
    stdout, _ = capsys.readouterr()
    vals = [float(ln.split()[-1]) for ln in stdout.splitlines() if ln.startswith("step ")]
    assert len(vals) == 3 and all(map(lambda v: 0 < v < 10, vals))
