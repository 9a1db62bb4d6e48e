"""Grader of exercise 1 (LoRA): by properties, and by comparison with adapters.LoRA given the same
weights.

The student's class is plugged into the project as a kind of its own (a copy of KINDS["lora"] whose
`make` builds the student's module), so add_adapter, merge and unmerge of adapters.py drive it
exactly as they drive theirs.
"""
import pytest
import torch

import adapter_io
import adapters
from generate import generate
from grading import assert_merge_keeps_parameters, fit, load_impl, tiny, token_ids
from slots import slots

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def impl():
    return load_impl("lora")


@pytest.fixture
def with_lora(impl, monkeypatch):
    """add_adapter(model, "student_lora", ...) attaches the student's LoRA where adapters.py would
    attach its own."""
    def make(model, lin, slot, o):
        return impl.LoRA(lin.in_features, lin.out_features, o["r"], o["alpha"], o["dropout"])
    monkeypatch.setitem(adapters.KINDS, "student_lora", adapters.KINDS["lora"]._replace(make=make))

    def attach(model, **options):
        return adapters.add_adapter(model, "student_lora", **{"r": 4, "alpha": 8, "dropout": 0.0,
                                                              "target_modules": TARGETS, **options})
    return attach


def student_modules(model):
    return [s["default"] for _, _, s in slots(model)]


@torch.no_grad()
def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in student_modules(model):
        m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))


def test_shapes_and_trainable_parameters(impl):
    m = impl.LoRA(64, 48, r=4, alpha=8)
    assert m.lora_A.weight.shape == (4, 64) and m.lora_B.weight.shape == (48, 4)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 4 * (64 + 48)


def test_init_B_zero_A_random(impl):
    """B = 0 makes step 0 equal the base; A must not be zero too, or no gradient would ever reach
    either."""
    torch.manual_seed(0)
    m = impl.LoRA(64, 48, r=4, alpha=8)
    assert torch.count_nonzero(m.lora_B.weight) == 0, "lora_B must start at zero"
    A = m.lora_A.weight
    assert torch.count_nonzero(A) == A.numel(), "lora_A must start random (no zero entries)"
    bound = 1 / 64 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 64
    assert 0.8 * bound < A.abs().max() <= bound, "lora_A: kaiming uniform, a=sqrt(5)"
    A = impl.LoRA(256, 8, r=16, alpha=16).lora_A.weight.detach()  # 4,096 draws: the distribution
    bound = 1 / 256 ** 0.5
    assert A.abs().max() <= bound and abs(A.mean()) < 0.05 * bound, "lora_A: uniform about 0"
    assert abs(A.std() / (bound / 3 ** 0.5) - 1) < 0.05, "lora_A: uniform on [-bound, bound]"


def test_identity_at_init(with_lora):
    base = tiny()
    ids = token_ids(base)
    want, _ = base(ids)
    got, _ = with_lora(base)(ids)
    assert torch.equal(got, want), "a fresh LoRA must leave the logits bit for bit unchanged"


def test_forward_matches_adapters_lora(impl):
    """The same A, B and scale as the project's adapters.LoRA -> the same output, also with dropout
    off in eval."""
    torch.manual_seed(0)
    ours = impl.LoRA(32, 24, r=4, alpha=12, dropout=0.3)
    ref = adapters.LoRA(32, 24, r=4, alpha=12, dropout=0.3)
    with torch.no_grad():
        ours.lora_A.weight.copy_(torch.randn(4, 32))
        ours.lora_B.weight.copy_(torch.randn(24, 4))
    ref.load_state_dict(ours.state_dict())
    lin = torch.nn.Linear(32, 24)
    x = torch.randn(3, 5, 32)
    y = lin(x).detach()
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x, y, lin), ref(x, y, lin), rtol=1e-5, atol=1e-6)
    expected = y + (x @ ours.lora_A.weight.T @ ours.lora_B.weight.T) * 3.0  # alpha / r = 12 / 4
    torch.testing.assert_close(ours(x, y, lin), expected, rtol=1e-5, atol=1e-6)


