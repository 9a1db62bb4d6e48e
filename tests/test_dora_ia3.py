"""adapters.py's DoRA and IA3 kinds: a fresh adapter is the base bit for bit, the forward is the
paper's formula, training moves only the adapter, merge = unmerged and unmerge restores W, save ->
load, PEFT parity both ways (LoraConfig(use_dora=True), IA3Config) on every family, gradients equal
PEFT's, 7B parameter counts, README's worked example.

Models: conftest.tiny_model (our tiny presets, randomised) and conftest's hf_base (transformers
checkpoints written with save_pretrained) for PEFT, imported inside the tests that need it.
"""
import json
import re

import pytest
import torch
import torch.nn.functional as F

import adapters as A
from checkpoints import load_model
from conftest import left_pad, tiny_model
from model import Config, Linear, Transformer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

FAMILIES = ("llama", "llama-gqa", "gptj", "bloom", "opt")
KINDS = ("dora", "ia3")
OPTIONS = {"dora": dict(r=4, alpha=8, dropout=0.0), "ia3": {}}  # ia3 on its default targets
MLP_OUT = {"llama": "down_proj", "llama-gqa": "down_proj", "gptj": "fc_out",
           "bloom": "dense_4h_to_h", "opt": "fc2"}
PARITY = 1e-5  # fp32 logits, ours vs PEFT


