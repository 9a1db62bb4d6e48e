"""generate.py: the one decode loop (greedy, sampled, stop ids, streaming), the static-shape
decoding path (prefill + fixed-shape one-token steps over the whole KV cache, a CUDA graph on
CUDA), beam search, and the batched, left-padded generation of many prompts (eval.py's); also
regional compilation (one graph for every block) and the --compile setting (cli.py). References
are full forward passes without any cache (what the KV-cache generation was always tested
against), each row alone, and for beam search exhaustive search."""
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES as ALL_FAMILIES, left_pad, randomize_, sentence, tiny_model
from torch._dynamo.testing import CompileCounter

import generate as G
import model as model_py
from adapters import add_adapter
from cli import ConfigError, compile_blocks, compile_setting, load
from data.template import format_prompt
from generate import (MAX_NEW_TOKENS, STOP_TOKEN, DecodeStep, Response, attention_backends,
                      beam_search, generate, generate_batch, generate_ids, prefill)
from model import Transformer
from presets import Config

FAMILIES = ("llama", "llama-gqa", "gptj", "bloom", "opt")
ADAPTERS = {"base": None, "lora": dict(r=4, alpha=8, dropout=0.0),
            "prefix": dict(num_virtual_tokens=3), "gated": dict(num_virtual_tokens=3, gated=True),
            "prompt": dict(num_virtual_tokens=3), "dora": dict(r=4, alpha=8, dropout=0.0),
            "ia3": {}}


def rand_ids(*shape, vocab=512, seed=0):  # token ids of a fixed seed (the tiny presets: 512)
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(seed))


def padded_rows(lengths):
    """Random rows of these lengths, and them left-padded: (rows, idx, attention_mask)."""
    seqs = [rand_ids(n, seed=n) for n in lengths]
    return seqs, *left_pad(seqs)


@torch.no_grad()
def ours(m, idx, **kw):
    return m(idx, **kw)[0]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")


def adapted(family, kind, device="cpu"):
    """A tiny random model of the family with a random adapter (no zero-initialised parts)."""
    m = tiny_model(family).to(device)
    if ADAPTERS[kind] is not None:
        add_adapter(m, "prefix" if kind == "gated" else kind, **ADAPTERS[kind])
        torch.manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.3)
    return m.eval()


def greedy_no_cache(m, idx, n, mask=None):
    with torch.no_grad():
        for _ in range(n):
            nxt = m(idx, attention_mask=mask)[0][:, -1].argmax(-1)
            idx = torch.cat((idx, nxt[:, None]), 1)
            mask = None if mask is None else F.pad(mask, (0, 1), value=1)
    return idx


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model, tok, _ = load(tiny_dir, "", "cpu", torch.float32)
    return model, tok


# --------------------------------------------------------------------------------------------------
# generate: greedy and sampled

@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_generate_batched_equals_one_by_one(family):
    m = tiny_model(family)
    seqs, idx, mask = padded_rows((7, 2, 5))
    T, n_new = idx.size(1), 6
    out = generate(m, idx, n_new, attention_mask=mask)
    assert out.shape == (3, T + n_new) and torch.equal(out[:, :T], idx)
    for i, s in enumerate(seqs):
        alone = generate(m, s[None], n_new)
        assert torch.equal(alone, greedy_no_cache(m, s[None], n_new)), (
            f"{family} row {i}: cache != no cache")
        assert torch.equal(out[i, T:], alone[0, len(s):]), f"{family} row {i}: batched != alone"
    assert torch.equal(out, greedy_no_cache(m, idx, n_new, mask))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_generate_eos_stops_rows(family):
    m = tiny_model(family)
    seqs, idx, mask = padded_rows((7, 3, 5))
    T, n_new = idx.size(1), 8
    base = generate(m, idx, n_new, attention_mask=mask)[:, T:]
    eos = int(base[0, 1])  # row 0 stops at its second new token
    got = generate(m, idx, n_new, attention_mask=mask, stop_ids=[eos])[:, T:]
    expect, stop = base.clone(), []
    for r in range(3):
        hits = (base[r] == eos).nonzero()
        if len(hits):
            expect[r, hits[0, 0]:] = eos
            stop.append(int(hits[0, 0]) + 1)
    length = max(stop) if len(stop) == 3 else n_new  # the loop ends once every row has finished
    assert got.shape == (3, length) and torch.equal(got, expect[:, :length])
    assert (got[0, 1:] == eos).all()
    # a lone row that finishes stops the loop early (row 0 emits eos at stop[0] - 1 <= 1)
    alone = generate(m, seqs[0][None], n_new, stop_ids=[eos])
    assert alone.shape == (1, len(seqs[0]) + stop[0]) and int(alone[0, -1]) == eos
    assert torch.equal(alone[0, len(seqs[0]):], base[0, :stop[0]])


