"""adapter_io.py: adapter folders, ours and Hugging Face PEFT's, both ways. save -> load gives the
same logits for every kind and placement; adapter_config.json's fields; what is saved is what each
adapter module names (adapter_params), for a kind registered at runtime too; save_model leaves every
adapter out; PEFT LoRA, DoRA (LoraConfig(use_dora=True)), IA3 and adaption-prompt folders load here
with PEFT's logits and gradients, and our PEFT export loads in PEFT; clear errors for bad folders.

Models: conftest.tiny_model, and conftest's hf_base / make_hf_checkpoint (transformers checkpoints
written with save_pretrained) for PEFT, which is imported inside the tests that need it.
"""
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import adapter_io as IO
import adapters as A
from checkpoints import load_model, save_model
from conftest import make_hf_checkpoint, saved_lora, tiny_model, truncate
from generate import generate
from slots import find_linears, slots
from test_adapters import (ALL_FAMILIES, CASES, DORA_IA3, FAMILIES, MLP_OUT, OPTIONS, attached,
                           ids, logits, padded_batch, perturb_, randomize_adapters_, spec, train)

# transformers/peft
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PARITY = 1e-5  # fp32 logits, ours vs PEFT (DoRA, IA3)


# ---------------------------------------------------------------------------------- save and load
@pytest.mark.parametrize("family, sid", CASES)
def test_save_load_identical_logits(family, sid, tmp_path):
    model = tiny_model(family)
    kind, o = spec(family, sid)
    A.add_adapter(model, kind, **o)
    # every tensor non-zero (a sparse run trains only some parts) ...
    randomize_adapters_(model, std=0.05)
    train(model, steps=2)  # ... and then trained
    IO.save_adapter(model, tmp_path, base_model="tiny")
    fresh = IO.load_adapter(tiny_model(family), tmp_path).eval()
    assert fresh.adapter_configs == model.adapter_configs
    idx = ids(model)
    _, pidx, pmask = padded_batch(model)
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    assert torch.equal(logits(fresh, pidx, attention_mask=pmask),
                       logits(model, pidx, attention_mask=pmask))


@pytest.mark.parametrize("kind", DORA_IA3)
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_dora_ia3_save_load_identical_logits(family, kind, tmp_path):
    model = perturb_(A.add_adapter(tiny_model(family), kind, **OPTIONS[kind])).eval()
    IO.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["kind"] == kind
    fresh = IO.load_adapter(tiny_model(family), tmp_path)
    idx = ids(model)
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    assert not any("merged_norm" in k for k in A.adapter_state(model, "default"))  # not saved


def test_adapter_config_json(tmp_path):
    model = tiny_model("llama-gqa")
    A.add_adapter(model, "series", name="math", placement="both", bottleneck=16, scaling="learned")
    extra = {"dataset": "math_10k", "step": 3}
    IO.save_adapter(model, tmp_path, name="math", base_model="yahma/llama-7b-hf", extra=extra)
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
    assert IO.read_adapter_config(tmp_path)["extra"]["step"] == 3
    assert A.adapter_names(IO.load_adapter(tiny_model("llama-gqa"), tmp_path)) == ["math"]
    assert A.adapter_names(
        IO.load_adapter(tiny_model("llama-gqa"), tmp_path, name="other")) == ["other"]


def test_loaded_adapter_follows_the_model_mode(tmp_path):
    # an adapter added to (or loaded into) a model in eval mode must not run its dropout
    model = tiny_model("llama")
    A.add_adapter(model, "lora", dropout=0.5)
    randomize_adapters_(model)
    model.eval()
    IO.save_adapter(model, tmp_path)
    # from_pretrained-style: base already in eval mode
    fresh = IO.load_adapter(tiny_model("llama"), tmp_path)
    assert not any(m.training for m in fresh.modules())
    idx = ids(model)
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    assert torch.equal(generate(fresh, idx, 4), generate(model, idx, 4))


