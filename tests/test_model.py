"""The model: size and tying, shapes, generation, backends against the seed's own forward."""

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from model import GPT, GPTConfig
from model.data import CharTokenizer, get_batch, train_val_split

TINY = dict(vocab_size=11, block_size=16, n_embd=24, n_head=3, n_layer=2, dropout=0.0)


# A direct transcription of the seed's modules (its gpt.py), parametrized by size instead of globals.
class SeedAttention(nn.Module):
    def __init__(self, num_heads, head_size, n_embd, dropout, block_size):
        super().__init__()
        self.num_heads, self.head_size = num_heads, head_size
        self.key = nn.Linear(n_embd, num_heads * head_size, bias=False)
        self.query = nn.Linear(n_embd, num_heads * head_size, bias=False)
        self.value = nn.Linear(n_embd, num_heads * head_size, bias=False)
        self.proj = nn.Linear(num_heads * head_size, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x).view(B, T, self.num_heads, self.head_size).transpose(1, 2)
        q = self.query(x).view(B, T, self.num_heads, self.head_size).transpose(1, 2)
        v = self.value(x).view(B, T, self.num_heads, self.head_size).transpose(1, 2)
        wei = q @ k.transpose(-2, -1) * self.head_size**-0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        wei = self.dropout(F.softmax(wei, dim=-1))
        out = (wei @ v).transpose(1, 2).contiguous().view(B, T, self.num_heads * self.head_size)
        return self.dropout(self.proj(out))


class SeedBlock(nn.Module):
    def __init__(self, n_embd, n_head, dropout, block_size):
        super().__init__()
        self.sa = SeedAttention(n_head, n_embd // n_head, n_embd, dropout, block_size)
        self.ffwd = nn.Module()
        self.ffwd.net = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd.net(self.ln2(x))


class SeedGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_embd, n_head, n_layer, dropout):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[SeedBlock(n_embd, n_head, dropout, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)
        self.lm_head.weight = self.token_embedding_table.weight

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T))
        logits = self.lm_head(self.ln_f(self.blocks(x)))
        return logits, F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))


def _randomize(module):
    """Non-trivial values everywhere (LayerNorm weights and biases included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)


def test_parameter_count_is_the_seeds():
    model = GPT(GPTConfig(vocab_size=65))
    assert model.num_parameters() == 10_763_969


def test_lm_head_is_the_token_embedding():
    model = GPT(GPTConfig(**TINY))
    assert model.lm_head.weight is model.token_embedding_table.weight


def test_config_defaults_are_the_seeds():
    c = GPTConfig()
    assert (c.block_size, c.n_embd, c.n_head, c.n_layer, c.dropout) == (256, 384, 6, 6, 0.2)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("n_head", 5, "divisible"),
        ("n_embd", 0, "positive"),
        ("n_layer", -1, "positive"),
        ("block_size", 0, "positive"),
        ("dropout", 1.0, r"\[0, 1\)"),
        ("backend", "jax", "backend must be one of"),
        ({"backend": "triton", "n_embd": 258, "n_head": 2}, None, "head dims up to 128, got n_embd // n_head = 129"),
    ],
    ids=["width-not-divisible", "zero-width", "negative-layers", "zero-block", "dropout-1", "unknown-backend",
         "triton-head-dim"],
)
def test_config_rejects_bad_values(field, value, match):
    fields = field if isinstance(field, dict) else {field: value}
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**TINY, **fields})
    if isinstance(field, dict):  # the same shape is fine for the ops without that limit
        GPTConfig(**{**TINY, **fields, "backend": "torch"})


def test_forward_shapes_and_loss():
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 11, (2, 16))  # (B, T)
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 11) and loss is None
    logits, loss = model(idx[:, :5], idx[:, 1:6])
    assert logits.shape == (2, 5, 11) and loss.shape == ()
    # An untrained model predicts close to uniform: loss near ln(V).
    assert abs(loss.item() - torch.log(torch.tensor(11.0)).item()) < 0.5


def test_forward_rejects_too_long_context():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_backend_matches_seed_forward(backend):
    """Same weights in the seed's own modules (its state dict layout) and ours: same logits and loss."""
    seed_model = SeedGPT(**TINY).double()
    _randomize(seed_model)
    model = GPT(GPTConfig(**TINY, backend=backend)).double()
    model.load_state_dict(seed_model.state_dict(), strict=True)  # separate key/query/value, tril
    idx = torch.randint(0, 11, (3, 13))
    targets = torch.randint(0, 11, (3, 13))
    want_logits, want_loss = seed_model(idx, targets)
    logits, loss = model(idx, targets)
    torch.testing.assert_close(logits, want_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    # Gradients of every parameter by name, through the fused qkv projection too.
    want_loss.backward()
    loss.backward()
    seed_grads = dict(seed_model.named_parameters())
    for name, p in model.named_parameters():
        if ".sa.qkv." in name:
            prefix = name.split("qkv")[0]
            want = torch.cat([seed_grads[prefix + n + ".weight"].grad for n in ("query", "key", "value")])
        else:
            want = seed_grads[name].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_state_dict_loads_across_backends():
    ref = GPT(GPTConfig(**TINY, backend="reference"))
    other = GPT(GPTConfig(**TINY, backend="torch"))
    other.load_state_dict(ref.state_dict(), strict=True)
    for (name, a), b in zip(ref.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_dropout_is_active_in_training_only():
    model = GPT(GPTConfig(**{**TINY, "dropout": 0.5}))
    idx = torch.randint(0, 11, (2, 16))
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_generate_appends_tokens_and_crops_context():
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.zeros((2, 1), dtype=torch.long)
    out = model.generate(idx, max_new_tokens=40)  # longer than block_size: the context is cropped
    assert out.shape == (2, 41)
    assert torch.equal(out[:, :1], idx)
    assert out.min() >= 0 and out.max() < 11


def test_generate_is_repeatable_with_a_generator():
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.zeros((1, 1), dtype=torch.long)
    a = model.generate(idx, 20, generator=torch.Generator().manual_seed(3))
    b = model.generate(idx, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_generate_top_k_one_is_greedy():
    model = GPT(GPTConfig(**TINY)).eval()
    _randomize(model)
    idx = torch.zeros((1, 1), dtype=torch.long)
    out = model.generate(idx, 5, top_k=1)
    for t in range(1, 6):
        assert out[0, t] == model(out[:, :t])[0][0, -1].argmax()


def test_generate_at_a_tiny_temperature_is_greedy():
    """logits / 1e-40 overflowed to +-inf and the probabilities to NaN (multinomial raised); the
    logits are now shifted so that the largest is 0 first, and the pick is the argmax."""
    model = GPT(GPTConfig(**TINY)).eval()
    _randomize(model)
    idx = torch.zeros((1, 1), dtype=torch.long)
    assert torch.equal(model.generate(idx, 5, temperature=1e-40), model.generate(idx, 5, top_k=1))


def test_generate_at_temperature_one_samples_as_before():
    """The shift leaves temperature 1 bit for bit as softmax(logits) sampled it."""
    model = GPT(GPTConfig(**TINY)).eval()
    _randomize(model)
    idx = torch.zeros((1, 1), dtype=torch.long)
    got = model.generate(idx, 12, generator=torch.Generator().manual_seed(5))  # (1, 13): within block_size
    gen = torch.Generator().manual_seed(5)
    want = idx
    for _ in range(12):
        probs = torch.softmax(model(want)[0][:, -1, :].float(), dim=-1)
        want = torch.cat((want, torch.multinomial(probs, 1, generator=gen)), dim=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs, match", [({"temperature": 0.0}, "temperature"), ({"top_k": 0}, "top_k"),
                                           ({"temperature": float("nan")}, "temperature")])
def test_generate_rejects_bad_sampling(kwargs, match):
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros((1, 1), dtype=torch.long), 1, **kwargs)


def test_tokenizer_round_trip_and_split():
    text = "hello, world\n"
    tok = CharTokenizer.from_text(text)
    assert tok.chars == "".join(sorted(set(text)))
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("Z")
    train, val = train_val_split(torch.arange(100))
    assert len(train) == 90 and torch.equal(val, torch.arange(90, 100))


def test_get_batch_targets_are_inputs_shifted():
    data = torch.arange(50)
    x, y = get_batch(data, batch_size=4, block_size=8)
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y, x + 1)
    assert x.max() + 1 < 50


