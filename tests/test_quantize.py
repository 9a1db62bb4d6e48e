"""quantize.py: the NF4 code and block layout against QLoRA's definition, round-trip bounds,
quantized forward and backward on every family, adapters training on a quantized base, merge and
save refused, loading that never holds the full-precision model (measured), and --quantize through
train.py, eval.py and bench.py."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import adapter_io
import adapters
import quantize as Q
from checkpoints import load_model, save_model
from conftest import ROOT, tiny_model
from model import Linear, Transformer
from presets import Config

# QLoRA (Dettmers et al. 2023), Appendix E / bitsandbytes' create_normal_map: the 16 NF4 values
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
FAMILIES = ("llama", "llama-gqa", "gptj", "bloom", "opt")


def test_nf4_code_is_the_papers():
    code = Q.nf4_code()
    assert torch.equal(code, torch.tensor(PAPER_NF4))  # bit for bit
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and code[7] == 0
    assert code[0] == -1 and code[-1] == 1
    # the definition: scaled back by the largest quantile Phi^-1(offset), the values sit at equal
    # steps of probability, 8 from 1/2 up to offset and 7 from 1 - offset up to 1/2
    offset = (1 - 1 / 30 + 1 - 1 / 32) / 2
    top = torch.special.ndtri(torch.tensor(offset, dtype=torch.float64))
    probs = torch.distributions.Normal(0.0, 1.0).cdf(code.double() * top)
    neg = 1 - offset + (offset - 0.5) / 7 * torch.arange(7.0).double()
    pos = 0.5 + (offset - 0.5) / 8 * torch.arange(1, 9.0).double()
    torch.testing.assert_close(probs, torch.cat((neg, torch.tensor([0.5]).double(), pos)),
                               atol=1e-6, rtol=0)


def test_nf4_block_layout():
    # 3 blocks of 64 row-major values, each an exact NF4 value times its block's absmax
    idx = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0))
    idx[:, 5] = 15  # each block holds its absmax (code value 1.0)
    absmax = torch.tensor([0.5, 2.0, 3.25])
    w = (Q.NF4[idx] * absmax[:, None]).view(4, 48)  # rows cut across blocks: memory order
    q = Q.quantize(w, "nf4")
    assert q["codes"].dtype == torch.uint8 and q["codes"].shape == (96,)
    assert torch.equal(q["absmax"], absmax)
    flat = idx.view(-1)
    assert torch.equal(q["codes"], (flat[0::2] << 4 | flat[1::2]).to(torch.uint8))  # first: high
    assert torch.equal(Q.dequantize(q, "nf4", w.shape, torch.float32), w)


def test_double_quantization_layout():
    w = torch.randn(64, 640)  # 640 blocks of 64: absmax padded to 3 blocks of 256
    q, plain = Q.quantize(w, "nf4-dq"), Q.quantize(w, "nf4")
    assert set(q) == {"codes", "absmax_q", "absmax_scale", "absmax_mean"}
    assert q["absmax_q"].dtype == torch.int8 and q["absmax_q"].shape == (3, 256)
    assert q["absmax_scale"].shape == (3, 1) and torch.equal(q["codes"], plain["codes"])
    assert torch.allclose(q["absmax_mean"], plain["absmax"].mean())
    back = (q["absmax_q"].float() * q["absmax_scale"]).view(-1)[:640] + q["absmax_mean"]
    err = (back - plain["absmax"]).abs().view(-1)
    bound = q["absmax_scale"].view(-1).repeat_interleave(256)[:640] / 2 + 1e-6
    assert (err <= bound).all()  # half a step of each 256-block's 8-bit grid
    w = torch.randn(256, 256)  # 1024 blocks, 4 of absmax: bits per weight, as QLoRA counts them
    bits = {m: sum(t.numel() * t.element_size() for t in Q.quantize(w, m).values()) * 8 / w.numel()
            for m in ("nf4", "nf4-dq")}
    assert bits == {"nf4": 4 + 32 / 64, "nf4-dq": 4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel()}


@pytest.mark.parametrize("shape", [(256, 192), (5, 7), (64, 1000)])
def test_round_trip_bounds(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.02
    q8 = Q.quantize(w, "int8")
    err8 = (Q.dequantize(q8, "int8", w.shape, torch.float32) - w).abs()
    assert (err8 <= q8["scale"] / 2 + 1e-9).all()  # half a step of each row's grid
    half_gap = (Q.NF4[1:] - Q.NF4[:-1]).max() / 2
    for mode in ("nf4", "nf4-dq"):
        back = Q.dequantize(Q.quantize(w, mode), mode, w.shape, torch.float32)
        absmax = F.pad(w.reshape(-1), (0, -w.numel() % 64)).view(-1, 64).abs().amax(1)
        bound = (absmax[:, None] * half_gap).expand(-1, 64).reshape(-1)[:w.numel()].view(shape)
        slack = 1.01 if mode == "nf4" else 1.05  # dq: each absmax off by up to half an 8-bit step
        assert ((back - w).abs() <= bound * slack + 1e-9).all()
    if w.numel() >= 4096:  # Gaussian weights: the usual relative Frobenius errors
        back = {m: Q.dequantize(Q.quantize(w, m), m, w.shape, torch.float32) for m in Q.MODES}
        rel = {m: ((b - w).norm() / w.norm()).item() for m, b in back.items()}
        assert rel["int8"] < 0.01 and 0.05 < rel["nf4"] < 0.11
        assert abs(rel["nf4-dq"] - rel["nf4"]) < 0.002


def test_quantize_model_replaces_every_projection_and_nothing_else():
    model = tiny_model("bloom")
    before = {n: type(m) for n, m in model.named_modules()}
    Q.quantize_model(model, "nf4")
    after = {n: type(m) for n, m in model.named_modules()}
    assert before.keys() == after.keys()  # official names unchanged
    for n, t in before.items():
        assert after[n] is (Q.QuantLinear if t is Linear else t), n
    assert {n.rsplit(".", 1)[-1] for n, t in after.items() if t is Q.QuantLinear} == {
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert isinstance(model.layers[0].attn.query_key_value, Linear)  # hook slots see a Linear
    assert model.lm_head.weight is model.embed.weight  # tied, full precision
    assert adapters.count_parameters(model)[1] == adapters.count_parameters(tiny_model("bloom"))[1]
    with pytest.raises(ValueError, match=r"quantize='int4': expected one of int8, nf4, nf4-dq"):
        Q.quantize_model(model, "int4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_forward_on_every_family(family, dtype):
    model = tiny_model(family).to(dtype)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_model(family)(idx)[0]  # fp32
        # random tiny models amplify weight errors (nf4: ~10% per weight) more than trained ones
        for mode, tol in (("int8", 0.03), ("nf4", 0.3), ("nf4-dq", 0.3)):
            qm = Q.quantize_model(copy.deepcopy(model), mode)
            out = qm(idx)[0]
            assert out.dtype == dtype and (out.float() - ref).norm() / ref.norm() < tol, mode
            # parity: the quantized model is the unquantized one with the dequantized weights
            dq = copy.deepcopy(model)
            for name, m in qm.named_modules():
                if isinstance(m, Q.QuantLinear):
                    dq.get_submodule(name).weight.copy_(m.weight)
            torch.testing.assert_close(out, dq(idx)[0], rtol=1e-5, atol=1e-5)


def test_backward_gives_the_same_gradients_and_saves_no_full_weight():
    lin = Linear(64, 96, bias=True)
    lin.weight.requires_grad_(False)  # a frozen base projection; its bias may train (it does here)
    is_w = lambda t: t.numel() == 96 * 64 and t.is_floating_point()  # noqa: E731  W or W^T
    q = Q.QuantLinear(lin, "nf4", lin.weight.detach())
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not [t for t in saved if is_w(t)]  # no dequantized W kept for backward
    y.square().sum().backward()
    grads = x.grad, lin.bias.grad.clone()
    x2 = x.detach().clone().requires_grad_(True)
    lin.bias.grad = None
    F.linear(x2, q.weight, lin.bias).square().sum().backward()
    torch.testing.assert_close(grads, (x2.grad, lin.bias.grad))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lin(x2)  # the detector does see W when plain F.linear saves it
    assert [t for t in saved if is_w(t)]


# kind -> (options, learning rate); all of them start out equal to the base
ON_A_QUANTIZED_BASE = {"lora": (dict(r=8, dropout=0.0), 1e-2),
                       "series": (dict(bottleneck=16), 1e-2),
                       "parallel": (dict(bottleneck=16), 1e-2),
                       "prefix": (dict(gated=True), 2e-1)}


@pytest.mark.parametrize("kind", ON_A_QUANTIZED_BASE)
def test_adapter_trains_on_a_quantized_base(kind):
    model = Q.quantize_model(tiny_model("llama"), "nf4")
    packed = {k: t.clone() for k, t in model.named_buffers()}
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(x)[0]
    torch.manual_seed(0)
    options, lr = ON_A_QUANTIZED_BASE[kind]
    adapters.add_adapter(model, kind, **options)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x)[0], base)  # zero-initialised: the quantized base at step 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr)
    losses = []
    for _ in range(8):
        loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(t, packed[k]) for k, t in model.named_buffers())  # the base never moved
    assert all(p.dtype == torch.float32 for p in trainable)


def test_peft_lora_round_trip_on_a_quantized_base(tmp_path):
    torch.manual_seed(0)
    model = adapters.add_adapter(Q.quantize_model(tiny_model("opt"), "int8"), "lora", r=4)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    adapter_io.save_adapter(model, tmp_path, format="peft")
    again = adapter_io.load_adapter(Q.quantize_model(tiny_model("opt"), "int8"), tmp_path)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], model.eval()(x)[0])


def test_merge_and_save_are_refused(tmp_path):
    model = adapters.add_adapter(Q.quantize_model(tiny_model("llama"), "nf4"), "lora")
    with pytest.raises(ValueError, match="merge: the base is quantized; load it without quantize"):
        adapters.merge(model)
    with pytest.raises(ValueError, match="save_model: this base is quantized"):
        save_model(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_load_model_quantizes_as_quantize_model_does(tmp_path, family):
    model = tiny_model(family)
    save_model(model, tmp_path)
    for mode in Q.MODES:
        loaded = dict(load_model(tmp_path, quantize=mode).named_buffers())
        expected = dict(Q.quantize_model(copy.deepcopy(model), mode).named_buffers())
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in loaded)
    with pytest.raises(ValueError, match="quantize='fp8': expected one of"):
        load_model(tmp_path, quantize="fp8")


def test_meta_layout_quantizes_the_same(meta_checkpoint):
    from conftest import make_hf_model
    path = meta_checkpoint(make_hf_model("llama-gqa"), n_shards=2, ffn_dim_multiplier=1.3)
    plain = load_model(path)  # q/k rows permuted, shards concatenated, then quantized
    expected = dict(Q.quantize_model(plain, "nf4-dq").named_buffers())
    loaded = dict(load_model(path, quantize="nf4-dq").named_buffers())
    assert loaded.keys() == expected.keys() and len(loaded) == 2 * 7 * 4
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)


# In a fresh process: load argv[1] in bf16 with each quantize mode of argv[3:] ("none" = none) and
# print, per mode, the model's bytes and the anonymous memory in use (freed heap pages handed back
# first) at its largest after any checkpoint tensor went in, over what was in use before the load.
MEMORY_PROBE = """
import ctypes, json, sys
import torch
import checkpoints
from quantize import model_bytes
libc = ctypes.CDLL("libc.so.6")
def anon():
    libc.malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
