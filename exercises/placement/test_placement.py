"""Grader of exercise 3 (placement): the places, compared with adapters.py's own series placements,
and the measurement, compared with a direct computation: the parameter count of the attached
modules, the base model's loss (a fresh series adapter is the identity) and the grader's own run of
the protocol through add_adapter."""
import pytest
import torch

import adapters
from grading import load_impl, stub
from slots import slots

STEPS = 12
# The protocol fixes every number, so following it gives the grader's float32 results to the bit
# (float32's rounding step is 1.2e-7). A wrong optimizer setting moves loss_after by more: AdamW's
# default weight_decay=0.01 by 2e-6 to 8e-5, eps=1e-6 by 1.5e-5 and up.
SAME = 2e-7


@pytest.fixture(scope="module")
def impl():
    return load_impl("placement")


@pytest.fixture(scope="module")
def measured(impl):
    return {p: impl.measure(p, steps=STEPS, seed=1) for p in impl.PLACEMENTS}


def direct(impl, placement, steps, seed):
    """The protocol of exercises/README.md, run here on the project's series kind (or, for mlp_top,
    a copy of it placed on the top half), with the stub's task, BOTTLENECK and LR as given (not the
    submission's copies): (loss before, loss after, trainable, the places the project chose)."""
    given = stub("placement")
    model, x, y = given.task(seed)
    n = model.config.n_layer
    kind = adapters.KINDS["series"]
    if placement == "mlp_top":
        top = [(f"layers.{i}", "post_mlp") for i in range(n - n // 2, n)]
        kind = kind._replace(places=lambda m, o: top)
    adapters.KINDS["grader_series"] = kind
    try:
        torch.manual_seed(seed)
        adapters.add_adapter(model, "grader_series", bottleneck=given.BOTTLENECK,
                             placement="mlp" if placement == "mlp_top" else placement)
    finally:
        del adapters.KINDS["grader_series"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=given.LR, weight_decay=0.0)
    model.train()
    with torch.no_grad():
        before = model(x, y)[1].item()
    for _ in range(steps):
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(x, y)[1].item()
    where = [(name, slot) for name, slot, _ in slots(model)]
    return before, after, sum(p.numel() for p in params), where


@pytest.mark.parametrize("n_layer", [2, 3])
@pytest.mark.parametrize("placement", ["attn", "mlp", "both"])
def test_places_match_the_project(impl, placement, n_layer):
    from model import Transformer
    from presets import Config
    model = Transformer(Config.from_name("tiny-llama", n_layer=n_layer))
    want = adapters.KINDS["series"].places(model, dict(placement=placement))
    assert list(impl.places(model, placement)) == want


def test_places_mlp_top(impl):
    from model import Transformer
    from presets import Config
    model = Transformer(Config.from_name("tiny-llama", n_layer=5))
    want = [("layers.3", "post_mlp"), ("layers.4", "post_mlp")]
    assert list(impl.places(model, "mlp_top")) == want
    model, _, _ = impl.task(0)
    assert list(impl.places(model, "mlp_top")) == [("layers.1", "post_mlp")]


def test_report_fields(impl, measured):
    """The fields of the protocol's step 5: numbers as Python's (a tensor holds its graph)."""
    for p, r in measured.items():
        assert r["placement"] == p
        assert set(r) >= {"places", "trainable", "loss_before", "loss_after"}
        assert list(r["places"]) == list(impl.places(impl.task(0)[0], p))
        assert type(r["trainable"]) is int
        assert type(r["loss_before"]) is float and type(r["loss_after"]) is float


def test_measure_attaches_at_your_places_and_restores_the_table(impl, monkeypatch):
    """Step 2: a kind whose places is your places() (the project's own series placements may not
    run), and KINDS as it was afterwards."""
    def not_yours(model, o):
        raise AssertionError("measure attached at the project's series places, not at places()")
    series = adapters.KINDS["series"]._replace(places=not_yours)
    monkeypatch.setitem(adapters.KINDS, "series", series)
    asked, yours = [], impl.places

    def spy(model, placement):
        asked.append(placement)
        return yours(model, placement)
    monkeypatch.setattr(impl, "places", spy)
    table = dict(adapters.KINDS)
    for placement in impl.PLACEMENTS:
        r = impl.measure(placement, steps=1, seed=0)
        assert placement in asked, f"measure({placement!r}) did not ask places()"
        assert adapters.KINDS == table, "measure must leave KINDS as it found it"
        assert r["trainable"] == 1024 * len(yours(impl.task(0)[0], placement))


def test_trainable_counts(impl, measured):
    """Each place holds down (bottleneck x n_embd) and up (n_embd x bottleneck): 2 * 64 * 8 =
    1024."""
    got = {p: r["trainable"] for p, r in measured.items()}
    assert got == {p: 1024 * len(r["places"]) for p, r in measured.items()}
    assert got == {"attn": 2048, "mlp": 2048, "both": 4096, "mlp_top": 1024}


def test_loss_before_is_the_base_loss(impl, measured):
    """A fresh series adapter is the identity, so every placement starts at the base model's
    loss."""
    base, x, y = stub("placement").task(1)  # the task as given
    with torch.no_grad():
        want = base(x, y)[1].item()
    for r in measured.values():
        assert r["loss_before"] == pytest.approx(want, rel=SAME, abs=0)


@pytest.mark.parametrize("placement", ["attn", "mlp", "both", "mlp_top"])
def test_loss_after_matches_a_direct_run(impl, measured, placement):
    before, after, trainable, where = direct(impl, placement, STEPS, seed=1)
    r = measured[placement]
    assert r["trainable"] == trainable and sorted(r["places"]) == sorted(where)
    assert r["loss_before"] == pytest.approx(before, rel=SAME, abs=0)
    assert r["loss_after"] == pytest.approx(after, rel=SAME, abs=0), \
        f"{r['loss_after']!r}, the protocol's run gives {after!r}"
    assert r["loss_after"] < r["loss_before"] - 0.05, "training must lower the loss"

