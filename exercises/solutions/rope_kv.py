"""Reference solution of exercise 4 (rotary, KV cache). Not in the students' copy:
exercises/handout.py leaves this folder out."""
from typing import NamedTuple

import torch

import model


def rope_angles(c, pos):
    i = torch.arange(0, c.rotary_dim, 2, device=pos.device).float()
    angles = pos[..., None].float() * c.rope_theta ** (-i / c.rotary_dim)  # (B, T, rd/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x, cos, sin, interleaved=False):
    rd = 2 * cos.size(-1)
    xr, rest = x[..., :rd], x[..., rd:]
    a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :rd // 2], xr[..., rd // 2:])
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    ra, rb = a * cos - b * sin, b * cos + a * sin
    y = torch.stack((ra, rb), dim=-1).flatten(-2) if interleaved else torch.cat((ra, rb), dim=-1)
    return torch.cat((y, rest), dim=-1)


class LayerCache(NamedTuple):
    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor

    def update(self, k, v):
        self.k.index_copy_(2, self.slots, k.to(self.k.dtype))
        self.v.index_copy_(2, self.slots, v.to(self.v.dtype))
        return self.k, self.v


class KVCache(model.KVCache):
    def __init__(self, c, batch_size, max_len, device, dtype):
        shape = (batch_size, c.n_kv_head, max_len, c.head_dim)
        self.kv = [(torch.zeros(shape, device=device, dtype=dtype),
                    torch.zeros(shape, device=device, dtype=dtype)) for _ in range(c.n_layer)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next = torch.zeros((), dtype=torch.long, device=device)
        self.pos, self.max_len = 0, max_len

    def extend(self, valid):
        T = valid.size(1)
        self.check(T)
        slots = self.next + torch.arange(T, device=self.next.device)
        self.valid.index_copy_(1, slots, valid.to(torch.bool))
        self.next += T
        self.pos += T
        return slots

    def layer(self, i, slots):
        return LayerCache(*self.kv[i], slots)
