"""fast.py: the static-shape decoding path (prefill + fixed-shape one-token steps over the whole KV
cache, a CUDA graph on CUDA), regional compilation (one graph for every block) and the --compile
setting. References are full forward passes without any cache (what the KV-cache generation was
always tested against)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import left_pad, tiny_model
from torch._dynamo.testing import CompileCounter

import eval as ev
import model as model_py
from adapters import add_adapter
from cli import ConfigError
import fast
from fast import DecodeStep, attention_backends, compile_blocks, compile_setting, prefill

FAMILIES = ("llama", "llama-gqa", "gptj", "bloom", "opt")
ADAPTERS = {"base": None, "lora": dict(r=4, alpha=8, dropout=0.0),
            "prefix": dict(num_virtual_tokens=3), "gated": dict(num_virtual_tokens=3, gated=True),
            "prompt": dict(num_virtual_tokens=3), "dora": dict(r=4, alpha=8, dropout=0.0),
            "ia3": {}}
def rand_ids(*shape, seed=0):  # token ids of a fixed seed, within the tiny vocabulary (512)
    return torch.randint(512, shape, generator=torch.Generator().manual_seed(seed))


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


def greedy_no_cache(m, idx, n, mask):
    with torch.no_grad():
        for _ in range(n):
            nxt = m(idx, attention_mask=mask)[0][:, -1].argmax(-1)
            idx, mask = torch.cat((idx, nxt[:, None]), 1), F.pad(mask, (0, 1), value=1)
    return idx


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_static_decoding_equals_full_forwards(family, kind):
    m = adapted(family, kind)
    seqs = [rand_ids(n, seed=n) for n in (7, 2, 5)]
    idx, mask = left_pad(seqs)
    out = m.generate(idx, 6, attention_mask=mask)
    assert torch.equal(out, greedy_no_cache(m, idx, 6, mask))
    for i, s in enumerate(seqs):  # each row alone, unpadded: the same tokens
        assert torch.equal(m.generate(s[None], 6)[0, len(s):], out[i, idx.size(1):])


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_on_the_static_cache(family):
    # scores of the returned beams equal a full forward over prompt + continuation (the cache was
    # repeated and reordered)
    m = adapted(family, "prefix")
    prompts = [rand_ids(n, seed=n).tolist() for n in (4, 2, 6)]
    idx, mask = left_pad([torch.tensor(p) for p in prompts])
    got = ev.beam_search(m, idx, mask, 5, num_beams=3, return_scores=True)
    for p, (score, ids) in zip(prompts, got):
        with torch.no_grad():
            logp = F.log_softmax(m(torch.tensor([p + ids]))[0][0, len(p) - 1:-1], -1)
        assert len(ids) == 5
        total = logp.gather(1, torch.tensor(ids)[:, None]).sum().item()
        assert score == pytest.approx(total / 5, abs=1e-5)
    alone = ev.beam_search(m, torch.tensor([prompts[2]]), torch.ones(1, 6, dtype=torch.long), 5,
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
    m.generate(idx, 6, attention_mask=mask)
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
        m = model_py.Transformer(model_py.Config.from_name(preset)).eval()
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
        ref_gen = m.generate(idx, 3, attention_mask=mask)
        compile_blocks(m)
        logits, loss = m(idx, idx)
        assert torch.allclose(logits, ref_logits, atol=1e-5)
        assert torch.allclose(loss, ref_loss, atol=1e-5)
        assert torch.equal(m.generate(idx, 3, attention_mask=mask), ref_gen)


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
    eager = fast.generate(m, idx, 8, attention_mask=mask, cuda_graph=False)
    assert torch.equal(fast.generate(m, idx, 8, attention_mask=mask), eager)
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


def test_compile_words_are_checked():
    with pytest.raises(ConfigError, match="--compile=maybe"):
        ev.parse_config(["--compile=maybe"])
    assert ev.parse_config(["--compile=false"])["compile"] == "false"


@cuda
def test_cuda_graph_of_compiled_blocks_and_beams():
    m = adapted("llama-gqa", "prefix")  # CPU references first
    idx, mask = left_pad([rand_ids(n, seed=n) for n in (7, 3)])
    greedy, beams = m.generate(idx, 6, attention_mask=mask), ev.beam_search(m, idx, mask, 6, 3)
    compile_blocks(m.cuda())
    idx, mask = idx.cuda(), mask.cuda()
    assert torch.equal(fast.generate(m, idx, 6, attention_mask=mask).cpu(), greedy)
    assert ev.beam_search(m, idx, mask, 6, num_beams=3) == beams
