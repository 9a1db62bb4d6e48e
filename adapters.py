"""
The adapter families of LLM-Adapters on the hook slots of model.py, side by side:

  lora      W x + (alpha/r) B A x on named linears (Hu et al.); A Kaiming-uniform, B zero
  series    y + s * up(act(down(y))) after a sublayer (Houlsby: attn+mlp; Pfeiffer: mlp only,
            the paper's best)
  parallel  sublayer(h) + s * up(act(down(h))) beside a sublayer (He et al.), or beside named
            linears (LLM-Adapters)
  prefix    learned keys/values in front of every layer's attention (Li & Liang), optionally
            reparameterised; gated=True: LLaMA-Adapter's zero-gated adaption prompt with its own
            softmax (Zhang et al.)
  prompt    soft tokens in front of the input embeddings (Lester et al.)
  dora      m * (W + s B A) x / ||W + s B A||_row: LoRA turns W, m scales its rows (Liu et al. 2024)
  ia3       learned vectors scaling k, v and the MLP's inner activations (Liu et al. 2022)

Every adapter's last projection starts at zero (ia3's scales at one), so a fresh
lora/dora/ia3/series/parallel model equals the base exactly.
Adapters live in slots (slots.py: named containers on the model's hook attributes): several can
share a model under names, be switched with set_active and combined (e.g. lora + series). Their
maths runs in fp32 even when the base runs in bf16/fp16 or under autocast. sparse=N on a bottleneck
is MoSA's split (mosa.py): N disjoint random parts that train one per step, joined back into one
plain adapter after training ("merge" here means only folding into the base weight).

Each kind is a class beside its helpers and its entry in KINDS (defaults, places, make, check,
finish). Each adapter module names its own tensors (adapter_params, as torchtune's): adapter_state
collects them, and adapter_io.py saves and loads them (ours and PEFT's folders).
"""
import math
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Linear
from mosa import Split, join_sparse
from presets import LINEAR_NAMES
from quantize import QuantLinear, is_quantized
from slots import attach, detach, find_linears, slots

ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def default_targets(config):
    """LLM-Adapters' LoRA places: q, k, v and the MLP's in and out projections (LLaMA, Llama 3,
    Qwen2, Mistral: q_proj, k_proj, v_proj, up_proj, down_proj)."""
    qkv = ["query_key_value"] if config.arch == "bloom" else ["q_proj", "k_proj", "v_proj"]
    return qkv + list(LINEAR_NAMES[config.arch][1:])


def in_own_dtype(module, fn, x, out_dtype):
    """Run fn on x in the adapter's own dtype (fp32 as add_adapter makes it), outside autocast, and
    hand back out_dtype: adapter maths stays fp32 on a bf16/fp16 base, as LLM-Adapters does."""
    with torch.autocast(x.device.type, enabled=False):
        out = fn(x.to(next(module.parameters()).dtype))  # one cast of x (none when x is fp32)
        return out if out_dtype is None else out.to(out_dtype)  # None: fp32, the caller casts


def fast_fp32_matmuls(device, base_dtype):
    """Beside a bf16/fp16 base on CUDA, let the fp32 adapter matmuls use TF32 tensor cores (10-bit
    mantissa, still finer than bf16's 7) rather than the GPU's far slower plain-fp32 units, as
    nanoGPT does. A float32 base keeps PyTorch's exact-fp32 default: whoever asks for fp32 gets
    it."""
    if torch.device(device).type == "cuda" and base_dtype != torch.float32:
        torch.set_float32_matmul_precision("high")


# -------------------------------------------------------------------- the kinds: one entry per kind
class Kind(NamedTuple):
    """Everything add_adapter, train.py and the tests know about one adapter kind, always written
    with its field names: Kind(defaults=..., places=..., make=..., check=..., finish=...)."""
    defaults: dict  # its options with their defaults (the paper's best): its whole option set
    places: Callable  # (model, options) -> [(module name, slot attribute)], one module each
    make: Callable  # (model, owner module, slot, options) -> the adapter module for that place
    check: Callable = None  # (options, config) -> None, or raise ValueError naming the option
    finish: Callable = None  # (model) after training: the training form folded (MoSA, reparam)