def test_dropout_only_on_the_adapter_input(impl):
    """In training, dropout hides parts of x from the update only: with B = 0 the output is still
    exactly y."""
    m = impl.LoRA(32, 24, r=4, alpha=8, dropout=0.9).train()
    lin = torch.nn.Linear(32, 24)
    x = torch.randn(4, 32)
    y = lin(x).detach()
    assert torch.equal(m(x, y, lin), y)


def orthogonal(n, seed):
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))[0]


def test_dropout_drops_features_of_the_adapter_input(impl):
    """In training, each feature of x on the adapter's path is dropped with probability p and the
    kept ones scaled by 1 / (1 - p), as nn.Dropout does: not on A x, not on the update, not never.
    In eval nothing is dropped. x itself stays as it was: q, k and v read the same x."""
    torch.manual_seed(0)
    p = 0.5
    m = impl.LoRA(16, 16, r=16, alpha=16, dropout=p)  # scale 1
    A, B = orthogonal(16, 1), orthogonal(16, 2)
    with torch.no_grad():
        m.lora_A.weight.copy_(A)
        m.lora_B.weight.copy_(B)
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(64, 16)
    x_before = x.clone()
    y = lin(x).detach()

    def seen(training):  # the update is (B A x_seen) per row, so x_seen = (out - y) B A
        return ((m.train(training)(x, y.clone(), lin) - y) @ B @ A).detach()
    torch.testing.assert_close(seen(False), x, rtol=1e-4, atol=1e-4, msg="eval: no dropout")
    s = seen(True)
    assert torch.equal(x, x_before), "dropout changed x in place: the other projections read x"
    dropped, kept = s.abs() < 1e-4, (s - x / (1 - p)).abs() < 1e-4
    assert (dropped | kept).all(), "train: every feature of x dropped, or kept and scaled 1/(1-p)"
    share = dropped.float().mean().item()
    assert 0.4 < share < 0.6, f"dropout={p} dropped {share:.0%} of the features"


def test_gradients_at_step_0(with_lora):
    """At step 0 the loss gradient must reach B (through A's random projection); A's is zero until B
    moves."""
    model = with_lora(tiny())
    model.train()
    ids = token_ids(model)
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    for m in student_modules(model):
        grad = m.lora_B.weight.grad
        assert grad is not None and grad.abs().sum() > 0, "B gets no gradient"
    base = [p for n, p in model.named_parameters() if ".adapter." not in n]
    assert all(p.grad is None and not p.requires_grad for p in base), "the base must stay frozen"


def test_merge_equals_unmerged_and_unmerge_restores(with_lora):
    model = with_lora(tiny())
    randomize_B(model)
    ids = token_ids(model)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    unmerged, _ = model(ids)
    adapters.merge(model)
    merged, _ = model(ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    changed = {n.split(".")[-2] for n, p in model.named_parameters()
               if n in weights and not torch.equal(p, weights[n])}
    assert sorted(changed) == sorted(TARGETS), "merge must change the targets' W, nothing else"
    adapters.unmerge(model)
    again, _ = model(ids)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_merge_keeps_the_base_weight(with_lora):
    """merge changes linear.weight's values in place: the same frozen Parameter, in its dtype. A new
    Parameter would train (and an optimizer holding the old one would miss it)."""
    model = with_lora(tiny())
    randomize_B(model)
    assert_merge_keeps_parameters(model)


def test_merge_and_unmerge_on_their_own(impl):
    """The module's own merge folds delta() into the layer's weight and marks itself merged, so its
    forward adds nothing more; unmerge takes delta() out again and the update comes back."""
    torch.manual_seed(0)
    m = impl.LoRA(32, 24, r=4, alpha=8).eval()
    with torch.no_grad():
        m.lora_B.weight.normal_()
    lin = torch.nn.Linear(32, 24).requires_grad_(False)
    W, x = lin.weight.clone(), torch.randn(5, 32)
    want = m(x, lin(x), lin).detach()
    m.merge(lin)
    torch.testing.assert_close(lin.weight, W + m.delta().detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x, lin(x), lin), want, rtol=1e-5, atol=1e-5)
    m.unmerge(lin)
    torch.testing.assert_close(lin.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x, lin(x), lin), want, rtol=1e-5, atol=1e-5)


