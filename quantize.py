"""
Weight-only quantization of the frozen base, in plain PyTorch: 8-bit (LLM-Adapters' `load_in_8bit`) and QLoRA's
4-bit NormalFloat (Dettmers et al. 2023), so LLaMA-7B's projections take ~6.5 GB (int8) or ~3.6 GB (nf4) instead
of 13 GB in bf16. Adapters stay fp32 and train exactly as on a bf16 base.

  int8     per output channel (row) of W: scale = absmax(row) / 127, q = round(W / scale) in [-127, 127]
  nf4      blocks of 64 consecutive weights (row-major): absmax per block; each weight / absmax in [-1, 1] is
           replaced by the nearest of the 16 NF4 code values, a 4-bit index; two indices packed per byte
  nf4-dq   nf4 with double quantization (QLoRA §3): the fp32 absmax values (one per 64 weights, 0.5 bit per
           weight) minus their mean are themselves quantized to 8 bits in blocks of 256 (0.127 bit per weight)

A quantized projection is a `QuantLinear`: still a model.Linear with its official name and its hook slot, so LoRA,
bottlenecks, prefixes and PEFT interop work unchanged. It keeps the packed weight in buffers and dequantizes it to
the input's dtype at every call (in backward again, instead of keeping the full-precision W alive for it, as
QLoRA does). `weight` dequantizes on read, for adapters that need W. Embeddings, norms, lm_head and biases stay in
the compute dtype.

  quantize(w, mode) -> {name: tensor}; dequantize(q, mode, shape, dtype) -> w     the maths, on plain tensors
  QuantLinear(linear, mode, w)                                                    a Linear, W packed
  quantize_model(model, mode)                                                     every projection, in place
checkpoints.load_model(path, quantize=mode) quantizes each projection as it is read from the file, so the full
precision model never exists in memory. Merging an adapter into a quantized W is refused (adapters.merge);
saving a quantized base is refused (checkpoints.save_model): load the original without quantize for those.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Linear

MODES = ("int8", "nf4", "nf4-dq")
BLOCK = 64          # weights per NF4 absmax (QLoRA)
DQ_BLOCK = 256      # absmax values per 8-bit scale in double quantization (QLoRA)
CHUNK = 1 << 22     # values quantized at a time (16 MB in fp32): bounds the temporaries while loading


def nf4_code():
    """QLoRA's 16 NormalFloat values: quantiles of N(0, 1) scaled to [-1, 1], asymmetric so that 0 is exact: 8
    positive quantiles from the top 1 - offset of the distribution down to the median, 7 negative ones, and 0.
    offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 keeps the outermost quantiles finite. Computed as bitsandbytes does
    (fp32 steps, fp32 division), which gives the paper's table bit for bit (tests/test_quantize.py)."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())   # 8 quantiles > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 quantiles < 0
    v = torch.cat((neg, torch.zeros(1, dtype=torch.float64), pos)).float().sort().values
    return v / v.max()


NF4 = nf4_code()                          # (16,) ascending, NF4[7] == 0
NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2  # (15,): bucketize against these = the nearest code value
_NF4_ON = {}                              # device -> NF4 there, copied once (not at every call)


def _nf4_on(device):
    if device not in _NF4_ON:
        _NF4_ON[device] = NF4.to(device)
    return _NF4_ON[device]


