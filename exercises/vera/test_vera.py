"""Grader of exercise 2 (VeRA): by properties, by the paper's formula, and (when peft is installed)
by parity with PEFT's VeraConfig: the same seed must give the same shared matrices and, with the
same vectors, the same logits."""
import math

import pytest
import torch

import adapter_io
import adapters
from grading import assert_merge_keeps_parameters, fit, load_impl, tiny, token_ids
from model import Linear
from slots import slots

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
TARGETS = ["q_proj", "v_proj", "down_proj"]  # two shapes: down_proj is (64, 176) on tiny-llama


@pytest.fixture(scope="module")
def impl():
    return load_impl("vera")


@pytest.fixture
def vera(impl):
    """impl.register() for one test, then the project's table as it was."""
    impl.register()
    yield impl
    adapters.KINDS.pop("vera", None)


def vera_modules(model):
    return [s["default"] for _, _, s in slots(model)]


@torch.no_grad()
def randomize_vectors(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in vera_modules(model):
        for p in (m.vera_lambda_b, m.vera_lambda_d):
            p.copy_(torch.randn(p.shape, generator=g))


def test_projections_are_peft_s_draw(impl):
    """One generator seeded with the key; A (r, d_in) first, then B (d_out, r); uniform with bound
    sqrt(6/fan_in)."""
    A, B = impl.projections(7, 4, 48, 40)
    g = torch.Generator().manual_seed(7)
    want_A = torch.rand(4, 48, generator=g) * 2 * math.sqrt(6 / 48) - math.sqrt(6 / 48)
    want_B = torch.rand(40, 4, generator=g) * 2 * math.sqrt(6 / 4) - math.sqrt(6 / 4)
    assert A.shape == (4, 48) and B.shape == (40, 4)
    torch.testing.assert_close(A, want_A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B, want_B, rtol=1e-5, atol=1e-6)
    again = impl.projections(7, 4, 48, 40)
    assert again[0] is A and again[1] is B, "the same arguments: the same (cached) tensors"


def test_registered_kind_attaches_and_counts(vera):
    model = adapters.add_adapter(tiny(), "vera", r=8, target_modules=TARGETS)
    assert model.adapter_configs["default"]["kind"] == "vera"
    places = sorted(n for n, _, _ in slots(model))
    assert places == sorted(f"layers.{i}.{sub}.{t}" for i in range(2) for sub, t in
                            (("attn", "q_proj"), ("attn", "v_proj"), ("mlp", "down_proj")))
    trainable, _ = adapters.count_parameters(model)
    assert trainable == 2 * 3 * (8 + 64), "per linear: d (r) + b (d_out) trainable, nothing else"
    others = [n for n, p in model.named_parameters() if p.requires_grad and "vera_lambda" not in n]
    assert others == []


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-bloom"])
def test_defaults(vera, preset):
    """With no options but the kind: KIND's defaults (r 256, d starting at 0.1), and target_modules
    None means adapters.default_targets of the model's architecture (BLOOM's differ from LLaMA's),
    A and B sized for the largest of them."""
    model = adapters.add_adapter(tiny(preset), "vera")
    names = adapters.default_targets(model.config)
    want = {n: m for n, m in model.named_modules()
            if isinstance(m, Linear) and n.rsplit(".", 1)[-1] in names}
    assert sorted(n for n, _, _ in slots(model)) == sorted(want)
    trainable, _ = adapters.count_parameters(model)
    assert trainable == sum(256 + m.out_features for m in want.values())
    d_in = max(m.in_features for m in want.values())
    d_out = max(m.out_features for m in want.values())
    for m in vera_modules(model):
        assert m.A.shape == (256, d_in) and m.B.shape == (d_out, 256)
        assert torch.equal(m.vera_lambda_d, torch.full((256,), 0.1))


def test_A_B_shared_frozen_and_not_saved(vera):
    model = adapters.add_adapter(tiny(), "vera", r=8, target_modules=TARGETS)
    ms = vera_modules(model)
    As = {m.A.data_ptr() for m in ms}
    Bs = {m.B.data_ptr() for m in ms}
    assert len(As) == 1 and len(Bs) == 1, "every layer must share the one A and the one B"
    assert ms[0].A.shape == (8, 176) and ms[0].B.shape == (64, 8), "sized for the largest target"
    assert not ms[0].A.requires_grad and not ms[0].B.requires_grad
    assert {"A", "B"} <= {n for n, _ in ms[0].named_buffers()}, \
        "A and B are buffers: they follow the model to its device"
    keys = adapters.adapter_state(model, "default")
    saved = {k.rsplit(".", 1)[-1] for k in keys}
    assert saved == {"vera_lambda_b", "vera_lambda_d"}, sorted(keys)[:4]


def test_init_identity(vera):
    base = tiny()
    ids = token_ids(base)
    want, _ = base(ids)
    model = adapters.add_adapter(base, "vera", r=8, d_initial=0.25, target_modules=TARGETS)
    got, _ = model(ids)
    assert torch.equal(got, want), "b = 0: a fresh VeRA must leave the logits bit for bit unchanged"
    for m in vera_modules(model):
        assert torch.equal(m.vera_lambda_d, torch.full((8,), 0.25))
        assert torch.count_nonzero(m.vera_lambda_b) == 0


def test_forward_is_the_formula(vera):
    model = adapters.add_adapter(tiny(), "vera", r=8, target_modules=TARGETS)
    randomize_vectors(model)
    lin = model.layers[1].mlp.down_proj
    m = lin.adapter["default"]
    A, B = vera.projections(0, 8, 176, 64)
    x = torch.randn(2, 3, 176)
    y = x @ lin.weight.T
    want = y + m.vera_lambda_b * ((x @ A.T) * m.vera_lambda_d @ B.T)
    torch.testing.assert_close(m(x, y, lin), want, rtol=1e-5, atol=1e-5)
    small = model.layers[0].attn.q_proj  # (64, 64): the top-left block of A and B
    x = torch.randn(2, 3, 64)
    y = x @ small.weight.T
    n = small.adapter["default"]
    want = y + n.vera_lambda_b * ((x @ A[:, :64].T) * n.vera_lambda_d @ B[:64].T)
    torch.testing.assert_close(n(x, y, small), want, rtol=1e-5, atol=1e-5)


def test_merge_equals_unmerged(vera):
    model = adapters.add_adapter(tiny(), "vera", r=8, target_modules=TARGETS)
    randomize_vectors(model)
    ids = token_ids(model)
    W = model.layers[0].mlp.down_proj.weight.clone()
    unmerged, _ = model(ids)
    adapters.merge(model)
    assert not torch.equal(model.layers[0].mlp.down_proj.weight, W), "merge must change W"
    torch.testing.assert_close(model(ids)[0], unmerged, rtol=1e-5, atol=1e-5)
    adapters.unmerge(model)
    torch.testing.assert_close(model.layers[0].mlp.down_proj.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids)[0], unmerged, rtol=1e-5, atol=1e-5)


