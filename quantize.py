"""
Weight-only quantization of the frozen base, in plain PyTorch: 8-bit (LLM-Adapters trains on an
8-bit base) and QLoRA's 4-bit NormalFloat (Dettmers et al. 2023). LLaMA-7B's projections take 6.5 GB
in int8 and 3.3-3.6 GB in nf4 instead of 13 GB in bf16. Adapters stay fp32 and train as on bf16.

  int8    per output channel (row) of W: scale = absmax(row) / 127, q = round(W / scale)
  nf4     blocks of 64 consecutive weights (row-major): each weight / its block's absmax, in
          [-1, 1], becomes the index of the nearest of the 16 NF4 values (4 bits), two per byte
  nf4-dq  nf4 with double quantization (QLoRA 3): the fp32 absmax values (0.5 bit per weight) minus
          their mean are quantized again, to 8 bits in blocks of 256 (0.127 bit per weight)

A quantized projection is a `QuantLinear`: still a model.Linear with its official name and hook
slot, so LoRA, bottlenecks, prefixes and PEFT files work unchanged on top. It keeps W packed in
buffers and dequantizes it to the input's dtype at each call, and again in backward rather than
keeping the full-precision W alive for it, as QLoRA does. Its `weight` dequantizes on read, for
adapters that need W. Embeddings, norms, lm_head and biases stay in the compute dtype.

  quantize(w, mode) -> {name: tensor}          the maths, on tensors
  dequantize(q, mode, shape, dtype) -> w
  QuantLinear(linear, mode, w)                 a Linear with W packed
  quantize_model(model, mode)                  every projection of a model in memory, in place
  checkpoints.load_model(path, quantize=mode)  each projection packed as it is read: the
                                               full-precision model never exists in memory
  python quant_report.py --model=llama-7b      bytes of a model in each mode, error of each layer

Merging an adapter into a quantized W (adapters.merge) and saving a quantized base
(checkpoints.save_model) are refused: the adapter's update would be rounded away, the original
weights lost. Load the base without quantize for those.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Linear

MODES = ("int8", "nf4", "nf4-dq")
BLOCK = 64         # weights per NF4 absmax (QLoRA)
DQ_BLOCK = 256     # absmax values per 8-bit scale in double quantization (QLoRA)
CHUNK = 1 << 22    # values quantized at a time (16 MB in fp32): bounds the temporaries


def nf4_code():
    """QLoRA's 16 NormalFloat values: quantiles of N(0, 1) at equal steps of probability, scaled to
    [-1, 1]; 8 positive, 7 negative and an exact 0. offset = (1 - 1/30 + 1 - 1/32) / 2 is the
    probability of the outermost ones (the 1.0 quantile would be infinite). Computed as bitsandbytes
    does (fp32 steps, fp32 division): the paper's table bit for bit (tests/test_quantize.py)."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())   # 8 quantiles > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 quantiles < 0
    v = torch.cat((neg, torch.zeros(1, dtype=torch.float64), pos)).float().sort().values
    return v / v.max()


NF4 = nf4_code()                          # (16,) ascending, NF4[7] == 0
NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2  # (15,): bucketize against these = the nearest NF4 value
_NF4_ON = {}                              # device -> NF4 there, copied once, not at each call


def _nf4_on(device):
    if device not in _NF4_ON:
        _NF4_ON[device] = NF4.to(device)
    return _NF4_ON[device]


