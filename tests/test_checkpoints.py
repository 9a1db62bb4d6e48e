"""checkpoints.py against transformers (the reference implementations), on tiny random checkpoints.

Sections 1-5: every family in every layout the loader accepts (see conftest.py), Meta's layout,
tied weights, every loader error path, save_model. Sections 6-13: the LLaMA-shaped weights people
have today, Llama 3.x, Qwen2 / Qwen2.5 and Mistral (conftest's llama3, qwen2, mistral): both forms
of config.json (the hub's `rope_scaling` beside a top-level `rope_theta`; transformers 5's
`rope_parameters` holding both), Meta's params.json for Llama 3, parity on sequences long enough
for each feature to matter (Llama 3's rotary scaling past original_max_position_embeddings,
Mistral's window at 5x its size), KV-cache decoding, every setting refused by name, the presets
against the published configs and parameter counts, LoRA (ours and PEFT's) on these families.
Each of those parity tests also checks that transformers WITHOUT the feature (same weights, the
feature off) gives other logits on the same input, so the test can fail."""
import ast
import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import adapter_io
import adapters as A
from checkpoints import config_from_hf, load_model, meta_config, meta_to_rotate_half, save_model
from conftest import (FAMILIES, LAYOUTS, left_pad, make_hf_checkpoint, make_hf_model,
                      make_meta_checkpoint, tiny_model, truncate, write_state_dict)
from model import Transformer, apply_rope, rope_angles, rope_frequencies
from presets import PRESETS, Config, RopeScaling

# transformers/peft
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TOL = 1e-4    # fp32 parity, max |logit difference|
FEATURE = 0.05  # the least the feature under test must move transformers' own logits

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)


