"""
One readable decoder-only Transformer for the model families of LLM-Adapters: LLaMA (1 and 2),
GPT-J, BLOOM, OPT; and the LLaMA-shaped weights of today: Llama 3.x, Qwen2 / Qwen2.5, Mistral.

The families differ only in fields of `Config` (norm, MLP, positions, residual layout, biases,
rotary scaling, attention window), so there is one `Block` and one `Transformer`. Modules carry
the official projection names (`q_proj`, `up_proj`, `fc_in`, ...) so loading a checkpoint is one
explicit key map, and adapters target linears by the names users know. `Config`, the family
fields and the named presets live in presets.py; the loss in chunks (`loss_chunk`) in loss.py.

Hook slots for adapters.py (plain attributes, None = nothing happens; no adapter code is imported):
  Linear.adapter      (x, y, linear) -> y   every projection: its input, output and the layer itself
                      (LoRA, DoRA, IA3, per-linear bottlenecks; adapters never store the layer)
  Block.post_attn     y -> y    attention output, before the residual add       (series adapters)
  Block.post_mlp      y -> y    MLP output, before the residual add             (series adapters)
  Block.beside_attn   h -> y    reads the attention input, added to its output  (parallel adapters)
  Block.beside_mlp    h -> y    reads the MLP input, added to its output        (parallel adapters)
  Attention.prefix    (x, qkv) -> (k, v, gate)|None   extra keys/values (B, n_kv_head, P, head_dim),
                      no rotary. gate None: in front of the keys, one softmax (prefix tuning);
                      a gate tensor: their own softmax, scaled by the gate and added
                      (LLaMA-Adapter). qkv: this layer's projections
  Transformer.prompt  emb -> emb   prepends `prompt.n_tokens` soft tokens to the embeddings (prompt
                      tuning)

Shapes: B batch, T new tokens, S keys (T, or with a KV cache all its slots), C n_embd, H heads,
D head_dim, V vocab. Generation (the decode loop, CUDA graphs) lives in generate.py.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loss import chunked_loss
from presets import LINEAR_NAMES, Config


class Linear(nn.Linear):
    """nn.Linear with one hook slot. `adapter(x, y, self) -> y` sees the input, the output and the
    layer (LoRA adds B(A(x)); DoRA needs W's norms). The layer is handed over at each call, never
    stored by the adapter, so the adapter's state_dict and trainable parameters hold no base
    weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter = None

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y if self.adapter is None else self.adapter(x, y, self)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 and scale after casting back, exactly as LLaMA does
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(c):
    if c.norm == "rmsnorm":
        return RMSNorm(c.n_embd, c.norm_eps)
    return nn.LayerNorm(c.n_embd, eps=c.norm_eps)


def rope_frequencies(c, device=None):
    """The rotary_dim/2 angular frequencies theta^(-2i/rotary_dim), fp32, with Llama 3's scaling
    when c.rope_scaling is set (transformers' _compute_llama3_parameters, Meta's apply_scaling)."""
    dims = torch.arange(0, c.rotary_dim, 2, device=device).float()
    inv_freq = 1.0 / c.rope_theta ** (dims / c.rotary_dim)
    s = c.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    old = s.original_max_position_embeddings
    # long wavelengths (> old / low_freq_factor) slow down by factor, short ones (< old /
    # high_freq_factor) stay: positions far beyond the pretraining length look like ones it saw
    scaled = torch.where(wavelen > old / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled  # the band between: interpolated
    between = (wavelen >= old / s.high_freq_factor) & (wavelen <= old / s.low_freq_factor)
    return torch.where(between, blended, scaled)


def rope_angles(c, pos):
    """pos (B, T) -> cos, sin (B, 1, T, rotary_dim/2) in fp32, computed on the fly (no buffers)."""
    angles = pos[..., None].float() * rope_frequencies(c, pos.device)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x, cos, sin, interleaved):
    """Rotate the first rotary_dim dims of x (B, H, T, D). One internal convention per family,
    chosen to match its HF checkpoint so PEFT adapters on q_proj/k_proj load unchanged: rotate-half
    for LLaMA (Meta's interleaved q/k rows are permuted at load), interleaved pairs for GPT-J."""
    rd = 2 * cos.size(-1)
    xr, rest = x[..., :rd], x[..., rd:]
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else xr.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((y, rest), dim=-1)


def alibi_slopes(n_head, device=None):
    """ALiBi head slopes (Press et al.), with BLOOM's rule for head counts that are not a power of
    two. Computed on the device: a host-to-device copy could not be captured in a CUDA graph."""
    p = 2 ** math.floor(math.log2(n_head))
    i = torch.arange(n_head, device=device, dtype=torch.float64)
    return torch.where(i < p, 2 ** (-8 * (i + 1) / p), 2 ** (-4 * (2 * (i - p) + 1) / p)).float()


class LayerCache(NamedTuple):
    """One layer's keys and values (B, Hkv, max_len, D) and the cache slots this call writes. Each
    block is handed its own, so no block needs a layer index (an int on a compiled module becomes a
    guard: one graph per layer)."""
    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor

    def update(self, k, v):  # write the new (B, Hkv, T, D) at their slots; return the whole cache
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # under autocast they may be narrower
        return self.k.index_copy_(2, self.slots, k), self.v.index_copy_(2, self.slots, v)


class KVCache:
    """Static keys and values of every layer, allocated once, and `valid` (B, max_len): the slots
    holding a real token (not padding, not yet written). A call writes its T tokens at the next T
    slots and attends over all max_len slots with a mask, so every one-token step has the same
    shapes and a CUDA graph can replay it. The next slot is kept twice: `pos` in Python (checks,
    the first call) and `next` on the device (read inside the step, so a replayed graph advances
    it; generate.DecodeStep keeps `pos` in step)."""

    def __init__(self, c, batch_size, max_len, device, dtype):
        shape = (batch_size, c.n_kv_head, max_len, c.head_dim)
        self.kv = [tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in "kv")
                   for _ in range(c.n_layer)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next = torch.zeros((), dtype=torch.long, device=device)
        self.pos, self.max_len = 0, max_len

    def extend(self, valid):
        """valid (B, T): which of T new tokens are real -> their slots (T,), marked in valid."""
        T = valid.size(1)
        self.check(T)
        slots = self.next + torch.arange(T, device=valid.device)
        self.valid.index_copy_(1, slots, valid)
        self.next += T
        self.pos += T
        return slots

    def check(self, T):
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos + T} tokens > max_len {self.max_len}")

    def layer(self, i, slots):
        return LayerCache(*self.kv[i], slots)

    def repeat(self, n):  # each row n times in a row (beam search: n beams per example)
        self.kv = [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in self.kv]
        self.valid = self.valid.repeat_interleave(n, 0)

    def reorder(self, rows):  # row i takes row rows[i], in place (a captured graph sees the change)
        for t in [self.valid, *(t for kv in self.kv for t in kv)]:
            t.copy_(t[rows])


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        if c.arch == "bloom":  # one fused projection, laid out per head as (H, 3, D)
            self.query_key_value = Linear(c.n_embd, 3 * q_dim, bias=c.attn_bias)
        else:
            qkv_bias = c.attn_bias or c.qkv_bias
            self.q_proj = Linear(c.n_embd, q_dim, bias=qkv_bias)
            self.k_proj = Linear(c.n_embd, kv_dim, bias=qkv_bias)
            self.v_proj = Linear(c.n_embd, kv_dim, bias=qkv_bias)
        self.out_name = LINEAR_NAMES[c.arch][0]
        setattr(self, self.out_name, Linear(q_dim, c.n_embd, bias=c.attn_bias))
        self.prefix = None  # hook: prefix tuning

    def qkv(self, x):
        B, T, _ = x.shape
        c = self.c
        if c.arch == "bloom":
            q, k, v = self.query_key_value(x).view(B, T, c.n_head, 3, c.head_dim).unbind(3)
        else:
            q = self.q_proj(x).view(B, T, c.n_head, c.head_dim)
            k = self.k_proj(x).view(B, T, c.n_kv_head, c.head_dim)
            v = self.v_proj(x).view(B, T, c.n_kv_head, c.head_dim)
        # (B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        if rope is not None:
            interleaved = self.c.rope_interleaved
            q, k = apply_rope(q, *rope, interleaved), apply_rope(k, *rope, interleaved)
        if cache is not None:  # a LayerCache: attend over all its slots (the mask hides empty ones)
            k, v = cache.update(k, v)
        causal = mask is None and T > 1  # mask=None only when plain causal attention is right
        # a prefix slot may offer nothing (None)
        prefix = self.prefix(x, self.qkv) if self.prefix is not None else None
        gqa = self.c.n_kv_head != self.c.n_head
        if prefix is not None and prefix[2] is None:  # learned keys/values in front, seen by all
            pk, pv, _ = prefix
            k, v = torch.cat((pk.to(k.dtype), k), dim=2), torch.cat((pv.to(v.dtype), v), dim=2)
            if causal:
                S = k.size(2) - pk.size(2)
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            if mask is not None:
                mask = F.pad(mask, (pk.size(2), 0), value=True if mask.dtype == torch.bool else 0.0)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=gqa)
        if prefix is not None and prefix[2] is not None:  # gated: queries attend to it on its own
            pk, pv, gate = prefix
            extra = F.scaled_dot_product_attention(q, pk.to(q.dtype), pv.to(q.dtype),
                                                   enable_gqa=gqa)
            y = y + (gate * extra).to(y.dtype)
        return getattr(self, self.out_name)(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        _, self.up_name, self.down_name = LINEAR_NAMES[c.arch]
        if c.mlp == "swiglu":
            self.gate_proj = Linear(c.n_embd, c.intermediate_size, bias=c.mlp_bias)
        setattr(self, self.up_name, Linear(c.n_embd, c.intermediate_size, bias=c.mlp_bias))
        setattr(self, self.down_name, Linear(c.intermediate_size, c.n_embd, bias=c.mlp_bias))
        self.kind = c.mlp

    def forward(self, x):
        up, down = getattr(self, self.up_name), getattr(self, self.down_name)
        if self.kind == "swiglu":
            return down(F.silu(self.gate_proj(x)) * up(x))
        return down(F.gelu(up(x), approximate="tanh") if self.kind == "gelu" else F.relu(up(x)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.norm_1, self.attn, self.mlp = make_norm(c), Attention(c), MLP(c)
        self.norm_2 = None if c.parallel_residual else make_norm(c)
        # adapter hook slots (see the module docstring)
        self.post_attn = self.post_mlp = self.beside_attn = self.beside_mlp = None

    @staticmethod
    def hooked(sublayer, h, post, beside, *args):
        y = sublayer(h, *args)
        if post is not None:    # series adapter transforms the sublayer's output
            y = post(y)
        if beside is not None:  # parallel adapter reads the sublayer's input, adds beside it
            y = y + beside(h)
        return y

    def forward(self, x, rope, mask, cache):  # x (B, T, C)
        h = x if self.c.post_norm else self.norm_1(x)
        a = self.hooked(self.attn, h, self.post_attn, self.beside_attn, rope, mask, cache)
        if self.c.parallel_residual:  # GPT-J: attention and MLP read the same normed input
            return x + a + self.hooked(self.mlp, h, self.post_mlp, self.beside_mlp)
        if self.c.post_norm:  # OPT-350m
            x = self.norm_1(x + a)
            return self.norm_2(x + self.hooked(self.mlp, x, self.post_mlp, self.beside_mlp))
        x = x + a
        return x + self.hooked(self.mlp, self.norm_2(x), self.post_mlp, self.beside_mlp)


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.embed_norm = make_norm(c) if c.embed_norm else None
        narrow = c.embed_dim != c.n_embd  # OPT-350m
        self.project_in = nn.Linear(c.embed_dim, c.n_embd, bias=False) if narrow else None
        learned = c.pos == "learned"  # OPT: positions offset by 2
        self.pos_embed = nn.Embedding(c.block_size + 2, c.n_embd) if learned else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = make_norm(c) if c.final_norm else None
        self.project_out = nn.Linear(c.n_embd, c.embed_dim, bias=False) if narrow else None
        self.lm_head = nn.Linear(c.embed_dim, c.vocab_size, bias=c.lm_head_bias)
        self.prompt = None          # hook: prompt tuning
        self.adapter_configs = {}   # adapter name -> {"kind", "options"}: what adapters.py attached
        self.grad_checkpoint = False  # recompute each block in backward (train.py --grad_ckpt)
        self.loss_chunk = 0  # > 0: the loss this many tokens at a time, never the full logits
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init_weights(m):  # for models trained from scratch; from_pretrained overwrites everything
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def n_soft_tokens(self):  # what the prompt hook prepends: cache slots, but no logits
        return self.prompt.n_tokens if self.prompt is not None else 0

    def new_cache(self, batch_size, max_len):
        p = self.embed.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def forward(self, idx, targets=None, attention_mask=None, cache=None, last_only=False,
                positions=None):
        """idx (B, T) token ids. targets (B, T): the token that should follow each position (already
        shifted, as in nanoGPT), -100 = ignore. attention_mask: 1 for real tokens, 0 for (left)
        padding, over the cached tokens and idx (with a cache only its last T columns are read: the
        cache keeps the rest; None = all real). cache: a KVCache to extend and attend over.
        positions (B, T): packed rows (data/pack.py), each token's position in its own example,
        0 where an example starts; a token then attends only to the tokens of its example up to
        itself, and rotary, ALiBi and learned positions count from each example's start.
        Returns logits (B, T, V) and the loss (or None); with loss_chunk set and targets given,
        the logits are never made whole: (None, loss)."""
        n_soft, pos, mask, slots = self.place_tokens(idx, attention_mask, cache, positions)
        x = self.embed(idx)  # (B, T, embed_dim)
        if n_soft:
            x = self.prompt(x)  # (B, n_soft + T, embed_dim)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos + 2)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        rope = rope_angles(self.config, pos) if self.config.pos == "rope" else None
        for i, block in enumerate(self.layers):
            kv = cache.layer(i, slots) if cache is not None else None
            if self.grad_checkpoint and self.training:
                x = checkpoint(block, x, rope, mask, kv, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv)
        if last_only:
            x = x[:, -1:]
        elif n_soft:
            x = x[:, n_soft:]  # no logits for the soft tokens
        x = self.norm(x) if self.norm is not None else x
        x = self.project_out(x) if self.project_out is not None else x
        hooked = self.lm_head._forward_hooks or self.lm_head._forward_pre_hooks
        if targets is not None and self.loss_chunk and not hooked:  # hooks see whole logits
            return None, chunked_loss(self.lm_head, x, targets, self.loss_chunk)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   ignore_index=-100)
        return logits, loss

    def place_tokens(self, idx, attention_mask, cache, positions):
        """Where this call's tokens sit, once the inputs' shapes are checked. Returns n_soft, the
        soft tokens to prepend now (on the first call only); pos (B, n_soft + T), each token's
        position (rotary, learned positions); the mask over the S keys (Transformer.attention_mask,
        None = plain causal); slots (n_soft + T,), the cache slots the tokens are written to (None
        without a cache: the keys are these tokens). Extends the cache."""
        B, T = idx.shape
        c = self.config
        past = cache.pos if cache is not None else 0
        n_prompt = self.n_soft_tokens()
        if positions is not None:
            self.check_packed(positions, idx, attention_mask, cache, n_prompt)
        seen = past - n_prompt if past else 0  # tokens in the cache (after its soft tokens)
        if attention_mask is not None and attention_mask.shape != (B, seen + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected {(B, seen + T)}")
        new = attention_mask[:, seen:].bool() if attention_mask is not None else None  # real tokens
        n_soft = n_prompt if past == 0 else 0  # soft tokens to prepend now: on the first call
        if n_soft:  # soft tokens lead the sequence and are always visible
            T += n_soft
            new = F.pad(new, (n_soft, 0), value=True) if new is not None else None
        if cache is None:  # the keys are these T tokens
            valid, slots, S = new, None, T
        else:  # the keys are all of the cache's slots
            slots = cache.extend(new if new is not None else idx.new_ones(B, T, dtype=torch.bool))
            valid, S = cache.valid, cache.max_len
        # positions count real tokens only: a left-padded row is numbered exactly as it is alone
        key_pos = (valid.long().cumsum(-1) - 1).clamp(min=0) if valid is not None else \
            positions if positions is not None else torch.arange(S, device=idx.device).expand(B, S)
        pos = key_pos if slots is None else key_pos[:, slots]
        if self.pos_embed is not None and past + T > c.block_size:
            # learned positions (OPT): the table ends at block_size
            raise ValueError(f"{past + T} tokens, but {c.name} has learned positions for "
                             f"{c.block_size} (max_position_embeddings): shorten the input")
        # packed rows: example k of a row holds the tokens after the k-th restart of the positions
        example = (positions == 0).cumsum(-1) if positions is not None else None  # (B, T)
        mask = self.attention_mask(valid, key_pos, T, S, slots, example)
        return n_soft, pos, mask, slots

    def check_packed(self, positions, idx, attention_mask, cache, n_prompt):
        """Packed rows are whole examples side by side: no padding mask, no cache, and no soft
        prompt (it would sit once in front of the row, seen by its first example only)."""
        if positions.shape != idx.shape:
            raise ValueError(f"positions has shape {tuple(positions.shape)}, expected "
                             f"{tuple(idx.shape)} (one per token)")
        for given, what in ((attention_mask, "attention_mask"), (cache, "a KV cache"),
                            (n_prompt or None, "prompt tuning's soft tokens")):
            if given is not None:
                raise ValueError(f"packed rows (positions) do not take {what}")

    def attention_mask(self, valid, key_pos, T, S, slots=None, example=None):
        """None when plain causal attention is right (SDPA's fast path); else a (B|1, 1|H, T, S)
        bool mask, or for ALiBi a float bias with -inf where masked. valid (B, S): real keys (None =
        all); slots (T,): the queries' key slots (None = the last T); example (B, T): packed rows,
        the example of each token (T == S), attended to only by its own."""
        c = self.config
        window = c.sliding_window if 0 < c.sliding_window < S else 0  # 0: no key is too old
        plain = (valid is None and slots is None and example is None and c.pos != "alibi"
                 and not window)
        if plain and (T == S or T == 1):
            return None
        device = key_pos.device
        k_idx = torch.arange(S, device=device)
        q_idx = (slots if slots is not None else torch.arange(S - T, S, device=device))[:, None]
        mask = (k_idx <= q_idx)[None, None]  # (1, 1, T, S) causal, in cache coordinates
        if window:  # Mistral: the last `window` tokens only, counted by position (real tokens,
            # so a padded row sees what it sees alone); the cached decode step gets it here too
            q_pos = key_pos[:, slots] if slots is not None else key_pos[:, S - T:]
            mask = mask & (key_pos[:, None, None, :] > q_pos[:, None, :, None] - window)
        if valid is not None:
            # a query always sees itself, so rows of padding never softmax over nothing (NaN)
            mask = mask & valid[:, None, None, :] | (k_idx == q_idx)
        if example is not None:  # block-diagonal: causal within each example of a packed row
            mask = mask & (example[:, None, :, None] == example[:, None, None, :])
        if c.pos != "alibi":
            return mask
        # ALiBi: softmax is shift-invariant per row, so slope * key position = slope * (key - query)
        slopes = alibi_slopes(c.n_head, device)[None, :, None, None]
        bias = slopes * key_pos[:, None, None, :].float()
        return bias.masked_fill(~mask, float("-inf"))  # (B, H, T, S)
