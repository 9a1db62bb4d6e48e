"""Shared test helpers: tiny random checkpoints of every supported family, in every on-disk layout.

Import them in any test file (pytest puts tests/ on sys.path):

    from conftest import FAMILIES, make_hf_checkpoint, tiny_model

or use the fixtures `hf_checkpoint` / `meta_checkpoint` (factories bound to the test's tmp_path) and
`hf_base` (one checkpoint per family, shared by a test module).

Families (the `family` argument everywhere):
    llama       LlamaForCausalLM, multi-head attention, intermediate_size 192
                (Meta's rule for dim 64, multiple_of 32)
    llama-gqa   LlamaForCausalLM, 4 heads / 2 key-value heads, intermediate_size 224
                (ffn_dim_multiplier 1.3)
    gptj        GPTJForCausalLM, rotary_dim 8 < head_dim 16
    bloom       BloomForCausalLM (ALiBi, tied embeddings)
    opt         OPTForCausalLM, pre-LN (opt-125m style, tied embeddings)
    opt-350m    OPTForCausalLM, post-LN, word_embed_proj_dim 32 < hidden 64 (project_in/out)
    llama3      LlamaForCausalLM as Llama 3.1: GQA (2 key-value heads), theta 5e5, rope_type llama3
                against original_max_position_embeddings 64 (its frequencies are kept, blended
                and divided), intermediate_size 224 (Meta's rule with ffn_dim_multiplier 1.3)
    qwen2       Qwen2ForCausalLM: biases on q, k, v; tied embeddings; theta 1e6; GQA
    mistral     MistralForCausalLM: sliding window 8; GQA
All have hidden 64, 2 layers, 4 heads, vocab 256. Every parameter is randomised (norm weights
around 1, biases around 0) so that no weight is a no-op and a wrong key map shows up in the logits.

Layouts (the `layout` argument of make_hf_checkpoint):
    safetensors          model.safetensors                         (transformers' save_pretrained)
    safetensors-sharded  model-0000i-of-0000n.safetensors + index  (save_pretrained, max_shard_size)
    bin                  pytorch_model.bin                         (torch.save of the state dict)
    bin-sharded          pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json
transformers 5 writes only safetensors, so the .bin layouts are written here by hand, as older
releases wrote them: the full state dict (tied lm_head.weight included) and, for GPT-J, the legacy
causal-mask buffers `transformer.h.N.attn.bias` / `attn.masked_bias` that the loader must skip.

transformers is imported lazily, so test files that never build a checkpoint
do not pay for the import.
"""
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The test models are tiny: one intra-op thread is far faster than a thread pool that spins on a
# shared 2-core box.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import model` from any test file

FAMILIES = ("llama", "llama-gqa", "gptj", "bloom", "opt", "opt-350m", "llama3", "qwen2", "mistral")
LAYOUTS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")
VOCAB = 256

# family -> (our Config preset, overrides) for models built without a checkpoint (see tiny_model)
PRESET_OF = {"llama": ("tiny-llama", {}), "llama-gqa": ("tiny-llama-gqa", {}),
             "gptj": ("tiny-gptj", {}), "bloom": ("tiny-bloom", {}), "opt": ("tiny-opt", {}),
             "opt-350m": ("tiny-opt", dict(post_norm=True, final_norm=False, embed_dim=32)),
             "llama3": ("tiny-llama3", {}), "qwen2": ("tiny-qwen2", {}),
             "mistral": ("tiny-mistral", {})}


def tiny_hf_config(family, **overrides):
    """A transformers config of the given family (see the module docstring); keyword
    overrides win."""
    import transformers as tf
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family in ("llama", "llama-gqa"):
        kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, rms_norm_eps=1e-5, intermediate_size=192)
        if family == "llama-gqa":
            kw.update(num_key_value_heads=2, intermediate_size=224)
        return tf.LlamaConfig(**{**common, **kw, **overrides})
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=192, max_position_embeddings=128)
    if family == "llama3":
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=64)
        return tf.LlamaConfig(**{**common, **small, "intermediate_size": 224, "rms_norm_eps": 1e-5,
                                 "max_position_embeddings": 1024, "rope_parameters": rope,
                                 **overrides})
    if family == "qwen2":
        return tf.Qwen2Config(**{**common, **small, "tie_word_embeddings": True,
                                 "rope_parameters": dict(rope_type="default", rope_theta=1e6),
                                 **overrides})
    if family == "mistral":
        return tf.MistralConfig(**{**common, **small, "sliding_window": 8, **overrides})
    if family == "gptj":
        return tf.GPTJConfig(**{**common, "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8,
                                "n_inner": 128, "n_positions": 128, **overrides})
    if family == "bloom":
        return tf.BloomConfig(**{**common, "hidden_size": 64, "n_layer": 2, "n_head": 4,
                                 **overrides})
    if family in ("opt", "opt-350m"):
        kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                  max_position_embeddings=128, word_embed_proj_dim=64, do_layer_norm_before=True)
        if family == "opt-350m":
            kw.update(word_embed_proj_dim=32, do_layer_norm_before=False)
        return tf.OPTConfig(**{**common, **kw, **overrides})
    raise ValueError(f"unknown test family {family!r}; families: {FAMILIES}")


