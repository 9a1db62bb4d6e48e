"""
Speed and memory of adapter training and generation, ours vs Hugging Face + PEFT in the same run.

  python bench.py --model=llama-7b --adapter=lora --micro_batch=4 --seq_len=256 [--grad_ckpt]
                  [--baseline]
  python bench.py --task=generate --adapter=none --batch=32 --prompt_len=200 --new_tokens=256
                  [--baseline]
  python bench.py --suite      # every row of the README's table, one process each: a markdown
                               # table on stdout, JSON in --out
  python bench.py --task=ops --adapter=lora   # kernels an adapter adds to a training step (CPU)

The preset is built with random weights (bf16 on CUDA, no download). Without CUDA the default
model is tiny-llama in fp32: a smoke test, numbers meaningless. --compile: "" = compile each block
on CUDA (fast.compile_blocks), true/false force it; every run reports its first step's seconds
(compiling included) apart from the timed steps. Generation uses fast.DecodeStep (a CUDA graph per
generate call on CUDA); --adapter=lora attaches an unmerged LoRA to it, --adapter=none runs the
bare base. MFU divides model FLOPs by --peak_tflops (default 989: H100 SXM dense bf16). Training
FLOPs of a frozen base: forward 2N + backward through activations 2N per token (no weight
gradients), plus attention.
"""
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adapters import KINDS, add_adapter, count_parameters, fast_fp32_matmuls
from files import write_atomic
from cli import ConfigError, check_choice, configure, device_and_dtype
import fast
from fast import compile_blocks, compile_setting
from model import PRESETS, Config, Transformer
from quantize import MODES as QUANT_MODES, quantize_model