# ------------------------------------------------------------------------------------------- maths on tensors
def quantize_rows_int8(w):
    """(rows, cols) -> int8 (rows, cols), fp32 scale (rows, 1): symmetric absmax per row, q = round(w / scale)."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return (w / scale).round().to(torch.int8), scale


def _nf4_blocks(blocks):
    """(k, 64) -> absmax fp32 (k,), codes uint8 (k * 32,): each weight / its block's absmax, in [-1, 1], becomes
    the index of the nearest NF4 value; two indices per byte, the first in the high nibble (bitsandbytes')."""
    blocks = blocks.float()
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp(min=1e-12)[:, None]
    idx = torch.bucketize(normed, NF4_MIDPOINTS.to(blocks.device), out_int32=True).to(torch.uint8)
    return absmax, (idx[:, 0::2] << 4 | idx[:, 1::2]).view(-1)


def _in_chunks(fn, x, rows):
    """fn over x, `rows` rows at a time, outputs concatenated: fn's fp32 temporaries stay the size of one chunk,
    not of the whole tensor (7B's MLP weights are 45M values each)."""
    if x.size(0) <= rows:
        return fn(x)
    return [torch.cat(parts) for parts in zip(*(fn(chunk) for chunk in x.split(rows)))]


def _pad_to(x, multiple):
    """x flattened, zero-padded to a multiple of `multiple` values (a copy only when padding is needed)."""
    x = x.reshape(-1)
    return F.pad(x, (0, -x.numel() % multiple)) if x.numel() % multiple else x


def quantize_nf4(w, double_quant=False):
    """w (any shape; row-major blocks of 64 consecutive values, the last one zero-padded) -> {"codes": uint8
    (n_blocks * 32,), "absmax": fp32 (n_blocks,)}; with double_quant the absmax is kept as {"absmax_q": int8
    (ceil(n_blocks / 256), 256), "absmax_scale": fp32 (.., 1), "absmax_mean": fp32 ()} instead."""
    absmax, codes = _in_chunks(_nf4_blocks, _pad_to(w, BLOCK).view(-1, BLOCK), CHUNK // BLOCK)
    if not double_quant:
        return {"codes": codes, "absmax": absmax}
    # absmax values are all positive: centred, they use the whole signed 8-bit range
    mean = absmax.mean()
    absmax_q, absmax_scale = quantize_rows_int8(_pad_to(absmax - mean, DQ_BLOCK).view(-1, DQ_BLOCK))
    return {"codes": codes, "absmax_q": absmax_q, "absmax_scale": absmax_scale, "absmax_mean": mean}


def dequantize_nf4(q, shape):
    """The inverse of quantize_nf4 -> fp32 tensor of `shape`."""
    n, codes = shape.numel(), q["codes"]
    if "absmax" in q:
        absmax = q["absmax"]
    else:
        absmax = (q["absmax_q"].float() * q["absmax_scale"]).view(-1) + q["absmax_mean"]
    idx = torch.stack((codes >> 4, codes & 15), dim=-1).view(-1, BLOCK).int()  # (n_blocks, 64)
    absmax = absmax[:idx.size(0)]  # double quantization padded it to a multiple of 256
    return (_nf4_on(codes.device)[idx] * absmax[:, None]).view(-1)[:n].view(shape)


def quantize(w, mode):
    """A weight (out, in) -> the tensors that hold it in `mode` (see the module docstring)."""
    if mode == "int8":
        qweight, scale = _in_chunks(quantize_rows_int8, w, max(1, CHUNK // w.size(1)))
        return {"qweight": qweight, "scale": scale}
    return quantize_nf4(w, double_quant=mode == "nf4-dq")


def dequantize(q, mode, shape, dtype):
    """The tensors of `quantize` -> the weight of `shape` in `dtype`, computed in fp32 and rounded once."""
    w = q["qweight"].float() * q["scale"] if mode == "int8" else dequantize_nf4(q, shape)
    return w.to(dtype)


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {', '.join(MODES)} (or none)")


# ------------------------------------------------------------------------------------------------ the module
class _FrozenLinear(torch.autograd.Function):
    """y = x W^T for a frozen W that `weight(dtype)` dequantizes. W is dequantized again in backward instead of
    being saved for it, so training holds only the packed weights (plain F.linear would keep every layer's
    full-precision W alive until backward, as much memory as the unquantized model)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return F.linear(x, weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):  # (.., out) -> (.., in); W gets no gradient
        return grad_y @ ctx.weight(grad_y.dtype), None


class QuantLinear(Linear):
    """A model.Linear whose weight is stored quantized (`mode`) in buffers; the bias and the hook slot stay.
    Built from a Linear (`linear`: its sizes, bias and adapter slot, it may be on the meta device) and the
    full-precision weight `w` (out, in); `weight` hands W out in `dtype` (default: w's)."""

    def __init__(self, linear, mode, w, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        check_mode(mode)
        self.in_features, self.out_features, self.mode = linear.in_features, linear.out_features, mode
        self.register_parameter("bias", linear.bias)
        self.adapter = linear.adapter
        self.dtype = dtype or w.dtype
        for name, t in quantize(w.detach(), mode).items():
            self.register_buffer(name, t)

    def packed(self):
        return {name: t for name, t in self.named_buffers(recurse=False)}

    def dequantized(self, dtype):  # (out, in)
        return dequantize(self.packed(), self.mode, torch.Size((self.out_features, self.in_features)), dtype)

    @property
    def weight(self):  # for adapters that read W (DoRA's norms); writing to it changes nothing
        return self.dequantized(self.dtype)

    def forward(self, x):
        y = _FrozenLinear.apply(x, self.dequantized) if x.requires_grad else F.linear(x, self.dequantized(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if self.adapter is None else self.adapter(x, y, self)

    def extra_repr(self):
        return f"{super().extra_repr()}, quantize={self.mode}"


def is_projection(m):
    """The linears that get quantized: model.Linear (not lm_head, project_in/out: plain nn.Linear)."""
    return type(m) is Linear


def quantize_linear(model, name, w, mode, dtype=None):
    """Replace the projection `name` of model by a QuantLinear of mode holding w (checkpoints.load_model calls
    this for each projection weight as it reads it)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, QuantLinear(model.get_submodule(name), mode, w, dtype))


def quantize_model(model, mode):
    """Quantize every projection (model.Linear: q/k/v/o, MLP, BLOOM's fused qkv, ...) of a model in memory, in
    place; embeddings, norms and lm_head stay as they are. Returns the model."""
    check_mode(mode)
    for name, m in [(n, m) for n, m in model.named_modules() if is_projection(m)]:
        quantize_linear(model, name, m.weight.detach(), mode)
    return model


def is_quantized(model):
    return any(isinstance(m, QuantLinear) for m in model.modules())


def model_bytes(model):
    """Bytes of all parameters and buffers (the packed weights included), counting tied weights once."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
