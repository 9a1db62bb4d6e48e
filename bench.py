"""
Speed and memory of adapter training and generation, ours vs Hugging Face + PEFT in the same run.

  python bench.py --model=llama-7b --adapter=lora --micro_batch=4 --seq_len=256 [--grad_ckpt]
                  [--baseline]
  python bench.py --task=generate --adapter=none --batch=32 --prompt_len=200 --new_tokens=256
                  [--baseline]
  python bench.py --suite      # every row of SUITE (or --suite=lora4,pack4), one process each: a
                               # markdown table on stdout, JSON in --out
  python bench.py --task=ops --adapter=lora   # kernels an adapter adds to a training step (CPU)
  python bench.py --suite=tokenizer [--tokenizer=path/to/tokenizer.model]   # our BPE vs tiktoken
  python bench.py --lengths=math --pack       # packed rows vs padded ones, real tokens/s of both
  python bench.py --vocab_size=128256 --chunked_loss=false   # the loss from the full logits
  torchrun --nproc_per_node=8 bench.py --fsdp # the base sharded over the processes (FSDP2)

The preset is built with random weights (bf16 on CUDA, no download). Without CUDA the default
model is tiny-llama in fp32: a smoke test, speed meaningless. --compile: "" = compile each block
on CUDA (cli.compile_blocks), true/false force it; every run reports its first step's seconds
(compiling included) apart from the timed steps. Peak memory: on CUDA the timed steps' allocated
high-water mark, on a CPU the process's resident one (ru_maxrss: model building included; the
suite runs each row in its own process). Generation uses generate.DecodeStep (a CUDA graph per
generate call on CUDA); --adapter=lora attaches an unmerged LoRA to it, --adapter=none runs the
bare base. MFU divides model FLOPs by --peak_tflops (default 989: H100 SXM dense bf16). Training
FLOPs of a frozen base: forward 2N + backward through activations 2N per token (no weight
gradients), plus attention.
"""
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import distributed
from adapters import KINDS, add_adapter, count_parameters, fast_fp32_matmuls
from bpe import LLAMA3_PATTERN, LLAMA3_SPECIAL, BPETokenizer
from checkpoints import config_to_hf
from cli import (ConfigError, check_choice, compile_blocks, compile_setting, configure,
                 device_and_dtype, fail)
from data.pack import collate_packed, collate_padded, padding_share
from data.template import format_example
from files import write_atomic
from generate import generate
from loss import LOSS_CHUNK_LOGITS
from model import Transformer
from presets import PRESETS, Config
from quantize import MODES as QUANT_MODES, quantize_model
from tokenizer import Tokenizer