# ------------------------------------------------------------------------------------------ helpers
def ids(model, B=2, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


@torch.no_grad()
def logits(model, idx, **kw):
    return model(idx, **kw)[0]


def modules(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def adapted_linears(model):
    """{name: Linear} of every projection that carries an adapter."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, Linear) and m.adapter is not None}


@torch.no_grad()
def randomize_(model, seed=0):
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


# ---------------------------------------------------------------------------- identity at step 0
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_equals_base_exactly(family, kind):
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
    randomize_(model)  # the adapter is really in the forward path
    assert (logits(model, idx) - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_default_places(family):
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


@pytest.mark.parametrize("kind", KINDS)
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
    randomize_(model)
    lin = model.layers[0].mlp.down_proj
    x = torch.randn(3, lin.in_features)
    lora, ia3 = lin.adapter["lora"], lin.adapter["ia3"]
    with torch.no_grad():
        want = F.linear(x * ia3.ia3_l, lin.weight) + F.linear(x, lora.delta())
        assert (lin(x) - want).abs().max() < 1e-5


# ---------------------------------------------------------------------------- training and merging
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trains_only_the_adapter(family, kind):
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_on_a_quantized_base(mode, kind):
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_unmerged_and_unmerge_restores(family, kind):
    model = randomize_(A.add_adapter(tiny_model(family), kind, **OPTIONS[kind]))
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_save_load_identical_logits(family, kind, tmp_path):
    model = randomize_(A.add_adapter(tiny_model(family), kind, **OPTIONS[kind])).eval()
    A.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["kind"] == kind
    fresh = A.load_adapter(tiny_model(family), tmp_path)
    idx = ids(model)
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    assert not any("merged_norm" in k for k in A.adapter_state(model, "default"))  # not saved


# ----------------------------------------------------------------------------------- PEFT interop
def peft_model(hf, kind, **config):
    """hf wrapped in a PEFT DoRA (LoraConfig(use_dora=True)) or IA3, away from its identity."""
    import peft
    if kind == "dora":
        pc = peft.LoraConfig(task_type="CAUSAL_LM", use_dora=True, **config)
    else:
        pc = peft.IA3Config(task_type="CAUSAL_LM", **config)
    return randomize_(peft.get_peft_model(hf, pc), seed=1).eval()


# PEFT targets for the PEFT -> ours direction: DoRA on every projection; IA3 on PEFT's own defaults
# (GPT-J: q, v, fc_out; OPT: q, k, fc2; BLOOM: query_key_value and "mlp.dense_4h_to_h"), not ours
ALL_LINEARS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"],
               "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
               "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
               "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
ALL_LINEARS["llama-gqa"] = ALL_LINEARS["llama"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_folder_loads_here(family, kind, hf_base, tmp_path):
    ckpt, hf = hf_base(family)
    dora = dict(r=4, lora_alpha=12, target_modules=ALL_LINEARS[family])
    pm = peft_model(hf, kind, **(dora if kind == "dora" else {}))
    try:
        idx = ids(load_model(ckpt), B=2, T=7)
        with torch.no_grad():
            ref = pm(idx).logits
        pm.save_pretrained(tmp_path)
        n_peft = pm.get_nb_trainable_parameters()[0]
    finally:
        pm.unload()
    ours = A.load_adapter(load_model(ckpt), tmp_path).eval()
    cfg = ours.adapter_configs["default"]
    assert cfg["kind"] == kind
    if kind == "ia3":
        peft_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        assert cfg["options"]["feedforward_modules"] == [MLP_OUT[family]]
        names = sorted(t.rsplit(".")[-1] for t in peft_cfg["target_modules"])
        assert sorted(cfg["options"]["target_modules"]) == names
    assert A.count_parameters(ours)[0] == n_peft  # print_trainable_parameters' count
    diff = (logits(ours, idx) - ref).abs().max()
    assert diff < PARITY, diff
    assert (logits(load_model(ckpt), idx) - ref).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_our_peft_export_loads_in_peft(family, kind, hf_base, tmp_path):
    """ours -> PEFT folder -> PEFT: the same logits; and the folder loads back here bit for bit."""
    import peft
    ckpt, hf = hf_base(family)
    ours = randomize_(A.add_adapter(load_model(ckpt), kind, **OPTIONS[kind])).eval()
    idx = ids(ours, B=2, T=7)
    want = logits(ours, idx)
    A.save_adapter(ours, tmp_path, format="peft", base_model="tiny-hf")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("LORA" if kind == "dora" else "IA3")
    assert cfg.get("use_dora", False) == (kind == "dora")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    try:
        with torch.no_grad():
            got = pm(idx).logits
    finally:
        pm.unload()
    diff = (got - want).abs().max()
    assert diff < PARITY, diff
    back = A.load_adapter(load_model(ckpt), tmp_path).eval()
    assert torch.equal(logits(back, idx), want)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_equal_peft(kind, hf_base, tmp_path):
    """One backward on the same loss: every adapter tensor's gradient equals PEFT's (DoRA: the norm
    detached as PEFT does; IA3: y + W (x * (l - 1)) has the gradient of W (x * l))."""
    ckpt, hf = hf_base("llama")
    dora = dict(r=4, lora_alpha=8, lora_dropout=0.0)
    pm = peft_model(hf, kind, **(dora if kind == "dora" else {}))
    try:
        pm.save_pretrained(tmp_path)
        ours = A.load_adapter(load_model(ckpt), tmp_path)
        idx = ids(ours, B=2, T=8)
        pm.train()
        pm(idx, labels=idx).loss.backward()  # transformers shifts the labels itself
        theirs = {n.replace(".default", "").replace("vector.weight", "vector"): p.grad
                  for n, p in pm.named_parameters() if p.requires_grad}
    finally:
        pm.unload()
    ours.train()
    ours(idx[:, :-1], targets=idx[:, 1:])[1].backward()
    got = {A._peft_key(ours.config, n.replace(".adapter.default.", ".adapter.")): p.grad
           for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(theirs) and len(got) >= 6
    for k in got:
        assert (got[k] - theirs[k]).abs().max() < 1e-5, k


# ------------------------------------------------------------------ exact 7B trainable parameters
def meta_count(preset, kind, **options):
    with torch.device("meta"):
        model = Transformer(Config.from_name(preset))
        A.add_adapter(model, kind, **options)
    return A.count_parameters(model)


def test_llama_7b_trainable_counts():
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


def test_peft_ia3_regex_feedforward_is_refused(hf_base, tmp_path):
    ckpt, hf = hf_base("llama")
    pm = peft_model(hf, "ia3")
    try:
        pm.save_pretrained(tmp_path)
    finally:
        pm.unload()
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["feedforward_modules"] = ".*down_proj"  # a regular expression, which PEFT also takes
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"only PEFT IA3 with a list of feedforward_modules"):
        A.load_adapter(load_model(ckpt), tmp_path)


# -------------------------------------------------------- README's "Adding an adapter" section
def readme_section():
    from conftest import ROOT
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Adding an adapter"):text.index("## Training")]


def test_readme_worked_example_is_the_code():
    """The IA3 class, its helpers and its KINDS entry are in README.md verbatim: no drift."""
    import inspect
    section = readme_section()
    for obj in (A.IA3, A._ia3_targets, A._check_ia3, A._ia3_places, A._make_ia3):
        assert inspect.getsource(obj).rstrip() in section, obj.__name__
    source = inspect.getsource(A)
    entry = re.search(r"^    # None: k, v \(BLOOM.*?_check_ia3\),\n", source, re.S | re.M)[0]
    assert entry in section


def test_readme_example_test_runs(tmp_path):
    block = re.search(r"```python\n(import torch, adapters as A.*?)```", readme_section(), re.S)[1]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    scope["test_ia3"](tmp_path)