DEFAULTS = dict(
    model="",             # a preset; "" = llama-7b on CUDA, tiny-llama elsewhere
    adapter="lora",       # an adapter kind; none = the bare base (generation only)
    task="train",         # train | generate | ops (kernels the adapter adds, counted on the CPU)
    micro_batch=4,
    seq_len=256,
    steps=10,
    warmup=3,             # untimed steps after the first (timed on its own: compile time)
    compile="",           # "" = compile each block on CUDA, off elsewhere; true | false force it
    grad_ckpt=False,
    quantize="",          # int8 | nf4 | nf4-dq: the frozen base quantized (quantize.py)
    baseline=False,       # also run transformers + PEFT on the same work (test-only dependencies)
    batch=32,             # generation
    prompt_len=200,
    new_tokens=256,
    peak_tflops=989.0,
    n_layer=0,            # 0 = the preset's; fewer layers to fit a quick look
    suite="",             # all = every row of SUITE, or some of its keys (a,b,...); "" = one run
    out="out/bench/suite.json",  # where --suite writes its rows as JSON
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # issue 13's setting

# the README's table: key -> (work, target, the row's own settings); the rest comes from the
# command line (the work's {names} are filled from the settings)
SAME_AS_LORA = "≤ 1.3× LoRA's time per token"
SUITE = {
    "lora4": ("LoRA, micro-batch 4", "≥ 2.5× HF+PEFT, memory ≤ HF's; first step ≤ 60 s",
              dict(adapter="lora", micro_batch=4, baseline=True)),
    "lora4-eager": ("LoRA, micro-batch 4, --compile=false", "(what compiling buys)",
                    dict(adapter="lora", micro_batch=4, compile="false")),
    "lora16": ("LoRA, micro-batch 16", "≥ 18,000 tok/s", dict(adapter="lora", micro_batch=16)),
    "lora16-ckpt": ("LoRA, micro-batch 16, --grad_ckpt", "≥ 1.5× HF+PEFT",
                    dict(adapter="lora", micro_batch=16, grad_ckpt=True, baseline=True)),
    "series4": ("series, micro-batch 4", SAME_AS_LORA, dict(adapter="series", micro_batch=4)),
    "parallel4": ("parallel, micro-batch 4", SAME_AS_LORA, dict(adapter="parallel", micro_batch=4)),
    "prefix4": ("prefix, micro-batch 4", SAME_AS_LORA, dict(adapter="prefix", micro_batch=4)),
    "generate32": ("generate, batch 32, prompt {prompt_len}, +{new_tokens}", "≥ 10× HF",
                   dict(task="generate", adapter="none", batch=32, baseline=True)),
    "generate32-lora": ("generate + unmerged LoRA, batch 32", "≥ 10× HF+PEFT",
                        dict(task="generate", adapter="lora", batch=32, baseline=True)),
    "decode1": ("decode, batch 1, +{new_tokens}", "≥ 150 tok/s (bound ≈ 355 on an H200)",
                dict(task="generate", adapter="none", batch=1)),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, n, n_warmup):
    """-> (seconds of the first call, compiling included; of n calls after n_warmup more)."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(n_warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the timed steps' peak, not the compiler's
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return first, time.perf_counter() - t0


def peak_gib():
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def build(cfg, device, dtype):
    conf = Config.from_name(cfg.model, **({"n_layer": cfg.n_layer} if cfg.n_layer else {}))
    with torch.device(device):
        torch.manual_seed(0)
        m = Transformer(conf).to(dtype)
    return conf, quantize_model(m, cfg.quantize) if cfg.quantize else m, dtype


def attach(m, adapter):
    """The adapter of the run on our model (LoRA on issue 13's linears), unless none."""
    if adapter != "none":
        add_adapter(m, adapter, **({"target_modules": LORA_TARGETS} if adapter == "lora" else {}))


def time_training(cfg, loss_fn, params, device):
    """First step, warm-up, then `steps` timed optimizer steps of loss_fn() -> loss (bf16 autocast
    on CUDA). The same for ours and HF+PEFT: AdamW on the trainable parameters.
    -> (tokens/s, peak GiB, first step s)."""
    opt = torch.optim.AdamW(params, lr=3e-4, fused=device == "cuda")

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    first, dt = timed(step, cfg.steps, cfg.warmup)
    return cfg.micro_batch * cfg.seq_len * cfg.steps / dt, peak_gib(), first


def train_flops_per_token(cfg, conf, n_params):
    attn = 2 * 2 * conf.n_layer * cfg.seq_len * conf.n_head * conf.head_dim  # QK^T and AV, forward
    return 2 * n_params + 2 * n_params + 2 * attn  # forward + activation gradients (frozen weights)


def bench_train(cfg, conf, m, device):
    attach(m, cfg.adapter)
    m.grad_checkpoint = cfg.grad_ckpt
    m.train()
    if compile_setting(cfg.compile, device):
        compile_blocks(m)
    x = torch.randint(0, conf.vocab_size, (cfg.micro_batch, cfg.seq_len), device=device)
    params = [p for p in m.parameters() if p.requires_grad]
    tok_s, peak, first = time_training(cfg, lambda: m(x, x)[1], params, device)
    trainable, total = count_parameters(m)
    mfu = tok_s * train_flops_per_token(cfg, conf, total - trainable) / (cfg.peak_tflops * 1e12)
    return {"tok_s": round(tok_s), "peak_gib": peak, "first_step_s": round(first, 4),
            "trainable": trainable, "mfu": round(mfu, 3)}


def time_generation(cfg, generate):
    """One generate call of the full size first (compiling, CUDA-graph capture), then one timed."""
    first, dt = timed(generate, 1, 0)
    return {"new_tok_s": round(cfg.batch * cfg.new_tokens / dt), "seconds": round(dt, 2),
            "peak_gib": peak_gib(), "first_call_s": round(first, 4)}


def bench_generate(cfg, conf, m, device):
    attach(m, cfg.adapter)
    m.eval()
    if compile_setting(cfg.compile, device):
        compile_blocks(m)
    idx = torch.randint(3, conf.vocab_size, (cfg.batch, cfg.prompt_len), device=device)
    return time_generation(cfg, lambda: fast.generate(m, idx, cfg.new_tokens))


def hf_model(conf, dtype, device):
    """The same preset as a transformers model (test/benchmark-only dependency)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(hidden_size=conf.n_embd, intermediate_size=conf.intermediate_size,
                     num_hidden_layers=conf.n_layer, num_attention_heads=conf.n_head,
                     num_key_value_heads=conf.n_kv_head, vocab_size=conf.vocab_size,
                     max_position_embeddings=conf.block_size, rms_norm_eps=conf.norm_eps)
    with torch.device(device):
        torch.manual_seed(0)
        return LlamaForCausalLM(hc).to(dtype)


def peft_lora(model):
    from peft import LoraConfig, get_peft_model
    o = KINDS["lora"].defaults
    lora = LoraConfig(r=o["r"], lora_alpha=o["alpha"], lora_dropout=o["dropout"], bias="none",
                      task_type="CAUSAL_LM", target_modules=LORA_TARGETS)
    return get_peft_model(model, lora)


def baseline_train(cfg, conf, dtype, device):
    if cfg.adapter != "lora":
        return {"skipped": "the HF+PEFT baseline runs LoRA only"}
    pm = peft_lora(hf_model(conf, dtype, device))
    if cfg.grad_ckpt:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm.enable_input_require_grads()
    pm.train()
    x = torch.randint(0, conf.vocab_size, (cfg.micro_batch, cfg.seq_len), device=device)
    tok_s, peak, first = time_training(cfg, lambda: pm(input_ids=x, labels=x).loss,
                                       [p for p in pm.parameters() if p.requires_grad], device)
    return {"tok_s": round(tok_s), "peak_gib": peak, "first_step_s": round(first, 4)}


def baseline_generate(cfg, conf, dtype, device):
    m = hf_model(conf, dtype, device)
    m = (peft_lora(m) if cfg.adapter == "lora" else m).eval()
    idx = torch.randint(3, conf.vocab_size, (cfg.batch, cfg.prompt_len), device=device)
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(idx),
              max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens)
    with torch.no_grad():
        return time_generation(cfg, lambda: m.generate(input_ids=idx, **kw))


def parse(argv):
    cfg = configure(argv, DEFAULTS, __doc__)[0]
    check_choice(cfg, "task", ("train", "generate", "ops"))
    check_choice(cfg, "quantize", ("", *QUANT_MODES))
    if cfg.adapter not in (*KINDS, "none") or cfg.adapter == "none" and cfg.task == "train":
        raise ConfigError(f"--adapter={cfg.adapter}: expected one of {', '.join(KINDS)}"
                          + (", or none with --task=generate" if cfg.task == "train" else ", none"))
    for key in ("micro_batch", "seq_len", "steps", "batch", "prompt_len", "new_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must be at least 1")
    rows = [] if not cfg.suite or cfg.suite == "all" else cfg.suite.split(",")
    if [r for r in rows if r not in SUITE]:
        raise ConfigError(f"--suite={cfg.suite}: expected all or some of {', '.join(SUITE)}")
    compile_setting(cfg.compile, "cpu")  # a word it does not know is a ConfigError here
    cfg.model = cfg.model or ("llama-7b" if torch.cuda.is_available() else "tiny-llama")
    if cfg.model not in PRESETS:
        raise ConfigError(f"--model={cfg.model}: expected a preset, one of {', '.join(PRESETS)}")
    return cfg


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that compute (views and allocations left out): one kernel launch each on
    a GPU, so a figure about launch overhead that a CPU can measure."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.n += not (func.is_view or name.startswith("empty") or name == "_unsafe_view")
        return func(*args, **(kwargs or {}))


def count_ops(cfg):
    """Kernels one training step's forward and backward run on a one-layer bf16 tiny-llama, with
    the adapter minus without: what the adapter adds per layer (LoRA: per call as well)."""
    def step_ops(adapter):
        torch.manual_seed(0)
        m = Transformer(Config.from_name("tiny-llama", n_layer=1)).to(torch.bfloat16)
        attach(m.requires_grad_(False), adapter)
        m.embed.weight.requires_grad_(True)  # both runs backpropagate through the whole layer
        m.train()
        x = torch.randint(0, m.config.vocab_size, (2, 16))
        with OpCounter() as forward:
            loss = m(x, x)[1]
        with OpCounter() as backward:
            loss.backward()
        return forward.n, backward.n

    (f0, b0), (f1, b1) = step_ops("none"), step_ops(cfg.adapter)
    res = {"forward_ops_per_layer": f1 - f0, "backward_ops_per_layer": b1 - b0}
    if cfg.adapter == "lora":
        res["forward_ops_per_call"] = (f1 - f0) / len(LORA_TARGETS)
    return res


def run(cfg):
    """One row: ours (and with --baseline, HF+PEFT) on one piece of work -> a dict of results."""
    if cfg.task == "ops":
        return {"task": "ops", "adapter": cfg.adapter, "ours": count_ops(cfg)}
    device, dtype = device_and_dtype()  # as train.py: bf16 on CUDA (fp16 without bf16), else fp32
    device = device.type
    conf, m, dtype = build(cfg, device, dtype)
    fast_fp32_matmuls(device, dtype)  # as train.py: TF32 for fp32 adapter maths beside bf16
    res = {"model": conf.name, "n_layer": conf.n_layer, "task": cfg.task, "adapter": cfg.adapter,
           "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke test)",
           "torch": torch.__version__, "compiled": compile_setting(cfg.compile, device)}
    res["quantize"] = cfg.quantize
    res["ours"] = (bench_train if cfg.task == "train" else bench_generate)(cfg, conf, m, device)
    if cfg.baseline:
        del m
        if device == "cuda":
            torch.cuda.empty_cache()
        try:
            import peft
            import transformers
        except ImportError as e:
            res["hf_peft"] = {"skipped": f"{e.name} is not installed "
                                         "(pip install -r requirements-dev.txt)"}
            return res
        res["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__}
        baseline = baseline_train if cfg.task == "train" else baseline_generate
        res["hf_peft"] = baseline(cfg, conf, dtype, device)
        key = "tok_s" if cfg.task == "train" else "new_tok_s"
        if key in res["hf_peft"]:
            res["speedup"] = round(res["ours"][key] / res["hf_peft"][key], 2)
    return res


def run_suite(cfg, argv):
    """Every row (or those named in --suite) in its own process, with the command line's other
    settings; prints one markdown table and writes the rows as JSON to --out. -> the JSON object."""
    common = [a for a in argv if not a.startswith(("--suite", "--out"))]
    keys = list(SUITE) if cfg.suite == "all" else cfg.suite.split(",")
    rows = []
    for key in keys:
        work, target, settings = SUITE[key]
        args = common + [f"--{k}={v}" for k, v in settings.items()]
        print(f"bench.py --suite: {key}: {' '.join(args)}", file=sys.stderr, flush=True)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True,
                           text=True)
        lines = p.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if p.returncode == 0 and lines else \
            {"error": (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]}
        rows.append({"key": key, "work": work.format(**vars(cfg)), "target": target, "args": args,
                     "result": result})
    table = markdown_table(rows)
    print(table)
    report = {"rows": rows, "table": table}
    write_atomic(cfg.out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {cfg.out}", file=sys.stderr)
    return report


def markdown_table(rows):
    """The suite's rows as the README's table: ours and HF+PEFT side by side, ratio, first step."""
    def speed(r):
        if not r or "skipped" in r:
            return "—"
        gib = f", {r['peak_gib']} GiB" if r.get("peak_gib") is not None else ""
        if "tok_s" in r:
            return f"{r['tok_s']:,} tok/s{gib}"
        return f"{r['new_tok_s']:,} new tok/s{gib}"

    lines = ["| work | ours | HF + PEFT | ratio | first step / call (s) | target |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        res = row["result"]
        if "error" in res:
            lines.append(f"| {row['work']} | error: {res['error']} | | | | {row['target']} |")
            continue
        ours = res["ours"]
        first = ours.get("first_step_s", ours.get("first_call_s"))
        ratio = f"{res['speedup']}×" if "speedup" in res else "—"
        lines.append(f"| {row['work']} | {speed(ours)} | {speed(res.get('hf_peft'))} | {ratio} "
                     f"| {first} | {row['target']} |")
    device = next((r["result"]["device"] for r in rows if "device" in r["result"]), "?")
    return "\n".join(lines) + f"\n\n({device}, torch {torch.__version__})"


def main(argv):
    try:
        cfg = parse(argv)
    except ConfigError as e:
        sys.exit(f"bench.py: error: {e}")
    if cfg.suite:
        return run_suite(cfg, argv)
    res = run(cfg)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
