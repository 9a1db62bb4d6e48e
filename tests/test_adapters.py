


"""adapters.py: the modules, their slots, the KINDS registry and the API. Every kind and placement
on tiny models of each family: a fresh adapter equals the base bit for bit, the forward is the
paper's formula (DoRA, gated prefix), training moves only the adapter (each module names its own
tensors), merge = unmerged (LoRA, DoRA, IA3), composition under names, exact 7B parameter counts,
error messages, fp32 adapter maths, and docs/adapters.md's worked example held equal to the
source. Files and PEFT folders: tests/test_adapter_io.py; MoSA's split: tests/test_mosa.py; the
slots themselves: tests/test_slots.py.

Models come from conftest.tiny_model (our tiny presets, every weight randomised so no weight is a
no-op). peft and transformers are imported inside the tests that need them.
"""
import ast
import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F

import adapter_io as IO
import adapters as A
from conftest import ROOT, left_pad, tiny_model
from generate import generate
from model import Linear, Transformer
from mosa import sparse_step
from presets import Config
from slots import SLOT_TYPES, slots

# transformers/peft
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

FAMILIES = ("llama", "gptj", "bloom", "opt")
ALL_FAMILIES = ("llama", "llama-gqa", "gptj", "bloom", "opt")
MAIN = ("llama", "gptj")  # the families the paper fine-tunes; the costlier tests run on these


# explicit (non-default) LoRA targets and per-linear parallel targets, by family
TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "gate_proj"],
           "gptj": ["q_proj", "v_proj", "out_proj", "fc_in"],
           "bloom": ["query_key_value", "dense", "dense_4h_to_h"],
           "opt": ["k_proj", "out_proj", "fc1"]}


PER_LINEAR = {"llama": ["up_proj", "down_proj"], "gptj": ["fc_in", "fc_out"],
              "bloom": ["dense_h_to_4h", "dense_4h_to_h"], "opt": ["fc1", "fc2"]}


# id -> (kind, options); "TARGETS"/"PER_LINEAR" are replaced by the family's list
SPECS = {
    "lora": ("lora", {}),
    "lora-explicit": ("lora", dict(r=4, alpha=8, dropout=0.0, target_modules="TARGETS")),
    "series-mlp": ("series", dict(placement="mlp")),
    "series-attn": ("series", dict(placement="attn", bottleneck=16, non_linearity="relu")),
    "series-both": ("series", dict(placement="both", bottleneck=16, scaling=2.0)),
    "series-learned": ("series", dict(placement="both", reduction=8, scaling="learned",
                                      non_linearity="gelu")),
    "parallel-mlp": ("parallel", dict(placement="mlp")),
    "parallel-attn": ("parallel", dict(placement="attn", bottleneck=16, scaling=0.5)),
    "parallel-both": ("parallel", dict(placement="both", bottleneck=16, scaling="learned",
                                       non_linearity="silu")),
    "parallel-per-linear": ("parallel", dict(per_linear="PER_LINEAR", bottleneck=16)),
    "series-sparse": ("series", dict(placement="both", bottleneck=16, sparse=4)),
    "parallel-sparse": ("parallel", dict(placement="mlp", bottleneck=16, sparse=4)),
    "parallel-per-linear-sparse": ("parallel", dict(per_linear="PER_LINEAR", bottleneck=16,
                                                    sparse=3)),
    "prefix": ("prefix", dict(num_virtual_tokens=5)),
    "prefix-reparam": ("prefix", dict(num_virtual_tokens=5, reparam=32)),
    "prefix-gated": ("prefix", dict(num_virtual_tokens=5, gated=True)),
    "prefix-gated-top": ("prefix", dict(num_virtual_tokens=3, gated=True, layers=1)),
    "prompt": ("prompt", dict(num_virtual_tokens=5)),
}


# identity at initialisation: all but the ungated prefix and the prompt
# (the paper's, without a gate)
EXACT = [s for s in SPECS if not s.startswith(("prefix", "prompt")) or "gated" in s]


SUBSET = ("lora", "series-learned", "parallel-per-linear", "parallel-sparse", "prefix-reparam",
          "prefix-gated", "prompt")


# every spec on LLaMA and GPT-J, a representative subset on BLOOM and OPT
CASES = [(f, s) for f in MAIN for s in SPECS] + [(f, s) for f in ("bloom", "opt") for s in SUBSET]


DORA_IA3 = ("dora", "ia3")
OPTIONS = {"dora": dict(r=4, alpha=8, dropout=0.0), "ia3": {}}  # ia3 on its default targets


MLP_OUT = {"llama": "down_proj", "llama-gqa": "down_proj", "gptj": "fc_out",
           "bloom": "dense_4h_to_h", "opt": "fc2"}


def spec(family, sid):
    kind, o = SPECS[sid]
    swap = {"TARGETS": TARGETS[family], "PER_LINEAR": PER_LINEAR[family]}
    return kind, {k: swap.get(v, v) if isinstance(v, str) else v for k, v in o.items()}


# ---------------------------------------------------------------------------------------- helpers
def ids(model, B=2, T=9, seed=0):
    return torch.randint(0, model.config.vocab_size, (B, T),
                         generator=torch.Generator().manual_seed(seed))


def padded_batch(model, seed=1):
    """A left-padded batch of three rows of lengths 7, 4, 9 (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in (7, 4, 9)]
    return seqs, *left_pad(seqs)


@torch.no_grad()
def logits(model, idx, **kw):
    return model(idx, **kw)[0]


def adapter_params(model):
    """{name: parameter} of every attached adapter, as its modules name their tensors
    (adapter_params): the parameters save_adapter writes."""
    own = own_ids(model)
    return {n: p for n, p in model.named_parameters() if id(p) in own}


def own_ids(model):
    return {id(t) for name in A.adapter_names(model)
            for t in A.adapter_state(model, name, keep_vars=True).values()}


def base_tensors(model):
    """Every base parameter and buffer, cloned."""
    own = own_ids(model)
    out = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in own}
    out.update({n: b.clone() for n, b in model.named_buffers() if id(b) not in own})
    return out


@torch.no_grad()
def randomize_adapters_(model, std=0.1, seed=0):
    """Give every adapter tensor random values, so that a branch starting at zero contributes."""
    g = torch.Generator().manual_seed(seed)
    for _, p in adapter_params(model).items():
        p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@torch.no_grad()
def perturb_(model, seed=0):
    """Move every adapter away from its identity start: DoRA's A, B random and m scaled, IA3's l
    around 1. PEFT's names go on (.default, .weight), hence `in`."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=g)
        if "lora_magnitude_vector" in n or "ia3_l" in n:
            p.mul_(1 + 0.2 * noise)
        else:
            p.copy_(0.1 * noise)
    return model