peak, put = [0], checkpoints._Filler.put
def measured_put(self, *args):
    put(self, *args)
    peak[0] = max(peak[0], anon())
result = {}
for mode in sys.argv[3:]:
    mode = "" if mode == "none" else mode
    checkpoints._Filler.put = put
    checkpoints.load_model(sys.argv[2], dtype=torch.bfloat16, quantize=mode)  # first-load costs
    checkpoints._Filler.put = measured_put
    peak[0], base = 0, anon()
    model = checkpoints.load_model(sys.argv[1], dtype=torch.bfloat16, quantize=mode)
    result[mode] = {"peak": peak[0] - base, "model": model_bytes(model)}
    del model
print(json.dumps(result))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_loading_never_holds_the_full_precision_model(tmp_path):
    torch.manual_seed(0)
    big = Config("probe", vocab_size=256, n_layer=4, n_head=8, n_embd=512, intermediate_size=1408)
    save_model(Transformer(big), tmp_path / "big")  # 12.9M parameters: 52 MB in fp32, 26 MB in bf16
    save_model(Transformer(Config("probe", vocab_size=256)), tmp_path / "tiny")
    bf16 = 2 * sum(p.numel() for p in Transformer(big).parameters())
    argv = [sys.executable, "-c", MEMORY_PROBE, tmp_path / "big", tmp_path / "tiny",
            "none", "int8", "nf4"]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(out.stdout)
    assert r[""]["peak"] >= 0.95 * bf16  # the probe sees a model held in bf16
    for mode, share in (("int8", 0.52), ("nf4", 0.3)):
        assert r[mode]["model"] < share * bf16
        assert r[mode]["peak"] < r[mode]["model"] + 2**20, mode  # the packed model (+ 1 MB)