KINDS = {}  # kind -> Kind, each filled in beside its class; a runtime kind adds its own


def adapter_tensors(module, keep_vars=False):
    """{name: tensor} of one adapter module: those its adapter_params() names (torchtune's
    protocol), else its whole state_dict (an adapter never holds a base weight). A parameter left
    unnamed would silently not be saved: an error, which add_adapter raises at once."""
    names = (module.adapter_params() if hasattr(module, "adapter_params")
             else list(module.state_dict()))
    unnamed, kind = [n for n, _ in module.named_parameters() if n not in names], type(module)
    if unnamed:
        raise ValueError(f"{kind.__name__}.adapter_params() leaves out its parameter(s) "
                         f"{unnamed}: they would not be saved")
    out = {}
    for n in names:
        owner, _, attr = n.rpartition(".")
        try:
            t = getattr(module.get_submodule(owner), attr)
        except AttributeError:
            t = None
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{kind.__name__}.adapter_params() names {n!r}, which is not one of "
                             "its tensors")
        out[n] = t if keep_vars else t.detach()  # detached: shares storage, as in state_dict()
    return out


# ------------------------------------------------------------------------------------------- lora
class LoRA(nn.Module):
    """y + (alpha/r) B A x on one projection (Hu et al. 2021): A (r, d_in) and B (d_out, r)
    train, W stays frozen.

    Why B starts at zero and A does not: the update is B A x, so with B = 0 a fresh model equals
    the base exactly (training starts from the pretrained function, not a perturbed one). The
    gradients are dL/dB = g (A x)^T and dL/dA = B^T g x^T (g = dL/dy): with A random, B's
    gradient is nonzero at step 0, B moves, and from step 1 on A gets a gradient too. Were both
    zero, both gradients would stay zero forever: nothing would ever learn.
    Why alpha/r: when r changes, alpha need not be retuned (Hu et al. 4.1: it acts like a
    learning rate).
    Why it merges: B A is a (d_out, d_in) matrix like W, so W + (alpha/r) B A serves at no extra
    cost."""

    def __init__(self, d_in, d_out, r, alpha, dropout):
        super().__init__()
        # PEFT's names
        self.lora_A, self.lora_B = nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale, self.dropout, self.merged = alpha / r, nn.Dropout(dropout), False

    def adapter_params(self):  # PEFT's names
        return ["lora_A.weight", "lora_B.weight"]

    def delta(self):  # the update merge_lora folds into W
        return self.lora_B.weight @ self.lora_A.weight * self.scale

    # the Linear hook: input, output, the layer (LoRA needs only x)
    def forward(self, x, y, linear):
        if self.merged:
            return y
        delta = in_own_dtype(self, lambda x: self.lora_B(self.lora_A(self.dropout(x))), x, None)
        # one kernel scales, casts to y's dtype and adds (was three); in place is safe: y is the
        # linear's fresh output, which no backward reads
        return y.add_(delta, alpha=self.scale)

    def merge(self, linear):  # fold into the base weight: W += scale * B A
        linear.weight.data += self.delta().to(linear.weight.dtype)

    def unmerge(self, linear):
        linear.weight.data -= self.delta().to(linear.weight.dtype)


def _lora_places(model, o):
    names = o["target_modules"] or default_targets(model.config)
    return [(n, "adapter") for n in find_linears(model, names, "target_modules")]


def _make_lora(model, lin, slot, o):
    return LoRA(lin.in_features, lin.out_features, o["r"], o["alpha"], o["dropout"])


_lora = dict(r=32, alpha=64, dropout=0.05, target_modules=None)  # None = q,k,v + the MLP's in/out
KINDS["lora"] = Kind(defaults=_lora, places=_lora_places, make=_make_lora)