def train(model, steps=4, lr=1e-2, B=4, T=12, seed=0):
    """A few AdamW steps on one toy batch; returns the losses (before each step) and the final
    loss."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        sparse_step(model, step)
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(model(idx[:, :-1], targets=idx[:, 1:])[1].item())
    return losses


def train_steps(model, steps=5, lr=1e-2, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (4, 13), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def greedy_no_cache(model, idx, n, attention_mask=None):
    """Greedy decoding by full forwards over the whole sequence each step (no KV cache)."""
    for _ in range(n):
        nxt = model(idx, attention_mask=attention_mask)[0][:, -1].argmax(-1)
        idx = torch.cat((idx, nxt[:, None]), dim=1)
        if attention_mask is not None:
            attention_mask = F.pad(attention_mask, (0, 1), value=1)
    return idx


def attached(model, name):
    """{(module name, slot attribute)} where adapter `name` sits."""
    return {(m, a) for m, a, s in slots(model) if name in s}


def expected_places(model, kind, o):
    """Where add_adapter must put an adapter: the places its KINDS entry names, checked here
    against the model's module names (every place exists, per-layer kinds sit once in each layer
    or in the top `layers`)."""
    c, o = model.config, {**A.KINDS[kind].defaults, **o}
    places = set(A.KINDS[kind].places(model, o))
    modules = dict(model.named_modules())
    assert all(n in modules and hasattr(modules[n], slot) for n, slot in places)
    if any(slot == "adapter" for _, slot in places):  # on named linears: each name once per layer
        names = o.get("target_modules") or o.get("per_linear") or A.default_targets(c)
        assert places == {(n, "adapter") for n, m in modules.items()
                          if isinstance(m, Linear) and n.split(".")[-1] in names}
        assert len(places) == c.n_layer * len(names)
    elif kind == "prefix":  # the top `layers` (0: all)
        assert places == {(f"layers.{i}.attn", "prefix")
                          for i in range(c.n_layer - (o["layers"] or c.n_layer), c.n_layer)}
    elif kind in ("series", "parallel"):
        subs = {"mlp": ["mlp"], "attn": ["attn"], "both": ["attn", "mlp"]}[o["placement"]]
        where = "post_" if kind == "series" else "beside_"
        assert places == {(f"layers.{i}", where + s) for i in range(c.n_layer) for s in subs}
    return places


def prefix_len(model):
    """How many prefix keys the first layer's attention gets now."""
    att = model.layers[0].attn
    return att.prefix(torch.zeros(2, 1, model.config.n_embd), att.qkv)[0].shape[2]


