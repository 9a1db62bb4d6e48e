"""data/pack.py and the model's packed rows (Transformer.forward(positions=...)): a packed batch
gives the loss and the adapter gradients of the same examples unpacked, on every family and every
adapter kind that can be packed; no token sees another example; prompt tuning is refused."""
import json

import pytest
import torch

import adapters
import train
from conftest import tiny_model
from data import synthetic
from data.pack import collate_packed, collate_padded, padding_share
from data.prepare import write_json

FAMILIES = ("llama", "llama-gqa", "gptj", "bloom", "opt", "opt-350m")


def make_examples(lengths, seed=0, vocab=256, prompt=0):
    """(ids, targets) pairs as train.py makes them: targets are the ids shifted by one, -100 on
    the first `prompt` positions (train_on_inputs=False)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n + 1,), generator=g).tolist()
        targets = ids[1:]
        targets[:min(prompt, n - 1)] = [-100] * min(prompt, n - 1)
        out.append((ids[:-1], targets))
    return out


def loss_and_grads(model, *batch, positions=None):
    model.zero_grad(set_to_none=True)
    x, y = batch
    loss = model(x, y, positions=positions)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


def with_adapter(family, kind, **options):
    m = tiny_model(family)
    torch.manual_seed(1)
    adapters.add_adapter(m, kind, **options)
    with torch.no_grad():  # move every adapter weight off its neutral start, so each has a gradient
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m


# -------------------------------------------------------------------------------- packing itself
def test_collate_packed_side_by_side_positions_restart():
    ex = make_examples([3, 2, 4])
    x, y, pos = collate_packed(ex, [2, 0], "cpu")
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert x[0].tolist() == ex[2][0] + ex[0][0] and y[0].tolist() == ex[2][1] + ex[0][1]


def test_padding_share():
    lengths = [4, 2, 8, 6]
    assert padding_share(lengths, [[0, 1], [2, 3]]) == pytest.approx(1 - 20 / 24)
    assert padding_share(lengths, [[0], [2]]) == 0.0


# ------------------------------------------------------------------------- packed = unpacked
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_unpacked_loss_and_adapter_gradients(family):
    """Every family's positions restart (rotary, ALiBi's per-example distances, OPT's learned table
    at its offset 2) and attention stays inside each example: the loss and every LoRA gradient of
    the packed rows equal those of the same examples one per row (fp32). The reference check: the
    same rows without positions (one causal sequence per row) give other logits."""
    model = with_adapter(family, "lora", dropout=0.0)
    ex = make_examples([7, 3, 12, 5, 9, 2, 6], seed=2, prompt=2)
    x, y, pos = collate_packed(ex, range(len(ex)), "cpu")
    loss_p, grads_p = loss_and_grads(model, x, y, positions=pos)
    loss_u, grads_u = loss_and_grads(model, *collate_padded(ex, range(len(ex)), "cpu"))
    assert torch.allclose(loss_p, loss_u, atol=0, rtol=1e-6)
    assert grads_p.keys() == grads_u.keys()
    for n in grads_p:
        assert torch.allclose(grads_p[n], grads_u[n], atol=1e-6, rtol=1e-5), n
    # the row as one sequence: attention and positions cross examples, the logits change
    naive, packed = model(x)[0], model(x, positions=pos)[0]
    assert not torch.allclose(naive, packed, atol=1e-2)


KINDS = {"lora": dict(dropout=0.0), "dora": dict(dropout=0.0), "ia3": {}, "series": {},
         "parallel": {}, "parallel-per-linear": dict(per_linear=["up_proj"]),
         "prefix": {}, "prefix-gated": dict(gated=True), "prefix-reparam": dict(reparam=16)}


@pytest.mark.parametrize("name", KINDS)
def test_every_adapter_kind_packs(name):
    """A prefix's keys and values are constants in front of every query's keys: every example
    sees them as it does alone, so a packed prefix run equals the unpacked one too."""
    model = with_adapter("llama", name.split("-")[0], **KINDS[name])
    ex = make_examples([6, 4, 9, 3, 8], seed=3)
    x, y, pos = collate_packed(ex, range(5), "cpu")
    loss_p, grads_p = loss_and_grads(model, x, y, positions=pos)
    loss_u, grads_u = loss_and_grads(model, *collate_padded(ex, range(5), "cpu"))
    assert torch.allclose(loss_p, loss_u, atol=0, rtol=1e-6)
    for n in grads_p:
        assert torch.allclose(grads_p[n], grads_u[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("family", ["llama", "bloom", "opt"])
def test_no_attention_across_an_example_boundary(family):
    """Changing one example of a row leaves every other example's logits exactly as they were, the
    examples before it and after it; the changed example's own logits do change."""
    model = tiny_model(family)
    ex = make_examples([5, 6, 4], seed=4)
    other = [ex[0], make_examples([6], seed=5)[0], ex[2]]
    x1, _, pos = collate_packed(ex, [0, 1, 2], "cpu")
    x2, _, pos2 = collate_packed(other, [0, 1, 2], "cpu")
    assert torch.equal(pos, pos2)
    a, b = model(x1, positions=pos)[0], model(x2, positions=pos)[0]
    keep = torch.ones(15, dtype=torch.bool)
    keep[5:11] = False  # the second example's tokens
    assert torch.allclose(a[0, keep], b[0, keep], atol=1e-6, rtol=0)
    assert not torch.allclose(a[0, ~keep], b[0, ~keep], atol=1e-3)
    c = model(x2)[0]  # reference: without positions the later example does see the change
    assert not torch.allclose(a[0, 11:], c[0, 11:], atol=1e-3)