def test_generate_sampling():
    m = tiny_model("llama")
    idx, mask = left_pad([rand_ids(n, vocab=512, seed=n) for n in (6, 3)])
    T = idx.size(1)
    torch.manual_seed(0)
    a = generate(m, idx, 5, temperature=0.8, top_k=5, attention_mask=mask)
    torch.manual_seed(0)
    b = generate(m, idx, 5, temperature=0.8, top_k=5, attention_mask=mask)
    assert a.shape == (2, T + 5) and torch.equal(a, b)
    greedy = generate(m, idx, 5, attention_mask=mask)
    assert torch.equal(generate(m, idx, 5, temperature=1.0, top_k=1, attention_mask=mask), greedy)
    # sampled first tokens lie in the top k; without top_k (hot) they do not
    rows = idx[:1].expand(64, -1)
    top3 = set(ours(m, idx[:1])[0, -1].topk(3).indices.tolist())
    torch.manual_seed(1)
    assert set(generate(m, rows, 1, temperature=2.0, top_k=3)[:, -1].tolist()) <= top3
    assert not set(generate(m, rows, 1, temperature=2.0)[:, -1].tolist()) <= top3


# --------------------------------------------------------------------------------------------------
# stop ids: any of several ends a row (Llama 3: <|eot_id|>, <|eom_id|>, <|end_of_text|>)

def first_stop(row, stops):
    """Index of the first token of `row` in stops, or None."""
    return next((n for n, t in enumerate(row) if t in stops), None)


@pytest.mark.parametrize("family", ["llama", "gptj"])  # tiny random BLOOMs repeat one token
def test_generation_stops_on_any_stop_id(family):
    m = tiny_model(family)
    seqs, idx, mask = padded_rows((7, 3, 5))
    T, n_new = idx.size(1), 8
    free = generate(m, idx, n_new, attention_mask=mask)[:, T:].tolist()
    unused = next(t for t in range(512) if all(t not in r for r in free))
    second = free[1][2]  # a token the model emits: the second stop id ends row 1 (at least) there
    stops = [unused, second]
    got = generate(m, idx, n_new, attention_mask=mask, stop_ids=stops)[:, T:].tolist()
    for r, row in enumerate(got):
        n = first_stop(free[r], stops)
        want = free[r] if n is None else free[r][:n + 1] + [free[r][n]] * (n_new - n - 1)
        assert row == want[:len(row)] and (n is None or n < len(row)), f"row {r}"
    assert first_stop(free[1], stops) <= 2 and got[1][2:] == [second] * (len(got[1]) - 2)
    # the reference without the second stop id runs on: the stop id is what ended row 1
    assert generate(m, idx, n_new, attention_mask=mask, stop_ids=[unused])[:, T:].tolist() == free
    assert got != free
    # each row alone stops at the same token
    for r, s in enumerate(seqs):
        alone = generate(m, s[None], n_new, stop_ids=set(stops))[0, len(s):].tolist()
        n = first_stop(free[r], stops)
        assert alone == (free[r] if n is None else free[r][:n + 1])


# --------------------------------------------------------------------------------------------------
# streaming: callback(tokens) sees each column as it is chosen

@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_streamed_tokens_equal_the_returned_ones(temperature):
    m = adapted("llama", "prompt")
    seqs, idx, mask = padded_rows((6, 2, 4))
    T = idx.size(1)
    torch.manual_seed(3)
    plain = generate(m, idx, 7, temperature, attention_mask=mask)
    stops = {int(plain[1, T + 2])}  # row 1 stops early, the others may not
    torch.manual_seed(3)
    want = generate(m, idx, 7, temperature, stop_ids=stops, attention_mask=mask)
    forwards, seen = [], []
    hook = m.register_forward_hook(lambda *a: forwards.append(1))

    def callback(tokens):  # delivered before the next step is computed
        assert tokens.shape == (3,) and len(forwards) == len(seen) + 1
        seen.append(tokens.clone())
    try:
        torch.manual_seed(3)
        got = generate(m, idx, 7, temperature, stop_ids=stops, attention_mask=mask,
                       callback=callback)
    finally:
        hook.remove()
    assert torch.equal(got, want) and torch.equal(torch.stack(seen, 1), want[:, T:])
    assert len(seen) == want.size(1) - T and len(forwards) == len(seen)  # no step after the last