# ------------------------------------------------------------------------------------- the scripts
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A checkpoint folder (the demo's tokenizer on a small corpus, a random tiny LLaMA), data."""
    from data import synthetic
    from data.prepare import write_json
    root = tmp_path_factory.mktemp("qbase")
    (root / "base").mkdir()
    synthetic.train_tokenizer(synthetic.pretrain_corpus(400), str(root / "base" / "tokenizer"))
    from tokenizer import Tokenizer
    vocab = Tokenizer.from_pretrained(root / "base").vocab_size
    torch.manual_seed(0)
    save_model(Transformer(Config("tiny", vocab_size=vocab, block_size=256)), root / "base")
    train_rows, test_rows = synthetic.finetune_split(40, 4, seed=0)
    write_json(root / "train.json", train_rows)
    write_json(root / "test.json", test_rows)
    return root


def test_train_and_eval_take_quantize(tiny_base, tmp_path):
    import eval as ev
    import train
    base, data = f"--model={tiny_base / 'base'}", f"--data={tiny_base / 'train.json'}"
    model, _ = train.main([base, data, f"--out={tmp_path / 'a'}", "--quantize=nf4",
                           "--max_steps=2", "--batch_size=4", "--val_set_size=8",
                           "--eval_interval=2", "--threads=0"])
    assert isinstance(model.layers[0].attn.q_proj, Q.QuantLinear)
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    (summary,) = ev.main([base, f"--adapter_dir={tmp_path / 'a'}", "--quantize=nf4",
                          "--answer_type=number", f"--dataset={tiny_base / 'test.json'}",
                          "--max_new_tokens=4", f"--out={tmp_path / 'e'}"]).values()
    assert [v["n"] for k, v in summary.items() if k != "average"] == [4]
    with pytest.raises(SystemExit, match=r"--quantize=int4: expected one of '', int8, nf4, nf4-dq"):
        train.main([base, data, "--quantize=int4"])
    with pytest.raises(ValueError, match=r"--quantize=int4: expected one of int8, nf4, nf4-dq"):
        ev.main([base, "--dataset=x", "--quantize=int4"])


def test_bench_takes_quantize():
    import importlib
    import bench
    bench = importlib.reload(bench)
    res = bench.main(["--quantize=nf4-dq", "--steps=1", "--warmup=1", "--micro_batch=2",
                      "--seq_len=16"])
    assert res["quantize"] == "nf4-dq" and res["ours"]["tok_s"] > 0
    with pytest.raises(SystemExit,
                       match="bench.py: error: --quantize=int4: expected one of '', int8"):
        importlib.reload(bench).main(["--quantize=int4"])