def test_packed_rows_refuse_what_cannot_be_packed():
    model = with_adapter("llama", "prompt")
    ex = make_examples([4, 5])
    x, y, pos = collate_packed(ex, [0, 1], "cpu")
    with pytest.raises(ValueError, match="prompt tuning's soft tokens"):
        model(x, y, positions=pos)
    plain = tiny_model("llama")
    with pytest.raises(ValueError, match="attention_mask"):
        plain(x, positions=pos, attention_mask=torch.ones_like(x))
    with pytest.raises(ValueError, match="positions has shape"):
        plain(x, positions=pos[:, 1:])


def test_train_pack_gives_the_unpacked_losses(tiny_dir, tmp_path, monkeypatch):
    """train.py --pack=true: every step's loss and every validation loss equal the padded run's
    (fp32), and so does the full-logits loss path (--chunked_loss=false)."""
    rows = tmp_path / "rows.json"
    write_json(rows, synthetic.finetune_split(48, 8, seed=2)[0])
    packed_rows = []
    monkeypatch.setattr(train, "collate_packed",
                        lambda *a: packed_rows.append(a[1]) or collate_packed(*a))
    runs, chunks = {}, {}
    for name, extra in {"packed": ["--pack=true"], "padded": [],
                        "full logits": ["--chunked_loss=false"]}.items():
        model, _ = train.main([f"--model={tiny_dir}", f"--data={rows}", f"--out={tmp_path / name}",
                    "--batch_size=8", "--micro_batch_size=4", "--val_set_size=8",
                    "--max_steps=3", "--eval_interval=3", "--adapter=lora", "--dropout=0",
                    "--learning_rate=1e-2", "--log_interval=1", "--threads=0",
                    "--train_on_inputs=false", *extra])
        chunks[name] = model.loss_chunk
        with open(tmp_path / name / "log.jsonl") as f:
            runs[name] = [r.get("loss", r.get("val_loss")) for r in map(json.loads, f)
                          if "loss" in r or "val_loss" in r]
    assert len(runs["padded"]) == 4
    assert len(packed_rows) == 3 * 2 and all(len(r) == 4 for r in packed_rows)  # really packed
    assert chunks["padded"] > 0 and chunks["full logits"] == 0
    for name in ("packed", "full logits"):
        assert runs[name] == pytest.approx(runs["padded"], rel=1e-6, abs=0), name
