"""loss.py: the loss in chunks (Transformer.loss_chunk) is the full logits' loss, with the same
gradients for every parameter, in fp32 and under bf16 autocast, and never makes the whole logits
(a dispatch mode records the largest tensor of logits any op made); without targets, without
gradients and with a hook on the head it is the plain path's. All offline, CPU."""
import pytest
import torch

from conftest import tiny_model


def rand_ids(*shape, vocab=256, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


class MostLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most rows of logits (a tensor whose last dimension is the vocabulary) that any op
    made, in forward and backward."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.rows = vocab_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() > 1 and t.size(-1) == self.vocab_size:
                self.rows = max(self.rows, t.numel() // self.vocab_size)
        return out


def loss_and_grads(m, idx, targets, chunk, dtype=None):
    m.zero_grad(set_to_none=True)
    m.loss_chunk = chunk
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        logits, loss = m(idx, targets=targets)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                   if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gptj", "bloom", "opt-350m"])
def test_chunked_loss_equals_the_full_logits_loss(family):
    """Every parameter trains (the tied embeddings of BLOOM and OPT get the head's gradient too,
    GPT-J's lm_head bias its own). Targets with -100: a prompt, a row with none at all. The chunked
    path returns no logits and never makes a tensor of B x T x V (the reference path does)."""
    m = tiny_model(family).train()
    idx = rand_ids(4 * 40, vocab=256, seed=3).view(4, 40)  # more tokens than n_embd (64)
    targets = torch.roll(idx, -1, 1)
    targets[:, :4] = -100
    targets[2] = -100  # a row without a target
    with MostLogits(m.config.vocab_size) as full:
        logits, loss, grads = loss_and_grads(m, idx, targets, 0)
    assert full.rows == idx.numel()  # the reference holds the whole logits
    with MostLogits(m.config.vocab_size) as chunked:
        none, loss_c, grads_c = loss_and_grads(m, idx, targets, 5)
    # what remains is the head's weight seen as (n_embd, V) in its gradient's matmul
    assert none is None and chunked.rows == m.config.embed_dim < idx.numel() / 2
    assert torch.allclose(loss, loss_c, atol=0, rtol=1e-6)
    assert grads.keys() == grads_c.keys() and ("lm_head.bias" in grads) == (family == "gptj")
    for n in grads:
        assert torch.allclose(grads[n], grads_c[n], atol=1e-6, rtol=1e-5), n
    _, loss_1, grads_1 = loss_and_grads(m, idx, targets, idx.numel())  # one chunk: no recompute
    assert torch.allclose(loss, loss_1, atol=0, rtol=1e-6)
    assert all(torch.allclose(grads[n], grads_1[n], atol=1e-6, rtol=1e-5) for n in grads)


def test_chunked_loss_under_bf16_autocast_and_without_targets():
    m = tiny_model("llama").train()
    idx = rand_ids(3 * 11, vocab=256, seed=4).view(3, 11)
    targets = torch.roll(idx, -1, 1)
    targets[0, :6] = -100
    _, loss, grads = loss_and_grads(m, idx, targets, 0, torch.bfloat16)
    _, loss_c, grads_c = loss_and_grads(m, idx, targets, 4, torch.bfloat16)
    _, ref32, grads32 = loss_and_grads(m, idx, targets, 0)
    assert torch.allclose(loss, loss_c, rtol=1e-5) and not torch.allclose(loss, ref32, rtol=1e-5)
    for n in grads:  # bf16 rounds differently along the way: as near fp32 as the plain path
        def error(g):
            return ((g - grads32[n]).norm() / grads32[n].norm()).item()
        assert 1e-3 < error(grads[n]) < 0.05 and error(grads_c[n]) < 1.25 * error(grads[n]), n
        assert error(grads[n] - grads_c[n] + grads32[n]) < 0.02, n
    none = torch.full_like(targets, -100)  # no target at all: NaN, as F.cross_entropy gives
    m.loss_chunk = 4
    assert m(idx, none)[1].isnan() and m.eval()(idx)[1] is None
    with torch.no_grad():  # evaluation: the same loss, no gradient made
        assert torch.allclose(m(idx, targets)[1], ref32, rtol=1e-6)
    seen = []  # a hook on the head gets the whole logits it expects: the plain path
    m.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    logits, loss_h = m(idx, targets)
    assert seen == [logits.shape] == [(3, 11, m.config.vocab_size)]
    assert torch.allclose(loss_h, ref32, rtol=1e-6)