def test_merge_keeps_the_base_weight(vera):
    """merge changes linear.weight's values in place: the same frozen Parameter, in its dtype."""
    model = adapters.add_adapter(tiny(), "vera", r=8, target_modules=TARGETS)
    randomize_vectors(model)
    assert_merge_keeps_parameters(model)


def test_merge_and_unmerge_on_their_own(vera):
    """The module's own merge folds delta() into the layer's weight and marks itself merged, so its
    forward adds nothing more; unmerge takes delta() out again and the update comes back."""
    model = adapters.add_adapter(tiny(), "vera", r=8, target_modules=TARGETS)
    randomize_vectors(model)
    lin = model.layers[0].mlp.down_proj
    m = lin.adapter["default"]
    W, x = lin.weight.clone(), torch.randn(5, 176)
    want = m(x, x @ W.T, lin).detach()
    m.merge(lin)
    torch.testing.assert_close(lin.weight, W + m.delta().detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x, x @ lin.weight.T, lin), want, rtol=1e-5, atol=1e-5)
    m.unmerge(lin)
    torch.testing.assert_close(lin.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x, x @ W.T, lin), want, rtol=1e-5, atol=1e-5)


def test_bf16_base(vera):
    """On a bf16 base (add_adapter keeps the adapter in fp32): the update runs in the adapter's
    dtype and comes back in y's; the logits are bf16 and, but for bf16's rounding, those of the
    same model in fp32; the gradients reach the vectors in fp32; merge folds into the bf16 weight
    in place."""
    fp32 = adapters.add_adapter(tiny(), "vera", r=8, target_modules=TARGETS)
    model = adapters.add_adapter(tiny().to(torch.bfloat16), "vera", r=8, target_modules=TARGETS)
    randomize_vectors(fp32)
    randomize_vectors(model)
    ids = token_ids(model)
    logits = model(ids)[0]
    assert logits.dtype == torch.bfloat16
    assert close_in_bf16(logits, fp32(ids)[0])
    model.train()
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    for m in vera_modules(model):
        assert m.vera_lambda_b.grad.dtype == m.vera_lambda_d.grad.dtype == torch.float32
    model.eval()
    lin = model.layers[0].mlp.down_proj
    W = lin.weight
    adapters.merge(model)
    assert lin.weight is W and W.dtype == torch.bfloat16, "merge in place, in the weight's dtype"
    assert close_in_bf16(model(ids)[0], logits)