# ------------------------------------- series and parallel: bottlenecks (MoSA's split: mosa.py)
PLACEMENTS = {"mlp": ("mlp",), "attn": ("attn",), "both": ("attn", "mlp")}


class Bottleneck(nn.Module):
    """down -> activation -> up, times `scaling` (a float, or "learned"); up starts at zero. Where
    it sits decides what it computes (`on_linear`, `residual`, fixed when built):
      post slot (series)          y -> y + branch(y)  (residual=True) or branch(y)
      beside slot (parallel)      h -> branch(h), which the block adds to the sublayer's output
      Linear hook (per-linear)    (x, y, linear) -> y + branch(x)

    Why a series adapter keeps a residual: it sits IN the path, between the sublayer and the
    block's residual add, so whatever it returns replaces the sublayer's output. y + branch(y)
    with up = 0 is the identity: the sublayer's output passes through untouched, a fresh model
    equals the base, and training learns only a correction. Without it, up(act(down(y))) would
    start at zero (the sublayer switched off) and would have to relearn, through a bottleneck,
    what the pretrained sublayer already computed. A parallel adapter needs no residual of its
    own: the block adds its branch beside the sublayer's output.
    Why down is random and up zero: as LoRA's A and B (up's gradient needs act(down(h)) != 0)."""

    def __init__(self, d_in, d_out, bottleneck, non_linearity, scaling, dropout, sparse,
                 residual=False, on_linear=False):
        super().__init__()
        down, up = torch.empty(bottleneck, d_in), torch.zeros(d_out, bottleneck)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        if sparse:
            self.down, self.up = Split(down, sparse), Split(up, sparse)
        else:
            self.down, self.up = (nn.Linear(d_in, bottleneck, bias=False),
                                  nn.Linear(bottleneck, d_out, bias=False))
            self.down.weight.data, self.up.weight.data = down, up
        self.act, self.dropout = ACTIVATIONS[non_linearity], nn.Dropout(dropout)
        self.residual, self.on_linear = residual, on_linear
        self.scaling = nn.Parameter(torch.ones(())) if scaling == "learned" else float(scaling)

    def adapter_params(self):
        names = ["scaling"] if isinstance(self.scaling, nn.Parameter) else []
        for w in ("down", "up"):  # a Split names its parts (mosa.py), a plain Linear its weight
            m = getattr(self, w)
            inner = m.adapter_params() if isinstance(m, Split) else ["weight"]
            names += [f"{w}.{n}" for n in inner]
        return names

    def branch(self, x):
        z = F.linear(self.act(F.linear(self.dropout(x), self.down.weight)), self.up.weight)
        if isinstance(self.scaling, float) and self.scaling == 1.0:  # the default: no multiply
            return z
        return z * self.scaling

    def forward(self, x, y=None, linear=None):
        if self.on_linear:  # beside one projection: reads its input x, adds to its output y
            return y.add_(in_own_dtype(self, self.branch, x, None))  # cast + add in one, as LoRA
        z = in_own_dtype(self, self.branch, x, x.dtype)
        return x + z if self.residual else z


def _bottleneck_places(kind):
    def places(model, o):
        if o.get("per_linear"):
            return [(n, "adapter") for n in find_linears(model, o["per_linear"], "per_linear")]
        where = "post_" if kind == "series" else "beside_"
        return [(f"layers.{i}", where + sub) for i in range(model.config.n_layer)
                for sub in PLACEMENTS[o["placement"]]]
    return places


def _make_bottleneck(model, owner, slot, o):
    c, on_linear = model.config, slot == "adapter"
    d_in, d_out = (owner.in_features, owner.out_features) if on_linear else (c.n_embd, c.n_embd)
    size = c.n_embd // o["reduction"] if o["reduction"] else o["bottleneck"]
    return Bottleneck(d_in, d_out, size, o["non_linearity"], o["scaling"], o["dropout"],
                      o["sparse"], residual=o.get("residual", False), on_linear=on_linear)


