"""
The adapter families of LLM-Adapters on the hook slots of model.py, side by side:

  lora      W x + (alpha/r) B A x on named linears (Hu et al.); A Kaiming-uniform, B zero
  dora      m * (W + s B A) x / ||W + s B A||_row: LoRA turns W, m scales its rows (Liu et al. 2024)
  ia3       learned vectors scaling k, v and the MLP's inner activations (Liu et al. 2022)
  series    y + s * up(act(down(y))) after a sublayer (Houlsby: attn+mlp; Pfeiffer: mlp only,
            the paper's best)
  parallel  sublayer(h) + s * up(act(down(h))) beside a sublayer (He et al.), or beside named
            linears (LLM-Adapters)
  prefix    learned keys/values in front of every layer's attention (Li & Liang), optionally
            reparameterised; gated=True: LLaMA-Adapter's zero-gated adaption prompt with its own
            softmax (Zhang et al.)
  prompt    soft tokens in front of the input embeddings (Lester et al.)

Every adapter's last projection starts at zero (ia3's scales at one), so a fresh
lora/dora/ia3/series/parallel model equals the base exactly.
Adapters live in `Slot`s (named containers) on the model's hook attributes: several can share a
model under names, be switched with set_active and combined (e.g. lora + series). Their maths runs
in fp32 even when the base runs in bf16/fp16 or under autocast. sparse=N (MoSA, "split & merge")
splits a bottleneck's weights into N disjoint random parts that train one per step; join_sparse
joins them back into one plain adapter ("merge" here means only folding into the base weight).
"""
import json
import math
import re
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import hf_name
from files import read_state_dict, unreadable, write_atomic
from model import LINEAR_NAMES, Linear
from quantize import QuantLinear, is_quantized

ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}
PLACEMENTS = {"mlp": ("mlp",), "attn": ("attn",), "both": ("attn", "mlp")}


def default_targets(config):
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


# -------------------------------------------------------------------------------------- the modules
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


class Split(nn.Module):
    """MoSA: one weight split into n disjoint random parts, each its own parameter, so an optimizer
    step on one part cannot move the others. While training, only the `active` part runs, scaled by
    n so the expected weight is the full one (as inverted dropout); in eval all parts together are
    the weight."""

    def __init__(self, w, n):
        super().__init__()
        self.n, self.active = n, None
        self.register_buffer("part", (torch.randperm(w.numel()) % n).view(w.shape).to(torch.uint8))
        self.parts = nn.ParameterList(nn.Parameter(w[self.part == k].clone()) for k in range(n))

    @property
    def weight(self):
        w = torch.zeros(self.part.shape, dtype=self.parts[0].dtype, device=self.part.device)
        if self.training and self.active is not None:
            return w.masked_scatter(self.part == self.active, self.parts[self.active] * self.n)
        for k in range(self.n):
            w = w.masked_scatter(self.part == k, self.parts[k])
        return w


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

    def kv(self):
        if hasattr(self, "key"):
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

    def forward(self, x, qkv):
        # (1, Hkv, P, D) each, through any LoRA on k/v too
        _, k, v = qkv(self.embedding.to(x.dtype)[None])
        return k.expand(x.size(0), -1, -1, -1), v.expand(x.size(0), -1, -1, -1), self.gate


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

    def forward(self, x):  # (B, T, C) -> (B, P + T, C)
        return torch.cat((self.embedding.to(x.dtype).expand(x.size(0), -1, -1), x), dim=1)


# ---------------------------------------------------------- slots: named adapters on one hook point
class Slot(nn.ModuleDict):
    """The adapters sharing one hook slot, by name; only the names in `active` run, in the order
    they were added."""

    def __init__(self):
        super().__init__()
        self.active = set()

    def running(self):
        return [m for name, m in self.items() if name in self.active]


class LinearSlot(Slot):  # Linear.adapter: (x, y, linear) -> y
    def forward(self, x, y, linear):
        for m in self.running():
            y = m(x, y, linear)
        return y