def modules(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def adapted_linears(model):
    """{name: Linear} of every projection that carries an adapter."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, Linear) and m.adapter is not None}


def meta_count(preset, kind, **options):
    with torch.device("meta"):
        model = Transformer(Config.from_name(preset))
        A.add_adapter(model, kind, **options)
    return A.count_parameters(model)


# --------------------------------------------------------------------- identity at initialisation
@pytest.mark.parametrize("sid", EXACT)
@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_equals_base_exactly(family, sid):
    model = tiny_model(family)
    idx = ids(model)
    _, pidx, pmask = padded_batch(model)
    base, base_pad = logits(model, idx), logits(model, pidx, attention_mask=pmask)
    kind, o = spec(family, sid)
    A.add_adapter(model, kind, **o)
    assert attached(model, "default") == expected_places(model, kind, o)
    model.eval()
    assert torch.equal(logits(model, idx), base)
    assert torch.equal(logits(model, pidx, attention_mask=pmask), base_pad)
    randomize_adapters_(model)  # the adapter is really in the forward path
    assert (logits(model, idx) - base).abs().max() > 1e-3


@pytest.mark.parametrize("kind", DORA_IA3)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fresh_dora_ia3_equal_the_base_exactly(family, kind):
    """m = ||W||_row and B = 0 (DoRA), l = 1 (IA3): the same logits bit for bit, padded or not, in
    train mode (dropout on) and on a bf16 base."""
    model = tiny_model(family)
    idx = ids(model)
    pidx, pmask = left_pad([torch.arange(3, 10), torch.arange(5, 9)])
    base, base_pad = logits(model, idx), logits(model, pidx, attention_mask=pmask)
    A.add_adapter(model, kind, **({"r": 4} if kind == "dora" else {}))  # dora: dropout 0.05
    assert torch.equal(logits(model, idx), base)
    assert torch.equal(logits(model, pidx, attention_mask=pmask), base_pad)
    model.train()
    assert torch.equal(logits(model, idx), base)
    model.eval()
    half = tiny_model(family).to(torch.bfloat16)
    base16 = logits(half, idx)
    A.add_adapter(half, kind)
    assert all(p.dtype == torch.float32 for p in half.parameters() if p.requires_grad)
    assert torch.equal(logits(half, idx), base16)
    perturb_(model)  # the adapter is really in the forward path
    assert (logits(model, idx) - base).abs().max() > 1e-3


def test_series_without_residual_replaces_the_sublayer_output():
    # residual=False: the sublayer output y is replaced by s * up(act(down(y))), zero at init, so
    # the model equals the base with its MLP switched off (down_proj zeroed)
    model, no_mlp = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        for block in no_mlp.layers:
            block.mlp.down_proj.weight.zero_()
    A.add_adapter(model, "series", placement="mlp", bottleneck=8, residual=False)
    model.eval()
    idx = ids(model)
    assert torch.equal(logits(model, idx), logits(no_mlp, idx))


# ----------------------------------------------------------------------------- places and options
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_dora_ia3_default_places(family):
    """DoRA sits where LoRA does; IA3 on k, v (BLOOM: the fused query_key_value) and the MLP's out
    projection, which alone is scaled at its input, with PEFT's shapes."""
    model = tiny_model(family)
    A.add_adapter(model, "dora", name="d")
    A.add_adapter(model, "ia3", name="i")
    places = {n: [m for m in lin.adapter.values()] for n, lin in adapted_linears(model).items()}
    dora = {n.rsplit(".", 1)[-1] for n, ms in places.items()
            if any(isinstance(m, A.DoRA) for m in ms)}
    assert dora == set(A.default_targets(model.config))
    ia3 = {n.rsplit(".", 1)[-1]: m for n, ms in places.items() for m in ms if isinstance(m, A.IA3)}
    kv = ["query_key_value"] if family == "bloom" else ["k_proj", "v_proj"]
    assert sorted(ia3) == sorted(kv + [MLP_OUT[family]])
    assert {n for n, m in ia3.items() if m.on_input} == {MLP_OUT[family]}
    for lin in adapted_linears(model).values():
        if "i" in lin.adapter:
            m = lin.adapter["i"]
            assert m.ia3_l.shape == ((1, lin.in_features) if m.on_input else (lin.out_features, 1))


@pytest.mark.parametrize("kind", DORA_IA3)
def test_added_to_a_model_on_another_device(kind):
    """DoRA reads W when it is built: that must work with the model on another device than torch's
    default (meta here, standing in for cuda: the adapter is built on the cpu, then moved)."""
    model = Transformer(Config.from_name("tiny-llama")).to("meta")
    A.add_adapter(model, kind)
    assert {p.device.type for p in model.parameters() if p.requires_grad} == {"meta"}


def test_ia3_options():
    model = tiny_model("llama")
    A.add_adapter(model, "ia3", target_modules=["q_proj", "up_proj", "down_proj"],
                  feedforward_modules=["up_proj"])
    got = {n.rsplit(".", 1)[-1]: lin.adapter["default"]
           for n, lin in adapted_linears(model).items()}
    assert sorted(got) == ["down_proj", "q_proj", "up_proj"]
    assert got["up_proj"].ia3_l.shape == (1, 64) and got["q_proj"].ia3_l.shape == (64, 1)
    assert got["down_proj"].ia3_l.shape == (64, 1)  # not in feedforward_modules: output scaled
    model = tiny_model("llama")
    A.add_adapter(model, "ia3", feedforward_modules=[])  # every target scaled at its output
    assert not any(m.on_input for m in modules(model, A.IA3))
    with pytest.raises(ValueError, match=r"feedforward_modules=\['up_proj'\]: expected names among "
                       r"target_modules=\['k_proj', 'v_proj', 'down_proj'\]"):
        A.add_adapter(tiny_model("llama"), "ia3", feedforward_modules=["up_proj"])
    unknown = r"target_modules: unknown linear name\(s\) \['fc2'\] for llama"
    with pytest.raises(ValueError, match=unknown):
        A.add_adapter(tiny_model("llama"), "ia3", target_modules=["k_proj", "fc2"],
                      feedforward_modules=[])
    with pytest.raises(ValueError, match=unknown):
        A.add_adapter(tiny_model("llama"), "dora", target_modules=["fc2"])


# ------------------------------------------------------------------------------ prefix and prompt
@pytest.mark.parametrize("reparam", [0, 16])
@pytest.mark.parametrize("family", ["llama", "llama-gqa", "gptj", "bloom", "opt"])
def test_prefix_key_value_shapes(family, reparam):
    model = tiny_model(family)
    c = model.config
    A.add_adapter(model, "prefix", num_virtual_tokens=6, reparam=reparam)
    for block in model.layers:
        k, v, gate = block.attn.prefix(torch.zeros(3, 1, c.n_embd), block.attn.qkv)
        assert gate is None
        assert k.shape == v.shape == (3, c.n_kv_head, 6, c.head_dim)
        assert k.dtype == v.dtype == torch.float32
    if family == "llama-gqa":
        assert c.n_kv_head == 2 < c.n_head
    logits(model.eval(), ids(model))  # the attention accepts them


@pytest.mark.parametrize("sid", ["prefix", "prefix-reparam", "prefix-gated", "prompt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_prompt_generation(family, sid):
    model = tiny_model(family)
    kind, o = spec(family, sid)
    A.add_adapter(model, kind, **o)
    if o.get("gated"):  # open the gates, or this would be the base model
        randomize_adapters_(model, std=0.5)
    model.eval()
    # KV-cache generation == greedy loop of full forwards without cache
    idx = ids(model, B=2, T=5)
    assert torch.equal(generate(model, idx, 6), greedy_no_cache(model, idx, 6))
    # a left-padded batch == each row alone (with and without the cache)
    seqs, pidx, pmask = padded_batch(model)
    batched = generate(model, pidx, 5, attention_mask=pmask)
    assert torch.equal(batched, greedy_no_cache(model, pidx, 5, attention_mask=pmask))
    for i, s in enumerate(seqs):
        alone = generate(model, s[None], 5)
        assert torch.equal(batched[i, -5:], alone[0, -5:]), f"row {i}"


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logits_and_loss(family):
    model = tiny_model(family)
    A.add_adapter(model, "prompt", num_virtual_tokens=7)
    assert model.prompt.n_tokens == 7
    idx = ids(model, B=3, T=8)
    targets = ids(model, B=3, T=8, seed=5)
    targets[0, :3] = -100
    model.train()
    out, loss = model(idx, targets=targets)
    assert out.shape == (3, 8, model.config.vocab_size)  # the soft tokens get no logits
    ref = F.cross_entropy(out.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert torch.isfinite(loss) and torch.allclose(loss, ref)
    loss.backward()
    assert model.prompt["default"].embedding.grad.abs().sum() > 0
    # last_only and a padded batch keep the same convention
    model.eval()
    assert logits(model, idx, last_only=True).shape == (3, 1, model.config.vocab_size)
    _, pidx, pmask = padded_batch(model)
    assert logits(model, pidx, attention_mask=pmask).shape == (*pidx.shape, model.config.vocab_size)


def test_prefix_and_prompt_change_the_output():
    # no gate (as in the paper): fresh prefix/prompt adapters already change the logits, so they
    # are really used
    for kind in ("prefix", "prompt"):
        model = tiny_model("llama")
        idx = ids(model)
        base = logits(model, idx)
        A.add_adapter(model, kind, num_virtual_tokens=4)
        assert (logits(model.eval(), idx) - base).abs().max() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "llama-gqa", "bloom"])
def test_gated_prefix_is_llama_adapter_attention(family):
    """Gated prefix (LLaMA-Adapter): out_proj(softmax(q K^T) V + g softmax(q Kp^T) Vp), Kp, Vp =
    the layer's own k/v projections of the prompt (no rotary), one softmax each; written out here
    by hand."""
    model = tiny_model(family)
    c, att = model.config, model.layers[0].attn
    A.add_adapter(model, "prefix", num_virtual_tokens=4, gated=True)
    module = att.prefix["default"]
    module.gate.fill_(0.7)
    B, T, rep = 2, 5, c.n_head // c.n_kv_head
    x = torch.randn(B, T, c.n_embd)
    _, pk, pv = att.qkv(module.embedding[None])
    q, k, v = att.qkv(x)
    if c.pos == "rope":
        from model import apply_rope, rope_angles
        rope = rope_angles(c, torch.arange(T).expand(B, T))
        q, k = apply_rope(q, *rope, c.rope_interleaved), apply_rope(k, *rope, c.rope_interleaved)
    else:  # BLOOM: ALiBi bias on the sequence's own keys, none on the prefix
        from model import alibi_slopes
        pos = torch.arange(T)
        rope, bias = None, torch.tensor(alibi_slopes(c.n_head))[:, None, None] * pos.float()
    scale = 1 / math.sqrt(c.head_dim)
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    if rope is None:
        s = s + bias
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    sp = q @ pk.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    y = (s.softmax(-1) @ v.repeat_interleave(rep, 1)
         + 0.7 * sp.softmax(-1) @ pv.repeat_interleave(rep, 1))
    want = getattr(att, att.out_name)(y.transpose(1, 2).reshape(B, T, -1))
    mask = (None if rope is not None
            else model.attention_mask(None, torch.arange(T).expand(B, T), T, T))
    got = att(x, rope, mask, None)
    assert (got - want).abs().max() < 1e-5


def test_gated_prefix_trains_gate_first():
    # the gate starts at zero, so only it gets a gradient at step 0;
    # afterwards the prompt learns too
    model = tiny_model("llama")
    A.add_adapter(model, "prefix", num_virtual_tokens=4, gated=True)
    idx = ids(model)
    model(idx, targets=idx)[1].backward()
    module = model.layers[0].attn.prefix["default"]
    assert module.gate.grad.abs().item() > 0 and module.embedding.grad.abs().max().item() == 0
    assert A.count_parameters(model)[0] == model.config.n_layer * (4 * model.config.n_embd + 1)


def test_gated_prefix_options_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="gated=True takes no reparam"):
        A.add_adapter(model, "prefix", gated=True, reparam=16)
    with pytest.raises(ValueError,
                       match=r"layers=5: expected 0 \(all\) up to the model's 2 layers"):
        A.add_adapter(model, "prefix", layers=5)
    with pytest.raises(ValueError, match=r"layers=1.5: expected 0"):
        A.add_adapter(model, "prefix", layers=1.5)
    A.add_adapter(model, "prefix", name="g", gated=True)
    A.add_adapter(model, "prefix", name="p")
    with pytest.raises(ValueError,
                       match=r"a gated prefix cannot run beside other prefixes \(g, p\)"):
        model(ids(model))
    A.set_active(model, ["g"])
    model(ids(model))


def test_compute_prefix():
    model = tiny_model("llama")
    A.add_adapter(model, "prefix", num_virtual_tokens=4, reparam=16)
    train(model, steps=2)
    idx = ids(model)
    before = logits(model, idx)
    A.compute_prefix(model)
    p = model.layers[0].attn.prefix["default"]
    assert {n for n, _ in p.named_parameters()} == {"key", "value"}
    assert model.adapter_configs["default"]["options"]["reparam"] == 0
    assert torch.equal(logits(model, idx), before)


# --------------------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("bias", [False, True])
def test_dora_forward_is_the_paper_formula(bias):
    """y = m * (W + s B A) x / ||W + s B A||_row + b, written out here apart from adapters.py."""
    torch.manual_seed(0)
    lin = Linear(16, 12, bias=bias)
    dora = A.DoRA(lin, r=3, alpha=6, dropout=0.0)
    assert torch.equal(dora.lora_magnitude_vector, lin.weight.norm(dim=1))
    with torch.no_grad():
        dora.lora_B.weight.normal_()
        dora.lora_magnitude_vector.mul_(1.5)
    lin.adapter = dora
    x = torch.randn(5, 16)
    W = lin.weight + 2.0 * dora.lora_B.weight @ dora.lora_A.weight  # s = alpha / r = 2
    want = dora.lora_magnitude_vector * (x @ W.T) / W.norm(dim=1) + (lin.bias if bias else 0)
    assert (lin(x) - want).abs().max() < 1e-5


def test_dora_norm_gets_no_gradient():
    """DoRA §4.3 (and PEFT): ||W + s B A|| is a constant for the gradient. With the norm frozen by
    hand, the gradients of A, B and m are the same (with it in the graph, B's would differ)."""
    torch.manual_seed(0)
    lin = Linear(8, 6, bias=False)
    dora = A.DoRA(lin, r=2, alpha=2, dropout=0.0)
    with torch.no_grad():
        dora.lora_B.weight.normal_()
    lin.adapter = dora
    x = torch.randn(4, 8)
    lin(x).pow(2).sum().backward()
    params = (dora.lora_A.weight, dora.lora_B.weight, dora.lora_magnitude_vector)
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    W = lin.weight + dora.lora_B.weight @ dora.lora_A.weight
    (dora.lora_magnitude_vector * (x @ W.T) / W.norm(dim=1).detach()).pow(2).sum().backward()
    want = [p.grad for p in params]
    assert all((g - w).abs().max() < 1e-5 for g, w in zip(got, want))


def test_ia3_input_scaling_composes_with_lora():
    """On one linear, LoRA then IA3-at-the-input: W (x * l) + b + s B A x. IA3 adds W (x * (l - 1))
    to the y it is handed, so what LoRA added stays (a rescale of y could not reach the input)."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    A.add_adapter(model, "lora", name="lora", r=2, dropout=0.0, target_modules=["down_proj"])
    A.add_adapter(model, "ia3", name="ia3", target_modules=["down_proj"])
    perturb_(model)
    lin = model.layers[0].mlp.down_proj
    x = torch.randn(3, lin.in_features)
    lora, ia3 = lin.adapter["lora"], lin.adapter["ia3"]
    with torch.no_grad():
        want = F.linear(x * ia3.ia3_l, lin.weight) + F.linear(x, lora.delta())
        assert (lin(x) - want).abs().max() < 1e-5


# ----------------------------------------------------------------------------------- trainability
@pytest.mark.parametrize("family, sid", CASES)
def test_only_adapters_train(family, sid):
    model = tiny_model(family)
    kind, o = spec(family, sid)
    A.add_adapter(model, kind, **o)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # names all inside hook slots, all of them train
    assert trainable and trainable == set(adapter_params(model))
    assert all(p.dtype == torch.float32 for p in adapter_params(model).values())
    assert A.count_parameters(model)[0] == sum(p.numel() for p in adapter_params(model).values())
    base = base_tensors(model)
    before = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    losses = train(model, steps=4)
    assert losses[-1] < losses[0] - 1e-3, losses
    after = base_tensors(model)
    # bit-identical
    assert after.keys() == base.keys() and all(torch.equal(after[n], base[n]) for n in base)
    changed = {n for n, p in adapter_params(model).items() if not torch.equal(p, before[n])}
    if o.get("sparse"):  # MoSA: only the parts picked at steps 0..3 train
        assert changed
    else:
        assert changed == set(before)


@pytest.mark.parametrize("kind", DORA_IA3)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_dora_ia3_train_only_the_adapter(family, kind):
    model = tiny_model(family)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    A.add_adapter(model, kind, **OPTIONS[kind])
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # the base is frozen
        else:
            assert p.requires_grad and not torch.equal(p, start[n]), n  # every adapter tensor
    magnitude = "lora_magnitude_vector" if kind == "dora" else "ia3_l"
    assert any(n.endswith(magnitude) for n in start)


@pytest.mark.parametrize("kind", DORA_IA3)
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_dora_ia3_on_a_quantized_base(mode, kind):
    """QLoRA-style (QDoRA): a quantized W is read dequantized by DoRA's norms and IA3's input scale;
    a fresh adapter is still the base exactly, and it trains."""
    from quantize import quantize_model
    model = tiny_model("llama")
    quantize_model(model, mode)
    idx = ids(model)
    base = logits(model, idx)
    A.add_adapter(model, kind, **OPTIONS[kind])
    assert torch.equal(logits(model, idx), base)
    losses = train_steps(model)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_lora(family):
    model = tiny_model(family)
    A.add_adapter(model, "lora")
    randomize_adapters_(model, std=0.05)
    model.eval()
    idx = ids(model)
    unmerged = logits(model, idx)
    A.set_active(model, [])
    base = logits(model, idx)
    A.set_active(model, "default")
    assert (unmerged - base).abs().max() > 1e-2  # the LoRA matters, so double counting would show
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, Linear)}
    A.merge(model)
    loras = [m for m in model.modules() if isinstance(m, A.LoRA)]
    assert loras and all(m.merged for m in loras)
    targeted = {n for n, m in model.named_modules()
                if isinstance(m, Linear) and m.adapter is not None}
    for n, m in model.named_modules():
        if isinstance(m, Linear):
            # exactly the targets were changed
            assert torch.equal(m.weight, weights[n]) != (n in targeted)
    merged = logits(model, idx)
    # merged + forward: the adapter is not counted twice
    assert (merged - unmerged).abs().max() < 1e-5
    A.merge(model)  # merging again is a no-op
    assert torch.equal(logits(model, idx), merged)
    A.unmerge(model)
    assert not any(m.merged for m in loras)
    for n, m in model.named_modules():
        if isinstance(m, Linear):
            assert (m.weight - weights[n]).abs().max() < 1e-6
    assert (logits(model, idx) - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("kind", DORA_IA3)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_dora_ia3_merge_equals_unmerged_and_unmerge_restores(family, kind):
    model = perturb_(A.add_adapter(tiny_model(family), kind, **OPTIONS[kind]))
    model.eval()
    idx = ids(model)
    unmerged = logits(model, idx)
    saved = {n: (m.weight.detach().clone(), m.bias.detach().clone() if m.bias is not None else None)
             for n, m in model.named_modules() if isinstance(m, Linear)}
    A.merge(model)
    targeted = adapted_linears(model)
    for n, m in model.named_modules():
        if isinstance(m, Linear):
            assert torch.equal(m.weight, saved[n][0]) != (n in targeted), n  # just the targets
    assert all(m.merged for m in modules(model, A.DoRA) + modules(model, A.IA3))
    merged = logits(model, idx)
    assert (merged - unmerged).abs().max() < 1e-5  # folded into W (and b), not counted twice
    A.set_active(model, [])  # the merged weights alone carry the adapter
    assert (logits(model, idx) - unmerged).abs().max() < 1e-5
    A.set_active(model, "default")
    A.unmerge(model)
    for n, m in model.named_modules():
        if isinstance(m, Linear):
            assert (m.weight - saved[n][0]).abs().max() < 1e-6, n
            if m.bias is not None:
                assert (m.bias - saved[n][1]).abs().max() < 1e-6, n
    assert (logits(model, idx) - unmerged).abs().max() < 1e-5
    assert all(m.merged_norm is None for m in modules(model, A.DoRA))  # nothing left of the merge


# ----------------------------------------------------------------------------- composition, names
def test_two_named_adapters(tmp_path):
    model = tiny_model("llama")
    idx = ids(model)
    base = logits(model, idx)
    A.add_adapter(model, "lora", name="a", r=4)
    randomize_adapters_(model, seed=1)
    only_a = logits(model.eval(), idx)
    A.add_adapter(model, "series", name="b", bottleneck=8)
    with torch.no_grad():  # give b a non-zero branch
        for _, _, s in slots(model):
            if "b" in s:
                s["b"].up.weight.normal_(0, 0.1)
    model.eval()
    assert A.adapter_names(model) == ["a", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # adding b did not freeze a
    assert any(".a." in n for n in trainable) and any(".b." in n for n in trainable)
    assert trainable == set(adapter_params(model))
    both = logits(model, idx)
    assert (both - only_a).abs().max() > 1e-3
    A.set_active(model, "a")
    assert torch.equal(logits(model, idx), only_a)
    A.set_active(model, [])
    assert torch.equal(logits(model, idx), base)
    A.set_active(model, ["a", "b"])
    assert torch.equal(logits(model, idx), both)
    # both train together
    a0 = model.layers[0].attn.q_proj.adapter["a"].lora_A.weight.detach().clone()
    b0 = model.layers[0].post_mlp["b"].down.weight.detach().clone()
    train(model, steps=2)
    assert not torch.equal(model.layers[0].attn.q_proj.adapter["a"].lora_A.weight, a0)
    assert not torch.equal(model.layers[0].post_mlp["b"].down.weight, b0)
    # each saves and loads alone; loaded together they reproduce the pair
    A.set_active(model, "a")
    only_a = logits(model, idx)
    A.set_active(model, ["a", "b"])
    both = logits(model, idx)
    IO.save_adapter(model, tmp_path / "a", name="a")
    IO.save_adapter(model, tmp_path / "b", name="b")
    fresh = IO.load_adapter(tiny_model("llama"), tmp_path / "a").eval()
    assert A.adapter_names(fresh) == ["a"] and torch.equal(logits(fresh, idx), only_a)
    IO.load_adapter(fresh, tmp_path / "b").eval()
    assert torch.equal(logits(fresh, idx), both)
    with pytest.raises(ValueError, match=r"no adapter named \['c'\]; attached: \['a', 'b'\]"):
        A.set_active(model, ["a", "c"])
    with pytest.raises(ValueError, match="already attached"):
        A.add_adapter(model, "prefix", name="a")
    with pytest.raises(ValueError, match="already attached"):
        IO.load_adapter(fresh, tmp_path / "b")


def test_two_prompts_and_two_prefixes_stack():
    model = tiny_model("llama")
    A.add_adapter(model, "prompt", name="p1", num_virtual_tokens=3)
    A.add_adapter(model, "prompt", name="p2", num_virtual_tokens=2)
    A.add_adapter(model, "prefix", name="k1", num_virtual_tokens=4)
    A.add_adapter(model, "prefix", name="k2", num_virtual_tokens=1, reparam=8)
    assert model.prompt.n_tokens == 5
    emb = torch.zeros(1, 1, model.config.n_embd)
    out = model.prompt(emb)
    assert torch.equal(out[0, :3], model.prompt["p1"].embedding)  # the first added comes first
    assert torch.equal(out[0, 3:5], model.prompt["p2"].embedding)
    assert prefix_len(model) == 5
    A.set_active(model, ["p2", "k1"])
    assert model.prompt.n_tokens == 2 and prefix_len(model) == 4
    model.eval()
    idx = ids(model, T=5)
    assert torch.equal(generate(model, idx, 4), greedy_no_cache(model, idx, 4))


# ------------------------------------------------------------------ exact 7B trainable parameters
LLAMA_7B_TOTAL = 6_738_415_616  # LLaMA-7B's published parameter count


@pytest.mark.parametrize("kind, options, trainable", [
    ("lora", dict(r=32), 56_098_816),  # default targets: q, k, v, up, down (asserted below)
    ("series", dict(bottleneck=256, placement="mlp"), 67_108_864),
    ("parallel", dict(bottleneck=256, placement="mlp"), 67_108_864),
    ("prefix", dict(num_virtual_tokens=10), 2_621_440),
    # LLaMA-Adapter's "1.2M"
    ("prefix", dict(num_virtual_tokens=10, gated=True, layers=30), 1_228_830),
    ("prompt", dict(num_virtual_tokens=10), 40_960),
])
def test_llama_7b_trainable_counts(kind, options, trainable):
    assert A.default_targets(Config.from_name("llama-7b")) == ["q_proj", "k_proj", "v_proj",
                                                               "up_proj", "down_proj"]
    assert meta_count("llama-7b", kind, **options) == (trainable, LLAMA_7B_TOTAL + trainable)


def test_gptj_6b_lora_trainable_count():
    # GPT-J-6B: 28 layers, n_embd 4096, MLP 16384. A rank-r LoRA on a d_in -> d_out linear has
    # r * (d_in + d_out) parameters. Default targets: q, k, v (4096 -> 4096 each),
    # fc_in (4096 -> 16384), fc_out (16384 -> 4096):
    # 28 * 32 * (3 * 8192 + 2 * 20480) = 28 * 32 * 65536 = 58,720,256.
    L, r, C, F_ = 28, 32, 4096, 16384
    expected = L * r * (3 * (C + C) + 2 * (C + F_))
    assert expected == 58_720_256
    trainable, total = meta_count("gptj-6b", "lora")
    assert trainable == expected
    # base: embedding + 28 * (ln_1, q/k/v/out without bias, fc_in/fc_out with bias) + ln_f +
    # lm_head (bias)
    V = 50400
    assert total - trainable == (V * C + L * (2 * C + 4 * C * C + 2 * C * F_ + F_ + C) + 2 * C
                                 + C * V + V)


def test_llama_7b_dora_ia3_trainable_counts():
    """LLaMA-7B: 32 layers, n_embd 4096, MLP 11008. DoRA = LoRA (r=32 on q, k, v, up, down) + one
    magnitude per output row; IA3 = a scale per output of k and v and per input of down."""
    L, r, C, M = 32, 32, 4096, 11008
    lora = L * r * (3 * (C + C) + (C + M) + (M + C))
    assert lora == 56_098_816  # the LoRA row of README's table
    assert meta_count("llama-7b", "dora", r=32)[0] == lora + L * (3 * C + M + C) == 56_975_360
    assert meta_count("llama-7b", "ia3") == (L * (C + C + M), 6_738_415_616 + 614_400)
    assert L * (C + C + M) == 614_400


def test_llama_7b_ia3_count_is_pefts():
    """PEFT's own count on a LLaMA-7B on the meta device (no memory): the same 614,400."""
    import peft
    import transformers as tf
    with torch.device("meta"):
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32000, hidden_size=4096,
                                                intermediate_size=11008, num_hidden_layers=32,
                                                num_attention_heads=32))
    pm = peft.get_peft_model(hf, peft.IA3Config(task_type="CAUSAL_LM"))
    assert pm.get_nb_trainable_parameters() == (614_400, 6_738_415_616 + 614_400)