def test_tiny_training_run_lowers_val_loss():
    text = "to be or not to be, that is the question.\n" * 60
    tok = CharTokenizer.from_text(text)
    train, val = train_val_split(torch.tensor(tok.encode(text)))
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_embd=32, n_head=2, n_layer=1, dropout=0.1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def val_loss():
        model.eval()
        with torch.no_grad():
            x, y = get_batch(val, 32, 16, torch.Generator().manual_seed(1))
            loss = model(x, y)[1].item()
        model.train()
        return loss

    before = val_loss()
    for _ in range(60):
        x, y = get_batch(train, 16, 16)
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < before - 1.0, (before, after)


# The state dict's keys as they were before Block took (branch, residual), for a 2-layer model: a
# checkpoint saved then must load strictly now (tests/test_training.py loads a real one too).
OLD_LAYOUT_KEYS = [
    "token_embedding_table.weight", "position_embedding_table.weight",
    *[f"blocks.{i}.{name}" for i in range(2) for name in (
        "sa.qkv.weight", "sa.proj.weight", "sa.proj.bias", "ffwd.net.0.weight", "ffwd.net.0.bias",
        "ffwd.net.2.weight", "ffwd.net.2.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")],
    "ln_f.weight", "ln_f.bias", "lm_head.weight", "lm_head.bias",
]


def test_state_dict_keys_are_the_old_layout():
    model = GPT(GPTConfig(**TINY))
    assert list(model.state_dict()) == OLD_LAYOUT_KEYS
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_block_adds_the_branch_it_is_given_then_hands_on_its_own(backend):
    """Block(branch, residual): x = residual + branch; x = x + sa(ln1(x)); returns (ffwd(ln2(x)), x)."""
    from model import Block

    config = GPTConfig(**TINY, backend=backend)
    block = Block(config).double().eval()
    _randomize(block)
    residual, branch = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 5, 24, dtype=torch.float64)
    out_branch, out_residual = block(branch, residual)
    x = residual + branch
    x = x + block.sa(block.ln1(x))
    torch.testing.assert_close(out_residual, x)
    torch.testing.assert_close(out_branch, block.ffwd(block.ln2(x)))
    first_branch, first_residual = block(None, residual)  # the first block: nothing to add yet
    x = residual + block.sa(block.ln1(residual))
    torch.testing.assert_close(first_residual, x)
    torch.testing.assert_close(first_branch, block.ffwd(block.ln2(x)))
