"""
Speed and memory of adapter training and generation, ours vs Hugging Face + PEFT in the same run.

  python bench.py --model=llama-7b --adapter=lora --micro_batch=4 --seq_len=256 [--compile] [--grad_ckpt] [--baseline]
  python bench.py --task=generate --batch=32 --prompt_len=200 --new_tokens=256 [--baseline]

The preset is built with random weights in bf16 on the GPU (no download). On a machine without CUDA it runs
tiny-llama in fp32 as a smoke test (numbers meaningless). MFU divides model FLOPs by the peak given with --peak_tflops
(default 989: H100 SXM dense bf16). Training FLOPs of a frozen base: forward 2N + backward through activations 2N per
token (no weight gradients), plus attention.
"""
import json
import sys
import time

import torch

from adapters import ADAPTER_DEFAULTS, add_adapter, count_parameters, fast_fp32_matmuls
from model import Config, Transformer
from quantize import MODES as QUANT_MODES, quantize_model

# defaults, overridden by --key=value
model = "llama-7b"
adapter = "lora"
task = "train"          # train | generate
micro_batch = 4
seq_len = 256
steps = 10
warmup = 3
compile = False
grad_ckpt = False
quantize = ""           # int8 | nf4 | nf4-dq: the frozen base quantized (quantize.py)
baseline = False        # also run transformers + PEFT on the same work
batch = 32              # generation
prompt_len = 200
new_tokens = 256
peak_tflops = 989.0
n_layer = 0             # 0 = the preset's; fewer layers to fit a quick look


def parse(argv):
    g = globals()
    for arg in argv:
        key, _, val = arg.removeprefix("--").partition("=")
        if key not in g or key.startswith("_") or callable(g[key]) or not arg.startswith("--"):
            sys.exit(f"bench.py: unknown option {arg!r}")
        cur = g[key]
        g[key] = (val.lower() in ("1", "true", "yes", "")) if isinstance(cur, bool) else type(cur)(val)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, n, n_warmup):
    for _ in range(n_warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return time.perf_counter() - t0


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def build(cuda):
    cfg = Config.from_name(model if cuda else "tiny-llama")
    if n_layer:
        cfg = Config.from_name(cfg.name, n_layer=n_layer)
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        torch.manual_seed(0)
        m = Transformer(cfg).to(dtype)
    return cfg, quantize_model(m, quantize) if quantize else m, dtype


def time_training(loss_fn, params, device):
    """Warm up, then time `steps` optimizer steps of loss_fn() -> loss (bf16 autocast on CUDA). The same for ours
    and HF+PEFT: AdamW on the trainable parameters. Returns (tokens/s, peak GiB)."""
    opt = torch.optim.AdamW(params, lr=3e-4, fused=device == "cuda")

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = timed(step, steps, warmup)
    return micro_batch * seq_len * steps / dt, peak_gib()


def train_flops_per_token(cfg, n_params):
    attn = 2 * 2 * cfg.n_layer * seq_len * cfg.n_head * cfg.head_dim  # QK^T and AV, forward
    return 2 * n_params + 2 * n_params + 2 * attn  # forward + activation gradients (frozen weights)


def bench_train(cfg, m, dtype, device):
    opts = {"target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]} if adapter == "lora" else {}
    add_adapter(m, adapter, **opts)
    m.grad_checkpoint = grad_ckpt
    m.train()
    fwd = torch.compile(m) if compile else m
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len), device=device)
    tok_s, peak = time_training(lambda: fwd(x, x)[1], [p for p in m.parameters() if p.requires_grad], device)
    trainable, total = count_parameters(m)
    n_base = total - trainable
    return {"tok_s": round(tok_s), "peak_gib": peak, "trainable": trainable,
            "mfu": round(tok_s * train_flops_per_token(cfg, n_base) / (peak_tflops * 1e12), 3)}


def bench_generate(cfg, m, device):
    m.eval()
    idx = torch.randint(3, cfg.vocab_size, (batch, prompt_len), device=device)
    m.generate(idx[:, :16], 8)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = timed(lambda: m.generate(idx, new_tokens), 1, 0)
    return {"new_tok_s": round(batch * new_tokens / dt), "seconds": round(dt, 2), "peak_gib": peak_gib()}


def hf_model(cfg, dtype, device):
    """The same preset as a transformers model (test/benchmark-only dependency)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
                     num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, vocab_size=cfg.vocab_size,
                     max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps)
    with torch.device(device):
        torch.manual_seed(0)
        return LlamaForCausalLM(hc).to(dtype)


def baseline_train(cfg, dtype, device):
    from peft import LoraConfig, get_peft_model
    if adapter != "lora":
        return {"skipped": "the HF+PEFT baseline runs LoRA only"}
    o = ADAPTER_DEFAULTS["lora"]
    pm = get_peft_model(hf_model(cfg, dtype, device), LoraConfig(
        r=o["r"], lora_alpha=o["alpha"], lora_dropout=o["dropout"], bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    if grad_ckpt:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm.enable_input_require_grads()
    pm.train()
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len), device=device)
    tok_s, peak = time_training(lambda: pm(input_ids=x, labels=x).loss,
                                [p for p in pm.parameters() if p.requires_grad], device)
    return {"tok_s": round(tok_s), "peak_gib": peak}


def baseline_generate(cfg, dtype, device):
    m = hf_model(cfg, dtype, device).eval()
    idx = torch.randint(3, cfg.vocab_size, (batch, prompt_len), device=device)
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        m.generate(input_ids=idx[:, :16], max_new_tokens=8, **kw)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        dt = timed(lambda: m.generate(input_ids=idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, **kw), 1, 0)
    return {"new_tok_s": round(batch * new_tokens / dt), "seconds": round(dt, 2), "peak_gib": peak_gib()}


def main(argv):
    parse(argv)
    if adapter not in ADAPTER_DEFAULTS:
        sys.exit(f"bench.py: unknown adapter {adapter!r}; adapters: {', '.join(ADAPTER_DEFAULTS)}")
    if quantize not in ("", *QUANT_MODES):
        sys.exit(f"bench.py: --quantize must be one of {', '.join(QUANT_MODES)}, not {quantize!r}")
    if task not in ("train", "generate"):
        sys.exit(f"bench.py: --task must be train or generate, not {task!r}")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cfg, m, dtype = build(cuda)
    fast_fp32_matmuls(device, dtype)  # as train.py: TF32 for the fp32 adapter maths beside the bf16 base
    res = {"model": cfg.name, "n_layer": cfg.n_layer, "task": task, "adapter": adapter, "device":
           torch.cuda.get_device_name(0) if cuda else "cpu (smoke test, tiny-llama)", "torch": torch.__version__}
    res["quantize"] = quantize
    res["ours"] = bench_train(cfg, m, dtype, device) if task == "train" else bench_generate(cfg, m, device)
    if baseline:
        del m
        if cuda:
            torch.cuda.empty_cache()
        import peft
        import transformers
        res["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__}
        res["hf_peft"] = baseline_train(cfg, dtype, device) if task == "train" else baseline_generate(cfg, dtype, device)
        key = "tok_s" if task == "train" else "new_tok_s"
        if key in res["hf_peft"]:
            res["speedup"] = round(res["ours"][key] / res["hf_peft"][key], 2)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