# --------------------------------------------------------------------------------------------------
# the static-shape step, the CUDA graph, compiling

@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_static_decoding_equals_full_forwards(family, kind):
    m = adapted(family, kind)
    seqs = [rand_ids(n, seed=n) for n in (7, 2, 5)]
    idx, mask = left_pad(seqs)
    out = generate(m, idx, 6, attention_mask=mask)
    assert torch.equal(out, greedy_no_cache(m, idx, 6, mask))
    for i, s in enumerate(seqs):  # each row alone, unpadded: the same tokens
        assert torch.equal(generate(m, s[None], 6)[0, len(s):], out[i, idx.size(1):])


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_on_the_static_cache(family):
    # scores of the returned beams equal a full forward over prompt + continuation (the cache was
    # repeated and reordered)
    m = adapted(family, "prefix")
    prompts = [rand_ids(n, seed=n).tolist() for n in (4, 2, 6)]
    idx, mask = left_pad([torch.tensor(p) for p in prompts])
    got = beam_search(m, idx, mask, 5, num_beams=3, return_scores=True)
    for p, (score, ids) in zip(prompts, got):
        with torch.no_grad():
            logp = F.log_softmax(m(torch.tensor([p + ids]))[0][0, len(p) - 1:-1], -1)
        assert len(ids) == 5
        total = logp.gather(1, torch.tensor(ids)[:, None]).sum().item()
        assert score == pytest.approx(total / 5, abs=1e-5)
    alone = beam_search(m, torch.tensor([prompts[2]]), torch.ones(1, 6, dtype=torch.long), 5,
                        num_beams=3)
    assert alone[0] == got[2][1]


def test_decode_steps_have_fixed_shapes(monkeypatch):
    # every one-token step attends over the whole cache: the same shapes each step (as a CUDA graph
    # needs)
    m = adapted("bloom", "prefix")
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape, k.shape, None if attn_mask is None else attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(model_py.F, "scaled_dot_product_attention", spy)
    idx, mask = left_pad([rand_ids(n, seed=n) for n in (5, 3)])
    generate(m, idx, 6, attention_mask=mask)
    per_call = len(seen) // 6  # prefill + 5 steps, one call per layer
    steps = {s for s in seen[per_call:]}
    assert len(seen) == 6 * m.config.n_layer and len(steps) == 1
    assert next(iter(steps))[1][2] == 3 + 5 + 6  # prefix + prompt + new tokens: the whole cache


@pytest.mark.parametrize("family, kind", [("bloom", "prefix"), ("llama-gqa", "gated"),
                                          ("opt", "prompt"), ("gptj", "base")])
def test_decode_step_reads_no_tensor_values_in_python(family, kind):
    # what a CUDA graph capture forbids (.item(), bool(tensor), shapes that depend on values)
    # fails on the meta device, which holds no values: prefill and the step must run there
    preset = {"llama-gqa": "tiny-llama-gqa"}.get(family, f"tiny-{family}")
    with torch.device("meta"):
        m = Transformer(Config.from_name(preset)).eval()
    if ADAPTERS[kind] is not None:
        add_adapter(m, "prefix" if kind == "gated" else kind, **ADAPTERS[kind]).to("meta")
    cache, idx = m.new_cache(2, 12), torch.zeros(2, 5, dtype=torch.long, device="meta")
    with torch.no_grad():
        prefill(m, cache, idx, torch.ones(2, 5, dtype=torch.long, device="meta"))
        step = DecodeStep(m, cache)
        for _ in range(3):
            logits = step(idx[:, :1])
    assert logits.shape == (2, 1, m.config.vocab_size) and cache.pos == 8 + (kind == "prompt") * 3


