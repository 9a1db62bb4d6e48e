"""
The training loss a chunk of tokens at a time: the mean cross-entropy of the head's logits, the
plain path's number, without ever holding the whole logits (B x T x V).
Transformer.forward calls `chunked_loss` when its `loss_chunk` (tokens per chunk) is set.
"""
import torch
import torch.nn.functional as F


# logits per chunk of the loss (train.py, bench.py): 128 MiB in fp32, 1,048 tokens at LLaMA's 32,000
# words, 261 at Llama 3's 128,256
LOSS_CHUNK_LOGITS = 2**25


def chunked_loss(head, x, targets, chunk):
    """Mean cross-entropy of head(x) against targets (-100 = ignore), the plain path's number, from
    `chunk` tokens' logits at a time: memory holds one chunk's logits (chunk, V), never B x T x V
    (at Llama 3's 128,256 words, 4096 tokens of fp32 logits are 2 GiB). x (B, T, C), targets
    (B, T); head: the nn.Linear lm_head. Tokens without a target are dropped before the head."""
    x, targets = x.flatten(0, 1), targets.flatten()
    keep = targets != -100
    x, targets = x[keep], targets[keep]  # (N, C), (N,)
    device = x.device.type  # the head's matmuls in autocast's dtype, as the plain path's
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
        head.weight.dtype
    total = ChunkedCrossEntropy.apply(x, head.weight, head.bias, targets, chunk, dtype)
    return total / len(targets)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of x W^T + b, a chunk of tokens at a time. The gradients are made in
    forward, chunk by chunk, while that chunk's logits exist: d(loss)/d(logits) = softmax - one-hot,
    so for x (softmax - onehot) W, for W (softmax - onehot)^T x. Backward only scales them: nothing
    is recomputed, so this costs the plain path's matmuls and never holds the whole logits.
    x (N, C), weight (V, C), bias (V,) or None, targets (N,) -> a scalar (fp32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk, dtype):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = torch.zeros_like(x) if need_x else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for s in range(0, len(targets), chunk):
                xs, ts = x[s:s + chunk].to(dtype), targets[s:s + chunk]
                logits = F.linear(xs, w, b).float()  # (n, V)
                lse = logits.logsumexp(-1)
                total += (lse - logits.gather(1, ts[:, None])[:, 0]).sum()
                if not (need_x or need_w or need_b):
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                g[torch.arange(len(ts), device=g.device), ts] -= 1
                g = g.to(dtype)  # the plain path casts this gradient to the logits' dtype too
                if need_x:
                    gx[s:s + chunk] = g @ w
                if need_w:
                    gw += g.t() @ xs
                if need_b:
                    gb += g.float().sum(0)
        ctx.save_for_backward(*(t for t in (gx, gw, gb) if t is not None))
        ctx.grads = need_x, need_w, need_b
        return total

    @staticmethod
    def backward(ctx, grad):  # grad: d(final loss)/d(this sum), e.g. 1/N from the mean
        saved = iter(ctx.saved_tensors)  # autograd casts each to its input's dtype
        gx, gw, gb = (next(saved) * grad if need else None for need in ctx.grads)
        return gx, gw, gb, None, None, None