# ----------------------------------------------------------------------------------- clear errors
def test_errors_on_add():
    model = tiny_model("llama")
    with pytest.raises(ValueError,
                       match="unknown adapter kind 'adalora'; "
                             "kinds: lora, series, parallel, prefix"):
        A.add_adapter(model, "adalora")
    with pytest.raises(ValueError, match=r"lora adapter has no option\(s\) \['bottleneck'\]"):
        A.add_adapter(model, "lora", bottleneck=8)
    with pytest.raises(ValueError, match=r"prompt adapter has no option\(s\) \['reparam'\]"):
        A.add_adapter(model, "prompt", reparam=8)
    with pytest.raises(ValueError,
                       match=r"target_modules: unknown linear name\(s\) \['qkv'\] for llama; "
                             r"known: .*'down_proj'.*'q_proj'"):
        A.add_adapter(model, "lora", target_modules=["q_proj", "qkv"])
    with pytest.raises(ValueError, match=r"per_linear: unknown linear name\(s\) \['fc_in'\]"):
        A.add_adapter(model, "parallel", per_linear=["fc_in"])
    with pytest.raises(ValueError, match="placement='ffn': expected one of"):
        A.add_adapter(model, "series", placement="ffn")
    with pytest.raises(ValueError, match="non_linearity='swish': expected one of"):
        A.add_adapter(model, "parallel", non_linearity="swish")
    with pytest.raises(ValueError, match="scaling='big'"):
        A.add_adapter(model, "series", scaling="big")
    with pytest.raises(ValueError, match="r=0: expected a positive integer"):
        A.add_adapter(model, "lora", r=0)
    assert A.adapter_names(model) == [] and not list(slots(model))  # nothing was attached