class PostSlot(Slot):  # Block.post_attn / post_mlp: y -> y
    def forward(self, y):
        for m in self.running():
            y = m(y)
        return y


class BesideSlot(Slot):  # Block.beside_attn / beside_mlp: h -> what to add
    def forward(self, h):
        return sum(m(h) for m in self.running())


class PrefixSlot(Slot):  # Attention.prefix: (x, qkv) -> (k, v, gate), or None when nothing runs
    def forward(self, x, qkv):
        kvs = [m(x, qkv) for m in self.running()]
        if any(gate is not None for _, _, gate in kvs):
            if len(kvs) > 1:
                names = ", ".join(n for n in self if n in self.active)
                raise ValueError(f"a gated prefix cannot run beside other prefixes ({names}); "
                                 "pick one with set_active")
            return kvs[0]
        return ((torch.cat([k for k, _, _ in kvs], 2), torch.cat([v for _, v, _ in kvs], 2), None)
                if kvs else None)


class PromptSlot(Slot):  # Transformer.prompt: (B, T, C) -> (B, n_tokens + T, C)
    @property
    def n_tokens(self):
        return sum(m.n_tokens for m in self.running())

    def forward(self, x):
        for m in reversed(self.running()):  # the first added ends up first
            x = m(x)
        return x


SLOT_TYPES = {"adapter": LinearSlot, "post_attn": PostSlot, "post_mlp": PostSlot,
              "beside_attn": BesideSlot, "beside_mlp": BesideSlot, "prefix": PrefixSlot,
              "prompt": PromptSlot}


def _attach(owner, slot, name, module):
    if getattr(owner, slot) is None:
        # new modules follow the model's mode
        setattr(owner, slot, SLOT_TYPES[slot]().train(owner.training))
    s = getattr(owner, slot)
    s[name] = module
    s.active.add(name)


def slots(model):
    """(module name, slot attribute, Slot) for every filled hook slot of the model."""
    for mname, m in model.named_modules():
        for attr in SLOT_TYPES:
            s = getattr(m, attr, None)
            if isinstance(s, Slot):
                yield mname, attr, s