class Shift(nn.Module):
    """A kind registered at runtime, as exercises/vera does: y + d on every target. Its own
    adapter_params decide what is saved, not its state_dict: `basis` (drawn at random when built,
    not persistent) is named, so it is saved and loaded; `calls` (persistent) is not."""

    def __init__(self, linear):
        super().__init__()
        self.d = nn.Parameter(torch.zeros(linear.out_features))
        self.register_buffer("basis", torch.randn(linear.out_features), persistent=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def adapter_params(self):
        return ["d", "basis"]

    def forward(self, x, y, linear):
        self.calls += 1
        return y + self.d * self.basis


SHIFT = A.Kind(defaults=dict(target_modules=["v_proj"]),
               places=lambda model, o: [(n, "adapter") for n in find_linears(
                   model, o["target_modules"], "target_modules")],
               make=lambda model, owner, slot, o: Shift(owner))


@pytest.fixture
def shift(monkeypatch):
    monkeypatch.setitem(A.KINDS, "shift", SHIFT)


def test_a_runtime_kind_is_saved_and_loaded_through_its_own_adapter_params(shift, tmp_path):
    from safetensors.torch import load_file
    model = A.add_adapter(tiny_model("llama"), "shift")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Shift):
                m.d.normal_()
    idx = ids(model)
    want = logits(model, idx)
    IO.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {f"layers.{i}.attn.v_proj.adapter.{t}" for i in range(2)
                          for t in ("d", "basis")}
    assert "calls" in next(m for m in model.modules() if isinstance(m, Shift)).state_dict()
    base, other = tiny_model("llama"), tiny_model("llama")
    torch.manual_seed(7)  # (tiny_model seeds the global generator: draw other bases than model's)
    fresh = IO.load_adapter(base, tmp_path)
    assert torch.equal(logits(fresh, idx), want)
    torch.manual_seed(7)
    A.add_adapter(other, "shift")  # what fresh was before the load: the same d, another basis
    for k, t in A.adapter_state(other, "default").items():
        if k.endswith(".d"):
            t.copy_(saved[k])
    assert not torch.equal(logits(other, idx), want)  # so the basis did come from the file


def test_a_parameter_left_out_of_adapter_params_is_refused_when_added(shift, monkeypatch):
    """It would train and then silently not be saved: add_adapter refuses the kind at once."""
    monkeypatch.setattr(Shift, "adapter_params", lambda self: [])
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"Shift.adapter_params\(\) leaves out its parameter\(s\) "
                                         r"\['d'\]: they would not be saved"):
        A.add_adapter(model, "shift")
    assert A.adapter_names(model) == [] and not list(slots(model))
    assert all(p.requires_grad for p in model.parameters())  # not frozen by the failed call
    monkeypatch.setattr(Shift, "adapter_params", lambda self: ["d", "nothing"])
    with pytest.raises(ValueError, match=r"Shift.adapter_params\(\) names 'nothing', which is not"):
        A.add_adapter(model, "shift")


@pytest.mark.parametrize("sid", ["lora", "series-both", "parallel-per-linear-sparse",
                                 "prefix-reparam", "prompt", "prefix-gated"])