def test_cache_repeat_and_reorder():
    m = tiny_model("llama")
    cache = m.new_cache(2, 8)
    prefill(m, cache, rand_ids(2, 3))
    k0 = cache.kv[0][0].clone()
    cache.repeat(3)
    assert cache.kv[0][0].shape[0] == 6 and torch.equal(cache.kv[0][0][3], k0[1])
    ptr = cache.kv[1][1].data_ptr()
    rows = torch.tensor([5, 0, 0, 1, 2, 3])
    before = [t.clone() for t in (cache.valid, cache.kv[1][1])]
    cache.reorder(rows)
    assert torch.equal(cache.valid, before[0][rows])
    assert torch.equal(cache.kv[1][1], before[1][rows])
    assert cache.kv[1][1].data_ptr() == ptr  # in place: a captured graph reads the same memory


def test_block_compilation_one_graph_for_all_layers():
    # dynamo's own test backend counts the graphs: two for 4 blocks, the first block's (its input,
    # the frozen embedding's output, needs no grad) and one for all the others (a layer index on a
    # module would be a guard: one graph per layer); forward and backward equal eager
    torch.manual_seed(0)
    m = add_adapter(tiny_model("llama", n_layer=4), "lora", r=4, alpha=8, dropout=0.0)
    x = rand_ids(2, 12)
    loss = m(x, x)[1]
    loss.backward()
    grads = [p.grad.clone() for p in m.parameters() if p.requires_grad]
    m.zero_grad()
    count = CompileCounter()
    compile_blocks(m, backend=count)
    loss_c = m(x, x)[1]
    loss_c.backward()
    assert count.frame_count == 2
    assert torch.allclose(loss_c, loss, atol=1e-6)
    trained = [p for p in m.parameters() if p.requires_grad]
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(trained, grads))


def test_inductor_blocks_equal_eager():
    # one real (inductor) compile on a tiny model: same logits and loss as eager, and the same
    # generated tokens
    m = tiny_model("llama", n_layer=2)
    idx, mask = left_pad([rand_ids(n, seed=n) for n in (6, 3)])
    with torch.no_grad():
        ref_logits, ref_loss = m(idx, idx)
        ref_gen = generate(m, idx, 3, attention_mask=mask)
        compile_blocks(m)
        logits, loss = m(idx, idx)
        assert torch.allclose(logits, ref_logits, atol=1e-5)
        assert torch.allclose(loss, ref_loss, atol=1e-5)
        assert torch.equal(generate(m, idx, 3, attention_mask=mask), ref_gen)


def test_attention_backends_leave_out_cudnn_on_cuda():
    flags = torch.backends.cuda
    cudnn, efficient = flags.cudnn_sdp_enabled, flags.mem_efficient_sdp_enabled
    with attention_backends("cuda"):  # the flags are global: settable without a GPU
        assert not cudnn() and efficient() and flags.math_sdp_enabled()
    before = cudnn()
    with attention_backends("cpu"):
        assert cudnn() == before


def test_compile_setting():
    assert compile_setting("", "cuda") is True and compile_setting("", "cpu") is False
    assert compile_setting("true", "cpu") is True and compile_setting("no", "cuda") is False
    with pytest.raises(ConfigError, match="--compile=maybe"):
        compile_setting("maybe", "cpu")


@cuda
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_cuda_graph_decoding_equals_eager(family):
    m = adapted(family, "lora", "cuda")
    idx, mask = left_pad([rand_ids(n, seed=n) for n in (9, 4, 6)])
    idx, mask = idx.cuda(), mask.cuda()
    eager = generate(m, idx, 8, attention_mask=mask, cuda_graph=False)
    assert torch.equal(generate(m, idx, 8, attention_mask=mask), eager)
    assert torch.equal(eager.cpu(), greedy_no_cache(m.cpu(), idx.cpu(), 8, mask.cpu()))


@cuda
def test_cuda_graph_step_replays():
    m = adapted("llama", "gated", "cuda")
    idx = rand_ids(2, 4).cuda()
    cache = m.new_cache(2, 12)
    prefill(m, cache, idx)
    step = DecodeStep(m, cache)
    tok = idx[:, -1:]
    for _ in range(6):
        tok = step(tok)[:, -1].argmax(-1, keepdim=True)
    assert step.graph is not None and cache.pos == 10 and int(cache.next) == 10