DEFAULTS = dict(
    model="",             # a preset; "" = llama-7b on CUDA, tiny-llama elsewhere
    adapter="lora",       # an adapter kind; none = the bare base (generation only)
    task="train",         # train | generate | ops (kernels the adapter adds, counted on the CPU)
                          # | tokenizer (our BPE vs tiktoken, encoding Alpaca rows on the CPU)
    tokenizer="",         # --task=tokenizer: a tiktoken-format tokenizer.model; "" = Llama 3's
                          # (llama_models, requirements-dev.txt)
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
    vocab_size=0,         # 0 = the preset's (32,000 for LLaMA; Llama 3 has 128,256)
    chunked_loss=True,    # the loss in chunks of loss.LOSS_CHUNK_LOGITS; false = the full logits
    lengths="",           # "" = every example seq_len tokens; math | demo: lengths drawn from
                          # those datasets' (LENGTHS), cut at seq_len; the batches then padded
    pack=False,           # with --lengths: also time packed rows (data/pack.py), side by side
    fsdp=False,           # the base sharded over the processes (torchrun; distributed.py)
    suite="",             # all (or bare --suite) = every row of SUITE, or some keys (a,b,...)
    out="out/bench/suite.json",  # where --suite writes its rows as JSON
)
# Example lengths (tokens, after the template, cut at 256) at every 5% quantile, 0% to 100%,
# measured on the CPU: math = LLM-Adapters' ft-training_set/math_data.json (3,260 rows) with
# GPT-2's BPE; demo = the embedded demo's 4,000 training rows with its own tokenizer. bench draws
# lengths between them (inverse CDF), so a GPU machine without the data still gets their shape.
LENGTHS = {
    "math": [69, 90, 96, 102, 107, 111, 114, 117, 120, 124, 127, 130, 135, 140, 146, 154, 164,
             175, 189, 213, 255],
    "demo": [60, 62, 63, 64, 65, 65, 66, 66, 66, 67, 67, 67, 67, 67, 68, 68, 69, 69, 69, 69, 72],
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the LoRA targets of the speed table

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
    "pack4": ("LoRA, micro-batch 4, math lengths: packed vs padded (grouped by length)",
              "real tok/s ≥ padded's", dict(adapter="lora", micro_batch=4, lengths="math",
                                             pack=True)),
    "loss32k": ("LoRA, micro-batch 16, vocab 32,000, full logits", "(the chunked loss's gain)",
                dict(adapter="lora", micro_batch=16, vocab_size=32000, chunked_loss=False)),
    "loss32k-chunked": ("LoRA, micro-batch 16, vocab 32,000, loss in chunks",
                        "memory < full logits', tok/s ≥ 0.98×", dict(
                            adapter="lora", micro_batch=16, vocab_size=32000)),
    "loss128k": ("LoRA, micro-batch 16, vocab 128,256, full logits", "(the chunked loss's gain)",
                 dict(adapter="lora", micro_batch=16, vocab_size=128256, chunked_loss=False)),
    "loss128k-chunked": ("LoRA, micro-batch 16, vocab 128,256, loss in chunks",
                         "memory < full logits', tok/s ≥ 0.98×", dict(
                             adapter="lora", micro_batch=16, vocab_size=128256)),
    "fsdp": ("LoRA, micro-batch 4, FSDP over every GPU", "tok/s per GPU ≥ 0.8× lora4's",
             dict(adapter="lora", micro_batch=4, fsdp=True)),
    "tokenizer": ("encode 10,000 Alpaca rows, Llama 3's tokenizer.model (CPU)",
                  "ids = tiktoken's; ≥ 0.4× its tok/s", dict(task="tokenizer")),
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
    """CUDA: the allocator's high-water mark since the last reset; CPU: the process's resident
    high-water mark (ru_maxrss, KiB on Linux, bytes on macOS), which nothing resets."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**30 if sys.platform == "darwin" else 2**20), 2)


def build(cfg, device, dtype):
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "vocab_size") if getattr(cfg, k)}
    conf = Config.from_name(cfg.model, **overrides)
    if cfg.fsdp:  # each process allocates and fills only its part of the base
        with torch.device("meta"):
            m = Transformer(conf)
        m = distributed.shard_base(m, torch.device(device), dtype)
        torch.manual_seed(dist.get_rank())
        with torch.no_grad():
            for p in m.parameters():
                p.to_local().normal_(0, 0.02)
        return conf, m, dtype
    with torch.device(device):
        torch.manual_seed(0)
        m = Transformer(conf).to(dtype)
    return conf, quantize_model(m, cfg.quantize) if cfg.quantize else m, dtype


def attach(m, adapter):
    """The adapter of the run on our model (LoRA on LORA_TARGETS), unless none."""
    if adapter != "none":
        add = distributed.add_adapter if distributed.is_sharded(m) else add_adapter
        add(m, adapter, **({"target_modules": LORA_TARGETS} if adapter == "lora" else {}))


def time_training(cfg, loss_fn, params, device, tokens=None):
    """First step, warm-up, then `steps` timed optimizer steps of loss_fn(step) -> loss (bf16
    autocast on CUDA). The same for ours and HF+PEFT: AdamW on the trainable parameters; under
    FSDP the adapter's gradients averaged over the processes. tokens(step): the real tokens of a
    step (default micro_batch x seq_len). -> (tokens/s of this process, peak GiB, first step s)."""
    opt = torch.optim.AdamW(params, lr=3e-4, fused=device == "cuda")
    count = tokens or (lambda step: cfg.micro_batch * cfg.seq_len)
    n = iter(range(10**9))
    timed_tokens = sum(count(1 + cfg.warmup + i) for i in range(cfg.steps))

    def step():
        i = next(n)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn(i)
        loss.backward()
        if cfg.fsdp:
            distributed.average_gradients(params, dist.get_world_size())
        opt.step()
        opt.zero_grad(set_to_none=True)

    first, dt = timed(step, cfg.steps, cfg.warmup)
    return timed_tokens / dt, peak_gib(), first


def train_flops_per_token(cfg, conf, n_params):
    attn = 2 * 2 * conf.n_layer * cfg.seq_len * conf.n_head * conf.head_dim  # QK^T and AV, forward
    return 2 * n_params + 2 * n_params + 2 * attn  # forward + activation gradients (frozen weights)


def bench_train(cfg, conf, m, device):
    attach(m, cfg.adapter)
    m.grad_checkpoint = cfg.grad_ckpt
    m.loss_chunk = LOSS_CHUNK_LOGITS // conf.vocab_size if cfg.chunked_loss else 0
    m.train()
    if compile_setting(cfg.compile, device):
        compile_blocks(m)
    params = [p for p in m.parameters() if p.requires_grad]
    trainable, total = count_parameters(m)
    if cfg.fsdp:  # the count of this process's part: the whole base is world x its base
        total = trainable + (total - trainable) * dist.get_world_size()
    if cfg.lengths:
        return bench_lengths(cfg, conf, m, params, device) | {"trainable": trainable}
    x = torch.randint(0, conf.vocab_size, (cfg.micro_batch, cfg.seq_len), device=device)
    tok_s, peak, first = time_training(cfg, lambda _: m(x, x)[1], params, device)
    mfu = tok_s * train_flops_per_token(cfg, conf, total - trainable) / (cfg.peak_tflops * 1e12)
    return {"tok_s": round(tok_s), "peak_gib": peak, "first_step_s": round(first, 4),
            "trainable": trainable, "mfu": round(mfu, 3)}


def draw_lengths(name, n, cut, seed=0):
    """n example lengths with the distribution of LENGTHS[name] (linear between its quantiles), cut
    at `cut` tokens."""
    q = torch.tensor(LENGTHS[name], dtype=torch.float)
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * (len(q) - 1)
    lo = u.floor().long().clamp(max=len(q) - 2)
    return (q[lo] + (u - lo) * (q[lo + 1] - q[lo])).round().long().clamp(2, cut).tolist()


def bench_lengths(cfg, conf, m, params, device):
    """Examples of --lengths in micro-batches of micro_batch, padded (one row each, the longest
    setting the length; grouped by length as train.py does, and in random order), and with --pack
    packed (one row per micro-batch). Real tokens/s of each, timed one after the other in this
    process on the same examples."""
    n_steps = 1 + cfg.warmup + cfg.steps
    lengths = draw_lengths(cfg.lengths, n_steps * cfg.micro_batch, cfg.seq_len)
    g = torch.Generator().manual_seed(1)
    examples = [(ids, ids) for ids in (torch.randint(3, conf.vocab_size, (n,), generator=g).tolist()
                                       for n in lengths)]
    mb = cfg.micro_batch
    random_order = [list(range(s, s + mb)) for s in range(0, len(examples), mb)]
    by_length = sorted(range(len(examples)), key=lambda i: lengths[i])
    grouped = [by_length[s:s + mb] for s in range(0, len(examples), mb)]
    grouped = [grouped[i] for i in torch.randperm(len(grouped), generator=g).tolist()]
    ways = {"padded, grouped by length": grouped, "padded, random order": random_order}
    if cfg.pack:
        ways = {"packed": random_order, **ways}
    res = {}
    for way, batches in ways.items():
        def loss(step, batches=batches, packed=way == "packed"):
            if packed:
                x, y, pos = collate_packed(examples, batches[step], device)
                return m(x, y, positions=pos)[1]
            x, y = collate_padded(examples, batches[step], device)
            return m(x, y)[1]

        def real(step, batches=batches):
            return sum(lengths[i] for i in batches[step])
        tok_s, peak, first = time_training(cfg, loss, params, device, real)
        res[way] = {"tok_s": round(tok_s), "peak_gib": peak, "first_step_s": round(first, 4),
                    "padding": 0.0 if way == "packed" else
                    round(padding_share(lengths, batches[1 + cfg.warmup:]), 4)}
    main = res.pop("packed" if cfg.pack else "padded, grouped by length")
    return main | {"compared": res}


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
    return time_generation(cfg, lambda: generate(m, idx, cfg.new_tokens))


def hf_model(conf, dtype, device):
    """The same preset as a transformers model (test/benchmark-only dependency), from the
    config.json our save_model writes: Llama 3's rope scaling, Qwen2's biases, Mistral's window."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = config_to_hf(conf)
    hc = AutoConfig.for_model(**d)
    with torch.device(device):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(hc).to(dtype)


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
    tok_s, peak, first = time_training(cfg, lambda _: pm(input_ids=x, labels=x).loss,
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
    check_choice(cfg, "task", ("train", "generate", "ops", "tokenizer"))
    check_choice(cfg, "quantize", ("", *QUANT_MODES))
    if cfg.adapter not in (*KINDS, "none") or cfg.adapter == "none" and cfg.task == "train":
        raise ConfigError(f"--adapter={cfg.adapter}: expected one of {', '.join(KINDS)}"
                          + (", or none with --task=generate" if cfg.task == "train" else ", none"))
    for key in ("micro_batch", "seq_len", "steps", "batch", "prompt_len", "new_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must be at least 1")
    for key in ("warmup", "n_layer"):  # 0 = none / the preset's
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must be at least 0")
    if cfg.peak_tflops <= 0:
        raise ConfigError(f"--peak_tflops={cfg.peak_tflops}: must be more than 0")
    rows = [] if not cfg.suite or cfg.suite == "all" else cfg.suite.split(",")
    if [r for r in rows if r not in SUITE]:
        raise ConfigError(f"--suite={cfg.suite}: expected all or some of {', '.join(SUITE)}")
    if cfg.lengths and cfg.lengths not in LENGTHS:
        raise ConfigError(f"--lengths={cfg.lengths}: expected one of {', '.join(LENGTHS)}, "
                          "or nothing for rows of seq_len")
    if cfg.pack and not cfg.lengths:
        raise ConfigError("--pack needs --lengths (rows of seq_len tokens have nothing to pack)")
    if cfg.pack and cfg.adapter == "prompt":
        raise ConfigError("--pack with --adapter=prompt: the soft tokens would sit once in front "
                          "of a packed row, seen by its first example only")
    if cfg.vocab_size < 0:
        raise ConfigError(f"--vocab_size={cfg.vocab_size}: expected 0 (the preset's) or more")
    if cfg.fsdp and (cfg.task != "train" or cfg.quantize or cfg.baseline):
        raise ConfigError("--fsdp: training only, without --quantize and --baseline")
    if cfg.tokenizer and cfg.task != "tokenizer":
        raise ConfigError(f"--tokenizer={cfg.tokenizer}: only with --task=tokenizer")
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


# LLM-Adapters' data beside this repository: the tokenizer row's texts when it is there
LLM_ADAPTERS = Path(__file__).resolve().parent.parent / "shared/data/llm-adapters"


def tokenizer_rows(n=10_000, seed=0, root=LLM_ADAPTERS):
    """n texts as train.py tokenizes them (Alpaca prompt + response): the math training rows and
    then the test sets of LLM-Adapters' data when present, else generated rows of the same length
    (about 400 characters of instruction + output). -> (texts, where they are from)"""
    root = Path(root)
    files = [root / "ft-training_set/math_data.json", *sorted(root.glob("dataset/*/test.json"))]
    rows = [r for f in files if f.is_file() for r in json.loads(f.read_text())][:n]
    source = f"rows of {root}"
    if len(rows) < n:
        source = f"generated rows (found {len(rows)} real rows under {root})"
        rng = random.Random(seed)
        words = ("the a of and to apples has each more than total how many left buys sells "
                 "Janet's ducks eggs day dollars per week answer is so we need first then").split()
        rows = [{"instruction": " ".join(rng.choice(words + [str(rng.randint(0, 999))])
                                         for _ in range(rng.randint(15, 60))) + "?",
                 "output": " ".join(rng.choice(words + [f"{rng.randint(0, 99)} * 3 = "])
                                    for _ in range(rng.randint(20, 60)))} for _ in range(n)]
    return ["".join(format_example(r)) for r in rows], source


def bench_tokenizer(cfg):
    """Our BPE against tiktoken on the same tiktoken-format tokenizer.model (Llama 3's unless
    --tokenizer names another) and texts: both printed on stderr, as a row of the suite returned
    (tok/s: tokens encoded per second; load seconds apart)."""
    path = cfg.tokenizer
    if not path:
        try:
            import llama_models  # test-only package that ships Llama 3's tokenizer.model
        except ImportError:
            raise ConfigError("--tokenizer: none given, and llama_models, whose Llama 3 "
                              "tokenizer.model is the default, is not installed "
                              "(pip install -r requirements-dev.txt)") from None
        path = Path(llama_models.__file__).parent / "llama3/tokenizer.model"
    t0 = time.perf_counter()
    try:
        tok = Tokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # a TokenizerError names the file and what was expected
        raise ConfigError(f"--tokenizer: {e}") from None
    t1 = time.perf_counter()
    if not (isinstance(tok, BPETokenizer) and tok.ranks is None):  # ranks None: a tiktoken file
        raise ConfigError(f"--tokenizer={path}: expected a tiktoken-format tokenizer.model "
                          "(Llama 3's), the one file both tokenizers read")
    texts, source = tokenizer_rows()
    print(f"{len(texts)} {source}, mean {sum(map(len, texts)) / len(texts):.0f} characters",
          file=sys.stderr)
    t2 = time.perf_counter()
    ours = [tok.encode(t) for t in texts]
    t3 = time.perf_counter()
    n_tokens = sum(map(len, ours))
    print(f"ours     (pure Python): load {t1 - t0:5.2f} s, encode {t3 - t2:5.2f} s "
          f"({len(texts) / (t3 - t2):,.0f} rows/s; {n_tokens:,} tokens)", file=sys.stderr)
    res = {"task": "tokenizer", "tokenizer": str(path), "rows": len(texts), "source": source,
           "ours": {"tokens": n_tokens, "load_s": round(t1 - t0, 3),
                    "encode_s": round(t3 - t2, 3), "tok_s": round(n_tokens / (t3 - t2))}}
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError:
        print("tiktoken: not installed (pip install tiktoken) - nothing to compare with",
              file=sys.stderr)
        return res
    t0 = time.perf_counter()
    ref = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN,
                            mergeable_ranks=load_tiktoken_bpe(str(path)),
                            special_tokens={t: tok.special[t] for t in LLAMA3_SPECIAL})
    t1 = time.perf_counter()
    theirs = [ref.encode_ordinary(t) for t in texts]
    t2 = time.perf_counter()
    same = ours == theirs
    print(f"tiktoken {tiktoken.__version__:<11}: load {t1 - t0:5.2f} s, encode {t2 - t1:5.2f} s "
          f"({len(texts) / (t2 - t1):,.0f} rows/s); same ids: {same}", file=sys.stderr)
    res["ours"]["compared"] = {f"tiktoken {tiktoken.__version__}": {
        "load_s": round(t1 - t0, 3), "encode_s": round(t2 - t1, 3),
        "tok_s": round(sum(map(len, theirs)) / (t2 - t1))}}
    if not same:  # a speed of other ids means nothing: the row is an error
        res["error"] = "our ids differ from tiktoken's"
    return res


def run(cfg):
    """One row: ours (and with --baseline, HF+PEFT) on one piece of work -> a dict of results."""
    if cfg.task == "ops":
        return {"task": "ops", "adapter": cfg.adapter, "ours": count_ops(cfg)}
    if cfg.task == "tokenizer":
        return bench_tokenizer(cfg)
    device, dtype = device_and_dtype()  # as train.py: bf16 on CUDA (fp16 without bf16), else fp32
    if cfg.fsdp:
        rank, world, device = distributed.init(device)
        if world == 1:
            raise ConfigError("--fsdp: start bench.py with torchrun --nproc_per_node=N (N > 1)")
    device = device.type
    conf, m, dtype = build(cfg, device, dtype)
    fast_fp32_matmuls(device, dtype)  # as train.py: TF32 for fp32 adapter maths beside bf16
    res = {"model": conf.name, "n_layer": conf.n_layer, "task": cfg.task, "adapter": cfg.adapter,
           "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke test)",
           "torch": torch.__version__, "compiled": compile_setting(cfg.compile, device)}
    res["quantize"] = cfg.quantize
    res["ours"] = (bench_train if cfg.task == "train" else bench_generate)(cfg, conf, m, device)
    if cfg.fsdp:  # tokens/s per process above; the processes together
        res["processes"] = dist.get_world_size()
        res["ours"]["tok_s_all"] = res["ours"]["tok_s"] * res["processes"]
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
        rows.append({"key": key, "work": work.format(**vars(cfg)), "target": target, "args": args,
                     "result": run_row(args, settings)})
    table = markdown_table(rows)
    print(table)
    report = {"rows": rows, "table": table}
    write_atomic(cfg.out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {cfg.out}", file=sys.stderr)
    return report


def run_row(args, settings):
    """One row in its own process (its own peak memory); FSDP rows under torchrun, one process per
    GPU, where there are several. -> the row's result."""
    command = [sys.executable, os.path.abspath(__file__), *args]
    if settings.get("fsdp"):
        n = torch.cuda.device_count()
        if n < 2:
            return {"skipped": f"FSDP needs more than one GPU; this machine has {n}"}
        command[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={n}"]
    p = subprocess.run(command, capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"error": (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]}


def markdown_table(rows):
    """The suite's rows as the README's table: ours and HF+PEFT side by side, ratio, first step."""
    def speed(r, label=""):
        if not r or "skipped" in r:
            return "—"
        gib = f", {r['peak_gib']} GiB" if r.get("peak_gib") is not None else ""
        pad = f", {100 * r['padding']:.1f}% padding" if "padding" in r else ""
        if "tok_s" in r:
            return f"{label}{r['tok_s']:,} tok/s{gib}{pad}"
        return f"{label}{r['new_tok_s']:,} new tok/s{gib}"

    lines = ["| work | ours | HF + PEFT | ratio | first step / call (s) | target |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        res = row["result"]
        if "error" in res or "skipped" in res:
            why = f"error: {res['error']}" if "error" in res else f"skipped: {res['skipped']}"
            lines.append(f"| {row['work']} | {why} | | | | {row['target']} |")
            continue
        ours, other, ratio = res["ours"], speed(res.get("hf_peft")), "—"
        if "speedup" in res:
            ratio = f"{res['speedup']}×"
        elif ours.get("compared"):  # packed vs padded: the reference of the same run
            way, ref = next(iter(ours["compared"].items()))
            other, ratio = speed(ref, f"{way}: "), f"{ours['tok_s'] / ref['tok_s']:.2f}×"
        first = ours.get("first_step_s", ours.get("first_call_s", ours.get("load_s")))
        lines.append(f"| {row['work']} | {speed(ours)} | {other} | {ratio} | {first} "
                     f"| {row['target']} |")
    done = [r["result"] for r in rows if "device" in r["result"]]
    device = done[0]["device"] if done else "?"
    versions = sorted({r["torch"] for r in done}) or ["?"]
    memory = "peak allocated" if any(r["device"] != "cpu (smoke test)" for r in done) else \
        "peak resident memory of the row's process"
    return "\n".join(lines) + f"\n\n({device}, torch {', '.join(versions)}; GiB: {memory})"


def main(argv):
    argv = [a if a != "--suite" or argv[i + 1:] and not argv[i + 1].startswith("--")
            else "--suite=all" for i, a in enumerate(argv)]  # a bare --suite: all of it
    try:
        cfg = parse(argv)
        if cfg.suite:
            return run_suite(cfg, argv)
        res = run(cfg)
    except ConfigError as e:
        fail(e)
    if not cfg.fsdp or dist.get_rank() == 0:
        print(json.dumps(res))
    distributed.teardown(dist.get_world_size() if cfg.fsdp else 1, finished=True)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