# --------------------------------------------------------------------------- maths on tensors
def quantize_rows_int8(w):
    """(rows, cols) -> int8 (rows, cols), fp32 scale (rows, 1): absmax per row, round(w / scale)."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return (w / scale).round().to(torch.int8), scale


def _nf4_blocks(blocks):
    """(k, 64) -> absmax fp32 (k,), codes uint8 (k * 32,): indices of the nearest NF4 values of
    blocks / absmax, two per byte, the first in the high nibble (bitsandbytes' order)."""
    blocks = blocks.float()
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp(min=1e-12)[:, None]  # in [-1, 1]
    idx = torch.bucketize(normed, NF4_MIDPOINTS.to(blocks.device), out_int32=True).to(torch.uint8)
    return absmax, (idx[:, 0::2] << 4 | idx[:, 1::2]).view(-1)


def _in_chunks(fn, x, rows):
    """fn over x, `rows` rows at a time, outputs concatenated: fn's fp32 temporaries stay the size
    of one chunk, not of the whole tensor (each MLP weight of LLaMA-7B is 45M values)."""
    if x.size(0) <= rows:
        return fn(x)
    return [torch.cat(parts) for parts in zip(*(fn(chunk) for chunk in x.split(rows)))]


def _pad_to(x, multiple):
    """x flattened, zero-padded to a multiple of `multiple` values (copied only if it must be)."""
    x = x.reshape(-1)
    return F.pad(x, (0, -x.numel() % multiple)) if x.numel() % multiple else x


def quantize_nf4(w, double_quant=False):
    """w (any shape: row-major blocks of 64 values, the last one zero-padded) ->
    {"codes": uint8 (n_blocks * 32,), "absmax": fp32 (n_blocks,)}; with double_quant, the absmax as
    {"absmax_q": int8 (ceil(n_blocks / 256), 256), "absmax_scale": fp32 (.., 1),
    "absmax_mean": fp32 ()}."""
    absmax, codes = _in_chunks(_nf4_blocks, _pad_to(w, BLOCK).view(-1, BLOCK), CHUNK // BLOCK)
    if not double_quant:
        return {"codes": codes, "absmax": absmax}
    mean = absmax.mean()  # all absmax values are > 0: centred, they use the whole signed range
    absmax_q, absmax_scale = quantize_rows_int8(_pad_to(absmax - mean, DQ_BLOCK).view(-1, DQ_BLOCK))
    return {"codes": codes, "absmax_q": absmax_q, "absmax_scale": absmax_scale, "absmax_mean": mean}


def dequantize_nf4(q, shape):
    """The inverse of quantize_nf4 -> fp32 tensor of `shape`."""
    codes = q["codes"]
    idx = torch.stack((codes >> 4, codes & 15), dim=-1).view(-1, BLOCK).int()  # (n_blocks, 64)
    if "absmax" in q:
        absmax = q["absmax"]
    else:  # double quantization: padded to a multiple of 256 blocks
        absmax = (q["absmax_q"].float() * q["absmax_scale"]).view(-1)[:len(idx)] + q["absmax_mean"]
    return (_nf4_on(codes.device)[idx] * absmax[:, None]).view(-1)[:shape.numel()].view(shape)


def quantize(w, mode):
    """A weight (out, in) -> the tensors that hold it in `mode` (see the module docstring)."""
    if mode == "int8":
        qweight, scale = _in_chunks(quantize_rows_int8, w, max(1, CHUNK // w.size(1)))
        return {"qweight": qweight, "scale": scale}
    return quantize_nf4(w, double_quant=mode == "nf4-dq")


def dequantize(q, mode, shape, dtype):
    """The tensors of `quantize` -> the weight of `shape` in `dtype`, in fp32 then rounded once."""
    w = q["qweight"].float() * q["scale"] if mode == "int8" else dequantize_nf4(q, shape)
    return w.to(dtype)


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {', '.join(MODES)} (or none)")


# --------------------------------------------------------------------------------- the module
class _FrozenLinear(torch.autograd.Function):
    """y = x W^T for a frozen W that `weight(dtype)` dequantizes. W is dequantized again in backward
    rather than saved for it: plain F.linear would keep every layer's full-precision W alive until
    backward, as much memory as the unquantized model."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return F.linear(x, weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):  # (.., out) -> grads of x (.., in), W (none), bias (if it trains)
        grad_bias = grad_y.flatten(0, -2).sum(0) if ctx.needs_input_grad[2] else None
        return grad_y @ ctx.weight(grad_y.dtype), None, grad_bias


class QuantLinear(Linear):
    """A model.Linear whose weight is stored quantized (`mode`) in buffers; bias and hook slot stay.
    Built from a Linear (its sizes, bias and adapter slot; it may be on the meta device) and the
    full-precision weight w (out, in); `weight` hands W out in `dtype` (default: w's)."""

    def __init__(self, linear, mode, w, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        check_mode(mode)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode = mode
        self.register_parameter("bias", linear.bias)
        self.adapter = linear.adapter
        self.dtype = dtype or w.dtype
        for name, t in quantize(w.detach(), mode).items():
            self.register_buffer(name, t)

    def dequantized(self, dtype):  # (out, in)
        packed = dict(self.named_buffers(recurse=False))
        shape = torch.Size((self.out_features, self.in_features))
        return dequantize(packed, self.mode, shape, dtype)

    @property
    def weight(self):  # for adapters that read W (DoRA's norms); writing to it changes nothing
        return self.dequantized(self.dtype)

    def forward(self, x):
        if x.requires_grad:
            y = _FrozenLinear.apply(x, self.dequantized, self.bias)
        else:
            y = F.linear(x, self.dequantized(x.dtype), self.bias)
        return y if self.adapter is None else self.adapter(x, y, self)

    def extra_repr(self):
        return f"{super().extra_repr()}, quantize={self.mode}"


def is_projection(m):
    """What gets quantized: model.Linear (not lm_head or project_in/out: plain nn.Linear)."""
    return type(m) is Linear


def quantize_linear(model, name, w, mode, dtype=None):
    """Replace projection `name` of model by a QuantLinear holding w (load_model calls this for each
    projection weight as it reads it)."""
    parent, _, child = name.rpartition(".")
    q = QuantLinear(model.get_submodule(name), mode, w, dtype)
    setattr(model.get_submodule(parent), child, q)


def quantize_model(model, mode):
    """Quantize every projection (q/k/v/o, MLP, BLOOM's fused qkv, ...) of a model in memory, in
    place; embeddings, norms and lm_head stay as they are. Returns the model."""
    check_mode(mode)
    for name, m in [(n, m) for n, m in model.named_modules() if is_projection(m)]:
        quantize_linear(model, name, m.weight.detach(), mode)
    return model


def is_quantized(model):
    return any(isinstance(m, QuantLinear) for m in model.modules())


def model_bytes(model):
    """Bytes of all parameters and buffers (packed weights included), tied weights counted once."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