@torch.no_grad()
def randomize_(module, seed=0, std=0.1, vector_std=0.2):
    """Overwrite every parameter of `module` in place: matrices ~ N(0, std), 1-D weights (norm
    scales) ~ 1 + N(0, vector_std), 1-D biases ~ N(0, vector_std). Deterministic in `seed`; tied
    weights are set once. Returns module."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.dim() == 1:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + vector_std * noise)
        else:
            p.copy_(std * noise)
    return module


def make_hf_model(family, seed=0, **overrides):
    """A randomised fp32 transformers model of the family, in eval mode."""
    import transformers as tf
    cfg = tiny_hf_config(family, **overrides)
    cls = {"llama": tf.LlamaForCausalLM, "llama-gqa": tf.LlamaForCausalLM,
           "gptj": tf.GPTJForCausalLM, "bloom": tf.BloomForCausalLM,
           "opt": tf.OPTForCausalLM, "opt-350m": tf.OPTForCausalLM,
           "llama3": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
           "mistral": tf.MistralForCausalLM}[family]
    torch.manual_seed(seed)
    return randomize_(cls(cfg), seed).float().eval()


def gptj_legacy_buffers(n_layer, n_positions):
    """The non-parameter tensors that GPT-J's original .bin files carry for every layer (must be
    ignored)."""
    out = {}
    for i in range(n_layer):
        out[f"transformer.h.{i}.attn.bias"] = torch.tril(
            torch.ones(n_positions, n_positions, dtype=torch.bool))[None, None]
        out[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    return out


def write_state_dict(path, tensors, layout, n_shards=3):
    """Write a name -> tensor dict into folder `path` in `layout` (see LAYOUTS; sharded layouts get
    an index with a weight_map). Tensors that share memory are saved as separate copies in
    safetensors. Returns the written files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    safe = layout.startswith("safetensors")
    if layout in ("safetensors", "bin"):
        groups = [names]
        files = ["model.safetensors" if safe else "pytorch_model.bin"]
    elif layout in ("safetensors-sharded", "bin-sharded"):
        n = min(n_shards, len(names))
        groups = [names[i::n] for i in range(n)]
        files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if safe
                 else f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
                 for i in range(n)]
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": {k: f for f, g in zip(files, groups) for k in g}}
        (path / ("model.safetensors.index.json" if safe
                 else "pytorch_model.bin.index.json")).write_text(json.dumps(index, indent=2))
    else:
        raise ValueError(f"unknown layout {layout!r}; layouts: {LAYOUTS}")
    for f, g in zip(files, groups):
        part = {k: tensors[k] for k in g}
        if safe:
            from safetensors.torch import save_file
            save_file({k: t.detach().contiguous().clone() for k, t in part.items()}, path / f,
                      metadata={"format": "pt"})
        else:
            torch.save(part, path / f)
    return [path / f for f in files]


