"""
Checkpoint I/O: the official layouts in, a Hugging Face folder out, and the one atomic writer of
the project.

    load_model(path, device=None, dtype=None)   Meta LLaMA (params.json + consolidated.NN.pth,
                                                1..N model-parallel shards) or Hugging Face
                                                (config.json + safetensors / .bin, sharded or
                                                not) -> Transformer, strictly: every parameter
                                                filled, every checkpoint tensor used or skipped
                                                by name, in every file
    save_model(model, path)                     the base weights as a Hugging Face folder both
                                                loaders (and transformers) read
    write_atomic(path, data)                    every file the project writes goes through here

The model is built on the meta device and filled tensor by tensor (memory-mapped reads, cast as it
goes), so a 7B model's weights are held once. Pickles (.bin, .pth) load with weights_only=True: no
code in them ever runs.
"""
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from files import read_json, read_state_dict, unreadable, write_atomic
from model import Transformer
from presets import FAMILIES, Config, RopeScaling
from quantize import check_mode, is_projection, is_quantized, quantize_linear


def save_model(model, path):
    """Write the base model as a Hugging Face folder (config.json + model.safetensors with official
    names) that load_model and transformers both read. Adapter tensors are not base weights and are
    left out (see adapter_io.save_adapter, or adapters.merge first). Files are written to temporary
    names, then renamed."""
    from safetensors.torch import save
    if is_quantized(model):
        raise ValueError("save_model: this base is quantized; saving it would lose precision for "
                         "good. Save the model loaded without quantize")
    # the base's tensors are those a freshly built model of this config has: adapters sit in hook
    # slots that a fresh model leaves empty, so nothing here needs to know their names
    with torch.device("meta"):
        names = {n for n, _ in Transformer(model.config).named_parameters()}
    sd = model.state_dict()
    tensors = {hf_name(model.config, n): sd[n].contiguous() for n in names}
    write_atomic(Path(path) / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    write_atomic(Path(path) / "config.json", json.dumps(config_to_hf(model.config), indent=2))


def load_model(path, device=None, dtype=None, quantize=None, shard=None):
    """Load a Meta LLaMA folder (params.json + consolidated.*.pth) or a Hugging Face folder
    (config.json + safetensors or .bin, sharded or not). Built on the meta device and filled tensor
    by tensor, so the weights are held once; dtype=None keeps the stored dtype. Strict: every
    parameter filled, every tensor used. quantize="int8" | "nf4" | "nf4-dq" packs each projection
    weight as it is read (quantize.py). shard(meta model) -> that model split over the processes
    (distributed.py, FSDP2), before any weight is read: each tensor read is then cut to this
    process's part, so no process ever holds the whole base."""
    path = Path(path)
    if quantize:
        check_mode(quantize)
    if (path / "params.json").exists():
        return _load_meta(path, device, dtype, quantize, shard)
    if (path / "config.json").exists():
        return _load_hf(path, device, dtype, quantize, shard)
    raise FileNotFoundError(f"{path}: no params.json (Meta LLaMA) or "
                            "config.json (Hugging Face) found")


# --------------------------------------------------------------------------------------------------
# Hugging Face layout


# our parameter-name prefix -> official Hugging Face prefix ({i} = layer). Applied in order, first
# match wins.
HF_PREFIXES = {
    "llama": [("embed.", "model.embed_tokens."),
              ("layers.{i}.norm_1.", "model.layers.{i}.input_layernorm."),
              ("layers.{i}.norm_2.", "model.layers.{i}.post_attention_layernorm."),
              ("layers.{i}.attn.", "model.layers.{i}.self_attn."),
              ("layers.{i}.mlp.", "model.layers.{i}.mlp."),
              ("norm.", "model.norm."),
              ("lm_head.", "lm_head.")],
    "gptj": [("embed.", "transformer.wte."),
             ("layers.{i}.norm_1.", "transformer.h.{i}.ln_1."),
             ("layers.{i}.attn.", "transformer.h.{i}.attn."),
             ("layers.{i}.mlp.", "transformer.h.{i}.mlp."),
             ("norm.", "transformer.ln_f."),
             ("lm_head.", "lm_head.")],
    "bloom": [("embed.", "transformer.word_embeddings."),
              ("embed_norm.", "transformer.word_embeddings_layernorm."),
              ("layers.{i}.norm_1.", "transformer.h.{i}.input_layernorm."),
              ("layers.{i}.norm_2.", "transformer.h.{i}.post_attention_layernorm."),
              ("layers.{i}.attn.", "transformer.h.{i}.self_attention."),
              ("layers.{i}.mlp.", "transformer.h.{i}.mlp."),
              ("norm.", "transformer.ln_f."),
              ("lm_head.", "lm_head.")],
    "opt": [("embed.", "model.decoder.embed_tokens."),
            ("pos_embed.", "model.decoder.embed_positions."),
            ("project_in.", "model.decoder.project_in."),
            ("project_out.", "model.decoder.project_out."),
            ("layers.{i}.norm_1.", "model.decoder.layers.{i}.self_attn_layer_norm."),
            ("layers.{i}.norm_2.", "model.decoder.layers.{i}.final_layer_norm."),
            ("layers.{i}.attn.", "model.decoder.layers.{i}.self_attn."),
            ("layers.{i}.mlp.", "model.decoder.layers.{i}."),
            ("norm.", "model.decoder.final_layer_norm."),
            ("lm_head.", "lm_head.")],
}
# checkpoints saved from the bare base model (BloomModel, OPTModel) lack the outer prefix
HF_OUTER = {"bloom": "transformer.", "opt": "model."}
# checkpoint tensors that are not parameters here: precomputed rotary tables and GPT-J's
# causal-mask buffers
HF_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.attn\.(masked_)?bias)$")