def _linears(model, names, option):
    """{module name: Linear} of the projections called `names`; an unknown name is an error listing
    the known."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    known = sorted({n.rsplit(".", 1)[-1] for n in found})
    unknown = [t for t in names if t not in known]
    if unknown:
        raise ValueError(f"{option}: unknown linear name(s) {unknown} for {model.config.arch}; "
                         f"known: {known}")
    return {n: m for n, m in found.items() if n.rsplit(".", 1)[-1] in names}


# -------------------------------------------------------------------- the kinds: one entry per kind
class Kind(NamedTuple):
    """Everything add_adapter, train.py and the tests know about one adapter kind."""
    # its options with their defaults (the paper's best); README has the table
    defaults: dict
    # (model, options) -> [(module name, slot attribute)]: one adapter module each
    places: Callable
    # (model, owner module, slot, options) -> the adapter module for that place
    make: Callable
    # (options, config) -> None, or raise ValueError naming the bad option
    check: Callable = None
    # (model) after training: fold the training form into a plain one (MoSA, reparam)
    finish: Callable = None


def _lora_places(model, o):
    return [(n, "adapter")
            for n in _linears(model, o["target_modules"] or default_targets(model.config),
                              "target_modules")]


def _bottleneck_places(kind):
    def places(model, o):
        if o.get("per_linear"):
            return [(n, "adapter") for n in _linears(model, o["per_linear"], "per_linear")]
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


def _ia3_targets(c, o):
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
    targets, ff = _ia3_targets(c, o)
    if not set(ff) <= set(targets):
        raise ValueError(f"feedforward_modules={ff}: expected names among target_modules={targets}")


def _ia3_places(model, o):
    targets = _ia3_targets(model.config, o)[0]
    return [(n, "adapter") for n in _linears(model, targets, "target_modules")]


def _make_ia3(model, owner, slot, o):
    feedforward = _linears(model, _ia3_targets(model.config, o)[1], "feedforward_modules").values()
    return IA3(owner, on_input=any(owner is m for m in feedforward))


_bottleneck = dict(bottleneck=256, reduction=0, placement="mlp", non_linearity="tanh",
                   scaling=1.0, dropout=0.0, sparse=0)
_lora = dict(r=32, alpha=64, dropout=0.05, target_modules=None)  # None = q,k,v + the MLP's in/out
KINDS = {
    "lora": Kind(_lora, _lora_places, lambda m, lin, slot, o: LoRA(
        lin.in_features, lin.out_features, o["r"], o["alpha"], o["dropout"])),
    "series": Kind(dict(_bottleneck, residual=True), _bottleneck_places("series"),
                   _make_bottleneck, _check_bottleneck, lambda model: join_sparse(model)),
    "parallel": Kind(dict(_bottleneck, per_linear=None), _bottleneck_places("parallel"),
                     _make_bottleneck, _check_bottleneck, lambda model: join_sparse(model)),
    # reparam = hidden size of the reparameterisation MLP; gated = LLaMA-Adapter; layers = the
    # top N only (0 = all)
    "prefix": Kind(dict(num_virtual_tokens=10, reparam=0, gated=False, layers=0),
                   _prefix_places, _make_prefix, _check_prefix,
                   lambda model: compute_prefix(model)),
    "prompt": Kind(dict(num_virtual_tokens=10), lambda model, o: [("", "prompt")],
                   lambda model, owner, slot, o: Prompt(model.embed, o["num_virtual_tokens"])),
    "dora": Kind(_lora, _lora_places, lambda m, lin, slot, o: DoRA(
        lin, o["r"], o["alpha"], o["dropout"])),
    # None: k, v (BLOOM: query_key_value) and the MLP's out projection, at its input (_ia3_targets)
    "ia3": Kind(dict(target_modules=None, feedforward_modules=None), _ia3_places, _make_ia3,
                _check_ia3),
}


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
    new = [(owner, slot, entry.make(model, owner, slot, o))
           for owner, slot in ((model.get_submodule(n), s) for n, s in entry.places(model, o))]
    in_slots = {id(p) for _, _, s in slots(model) for p in s.parameters()}
    for p in model.parameters():  # freeze the base; adapters attached earlier keep their setting
        if id(p) not in in_slots:
            p.requires_grad_(False)
    device = model.embed.weight.device
    for owner, slot, module in new:
        _attach(owner, slot, name,
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
    return any(isinstance(m, Split) or isinstance(m, Prefix) and not hasattr(m, "key")
               for m in model.modules())


def adapter_names(model):
    return list(model.adapter_configs)


def remove_adapter(model, name):
    """Detach adapter `name` from every slot (empty slots go back to None)."""
    if name not in model.adapter_configs:
        raise ValueError(f"no adapter named {name!r}; attached: {adapter_names(model)}")
    for mname, attr, s in list(slots(model)):
        if name in s:
            del s[name]
            s.active.discard(name)
            if not len(s):
                setattr(model.get_submodule(mname), attr, None)
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


def adapter_state(model, name):
    """The tensors of adapter `name`, keyed by their place in the model without the name (so it
    loads under any)."""
    out = {}
    for mname, attr, s in slots(model):
        if name in s:
            for k, t in s[name].state_dict().items():
                out[f"{mname}.{attr}.{k}".lstrip(".")] = t
    return out


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


def sparse_step(model, step):
    """Pick the part of every sparse (MoSA) adapter that trains at this optimizer step: random, but
    a function of the step so a resumed run picks the same. Parts that did not run get no gradient
    (None), so the optimizer must zero grads with set_to_none=True (PyTorch's default) for AdamW
    to leave them untouched."""
    splits = [m for m in model.modules() if isinstance(m, Split)]
    if splits:
        k = int(torch.randint(splits[0].n, (), generator=torch.Generator().manual_seed(step)))
        for m in splits:
            m.active = k % m.n


def join_sparse(model):
    """Replace each split weight by the one plain nn.Linear weight its parts make up (what MoSA
    calls merging; here merge is only the fold into the base weight)."""
    for m in list(model.modules()):
        if isinstance(m, Bottleneck):
            for attr in ("down", "up"):
                split = getattr(m, attr)
                if isinstance(split, Split):
                    w = split.eval().weight.detach()
                    lin = nn.Linear(w.size(1), w.size(0), bias=False, device=w.device)
                    lin.weight = nn.Parameter(w, requires_grad=split.parts[0].requires_grad)
                    setattr(m, attr, lin)
    for cfg in model.adapter_configs.values():
        if cfg["options"].get("sparse"):
            cfg["options"] = {**cfg["options"], "sparse": 0}


def compute_prefix(model):
    """Replace reparameterised prefixes by the plain keys/values their MLP produces (after
    training)."""
    for m in model.modules():
        if isinstance(m, Prefix) and not hasattr(m, "key"):
            k, v = (t.detach().clone() for t in m.kv())
            del m.embedding, m.mlp
            m.key, m.value = nn.Parameter(k), nn.Parameter(v)
    for cfg in model.adapter_configs.values():
        if cfg["kind"] == "prefix":
            cfg["options"] = {**cfg["options"], "reparam": 0}


# ------------------------------------------------------------------------------------ save and load
def _base_identity(c):
    keys = ("arch", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
            "intermediate_size")
    return {k: getattr(c, k) for k in keys}


def save_adapter(model, path, name="default", base_model=None, extra=None, format="native"):
    """Write adapter `name`: adapter_model.safetensors + adapter_config.json. format="peft" writes a
    LoRA, DoRA or IA3 folder that Hugging Face PEFT loads (keys base_model.model.<official module>.
    lora_A.weight, .lora_magnitude_vector, .ia3_l)."""
    from safetensors.torch import save
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; attached: {adapter_names(model)}")
    cfg = model.adapter_configs[name]
    state = {k: t.detach().contiguous() for k, t in adapter_state(model, name).items()}
    if format == "peft":
        if cfg["kind"] not in PEFT_CONFIGS:
            raise ValueError(f"format='peft' writes {', '.join(PEFT_CONFIGS)} adapters only, "
                             f"{name!r} is {cfg['kind']}")
        state = {_peft_key(model.config, k): t for k, t in state.items()}
        config = {"task_type": "CAUSAL_LM", "inference_mode": True,
                  "base_model_name_or_path": base_model,
                  **PEFT_CONFIGS[cfg["kind"]](model.config, cfg["kind"], cfg["options"])}
    elif format == "native":
        config = {"kind": cfg["kind"], "name": name, "options": cfg["options"],
                  "base_model": base_model, "base": _base_identity(model.config),
                  "extra": extra or {}}
    else:
        raise ValueError(f"format={format!r}: expected 'native' or 'peft'")
    path = Path(path)
    write_atomic(path / "adapter_model.safetensors", save(state))
    write_atomic(path / "adapter_config.json", json.dumps(config, indent=2))


def _peft_lora(c, kind, o):  # DoRA is PEFT's LoRA with use_dora
    return {"peft_type": "LORA", "r": o["r"], "lora_alpha": o["alpha"],
            "lora_dropout": o["dropout"], "bias": "none",
            "target_modules": o["target_modules"] or default_targets(c),
            "fan_in_fan_out": False, "use_dora": kind == "dora"}


def _peft_ia3(c, kind, o):
    targets, feedforward = _ia3_targets(c, o)
    return {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward,
            "fan_in_fan_out": False}


PEFT_CONFIGS = {"lora": _peft_lora, "dora": _peft_lora, "ia3": _peft_ia3}  # kind -> PEFT's config


# layers.0.attn.q_proj.adapter.lora_A.weight -> base_model.model.<hf module>.lora_A.weight
def _peft_key(config, key):
    module, _, rest = key.partition(".adapter.")
    return f"base_model.model.{hf_name(config, module + '.weight')[:-len('.weight')]}.{rest}"


PEFT_FIELDS = {"LORA": ("r", "lora_alpha"), "IA3": ("target_modules",),  # what _from_peft reads
               "ADAPTION_PROMPT": ("adapter_len", "adapter_layers")}  # (other types: refused there)


def read_adapter_config(path):
    """adapter_config.json: ours (kind, options) or PEFT's (peft_type); one clear line otherwise."""
    f = Path(path) / "adapter_config.json"
    try:
        config = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: cannot read the adapter config ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    need = PEFT_FIELDS.get(peft_type, ()) if peft_type else ("kind", "options")
    missing = [k for k in need if k not in config]
    if missing:
        raise ValueError(f"{f}: missing field(s) {', '.join(missing)} (written by "
                         "adapters.save_adapter or PEFT?)")
    if "options" in config and not isinstance(config["options"], dict):
        what = type(config["options"]).__name__
        raise ValueError(f"{f}: 'options' is a {what}, expected a JSON object")
    return config


def load_adapter(model, path, name=None):
    """Attach and fill the adapter saved in `path` (ours, or a Hugging Face PEFT LoRA, DoRA, IA3 or
    adaption-prompt folder); strict. On any error the model is left as it was (no adapter,
    requires_grad unchanged)."""
    path = Path(path)
    config = read_adapter_config(path)
    if "peft_type" in config:
        kind, options, state = _from_peft(model, path, config)
    else:
        base = _base_identity(model.config)
        diff = {k: (v, base.get(k)) for k, v in config.get("base", {}).items() if base.get(k) != v}
        if diff:
            raise ValueError(f"{path}: adapter was trained on another base model "
                             f"(saved, this model): {diff}")
        kind, options, state = config["kind"], config["options"], _read_tensors(path)
    name = name or config.get("name", "default")
    trainable = {p: p.requires_grad for p in model.parameters()}  # add_adapter freezes the base
    add_adapter(model, kind, name=name, **options)
    try:
        fill_adapter(model, name, state, path)
    except (KeyError, ValueError):
        remove_adapter(model, name)  # leave the model as it was
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        raise
    return model


def fill_adapter(model, name, state, source):
    """Copy `state` (keyed as adapter_state) into adapter `name`, strictly: the same keys, the same
    shapes."""
    expected = adapter_state(model, name)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{source}: adapter tensors do not match: missing {missing[:6]}, "
                       f"unexpected {unexpected[:6]}")
    for k, t in state.items():
        # floats may be cast (bf16 -> fp32); an int where a float belongs is an error
        want, floats = expected[k].dtype, isinstance(t, torch.Tensor) and t.is_floating_point()
        cast_ok = floats and want.is_floating_point
        if not isinstance(t, torch.Tensor) or t.dtype != want and not cast_ok:
            what = getattr(t, "dtype", type(t).__name__)
            raise ValueError(f"{source}: {k} is {what}, this model expects {want}")
        if t.shape != expected[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(t.shape)}, "
                             f"this model expects {tuple(expected[k].shape)}")
        expected[k].copy_(t)  # state_dict tensors share storage with the parameters