def rand_ids(*shape, vocab=256, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def ours(m, idx, **kw):
    return m(idx, **kw)[0]


@torch.no_grad()
def theirs(hf, idx):
    return hf(idx).logits


@torch.no_grad()
def check_parity(m, hf, label, vocab=256):
    """Unpadded batch, then a left-padded batch compared row by row with transformers on the row
    alone."""
    idx = rand_ids(2, 13, vocab=vocab, seed=1)
    err = max_diff(ours(m, idx), theirs(hf, idx))
    seqs = [rand_ids(n, vocab=vocab, seed=10 + n) for n in (13, 6, 1, 9)]
    idx, mask = left_pad(seqs)
    got = ours(m, idx, attention_mask=mask)
    for i, s in enumerate(seqs):
        err = max(err, max_diff(got[i, -len(s):], theirs(hf, s[None])[0]))
    # and transformers on the same padded batch (LLaMA/GPT-J number positions only when told to)
    pos = ({"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
           if hf.config.model_type in ("llama", "gptj") else {})
    ref = hf(idx, attention_mask=mask, **pos).logits
    err = max(err, max_diff(got[mask.bool()], ref[mask.bool()]))
    print(f"parity {label}: max |logit diff| = {err:.2e}")
    assert err < TOL, f"{label}: {err}"
    return err


# --------------------------------------------------------------------------------------------------
# 1. Parity with transformers, every family x every layout


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_every_layout(hf_checkpoint, family, layout):
    path, hf = hf_checkpoint(family, layout)
    if layout.endswith("sharded"):
        assert json.loads(next(path.glob("*.index.json")).read_text())["weight_map"]
        assert len(set(
            json.loads(next(path.glob("*.index.json")).read_text())["weight_map"].values())) > 1
    if family == "gptj" and layout.startswith("bin"):  # the legacy buffers really are in the files
        keys = {k for f in path.glob("*.bin") for k in torch.load(f, weights_only=True)}
        assert {"transformer.h.0.attn.bias", "transformer.h.1.attn.masked_bias"} <= keys
    m = load_model(path)
    check_parity(m, hf, f"{family}/{layout}")


@pytest.mark.parametrize("family,layout", [("bloom", "bin"),
                                           ("bloom", "safetensors-sharded"),
                                           ("opt", "bin-sharded"),
                                           ("opt-350m", "safetensors")])
def test_parity_keys_without_outer_prefix(hf_checkpoint, family, layout):
    """Original BLOOM (no `transformer.`) and OPT (no `model.`) releases saved the bare base
    model."""
    path, hf = hf_checkpoint(family, layout, strip_prefix=True)
    files = list(path.glob("*.bin")) + list(path.glob("*.safetensors"))
    if layout.startswith("bin"):
        keys = {k for f in files for k in torch.load(f, weights_only=True)}
    else:
        from safetensors import safe_open
        keys = {k for f in files for k in safe_open(f, "pt").keys()}
    assert not any(k.startswith(("transformer.", "model.")) for k in keys)
    check_parity(load_model(path), hf, f"{family}/{layout}/no-prefix")


CONFIG_VARIANTS = [
    ("llama", dict(tie_word_embeddings=True)),
    ("llama", dict(rope_theta=500.0, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-3)),
    ("llama", dict(head_dim=32)),                    # head_dim != hidden / heads
    ("llama-gqa", dict(num_key_value_heads=1)),      # multi-query
    ("gptj", dict(rotary_dim=16)),                   # rotary over the whole head
    # ALiBi slopes for a head count that is not a power of two
    ("bloom", dict(hidden_size=48, n_head=6)),
    ("opt", dict(enable_bias=False, _remove_final_layer_norm=True)),
]


@pytest.mark.parametrize("family,overrides", CONFIG_VARIANTS,
                         ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={w}" for k, w in v.items()))
def test_parity_config_variants(tmp_path, family, overrides):
    """config.json fields the loader must honour; also round-trips through save_pretrained into
    transformers."""
    from transformers import AutoModelForCausalLM
    path, hf = make_hf_checkpoint(tmp_path / "src", family, **overrides)
    m = load_model(path)
    check_parity(m, hf, f"{family}/{overrides}")
    save_model(m, tmp_path / "out")
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    idx = rand_ids(2, 9)
    assert max_diff(theirs(hf2, idx), theirs(hf, idx)) < TOL


@pytest.mark.parametrize("sharded", [False, True])
def test_safetensors_preferred_over_bin(tmp_path, sharded):
    """With both formats present the loader reads safetensors: the .bin files hold another model (or
    garbage)."""
    layout = "safetensors-sharded" if sharded else "safetensors"
    path, hf = make_hf_checkpoint(tmp_path / "a", "llama", layout, seed=0)
    other = make_hf_model("llama", seed=1)
    write_state_dict(path, other.state_dict(), "bin-sharded" if sharded else "bin")
    m = load_model(path)
    idx = rand_ids(1, 8)
    assert max_diff(ours(m, idx), theirs(hf, idx)) < TOL
    assert max_diff(ours(m, idx), theirs(other, idx)) > 0.1
    for f in list(path.glob("*.bin")) + list(path.glob("pytorch_model.bin.index.json")):
        f.write_bytes(b"not a checkpoint")
    m = load_model(path)
    assert max_diff(ours(m, idx), theirs(hf, idx)) < TOL


# --------------------------------------------------------------------------------------------------
# 2. Meta layout


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("family,multiple_of,ffn_mult", [("llama", 32, None),
                                                         ("llama-gqa", 32, 1.3)])
def test_meta_layout_parity(tmp_path, family, multiple_of, ffn_mult, n_shards):
    hf = make_hf_model(family)
    path = make_meta_checkpoint(tmp_path, hf, n_shards=n_shards, multiple_of=multiple_of,
                                ffn_dim_multiplier=ffn_mult)
    assert sorted(f.name for f in path.glob("*.pth")) == [f"consolidated.{i:02d}.pth"
                                                          for i in range(n_shards)]
    shard = torch.load(path / "consolidated.00.pth", weights_only=True)
    assert "rope.freqs" in shard
    if n_shards == 2:  # really split as Meta does
        assert shard["layers.0.attention.wq.weight"].shape == (32, 64)
        assert shard["layers.0.attention.wo.weight"].shape == (64, 32)
        assert shard["tok_embeddings.weight"].shape == (256, 32)
        assert shard["output.weight"].shape == (128, 64)
    m = load_model(path)
    assert m.config.intermediate_size == hf.config.intermediate_size
    assert m.config.n_kv_head == hf.config.num_key_value_heads and m.config.vocab_size == 256
    check_parity(m, hf, f"{family}/meta-{n_shards}-shard")


def test_meta_q_k_permutation_matches_meta_rotary():
    """meta_to_rotate_half turns Meta's interleaved-pair rotary (complex multiplication, as in
    Meta's llama/model.py) into HF's rotate-half rotary: attention scores agree."""
    torch.manual_seed(0)
    H, D, C, T = 2, 8, 16, 5
    wq, wk, x = torch.randn(H * D, C), torch.randn(H * D, C), torch.randn(1, T, C)

    def meta_rotary(t):  # (1, T, H, D), Meta's apply_rotary_emb
        freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
        cis = torch.polar(torch.ones(T, D // 2), torch.outer(torch.arange(T).float(), freqs))
        tc = torch.view_as_complex(t.reshape(1, T, H, D // 2, 2))
        return torch.view_as_real(tc * cis[None, :, None]).flatten(3)

    qm, km = meta_rotary((x @ wq.T).view(1, T, H, D)), meta_rotary((x @ wk.T).view(1, T, H, D))
    scores_meta = torch.einsum("bthd,bshd->bhts", qm, km)
    cfg = Config(n_head=H, n_embd=H * D)
    cos, sin = rope_angles(cfg, torch.arange(T)[None])
    qh = apply_rope((x @ meta_to_rotate_half(wq, H).T).view(1, T, H, D).transpose(1, 2),
                    cos, sin, False)
    kh = apply_rope((x @ meta_to_rotate_half(wk, H).T).view(1, T, H, D).transpose(1, 2),
                    cos, sin, False)
    torch.testing.assert_close(qh @ kh.transpose(-1, -2), scores_meta, atol=1e-4, rtol=1e-4)
    # and without the permutation the scores differ (the test can fail)
    qb = apply_rope((x @ wq.T).view(1, T, H, D).transpose(1, 2), cos, sin, False)
    kb = apply_rope((x @ wk.T).view(1, T, H, D).transpose(1, 2), cos, sin, False)
    assert max_diff(qb @ kb.transpose(-1, -2), scores_meta) > 1e-2


# --------------------------------------------------------------------------------------------------
# 3. Materialised and tied


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_model_is_materialised_and_tied(hf_checkpoint, family):
    path, _ = hf_checkpoint(family)
    for dtype in (None, torch.bfloat16):
        m = load_model(path, dtype=dtype)
        assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
        assert all(p.requires_grad for p in m.parameters()) and not m.training
        if family in ("bloom", "opt", "opt-350m", "qwen2"):
            assert m.config.tie_embeddings and m.lm_head.weight is m.embed.weight
        else:
            assert m.lm_head.weight is not m.embed.weight


# --------------------------------------------------------------------------------------------------
# 4. Error paths


def test_error_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError,
                       match=re.escape(str(tmp_path / "empty")) + ".*no params.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "cfg-only").mkdir()
    make_hf_model("llama").config.save_pretrained(tmp_path / "cfg-only")
    with pytest.raises(FileNotFoundError, match="cfg-only: no model.safetensors"):
        load_model(tmp_path / "cfg-only")


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin-sharded"])
def test_error_index_lists_missing_shard(tmp_path, layout):
    path, _ = make_hf_checkpoint(tmp_path, "llama", layout)
    shard = sorted(path.glob("model-*.safetensors") if layout.startswith("safe")
                   else path.glob("pytorch_model-*.bin"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError,
                       match=re.escape(shard.name) + ": shard listed in .*index.json is missing"):
        load_model(path)


@pytest.mark.parametrize("content", ['{"metadata": {}}',
                                     '{"weight_map": {}}',
                                     "not json {",
                                     "[1, 2]"])
def test_error_bad_index(tmp_path, content):
    path, _ = make_hf_checkpoint(tmp_path, "llama", "safetensors-sharded")
    (path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path / "model.safetensors.index.json"))):
        load_model(path)


def test_error_unknown_tensor(tmp_path):
    key = "model.layers.0.self_attn.q_norm.weight"
    path, _ = make_hf_checkpoint(tmp_path, "llama", "safetensors",
                                 extra_tensors={key: torch.ones(16)})
    with pytest.raises(KeyError,
                       match=re.escape(str(path / "model.safetensors")) + ".*" + re.escape(key)):
        load_model(path)


def test_error_missing_tensor(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "llama", "bin",
                                 drop=["model.layers.1.mlp.down_proj.weight"])
    with pytest.raises(KeyError, match=r"1 parameters missing.*layers\.1\.mlp\.down_proj\.weight"):
        load_model(path)


def test_error_config_does_not_match_shapes(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "llama", "safetensors")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 160}))
    with pytest.raises(ValueError, match=re.escape(str(path / "model.safetensors")) +
                       r": layers\.\d\.mlp\.(gate|up|down)_proj\.weight has shape .* "
                       r"the config expects"):
        load_model(path)


def test_error_meta_missing_middle_shard(tmp_path):
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"), n_shards=2)
    (path / "consolidated.01.pth").rename(path / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth is missing"):
        load_model(path)


def test_error_meta_unknown_tensor(tmp_path):
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"))
    sd = torch.load(path / "consolidated.00.pth", weights_only=True)
    sd["layers.0.attention.wz.weight"] = torch.ones(2)
    torch.save(sd, path / "consolidated.00.pth")
    with pytest.raises(KeyError, match=r"consolidated\.00\.pth.*layers\.0\.attention\.wz\.weight"):
        load_model(path)


def test_error_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError,
                       match=re.escape(tmp_path.name) + ": model_type 'gpt2' is not supported"):
        load_model(tmp_path)


# --------------------------------------------------------------------------------------------------
# 5. save_pretrained


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(tmp_path, family):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    path, hf = make_hf_checkpoint(tmp_path / "src", family)
    m = load_model(path)
    # adapter modules in hook slots are not base weights
    q = m.layers[0].attn.query_key_value if family == "bloom" else m.layers[0].attn.q_proj
    q.adapter = nn.Linear(2, 2)
    m.layers[1].post_mlp = nn.Linear(2, 2)
    m.layers[0].attn.prefix = nn.Linear(2, 2)
    save_model(m, tmp_path / "out")
    with safe_open(tmp_path / "out/model.safetensors", "pt") as f:
        saved = set(f.keys())
    with safe_open(path / "model.safetensors", "pt") as f:
        official = set(f.keys())
    assert saved == official  # exactly transformers' own names, no adapter tensors, no tied copy
    q.adapter = m.layers[1].post_mlp = m.layers[0].attn.prefix = None
    idx = rand_ids(2, 9)
    again = load_model(tmp_path / "out")
    assert torch.equal(ours(again, idx), ours(m, idx))
    assert again.config == replace(m.config, name="out")
    hf2, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf2.float().eval()
    assert type(hf2) is type(hf)
    assert max_diff(theirs(hf2, idx), ours(m, idx)) < TOL
    assert max_diff(theirs(hf2, idx), theirs(hf, idx)) < TOL


# --------------------------------------------------------------------------------------------------
# Llama 3, Qwen2, Mistral: parity on long sequences, and the reference without the feature


@torch.no_grad()
def parity(m, hf, T, label):
    """max |logit diff| of our model against transformers on T tokens: a batch of two rows, then a
    left-padded batch (rows of T, T - 9 and 5 tokens) against transformers on each row alone and
    on the same padded batch."""
    idx = rand_ids(2, T, seed=1)
    err = max_diff(m(idx)[0], hf(idx).logits)
    seqs = [rand_ids(n, seed=10 + n) for n in (T, T - 9, 5)]
    idx, mask = left_pad(seqs)
    got = m(idx, attention_mask=mask)[0]
    for i, s in enumerate(seqs):
        err = max(err, max_diff(got[i, -len(s):], hf(s[None]).logits[0]))
    ref = hf(idx, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    err = max(err, max_diff(got[mask.bool()], ref[mask.bool()]))
    print(f"parity {label}, {T} tokens: max |logit diff| = {err:.2e}")
    assert err < TOL, f"{label}: {err}"
    return err


@torch.no_grad()
def assert_feature_matters(hf, family, T, seed=0, **without):
    """transformers with the same weights and the feature off (`without`: config overrides) gives
    other logits on T tokens: otherwise a parity test could not tell the feature from its
    absence. Returns that reference."""
    other = make_hf_model(family, seed, **without)
    sd, sd_other = hf.state_dict(), other.state_dict()
    assert sd.keys() == sd_other.keys() and all(torch.equal(sd[k], sd_other[k]) for k in sd)
    idx = rand_ids(2, T, seed=1)
    gap = max_diff(hf(idx).logits, other(idx).logits)
    print(f"{family} without {without}: logits move by {gap:.2f}")
    assert gap > FEATURE
    return other


def edit_config(path, drop=(), **fields):
    """Rewrite path/config.json: drop keys, set fields."""
    f = Path(path) / "config.json"
    d = {k: v for k, v in json.loads(f.read_text()).items() if k not in drop}
    f.write_text(json.dumps({**d, **fields}))


def to_hub_form(path, rope):
    """config.json as the hub has Llama 3.1 / Qwen2.5 / Mistral (written by transformers 4): the
    rotary settings as rope_scaling (None: plain rotary) beside a top-level rope_theta."""
    theta = rope.pop("rope_theta")
    edit_config(path, drop=("rope_parameters", "layer_types"), rope_theta=theta,
                rope_scaling=rope if rope.get("rope_type", "default") != "default" else None)




# --------------------------------------------------------------------------------------------------
# 6. Llama 3's rotary scaling


def meta_apply_scaling():
    """Meta's own apply_scaling, read from llama_models/llama3/model.py (importing that module
    needs fairscale, so the function alone is compiled from its source)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("llama_models is not installed")
    src = (Path(spec.submodule_search_locations[0]) / "llama3" / "model.py").read_text()
    fn = next(n for n in ast.parse(src).body
              if isinstance(n, ast.FunctionDef) and n.name == "apply_scaling")
    scope = {"torch": torch}
    exec(compile(ast.Module([fn], type_ignores=[]), "llama_models/llama3/model.py", "exec"), scope)
    return scope["apply_scaling"]


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "llama-3.2-1b"])
def test_llama3_frequencies_equal_transformers_and_meta(preset):
    import transformers as tf
    from transformers.modeling_rope_utils import _compute_llama3_parameters
    c = Config.from_name(preset)
    s = c.rope_scaling
    hf_config = tf.LlamaConfig(hidden_size=c.n_embd, num_attention_heads=c.n_head,
                               head_dim=c.head_dim, max_position_embeddings=c.block_size,
                               rope_parameters=dict(
                                   rope_type="llama3", rope_theta=c.rope_theta, factor=s.factor,
                                   low_freq_factor=s.low_freq_factor,
                                   high_freq_factor=s.high_freq_factor,
                                   original_max_position_embeddings=8192))
    ours = rope_frequencies(c)
    assert torch.equal(ours, _compute_llama3_parameters(hf_config)[0])
    plain = rope_frequencies(replace(c, rope_scaling=None))
    ratio = ours / plain  # every band of the rule is used: kept, blended, divided by factor
    assert (ratio == 1).any() and (ratio == 1 / s.factor).any()
    assert ((ratio < 1) & (ratio > 1 / s.factor)).any()
    # Meta's reference code applies its own constants (8, 1, 4, 8192) to every scaled model
    meta = meta_apply_scaling()(plain)
    if s.factor == 8:
        assert torch.equal(ours, meta)
    else:  # HF's Llama 3.2 configs say 32: not what Meta's code computes
        assert (ours / meta).min() == 8 / 32  # the long wavelengths 4x slower
        assert torch.equal(rope_frequencies(replace(c, rope_scaling=RopeScaling())), meta)


def test_llama3_parity_transformers5_form(tmp_path):
    """A Llama 3.1 folder written by transformers 5: rope_parameters holds rope_type llama3 and
    rope_theta."""
    path, hf = make_hf_checkpoint(tmp_path, "llama3")
    saved = json.loads((path / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "llama3" and "rope_theta" not in saved
    m = load_model(path)
    assert m.config.rope_scaling == RopeScaling(original_max_position_embeddings=64)
    assert m.config.rope_theta == 500000.0 and m.config.n_kv_head == 2
    parity(m, hf, 300, "llama3/rope_parameters")
    assert_feature_matters(hf, "llama3", 300,
                           rope_parameters=dict(rope_type="default", rope_theta=500000.0))


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1's, Llama 3.2's
def test_llama3_parity_hub_form(tmp_path, factor):
    """Llama 3.1 / 3.2 as the hub has them: rope_scaling beside a top-level rope_theta."""
    from transformers import AutoModelForCausalLM
    rope = dict(LLAMA3_ROPE, factor=factor)
    path, hf = make_hf_checkpoint(tmp_path, "llama3", rope_parameters=dict(rope))
    to_hub_form(path, dict(rope))
    saved = json.loads((path / "config.json").read_text())
    assert saved["rope_scaling"]["factor"] == factor and "rope_parameters" not in saved
    idx = rand_ids(1, 200)
    with torch.no_grad():  # transformers reads this form as the model it was
        again = AutoModelForCausalLM.from_pretrained(path).float().eval()
        assert max_diff(again(idx).logits, hf(idx).logits) < TOL
    m = load_model(path)
    assert m.config.rope_scaling == RopeScaling(factor, 1.0, 4.0, 64)
    parity(m, hf, 300, f"llama3/rope_scaling factor {factor}")
    assert_feature_matters(hf, "llama3", 300,
                           rope_parameters=dict(rope_type="default", rope_theta=500000.0))


META_ROPE = dict(LLAMA3_ROPE, original_max_position_embeddings=8192)  # Meta's constants


def write_meta_llama3(path, hf, use_scaled_rope=True, tied=False):
    """hf (a tiny Llama 3) in Meta's layout as Llama 3.1 / 3.2 ship: params.json with rope_theta,
    use_scaled_rope and vocab_size; without output.weight when the embeddings are tied."""
    path = make_meta_checkpoint(path, hf, multiple_of=32, ffn_dim_multiplier=1.3)
    params = json.loads((path / "params.json").read_text())
    params.update(rope_theta=500000.0, use_scaled_rope=use_scaled_rope, vocab_size=256)
    (path / "params.json").write_text(json.dumps(params))
    if tied:
        shard = torch.load(path / "consolidated.00.pth", weights_only=True)
        del shard["output.weight"]
        torch.save(shard, path / "consolidated.00.pth")
    return path


@pytest.mark.parametrize("tied", [False, True])  # Llama 3.1 8B; Llama 3.2 1B / 3B
def test_llama3_meta_layout_parity(tmp_path, tied):
    hf = make_hf_model("llama3", rope_parameters=dict(META_ROPE), max_position_embeddings=131072,
                       tie_word_embeddings=tied)
    path = write_meta_llama3(tmp_path / "scaled", hf, tied=tied)
    m = load_model(path)
    assert m.config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert m.config.tie_embeddings == tied and (m.lm_head.weight is m.embed.weight) == tied
    assert (m.config.vocab_size, m.config.block_size, m.config.n_kv_head) == (256, 131072, 2)
    parity(m, hf, 700, f"llama3/meta params.json use_scaled_rope{' tied' if tied else ''}")
    plain = assert_feature_matters(hf, "llama3", 700, tie_word_embeddings=tied,
                                   max_position_embeddings=131072,
                                   rope_parameters=dict(rope_type="default", rope_theta=500000.0))
    # use_scaled_rope: false is Llama 3.0: plain rotary at theta 5e5, exactly
    m0 = load_model(write_meta_llama3(tmp_path / "plain", hf, use_scaled_rope=False, tied=tied))
    assert m0.config.rope_scaling is None and m0.config.block_size == 8192
    idx = rand_ids(1, 700)
    with torch.no_grad():
        assert max_diff(m0(idx)[0], plain(idx).logits) < TOL


@pytest.mark.parametrize("field,value", [("vision_chunk_size", 448),           # Llama 3.2 Vision
                                         ("quantization_args", {"group_size": 256}),  # QLoRA int4
                                         ("lora_args", {"rank": 16, "scale": 2.0}),
                                         ("rope_scaling_factor", 16)])          # Llama 4
def test_meta_params_json_refuses_unknown_fields_by_name(tmp_path, field, value):
    path = write_meta_llama3(tmp_path, make_hf_model("llama3"))
    params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps({**params, field: value}))
    with pytest.raises(ValueError, match=f"params.json field\\(s\\) \\['{field}'\\] are not "
                                         "supported"):
        load_model(path)


def test_meta_params_json_use_scaled_rope_must_be_a_boolean(tmp_path):
    path = write_meta_llama3(tmp_path, make_hf_model("llama3"))
    params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps({**params, "use_scaled_rope": "yes"}))
    with pytest.raises(ValueError, match="'use_scaled_rope' is 'yes', expected true or false"):
        load_model(path)


# --------------------------------------------------------------------------------------------------
# 7. Refused rotary settings, by name, in both forms


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "longrope", "su"])
@pytest.mark.parametrize("form", ["rope_scaling", "rope_parameters", "legacy type"])
def test_other_rope_types_refused_by_name(tmp_path, rope_type, form):
    path, _ = make_hf_checkpoint(tmp_path, "llama")
    rope = {"factor": 2.0, "original_max_position_embeddings": 64}
    if form == "rope_scaling":  # the hub's form
        edit_config(path, drop=("rope_parameters",), rope_theta=10000.0,
                    rope_scaling=dict(rope, rope_type=rope_type))
    elif form == "rope_parameters":  # transformers 5's
        edit_config(path, rope_parameters=dict(rope, rope_type=rope_type, rope_theta=10000.0))
    else:  # transformers < 4.43 wrote "type"
        edit_config(path, drop=("rope_parameters",), rope_scaling=dict(rope, type=rope_type))
    key = "rope_parameters" if form == "rope_parameters" else "rope_scaling"
    with pytest.raises(ValueError, match=f"{key} has rope_type '{rope_type}', which is not "
                                         r"supported \(default, llama3\)"):
        load_model(path)


@pytest.mark.parametrize("fields,message", [
    (dict(rope_scaling=dict(LLAMA3_ROPE, attention_factor=1.5)),
     r"rope_scaling field\(s\) \['attention_factor'\] are not supported with rope_type 'llama3'"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, factor=4.0)),
     r"rope_parameters field\(s\) \['factor'\] are not supported with rope_type 'default'"),
    (dict(rope_parameters=dict(LLAMA3_ROPE, factor="8")), "factor'? is '8', expected a number"),
    (dict(rope_parameters=dict(LLAMA3_ROPE, low_freq_factor=4.0)), "0 < low_freq_factor < "
                                                                   "high_freq_factor"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
])
def test_other_settings_refused_by_name(tmp_path, fields, message):
    path, _ = make_hf_checkpoint(tmp_path, "llama3")
    edit_config(path, **fields)
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_default_rope_type_accepted(tmp_path):
    path, hf = make_hf_checkpoint(tmp_path, "llama")
    edit_config(path, drop=("rope_parameters",), rope_theta=10000.0,
                rope_scaling={"rope_type": "default"})
    m = load_model(path)
    assert m.config.rope_scaling is None
    parity(m, hf, 40, "llama/rope_scaling default")


# --------------------------------------------------------------------------------------------------
# 8. Qwen2 / Qwen2.5


@pytest.mark.parametrize("form", ["rope_parameters", "hub"])
def test_qwen2_parity(tmp_path, form):
    """Biases on q, k, v but not o_proj; tied embeddings (the checkpoint has no lm_head.weight);
    theta 1e6."""
    from safetensors import safe_open
    path, hf = make_hf_checkpoint(tmp_path, "qwen2")
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.bias" in keys and "lm_head.weight" not in keys
    assert "model.layers.0.self_attn.o_proj.bias" not in keys
    if form == "hub":  # Qwen2.5-0.5B's config.json
        to_hub_form(path, dict(rope_theta=1e6))
        edit_config(path, use_sliding_window=False, sliding_window=32768, max_window_layers=2)
    m = load_model(path)
    c = m.config
    assert c.qkv_bias and not c.attn_bias and c.tie_embeddings and c.rope_theta == 1e6
    assert m.layers[0].attn.o_proj.bias is None and m.lm_head.weight is m.embed.weight
    parity(m, hf, 100, f"qwen2/{form}")
    no_bias = make_hf_model("qwen2")  # the model a loader that dropped the biases would run
    with torch.no_grad():
        for layer in no_bias.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.zero_()
        idx = rand_ids(2, 100, seed=1)
        gap = max_diff(no_bias(idx).logits, hf(idx).logits)
    print(f"qwen2 without its q, k, v biases: logits move by {gap:.2f}")
    assert gap > FEATURE


def test_qwen2_sliding_window_on_every_layer(tmp_path):
    path, hf = make_hf_checkpoint(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8,
                                  max_window_layers=0)
    assert set(json.loads((path / "config.json").read_text())["layer_types"]) == {
        "sliding_attention"}
    m = load_model(path)
    assert m.config.sliding_window == 8
    parity(m, hf, 40, "qwen2/sliding window 8")
    assert_feature_matters(hf, "qwen2", 40)  # use_sliding_window false


def test_qwen2_window_on_some_layers_refused(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8,
                                 max_window_layers=1)
    with pytest.raises(ValueError, match=r"use_sliding_window on 1 of 2 layers "
                                         r"\(max_window_layers=1, layer_types\) is not supported"):
        load_model(path)
    # a window that transformers never applies (use_sliding_window false) is no window
    edit_config(path, use_sliding_window=False, layer_types=["full_attention"] * 2)
    assert load_model(path).config.sliding_window == 0


# --------------------------------------------------------------------------------------------------
# 9. Mistral


@pytest.mark.parametrize("form", ["rope_parameters", "hub"])
def test_mistral_sliding_window_parity(tmp_path, form):
    """Mistral 7B v0.1: a window of 4096 (here 8, on 5x as many tokens)."""
    path, hf = make_hf_checkpoint(tmp_path, "mistral")
    if form == "hub":  # v0.1's config.json: rope_theta at the top, no rope_scaling
        to_hub_form(path, dict(rope_theta=10000.0))
        edit_config(path, drop=("rope_scaling",))
    m = load_model(path)
    assert m.config.sliding_window == 8 and not m.config.qkv_bias
    parity(m, hf, 40, f"mistral/{form}")
    assert_feature_matters(hf, "mistral", 40, sliding_window=None)


def test_mistral_without_window(tmp_path):
    """v0.2 on: sliding_window null, theta 1e6."""
    path, hf = make_hf_checkpoint(tmp_path, "mistral", sliding_window=None,
                                  rope_parameters=dict(rope_type="default", rope_theta=1e6))
    m = load_model(path)
    assert m.config.sliding_window == 0 and m.config.rope_theta == 1e6
    parity(m, hf, 40, "mistral/no window")


# --------------------------------------------------------------------------------------------------
# 10. KV-cache decoding against transformers


@pytest.mark.parametrize("family,T", [("llama3", 150), ("qwen2", 40), ("mistral", 40)])
@torch.no_grad()
def test_kv_cache_decoding_equals_transformers(tmp_path, family, T):
    """A left-padded batch: a 6-column prefill, then one token at a time over the static cache
    (the step the decode loop runs), past original_max_position_embeddings (llama3) or 5 windows
    (mistral). Each row's logits equal transformers' full forward on the row alone."""
    path, hf = make_hf_checkpoint(tmp_path, family)
    m = load_model(path)
    seqs = [rand_ids(n, seed=n) for n in (T, T - 11, T // 2)]
    idx, mask = left_pad(seqs)
    cache = m.new_cache(3, T)
    steps = [m(idx[:, :6], attention_mask=mask[:, :6], cache=cache)[0]]
    for t in range(6, T):
        steps.append(m(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache)[0])
    got = torch.cat(steps, 1)
    err = max(max_diff(got[i, -len(s):], hf(s[None]).logits[0]) for i, s in enumerate(seqs))
    print(f"KV-cache decoding {family}, {T} tokens: max |logit diff| = {err:.2e}")
    assert err < TOL
    if family == "mistral":  # the decode really went past the window
        assert_feature_matters(hf, family, T, sliding_window=None)


# --------------------------------------------------------------------------------------------------
# 11. save_model: transformers reads what we write, with the same logits


@pytest.mark.parametrize("preset,overrides,hf_class", [
    ("tiny-llama3", {}, "LlamaForCausalLM"),
    ("tiny-qwen2", {}, "Qwen2ForCausalLM"),
    ("tiny-qwen2", dict(sliding_window=4), "Qwen2ForCausalLM"),
    ("tiny-mistral", {}, "MistralForCausalLM"),
])
@torch.no_grad()
def test_save_model_round_trip(tmp_path, preset, overrides, hf_class):
    from transformers import AutoModelForCausalLM
    m = tiny_model(preset.removeprefix("tiny-"), **overrides)
    save_model(m, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(hf).__name__ == hf_class
    idx = rand_ids(2, 200, vocab=512)
    assert max_diff(hf(idx).logits, m(idx)[0]) < TOL
    assert load_model(tmp_path).config == replace(m.config, name=tmp_path.name)
    # the feature shows at this length: without it our own logits differ
    off = dict(rope_scaling=None, qkv_bias=False, sliding_window=0)
    plain = Transformer(replace(m.config, **off)).eval()
    plain.load_state_dict(m.state_dict(), strict=False)
    assert max_diff(plain(idx)[0], m(idx)[0]) > FEATURE


def test_save_model_refuses_what_no_hf_type_holds(tmp_path):
    m = Transformer(Config(attn_bias=True, sliding_window=4))
    with pytest.raises(ValueError, match="no Hugging Face model_type"):
        save_model(m, tmp_path)


# --------------------------------------------------------------------------------------------------
# 12. Presets: the published configs and parameter counts

# config.json as published on the hub (fields that matter here)
_L3 = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
           max_position_embeddings=8192, rms_norm_eps=1e-05, rope_theta=500000.0,
           rope_scaling=None, hidden_act="silu", attention_bias=False, tie_word_embeddings=False)
_L31 = dict(_L3, max_position_embeddings=131072, mlp_bias=False, rope_scaling=dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192,
    rope_type="llama3"))
_L32 = dict(_L31, intermediate_size=8192, tie_word_embeddings=True,
            rope_scaling=dict(_L31["rope_scaling"], factor=32.0))
_Q25 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-06, rope_theta=1000000.0,
            use_sliding_window=False)
PUBLISHED = {  # preset: (config.json, parameter count)
    "llama-3-8b": (_L3, 8_030_261_248),
    "llama-3.1-8b": (_L31, 8_030_261_248),
    "llama-3.1-70b": (dict(_L31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                           num_attention_heads=64), 70_553_706_496),
    "llama-3.2-1b": (dict(_L32, hidden_size=2048, num_hidden_layers=16, head_dim=64),
                     1_235_814_400),
    "llama-3.2-3b": (dict(_L32, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                          head_dim=128), 3_212_749_824),
    "qwen2.5-0.5b": (dict(_Q25, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          max_position_embeddings=32768, max_window_layers=24,
                          sliding_window=32768, tie_word_embeddings=True), 494_032_768),
    "qwen2.5-7b": (dict(_Q25, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        max_position_embeddings=131072, max_window_layers=28,
                        sliding_window=131072, tie_word_embeddings=False), 7_615_616_512),
    "mistral-7b": (dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-05,
                        rope_theta=10000.0, sliding_window=4096, hidden_act="silu",
                        tie_word_embeddings=False), 7_241_732_096),
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # tied weights once


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_equal_published_configs_and_counts(name):
    """The preset is what load_model reads from the published config.json; its parameter count
    is the published one, and that of transformers' own model built from that config (meta
    device); LoRA r=32 on the default targets trains as many parameters as PEFT's."""
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM
    config, count = PUBLISHED[name]
    assert config_from_hf(config, name) == PRESETS[name]
    with torch.device("meta"):
        ours = Transformer(PRESETS[name])
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert n_params(ours) == n_params(hf) == count
    A.add_adapter(ours, "lora", r=32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=32, target_modules=A.default_targets(
        ours.config)))
    assert A.count_parameters(ours) == pm.get_nb_trainable_parameters() == (
        LORA_R32[name], count + LORA_R32[name])


# LoRA r=32 on q, k, v, up_proj, down_proj (docs/models.md's table); r * (d_in + d_out) each
LORA_R32 = {"llama-3-8b": 56_623_104, "llama-3.1-8b": 56_623_104, "llama-3.1-70b": 277_872_640,
            "llama-3.2-1b": 15_204_352, "llama-3.2-3b": 33_030_144, "qwen2.5-0.5b": 11_796_480,
            "qwen2.5-7b": 54_132_736, "mistral-7b": 56_623_104}


META_REPOS = {"llama-3-8b": "meta-llama/Llama-3-8B", "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
              "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
              "llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.2-3b": "meta-llama/Llama-3.2-3B"}


@pytest.mark.parametrize("name", META_REPOS)
def test_llama3_presets_equal_meta_params(name):
    """Meta's params.json of each release (llama_models' sku_list) gives the preset's shapes. Its
    scaling is Meta's constants: factor 8 also for Llama 3.2, where HF's config says 32."""
    sku = pytest.importorskip("llama_models.sku_list")
    model = next(m for m in sku.all_registered_models()
                 if m.huggingface_repo == META_REPOS[name] and not m.variant)
    c, preset = meta_config(model.arch_args, name, None), PRESETS[name]
    shape = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
             "intermediate_size", "norm_eps", "rope_theta", "block_size")
    assert {f: getattr(c, f) for f in shape} == {f: getattr(preset, f) for f in shape}
    assert c.rope_scaling == (RopeScaling() if preset.rope_scaling else None)


# --------------------------------------------------------------------------------------------------
# 13. Adapters on these families

NEW = ("llama3", "qwen2", "mistral")
LENGTH = {"llama3": 150, "qwen2": 40, "mistral": 40}


def test_default_targets_on_the_new_families():
    for name in ("tiny-llama3", "tiny-qwen2", "tiny-mistral", "llama-3.2-1b", "qwen2.5-7b"):
        assert A.default_targets(PRESETS[name]) == ["q_proj", "k_proj", "v_proj", "up_proj",
                                                    "down_proj"]


def peft_lora(hf, **config):
    """A PEFT LoRA on hf (wrapped in place) with random lora_B, in eval mode."""
    import peft
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", **config))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm.eval()


@pytest.mark.parametrize("family", NEW)
@torch.no_grad()
def test_peft_lora_folder_loads_here(family, hf_base, tmp_path):
    ckpt, hf = hf_base(family)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft_lora(hf, r=4, lora_alpha=12, target_modules=targets)
    idx = rand_ids(2, LENGTH[family], seed=2)
    try:
        ref = pm(idx).logits
        pm.save_pretrained(tmp_path)
    finally:
        pm.unload()
    ours = adapter_io.load_adapter(load_model(ckpt), tmp_path).eval()
    assert sorted(ours.adapter_configs["default"]["options"]["target_modules"]) == sorted(targets)
    err = max_diff(ours(idx)[0], ref)
    print(f"PEFT LoRA -> ours, {family}: max |logit diff| = {err:.2e}")
    assert err < TOL
    assert max_diff(load_model(ckpt)(idx)[0], ref) > FEATURE  # the LoRA matters


@pytest.mark.parametrize("family", NEW)
@torch.no_grad()
def test_our_lora_loads_in_peft(family, hf_base, tmp_path):
    import peft
    ckpt, hf = hf_base(family)
    ours = load_model(ckpt)
    A.add_adapter(ours, "lora", r=8, alpha=16, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    for p in ours.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ours.eval()
    idx = rand_ids(2, LENGTH[family], seed=2)
    want = ours(idx)[0]
    adapter_io.save_adapter(ours, tmp_path, format="peft", base_model="tiny")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    try:
        got = pm(idx).logits
    finally:
        pm.unload()
    err = max_diff(got, want)
    print(f"ours -> PEFT LoRA, {family}: max |logit diff| = {err:.2e}")
    assert err < TOL
    assert max_diff(load_model(ckpt)(idx)[0], want) > FEATURE


@pytest.mark.filterwarnings("ignore:.*(tie_word_embeddings|save_embedding_layers).*:UserWarning")
def test_lora_on_tied_lm_head_refused_with_the_reason(hf_base, tmp_path):
    """Qwen2.5 0.5B-3B and Llama 3.2 1B/3B tie lm_head to the embeddings: a LoRA merged there
    would change the input embeddings too. Refused (as torchtune does), never silently untied:
    through add_adapter and through a PEFT folder."""
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match="target_modules: lm_head takes no adapter: it is tied to "
                                         "the input embeddings"):
        A.add_adapter(model, "lora", target_modules=["q_proj", "lm_head"])
    assert not A.adapter_names(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="lm_head takes no adapter: only the projections"):
        A.add_adapter(tiny_model("llama3"), "lora", target_modules=["lm_head"])
    ckpt, hf = hf_base("qwen2")
    pm = peft_lora(hf, r=4, target_modules=["q_proj", "lm_head"])
    try:
        pm.save_pretrained(tmp_path)
    finally:
        pm.unload()
    with pytest.raises(ValueError, match=f"{tmp_path}: lm_head takes no adapter: it is tied"):
        adapter_io.load_adapter(load_model(ckpt), tmp_path)


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
def garbage(f):
    f.write_bytes(b"not a checkpoint at all" * 4)


def empty(f):
    f.write_bytes(b"")


class Unsafe:
    def __reduce__(self):
        return (print, ("this ran",))


def unsafe(f):
    torch.save({"w": Unsafe()}, f)


def a_list(f):
    torch.save([torch.ones(2)], f)


@pytest.mark.parametrize("layout, file", [("safetensors", "model.safetensors"),
                                          ("bin", "pytorch_model.bin")])
@pytest.mark.parametrize("damage", [truncate, empty, garbage])
def test_damaged_weight_files(tmp_path, layout, file, damage):
    path, _ = make_hf_checkpoint(tmp_path, "llama", layout=layout)
    damage(path / file)
    with pytest.raises(ValueError, match=f"{path / file}: cannot read it"):
        load_model(path)


@pytest.mark.parametrize("damage, message", [(unsafe, "refused as unsafe"),
                                             (a_list, "expected a dict .* got a list")])
def test_foreign_pickles(tmp_path, damage, message, capsys):
    path, _ = make_hf_checkpoint(tmp_path, "llama", layout="bin")
    damage(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"pytorch_model.bin: {message}"):
        load_model(path)
    assert "this ran" not in capsys.readouterr().out


def test_non_float_weight_is_refused_not_cast(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "llama")
    sd = load_file(path / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].long()
    save_file(sd, path / "model.safetensors")
    refused = "model.safetensors: norm.weight is torch.int64, expected a floating-point tensor"
    with pytest.raises(ValueError, match=refused):
        load_model(path)


def test_config_field_of_the_wrong_type_or_missing(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": "128"}))
    with pytest.raises(ValueError, match="config.json: field 'hidden_size' is '128', expected an "):
        load_model(path)
    del config["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: missing field 'num_hidden_layers'"):
        load_model(path)


def edited(path, name, **fields):
    """Rewrite the JSON file path/name with `fields` changed (None = JSON null)."""
    d = json.loads((path / name).read_text())
    (path / name).write_text(json.dumps({**d, **fields}))


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=None), "field 'hidden_size' is null, which this model type needs"),
    (dict(intermediate_size=-64), "field 'intermediate_size' is -64, expected an integer of at "
                                  "least 1"),
    (dict(num_attention_heads=0), "field 'num_attention_heads' is 0, expected an integer"),
    (dict(rms_norm_eps=float("nan")), "field 'rms_norm_eps' is nan, expected a number above 0"),
    (dict(rope_theta=-1.0), "field 'rope_theta' is -1.0, expected a number above 0"),
    (dict(tie_word_embeddings="yes"), "field 'tie_word_embeddings' is 'yes', expected true or "
                                      "false"),
    (dict(rope_scaling="llama3"), "field 'rope_scaling' is 'llama3', expected a JSON object"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": "8"}), "field 'factor' is '8'"),
    (dict(num_key_value_heads=3), "field 'num_attention_heads' \\(4\\) is not a multiple of "
                                  "'num_key_value_heads' \\(3\\)"),
    (dict(head_dim=None, hidden_size=30), "field 'hidden_size' \\(30\\) is not a multiple of "
                                          "'num_attention_heads' \\(4\\)"),
    (dict(head_dim=7), "the rotary dimension \\(7, field 'rotary_dim' or 'head_dim'\\) must be "
                       "even"),
])
def test_config_json_fields_are_checked_where_they_are_read(tmp_path, fields, message):
    """Each class of bad value in config.json: null where a value is needed, a negative or zero
    count, a non-finite or negative float, a string for a boolean, a nested object that is not
    one (or holds a bad number), sizes that do not divide. One ValueError naming file and field,
    not a TypeError/RuntimeError/ZeroDivisionError from torch."""
    path, _ = make_hf_checkpoint(tmp_path, "llama")
    load_model(path)  # the checkpoint as written loads: the edit alone is refused
    edited(path, "config.json", **fields)
    with pytest.raises(ValueError, match=f"{path / 'config.json'}: {message}"):
        load_model(path)


