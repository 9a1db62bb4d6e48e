"""Grader of exercise 4: rotary embeddings and the KV cache, by comparison with model.py's own and
by the properties that make them right (rotations keep norms; q.k depends on the distance only;
cached decoding equals the full forward pass)."""
import pytest
import torch

import model as M
from generate import generate
from grading import load_impl, tiny, token_ids


@pytest.fixture(scope="module")
def impl():
    return load_impl("rope_kv")


def positions(B=2, T=7, seed=0):
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, dict(rotary_dim=8, rope_theta=500.0)])
def test_angles_match_model(impl, overrides):
    c = M.Config.from_name("tiny-llama", **overrides)
    pos = positions()
    cos, sin = impl.rope_angles(c, pos)
    want_cos, want_sin = M.rope_angles(c, pos)
    assert cos.shape == want_cos.shape == (2, 1, 7, c.rotary_dim // 2)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, want_cos)
    torch.testing.assert_close(sin, want_sin)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rotate_half_matches_model(impl, rotary_dim):
    c = M.Config.from_name("tiny-llama", rotary_dim=rotary_dim)  # head_dim 16: all, or the first 8
    cos, sin = M.rope_angles(c, positions())
    x = torch.randn(2, 4, 7, 16)
    want = M.apply_rope(x, cos, sin, False)
    torch.testing.assert_close(impl.apply_rope(x, cos, sin, False), want)


def test_interleaved_matches_model(impl):
    c = M.Config.from_name("tiny-gptj")  # rotary_dim 8 of head_dim 16, pairs (2i, 2i+1)
    cos, sin = M.rope_angles(c, positions())
    x = torch.randn(2, 4, 7, 16)
    want = M.apply_rope(x, cos, sin, True)
    torch.testing.assert_close(impl.apply_rope(x, cos, sin, True), want)


def test_rotation_properties(impl):
    """Position 0 changes nothing; norms are kept; q_m . k_n is the same when both positions shift
    by s."""
    c = M.Config.from_name("tiny-llama")
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64)

    def rot(x, p):
        cos, sin = impl.rope_angles(c, torch.tensor([[p]]))
        return impl.apply_rope(x, cos.double(), sin.double())
    torch.testing.assert_close(rot(q, 0), q)
    torch.testing.assert_close(rot(q, 37).norm(), q.norm())
    dots = [(rot(q, 5 + s) * rot(k, 2 + s)).sum() for s in (0, 10, 123)]
    for d in dots[1:]:  # the angles are float32: equal within its rounding
        torch.testing.assert_close(d, dots[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose((rot(q, 5) * rot(k, 2)).sum(), (rot(q, 5) * rot(k, 3)).sum())


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gptj"])
def test_model_logits_with_your_rope(impl, preset, monkeypatch):
    m = tiny(preset)
    ids = token_ids(m)
    want, _ = m(ids)
    monkeypatch.setattr(M, "rope_angles", impl.rope_angles)
    monkeypatch.setattr(M, "apply_rope", impl.apply_rope)
    torch.testing.assert_close(m(ids)[0], want, rtol=1e-5, atol=1e-5)


def test_cache_stores_and_returns(impl):
    """extend hands out the next slots and counts them (pos, next); update writes at those slots
    only, per layer, and returns the whole static cache (max_len slots: fixed shapes every step)."""
    c = M.Config.from_name("tiny-llama-gqa")  # 2 key/value heads
    cache = impl.KVCache(c, batch_size=2, max_len=6, device="cpu", dtype=torch.float32)
    assert cache.pos == 0 and cache.max_len == 6
    assert torch.is_tensor(cache.next) and cache.next.dim() == 0 and int(cache.next) == 0
    assert cache.valid.dtype == torch.bool and cache.valid.shape == (2, 6)
    assert not cache.valid.any(), "nothing is written yet"
    slots = cache.extend(torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(slots, torch.arange(4))
    assert cache.pos == 4 and int(cache.next) == 4
    k1, v1 = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16)
    k, v = cache.layer(1, slots).update(k1, v1)
    assert k.shape == v.shape == (2, 2, 6, 16), "update returns all max_len slots"
    assert torch.equal(k[:, :, :4], k1) and torch.equal(v[:, :, :4], v1)
    assert torch.count_nonzero(k[:, :, 4:]) == 0 and torch.count_nonzero(v[:, :, 4:]) == 0
    slots = cache.extend(torch.ones(2, 2, dtype=torch.bool))
    assert torch.equal(slots, torch.tensor([4, 5]))
    assert cache.pos == 6 and int(cache.next) == 6
    assert cache.valid.all()
    k2, v2 = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    k, v = cache.layer(1, slots).update(k2, v2)
    assert torch.equal(k, torch.cat((k1, k2), 2)) and torch.equal(v, torch.cat((v1, v2), 2))
    k, v = cache.layer(0, slots).update(k2, v2)
    assert k.shape == (2, 2, 6, 16)
    assert torch.count_nonzero(k[:, :, :4]) == 0, "layers must not share storage"
    assert torch.equal(k[:, :, 4:], k2) and torch.equal(v[:, :, 4:], v2)
    with pytest.raises(ValueError):
        cache.extend(torch.ones(2, 1, dtype=torch.bool))
    assert cache.pos == 6 and int(cache.next) == 6, "a refused extend changes nothing"


def test_cache_marks_valid_slots(impl):
    """A left-padded row: its padding slots are not valid (attention must not see them), its real
    tokens are; the slots are the same for every row."""
    c = M.Config.from_name("tiny-llama")
    cache = impl.KVCache(c, batch_size=2, max_len=7, device="cpu", dtype=torch.float32)
    prompt = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert torch.equal(cache.extend(prompt), torch.arange(4))
    want = torch.zeros(2, 7, dtype=torch.bool)
    want[:, :4] = prompt
    assert torch.equal(cache.valid, want)
    assert torch.equal(cache.extend(torch.tensor([[True], [False]])), torch.tensor([4]))
    want[0, 4] = True
    assert torch.equal(cache.valid, want), "slot 4: row 0 real, row 1 not; the rest still empty"


def left_padded(ids, pad=3):
    """Row 0 shortened by `pad` tokens on the left (those become padding), row 1 as it is."""
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-llama-gqa", "tiny-bloom"])
def test_decoding_equals_full_forward(impl, preset, padded, monkeypatch):
    """A prompt of 5, then 4 tokens one at a time through your cache: the logits of one full forward
    pass. Left-padded: the same with an attention_mask whose row 0 starts with 3 pads."""
    monkeypatch.setattr(M, "KVCache", impl.KVCache)
    m = tiny(preset)
    ids = token_ids(m, B=2, T=9)
    mask = None
    if padded:
        ids, mask = left_padded(ids)
    full, _ = m(ids, attention_mask=mask)
    cache = m.new_cache(2, 9)
    assert isinstance(cache, impl.KVCache)

    def step(a, b):
        return m(ids[:, a:b], attention_mask=None if mask is None else mask[:, :b], cache=cache)[0]
    steps = [step(0, 5)] + [step(t, t + 1) for t in range(5, 9)]
    got = torch.cat(steps, 1)
    if padded:  # the logits of padding positions mean nothing: compare the real tokens'
        got, full = got[mask.bool()], full[mask.bool()]
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_generate_with_your_cache(impl, padded, monkeypatch):
    """generate (a prefill, then one-token steps over the static cache) gives the same tokens with
    your cache as with model.py's."""
    m = tiny("tiny-llama")
    ids = token_ids(m, B=3, T=5)
    mask = None
    if padded:
        ids, mask = left_padded(ids, pad=2)
    want = generate(m, ids, max_new_tokens=8, attention_mask=mask)
    monkeypatch.setattr(M, "KVCache", impl.KVCache)
    assert torch.equal(generate(m, ids, max_new_tokens=8, attention_mask=mask), want)
