"""adapters.py: every kind and placement on tiny models of each family, training, save/load, LoRA
merge, MoSA sparse split & join, composition under names, PEFT interop, exact 7B parameter counts,
error messages, fp32 adapter maths.

Models come from conftest.tiny_model (our tiny presets, every weight randomised so no weight is a
no-op) and, for PEFT parity, from conftest.make_hf_checkpoint (a transformers model written with
save_pretrained). peft and transformers are imported inside the tests that need them, so the rest
of the file stays fast.
"""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters as A
from conftest import left_pad, make_hf_checkpoint, tiny_model
from checkpoints import load_model
from generate import generate
from model import Config, Linear, Transformer

# transformers/peft
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

FAMILIES = ("llama", "gptj", "bloom", "opt")
MAIN = ("llama", "gptj")  # the families the paper fine-tunes; the costlier tests run on these
# adapter, post_attn, post_mlp, beside_attn, beside_mlp, prefix, prompt
SLOT_ATTRS = set(A.SLOT_TYPES)

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


def spec(family, sid):
    kind, o = SPECS[sid]
    swap = {"TARGETS": TARGETS[family], "PER_LINEAR": PER_LINEAR[family]}
    return kind, {k: swap.get(v, v) if isinstance(v, str) else v for k, v in o.items()}


# ------------------------------------------------------------------------------------------ helpers
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


def in_slot(name):
    return any(part in SLOT_ATTRS for part in name.split("."))


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if in_slot(n)}