def _check_bottleneck(o, c):
    if o["placement"] not in PLACEMENTS:
        raise ValueError(f"placement={o['placement']!r}: expected one of {list(PLACEMENTS)}")
    if o["non_linearity"] not in ACTIVATIONS:
        raise ValueError(f"non_linearity={o['non_linearity']!r}: "
                         f"expected one of {list(ACTIVATIONS)}")
    if o["scaling"] != "learned" and not isinstance(o["scaling"], (int, float)):
        raise ValueError(f"scaling={o['scaling']!r}: expected a number or 'learned'")
    if o["sparse"] != 0 and not 2 <= o["sparse"] < 256:
        raise ValueError(f"sparse={o['sparse']}: "
                         "expected 0 (off) or a number of parts from 2 to 255")


_bottleneck = dict(bottleneck=256, reduction=0, placement="mlp", non_linearity="tanh",
                   scaling=1.0, dropout=0.0, sparse=0)
KINDS["series"] = Kind(defaults=dict(_bottleneck, residual=True),
                       places=_bottleneck_places("series"), make=_make_bottleneck,
                       check=_check_bottleneck, finish=join_sparse)
KINDS["parallel"] = Kind(defaults=dict(_bottleneck, per_linear=None),
                         places=_bottleneck_places("parallel"), make=_make_bottleneck,
                         check=_check_bottleneck, finish=join_sparse)


# ----------------------------------------------------------------------------------------- prefix
class Prefix(nn.Module):
    """num_virtual_tokens learned keys and values per layer (B, n_kv_head, P, head_dim), without
    rotary as in LLM-Adapters. reparam > 0 produces them from an embedding through an MLP while
    training (Li & Liang); compute_prefix turns that into plain tensors.

    What a prefix changes in the softmax: its P keys join the sequence's keys in ONE softmax
    (model.py, Attention.forward), so they compete for attention mass. With s_j =
    exp(q.k_j / sqrt(D)), a query's weight on a real token j becomes
    s_j / (sum_real s + sum_prefix s): every original weight is multiplied by the same factor,
    1 minus the share the prefix takes, and that share goes to the prefix's values. No key makes
    the share zero (exp > 0), so unlike LoRA a prefix model cannot equal the base at step 0;
    small random keys (std 0.02) score near zero, each slot starting with the weight of a token
    the query is indifferent to. GatedPrefix (LLaMA-Adapter) keeps the real tokens' softmax."""

    def __init__(self, c, num_virtual_tokens, reparam):
        super().__init__()
        self.shape = (c.n_kv_head, num_virtual_tokens, c.head_dim)
        kv = 2 * c.n_kv_head * c.head_dim
        if reparam:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, c.n_embd) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(c.n_embd, reparam), nn.Tanh(),
                                     nn.Linear(reparam, kv))
        else:
            self.key = nn.Parameter(torch.randn(self.shape) * 0.02)
            self.value = nn.Parameter(torch.randn(self.shape) * 0.02)

    @property
    def reparameterised(self):  # until compute_prefix: keys and values come out of the MLP
        return not hasattr(self, "key")

    def adapter_params(self):
        if not self.reparameterised:
            return ["key", "value"]
        return ["embedding", *(f"mlp.{n}" for n, _ in self.mlp.named_parameters())]

    def kv(self):
        if not self.reparameterised:
            return self.key, self.value
        with torch.autocast(self.embedding.device.type, enabled=False):
            k, v = self.mlp(self.embedding).chunk(2, dim=-1)  # (P, Hkv*D) each
        H, P, D = self.shape
        return k.view(P, H, D).transpose(0, 1), v.view(P, H, D).transpose(0, 1)

    def forward(self, x, qkv):
        k, v = (t.expand(x.size(0), *self.shape) for t in self.kv())
        return k, v, None


