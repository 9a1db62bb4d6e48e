"""Reference solution of exercise 4 (rotary, KV cache). Instructors: delete exercises/solutions/
before handing out."""
import torch


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


class KVCache:
    def __init__(self, c, batch_size, max_len, device, dtype):
        self.pos, self.max_len = 0, max_len
        shape = (batch_size, c.n_kv_head, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]

    def update(self, layer, k, v):
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
