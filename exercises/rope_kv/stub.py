"""Exercise 4: rotary position embeddings and the KV cache, the two pieces of model.py that make
decoding work.

Rotary (Su et al. 2021, arXiv 2104.09864): position p rotates each pair of a query/key's first
rotary_dim dims by the angle p * theta**(-2i/rotary_dim), pair i. Then q_m . k_n depends on m - n
only. LLaMA's Hugging Face layout pairs dim i with dim i + rotary_dim/2 ("rotate half"); GPT-J pairs
neighbours (2i, 2i+1) ("interleaved").

KV cache: while generating, keys and values of past tokens never change, so each layer keeps them
and a new token only computes its own. Decoding token by token with the cache must give the logits
of one full forward pass.

Fill in the TODOs; the grader plugs your functions into model.py in place of its own and compares.
Read exercises/README.md (exercise 4), then:

    python -m pytest exercises/rope_kv
"""
import torch


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


class KVCache:
    """Keys and values of every layer, each (batch_size, c.n_kv_head, max_len, c.head_dim),
    allocated once. `pos` = how many tokens are stored; the model sets it after each forward
    (model.py, Transformer.forward)."""

    def __init__(self, c, batch_size, max_len, device, dtype):
        self.pos, self.max_len = 0, max_len
        raise NotImplementedError("KVCache.__init__")  # TODO: self.k, self.v, a tensor per layer

    def update(self, layer, k, v):
        """Store the new k, v (B, n_kv_head, T, D) of `layer` at positions pos .. pos+T-1; return
        the keys and values of all tokens so far, (B, n_kv_head, pos + T, D) each. More than max_len
        tokens: ValueError."""
        raise NotImplementedError("KVCache.update")  # TODO