@cuda
def test_cuda_graph_streams_and_stops():
    # the replayed graph's output buffer is read by sample before the next replay: the streamed
    # columns and the stops are those of eager steps
    m = adapted("llama", "lora", "cuda")
    idx, mask = left_pad([rand_ids(n, seed=n) for n in (9, 4)])
    idx, mask = idx.cuda(), mask.cuda()
    eager = generate(m, idx, 10, attention_mask=mask, cuda_graph=False)
    stops = {int(eager[0, -4])}
    want = generate(m, idx, 10, stop_ids=stops, attention_mask=mask, cuda_graph=False)
    seen = []
    got = generate(m, idx, 10, stop_ids=stops, attention_mask=mask, callback=seen.append)
    assert torch.equal(got, want) and torch.equal(torch.stack(seen, 1), want[:, idx.size(1):])


@cuda
def test_cuda_graph_of_compiled_blocks_and_beams():
    m = adapted("llama-gqa", "prefix")  # CPU references first
    idx, mask = left_pad([rand_ids(n, seed=n) for n in (7, 3)])
    greedy, beams = generate(m, idx, 6, attention_mask=mask), beam_search(m, idx, mask, 6, 3)
    compile_blocks(m.cuda())
    idx, mask = idx.cuda(), mask.cuda()
    assert torch.equal(generate(m, idx, 6, attention_mask=mask).cpu(), greedy)
    assert beam_search(m, idx, mask, 6, num_beams=3) == beams


# --------------------------------------------------------------------------------------------------
# beam search

@pytest.fixture(scope="module")
def small_vocab_model():
    torch.manual_seed(0)
    model = randomize_(Transformer(Config.from_name("tiny-llama", vocab_size=8)), seed=3).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # peaked distributions: beams, greedy and the optimum disagree
    return model


def exhaustive_best(model, prompt, depth, stops, length_penalty):
    """The best continuation over every sequence of up to `depth` tokens that ends in a stop id,
    and every one of exactly `depth` tokens, scored by a full forward pass without cache
    (score = sum log p / len ** length_penalty)."""
    V = model.config.vocab_size
    words = [t for t in range(V) if t not in stops]
    cands = [list(s) + [e] for n in range(depth) for s in itertools.product(words, repeat=n)
             for e in sorted(stops)]
    cands += [list(s) for s in itertools.product(words, repeat=depth)]
    scores = []
    with torch.no_grad():
        for n in range(1, depth + 1):  # one forward pass per length
            seqs = torch.tensor([c for c in cands if len(c) == n])
            logp = F.log_softmax(
                model(torch.cat((torch.tensor(prompt).expand(len(seqs), -1), seqs), 1))[0], -1)
            logp = (logp[:, len(prompt) - 1:-1].gather(2, seqs[:, :, None]).sum((1, 2))
                    / n ** length_penalty)
            scores += zip(logp.tolist(), seqs.tolist())
    best = max(scores)[1]
    return best[:-1] if best[-1] in stops else best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_exhaustive_optimum(small_vocab_model, length_penalty):
    # with num_beams >= 7 ** 2 live prefixes nothing is pruned within 3 steps, so beam search
    # must be exact
    model, eos = small_vocab_model, 2
    prompts = [[1, 5, 3], [1, 4], [1, 7, 6, 5, 3, 0]]
    idx, mask = left_pad([torch.tensor(p) for p in prompts])
    got = beam_search(model, idx, mask, 3, num_beams=64, stop_ids=[eos],
                      length_penalty=length_penalty)
    want = [exhaustive_best(model, p, 3, {eos}, length_penalty) for p in prompts]
    assert got == want
    greedy = generate_ids(model, prompts, 3, stop_ids=[eos])
    # the test is not trivial
    assert any(g != w for g, w in zip(greedy, want)) or length_penalty == 1.0


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_stops_on_any_stop_id(small_vocab_model, length_penalty):
    # two stop ids: a hypothesis may end in either; still the exhaustive optimum over that set
    model, stops = small_vocab_model, {2, 6}
    prompts = [[1, 5, 3], [1, 4], [1, 7, 6, 5, 3, 0], [1, 3]]
    idx, mask = left_pad([torch.tensor(p) for p in prompts])
    got = beam_search(model, idx, mask, 3, num_beams=36, stop_ids=stops,
                      length_penalty=length_penalty)
    assert got == [exhaustive_best(model, p, 3, stops, length_penalty) for p in prompts]
    # the reference with the first stop id only differs: the second one matters
    assert got != beam_search(model, idx, mask, 3, num_beams=36, stop_ids={2},
                              length_penalty=length_penalty)
    assert all(6 not in ids for ids in got)


