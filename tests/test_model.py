"""model.py: the KV cache (= full forwards, left-padded batches, every family; generation itself is
in test_generate.py), bf16, the sliding window, hook slots, gradient checkpointing, the inputs'
checks. Parity with transformers checkpoint by checkpoint, and the loader's errors, are in
test_checkpoints.py; Config and its presets in test_presets.py, the loss in chunks in
test_loss.py. All offline, CPU, fp32 unless stated."""
import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import FAMILIES, left_pad, tiny_model
from checkpoints import load_model
from generate import generate
from model import Transformer, apply_rope, rope_angles
from presets import Config

TOL = 1e-4  # fp32 parity, max |logit difference|


def rand_ids(*shape, vocab=256, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def padded_rows(lengths):
    """Random rows of these lengths, and them left-padded: (rows, idx, attention_mask)."""
    seqs = [rand_ids(n, vocab=512, seed=n) for n in lengths]
    return seqs, *left_pad(seqs)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def ours(m, idx, **kw):
    return m(idx, **kw)[0]


# --------------------------------------------------------------------------------------------------
# 1. KV cache and generation


def greedy_no_cache(m, idx, n, attention_mask=None):
    """Reference greedy decoding: a full forward over the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(n):
            nxt = m(idx, attention_mask=attention_mask)[0][:, -1].argmax(-1)
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            if attention_mask is not None:
                attention_mask = F.pad(attention_mask, (0, 1), value=1)
    return idx


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_kv_cache_matches_full_forward(family, padded):
    m = tiny_model(family)
    if padded:
        idx, mask = left_pad([rand_ids(n, vocab=512, seed=n) for n in (11, 4, 8)])
    else:
        idx, mask = rand_ids(2, 11, vocab=512), None
    B, T = idx.shape
    real = mask.bool() if padded else torch.ones(B, T, dtype=torch.bool)
    sub = (lambda n: mask[:, :n]) if padded else (lambda n: None)
    full = ours(m, idx, attention_mask=mask)
    # prefill 5 tokens, then one token at a time
    cache = m.new_cache(B, T + 2)
    steps = [ours(m, idx[:, :5], attention_mask=sub(5), cache=cache)]
    for t in range(5, T):
        steps.append(ours(m, idx[:, t:t + 1], attention_mask=sub(t + 1), cache=cache))
    assert cache.pos == T
    assert max_diff(torch.cat(steps, 1)[real], full[real]) < 1e-5
    # chunked prefill: two chunks of several tokens
    cache = m.new_cache(B, T)
    a = ours(m, idx[:, :6], attention_mask=sub(6), cache=cache)
    b = ours(m, idx[:, 6:], attention_mask=sub(T), cache=cache)
    assert max_diff(torch.cat((a, b), 1)[real], full[real]) < 1e-5
    # last_only gives the last position's logits
    assert max_diff(ours(m, idx, attention_mask=mask, last_only=True), full[:, -1:]) < 1e-5


@torch.no_grad()
def greedy(m, idx, n, attention_mask=None, cache=True):
    """n greedy tokens after idx (B, T): with a KV cache (a prefill, then one-token steps over the
    static cache, as the decode loop runs them) or with a full forward for every token."""
    mask = attention_mask if attention_mask is not None else torch.ones_like(idx)
    kv = m.new_cache(idx.size(0), idx.size(1) + n) if cache else None
    logits = m(idx, attention_mask=mask, cache=kv)[0]
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        idx, mask = torch.cat((idx, nxt), 1), F.pad(mask, (0, 1), value=1)
        logits = m(nxt if cache else idx, attention_mask=mask, cache=kv)[0]
    return idx


def test_decoding_past_the_sliding_window():
    """Mistral's window lives in the mask, so the cached step drops keys older than the window:
    greedy decoding 20 tokens past a window of 4 equals full forwards, batched and left-padded as
    one by one; without the window the tokens differ (so the window was in play)."""
    m = tiny_model("mistral")
    assert m.config.sliding_window == 4
    seqs, idx, mask = padded_rows((7, 2, 5))
    out = greedy(m, idx, 20, mask)
    assert torch.equal(out, greedy(m, idx, 20, mask, cache=False))
    for i, s in enumerate(seqs):
        assert torch.equal(greedy(m, s[None], 20)[0, len(s):], out[i, idx.size(1):])
    no_window = Transformer(replace(m.config, sliding_window=0)).eval()
    no_window.load_state_dict(m.state_dict())
    assert not torch.equal(greedy(no_window, idx, 20, mask), out)


def test_kv_cache_overflow_and_bad_mask():
    m = tiny_model("llama")
    cache = m.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache full: 5 tokens > max_len 4"):
        m(rand_ids(1, 5, vocab=512), cache=cache)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\), expected \(1, 5\)"):
        m(rand_ids(1, 5, vocab=512), attention_mask=torch.ones(1, 3))


# --------------------------------------------------------------------------------------------------
# 2. bf16


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_load_and_autocast(hf_checkpoint, family):
    path, hf = hf_checkpoint(family)
    m32, m16 = load_model(path), load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in m32.parameters()} == {torch.float32}
    idx, mask = left_pad([rand_ids(n, seed=n) for n in (9, 5)])
    real = mask.bool()
    ref = ours(m32, idx, attention_mask=mask)
    scale = ref.abs().max().item()
    l16 = ours(m16, idx, attention_mask=mask)
    assert l16.dtype == torch.bfloat16
    assert max_diff(l16[real], ref[real]) < 0.05 * scale
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la = ours(m32, idx, attention_mask=mask)
        out = generate(m32, idx, 3, attention_mask=mask)
    assert torch.isfinite(la).all() and max_diff(la[real], ref[real]) < 0.05 * scale
    assert out.shape == (2, idx.size(1) + 3)
    assert generate(m16, idx, 3, attention_mask=mask).shape == (2, idx.size(1) + 3)


# --------------------------------------------------------------------------------------------------
# 3. Hook slots


class Lora(nn.Module):
    """(x, y, linear) -> y + B A x, a Linear.adapter that can be merged into the weight exactly."""

    def __init__(self, lin, r=2):
        super().__init__()
        self.A = nn.Parameter(torch.randn(r, lin.in_features) * 0.1)
        self.B = nn.Parameter(torch.randn(lin.out_features, r) * 0.1)

    def forward(self, x, y, linear):
        # handed its own layer, at each call
        assert torch.equal(y, F.linear(x, linear.weight, linear.bias))
        return y + x @ self.A.T @ self.B.T


class Prefix(nn.Module):
    def __init__(self, c, n=3):
        super().__init__()
        self.k = nn.Parameter(torch.randn(1, c.n_kv_head, n, c.head_dim))
        self.v = nn.Parameter(torch.randn(1, c.n_kv_head, n, c.head_dim))

    def forward(self, x, qkv):
        B = x.size(0)
        return self.k.expand(B, -1, -1, -1), self.v.expand(B, -1, -1, -1), None


class NoPrefix(nn.Module):
    def forward(self, x, qkv):
        return None


class Prompt(nn.Module):
    """Prepends fixed embeddings: those of `ids` in `embed`, so the result equals feeding ids as
    real tokens."""

    def __init__(self, embed, ids):
        super().__init__()
        self.embed, self.ids, self.n_tokens = embed, ids, len(ids)

    def forward(self, emb):
        return torch.cat((self.embed(self.ids)[None].expand(emb.size(0), -1, -1), emb), dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_linear_adapter_slot(family):
    """Every projection calls its adapter with (input, output): LoRA on all of them equals merged
    weights."""
    m = tiny_model(family)
    idx, mask = left_pad([rand_ids(n, vocab=512, seed=n) for n in (8, 5)])
    base = ours(m, idx, attention_mask=mask)
    merged = copy.deepcopy(m)
    torch.manual_seed(0)
    lins = [(n, mod) for n, mod in m.named_modules() if hasattr(mod, "adapter")]
    assert len(lins) == m.config.n_layer * (7 if m.config.arch == "llama"
                                            else 4 if m.config.arch == "bloom" else 6)
    for n, lin in lins:
        lin.adapter = Lora(lin)
        merged.get_submodule(n).weight += lin.adapter.B @ lin.adapter.A
    got = ours(m, idx, attention_mask=mask)
    assert max_diff(got, base) > 1e-2
    assert max_diff(got, ours(merged, idx, attention_mask=mask)) < 1e-4
    for _, lin in lins:
        lin.adapter = None
    assert torch.equal(ours(m, idx, attention_mask=mask), base)


# pre-norm, parallel residual, post-norm
@pytest.mark.parametrize("family", ["llama", "gptj", "opt-350m"])
@torch.no_grad()
def test_block_slots_follow_the_documented_formula(family):
    m = tiny_model(family)
    c, blk = m.config, m.layers[1]
    x = torch.randn(2, 6, c.n_embd)
    rope = rope_angles(c, torch.arange(6).expand(2, 6)) if c.pos == "rope" else None
    attn = lambda h: blk.attn(h, rope, None, None)  # noqa: E731
    base = blk(x, rope, None, None)
    torch.manual_seed(0)
    pa, pm, ba, bm = (nn.Linear(c.n_embd, c.n_embd) for _ in range(4))
    blk.post_attn, blk.post_mlp, blk.beside_attn, blk.beside_mlp = pa, pm, ba, bm
    got = blk(x, rope, None, None)
    # x + [post(attn(h)) + beside(h)] + [post(mlp(h)) + beside(h)], h = ln(x)
    if c.parallel_residual:
        h = blk.norm_1(x)
        expect = x + pa(attn(h)) + ba(h) + pm(blk.mlp(h)) + bm(h)
    elif c.post_norm:  # x1 = ln1(x + a(x)); ln2(x1 + m(x1))
        x1 = blk.norm_1(x + pa(attn(x)) + ba(x))
        expect = blk.norm_2(x1 + pm(blk.mlp(x1)) + bm(x1))
    else:  # x1 = x + a(ln1(x)); x1 + m(ln2(x1))
        h = blk.norm_1(x)
        x1 = x + pa(attn(h)) + ba(h)
        h2 = blk.norm_2(x1)
        expect = x1 + pm(blk.mlp(h2)) + bm(h2)
    assert max_diff(got, base) > 1e-2 and max_diff(got, expect) < 1e-5
    blk.post_attn = blk.post_mlp = blk.beside_attn = blk.beside_mlp = None
    assert torch.equal(blk(x, rope, None, None), base)


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "gptj", "opt"])
@torch.no_grad()
def test_prefix_slot_matches_manual_attention(family):
    """Prefix keys/values (no rotary) sit in front of the keys and every query sees them."""
    m = tiny_model(family)
    c, att = m.config, m.layers[0].attn
    B, T = 2, 5
    x = torch.randn(B, T, c.n_embd)
    rope = rope_angles(c, torch.arange(T).expand(B, T)) if c.pos == "rope" else None
    base = att(x, rope, None, None)
    att.prefix = Prefix(c)
    pk, pv, _ = att.prefix(x, att.qkv)
    q, k, v = att.qkv(x)
    if rope is not None:
        q, k = apply_rope(q, *rope, c.rope_interleaved), apply_rope(k, *rope, c.rope_interleaved)
    rep = c.n_head // c.n_kv_head
    k = torch.cat((pk, k), 2).repeat_interleave(rep, 1)
    v = torch.cat((pv, v), 2).repeat_interleave(rep, 1)
    allowed = torch.cat((torch.ones(T, pk.size(2), dtype=torch.bool),
                         torch.ones(T, T, dtype=torch.bool).tril()), 1)
    s = (q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)).masked_fill(~allowed, float("-inf"))
    expect = getattr(att, att.out_name)((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))
    got = att(x, rope, None, None)
    assert max_diff(got, base) > 1e-2 and max_diff(got, expect) < 1e-5
    att.prefix = None
    assert torch.equal(att(x, rope, None, None), base)
    # a slot with nothing to offer (e.g. an inactive adapter) leaves attention alone
    att.prefix = NoPrefix()
    assert torch.equal(att(x, rope, None, None), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_slot_generation_with_cache(family):
    m = tiny_model(family)
    torch.manual_seed(0)
    for blk in m.layers:
        blk.attn.prefix = Prefix(m.config)
    seqs, idx, mask = padded_rows((6, 2, 4))
    T = idx.size(1)
    out = generate(m, idx, 5, attention_mask=mask)
    assert torch.equal(out, greedy_no_cache(m, idx, 5, mask))
    for i, s in enumerate(seqs):
        assert torch.equal(out[i, T:], greedy_no_cache(m, s[None], 5)[0, len(s):])


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_prompt_slot(family):
    """Soft tokens lead the sequence: with the embeddings of real ids they act exactly like those
    ids; no logits come out for them; left-padded batched generation equals one by one."""
    m = tiny_model(family)
    lead = rand_ids(3, vocab=512, seed=99)
    idx, mask = left_pad([rand_ids(n, vocab=512, seed=n) for n in (7, 3)])
    base = ours(m, idx, attention_mask=mask)
    m.prompt = Prompt(m.embed, lead)
    got = ours(m, idx, attention_mask=mask)
    assert got.shape == base.shape and max_diff(got, base) > 1e-2
    x = rand_ids(1, 6, vocab=512)
    prompt, m.prompt = m.prompt, None
    ref = ours(m, torch.cat((lead[None], x), 1))
    m.prompt = prompt
    assert max_diff(ours(m, x), ref[:, 3:]) < 1e-5
    m.prompt = None
    assert torch.equal(ours(m, idx, attention_mask=mask), base)
    m.prompt = Prompt(m.embed, lead[:0])  # n_tokens == 0: nothing prepended
    assert torch.equal(ours(m, idx, attention_mask=mask), base)
    m.prompt = Prompt(m.embed, lead)
    seqs, idx, mask = padded_rows((6, 2, 4))
    T = idx.size(1)
    out = generate(m, idx, 5, attention_mask=mask)
    assert torch.equal(out, greedy_no_cache(m, idx, 5, mask))
    for i, s in enumerate(seqs):
        alone = generate(m, s[None], 5)
        assert torch.equal(out[i, T:], alone[0, len(s):])
        assert torch.equal(alone, greedy_no_cache(m, s[None], 5))


# --------------------------------------------------------------------------------------------------
# 4. Gradient checkpointing


@pytest.mark.parametrize("family", ["llama-gqa", "gptj", "bloom", "opt-350m"])
def test_gradient_checkpointing_same_loss_and_grads(family):
    m = tiny_model(family).train()
    idx, mask = left_pad([rand_ids(n, vocab=512, seed=n) for n in (9, 5)])
    targets = torch.roll(idx, -1, 1).masked_fill(mask == 0, -100)
    targets[:, -1] = -100

    def run():
        m.zero_grad()
        logits, loss = m(idx, targets=targets, attention_mask=mask)
        loss.backward()
        return loss.detach(), logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    loss, logits, grads = run()
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                ignore_index=-100))
    calls = []
    # (recompute may stop early)
    hook = m.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    m.grad_checkpoint = True
    loss2, _, grads2 = run()
    hook.remove()
    assert len(calls) == 2  # the block really was recomputed in backward
    assert torch.allclose(loss, loss2, atol=1e-6)
    for n in grads:
        assert torch.allclose(grads[n], grads2[n], atol=1e-6), n


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
def test_a_prompt_past_opts_position_table(train_base):
    """OPT's learned positions end at max_position_embeddings: a longer input is one ValueError
    (before: an IndexError on a CPU, a device-side assert on a GPU), with or without a cache."""
    model = Transformer(Config.from_name("tiny-opt", block_size=16)).eval()
    model(torch.zeros(1, 16, dtype=torch.long))  # the whole table is usable
    with pytest.raises(ValueError, match="17 tokens, but tiny-opt has learned positions for 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache(1, 32)
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="17 tokens"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