class GatedPrefix(nn.Module):
    """LLaMA-Adapter's adaption prompt (Zhang et al. 2023; PEFT's adaption_prompt):
    num_virtual_tokens vectors in embedding space that the layer's own projections turn into
    keys/values. Queries attend to them with their own softmax, scaled by a gate that starts at
    zero, and the result is added: step 0 equals the base.

    Why a second softmax: in Prefix's shared softmax the prefix always takes a share of the
    attention mass from the real tokens. Here the real tokens keep their softmax untouched,
    y = attn(q, K, V) + gate * attn(q, P_k, P_v), so the gate alone decides how much the prompt
    adds, and gate = 0 is exactly the base.
    Why the gate still learns from zero: dL/dgate = g . attn(q, P_k, P_v), nonzero because the
    prompt is random (the prompt's own gradient is zero until the gate moves, as LoRA's A waits
    for B)."""

    def __init__(self, c, num_virtual_tokens):
        super().__init__()
        # the scale of normalised inputs
        self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, c.n_embd))
        self.gate = nn.Parameter(torch.zeros(1))

    def adapter_params(self):
        return ["embedding", "gate"]

    def forward(self, x, qkv):
        # (1, Hkv, P, D) each, through any LoRA on k/v too
        _, k, v = qkv(self.embedding.to(x.dtype)[None])
        return k.expand(x.size(0), -1, -1, -1), v.expand(x.size(0), -1, -1, -1), self.gate


def _check_prefix(o, c):
    if o["gated"] and o["reparam"]:
        raise ValueError("gated=True takes no reparam: "
                         "its prompt already goes through the layer's projections")
    if not (isinstance(o["layers"], int) and 0 <= o["layers"] <= c.n_layer):
        raise ValueError(f"layers={o['layers']!r}: "
                         f"expected 0 (all) up to the model's {c.n_layer} layers")


def _prefix_places(model, o):  # the attention of the top `layers` blocks (0: all)
    n = model.config.n_layer
    return [(f"layers.{i}.attn", "prefix") for i in range(n - (o["layers"] or n), n)]


def _make_prefix(model, owner, slot, o):
    P = o["num_virtual_tokens"]
    return GatedPrefix(model.config, P) if o["gated"] else Prefix(model.config, P, o["reparam"])


def compute_prefix(model):
    """Replace reparameterised prefixes by the plain keys/values their MLP produces (after
    training)."""
    for m in model.modules():
        if isinstance(m, Prefix) and m.reparameterised:
            k, v = (t.detach().clone() for t in m.kv())
            del m.embedding, m.mlp
            m.key, m.value = nn.Parameter(k), nn.Parameter(v)
    for cfg in model.adapter_configs.values():
        if cfg["kind"] == "prefix":
            cfg["options"] = {**cfg["options"], "reparam": 0}


# reparam = hidden size of the reparameterisation MLP; gated = LLaMA-Adapter; layers = the top N
# only (0 = all)
KINDS["prefix"] = Kind(defaults=dict(num_virtual_tokens=10, reparam=0, gated=False, layers=0),
                       places=_prefix_places, make=_make_prefix, check=_check_prefix,
                       finish=compute_prefix)


# ----------------------------------------------------------------------------------------- prompt
class Prompt(nn.Module):
    """num_virtual_tokens soft tokens, initialised from random rows of the vocabulary so they
    start in-distribution.

    Why prompt tuning cannot equal the base at step 0: the soft tokens are extra positions in
    front of the sequence (model.py, Transformer.forward), not a correction added to something.
    Every layer's queries attend to them, so they take attention mass from the real tokens as a
    prefix does (Prefix), and from the second layer on they also change the real tokens' states.
    No value of a vector makes "one more token in the context" a no-op: there is no zero to
    start from, unlike LoRA's B or a bottleneck's up projection. (Positions count from the soft
    tokens on, so with rotary every real token's position shifts too.)"""

    def __init__(self, embed, num_virtual_tokens):
        super().__init__()
        rows = torch.randint(0, embed.num_embeddings, (num_virtual_tokens,))
        self.embedding = nn.Parameter(embed.weight.detach()[rows].float().clone())
        self.n_tokens = num_virtual_tokens

    def adapter_params(self):
        return ["embedding"]

    def forward(self, x):  # (B, T, C) -> (B, P + T, C)
        return torch.cat((self.embedding.to(x.dtype).expand(x.size(0), -1, -1), x), dim=1)