def test_one_beam_is_greedy_and_beams_are_batch_invariant(small_vocab_model, loaded):
    model, tok = loaded
    rng = random.Random(2)
    prompts = [tok.encode(format_prompt(sentence(rng, 1, 30)), bos=True) for _ in range(5)]
    greedy = generate_ids(model, prompts, 10, batch_size=5, stop_ids=[tok.eos_id])
    assert generate_ids(model, prompts, 10, batch_size=5, stop_ids=[tok.eos_id],
                        num_beams=1) == greedy
    idx, mask = left_pad([torch.tensor(p) for p in prompts])
    assert beam_search(model, idx, mask, 10, num_beams=1, stop_ids=[tok.eos_id]) == greedy
    small = small_vocab_model  # EOS is likely here, so hypotheses finish at different steps
    short = [[1, 5, 3], [1, 4], [1, 7, 6, 5, 3, 0], [1, 2, 2]]
    assert generate_ids(small, short, 6, stop_ids=[2]) == [
        beam_search(small, *left_pad([torch.tensor(p)]), 6, num_beams=1, stop_ids=[2])[0]
        for p in short]
    batched = generate_ids(small, short, 6, batch_size=4, stop_ids=[2], num_beams=3)
    assert batched == generate_ids(small, short, 6, batch_size=1, stop_ids=[2], num_beams=3)
    # two stop ids: batched beams still equal one by one, and greedy still equals one beam
    two = {2, 6}
    batched = generate_ids(small, short, 6, batch_size=4, stop_ids=two, num_beams=3)
    assert batched == generate_ids(small, short, 6, batch_size=1, stop_ids=two, num_beams=3)
    assert generate_ids(small, short, 6, stop_ids=two) == [
        beam_search(small, *left_pad([torch.tensor(p)]), 6, num_beams=1, stop_ids=two)[0]
        for p in short]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_scores_match_a_full_forward(small_vocab_model, length_penalty):
    # the cached, reordered beams must score each hypothesis as a plain forward pass over
    # prompt + hypothesis does
    model, eos = small_vocab_model, 2
    prompts = [[1, 5, 3], [1, 4], [1, 7, 6, 5, 3, 0], [1, 2, 2], [1, 3], [1, 6, 0, 0, 4]]
    got = beam_search(model, *left_pad([torch.tensor(p) for p in prompts]), 8, num_beams=3,
                      stop_ids=[eos], length_penalty=length_penalty, return_scores=True)
    for p, (score, ids) in zip(prompts, got):
        seq = ids + [eos] * (len(ids) < 8)
        logp = F.log_softmax(model(torch.tensor([p + seq]))[0][0, len(p) - 1:-1], -1)
        total = logp.gather(1, torch.tensor(seq)[:, None]).sum().item()
        assert score == pytest.approx(total / len(seq) ** length_penalty, abs=1e-5)
    assert {len(ids) for _, ids in got} != {8}  # some finished early with EOS


# --------------------------------------------------------------------------------------------------
# many prompts: generate_ids, generate_batch

def test_batch_size_does_not_change_predictions(loaded):
    model, tok = loaded
    rng = random.Random(1)
    prompts = [tok.encode(format_prompt(sentence(rng, 1, 40)), bos=True) for _ in range(12)]
    assert len({len(p) for p in prompts}) > 8  # lengths vary: batches are padded
    one = generate_batch(model, tok, prompts, 12, batch_size=1)
    assert generate_batch(model, tok, prompts, 12, batch_size=8) == one
    assert generate_batch(model, tok, prompts, 12, batch_size=5) == one
    assert len({r.text for r in one}) > 6  # different prompts, different answers: order restored


def test_eos_stops_and_is_cut(loaded):
    model, tok = loaded
    prompts = [tok.encode(format_prompt(w), bos=True)
               for w in ("how many apples", "Tom buys more pens and")]
    free = generate_ids(model, prompts, 10, batch_size=2)  # no stop id: 10 tokens each
    assert [len(x) for x in free] == [10, 10]
    eos = free[0][3]
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = generate_ids(model, prompts[:1], 10, stop_ids=[eos])
    finally:
        hook.remove()
    first = free[0].index(eos)
    assert got == [free[0][:first]]
    # prefill + one step per token before EOS: generation stopped there
    assert len(calls) == first + 1
    both = generate_ids(model, prompts, 10, batch_size=2, stop_ids=[eos])
    assert both == [x[:x.index(eos)] if eos in x else x for x in free]  # the other row went on


