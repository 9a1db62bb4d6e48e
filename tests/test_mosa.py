"""mosa.py: MoSA's split & join on the bottleneck adapters (series, parallel, per-linear): the
parts are disjoint and cover the weight, only the part sparse_step picks trains (scaled by n while
training), the pick is a function of the step (so a resumed run picks the same), and join_sparse
leaves one plain adapter with the same logits, which saves, loads and keeps training.
"""
import pytest
import torch
import torch.nn as nn

import adapter_io as IO
import adapters as A
from conftest import tiny_model
from mosa import Split, join_sparse, sparse_step
from test_adapters import ids, logits, padded_batch, spec, train


def splits(model):
    return [m for m in model.modules() if isinstance(m, Split)]


def dense(split):
    """The full weight a Split stands for, rebuilt from its parts (independently of
    Split.weight)."""
    w = torch.zeros(split.part.shape)
    for k, p in enumerate(split.parts):
        w[split.part == k] = p.detach()
    return w


@pytest.mark.parametrize("sid", ["series-sparse", "parallel-sparse", "parallel-per-linear-sparse"])
def test_sparse_step_trains_only_the_active_part(sid):
    model = tiny_model("llama")
    kind, o = spec("llama", sid)
    A.add_adapter(model, kind, **{**o, "sparse": 4})
    sp = splits(model)
    assert sp and all(s.n == 4 for s in sp)
    for s in sp:  # disjoint parts that cover the weight, of (almost) equal size
        counts = torch.bincount(s.part.flatten().long(), minlength=4)
        assert counts.sum() == s.part.numel() and counts.max() - counts.min() <= 1
        assert [p.numel() for p in s.parts] == counts.tolist()
    idx = ids(model, B=4, T=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ups = {id(b.up) for b in model.modules() if isinstance(b, A.Bottleneck)}
    seen = set()
    for step in range(4):
        sparse_step(model, step)
        active = sp[0].active
        seen.add(active)
        assert all(s.active == active for s in sp)
        before = [dense(s) for s in sp]
        # training runs only the active part, scaled by n (as inverted dropout)
        for s, w in zip(sp, before):
            assert torch.equal(s.weight, torch.where(s.part == active, w * 4, torch.zeros(())))
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        for s, w in zip(sp, before):
            changed = dense(s) != w
            assert not (changed & (s.part != active)).any(), (
                f"step {step}: entries outside part {active} moved")
            if step > 0 or id(s) in ups:  # (down gets no gradient while up is still zero)
                assert changed.any(), f"step {step}: the active part did not train"
    assert len(seen) > 1
    model.eval()  # in eval all parts together are the weight
    assert all(torch.equal(s.weight, dense(s)) for s in sp)


def test_sparse_step_is_a_function_of_the_step():
    a, b = tiny_model("llama"), tiny_model("llama")
    for m in (a, b):
        A.add_adapter(m, "parallel", bottleneck=8, sparse=4)
    picks = []
    for step in range(12):
        # the global RNG must not matter (a resumed run has another state)
        torch.manual_seed(1000 + step)
        sparse_step(a, step)
        torch.manual_seed(7)
        sparse_step(b, step)
        assert splits(a)[0].active == splits(b)[0].active
        picks.append(splits(a)[0].active)
    assert len(set(picks)) > 1 and all(0 <= k < 4 for k in picks)
    c = tiny_model("llama")
    A.add_adapter(c, "parallel", bottleneck=8, sparse=4)
    sparse_step(c, 5)  # resuming at step 5 picks what the uninterrupted run picked at step 5
    assert splits(c)[0].active == picks[5]


@pytest.mark.parametrize("sid", ["series-sparse", "parallel-sparse", "parallel-per-linear-sparse"])
def test_join_sparse(sid, tmp_path):
    model = tiny_model("llama")
    kind, o = spec("llama", sid)
    A.add_adapter(model, kind, **o)
    train(model, steps=6)
    idx = ids(model)
    _, pidx, pmask = padded_batch(model)
    before, before_pad = logits(model, idx), logits(model, pidx, attention_mask=pmask)
    shapes = [(b.down.part.shape, b.up.part.shape) for b in model.modules()
              if isinstance(b, A.Bottleneck)]
    join_sparse(model)
    assert not splits(model)
    assert not any(".part" in n or ".parts." in n for n in model.state_dict())
    bottlenecks = [b for b in model.modules() if isinstance(b, A.Bottleneck)]
    for b, (down, up) in zip(bottlenecks, shapes):
        assert type(b.down) is nn.Linear and type(b.up) is nn.Linear
        assert b.down.bias is None and b.up.bias is None
        assert (b.down.weight.shape, b.up.weight.shape) == (down, up) and down[0] == up[1] == 16
        assert b.down.weight.requires_grad and b.up.weight.requires_grad
    assert model.adapter_configs["default"]["options"]["sparse"] == 0
    assert torch.equal(logits(model, idx), before)
    assert torch.equal(logits(model, pidx, attention_mask=pmask), before_pad)
    IO.save_adapter(model, tmp_path)
    fresh = IO.load_adapter(tiny_model("llama"), tmp_path).eval()
    assert not splits(fresh)
    assert torch.equal(logits(fresh, idx), before)
    losses = train(model, steps=2)  # the merged adapter keeps training as a plain one
    assert losses[-1] < losses[0]


def test_join_sparse_replaces_a_split_under_any_attribute():
    """join_sparse finds a Split by its type wherever it sits, not only as a Bottleneck's
    down/up."""
    model = tiny_model("llama")
    w = torch.randn(6, 4)
    model.layers[0].extra = split = Split(w, 3)
    split.train().active = 0  # mid-training only part 0 runs (scaled by 3): not w
    assert not torch.equal(split.weight, w)
    join_sparse(model)
    assert type(model.layers[0].extra) is nn.Linear and torch.equal(model.layers[0].extra.weight, w)
    assert not splits(model)