def hf_name(config, name):
    """Our parameter or module name -> the official Hugging Face name, e.g.
    layers.0.attn.q_proj.weight -> model.layers.0.self_attn.q_proj.weight."""
    m = re.match(r"layers\.(\d+)\.", name)
    for ours, theirs in HF_PREFIXES[config.arch]:
        ours = ours.format(i=m.group(1)) if m else ours
        if name.startswith(ours):
            return theirs.format(i=m.group(1) if m else "") + name[len(ours):]
    raise KeyError(f"no Hugging Face name for {name!r} ({config.arch})")


def config_to_hf(c):
    """Config -> Hugging Face config.json dict (the inverse of config_from_hf), for
    save_pretrained."""
    common = dict(vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings)
    if c.arch == "llama":
        return dict(common, **_llama_like_to_hf(c))
    if c.arch == "gptj":
        return dict(common, model_type="gptj", architectures=["GPTJForCausalLM"],
                    n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                    n_inner=c.intermediate_size, n_positions=c.block_size,
                    rotary_dim=c.rotary_dim, layer_norm_epsilon=c.norm_eps,
                    activation_function="gelu_new")
    if c.arch == "bloom":
        return dict(common, model_type="bloom", architectures=["BloomForCausalLM"],
                    hidden_size=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                    layer_norm_epsilon=c.norm_eps)
    return dict(common, model_type="opt", architectures=["OPTForCausalLM"], hidden_size=c.n_embd,
                ffn_dim=c.intermediate_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, max_position_embeddings=c.block_size,
                word_embed_proj_dim=c.embed_dim, do_layer_norm_before=not c.post_norm,
                enable_bias=c.attn_bias,
                _remove_final_layer_norm=not c.final_norm and not c.post_norm,
                activation_function="relu")


def _llama_like_to_hf(c):
    """The model_type that holds c's maths: Qwen2 for biases on q, k, v alone, Mistral for a
    window, LLaMA otherwise (its attention_bias covers o_proj too); rotary scaling in the hub's
    form (rope_scaling beside rope_theta), which transformers 4 and 5 both read."""
    t = "qwen2" if c.qkv_bias else "mistral" if c.sliding_window else "llama"
    if t != "llama" and (c.attn_bias or c.mlp_bias):
        raise ValueError(f"{c.name}: attn_bias / mlp_bias with qkv_bias or sliding_window has no "
                         "Hugging Face model_type")
    scaling = c.rope_scaling and dict(rope_type="llama3", **vars(c.rope_scaling))
    d = dict(model_type=t, architectures=[HF_CLASS[t]],
             hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
             num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
             num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
             max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
             rope_theta=c.rope_theta, rope_scaling=scaling, hidden_act="silu")
    if t == "llama":
        return dict(d, attention_bias=c.attn_bias, mlp_bias=c.mlp_bias, bos_token_id=1,
                    eos_token_id=2)
    if t == "mistral":
        return dict(d, sliding_window=c.sliding_window)
    # Qwen2 windows layers max_window_layers.. only: 0 puts the window on every layer
    return dict(d, use_sliding_window=bool(c.sliding_window),
                sliding_window=c.sliding_window or None, max_window_layers=0)


HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mistral": "MistralForCausalLM"}


def config_from_hf(d, name):
    """Hugging Face config.json dict -> Config."""
    t = d.get("model_type")
    if t in HF_CLASS:
        return _llama_like(d, name, t)
    if t == "gptj":
        return Config(name, **{**FAMILIES["gptj"], "vocab_size": d["vocab_size"],
                               "n_layer": d["n_layer"], "n_head": d["n_head"],
                               "n_embd": d["n_embd"],
                               "intermediate_size": d.get("n_inner") or 4 * d["n_embd"],
                               "block_size": d.get("n_positions", 2048),
                               "rotary_dim": d.get("rotary_dim") or 0,
                               "norm_eps": d.get("layer_norm_epsilon", 1e-5),
                               "tie_embeddings": d.get("tie_word_embeddings", False)})
    if t == "bloom":
        if d.get("apply_residual_connection_post_layernorm"):
            raise ValueError(f"{name}: apply_residual_connection_post_layernorm=True "
                             "is not supported")
        h = d.get("hidden_size") or d["n_embed"]
        return Config(name, **{**FAMILIES["bloom"], "vocab_size": d["vocab_size"],
                               "n_layer": d.get("n_layer") or d["num_hidden_layers"],
                               "n_head": d.get("n_head") or d["num_attention_heads"], "n_embd": h,
                               "intermediate_size": 4 * h,
                               "norm_eps": d.get("layer_norm_epsilon", 1e-5)})
    if t == "opt":
        if d.get("activation_function", "relu") != "relu":
            raise ValueError(f"{name}: activation_function {d['activation_function']!r} "
                             "is not supported (relu)")
        pre = d.get("do_layer_norm_before", True)
        return Config(name, **{**FAMILIES["opt"], "vocab_size": d["vocab_size"],
                               "n_layer": d["num_hidden_layers"],
                               "n_head": d["num_attention_heads"], "n_embd": d["hidden_size"],
                               "intermediate_size": d["ffn_dim"],
                               "block_size": d.get("max_position_embeddings", 2048),
                               "post_norm": not pre, "embed_dim": d.get("word_embed_proj_dim") or 0,
                               "final_norm": pre and not d.get("_remove_final_layer_norm", False),
                               "attn_bias": d.get("enable_bias", True),
                               "mlp_bias": d.get("enable_bias", True),
                               "tie_embeddings": d.get("tie_word_embeddings", True)})
    raise ValueError(f"{name}: model_type {t!r} is not supported "
                     "(llama, qwen2, mistral, gptj, bloom, opt)")


# transformers' max_position_embeddings where config.json leaves it out
HF_CONTEXT = {"llama": 2048, "qwen2": 32768, "mistral": 131072}


def _llama_like(d, name, t):
    """LLaMA, Qwen2 and Mistral: one architecture with the same names and key map. Qwen2 has
    biases on q, k, v (not o_proj); Mistral a sliding window; LLaMA attention_bias (q, k, v, o)
    and mlp_bias."""
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{name}: hidden_act {d['hidden_act']!r} is not supported (silu)")
    theta, scaling = _rope(d, name)
    return Config(name, arch="llama", vocab_size=d["vocab_size"],
                  n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
                  n_kv_head=d.get("num_key_value_heads") or 0, n_embd=d["hidden_size"],
                  head_dim=d.get("head_dim") or 0, intermediate_size=d["intermediate_size"],
                  block_size=d.get("max_position_embeddings") or HF_CONTEXT[t],
                  norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                  attn_bias=t == "llama" and d.get("attention_bias", False),
                  qkv_bias=t == "qwen2",
                  mlp_bias=t == "llama" and d.get("mlp_bias", False),
                  tie_embeddings=d.get("tie_word_embeddings", False),
                  sliding_window=_window(d, name, t))