def _read_tensors(path):
    """adapter_model.safetensors, else adapter_model.bin (loaded without running pickled code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    f = path / "adapter_model.safetensors"
    if f.exists():
        try:
            return load_file(f)
        except SafetensorError as e:
            raise unreadable(f, e, "safetensors file") from None
    if (path / "adapter_model.bin").exists():
        return read_state_dict(path / "adapter_model.bin")
    raise FileNotFoundError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


def _from_peft(model, path, config):
    """A PEFT LoRA (DoRA: use_dora), IA3 or adaption-prompt folder -> (kind, options, our state)."""
    if config["peft_type"] == "ADAPTION_PROMPT":
        return _from_peft_adaption_prompt(path, config)
    if config["peft_type"] == "IA3":
        return _from_peft_ia3(model, path, config)
    unsupported = {k: config[k] for k in ("rank_pattern", "alpha_pattern", "modules_to_save",
                                          "layers_to_transform", "fan_in_fan_out") if config.get(k)}
    if config["peft_type"] != "LORA" or config.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{path}: only plain PEFT LoRA (bias='none') or DoRA, IA3 and "
                         f"ADAPTION_PROMPT are supported; got peft_type={config['peft_type']}, "
                         f"bias={config.get('bias')}, {unsupported}")
    state, targets = _peft_state(model, path, config, "lora_")
    r = config["r"]
    # rsLoRA scales alpha/sqrt(r)
    alpha = config["lora_alpha"] * (math.sqrt(r) if config.get("use_rslora") else 1)
    options = dict(r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0),
                   target_modules=sorted(targets))
    return ("dora" if config.get("use_dora") else "lora"), options, state


def _peft_state(model, path, config, marker):
    """A PEFT folder's tensors -> (our state dict, the targeted linear names), which must be the
    config's target_modules. Keys are base_model.model.<official module>.<marker>...; marker:
    "lora_" (A, B, DoRA's m) or "ia3_l"."""
    ours = {}  # official module name -> ours, for every projection
    for n, m in model.named_modules():
        if isinstance(m, Linear):
            ours[hf_name(model.config, n + ".weight")[:-len(".weight")]] = n
    state, targets = {}, set()
    for k, t in _read_tensors(path).items():
        module, _, rest = k.removeprefix("base_model.model.").rpartition("." + marker)
        rest = marker + rest.replace(".default.", ".")  # keys may carry the adapter name
        if module not in ours:
            raise KeyError(f"{path}: tensor {k} names no projection of this {model.config.arch} "
                           "model")
        state[f"{ours[module]}.adapter.{rest}"] = t
        targets.add(module.rsplit(".", 1)[-1])
    named = config.get("target_modules")
    named = [named] if isinstance(named, str) else named
    named = sorted({n.rsplit(".", 1)[-1] for n in named or []})  # PEFT may write "mlp.fc2"
    if named and named != sorted(targets):  # the config and the tensors must agree
        raise ValueError(f"{path}: adapter_config.json's target_modules {named} "
                         f"disagree with the modules its tensors adapt {sorted(targets)}")
    return state, targets


def _from_peft_ia3(model, path, config):
    """PEFT's (IA)^3: per target an ia3_l, (d_out, 1), or (1, d_in) on feedforward_modules (a list
    of names, maybe with a parent: "mlp.dense_4h_to_h")."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str) or config.get("fan_in_fan_out") or config.get("modules_to_save"):
        raise ValueError(f"{path}: only PEFT IA3 with a list of feedforward_modules is supported; "
                         f"got feedforward_modules={ff!r}, "
                         f"fan_in_fan_out={config.get('fan_in_fan_out')}, "
                         f"modules_to_save={config.get('modules_to_save')}")
    state, targets = _peft_state(model, path, config, "ia3_l")
    ff = sorted({f.rsplit(".", 1)[-1] for f in ff})
    return "ia3", dict(target_modules=sorted(targets), feedforward_modules=ff), state


def _from_peft_adaption_prompt(path, config):
    """PEFT's LLaMA-Adapter (per layer: adaption_prompt (1, P, C) and adaption_gate (1,)) -> our
    gated prefix."""
    state = {}
    for k, t in _read_tensors(path).items():
        m = re.search(r"layers\.(\d+)\.[^.]+\.adaption_(prompt|gate)$", k)
        if m is None:
            raise KeyError(f"{path}: {k} is not the adaption prompt or gate of a decoder layer")
        prompt = m[2] == "prompt"
        state[f"layers.{m[1]}.attn.prefix."
              + ("embedding" if prompt else "gate")] = t[0] if prompt else t
    return "prefix", dict(num_virtual_tokens=config["adapter_len"], gated=True,
                          layers=config["adapter_layers"]), state