KINDS["prompt"] = Kind(defaults=dict(num_virtual_tokens=10),
                       places=lambda model, o: [("", "prompt")],
                       make=lambda model, owner, slot, o: Prompt(model.embed,
                                                                 o["num_virtual_tokens"]))


# ------------------------------------------------------------------------------------------- dora
class DoRA(LoRA):
    """DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): W is split into a magnitude
    m, one number per output row, and a direction that LoRA moves. The paper found that full
    fine-tuning moves the two apart and LoRA cannot; with m learned on its own, DoRA can:
        y = m * (W + s B A) x / ||W + s B A||_row + b        norms over the input dim: (d_out,)
    m starts at ||W||_row and B at zero, so a fresh DoRA is the base exactly. The norm is a constant
    for the gradient (the paper's §4.3, as PEFT): that saves its backward's memory at no loss.
    Like PEFT, forward adds to y = W x + b only what DoRA changes:
        (g - 1) W x + g s B A x,  g = m / ||W + s B A||_row"""

    def __init__(self, linear, r, alpha, dropout):
        super().__init__(linear.in_features, linear.out_features, r, alpha, dropout)
        m = torch.linalg.norm(linear.weight.detach().float(), dim=1)  # ||W||_row: norm() at B = 0
        self.lora_magnitude_vector = nn.Parameter(m)  # (d_out,), PEFT's name; on W's device
        self.register_buffer("merged_norm", None, persistent=False)  # the norm, while merged

    def adapter_params(self):  # merged_norm is not: it lives only while merged
        return super().adapter_params() + ["lora_magnitude_vector"]

    @torch.no_grad()  # DoRA §4.3: no gradient through the norm
    def norm(self, linear):  # ||W + s B A||_row in fp32, (d_out,)
        return torch.linalg.norm(linear.weight.float() + self.delta(), dim=1)

    def forward(self, x, y, linear):
        if self.merged:
            return y
        return y + in_own_dtype(self, lambda x: self.change(x, y, linear), x, y.dtype)

    def change(self, x, y, linear):  # (g - 1) W x + g s B A x  (..., d_out)
        g = self.lora_magnitude_vector / self.norm(linear)  # (d_out,); exactly 1 at step 0
        if self.training and self.dropout.p > 0:  # W x sees the dropped-out x, as B A x (PEFT)
            x = self.dropout(x)
            wx = F.linear(x, linear.weight.to(x.dtype))
        else:  # W x is in y already: saves a matmul
            wx = y.to(x.dtype) - (0 if linear.bias is None else linear.bias.to(x.dtype))
        return (g - 1) * wx + g * self.lora_B(self.lora_A(x)) * self.scale

    @torch.no_grad()
    def merge(self, linear):  # W <- g * (W + s B A); g's norm is kept, as merging changes W
        self.merged_norm = self.norm(linear)
        g = self.lora_magnitude_vector / self.merged_norm
        linear.weight.data.copy_((linear.weight.float() + self.delta()) * g[:, None])

    @torch.no_grad()
    def unmerge(self, linear):  # W = W' / g - s B A: exact up to rounding
        g = self.lora_magnitude_vector / self.merged_norm
        linear.weight.data.copy_(linear.weight.float() / g[:, None] - self.delta())
        self.merged_norm = None


KINDS["dora"] = Kind(defaults=_lora, places=_lora_places,
                     make=lambda m, lin, slot, o: DoRA(lin, o["r"], o["alpha"], o["dropout"]))