def test_failed_add_leaves_the_model_as_it_was():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown linear name"):
        A.add_adapter(model, "lora", target_modules=["q_proj", "nope"])
    assert all(p.requires_grad for p in model.parameters())  # not frozen by the failed call
    assert A.adapter_names(model) == [] and not list(slots(model))
    with pytest.raises(ValueError, match="sparse=1"):
        A.add_adapter(model, "series", sparse=1)


def test_remove_adapter_restores_the_base():
    base = tiny_model("gptj").eval()
    x = torch.randint(0, base.config.vocab_size, (2, 7))
    ref, _ = base(x)
    model = A.add_adapter(A.add_adapter(tiny_model("gptj").eval(), "lora", name="a"),
                          "series", name="b")
    randomize_adapters_(model)
    A.remove_adapter(model, "a")
    assert A.adapter_names(model) == ["b"] and all(lin.adapter is None for lin in model.modules()
                                                   if isinstance(lin, Linear))
    A.remove_adapter(model, "b")
    assert torch.equal(model(x)[0], ref) and not list(slots(model))
    with pytest.raises(ValueError, match="no adapter named"):
        A.remove_adapter(model, "b")


# ----------------------------------------------------------------------------- fp32 adapter maths
@pytest.mark.parametrize("sid", ["lora", "series-learned", "parallel-both", "parallel-per-linear",
                                 "series-sparse", "prefix-reparam", "prefix-gated", "prompt"])