def test_save_model_leaves_every_adapter_out(sid, tmp_path):
    """checkpoints.save_model writes the base alone, whatever adapters are attached: the same
    tensors as the bare base, and the folder loads strictly."""
    from safetensors.torch import load_file
    bare = tiny_model("llama")
    save_model(bare, tmp_path / "bare")
    kind, o = spec("llama", sid)
    model = randomize_adapters_(A.add_adapter(tiny_model("llama"), kind, **o))
    # the reference: the model's own parameters do include the adapter's
    assert len(dict(model.named_parameters())) > len(dict(bare.named_parameters()))
    save_model(model, tmp_path / "with")
    want = load_file(tmp_path / "bare" / "model.safetensors")
    got = load_file(tmp_path / "with" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(logits(load_model(tmp_path / "with"), ids(bare)), logits(bare, ids(bare)))


# ------------------------------------------------------------ PEFT interop: LoRA, adaption prompt
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
        ours = IO.load_adapter(load_model(ckpt), folder).eval()
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
    IO.save_adapter(ours, tmp_path, format="peft", base_model="tiny-hf")
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
    back = IO.load_adapter(load_model(ckpt), tmp_path).eval()  # and our own export loads here
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
    ours = IO.load_adapter(load_model(ckpt), tmp_path).eval()
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
    ours = IO.load_adapter(load_model(ckpt), tmp_path / "adapter").eval()
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
        IO.load_adapter(load_model(ckpt), tmp_path)


# ------------------------------------------------------------------------ PEFT interop: DoRA, IA3
def peft_model(hf, kind, **config):
    """hf wrapped in a PEFT DoRA (LoraConfig(use_dora=True)) or IA3, away from its identity."""
    import peft
    if kind == "dora":
        pc = peft.LoraConfig(task_type="CAUSAL_LM", use_dora=True, **config)
    else:
        pc = peft.IA3Config(task_type="CAUSAL_LM", **config)
    return perturb_(peft.get_peft_model(hf, pc), seed=1).eval()


# PEFT targets for the PEFT -> ours direction: DoRA on every projection; IA3 on PEFT's own defaults
# (GPT-J: q, v, fc_out; OPT: q, k, fc2; BLOOM: query_key_value and "mlp.dense_4h_to_h"), not ours
ALL_LINEARS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"],
               "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
               "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
               "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
ALL_LINEARS["llama-gqa"] = ALL_LINEARS["llama"]


@pytest.mark.parametrize("kind", DORA_IA3)
@pytest.mark.parametrize("family", ALL_FAMILIES)
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
    ours = IO.load_adapter(load_model(ckpt), tmp_path).eval()
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


@pytest.mark.parametrize("kind", DORA_IA3)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_our_peft_export_loads_in_peft(family, kind, hf_base, tmp_path):
    """ours -> PEFT folder -> PEFT: the same logits; and the folder loads back here bit for bit."""
    import peft
    ckpt, hf = hf_base(family)
    ours = perturb_(A.add_adapter(load_model(ckpt), kind, **OPTIONS[kind])).eval()
    idx = ids(ours, B=2, T=7)
    want = logits(ours, idx)
    IO.save_adapter(ours, tmp_path, format="peft", base_model="tiny-hf")
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
    back = IO.load_adapter(load_model(ckpt), tmp_path).eval()
    assert torch.equal(logits(back, idx), want)


@pytest.mark.parametrize("kind", DORA_IA3)
def test_gradients_equal_peft(kind, hf_base, tmp_path):
    """One backward on the same loss: every adapter tensor's gradient equals PEFT's (DoRA: the norm
    detached as PEFT does; IA3: y + W (x * (l - 1)) has the gradient of W (x * l))."""
    ckpt, hf = hf_base("llama")
    dora = dict(r=4, lora_alpha=8, lora_dropout=0.0)
    pm = peft_model(hf, kind, **(dora if kind == "dora" else {}))
    try:
        pm.save_pretrained(tmp_path)
        ours = IO.load_adapter(load_model(ckpt), tmp_path)
        idx = ids(ours, B=2, T=8)
        pm.train()
        pm(idx, labels=idx).loss.backward()  # transformers shifts the labels itself
        theirs = {n.replace(".default", "").replace("vector.weight", "vector"): p.grad
                  for n, p in pm.named_parameters() if p.requires_grad}
    finally:
        pm.unload()
    ours.train()
    ours(idx[:, :-1], targets=idx[:, 1:])[1].backward()
    named = IO.peft_state(ours, "default", keep_vars=True)  # the parameters themselves
    assert {id(p) for p in named.values()} == {id(p) for p in ours.parameters() if p.requires_grad}
    got = {k: p.grad for k, p in named.items()}
    assert sorted(got) == sorted(theirs) and len(got) >= 6
    for k in got:
        assert (got[k] - theirs[k]).abs().max() < 1e-5, k


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
        IO.load_adapter(load_model(ckpt), tmp_path)


# ----------------------------------------------------------------------------------- clear errors
def test_errors_on_save_and_load(tmp_path):
    model = tiny_model("llama")
    A.add_adapter(model, "series", bottleneck=8)
    no_peft = (r"format='peft': a series adapter \('default'\) has no PEFT folder; PEFT folders "
               "are written for lora, dora, ia3")
    with pytest.raises(ValueError, match=no_peft):
        IO.save_adapter(model, tmp_path / "peft", format="peft")
    with pytest.raises(ValueError, match="format='onnx'"):
        IO.save_adapter(model, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match=r"no adapter named 'nope'"):
        IO.save_adapter(model, tmp_path / "x", name="nope")
    IO.save_adapter(model, tmp_path / "ok")
    # onto another base model: other width, other family
    with pytest.raises(ValueError, match=r"trained on another base model.*n_embd"):
        IO.load_adapter(tiny_model("llama", n_embd=32), tmp_path / "ok")
    with pytest.raises(ValueError,
                       match=r"trained on another base model.*'arch': \('llama', 'gptj'\)"):
        IO.load_adapter(tiny_model("gptj"), tmp_path / "ok")
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
            IO.load_adapter(tiny_model("llama"), folder)
    folder = tmp_path / "shape"
    folder.mkdir()
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    cfg["options"]["bottleneck"] = 4
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"has shape \(8, 64\), this model expects \(4, 64\)"):
        IO.load_adapter(tiny_model("llama"), folder)
    # no adapter_config.json; config but no tensors
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter_config.json: cannot read JSON"):
        IO.load_adapter(tiny_model("llama"), tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text(
        (tmp_path / "ok" / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError,
                       match="no adapter_model.safetensors or adapter_model.bin"):
        IO.load_adapter(tiny_model("llama"), tmp_path / "empty")


def test_failed_load_leaves_the_model_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file
    src = A.add_adapter(tiny_model("llama"), "lora", r=4)
    IO.save_adapter(src, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    state.pop(next(iter(state)))
    save_file(state, tmp_path / "adapter_model.safetensors")
    model = tiny_model("llama")
    with pytest.raises(KeyError, match="missing"):
        IO.load_adapter(model, tmp_path)
    assert A.adapter_names(model) == [] and not list(slots(model))


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
@pytest.mark.parametrize("config, message", [
    ([1, 2], "expected a JSON object, got list"),
    ({"options": {}}, "missing field.s. kind"),
    ({"kind": "lora"}, "missing field.s. options"),
    ({"kind": "lora", "options": [4]}, "'options' is a list, expected a JSON object"),
])
def test_bad_adapter_config(train_base, tmp_path, config, message):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"adapter_config.json: {message}"):
        IO.load_adapter(load_model(train_base), tmp_path)


def with_config(path, change):
    """Rewrite path/adapter_config.json through change(dict) (in place)."""
    config = json.loads((path / "adapter_config.json").read_text())
    change(config)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("kind, options, message", [
    ("lora", dict(alpha="16"), "alpha='16': expected a number"),
    ("lora", dict(alpha=float("nan")), "alpha=nan: expected a number"),
    ("lora", dict(r="4"), "r='4': expected an integer"),
    ("lora", dict(r=4.0), "r=4.0: expected an integer"),
    ("lora", dict(dropout="abc"), "dropout='abc': expected a number"),
    ("lora", dict(target_modules="q_proj"), "target_modules='q_proj': expected a list of module "
                                            "names or null"),
    ("lora", dict(target_modules=[1, 2]), "target_modules=\\[1, 2\\]: expected a list"),
    ("prefix", dict(gated="yes"), "gated='yes': expected true or false"),
    ("parallel", dict(scaling="big"), "scaling='big': expected a number or 'learned'"),
    ("parallel", dict(placement=1), "placement=1: expected a string"),
])
def test_adapter_config_options_of_the_wrong_type(train_base, tmp_path, kind, options, message):
    """Every option of every kind is typed like its default where adapter_config.json is read
    (before: "alpha": "16" was a TypeError inside LoRA's forward)."""
    model = A.add_adapter(load_model(train_base), kind, **{"lora": dict(r=4), "prefix": {},
                                                           "parallel": dict(bottleneck=4)}[kind])
    IO.save_adapter(model, tmp_path)
    IO.load_adapter(load_model(train_base), tmp_path)  # as saved, it loads
    with_config(tmp_path, lambda c: c["options"].update(options))
    with pytest.raises(ValueError, match=f"adapter_config.json: {message}"):
        IO.load_adapter(load_model(train_base), tmp_path)
    with_config(tmp_path, lambda c: c.update(kind="lorra"))
    with pytest.raises(ValueError, match="adapter_config.json: kind 'lorra' is not an adapter"):
        IO.load_adapter(load_model(train_base), tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("r", "8", "field 'r' is '8', expected an integer"),
    ("lora_alpha", "16", "field 'lora_alpha' is '16', expected a number"),
    ("use_rslora", "yes", "field 'use_rslora' is 'yes', expected true or false"),
    ("use_dora", 1, "field 'use_dora' is 1, expected true or false"),
    ("target_modules", [1], "field 'target_modules' is \\[1\\], expected a list of module names"),
    ("lora_dropout", [0.1], "field 'lora_dropout' is \\[0.1\\], expected a number"),
])
def test_peft_adapter_config_fields_of_the_wrong_type(train_base, tmp_path, field, value, message):
    path = saved_lora(train_base, tmp_path, format="peft")
    IO.load_adapter(load_model(train_base), path)
    with_config(path, lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=f"adapter_config.json: {message}"):
        IO.load_adapter(load_model(train_base), path)


def test_damaged_adapter_weights(train_base, tmp_path):
    path = saved_lora(train_base, tmp_path)
    truncate(path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors: cannot read it"):
        IO.load_adapter(load_model(train_base), path)


def test_peft_target_modules_must_match_the_tensors(train_base, tmp_path):
    path = saved_lora(train_base, tmp_path, format="peft")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    disagree = r"target_modules \['q_proj'\] disagree .*\['down_proj', 'k_proj', 'q_proj'"
    with pytest.raises(ValueError, match=disagree):
        IO.load_adapter(load_model(train_base), path)


def altered_lora(base, tmp_path, change):
    """A saved LoRA whose first tensor is replaced by change(tensor); returns (folder, its key)."""
    path = saved_lora(base, tmp_path)
    sd = load_file(path / "adapter_model.safetensors")
    key = next(iter(sd))
    save_file({**sd, key: change(sd[key])}, path / "adapter_model.safetensors")
    return path, key


def test_integer_adapter_weight_is_refused(train_base, tmp_path):
    path, key = altered_lora(train_base, tmp_path, lambda t: t.long())
    with pytest.raises(ValueError, match=f"{key} is torch.int64, this model expects torch.float32"):
        IO.load_adapter(load_model(train_base), path)


def test_failed_load_adapter_leaves_the_model_as_it_was(train_base, tmp_path):
    path, _ = altered_lora(train_base, tmp_path, lambda t: t[:1])  # a wrong shape
    model = load_model(train_base)
    for p in model.parameters():
        p.requires_grad_(True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="has shape"):
        IO.load_adapter(model, path)
    assert all(p.requires_grad for p in model.parameters()) and model.adapter_configs == {}
    assert model.state_dict().keys() == state.keys()