# the fields of each rope_type; any other type (linear, dynamic, yarn, longrope, ...) is refused
ROPE_FIELDS = {"default": set(),
               "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings"}}


def _rope(d, name):
    """(rope_theta, RopeScaling or None) from either form of config.json: the hub's (rope_scaling
    beside a top-level rope_theta) or transformers 5's (rope_parameters holding rope_type and
    rope_theta). As transformers: rope_scaling wins over rope_parameters, and a rope_theta inside
    over the top-level one."""
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    rope = d.get(key) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{name}: {key} is {rope!r}, expected a JSON object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_FIELDS:
        raise ValueError(f"{name}: {key} has rope_type {kind!r}, which is not supported "
                         f"({', '.join(ROPE_FIELDS)})")
    unknown = sorted(set(rope) - ROPE_FIELDS[kind] - {"rope_type", "type", "rope_theta"})
    if unknown:
        raise ValueError(f"{name}: {key} field(s) {unknown} are not supported with rope_type "
                         f"{kind!r}")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{name}: partial_rotary_factor {d['partial_rotary_factor']} is not "
                         "supported (rotary over the whole head)")
    theta = _number(rope.get("rope_theta", d.get("rope_theta", 10000.0)), "rope_theta", name)
    if kind == "default":
        return theta, None
    # transformers: a top-level original_max_position_embeddings wins, max_position_embeddings is
    # the last resort
    old = (d.get("original_max_position_embeddings")
           or rope.get("original_max_position_embeddings") or d.get("max_position_embeddings"))
    fields = dict(rope, original_max_position_embeddings=old)
    return theta, RopeScaling(**{f: _number(fields.get(f), f"{key} {f}", name)
                                 for f in ROPE_FIELDS[kind]})


def _number(v, field, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name}: {field} is {v!r}, expected a number")
    return v


def _window(d, name, t):
    """The sliding window (0 = none). Mistral: sliding_window (null in v0.2 on). Qwen2: only with
    use_sliding_window, and only on the layers listed as sliding_attention (by default those from
    max_window_layers on): all of them or none is one window here; a mix is refused."""
    if t == "mistral":
        return _number(d.get("sliding_window") or 0, "sliding_window", name)
    if t == "llama" or not d.get("use_sliding_window") or not d.get("sliding_window"):
        return 0
    n, first = d["num_hidden_layers"], d.get("max_window_layers", 28)
    types = d.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                     for i in range(n)]
    sliding = [kind == "sliding_attention" for kind in types]
    if any(sliding) and not all(sliding):
        raise ValueError(f"{name}: use_sliding_window on {sum(sliding)} of {n} layers "
                         f"(max_window_layers={first}, layer_types) is not supported: here the "
                         "window covers every layer or none")
    return _number(d["sliding_window"], "sliding_window", name) if all(sliding) else 0


class _Filler:
    """Puts checkpoint tensors into a model built on the meta device, strictly, one tensor at a
    time."""

    def __init__(self, model, device, dtype, quantize=None, shard=None):
        model = model if shard is None else shard(model)
        self.model, self.device, self.dtype, self.quantize = model, device, dtype, quantize
        self.params = dict(model.named_parameters())  # tied weights appear once
        self.filled = set()

    def put(self, name, t, source):
        p = self.params.get(name)
        if p is None or name in self.filled:
            raise KeyError(f"{source}: {'duplicate' if p is not None else 'unexpected'} tensor "
                           f"for parameter {name}")
        check_float(name, t, source)
        if t.shape != p.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, "
                             f"the config expects {tuple(p.shape)}")
        module, _, leaf = name.rpartition(".")
        owner = self.model.get_submodule(module)
        if isinstance(p, DTensor):  # sharded (FSDP2): this process keeps its part only
            part = distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            with torch.no_grad():
                p.to_local().copy_(part.to_local())
        elif self.quantize and leaf == "weight" and is_projection(owner):  # packed as it is read
            t = t.to(self.device or "cpu")
            quantize_linear(self.model, module, t, self.quantize, self.dtype)
        else:
            t = t.to(device=self.device or "cpu", dtype=self.dtype or t.dtype)
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=p.requires_grad)
        self.filled.add(name)

    def finish(self, source):
        missing = sorted(set(self.params) - self.filled)
        if missing:
            raise KeyError(f"{source}: {len(missing)} parameters missing from the checkpoint: "
                           f"{missing[:8]}")
        self.model.tie_weights()
        return self.model