def base_tensors(model):
    """Every base parameter and buffer, cloned."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not in_slot(n)}
    out.update({n: b.clone() for n, b in model.named_buffers() if not in_slot(n)})
    return out


@torch.no_grad()
def randomize_adapters_(model, std=0.1, seed=0):
    """Give every adapter tensor random values, so that a branch starting at zero contributes."""
    g = torch.Generator().manual_seed(seed)
    for _, p in adapter_params(model).items():
        p.copy_(torch.randn(p.shape, generator=g) * std)
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
        A.sparse_step(model, step)
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(model(idx[:, :-1], targets=idx[:, 1:])[1].item())
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
    return {(m, a) for m, a, s in A.slots(model) if name in s}


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


def splits(model):
    return [m for m in model.modules() if isinstance(m, A.Split)]


def dense(split):
    """The full weight a Split stands for, rebuilt from its parts (independently of
    Split.weight)."""
    w = torch.zeros(split.part.shape)
    for k, p in enumerate(split.parts):
        w[split.part == k] = p.detach()
    return w


# ----------------------------------------------------------------------- identity at initialisation
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


# -------------------------------------------------------------------------------- prefix and prompt
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


# ------------------------------------------------------------------------------------- trainability
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


# ------------------------------------------------------------------------------------ save and load
@pytest.mark.parametrize("family, sid", CASES)
def test_save_load_identical_logits(family, sid, tmp_path):
    model = tiny_model(family)
    kind, o = spec(family, sid)
    A.add_adapter(model, kind, **o)
    # every tensor non-zero (a sparse run trains only some parts) ...
    randomize_adapters_(model, std=0.05)
    train(model, steps=2)  # ... and then trained
    A.save_adapter(model, tmp_path, base_model="tiny")
    fresh = A.load_adapter(tiny_model(family), tmp_path).eval()
    assert fresh.adapter_configs == model.adapter_configs
    idx = ids(model)
    _, pidx, pmask = padded_batch(model)
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    assert torch.equal(logits(fresh, pidx, attention_mask=pmask),
                       logits(model, pidx, attention_mask=pmask))


def test_adapter_config_json(tmp_path):
    model = tiny_model("llama-gqa")
    A.add_adapter(model, "series", name="math", placement="both", bottleneck=16, scaling="learned")
    extra = {"dataset": "math_10k", "step": 3}
    A.save_adapter(model, tmp_path, name="math", base_model="yahma/llama-7b-hf", extra=extra)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    c = model.config
    assert cfg == {
        "kind": "series", "name": "math", "base_model": "yahma/llama-7b-hf", "extra": extra,
        "options": {"bottleneck": 16, "reduction": 0, "placement": "both", "non_linearity": "tanh",
                    "scaling": "learned", "dropout": 0.0, "sparse": 0, "residual": True},
        "base": {"arch": "llama", "vocab_size": c.vocab_size, "n_layer": 2, "n_head": 4,
                 "n_kv_head": 2, "n_embd": 64, "head_dim": 16,
                 "intermediate_size": c.intermediate_size}}
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    # the adapter's name is not in the keys
    assert keys == {f"layers.{i}.{s}.{w}" for i in range(2) for s in ("post_attn", "post_mlp")
                    for w in ("down.weight", "up.weight", "scaling")}
    # extra is read back, and the name comes from the file unless one is given
    assert A.read_adapter_config(tmp_path)["extra"]["step"] == 3
    assert A.adapter_names(A.load_adapter(tiny_model("llama-gqa"), tmp_path)) == ["math"]
    assert A.adapter_names(
        A.load_adapter(tiny_model("llama-gqa"), tmp_path, name="other")) == ["other"]


def test_loaded_adapter_follows_the_model_mode(tmp_path):
    # an adapter added to (or loaded into) a model in eval mode must not run its dropout
    model = tiny_model("llama")
    A.add_adapter(model, "lora", dropout=0.5)
    randomize_adapters_(model)
    model.eval()
    A.save_adapter(model, tmp_path)
    # from_pretrained-style: base already in eval mode
    fresh = A.load_adapter(tiny_model("llama"), tmp_path)
    assert not any(m.training for m in fresh.modules())
    idx = ids(model)
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    assert torch.equal(generate(fresh, idx, 4), generate(model, idx, 4))


# --------------------------------------------------------------------------------------- LoRA merge
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


# -------------------------------------------------------------------------------- MoSA split & join
@pytest.mark.parametrize("sid", ["series-sparse", "parallel-sparse", "parallel-per-linear-sparse"])
def test_sparse_step_trains_only_the_active_part(sid):
    model = tiny_model("llama")
    kind, o = spec("llama", sid)
    A.add_adapter(model, kind, **{**o, "sparse": 4})
    sp = splits(model)
    assert sp and all(s.n == 4 for s in sp)
    for s in sp:  # disjoint parts that cover the weight, of (almost) equal size
        counts = torch.bincount(s.part.flatten().long(), minlength=4)
        assert counts.sum() == s.part.numel() and counts.max() - counts.min() <= 1
        assert [p.numel() for p in s.parts] == counts.tolist()
    idx = ids(model, B=4, T=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ups = {id(b.up) for b in model.modules() if isinstance(b, A.Bottleneck)}
    seen = set()
    for step in range(4):
        A.sparse_step(model, step)
        active = sp[0].active
        seen.add(active)
        assert all(s.active == active for s in sp)
        before = [dense(s) for s in sp]
        # training runs only the active part, scaled by n (as inverted dropout)
        for s, w in zip(sp, before):
            assert torch.equal(s.weight, torch.where(s.part == active, w * 4, torch.zeros(())))
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        for s, w in zip(sp, before):
            changed = dense(s) != w
            assert not (changed & (s.part != active)).any(), (
                f"step {step}: entries outside part {active} moved")
            if step > 0 or id(s) in ups:  # (down gets no gradient while up is still zero)
                assert changed.any(), f"step {step}: the active part did not train"
    assert len(seen) > 1
    model.eval()  # in eval all parts together are the weight
    assert all(torch.equal(s.weight, dense(s)) for s in sp)


def test_sparse_step_is_a_function_of_the_step():
    a, b = tiny_model("llama"), tiny_model("llama")
    for m in (a, b):
        A.add_adapter(m, "parallel", bottleneck=8, sparse=4)
    picks = []
    for step in range(12):
        # the global RNG must not matter (a resumed run has another state)
        torch.manual_seed(1000 + step)
        A.sparse_step(a, step)
        torch.manual_seed(7)
        A.sparse_step(b, step)
        assert splits(a)[0].active == splits(b)[0].active
        picks.append(splits(a)[0].active)
    assert len(set(picks)) > 1 and all(0 <= k < 4 for k in picks)
    c = tiny_model("llama")
    A.add_adapter(c, "parallel", bottleneck=8, sparse=4)
    A.sparse_step(c, 5)  # resuming at step 5 picks what the uninterrupted run picked at step 5
    assert splits(c)[0].active == picks[5]


@pytest.mark.parametrize("sid", ["series-sparse", "parallel-sparse", "parallel-per-linear-sparse"])
def test_join_sparse(sid, tmp_path):
    model = tiny_model("llama")
    kind, o = spec("llama", sid)
    A.add_adapter(model, kind, **o)
    train(model, steps=6)
    idx = ids(model)
    _, pidx, pmask = padded_batch(model)
    before, before_pad = logits(model, idx), logits(model, pidx, attention_mask=pmask)
    shapes = [(b.down.part.shape, b.up.part.shape) for b in model.modules()
              if isinstance(b, A.Bottleneck)]
    A.join_sparse(model)
    assert not splits(model)
    assert not any(".part" in n or ".parts." in n for n in model.state_dict())
    bottlenecks = [b for b in model.modules() if isinstance(b, A.Bottleneck)]
    for b, (down, up) in zip(bottlenecks, shapes):
        assert type(b.down) is nn.Linear and type(b.up) is nn.Linear
        assert b.down.bias is None and b.up.bias is None
        assert (b.down.weight.shape, b.up.weight.shape) == (down, up) and down[0] == up[1] == 16
        assert b.down.weight.requires_grad and b.up.weight.requires_grad
    assert model.adapter_configs["default"]["options"]["sparse"] == 0
    assert torch.equal(logits(model, idx), before)
    assert torch.equal(logits(model, pidx, attention_mask=pmask), before_pad)
    A.save_adapter(model, tmp_path)
    fresh = A.load_adapter(tiny_model("llama"), tmp_path).eval()
    assert not splits(fresh)
    assert torch.equal(logits(fresh, idx), before)
    losses = train(model, steps=2)  # the merged adapter keeps training as a plain one
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------- composition, names
def test_two_named_adapters(tmp_path):
    model = tiny_model("llama")
    idx = ids(model)
    base = logits(model, idx)
    A.add_adapter(model, "lora", name="a", r=4)
    randomize_adapters_(model, seed=1)
    only_a = logits(model.eval(), idx)
    A.add_adapter(model, "series", name="b", bottleneck=8)
    with torch.no_grad():  # give b a non-zero branch
        for _, _, s in A.slots(model):
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
    A.save_adapter(model, tmp_path / "a", name="a")
    A.save_adapter(model, tmp_path / "b", name="b")
    fresh = A.load_adapter(tiny_model("llama"), tmp_path / "a").eval()
    assert A.adapter_names(fresh) == ["a"] and torch.equal(logits(fresh, idx), only_a)
    A.load_adapter(fresh, tmp_path / "b").eval()
    assert torch.equal(logits(fresh, idx), both)
    with pytest.raises(ValueError, match=r"no adapter named \['c'\]; attached: \['a', 'b'\]"):
        A.set_active(model, ["a", "c"])
    with pytest.raises(ValueError, match="already attached"):
        A.add_adapter(model, "prefix", name="a")
    with pytest.raises(ValueError, match="already attached"):
        A.load_adapter(fresh, tmp_path / "b")


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


# ------------------------------------------------------------------------------------- PEFT interop
PEFT_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"],
                "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
                "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}


def peft_lora(hf_model, seed=0, **config):
    """A PEFT LoRA on hf_model (wrapped in place) with random lora_B, in eval mode."""
    import peft
    model = peft.get_peft_model(hf_model, peft.LoraConfig(task_type="CAUSAL_LM", **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def unwrap(peft_model):
    """Take the LoRA layers out again, so the transformers model can be wrapped anew."""
    return peft_model.unload()


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_loads_here(family, hf_base, tmp_path):
    ckpt, hf = hf_base(family)
    pm = peft_lora(hf, r=4, lora_alpha=12, lora_dropout=0.1, target_modules=PEFT_TARGETS[family])
    try:
        idx = ids(hf, B=2, T=7)
        with torch.no_grad():
            ref = pm(idx).logits
        pm.save_pretrained(tmp_path / "st")
        pm.save_pretrained(tmp_path / "bin", safe_serialization=False)
    finally:
        unwrap(pm)
    assert (tmp_path / "st" / "adapter_model.safetensors").exists()
    folders = [tmp_path / "st"]
    if (tmp_path / "bin" / "adapter_model.bin").exists():  # peft still writes .bin when asked
        folders.append(tmp_path / "bin")
    for folder in folders:
        ours = A.load_adapter(load_model(ckpt), folder).eval()
        o = ours.adapter_configs["default"]["options"]
        assert (o["r"], o["alpha"], o["dropout"]) == (4, 12, 0.1)
        assert sorted(o["target_modules"]) == sorted(PEFT_TARGETS[family])
        assert (logits(ours, idx) - ref).abs().max() < 1e-4, folder.name
    base = logits(load_model(ckpt), idx)
    assert (base - ref).abs().max() > 1e-2  # the LoRA matters


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_export_loads_in_peft(family, hf_base, tmp_path):
    import peft
    ckpt, hf = hf_base(family)
    ours = load_model(ckpt)
    A.add_adapter(ours, "lora", r=8, alpha=16, dropout=0.0)
    randomize_adapters_(ours, std=0.05)
    ours.eval()
    idx = ids(ours, B=2, T=7)
    want = logits(ours, idx)
    A.save_adapter(ours, tmp_path, format="peft", base_model="tiny-hf")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == sorted(A.default_targets(ours.config))
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    try:
        with torch.no_grad():
            got = pm(idx).logits
    finally:
        unwrap(pm)
    assert (got - want).abs().max() < 1e-4
    assert (logits(load_model(ckpt), idx) - want).abs().max() > 1e-2  # the LoRA matters
    back = A.load_adapter(load_model(ckpt), tmp_path).eval()  # and our own export loads here
    assert torch.equal(logits(back, idx), want)


def test_peft_rslora_scaling(hf_base, tmp_path):
    ckpt, hf = hf_base("llama")
    pm = peft_lora(hf, r=4, lora_alpha=8, use_rslora=True,
                   target_modules=["q_proj", "v_proj", "down_proj"])
    try:
        idx = ids(hf, B=2, T=7)
        with torch.no_grad():
            ref = pm(idx).logits
        pm.save_pretrained(tmp_path)
    finally:
        unwrap(pm)
    ours = A.load_adapter(load_model(ckpt), tmp_path).eval()
    loras = [m for m in ours.modules() if isinstance(m, A.LoRA)]
    # alpha/sqrt(r), not alpha/r
    assert len(loras) == 6 and all(math.isclose(m.scale, 8 / math.sqrt(4)) for m in loras)
    assert (logits(ours, idx) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "llama-gqa"])
def test_peft_adaption_prompt_loads_as_gated_prefix(family, tmp_path):
    """PEFT's LLaMA-Adapter (adaption_prompt) folder loads as our gated prefix, with the same
    logits."""
    import peft
    ckpt, hf = make_hf_checkpoint(tmp_path / "base", family, seed=3)
    pm = peft.get_peft_model(hf, peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4,
                                                           adapter_layers=1))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "adaption_gate" in n:
                p.fill_(0.8)  # open the zero-initialised gate
    pm.eval()
    idx = ids(hf, B=2, T=7)
    with torch.no_grad():
        ref = pm(idx).logits
    pm.save_pretrained(tmp_path / "adapter")
    ours = A.load_adapter(load_model(ckpt), tmp_path / "adapter").eval()
    assert ours.adapter_configs["default"]["options"] == dict(num_virtual_tokens=4, reparam=0,
                                                              gated=True, layers=1)
    assert attached(ours, "default") == {(f"layers.{ours.config.n_layer - 1}.attn", "prefix")}
    assert (logits(ours, idx) - ref).abs().max() < 1e-4
    assert (logits(load_model(ckpt), idx) - ref).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("config, message", [
    (dict(bias="all"), r"only plain PEFT LoRA \(bias='none'\).*bias=all"),
])
def test_peft_unsupported_configs_raise(config, message, hf_base, tmp_path):
    ckpt, hf = hf_base("llama")
    pm = peft_lora(hf, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **config)
    try:
        pm.save_pretrained(tmp_path)
    finally:
        unwrap(pm)
    with pytest.raises(ValueError, match=message):
        A.load_adapter(load_model(ckpt), tmp_path)


# -------------------------------------------------------------------- exact 7B trainable parameters
def meta_count(preset, kind, **options):
    with torch.device("meta"):
        model = Transformer(Config.from_name(preset))
        A.add_adapter(model, kind, **options)
    return A.count_parameters(model)


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


# ------------------------------------------------------------------------------------- clear errors
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
    assert A.adapter_names(model) == [] and not list(A.slots(model))  # nothing was attached


def test_errors_on_save_and_load(tmp_path):
    model = tiny_model("llama")
    A.add_adapter(model, "series", bottleneck=8)
    with pytest.raises(ValueError, match="format='peft' writes lora, dora, ia3 adapters only, "
                                         "'default' is series"):
        A.save_adapter(model, tmp_path / "peft", format="peft")
    with pytest.raises(ValueError, match="format='onnx'"):
        A.save_adapter(model, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match=r"no adapter named 'nope'"):
        A.save_adapter(model, tmp_path / "x", name="nope")
    A.save_adapter(model, tmp_path / "ok")
    # onto another base model: other width, other family
    with pytest.raises(ValueError, match=r"trained on another base model.*n_embd"):
        A.load_adapter(tiny_model("llama", n_embd=32), tmp_path / "ok")
    with pytest.raises(ValueError,
                       match=r"trained on another base model.*'arch': \('llama', 'gptj'\)"):
        A.load_adapter(tiny_model("gptj"), tmp_path / "ok")
    # tensors that do not match the config
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    for case, bad, message in [
            ("missing", {k: v for k, v in state.items() if k != "layers.1.post_mlp.up.weight"},
             r"missing \['layers\.1\.post_mlp\.up\.weight'\], unexpected \[\]"),
            ("unexpected", {**state, "layers.1.post_attn.up.weight": torch.zeros(64, 8)},
             r"missing \[\], unexpected \['layers\.1\.post_attn\.up\.weight'\]")]:
        folder = tmp_path / case
        folder.mkdir()
        (folder / "adapter_config.json").write_text(
            (tmp_path / "ok" / "adapter_config.json").read_text())
        save_file(bad, folder / "adapter_model.safetensors")
        with pytest.raises(KeyError, match="adapter tensors do not match: " + message):
            A.load_adapter(tiny_model("llama"), folder)
    folder = tmp_path / "shape"
    folder.mkdir()
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    cfg["options"]["bottleneck"] = 4
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"has shape \(8, 64\), this model expects \(4, 64\)"):
        A.load_adapter(tiny_model("llama"), folder)
    # no adapter_config.json; config but no tensors
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter_config.json: cannot read the adapter config"):
        A.load_adapter(tiny_model("llama"), tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text(
        (tmp_path / "ok" / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError,
                       match="no adapter_model.safetensors or adapter_model.bin"):
        A.load_adapter(tiny_model("llama"), tmp_path / "empty")


# ------------------------------------------------------------------------------- fp32 adapter maths
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
    A.sparse_step(model, 0)
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


def test_failed_add_leaves_the_model_as_it_was():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown linear name"):
        A.add_adapter(model, "lora", target_modules=["q_proj", "nope"])
    assert all(p.requires_grad for p in model.parameters())  # not frozen by the failed call
    assert A.adapter_names(model) == [] and not list(A.slots(model))
    with pytest.raises(ValueError, match="sparse=1"):
        A.add_adapter(model, "series", sparse=1)


def test_failed_load_leaves_the_model_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file
    src = A.add_adapter(tiny_model("llama"), "lora", r=4)
    A.save_adapter(src, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    state.pop(next(iter(state)))
    save_file(state, tmp_path / "adapter_model.safetensors")
    model = tiny_model("llama")
    with pytest.raises(KeyError, match="missing"):
        A.load_adapter(model, tmp_path)
    assert A.adapter_names(model) == [] and not list(A.slots(model))


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
    assert torch.equal(model(x)[0], ref) and not list(A.slots(model))
    with pytest.raises(ValueError, match="no adapter named"):
        A.remove_adapter(model, "b")


@pytest.mark.parametrize("sid", ["lora", "series-mlp", "parallel-per-linear"])
def test_whole_model_cast_after_add(sid):
    """model.to(bf16) after add_adapter makes the adapters bf16 too; their maths then runs in
    bf16."""
    kind, o = spec("llama", sid)
    model = A.add_adapter(tiny_model("llama"), kind, **o).to(torch.bfloat16)
    logits, loss = model(torch.randint(0, 512, (2, 6)), torch.randint(0, 512, (2, 6)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
