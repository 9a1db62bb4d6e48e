"""
What a model is, as data: `Config` (the fields the families differ in: norm, MLP, positions,
residual layout, biases, rotary scaling, attention window), `RopeScaling` (Llama 3.1's rotary
scaling), `LINEAR_NAMES` (each family's official projection names), `FAMILIES` (the fields of each
family, which checkpoints.py starts from when it reads a config.json) and `PRESETS`: the published
sizes by name, `Config.from_name("llama-2-7b")`, and the tiny ones the tests and demos build.

A new model family is its fields and projection names here and its key map in checkpoints.py;
model.py changes only when the family brings new maths. No torch here: a Config is plain data.
"""
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rotary scaling ("rope_type": "llama3"; Meta's apply_scaling): frequencies whose
    wavelength exceeds original_max_position_embeddings / low_freq_factor are divided by factor,
    those shorter than original_max_position_embeddings / high_freq_factor are kept, and the band
    between is interpolated. Static: it changes the frequencies at every length."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if not (self.factor > 0 and 0 < self.low_freq_factor < self.high_freq_factor
                and self.original_max_position_embeddings > 0):
            raise ValueError(f"{self}: expected factor > 0, 0 < low_freq_factor < "
                             "high_freq_factor and original_max_position_embeddings > 0")


@dataclass
class Config:
    name: str = "tiny-llama"
    arch: str = "llama"            # llama|gptj|bloom|opt: picks projection names and the key map
    vocab_size: int = 512
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 0             # 0 = n_head; fewer = grouped-query attention (Llama-2 70B)
    n_embd: int = 64
    head_dim: int = 0              # 0 = n_embd // n_head
    intermediate_size: int = 176
    block_size: int = 2048         # longest sequence the model is meant for (OPT's position table)
    norm: str = "rmsnorm"          # rmsnorm | layernorm
    norm_eps: float = 1e-6
    mlp: str = "swiglu"            # swiglu | gelu (tanh approximation) | relu
    pos: str = "rope"              # rope | alibi | learned
    rotary_dim: int = 0            # 0 = the whole head; GPT-J rotates only the first 64 dims
    rope_interleaved: bool = False  # rotate pairs (0,1),(2,3).. (GPT-J), not (i, i+D/2) (HF LLaMA)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = None  # Llama 3.1 / 3.2; None = plain rotary
    parallel_residual: bool = False  # GPT-J: x + attn(ln(x)) + mlp(ln(x)) with one norm
    post_norm: bool = False        # OPT-350m: normalise after the residual add
    attn_bias: bool = False        # biases on q, k, v and the attention output
    qkv_bias: bool = False         # Qwen2: biases on q, k, v only (not the attention output)
    mlp_bias: bool = False
    lm_head_bias: bool = False     # GPT-J
    tie_embeddings: bool = False   # BLOOM, OPT
    embed_norm: bool = False       # BLOOM: LayerNorm right after the word embeddings
    embed_dim: int = 0             # OPT-350m: embeddings narrower than n_embd, with project_in/out
    final_norm: bool = True
    sliding_window: int = 0        # Mistral: a query sees its last sliding_window keys; 0 = all

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.embed_dim = self.embed_dim or self.n_embd
        self.rotary_dim = self.rotary_dim or self.head_dim
        for f, ok in (("arch", LINEAR_NAMES), ("norm", ("rmsnorm", "layernorm")),
                      ("mlp", ("swiglu", "gelu", "relu")), ("pos", ("rope", "alibi", "learned"))):
            if getattr(self, f) not in ok:
                raise ValueError(f"Config.{f}={getattr(self, f)!r}: expected one of {sorted(ok)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"Config: n_head={self.n_head} is not a multiple of "
                             f"n_kv_head={self.n_kv_head}")

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


# Official projection names of each family: (attention output, MLP in, MLP out). LLaMA adds
# gate_proj, BLOOM fuses q, k and v into query_key_value.
LINEAR_NAMES = {"llama": ("o_proj", "up_proj", "down_proj"),
                "gptj": ("out_proj", "fc_in", "fc_out"),
                "opt": ("out_proj", "fc1", "fc2"),
                "bloom": ("dense", "dense_h_to_4h", "dense_4h_to_h")}

_llama = dict(arch="llama", vocab_size=32000, n_layer=32, n_head=32, n_embd=4096,
              intermediate_size=11008)
_gptj = dict(arch="gptj", norm="layernorm", norm_eps=1e-5, mlp="gelu", rope_interleaved=True,
             parallel_residual=True, mlp_bias=True, lm_head_bias=True)