# -------------------------------------------------------------------------------------------- ia3
class IA3(nn.Module):
    """(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
    In-Context Learning"): learned vectors that rescale activations elementwise: the keys and values
    (outputs of k and v) and the input of the MLP's out projection (its inner activations). They
    start at ones, so a fresh model is the base exactly, and train d_out (or d_in) numbers per
    linear: the fewest of any kind here. `ia3_l` has PEFT's name and shapes: (d_out, 1) scales the
    output rows, (1, d_in) the input columns; either way W * l is the merged weight."""

    def __init__(self, linear, on_input):
        super().__init__()
        shape = (1, linear.in_features) if on_input else (linear.out_features, 1)
        self.ia3_l, self.on_input, self.merged = nn.Parameter(torch.ones(shape)), on_input, False

    def adapter_params(self):
        return ["ia3_l"]

    def forward(self, x, y, linear):
        if self.merged:
            return y
        if self.on_input:
            # W (x * l) + b = y + W (x * (l - 1)): the hook hands over y already computed, and
            # adding to it keeps what adapters before this one added. The price is a second matmul
            # of this size, which merge() removes.
            return y + F.linear((x * (self.ia3_l - 1)).to(linear.weight.dtype), linear.weight)
        return in_own_dtype(self, lambda y: y * self.ia3_l.flatten(), y, y.dtype)  # (W x + b) * l

    def merge(self, linear):
        self.fold(linear, torch.Tensor.mul_)

    def unmerge(self, linear):  # exact up to rounding, unless some l is 0
        self.fold(linear, torch.Tensor.div_)

    @torch.no_grad()
    def fold(self, linear, op):  # W (d_out, d_in) op l, rows or columns; b too when on the output
        op(linear.weight.data, self.ia3_l)
        if not self.on_input and linear.bias is not None:
            op(linear.bias.data, self.ia3_l.flatten())


def ia3_targets(c, o):
    """(target_modules, feedforward_modules) of an ia3 adapter: by default k, v and the MLP's out
    projection, whose input is scaled. BLOOM fuses q, k and v, so its query_key_value is scaled
    whole, as PEFT's default for BLOOM: with ALiBi and no rotary, a scale on q's features only
    multiplies the one on k's in q.k: n_embd parameters a layer that add nothing k's cannot do."""
    mlp_out = LINEAR_NAMES[c.arch][2]
    kv = ["query_key_value"] if c.arch == "bloom" else ["k_proj", "v_proj"]
    targets = o["target_modules"] or kv + [mlp_out]
    ff = o["feedforward_modules"]
    return list(targets), (list(ff) if ff is not None else [t for t in targets if t == mlp_out])


def _check_ia3(o, c):
    targets, ff = ia3_targets(c, o)
    if not set(ff) <= set(targets):
        raise ValueError(f"feedforward_modules={ff}: expected names among target_modules={targets}")


def _ia3_places(model, o):
    targets = ia3_targets(model.config, o)[0]
    return [(n, "adapter") for n in find_linears(model, targets, "target_modules")]


def _make_ia3(model, owner, slot, o):
    ff = ia3_targets(model.config, o)[1]
    feedforward = find_linears(model, ff, "feedforward_modules").values()
    return IA3(owner, on_input=any(owner is m for m in feedforward))


# None: k, v (BLOOM: query_key_value) and the MLP's out projection, at its input (ia3_targets)
KINDS["ia3"] = Kind(defaults=dict(target_modules=None, feedforward_modules=None),
                    places=_ia3_places, make=_make_ia3, check=_check_ia3)