def test_any_stop_id_ends_a_response_and_says_why(loaded, monkeypatch):
    # a tokenizer with several stop ids (Llama 3's case): a row ends at the first of any of them;
    # the other row runs to max_new_tokens, and each response says why it ended
    model, tok = loaded
    prompts = [tok.encode(format_prompt(w), bos=True)
               for w in ("how many apples", "Tom buys more pens and")]
    free = generate_batch(model, tok, prompts, 10, batch_size=2)
    assert [r.stop for r in free] == [MAX_NEW_TOKENS] * 2  # the tiny model never says EOS here
    second = generate_ids(model, prompts, 10)[0][4]
    monkeypatch.setattr(tok, "stop_ids", frozenset({tok.eos_id, second}))
    got = generate_batch(model, tok, prompts, 10, batch_size=2)
    full = generate_ids(model, prompts, 10)
    for r, row in zip(got, full):
        if second in row:
            assert r == Response(tok.decode(row[:row.index(second)]), STOP_TOKEN)
        else:
            assert r == Response(tok.decode(row), MAX_NEW_TOKENS)
    assert got[0].stop == STOP_TOKEN and got[0] != free[0]
    calls = []  # row 0 alone: prefill + one step per token before the stop id, none after
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        generate_batch(model, tok, prompts[:1], 10)
    finally:
        hook.remove()
    assert len(calls) == full[0].index(second) + 1


def test_long_prompts_are_cut_from_the_left(loaded, capsys, monkeypatch):
    model, tok = loaded
    prompts = [tok.encode(format_prompt(w), bos=True) for w in ("how many " * 30, "Tom")]
    room = len(prompts[1]) + 5  # the short prompt fits, the long one does not
    monkeypatch.setattr(model.config, "block_size", room + 8)
    out = generate_batch(model, tok, prompts, 8, batch_size=2)
    assert (len(out) == 2
            and f"1 of 2 prompts are longer than {room} tokens" in capsys.readouterr().err)
    ids = prompts[0]
    cut = [ids[:1] + ids[1 - room:]]  # BOS kept
    assert ([tok.decode(x) for x in generate_ids(model, cut, 8, stop_ids=[tok.eos_id])]
            == [r.text for r in out[:1]])
    with pytest.raises(ValueError, match="no room"):
        generate_batch(model, tok, prompts, room + 8)


def test_soft_tokens_take_cache_slots():
    # a prompt adapter's soft tokens need cache slots: the one count (model.n_soft_tokens) sizes
    # the cache for generate and beams alike
    m = adapted("llama", "prompt")
    assert m.n_soft_tokens() == 3 and tiny_model("llama").n_soft_tokens() == 0
    idx = rand_ids(1, 5)
    cache = G.new_cache(m, 1, 5, 4)
    assert cache.max_len == 5 + 4 + 3
    assert generate(m, idx, 4).shape == (1, 9)


def test_learned_positions_are_checked_before_decoding():
    """OPT's table ends at block_size: generate refuses a request that could pass it before any
    step runs (a CUDA-graph replay would skip the forward's own check); one that fits runs."""
    m = Transformer(Config.from_name("tiny-opt", block_size=16)).eval()
    idx = torch.zeros(1, 10, dtype=torch.long)
    assert generate(m, idx, 6).shape == (1, 16)
    with pytest.raises(ValueError, match="10 prompt \\+ 7 new tokens, but tiny-opt has learned"):
        generate(m, idx, 7)
    # prompt tuning's soft tokens take positions too: 6 + 10 + 3 passes the table of 16 (without
    # them counted here, the forward itself would stop halfway; a graph replay would not)
    add_adapter(m, "prompt", num_virtual_tokens=3)
    assert generate(m, idx[:, :6], 7).shape == (1, 13)
    with pytest.raises(ValueError, match="6 prompt \\+ 10 new tokens \\+ 3 soft tokens, but"):
        generate(m, idx[:, :6], 10)


def test_cut_at_stop():
    stops = frozenset({128001, 128008, 128009})
    assert G.cut_at_stop([5, 6, 128009, 7, 128001], stops) == [5, 6]
    assert G.cut_at_stop([128008], stops) == []
    assert G.cut_at_stop((5, 6), stops) == [5, 6]
    assert G.cut_at_stop([5, 128001], {2}) == [5, 128001]