_bloom = dict(arch="bloom", norm="layernorm", norm_eps=1e-5, mlp="gelu", pos="alibi",
              attn_bias=True, mlp_bias=True, tie_embeddings=True, embed_norm=True)
_opt = dict(arch="opt", norm="layernorm", norm_eps=1e-5, mlp="relu", pos="learned",
            attn_bias=True, mlp_bias=True, tie_embeddings=True)
FAMILIES = {"llama": _llama, "gptj": _gptj, "bloom": _bloom, "opt": _opt}  # arch -> its fields
_13b = dict(n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824)
_6b = dict(n_layer=32, n_head=32, n_embd=4096, intermediate_size=16384)
_70b = dict(n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, intermediate_size=28672)
# Llama 3: a 128K vocabulary, GQA at every size, theta 5e5; 3.1 and 3.2 add the llama3 scaling
# (HF's 3.2 configs say factor 32, 3.1's 8: see docs/models.md)
_llama3 = dict(_llama, vocab_size=128256, n_kv_head=8, intermediate_size=14336, block_size=8192,
               norm_eps=1e-5, rope_theta=500000.0)
_llama31 = dict(_llama3, block_size=131072, rope_scaling=RopeScaling())
_llama32 = dict(_llama31, intermediate_size=8192, tie_embeddings=True,
                rope_scaling=RopeScaling(factor=32.0))
_qwen2 = dict(arch="llama", qkv_bias=True, rope_theta=1000000.0)  # norm_eps 1e-6, the default
PRESETS = {c.name: c for c in [
    Config("llama-7b", **_llama),
    Config("llama-13b", **{**_llama, **_13b}),
    Config("llama-30b", **{**_llama, "n_layer": 60, "n_head": 52, "n_embd": 6656,
                           "intermediate_size": 17920}),
    Config("llama-65b", **{**_llama, "n_layer": 80, "n_head": 64, "n_embd": 8192,
                           "intermediate_size": 22016}),
    Config("llama-2-7b", **{**_llama, "block_size": 4096, "norm_eps": 1e-5}),
    Config("llama-2-13b", **{**_llama, **_13b, "block_size": 4096, "norm_eps": 1e-5}),
    Config("llama-2-70b", **{**_llama, **_70b, "block_size": 4096, "norm_eps": 1e-5}),
    Config("gptj-6b", **{**_gptj, **_6b, "n_layer": 28, "n_head": 16}, vocab_size=50400,
           rotary_dim=64),
    Config("bloom-7b1", **{**_bloom, **_6b, "n_layer": 30}, vocab_size=250880),
    Config("opt-6.7b", **_opt, **_6b, vocab_size=50272),
    Config("llama-3-8b", **_llama3),
    Config("llama-3.1-8b", **_llama31),
    Config("llama-3.1-70b", **{**_llama31, **_70b}),
    Config("llama-3.2-1b", **{**_llama32, "n_layer": 16, "n_embd": 2048}),
    Config("llama-3.2-3b", **{**_llama32, "n_layer": 28, "n_head": 24, "n_embd": 3072}),
    Config("qwen2.5-0.5b", **_qwen2, vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2,
           n_embd=896, intermediate_size=4864, block_size=32768, tie_embeddings=True),
    Config("qwen2.5-7b", **_qwen2, vocab_size=152064, n_layer=28, n_head=28, n_kv_head=4,
           n_embd=3584, intermediate_size=18944, block_size=131072),
    Config("mistral-7b", **{**_llama, "n_kv_head": 8, "intermediate_size": 14336},  # v0.1
           block_size=32768, norm_eps=1e-5, sliding_window=4096),
    # tiny presets for tests and CPU demos
    Config("tiny-llama"),
    Config("tiny-llama-gqa", n_kv_head=2),
    Config("tiny-gptj", **_gptj, intermediate_size=256, rotary_dim=8),
    Config("tiny-bloom", **_bloom, intermediate_size=256),
    Config("tiny-opt", **_opt, intermediate_size=256, block_size=256),
    # head_dim 16 at theta 5e5 against 64 positions: the scaling keeps, blends and divides
    # frequencies; a window of 4 matters at a few tokens
    Config("tiny-llama3", n_kv_head=2, rope_theta=500000.0,
           rope_scaling=RopeScaling(original_max_position_embeddings=64)),
    Config("tiny-qwen2", **_qwen2, n_kv_head=2, tie_embeddings=True),
    Config("tiny-mistral", n_kv_head=2, sliding_window=4),
]}