def check_float(name, t, source):
    """Weights are floating-point tensors: an int, bool or other object is an error, never cast."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{source}: {name} is {what}, expected a floating-point tensor")


# The fields of config.json and params.json that reach the maths, by type, checked once where the
# file is read: a value of another type is one line naming the file, the field and what it should
# be, never a traceback from deep inside torch or a model built wrong. null = the field not given.
INT_FIELDS = {"vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "hidden_size", "head_dim", "intermediate_size", "max_position_embeddings", "n_layer",
              "n_head", "n_embd", "n_embed", "n_inner", "n_positions", "rotary_dim", "ffn_dim",
              "word_embed_proj_dim", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
              "sliding_window", "max_window_layers", "original_max_position_embeddings"}
FLOAT_FIELDS = {"rms_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta",
                "ffn_dim_multiplier", "factor", "low_freq_factor", "high_freq_factor",
                "partial_rotary_factor"}
BOOL_FIELDS = {"tie_word_embeddings", "attention_bias", "mlp_bias", "do_layer_norm_before",
               "enable_bias", "_remove_final_layer_norm", "use_scaled_rope", "use_sliding_window",
               "apply_residual_connection_post_layernorm"}
OBJECT_FIELDS = {"rope_scaling", "rope_parameters"}  # their numbers are checked as above too
LEAST = {"max_window_layers": 0}  # counts are at least 1 unless named here
SPECIAL = {("params.json", "vocab_size"): -1}  # Meta's "as many as the embedding has rows"
# (a size, the count it is split into): the names each layout gives them
HEADS = ("num_attention_heads", "n_head", "n_heads")
DIVIDES = [(("hidden_size", "n_embd", "n_embed", "dim"), HEADS),
           (HEADS, ("num_key_value_heads", "n_kv_heads"))]


def check_field(f, k, v):
    """One field's value against the tables above; ValueError naming file and field."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if k in INT_FIELDS:
        least = LEAST.get(k, 1)
        ok = number and v == int(v) and (v >= least or v == SPECIAL.get((Path(f).name, k)))
        expected = f"an integer of at least {least}"
    elif k in FLOAT_FIELDS:
        ok, expected = number and v > 0, "a number above 0"
    elif k in BOOL_FIELDS:
        ok, expected = isinstance(v, bool), "true or false"
    elif k in OBJECT_FIELDS:
        ok, expected = isinstance(v, dict), "a JSON object"
    else:
        return
    if not ok:
        raise ValueError(f"{f}: field {k!r} is {v!r}, expected {expected}")
    for kk, vv in (v.items() if k in OBJECT_FIELDS else ()):
        if vv is not None:
            check_field(f, kk, vv)


def read_config(f, make):
    """A config file (config.json, params.json) -> make(its dict), with one clear line for a field
    that is missing, null where a value is needed, of the wrong type or sign, or that does not
    divide as the model needs (hidden_size by num_attention_heads, ...)."""
    d = read_json(f)
    given = {k: v for k, v in d.items() if v is not None}  # null: as if left out
    for k, v in given.items():
        check_field(f, k, v)
    for sizes, counts in DIVIDES:
        size, count = (next((k for k in names if k in given), None) for names in (sizes, counts))
        explicit_head_dim = "head_dim" in given and count in HEADS  # then q is heads x head_dim
        if size and count and given[size] % given[count] and not explicit_head_dim:
            raise ValueError(f"{f}: field {size!r} ({given[size]}) is not a multiple of "
                             f"{count!r} ({given[count]})")
    try:
        c = make({k: int(v) if k in INT_FIELDS else v for k, v in given.items()})
    except KeyError as e:
        k = e.args[0]
        if k in d:
            raise ValueError(f"{f}: field {k!r} is null, which this model type needs") from None
        raise ValueError(f"{f}: missing field {k!r}, which this model type needs") from None
    if c.pos == "rope" and (c.rotary_dim % 2 or c.rotary_dim > c.head_dim):  # rotated in pairs
        raise ValueError(f"{f}: the rotary dimension ({c.rotary_dim}, field 'rotary_dim' or "
                         f"'head_dim') must be even and at most the head's ({c.head_dim})")
    return c