# ----------------------------------------------------------------------------------- the public API
def add_adapter(model, kind, name="default", **options):
    """Attach one adapter of `kind` at every place its entry in KINDS names, freeze the base, leave
    the new adapter trainable (fp32)."""
    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; kinds: {', '.join(KINDS)}")
    entry = KINDS[kind]
    unknown = set(options) - set(entry.defaults)
    if unknown:
        raise ValueError(f"{kind} adapter has no option(s) {sorted(unknown)}; "
                         f"options: {sorted(entry.defaults)}")
    if name in model.adapter_configs:
        raise ValueError(f"an adapter named {name!r} is already attached; pick another name=")
    o = {**entry.defaults, **options}
    for k in ("r", "bottleneck", "num_virtual_tokens"):
        if k in o and (not isinstance(o[k], int) or o[k] < 1):
            raise ValueError(f"{k}={o[k]!r}: expected a positive integer")
    if entry.check is not None:
        entry.check(o, model.config)
    new = []  # (owner module, slot, adapter module): all built before anything is attached
    for mname, slot in entry.places(model, o):
        owner = model.get_submodule(mname)
        new.append((owner, slot, entry.make(model, owner, slot, o)))
    for _, _, module in new:  # names its tensors, or fails now rather than at the save
        adapter_tensors(module)
    in_slots = {id(p) for _, _, s in slots(model) for p in s.parameters()}
    for p in model.parameters():  # freeze the base; adapters attached earlier keep their setting
        if id(p) not in in_slots:
            p.requires_grad_(False)
    device = model.embed.weight.device
    for owner, slot, module in new:
        attach(owner, slot, name,
               module.to(device=device, dtype=torch.float32).train(model.training))
    model.adapter_configs[name] = {"kind": kind, "options": o}
    return model


def finish_adapters(model):
    """After training: turn every adapter's training form into its plain one (MoSA parts joined,
    reparameterised prefixes computed), as each kind's entry says; a no-op for the others."""
    for kind in {cfg["kind"] for cfg in model.adapter_configs.values()}:
        if KINDS[kind].finish is not None:
            KINDS[kind].finish(model)


def in_training_form(model):
    """True while some adapter is in a form that finish_adapters folds (MoSA parts, a
    reparameterised prefix)."""
    return any(isinstance(m, Split) or isinstance(m, Prefix) and m.reparameterised
               for m in model.modules())


def adapter_names(model):
    return list(model.adapter_configs)


def remove_adapter(model, name):
    """Detach adapter `name` from every slot (empty slots go back to None)."""
    if name not in model.adapter_configs:
        raise ValueError(f"no adapter named {name!r}; attached: {adapter_names(model)}")
    detach(model, name)
    del model.adapter_configs[name]


def set_active(model, names):
    """Run only the adapters called `names` (a name or a list; [] = the plain base model)."""
    names = {names} if isinstance(names, str) else set(names)
    missing = names - set(adapter_names(model))
    if missing:
        raise ValueError(f"no adapter named {sorted(missing)}; attached: {adapter_names(model)}")
    for _, _, s in slots(model):
        s.active = names & set(s.keys())


def count_parameters(model):
    """(trainable, total) parameter counts; the paper's "% params" is trainable / total."""
    ps = list(model.parameters())
    # a quantized projection keeps W in buffers (quantize.py); its weights count all the same
    packed = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, QuantLinear))
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps) + packed


def adapter_state(model, name, keep_vars=False):
    """The tensors of adapter `name` as its modules name them, keyed by their place in the model
    without the name (so they load under any): layers.0.attn.q_proj.adapter.lora_A.weight."""
    return {f"{mname}.{attr}.{k}".lstrip("."): t for mname, attr, s in slots(model) if name in s
            for k, t in adapter_tensors(s[name], keep_vars).items()}


def merge(model):
    """Fold every active, unmerged adapter that lives on a projection and can be folded (LoRA:
    W += scale * B A) into its base weight; logits stay the same, and the adapter then does nothing
    until unmerge."""
    if is_quantized(model):  # W += B A would be rounded to the quantization grid, most of it lost
        raise ValueError("merge: the base is quantized; load it without quantize to merge into it")
    for lin, m in _mergeable(model, merged=False):
        m.merge(lin)
        m.merged = True


def unmerge(model):
    """Undo merge: exact in fp32, within rounding in bf16."""
    for lin, m in _mergeable(model, merged=True):
        m.unmerge(lin)
        m.merged = False


def _mergeable(model, merged):
    for _, lin in model.named_modules():
        if isinstance(lin, Linear) and lin.adapter is not None:
            yield from ((lin, m) for m in lin.adapter.running()
                        if hasattr(m, "merge") and m.merged == merged)