def test_bf16_base_fp32_adapters(sid):
    model = tiny_model("llama").to(torch.bfloat16)
    idx = ids(model)
    base = logits(model, idx)
    kind, o = spec("llama", sid)
    A.add_adapter(model, kind, **o)
    params = adapter_params(model)
    assert params and all(p.dtype == torch.float32 for p in params.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in params)
    model.eval()
    out = logits(model, idx)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    if sid in EXACT:
        assert torch.equal(out, base)
    model.train()
    sparse_step(model, 0)
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    grads = [p.grad for p in params.values() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


def test_adapters_are_fp32_when_the_default_dtype_is_bf16():
    # loaders may build models under torch.set_default_dtype(torch.bfloat16): new adapter tensors
    # are still fp32
    model = tiny_model("llama").to(torch.bfloat16)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for sid in ["lora", "series-learned", "parallel-per-linear", "prefix-reparam", "prompt"]:
            kind, o = spec("llama", sid)
            A.add_adapter(model, kind, name=sid, **o)
    finally:
        torch.set_default_dtype(old)
    sids = ["lora", "series-learned", "parallel-per-linear", "prefix-reparam", "prompt"]
    assert A.adapter_names(model) == sids
    assert all(p.dtype == torch.float32 for p in adapter_params(model).values())
    assert logits(model.eval(), ids(model)).dtype == torch.bfloat16


def test_lora_runs_in_fp32_under_autocast():
    model = tiny_model("llama")
    A.add_adapter(model, "lora")
    randomize_adapters_(model)
    model.eval()
    seen = {}
    q = model.layers[0].attn.q_proj
    q.register_forward_hook(lambda m, i, o: seen.__setitem__("base_out", o.dtype))
    q.adapter["default"].lora_A.register_forward_hook(
        lambda m, i, o: seen.__setitem__("lora_in", i[0].dtype))
    q.adapter["default"].lora_B.register_forward_hook(
        lambda m, i, o: seen.__setitem__("lora_out", o.dtype))
    idx = ids(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model, idx)
    assert seen == {"base_out": torch.bfloat16, "lora_in": torch.float32, "lora_out": torch.float32}
    assert out.dtype == torch.bfloat16
    assert (out.float() - logits(model, idx)).abs().max() < 0.1  # same model, bf16 rounding only


def test_bottleneck_runs_in_fp32_under_autocast():
    model = tiny_model("llama")
    A.add_adapter(model, "series", bottleneck=8)
    seen = []
    b = model.layers[0].post_mlp["default"]
    act = b.act
    # sees down(x): its dtype is the maths' dtype
    b.act = lambda z: (seen.append(z.dtype), act(z))[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model.eval(), ids(model))
    assert seen == [torch.float32] and out.dtype == torch.bfloat16


@pytest.mark.parametrize("device, dtype, expected", [
    ("cuda", torch.bfloat16, "high"),
    ("cuda:1", torch.float16, "high"),
    ("cuda", torch.float32, "highest"),
    ("cpu", torch.bfloat16, "highest"),
])
def test_fast_fp32_matmuls_only_beside_a_half_precision_cuda_base(device, dtype, expected):
    """The flag needs no GPU to be set: TF32 for the fp32 adapter maths on CUDA with a bf16/fp16
    base, else exact."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        A.fast_fp32_matmuls(device, dtype)
        assert torch.get_float32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("sid", ["lora", "series-mlp", "parallel-per-linear"])
def test_whole_model_cast_after_add(sid):
    """model.to(bf16) after add_adapter makes the adapters bf16 too; their maths then runs in
    bf16."""
    kind, o = spec("llama", sid)
    model = A.add_adapter(tiny_model("llama"), kind, **o).to(torch.bfloat16)
    logits, loss = model(torch.randint(0, 512, (2, 6)), torch.randint(0, 512, (2, 6)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)


# ------------------------------------------------------------------------------ the registry: KINDS
def positional_kind_calls(source):
    """The Kind(...) calls in `source` that pass a field by position (line numbers)."""
    return [n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
            and getattr(n.func, "id", None) == "Kind" and n.args]


def test_every_kind_is_a_complete_entry_with_named_fields():
    """Each KINDS entry is a Kind: its options with their defaults, where it goes, how it is built,
    and an optional check and finish; adapters.py writes every entry with its field names."""
    assert A.Kind._fields == ("defaults", "places", "make", "check", "finish")
    assert list(A.KINDS) == ["lora", "series", "parallel", "prefix", "prompt", "dora", "ia3"]
    for kind, entry in A.KINDS.items():
        assert isinstance(entry, A.Kind), kind
        assert isinstance(entry.defaults, dict) and entry.defaults, kind
        assert callable(entry.places) and callable(entry.make), kind
        assert all(f is None or callable(f) for f in (entry.check, entry.finish)), kind
    # the kinds with a training form to fold after training (MoSA parts, a reparameterised prefix)
    assert {k for k, e in A.KINDS.items() if e.finish} == {"series", "parallel", "prefix"}
    source = inspect.getsource(A)
    assert source.count("] = Kind(defaults=") == len(A.KINDS)
    assert positional_kind_calls(source) == []
    assert positional_kind_calls("k = Kind(dict(r=1), places, make)") == [1]  # the check can fail


def test_each_kind_sits_beside_its_class():
    """adapters.py reads kind by kind: each KINDS entry comes after its module class and before the
    next kind's class."""
    lines = inspect.getsource(A).splitlines()
    where = {k: next(i for i, line in enumerate(lines) if line.startswith(f'KINDS["{k}"] ='))
             for k in A.KINDS}
    classes = {"lora": A.LoRA, "series": A.Bottleneck, "parallel": A.Bottleneck,
               "prefix": A.Prefix, "prompt": A.Prompt, "dora": A.DoRA, "ia3": A.IA3}
    starts = {k: inspect.getsourcelines(c)[1] - 1 for k, c in classes.items()}
    for kind in A.KINDS:
        later = [s for s in starts.values() if s > starts[kind]]
        assert starts[kind] < where[kind] < min(later, default=len(lines)), kind


# ----------------------------------------------------- docs/adapters.md: the tables and the example
def docs_section(title):
    text = (ROOT / "docs" / "adapters.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_docs_tables_name_every_kind_and_slot():
    text = (ROOT / "docs" / "adapters.md").read_text()
    for kind in A.KINDS:
        assert f"| `{kind}` |" in text, kind
    for slot in SLOT_TYPES:
        assert f".{slot}`" in text, slot


def test_docs_worked_example_is_the_code():
    """The IA3 class, its helpers and its KINDS entry are in docs/adapters.md verbatim: no drift."""
    section = docs_section("Adding an adapter")
    for obj in (A.IA3, A.ia3_targets, A._check_ia3, A._ia3_places, A._make_ia3):
        assert inspect.getsource(obj).rstrip() in section, obj.__name__
    entry = re.search(r"^# None: k, v \(BLOOM.*?check=_check_ia3\)\n", inspect.getsource(A),
                      re.S | re.M)[0]
    assert entry in section


def test_docs_example_test_runs(tmp_path):
    block = re.search(r"```python\n(import torch, adapters as A.*?)```",
                      docs_section("Adding an adapter"), re.S)[1]
    scope = {}
    exec(compile(block, "docs/adapters.md", "exec"), scope)
    scope["test_ia3"](tmp_path)