def make_hf_checkpoint(path, family, layout="safetensors", seed=0, strip_prefix=False,
                       extra_tensors=None, drop=(), **overrides):
    """Write a tiny random checkpoint of `family` into folder `path` (created) and
    return (path, hf_model).

    layout: one of LAYOUTS. Plain safetensors layouts come from transformers' own save_pretrained;
    .bin layouts hold the full state dict (GPT-J's legacy attn.bias/attn.masked_bias buffers
    included). strip_prefix: save the keys of the bare base model, without the outer `transformer.`
    (BLOOM, GPT-J) / `model.` (OPT, LLaMA) prefix, as the original BLOOM/OPT releases did
    (checkpoints.py accepts that for BLOOM and OPT only). extra_tensors: name -> tensor added to the
    checkpoint; drop: names removed.
    overrides go to tiny_hf_config."""
    path = Path(path)
    hf = make_hf_model(family, seed, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    custom = strip_prefix or extra_tensors or drop or layout.startswith("bin")
    if not custom:
        kw = {"max_shard_size": "20KB"} if layout == "safetensors-sharded" else {}
        hf.save_pretrained(path, **kw)
        n_files = len(list(path.glob("model*.safetensors")))
        assert (n_files > 1) == (layout == "safetensors-sharded"), (
            f"{layout}: wrote {n_files} safetensors files")
        return path, hf
    hf.config.save_pretrained(path)
    sd = dict(hf.state_dict())
    if layout.startswith("safetensors") and hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors files never hold the tied copy
    if family == "gptj" and layout.startswith("bin"):
        sd.update(gptj_legacy_buffers(hf.config.n_layer, hf.config.n_positions))
    if strip_prefix:
        outer = "transformer." if family in ("gptj", "bloom") else "model."
        sd = {k[len(outer):] if k.startswith(outer) else k: v for k, v in sd.items()}
    for k in drop:
        del sd[k]
    sd.update(extra_tensors or {})
    write_state_dict(path, sd, layout)
    return path, hf


def hf_to_meta(hf_model, n_shards=1):
    """Convert a transformers LLaMA to Meta's consolidated.NN.pth state dicts (a list of n_shards),
    the inverse of checkpoints.meta_to_rotate_half: q/k rows go back to Meta's interleaved
    (2j, 2j+1) pairing. Model-parallel shards are split as Meta's releases are:
    wq/wk/wv/w1/w3/output along dim 0, wo/w2/tok_embeddings along dim 1, norms replicated. Each
    shard also carries a `rope.freqs` tensor, as the LLaMA-1 files do."""
    c = hf_model.config
    sd = hf_model.state_dict()
    D = c.hidden_size // c.num_attention_heads

    # HF rows per head: [x_0..x_{D/2-1}, y_0..y_{D/2-1}] -> Meta: [x_0, y_0, x_1, y_1, ...]
    def to_meta(w, n_heads):
        return w.reshape(n_heads, 2, D // 2, -1).transpose(1, 2).reshape(w.shape).clone()

    full = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1),
            "norm.weight": (sd["model.norm.weight"], None),
            "output.weight": (sd["lm_head.weight"], 0)}
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        full.update({
            q + "attention.wq.weight": (to_meta(sd[p + "self_attn.q_proj.weight"],
                                                c.num_attention_heads), 0),
            q + "attention.wk.weight": (to_meta(sd[p + "self_attn.k_proj.weight"],
                                                c.num_key_value_heads), 0),
            q + "attention.wv.weight": (sd[p + "self_attn.v_proj.weight"], 0),
            q + "attention.wo.weight": (sd[p + "self_attn.o_proj.weight"], 1),
            q + "feed_forward.w1.weight": (sd[p + "mlp.gate_proj.weight"], 0),
            q + "feed_forward.w2.weight": (sd[p + "mlp.down_proj.weight"], 1),
            q + "feed_forward.w3.weight": (sd[p + "mlp.up_proj.weight"], 0),
            q + "attention_norm.weight": (sd[p + "input_layernorm.weight"], None),
            q + "ffn_norm.weight": (sd[p + "post_attention_layernorm.weight"], None)})
    freqs = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2).float() / D))
    shards = [{"rope.freqs": freqs.clone()} for _ in range(n_shards)]
    for k, (t, dim) in full.items():
        parts = [t] * n_shards if dim is None else t.chunk(n_shards, dim=dim)
        assert len(parts) == n_shards, (f"{k}: cannot split {tuple(t.shape)} into {n_shards} "
                                        f"along {dim}")
        for s, part in zip(shards, parts):
            s[k] = part.clone()
    return shards