def _hf_files(path):
    """The weight files of a HF folder, safetensors preferred over .bin, each checked to exist."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).exists():
            return [path / single]
        if (path / index).exists():
            weight_map = read_json(path / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{path / index}: no 'weight_map' of tensor name -> shard file")
            for name in set(weight_map.values()):  # no "../x", "/abs/x", "sub/x": this folder
                if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
                    raise ValueError(f"{path / index}: shard {name!r} is not a file name in {path}")
            files = [path / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.exists():
                    raise FileNotFoundError(f"{f}: shard listed in {index} is missing")
            return files
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json, "
                            "pytorch_model.bin or pytorch_model.bin.index.json")


def _iter_tensors(f):
    """(name, tensor) of one checkpoint file, reading lazily (safetensors is memory-mapped)."""
    if f.suffix != ".safetensors":
        yield from read_state_dict(f).items()
        return
    from safetensors import SafetensorError, safe_open
    try:
        sf = safe_open(f, framework="pt")
    except SafetensorError as e:
        raise unreadable(f, e, "safetensors file") from None
    with sf:
        for k in sf.keys():
            yield k, sf.get_tensor(k)


def _load_hf(path, device, dtype, quantize, shard):
    config = read_config(path / "config.json", lambda d: config_from_hf(d, path.name))
    with torch.device("meta"):
        model = Transformer(config)
    filler = _Filler(model, device, dtype, quantize, shard)
    ours = {hf_name(config, n): n for n in filler.params}
    outer = HF_OUTER.get(config.arch, "")
    for f in _hf_files(path):
        unused = []
        for k, t in _iter_tensors(f):
            name = ours.get(k) or ours.get(outer + k)
            if name is not None:
                filler.put(name, t, f)
            elif (not HF_SKIP.search(k)
                  and not (config.tie_embeddings and k.endswith("lm_head.weight"))):
                unused.append(k)
        if unused:
            raise KeyError(f"{f}: {len(unused)} tensors match no parameter of {config.arch}: "
                           f"{unused[:8]}")
    return filler.finish(path).eval()


# Meta LLaMA: official suffix -> (our suffix, dim along which model-parallel shards are split;
# None = replicated)
META_NAMES = {"tok_embeddings.weight": ("embed.weight", 1),
              "norm.weight": ("norm.weight", None),
              "output.weight": ("lm_head.weight", 0)}
META_LAYER = {"attention.wq.weight": ("attn.q_proj.weight", 0),
              "attention.wk.weight": ("attn.k_proj.weight", 0),
              "attention.wv.weight": ("attn.v_proj.weight", 0),
              "attention.wo.weight": ("attn.o_proj.weight", 1),
              "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
              "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
              "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
              "attention_norm.weight": ("norm_1.weight", None),
              "ffn_norm.weight": ("norm_2.weight", None)}
# precomputed rotary tables, not parameters: top-level (Llama-2), per layer (LLaMA-1)
META_SKIP = re.compile(r"(^|\.)rope\.freqs$")


def meta_to_rotate_half(w, n_heads):
    """Meta's q/k rows pair dims (2j, 2j+1) of each head; ours pair (j, j + D/2) as HF does: reorder
    the rows."""
    out, d_in = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


# params.json fields read here; META_RUNTIME ones size Meta's own inference buffers (no maths).
# Any other field (vision_*, quantization_args, lora_args, Llama 4's rope_scaling_factor, ...) is
# refused by name rather than ignored.
META_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
               "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope"}
META_RUNTIME = {"max_batch_size", "max_seq_len"}


def meta_config(p, name, vocab_from_weights, tied=False):
    """params.json dict -> Config; vocab_size -1 ("take it from the weights") asks
    vocab_from_weights(); tied: the checkpoint has no output.weight (it reuses the embeddings).
    LLaMA's SwiGLU width: 2/3 of 4*dim, times the Llama-2 multiplier, rounded up to multiple_of.
    use_scaled_rope: Llama 3.1's scaling with the constants of Meta's apply_scaling (8, 1, 4,
    8192)."""
    unknown = sorted(k for k, v in p.items() if k not in META_FIELDS | META_RUNTIME
                     and v is not None)
    if unknown:
        raise ValueError(f"{name}: params.json field(s) {unknown} are not supported (a LLaMA "
                         f"text model reads {sorted(META_FIELDS)})")
    dim, multiple = p["dim"], p["multiple_of"]
    hidden = int(2 * 4 * dim / 3)
    if p.get("ffn_dim_multiplier"):
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    hidden = multiple * ((hidden + multiple - 1) // multiple)
    vocab = p.get("vocab_size", -1)
    scaled = p.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise ValueError(f"{name}: params.json field 'use_scaled_rope' is {scaled!r}, "
                         "expected true or false")
    # params.json has no context length: Llama 3.1 / 3.2 131072, Llama 3 (rope_theta) 8192, else
    # 4096 (Llama 2)
    context = 131072 if scaled else 8192 if "rope_theta" in p else 4096
    return Config(name, arch="llama", vocab_size=vocab_from_weights() if vocab == -1 else vocab,
                  n_layer=p["n_layers"], n_head=p["n_heads"], n_kv_head=p.get("n_kv_heads") or 0,
                  n_embd=dim, intermediate_size=hidden, block_size=context,
                  norm_eps=p.get("norm_eps", 1e-6), rope_theta=p.get("rope_theta", 10000.0),
                  rope_scaling=RopeScaling() if scaled else None, tie_embeddings=tied)


def _load_meta(path, device, dtype, quantize, shard):
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{path}: params.json but no consolidated.*.pth shard")
    for i, f in enumerate(files):
        if f.name != f"consolidated.{i:02d}.pth":
            raise FileNotFoundError(f"{path}: shard consolidated.{i:02d}.pth is missing "
                                    f"(found {f.name})")
    shards = [read_state_dict(f) for f in files]  # memory-mapped
    embed = shards[0].get("tok_embeddings.weight")
    if embed is None:
        raise KeyError(f"{files[0]}: tensor tok_embeddings.weight is missing")
    tied = "output.weight" not in shards[0]  # Llama 3.2 1B / 3B share the embedding matrix
    config = read_config(path / "params.json",
                         lambda p: meta_config(p, path.name, lambda: embed.shape[0], tied))
    with torch.device("meta"):
        model = Transformer(config)
    filler = _Filler(model, device, dtype, quantize, shard)
    names = {k: v for k, v in META_NAMES.items() if not (tied and k == "output.weight")}
    for i in range(config.n_layer):
        names.update({f"layers.{i}.{k}": (f"layers.{i}.{v}", d)
                      for k, (v, d) in META_LAYER.items()})
    for f, shard in zip(files, shards):  # every shard, as a later one may differ from the first
        unused = [k for k in shard if k not in names and not META_SKIP.search(k)]
        if unused:
            raise KeyError(f"{f}: {len(unused)} tensors match no LLaMA parameter: {unused[:8]}")
    for k, (name, dim_split) in names.items():
        parts = [s.get(k) for s in shards]
        if any(t is None for t in parts):
            raise KeyError(f"{files[[t is None for t in parts].index(True)]}: "
                           f"tensor {k} is missing")
        for f, t in zip(files[1:], parts[1:]):  # replicated, or split in equal parts
            if t.shape != parts[0].shape:
                raise ValueError(f"{f}: {k} has shape {tuple(t.shape)}, {files[0].name} has "
                                 f"{tuple(parts[0].shape)} (each shard holds the whole tensor or "
                                 "an equal part of it)")
        t = parts[0] if dim_split is None or len(parts) == 1 else torch.cat(parts, dim=dim_split)
        if k.endswith("wq.weight"):
            t = meta_to_rotate_half(t, config.n_head)
        elif k.endswith("wk.weight"):
            t = meta_to_rotate_half(t, config.n_kv_head)
        filler.put(name, t, files[0] if dim_split is None else f"{path}/consolidated.*.pth")
    return filler.finish(path).eval()