@pytest.mark.parametrize("fields, message", [
    (dict(n_heads=0), "field 'n_heads' is 0, expected an integer of at least 1"),
    (dict(dim=None), "field 'dim' is null, which this model type needs"),
    (dict(multiple_of=-32), "field 'multiple_of' is -32"),
    (dict(norm_eps="1e-5"), "field 'norm_eps' is '1e-5', expected a number above 0"),
    (dict(vocab_size=0), "field 'vocab_size' is 0, expected an integer of at least 1"),
    (dict(n_heads=5), "field 'dim' \\(64\\) is not a multiple of 'n_heads' \\(5\\)"),
])
def test_params_json_fields_are_checked_where_they_are_read(tmp_path, fields, message):
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"))
    load_model(path)
    edited(path, "params.json", **fields)
    with pytest.raises(ValueError, match=f"{path / 'params.json'}: {message}"):
        load_model(path)


def test_params_json_missing_field(tmp_path):
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"))
    params = json.loads((path / "params.json").read_text())
    del params["dim"]
    (path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="params.json: missing field 'dim'"):
        load_model(path)


def test_index_shard_outside_the_folder_is_refused(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path / "m", "llama", layout="safetensors-sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    shard = path / index["weight_map"][first]
    (tmp_path / "elsewhere.safetensors").write_bytes(shard.read_bytes())
    index["weight_map"][first] = "../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard '\.\./elsewhere\.safetensors' is not a file name"):
        load_model(path)