def close_in_bf16(a, b):
    """Equal but for bf16's rounding (8 bits of mantissa), which the layers compound (about 1%)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item() < 0.03


def test_save_and_load(vera, tmp_path):
    model = adapters.add_adapter(tiny(), "vera", r=8, target_modules=TARGETS)
    randomize_vectors(model)
    ids = token_ids(model)
    adapter_io.save_adapter(model, tmp_path)
    again = adapter_io.load_adapter(tiny(), tmp_path)
    torch.testing.assert_close(again(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_trains(vera):
    model = adapters.add_adapter(tiny(), "vera", r=16, target_modules=TARGETS)
    A = vera_modules(model)[0].A.clone()
    losses = fit(model, steps=30, lr=5e-2)
    assert losses[-1] < 0.9 * losses[0], f"the loss did not fall: {losses[0]:.3f}, {losses[-1]:.3f}"
    assert torch.equal(vera_modules(model)[0].A, A), "A is frozen"


def test_parity_with_peft(vera, tmp_path):
    """PEFT's VeRA on the transformers twin of a tiny LLaMA: same seed -> same A and B; same vectors
    -> same logits."""
    peft = pytest.importorskip("peft")
    tf = pytest.importorskip("transformers")
    from checkpoints import hf_name, load_model
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=192, max_position_embeddings=128, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape) if p.dim() == 1 else 0.1 * torch.randn(p.shape))
    hf.save_pretrained(tmp_path)
    config = peft.VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=3)
    pm = peft.get_peft_model(hf, config).eval()
    ours = adapters.add_adapter(load_model(tmp_path), "vera", r=8, projection_prng_key=3,
                                target_modules=TARGETS)
    by_hf = {hf_name(ours.config, n + ".weight").removesuffix(".weight"): m
             for n, m in ours.named_modules() if getattr(m, "adapter", None) is not None}
    g = torch.Generator().manual_seed(5)
    n = 0
    with torch.no_grad():
        for name, m in pm.named_modules():
            if hasattr(m, "vera_lambda_b") and "default" in m.vera_lambda_b:
                mine = by_hf[name.removeprefix("base_model.model.")].adapter["default"]
                for attr in ("vera_lambda_b", "vera_lambda_d"):
                    theirs = getattr(m, attr)["default"]
                    theirs.copy_(torch.randn(theirs.shape, generator=g))
                    getattr(mine, attr).copy_(theirs)
                torch.testing.assert_close(mine.A, m.vera_A["default"], rtol=0, atol=0)
                torch.testing.assert_close(mine.B, m.vera_B["default"], rtol=0, atol=0)
                n += 1
        assert n == 6
        ids = token_ids(ours, B=2, T=7)
        torch.testing.assert_close(ours(ids)[0], pm(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
