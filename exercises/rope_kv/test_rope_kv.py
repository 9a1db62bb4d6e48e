"""Grader of exercise 4: rotary embeddings and the KV cache, by comparison with model.py's own and
by the properties that make them right (rotations keep norms; q.k depends on the distance only;
cached decoding equals the full forward pass)."""
import pytest
import torch

import model as M
from generate import generate
from grading import load_impl, tiny, token_ids
from presets import Config


@pytest.fixture(scope="module")
def impl():
    return load_impl("rope_kv")


def positions(B=2, T=7, seed=0):
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, dict(rotary_dim=8, rope_theta=500.0)])
def test_angles_match_model(impl, overrides):
    c = Config.from_name("tiny-llama", **overrides)
    pos = positions()
    cos, sin = impl.rope_angles(c, pos)
    want_cos, want_sin = M.rope_angles(c, pos)
    assert cos.shape == want_cos.shape == (2, 1, 7, c.rotary_dim // 2)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, want_cos)
    torch.testing.assert_close(sin, want_sin)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rotate_half_matches_model(impl, rotary_dim):
    c = Config.from_name("tiny-llama", rotary_dim=rotary_dim)  # head_dim 16: all, or the first 8
    cos, sin = M.rope_angles(c, positions())
    x = torch.randn(2, 4, 7, 16)
    want = M.apply_rope(x, cos, sin, False)
    torch.testing.assert_close(impl.apply_rope(x, cos, sin, False), want)


def test_interleaved_matches_model(impl):
    c = Config.from_name("tiny-gptj")  # rotary_dim 8 of head_dim 16, pairs (2i, 2i+1)
    cos, sin = M.rope_angles(c, positions())
    x = torch.randn(2, 4, 7, 16)
    want = M.apply_rope(x, cos, sin, True)
    torch.testing.assert_close(impl.apply_rope(x, cos, sin, True), want)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_keeps_x_dtype(impl, interleaved):
    """bf16 queries and keys with fp32 angles: the result is bf16 (attention runs in x's dtype),
    model.py's within bf16's rounding."""
    c = Config.from_name("tiny-gptj" if interleaved else "tiny-llama")
    cos, sin = M.rope_angles(c, positions())
    x = torch.randn(2, 4, 7, 16).bfloat16()
    got = impl.apply_rope(x, cos, sin, interleaved)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, M.apply_rope(x, cos, sin, interleaved))


def test_angles_on_the_device_of_pos(impl):
    """cos and sin are made where pos lives (on a GPU, a CPU tensor in the step breaks it): on the
    meta device (shapes, no data), any tensor made elsewhere shows."""
    c = Config.from_name("tiny-llama")
    cos, sin = impl.rope_angles(c, torch.zeros(2, 3, dtype=torch.long, device="meta"))
    assert cos.device.type == sin.device.type == "meta"
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (2, 1, 3, 8)


def test_rotation_properties(impl):
    """Position 0 changes nothing; norms are kept; q_m . k_n is the same when both positions shift
    by s."""
    c = Config.from_name("tiny-llama")
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
    c = Config.from_name("tiny-llama-gqa")  # 2 key/value heads
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


def test_slots_come_from_next_not_pos(impl):
    """A replayed CUDA graph runs the recorded tensor operations, no Python: `pos` stays what it was
    at the capture and only `next` moves. So extend reads the slots from `next` (here made to
    disagree with `pos` on purpose), advances it in place and marks `valid` in place (the graph
    holds those very tensors), and update writes into the cache's own tensors and returns them."""
    c = Config.from_name("tiny-llama")
    cache = impl.KVCache(c, batch_size=2, max_len=8, device="cpu", dtype=torch.float32)
    nxt, valid, kv = cache.next, cache.valid, [t for pair in cache.kv for t in pair]
    cache.extend(torch.ones(2, 3, dtype=torch.bool))
    cache.next.fill_(5)  # as if two replays had run; pos still says 3
    slots = cache.extend(torch.tensor([[True], [False]]))
    assert torch.equal(slots, torch.tensor([5])), "the slots come from next, not from pos"
    assert cache.next is nxt and int(nxt) == 6, "next advances in place"
    assert cache.pos == 4, "pos counts the tokens of this call"
    assert cache.valid is valid and valid[:, 5].tolist() == [True, False]
    assert not valid[:, 3:5].any() and not valid[:, 6:].any()
    new = torch.ones(2, c.n_kv_head, 1, c.head_dim)
    k, v = cache.layer(1, slots).update(new, 2 * new)
    assert [t for pair in cache.kv for t in pair] == kv, "the cache keeps its tensors"
    assert k.data_ptr() == kv[2].data_ptr() and v.data_ptr() == kv[3].data_ptr(), \
        "update returns the cache's own tensors"
    assert torch.equal(k[:, :, 5], new[:, :, 0]) and torch.equal(v[:, :, 5], 2 * new[:, :, 0])
    assert torch.count_nonzero(k[:, :, :5]) == 0 and torch.count_nonzero(k[:, :, 6:]) == 0


def test_cache_on_its_device_and_dtype(impl):
    """Every tensor of the cache where it is asked for: the keys and values in `dtype`, valid bool,
    next a 0-dim long, the slots long, all on `device`. On the meta device (shapes, no data) a
    tensor made elsewhere shows, and so does reading next into Python. Keys narrower than the cache
    (autocast) are stored in the cache's dtype."""
    c = Config.from_name("tiny-llama-gqa")
    meta = impl.KVCache(c, batch_size=2, max_len=6, device="meta", dtype=torch.bfloat16)
    assert len(meta.kv) == c.n_layer
    for k, v in meta.kv:
        for t in (k, v):
            assert t.device.type == "meta" and t.dtype == torch.bfloat16
            assert t.shape == (2, c.n_kv_head, 6, c.head_dim)
    assert meta.valid.device.type == "meta" and meta.valid.dtype == torch.bool
    assert meta.next.device.type == "meta" and meta.next.dtype == torch.long
    assert meta.next.dim() == 0
    slots = meta.extend(torch.ones(2, 3, dtype=torch.bool, device="meta"))
    assert slots.device.type == "meta" and slots.dtype == torch.long and slots.shape == (3,)
    assert meta.pos == 3
    cache = impl.KVCache(c, batch_size=2, max_len=6, device="cpu", dtype=torch.float32)
    slots = cache.extend(torch.ones(2, 2, dtype=torch.bool))
    narrow = torch.randn(2, c.n_kv_head, 2, c.head_dim, dtype=torch.bfloat16)
    k, v = cache.layer(0, slots).update(narrow, narrow)
    assert k.dtype == v.dtype == torch.float32
    assert torch.equal(k[:, :, :2], narrow.float()) and torch.equal(v[:, :, :2], narrow.float())


def test_cache_marks_valid_slots(impl):
    """A left-padded row: its padding slots are not valid (attention must not see them), its real
    tokens are; the slots are the same for every row."""
    c = Config.from_name("tiny-llama")
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA device")
def test_cuda_graph_replays_your_cache(impl, monkeypatch):
    """generate on CUDA: two eager steps, one captured as a CUDA graph, then replays. With your
    cache the tokens are those of model.py's cache in eager steps."""
    m = tiny("tiny-llama").cuda()
    ids = token_ids(m, B=3, T=5).cuda()
    want = generate(m, ids, 12, cuda_graph=False)
    monkeypatch.setattr(M, "KVCache", impl.KVCache)
    assert torch.equal(generate(m, ids, 12, cuda_graph=True), want)