def meta_shards(path):
    return [(f, torch.load(f, weights_only=True)) for f in sorted(path.glob("consolidated.*.pth"))]


def test_meta_llama1_per_layer_rope_freqs_are_skipped(tmp_path):
    hf = make_hf_model("llama")
    path = make_meta_checkpoint(tmp_path, hf, n_shards=2)
    plain = {k: v.clone() for k, v in load_model(path).state_dict().items()}  # not file-mapped
    for f, sd in meta_shards(path):  # as LLaMA-1's consolidated.*.pth files carry them
        sd.update({f"layers.{i}.attention.inner_attention.rope.freqs": torch.ones(4)
                   for i in range(2)})
        torch.save(sd, f)
    loaded = load_model(path).state_dict()
    assert loaded.keys() == plain.keys() and all(torch.equal(plain[k], loaded[k]) for k in plain)


def test_meta_every_shard_is_checked(tmp_path):
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"), n_shards=2)
    (f, sd), = meta_shards(path)[1:]
    torch.save({**sd, "layers.0.attention.wz.weight": torch.ones(2)}, f)
    with pytest.raises(KeyError, match=r"consolidated\.01\.pth: 1 tensors match no LLaMA"):
        load_model(path)
    torch.save({**sd, "norm.weight": torch.ones(3)}, f)
    shape = r"consolidated\.01\.pth: norm\.weight has shape \(3,\), consolidated\.00"
    with pytest.raises(ValueError, match=shape):
        load_model(path)


def test_meta_shards_must_hold_equal_parts(tmp_path):
    """Model-parallel shards split a tensor in equal parts: one cut differently is refused by name
    (before: torch.cat's "Sizes of tensors must match")."""
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"), n_shards=2)
    (f, sd), = meta_shards(path)[1:]
    torch.save({**sd, "layers.0.attention.wq.weight": sd["layers.0.attention.wq.weight"][:, :-2]},
               f)
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: layers\.0\.attention\.wq\."
                                         r"weight has shape \(32, 62\), consolidated\.00\.pth "
                                         r"has \(32, 64\)"):
        load_model(path)


def test_meta_shard_values_must_be_tensors(tmp_path):
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"), n_shards=2)
    (f, sd), = meta_shards(path)[1:]
    torch.save({**sd, "norm.weight": [1.0] * 64}, f)
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: 'norm\.weight' is a list, "
                                         "expected a tensor"):
        load_model(path)