def close_in_bf16(a, b):
    """Equal but for bf16's rounding (8 bits of mantissa), which the layers compound: the
    reference and adapters.LoRA differ by 1% (one rounds the update before adding it)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item() < 0.03


def test_bf16_base(with_lora):
    """On a bf16 base (add_adapter keeps the adapter in fp32): the update runs in the adapter's
    dtype and comes back in y's, so the logits are bf16 and equal those with adapters.LoRA; the
    gradients reach A and B in fp32; merge folds into the bf16 weight in place."""
    ours = with_lora(tiny().to(torch.bfloat16))
    ref = adapters.add_adapter(tiny().to(torch.bfloat16), "lora", r=4, alpha=8, dropout=0.0,
                               target_modules=TARGETS)
    randomize_B(ours)
    adapter_io.fill_adapter(ref, "default", adapters.adapter_state(ours, "default"), "yours")
    ids = token_ids(ours)
    logits = ours(ids)[0]
    assert logits.dtype == torch.bfloat16
    assert close_in_bf16(logits, ref(ids)[0])
    ours.train()
    ours(ids[:, :-1], ids[:, 1:])[1].backward()
    for m in student_modules(ours):
        assert m.lora_A.weight.grad.dtype == m.lora_B.weight.grad.dtype == torch.float32
    ours.eval()
    lin = ours.layers[0].attn.q_proj
    W = lin.weight
    adapters.merge(ours)
    assert lin.weight is W and W.dtype == torch.bfloat16, "merge in place, in the weight's dtype"
    assert close_in_bf16(ours(ids)[0], logits)


def test_model_logits_match_adapters_lora(with_lora):
    """The whole model with the student's LoRA equals the whole model with the project's, given the
    same weights."""
    ours, ref = with_lora(tiny()), tiny()
    adapters.add_adapter(ref, "lora", r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    randomize_B(ours)
    state = adapters.adapter_state(ours, "default")
    adapter_io.fill_adapter(ref, "default", state, "the student's LoRA")
    ids = token_ids(ours)
    torch.testing.assert_close(ours(ids)[0], ref(ids)[0], rtol=1e-5, atol=1e-5)


def test_trains(with_lora):
    """A few AdamW steps on one batch: the loss falls well below the base's, and only A and B
    moved."""
    model = with_lora(tiny(), r=8, alpha=16)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = fit(model, steps=30, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0], f"the loss did not fall: {losses[0]:.3f}, {losses[-1]:.3f}"
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} is base weight and moved"


def counting(n, seed):
    """n rows that count up by one (mod 64) from a random start: "next = previous + 1"."""
    start = torch.randint(0, 64, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(13)) % 64


def test_accuracy_above_the_bar(with_lora):
    """The task-level grade: LoRA on a frozen random base learns to count in 100 steps. Greedy
    generation must continue >= 90 of 100 held-out 4-token prompts with all 8 right tokens (the
    base: none; the reference: all)."""
    torch.manual_seed(0)
    model = with_lora(tiny(), r=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj",
                                                             "down_proj"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    model.train()
    for step in range(100):
        seq = counting(16, seed=step)
        loss = model(seq[:, :-1], seq[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = counting(100, seed=10_000)

    def accuracy(m):
        return (generate(m, test[:, :4], 8)[:, 4:] == test[:, 4:12]).all(1).float().mean().item()
    assert accuracy(tiny()) < 0.1, "the task must be new to the base"
    acc = accuracy(model)
    assert acc >= 0.9, f"exact match {acc:.0%} on held-out prompts, the bar is 90%"