def meta_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """Meta's SwiGLU width rule (llama/model.py FeedForward)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def make_meta_checkpoint(path, hf_model, n_shards=1, multiple_of=32, ffn_dim_multiplier=None):
    """Write hf_model (a transformers LLaMA) as a Meta folder: params.json + consolidated.00.pth ..
    (n_shards). multiple_of / ffn_dim_multiplier must reproduce the model's intermediate_size under
    Meta's rule. Returns path."""
    c = hf_model.config
    if meta_hidden_dim(c.hidden_size, multiple_of, ffn_dim_multiplier) != c.intermediate_size:
        raise ValueError(f"multiple_of={multiple_of}, ffn_dim_multiplier={ffn_dim_multiplier} "
                         f"do not give intermediate_size={c.intermediate_size} "
                         f"for dim={c.hidden_size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers,
              "n_heads": c.num_attention_heads, "multiple_of": multiple_of,
              "norm_eps": c.rms_norm_eps, "vocab_size": -1}
    if c.num_key_value_heads != c.num_attention_heads:
        params["n_kv_heads"] = c.num_key_value_heads
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    (path / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(hf_to_meta(hf_model, n_shards)):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    return path


def tiny_model(family, seed=0, **overrides):
    """Our model.Transformer for a family, built from the tiny presets (no checkpoint), randomised,
    fp32, eval."""
    from model import Transformer
    from presets import Config
    preset, kw = PRESET_OF[family]
    torch.manual_seed(seed)
    return randomize_(Transformer(Config.from_name(preset, **{**kw, **overrides})), seed).eval()


def left_pad(seqs, pad_id=0):
    """List of 1-D token tensors -> (idx (B, T), attention_mask (B, T)), left-padded to the
    longest."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, T - len(s):], mask[i, T - len(s):] = s, 1
    return idx, mask


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: hf_checkpoint(family, layout="safetensors", **kw) -> (path, hf_model), in a fresh
    tmp folder."""
    n = [0]

    def make(family, layout="safetensors", **kw):
        n[0] += 1
        return make_hf_checkpoint(tmp_path / f"{family}-{layout}-{n[0]}", family, layout, **kw)
    return make


@pytest.fixture
def meta_checkpoint(tmp_path):
    """Factory: meta_checkpoint(hf_model, n_shards=1, multiple_of=32, ffn_dim_multiplier=None)
    -> path."""
    n = [0]

    def make(hf_model, **kw):
        n[0] += 1
        return make_meta_checkpoint(tmp_path / f"meta-{n[0]}", hf_model, **kw)
    return make


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """Factory, module-scoped: hf_base(family) -> (checkpoint folder, transformers model), seed 3,
    written once per test module (PEFT tests wrap the model and unload it again)."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"hf-{family}")
            cache[family] = make_hf_checkpoint(folder, family, seed=3)
        return cache[family]
    return get


WORDS = ("how many apples does Tom have now if he buys more pens and gives some to Ann "
         "the answer is").split()


def sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A base-model folder: random tiny-llama (config.json + model.safetensors) and a LLaMA-like
    tokenizer.model (eval, tools tests)."""
    from checkpoints import save_model
    from data.template import format_prompt
    from model import Transformer
    from presets import Config
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    lines = [format_prompt(sentence(rng, 3, 20) + f" {rng.randint(0, 999)}?")
             + f"The answer is {rng.randint(0, 99)}." for _ in range(300)]
    folder = tmp_path_factory.mktemp("tiny")
    # byte_fallback needs 256 byte pieces, so the vocabulary is a bit over 256
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines),
                                   model_prefix=str(folder / "tokenizer"), vocab_size=360,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   byte_fallback=True, split_digits=True, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    torch.manual_seed(0)
    model = Transformer(Config.from_name("tiny-llama", vocab_size=360))
    save_model(randomize_(model, seed=0), folder)
    return folder


def trained_adapter(base_dir, kind, out, **options):
    """An adapter of `kind` on the base in base_dir with random (non-zero) weights, saved to out
    (as train.py leaves it); returns the model with it, in eval mode."""
    import adapter_io
    import adapters
    from checkpoints import load_model
    from slots import slots
    model = adapters.add_adapter(load_model(base_dir), kind, **options)
    torch.manual_seed(1)
    for _, _, slot in slots(model):
        randomize_(slot, std=0.05)
    adapter_io.save_adapter(model, out, base_model=str(base_dir))
    return model.eval()


@pytest.fixture(scope="module")
def train_base(tmp_path_factory):
    """A checkpoint folder train.py and eval.py take as --model (random weights: the tests of bad
    input need no good model; one layer, 32 wide: quick), a sentencepiece tokenizer trained on
    the demo's corpus, and rows.json, a training file of 40 rows."""
    from checkpoints import save_model
    from data import synthetic
    from data.prepare import write_json
    from model import Transformer
    from presets import Config
    from tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("base")
    synthetic.train_tokenizer(synthetic.pretrain_corpus(300, seed=0), str(root / "tokenizer"))
    torch.manual_seed(0)
    vocab = Tokenizer.from_pretrained(root).vocab_size
    config = Config("t", vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, intermediate_size=64,
                    block_size=256)
    save_model(Transformer(config), root)
    write_json(root / "rows.json", synthetic.finetune_split(40, 4, seed=1)[0])
    return root


def saved_lora(base_dir, out, **kw):
    """A LoRA (r=4, as initialised) on the base in base_dir, saved to out (save_adapter's keywords:
    format="peft", ...); returns out."""
    import adapter_io
    import adapters
    from checkpoints import load_model
    adapter_io.save_adapter(adapters.add_adapter(load_model(base_dir), "lora", r=4), out, **kw)
    return out


def truncate(f):
    """Cut file f to half its bytes, as an interrupted download or copy leaves it."""
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
