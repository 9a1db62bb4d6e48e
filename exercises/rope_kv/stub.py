"""Exercise 4: rotary position embeddings and the KV cache, the two pieces of model.py that make
decoding work.

Rotary (Su et al. 2021, arXiv 2104.09864): position p rotates each pair of a query/key's first
rotary_dim dims by the angle p * theta**(-2i/rotary_dim), pair i. Then q_m . k_n depends on m - n
only. LLaMA's Hugging Face layout pairs dim i with dim i + rotary_dim/2 ("rotate half"); GPT-J pairs
neighbours (2i, 2i+1) ("interleaved").

KV cache: while generating, keys and values of past tokens never change, so each layer keeps them
and a new token only computes its own. Decoding token by token with the cache must give the logits
of one full forward pass. model.py's cache is STATIC: allocated once at max_len slots, and every
call attends over all max_len slots with a mask (`valid`) that hides the slots not yet written and
the left padding of a batch. So a one-token step has the same shapes at every position (no tensor
grows by one each step), and on a GPU a CUDA graph recorded once can replay every step
(generate.py).

Fill in the TODOs; the grader plugs your functions into model.py in place of its own and compares.
Read exercises/README.md (exercise 4), then:

    python -m pytest exercises/rope_kv
"""
from typing import NamedTuple

import torch

import model


def rope_angles(c, pos):
    """pos (B, T) integer positions -> cos, sin, each (B, 1, T, c.rotary_dim // 2), float32. The
    angle of pair i at position p is p * c.rope_theta ** (-2 * i / c.rotary_dim). (The 1 broadcasts
    over heads.)"""
    raise NotImplementedError("rope_angles")  # TODO


def apply_rope(x, cos, sin, interleaved=False):
    """Rotate x (B, H, T, D): its first rd = 2 * cos.size(-1) dims, pair i by the angle in
    cos/sin[..., i]; dims from rd on pass unchanged (GPT-J rotates 8 of 16). Pairs: (i, i + rd/2)
    (rotate half, LLaMA), or (2i, 2i+1) when interleaved (GPT-J). A pair (a, b) becomes (a cos - b
    sin, b cos + a sin). Return x's dtype."""
    raise NotImplementedError("apply_rope")  # TODO


class LayerCache(NamedTuple):
    """One layer's view of the cache, made by `KVCache.layer(i, slots)` and handed to that layer's
    attention (model.py, Attention.forward): its keys and values k, v (B, n_kv_head, max_len,
    head_dim), the cache's own tensors, and `slots` (T,), the slots this call writes."""
    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor

    def update(self, k, v):
        """Write the new k, v (B, n_kv_head, T, head_dim) at `slots` (slot slots[t] along dim 2
        takes token t), into self.k / self.v themselves (in place: the next call must find them
        there); return the WHOLE cache (self.k, self.v), max_len slots each, not a slice: attention
        runs over every slot and the mask hides the ones that hold nothing. k, v may be narrower
        than the cache (autocast): store them in the cache's dtype. Hint: Tensor.index_copy_."""
        raise NotImplementedError("LayerCache.update")  # TODO


class KVCache(model.KVCache):
    """Static keys and values of every layer, allocated once, and which slots hold a real token.
    model.py's Transformer uses it so (read place_tokens, then forward):

        slots = cache.extend(valid)        # valid (B, T): which of the T new tokens are real
        ... cache.valid, cache.max_len     # the attention mask over all max_len key slots
        kv = cache.layer(i, slots)         # block i: k, v = kv.update(k, v) -> the whole cache

    and reads `cache.pos` (how many slots are used) before extend. Every call writes its T tokens at
    the next T free slots, whatever the padding: a left-padded row simply has slots marked not
    valid. The next free slot is kept twice: `pos`, a Python int (for checks, and the first call),
    and `next`, a 0-dim long tensor on the cache's device. The slots must come from `next`: a
    CUDA graph replays the recorded tensor operations, not Python, so only a tensor advanced inside
    the step moves on at each replay (generate.DecodeStep then adds 1 to `pos` itself)."""

    def __init__(self, c, batch_size, max_len, device, dtype):
        """Allocate, zeroed, on `device`: `self.kv`, a list of c.n_layer pairs (k, v), each
        (batch_size, c.n_kv_head, max_len, c.head_dim) in `dtype`; `self.valid`, bool
        (batch_size, max_len), all False (nothing written yet); `self.next`, a 0-dim long tensor 0;
        `self.pos` = 0 and `self.max_len` = max_len."""
        raise NotImplementedError("KVCache.__init__")  # TODO

    def extend(self, valid):
        """valid (B, T) bool: which of T new tokens are real (False: left padding). Hand out the
        next T slots, next .. next+T-1, as a (T,) long tensor on the cache's device computed from
        `self.next`; mark them in self.valid (row b, slot slots[t] = valid[b, t]); advance `next`
        (in place: `+=`) and `pos` by T. Would that pass max_len: ValueError, and change nothing
        (self.check does the test)."""
        raise NotImplementedError("KVCache.extend")  # TODO

    # Given: check, repeat and reorder come from model.KVCache (beam search's plumbing); layer
    # hands each block your LayerCache.
    def layer(self, i, slots):
        return LayerCache(*self.kv[i], slots)
