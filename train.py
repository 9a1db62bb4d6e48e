r"""
Fine-tune a LLaMA-family model with an adapter (LoRA, DoRA, IA3, series, parallel, prefix, prompt),
LLM-Adapters' recipe.

    python train.py --adapter=parallel                      # the embedded demo: CPU, no downloads,
                                                            # a few minutes
    python train.py --model=<checkpoint dir> --adapter=lora --data=math_10k.json \
                    --out=out/llama-7b-lora
    torchrun --nproc_per_node=4 train.py --model=...        # DistributedDataParallel, the same code
    python train.py config/x.py --r=16                      # a config file (Python or JSON),
                                                            # then overrides

Every global below is a --key=value setting (type-checked; bools take true/false), and so is every
option of the chosen adapter in adapters.KINDS (--r=16 --target_modules=q_proj,v_proj,
--bottleneck=64 ...).
Without --model, the embedded demo: a tiny LLaMA pretrained by train() on synthetic arithmetic
(data/synthetic.py), cached in <demo_dir>/base/ like any checkpoint, is fine-tuned on a related task
(<demo_dir>/data/), and the run ends with the exact-match accuracy of the frozen base vs
base + adapter on the held-out test split.
--out gets the adapter with the best validation loss
(adapter_model.safetensors + adapter_config.json), resume.pt (for --resume=true) and log.jsonl,
each written to a temporary name and renamed, so never left half-written.
A --out that holds a run is refused unless --resume=true (continue it) or --overwrite=true
(replace it).
"""
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

import adapter_io
import adapters
from data import synthetic
from data.prepare import TRAIN_REQUIRE, DataError, dedupe, load_rows, write_json
from data.template import TEMPLATE_NAME, format_example
from eval import evaluate
from checkpoints import load_model, save_model
from files import check_writable, torch_load, write_atomic
from cli import (DEMO_DIR, DTYPES, ConfigError, check_choice, compile_blocks, compile_setting,
                 configure, device_and_dtype, fail, read_args, settle)
from model import Config, Transformer
from quantize import MODES as QUANT_MODES
from tokenizer import Tokenizer, check_vocab

TORCH_THREADS = torch.get_num_threads()  # torch's default, before setup() applies --threads

# --------------------------------------------------------------------------------------------------
# what to train
model = ""                # checkpoint folder (Hugging Face or Meta layout, with its tokenizer);
                          # "" = the demo
data = ""                 # LLM-Adapters JSON rows: instruction, input (optional), output
out = ""                  # "" = <demo_dir>/<adapter> for the demo,
                          # out/<model folder name>-<adapter> otherwise
adapter = "lora"          # a kind of adapters.KINDS: lora dora ia3 series parallel prefix prompt
resume = False            # continue from <out>/resume.pt,
                          # to the same losses as an uninterrupted run
overwrite = False         # replace the run already in --out (else a used --out is refused)
# LLM-Adapters' recipe
cutoff_len = 256          # examples are cut to this many tokens (then without EOS),
                          # as LLM-Adapters does
train_on_inputs = True    # false: no loss on the prompt (targets -100)
group_by_length = True    # micro-batches of examples of similar length: little padding
batch_size = 16           # examples per optimizer step, in micro-batches (gradient accumulation)
                          # over all processes
micro_batch_size = 4
learning_rate = 3e-4      # AdamW
weight_decay = 0.0
warmup_steps = 100        # linear warmup, then decay to 0 at the last step
decay = "linear"          # linear | cosine
num_epochs = 3
max_steps = 0             # > 0: this many optimizer steps instead (the schedule ends there)
val_set_size = 120        # rows held out for validation;
                          # the adapter is saved whenever validation loss improves
eval_interval = 200       # steps between validations (each also writes resume.pt)
grad_clip = 1.0           # 0 = off
seed = 42
# system
device = ""               # cuda | cpu | mps; "" = cuda if available, else cpu
dtype = ""                # of the frozen base and autocast:
                          # bfloat16 | float16 (+ GradScaler) | float32; "" = bfloat16 on cuda
                          # (float16 where bf16 is unsupported), float32 elsewhere
quantize = ""             # frozen base in int8 | nf4 | nf4-dq (QLoRA 4-bit, + double quant.)
grad_ckpt = False         # recompute activations in backward: less memory, ~30% slower
compile = ""              # compile each block: "" = on for CUDA, off elsewhere; true | false
threads = 0               # CPU threads for torch; 0 = torch's default
log_interval = 10
# the embedded demo (no --model)
demo_dir = DEMO_DIR
demo_n_train = 4000       # two-step training rows (val_set_size of them for validation)
demo_n_test = 200         # held-out two-step problems for the accuracy comparison
demo_base_steps = 900     # pretraining steps of the base
                          # (built once: delete <demo_dir>/base to rebuild)
demo_base_threads = 0     # CPU threads while pretraining it; 0 = measured: 1 or all cores,
                          # whichever is faster now, re-checked every 300 steps (ThreadPicker)
demo_base_docs = 30000    # documents in its pretraining corpus
# --------------------------------------------------------------------------------------------------
# the settings above (lower-case, unlike imported names)
DEFAULTS = {k: v for k, v in globals().items()
            if k.islower() and not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# The smallest allowed value of every numeric setting, checked in one place (check_ranges);
# learning_rate must exceed its 0. The demo base holds out 200 of its documents for validation.
MINIMUM = dict(cutoff_len=2, batch_size=1, micro_batch_size=1, learning_rate=0.0, weight_decay=0.0,
               warmup_steps=0, num_epochs=1, max_steps=0, val_set_size=0, eval_interval=1,
               grad_clip=0.0, seed=0, threads=0, log_interval=1, demo_n_train=1, demo_n_test=1,
               demo_base_steps=1, demo_base_threads=0, demo_base_docs=201)
# The demo fine-tunes a tiny model in ~2 minutes; these replace the recipe's values unless set
# explicitly. One CPU thread: a second one is faster on an idle machine (--threads=2), but several
# times slower when the other core is busy, as every small matrix product then waits for both. The
# base's pretraining (micro-batches of 32, not 4) gains more from a second core, so it measures
# which is faster (ThreadPicker).
# A demo run is remade in a minute, so rerunning it replaces the previous one (overwrite).
DEMO = dict(learning_rate=3e-3, warmup_steps=20, train_on_inputs=False, eval_interval=100,
            threads=1, overwrite=True)
DEMO_LR = {"prefix": 2e-1, "prompt": 1e-1,  # a few thousand parameters, far from the base's weights
           "ia3": 1e-1}  # 2,432 scales: 96.0% at 1e-1, 84.0% at 3e-2
# Pretraining the demo base, by the same train(): whole documents, mixed lengths in every batch.
DEMO_BASE = dict(learning_rate=1.5e-3, warmup_steps=50, decay="cosine", batch_size=32,
                 micro_batch_size=32, train_on_inputs=True, group_by_length=False,
                 eval_interval=500, resume=False)
DEMO_MODEL = dict(n_layer=4, n_head=4, n_embd=128, intermediate_size=352)



def get_config(argv):
    """Defaults <- config files (Python assignments as in nanoGPT, or a JSON object), in order
    <- --key=value, through configurator.py; without --model, the demo's recipe replaces the
    defaults it names. Returns (cfg, adapter options)."""
    if "--help" in argv or "-h" in argv:
        configure(argv, DEFAULTS, __doc__)
    try:
        given = read_args(argv, DEFAULTS)
        kind = given.get("adapter", adapter)
        if kind not in adapters.KINDS:
            raise ConfigError(f"unknown adapter {kind!r}; adapters: {', '.join(adapters.KINDS)}")
        defaults = DEFAULTS if given.get("model") else \
            {**DEFAULTS, **DEMO, "learning_rate": DEMO_LR.get(kind, DEMO["learning_rate"])}
        cfg, options = settle(given, defaults, lambda _: adapters.KINDS[kind].defaults,
                              explain_option)
        check_choice(cfg, "decay", ("linear", "cosine"))
        check_choice(cfg, "dtype", DTYPES)
        check_choice(cfg, "quantize", ("", *QUANT_MODES))
        compile_setting(cfg.compile, "cpu")  # a word it does not know is a ConfigError here
        check_ranges(cfg)
    except ConfigError as e:
        fail(e)
    return cfg, options


def check_ranges(cfg):
    for key, low in MINIMUM.items():
        value = getattr(cfg, key)
        if value < low or key == "learning_rate" and value == low:
            bound = "more than" if key == "learning_rate" else "at least"
            raise ConfigError(f"--{key}={value}: expected {bound} {low}")


def explain_option(key, given):
    """The error for an option of another adapter kind than the chosen one."""
    kind = given.get("adapter", adapter)
    owners = [k for k, entry in adapters.KINDS.items() if key in entry.defaults]
    return owners and (f"--{key} does not apply to --adapter={kind} "
                       f"(it is an option of {', '.join(owners)}); "
                       f"{kind} options: {', '.join(adapters.KINDS[kind].defaults)}")


def setup(cfg):
    """Device, dtype, autocast context and DDP (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    try:
        device, dt = device_and_dtype(cfg.device, cfg.dtype)
    except ConfigError as e:
        fail(e)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
            torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = nullcontext() if dt == torch.float32 else torch.autocast(device.type, dtype=dt)
    adapters.fast_fp32_matmuls(device, dt)
    return SimpleNamespace(device=device, dtype=dt, ctx=ctx, rank=rank, world=world,
                           master=rank == 0)


def log(rt, out, record, text):
    if rt.master:
        print(text, flush=True)
        if out and record:
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------------
# data: rows -> examples (input ids, targets) -> micro-batches


def tokenize(tok, rows, cfg):
    """LLM-Adapters' examples: [BOS] prompt + response EOS, cut at cutoff_len (so without EOS); the
    targets are the ids shifted by one (nanoGPT style), -100 on the prompt when train_on_inputs is
    false. Returns (examples, number cut, number dropped): a row left without any target (its prompt
    fills cutoff_len) is dropped."""
    examples, n_cut, n_dropped = [], 0, 0
    for row in rows:
        prompt, response = format_example(row)
        ids = tok.encode(prompt + response, bos=tok.add_bos, eos=True)
        n_cut += len(ids) > cfg.cutoff_len
        ids = ids[:cfg.cutoff_len]
        targets = ids[1:]
        if not cfg.train_on_inputs:
            n_prompt = len(tok.encode(prompt, bos=tok.add_bos))
            targets = [-100] * (n_prompt - 1) + targets[n_prompt - 1:]
        if all(t == -100 for t in targets):
            n_dropped += 1
        else:
            examples.append((ids[:-1], targets[:len(ids) - 1]))
    return examples, n_cut, n_dropped


def epoch_plan(examples, cfg, epoch, rt):
    """This process's optimizer steps of one epoch, each a list of micro-batches (lists of example
    indices): a pure function of (seed, epoch), so a resumed run gets the same batches.
    group_by_length sorts by length within groups of 50 micro-batches (as Hugging Face's), then
    shuffles the micro-batches so that a step still mixes lengths. The list is padded to a multiple
    of the world size by repeating its start (DistributedSampler's rule) and dealt round-robin to
    the processes."""
    g = torch.Generator().manual_seed(cfg.seed + epoch)
    order, mb = torch.randperm(len(examples), generator=g).tolist(), cfg.micro_batch_size
    if cfg.group_by_length:
        order = [i for s in range(0, len(order), 50 * mb)
                 for i in sorted(order[s:s + 50 * mb], key=lambda i: len(examples[i][0]))]
    micro = [order[s:s + mb] for s in range(0, len(order), mb)]
    if cfg.group_by_length:
        micro = [micro[i] for i in torch.randperm(len(micro), generator=g).tolist()]
    micro = (micro + micro[:-len(micro) % rt.world])[rt.rank::rt.world]
    accum = cfg.batch_size // (mb * rt.world)
    return [micro[s:s + accum] for s in range(0, len(micro), accum)]


def collate(examples, idx, device):
    """Right-padded (x, y): padding is id 0 with target -100, and causal attention hides it from the
    real tokens."""
    T = max(len(examples[i][0]) for i in idx)
    x, y = (torch.zeros(len(idx), T, dtype=torch.long),
            torch.full((len(idx), T), -100, dtype=torch.long))
    for r, i in enumerate(idx):
        ids, targets = examples[i]
        x[r, :len(ids)], y[r, :len(targets)] = torch.tensor(ids), torch.tensor(targets)
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------------------------------
# the one training loop, for the demo base's pretraining and for every adapter


def get_lr(step, total, cfg):
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.learning_rate * (1 - progress if cfg.decay == "linear"
                                else 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def val_loss(model, examples, cfg, rt):
    """Mean loss per target token over the validation examples, sharded over the processes."""
    model.eval()
    order, mb = (sorted(range(len(examples)), key=lambda i: len(examples[i][0])),
                 cfg.micro_batch_size)
    total = torch.zeros(2, device=rt.device)
    for s in range(rt.rank * mb, len(order), rt.world * mb):
        x, y = collate(examples, order[s:s + mb], rt.device)
        with rt.ctx:
            loss = model(x, y)[1]
        total += torch.stack([loss.float() * (y != -100).sum(), (y != -100).sum().float()])
    if rt.world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def train(model, train_ex, val_ex, cfg, rt, out=None, save=None, before_step=None):
    """Train the model's trainable parameters: AdamW, warmup then linear/cosine decay, gradient
    accumulation and clipping, autocast (+ GradScaler with float16), DDP. Every eval_interval steps
    and at the end: validation, save() on rank 0 if it improved, and with `out` an atomic resume
    checkpoint out/resume.pt. A non-finite loss stops the run before anything of its step is applied
    or written. before_step(step) runs before each step (sparse adapters pick their part there).
    Returns a summary dict."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            # one kernel for all parameters on a GPU
                            fused=rt.device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    compiled = compile_setting(cfg.compile, rt.device)
    fwd = compile_blocks(model) if compiled else model
    if rt.world > 1:  # sparse adapters (before_step) leave the parts not picked at a step unused
        # buffers never change in training (a quantized base lives in them): no broadcast per step
        fwd = DDP(fwd, device_ids=[rt.device] if rt.device.type == "cuda" else None,
                  find_unused_parameters=before_step is not None, broadcast_buffers=False)
    steps_per_epoch = len(epoch_plan(train_ex, cfg, 0, rt))
    total = cfg.max_steps or cfg.num_epochs * steps_per_epoch
    path = out and os.path.join(out, "resume.pt")
    step, best, saved_at, loss = 0, math.inf, None, None
    if cfg.resume:
        step, best = load_state(path, model, named, opt, scaler, cfg, rt)
        saved_at = step
    elif out and rt.master:
        open(os.path.join(out, "log.jsonl"), "w").close()
    model.train()
    t0, start, plan, tokens = time.time(), step, (None, None), 0
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        if plan[0] != epoch:
            plan = (epoch, epoch_plan(train_ex, cfg, epoch, rt))
        if before_step is not None:
            before_step(step)
        lr = get_lr(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, n = forward_backward(fwd, scaler, train_ex, plan[1][i], rt)
        tokens += n
        if not math.isfinite(loss):
            stop(f"loss is {loss} at step {step + 1} (lr {lr:.2e})", out, saved_at)
        optimizer_step(opt, scaler, params, cfg)
        step += 1
        if compiled and step == start + 1:
            log(rt, None, None, f"first step {time.time() - t0:.1f}s (compiling included)")
        if step % cfg.log_interval == 0 or step in (start + 1, total):
            log_progress(rt, out, step, start, total, loss, lr, tokens, time.time() - t0)
        if step % cfg.eval_interval == 0 or step == total:
            best = validate(fwd, val_ex, cfg, rt, out, step, best, saved_at, save)
            if path:
                save_state(path, model, named, opt, scaler, step, best, cfg, rt)
                saved_at = step
    return dict(steps=step, loss=loss, best_val=best if val_ex else None, time_s=time.time() - t0)


def forward_backward(fwd, scaler, examples, micro, rt):
    """One optimizer step's micro-batches, forward and backward; DDP all-reduces the gradients
    once, after the last one. Returns (the step's loss averaged over the processes, tokens seen
    by all of them)."""
    stats = torch.zeros(2, device=rt.device)  # this step's loss, tokens
    for k, idx in enumerate(micro):
        x, y = collate(examples, idx, rt.device)
        if rt.world > 1:
            fwd.require_backward_grad_sync = k == len(micro) - 1
        with rt.ctx:
            loss = fwd(x, y)[1] / len(micro)
        scaler.scale(loss).backward()
        n = sum(len(examples[j][0]) for j in idx)
        stats += torch.stack([loss.detach().float(), torch.tensor(float(n), device=rt.device)])
    if rt.world > 1:
        dist.all_reduce(stats)
        stats[0] /= rt.world
    return stats[0].item(), int(stats[1].item())


def optimizer_step(opt, scaler, params, cfg):
    if cfg.grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def log_progress(rt, out, step, start, total, loss, lr, tokens, dt):
    eta, mem = round(dt / (step - start) * (total - step)), 0
    if rt.device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(rt.device) / 2**20
    log(rt, out, dict(step=step, loss=loss, lr=lr, tok_s=round(tokens / dt), eta_s=eta,
                      mem_mb=round(mem), time_s=round(dt, 1)),
        f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {tokens / dt:.0f} tok/s | eta "
        f"{eta // 60}m{eta % 60:02d}s" + (f" | peak mem {mem:.0f} MiB" if mem else ""))


def validate(fwd, val_ex, cfg, rt, out, step, best, saved_at, save):
    """Validation loss; save() on rank 0 when it improved (always, without validation rows).
    Returns the best loss so far."""
    val = val_loss(fwd, val_ex, cfg, rt) if val_ex else None
    if val is not None and not math.isfinite(val):
        stop(f"validation loss is {val} at step {step}", out, saved_at)
    improved = val is None or val < best
    best = val if improved and val is not None else best
    if improved and save is not None and rt.master:
        save()
    if val is not None:
        log(rt, out, dict(step=step, val_loss=val), f"step {step}: val loss {val:.4f} " +
            ("(best" + (", saved)" if save else ")") if improved else f"(best {best:.4f})"))
    return best


def stop(what, out, saved_at):
    fail(f"{what}: stopped before writing anything of this step. Last good checkpoint: "
         + (f"{out} (step {saved_at})" if saved_at is not None else "none written yet"))


# what a resumed run must share with the one it continues (the adapter's options are compared too)
RESUME_KEYS = ("model", "data", "adapter", "batch_size", "micro_batch_size", "learning_rate",
               "warmup_steps", "decay", "num_epochs", "max_steps", "seed", "cutoff_len",
               "train_on_inputs", "val_set_size")


def save_state(path, model, named, opt, scaler, step, best, cfg, rt):
    """resume.pt: trainable weights, optimizer, GradScaler, step (the schedule is a function of it)
    and every process's RNG state, with the settings a resumed run must share. Temporary file, then
    renamed."""
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if rt.device.type == "cuda" else None}
    rngs = [rng] * rt.world
    if rt.world > 1:
        dist.all_gather_object(rngs, rng)
    if rt.master:
        config = {k: getattr(cfg, k) for k in RESUME_KEYS}
        state = dict(step=step, best_val=best, trainable={n: p.detach().cpu() for n, p in named},
                     rng=rngs, optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                     config=config, options=adapter_options(model))
        write_atomic(path, lambda f: torch.save(state, f))


def load_state(path, model, named, opt, scaler, cfg, rt):
    """save_state's mirror: restore everything it wrote, after checking that this run continues
    that one. Returns (step, best validation loss)."""
    if not os.path.exists(path):
        fail(f"--resume: no checkpoint {path}")
    try:
        state = torch_load(path, map_location=rt.device, mmap=False)
    except ValueError as e:
        fail(f"--resume: {e}")
    keys = {"step", "trainable", "config", "rng", "optimizer"}
    if not isinstance(state, dict) or not keys <= state.keys():
        fail(f"--resume: {path} is not a resume checkpoint written by train.py")
    now = {**{k: getattr(cfg, k) for k in state["config"]}, **(adapter_options(model) or {})}
    for key, was in {**state["config"], **(state.get("options") or {})}.items():
        if now.get(key) != was:
            fail(f"--resume: --{key}={now.get(key)!r} differs from the checkpoint's {was!r}")
    if sorted(state["trainable"]) != sorted(n for n, _ in named):
        fail(f"--resume: {path} holds other trainable parameters than this adapter's")
    with torch.no_grad():
        for n, p in named:
            if state["trainable"][n].shape != p.shape:
                fail(f"--resume: {path} holds {n} of shape {tuple(state['trainable'][n].shape)}, "
                     f"this adapter's is {tuple(p.shape)}: its options differ from that run's")
            p.copy_(state["trainable"][n])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"][rt.rank if len(state["rng"]) == rt.world else 0]
    torch.set_rng_state(rng["cpu"].cpu())
    if rng["cuda"] is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu())
    log(rt, None, None, f"resumed from {path} at step {state['step']}")
    return state["step"], state["best_val"]


def adapter_options(model):
    """The options of the adapter being trained (None while pretraining the demo base)."""
    return model.adapter_configs.get("default", {}).get("options")


# --------------------------------------------------------------------------------------------------
# the embedded demo


def build_demo_base(path, cfg, rt):
    """The demo's base model, built in path.tmp and renamed when complete: a sentencepiece tokenizer
    trained on the synthetic corpus, and a tiny LLaMA pretrained on it by train(); config.json,
    model.safetensors, tokenizer.model."""
    t0, tmp = time.time(), path + ".tmp"
    docs = synthetic.pretrain_corpus(cfg.demo_base_docs, seed=cfg.seed)
    log(rt, None, None, f"1/3 building the demo base model in {path} (once): a tokenizer, then "
                        f"pretraining on {len(docs)} synthetic arithmetic documents")
    if rt.master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        synthetic.train_tokenizer(docs, os.path.join(tmp, "tokenizer"))
    if rt.world > 1:
        dist.barrier()
    tok = Tokenizer.from_pretrained(tmp)
    torch.manual_seed(cfg.seed)
    base = Transformer(Config("demo-base", vocab_size=tok.vocab_size, block_size=cfg.cutoff_len,
                              **DEMO_MODEL))
    examples = [(ids[:-1], ids[1:]) for ids in (tok.encode(d, bos=True, eos=True) for d in docs)]
    pcfg = SimpleNamespace(**{**vars(cfg), **DEMO_BASE, "max_steps": cfg.demo_base_steps})
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.demo_base_threads or TORCH_THREADS)
    measure = not cfg.demo_base_threads and TORCH_THREADS > 1
    try:
        summary = train(base.to(rt.device), examples[200:], examples[:200], pcfg, rt,
                        before_step=ThreadPicker(TORCH_THREADS) if measure else None)
    finally:
        torch.set_num_threads(threads)
    if rt.master:
        save_model(base, tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if rt.world > 1:
        dist.barrier()
    log(rt, None, None,
        f"demo base model: {sum(p.numel() for p in base.parameters()):,} parameters, "
        f"pretrained {summary['steps']} steps in {summary['time_s']:.0f}s, "
        f"val loss {summary['best_val']:.3f}; built in {time.time() - t0:.0f}s")


class ThreadPicker:
    """before_step for the base's pretraining: every `every` steps, time `probe` steps on one thread
    and `probe` on n, then keep the faster (median step) until the next check. On an idle 2-core
    machine two threads are faster, but when another job holds a core every small matmul waits for
    the slower thread: with one core busy, 100 steps took 47 s on one thread, over 11 min on two.
    So a probe on n threads stops at its first step that takes over twice the slowest on one."""

    def __init__(self, n, every=300, probe=3):
        self.n, self.every, self.probe = n, every, probe
        self.times, self.last, self.probing = {1: [], n: []}, None, False

    def __call__(self, step):
        now, phase = time.perf_counter(), step % self.every
        if self.probing and phase > 0:  # the step that just ended was a probe
            self.times[torch.get_num_threads()].append(now - self.last)
        self.probing = self.probing or phase == 0
        thrash = self.times[self.n] and self.times[self.n][-1] > 2 * max(self.times[1])
        if self.probing and (phase == 2 * self.probe or thrash):
            self.pick(step)
        elif self.probing:
            torch.set_num_threads(1 if phase < self.probe else self.n)
        self.last = time.perf_counter()

    def pick(self, step):
        median = {n: sorted(t)[len(t) // 2] for n, t in self.times.items()}
        torch.set_num_threads(min(median, key=median.get))
        ms = {n: f"{1e3 * t:.0f} ms" for n, t in median.items()}
        print(f"step {step}: {torch.get_num_threads()} thread(s) from here (a step took {ms[1]} on "
              f"1 thread, {ms[self.n]} on {self.n})", flush=True)
        self.times, self.probing = {1: [], self.n: []}, False


# rough times of the demo's parts on an idle 2-core CPU (README), for the plan printed up front
DEMO_ETA_S = dict(base=75, finetune=80, score=15)


def demo_plan(cfg, base_cached):
    """The demo's three steps and the time they take, printed before anything runs."""
    eta = sum(DEMO_ETA_S.values()) - (DEMO_ETA_S["base"] if base_cached else 0)
    base = f": cached in {cfg.model}, skipped" if base_cached else f", ~{DEMO_ETA_S['base']} s"
    return (f"the embedded demo, in 3 steps (about {eta / 60:.1f} min on an idle 2-core CPU, up to "
            f"twice that on a busy one):\n"
            f"  1/3 build the tiny base model once (tokenizer + {cfg.demo_base_steps} pretraining "
            f"steps){base}\n"
            f"  2/3 fine-tune a {cfg.adapter} adapter on two-step problems, the base frozen, "
            f"~{DEMO_ETA_S['finetune']} s\n"
            f"  3/3 score the base and base + {cfg.adapter} on {cfg.demo_n_test} held-out "
            f"problems, ~{DEMO_ETA_S['score']} s")


def on_llama_7b(kind, options):
    """(trainable, total) of the same adapter on LLaMA-7B, counted on the meta device."""
    with torch.device("meta"):
        big = Transformer(Config.from_name("llama-7b"))
        return adapters.count_parameters(adapters.add_adapter(big, kind, **options))


def explain_trainable(kind, options, trainable, total):
    """Why "% trainable" looks large here: an adapter grows with n_embd, the base with n_embd^2."""
    here = f"  % trainable = adapter parameters / all parameters: {100 * trainable / total:.2f}%"
    try:
        big, big_total = on_llama_7b(kind, options)
    except (RuntimeError, NotImplementedError, ValueError):  # a kind that must see real weights
        return here
    return (f"{here} of this {total / 1e6:.1f}M toy, but the same {kind} on LLaMA-7B trains "
            f"{big:,} of {big_total:,} ({100 * big / big_total:.2f}%): the base grows faster than "
            "the adapter")


def accuracy(model, tok, rows, rt):
    """Exact match of the greedy answers to the template prompts, generated and scored as eval.py
    does."""
    with rt.ctx:
        return evaluate(model.eval(), tok, rows, "demo", answer_type="number", max_new_tokens=40,
                        batch_size=50, progress=rt.master)[1]


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg, options = get_config(sys.argv[1:] if argv is None else argv)
    rt = setup(cfg)
    try:
        demo = not cfg.model
        test_rows = prepare_demo(cfg, rt) if demo else None
        check_paths(cfg)
        check_out(cfg, demo, rt)
        base, tok = load_base(cfg, rt)
        train_ex, val_ex = prepare_data(cfg, tok, rt)
        model, save = attach_adapter(base, cfg, options, demo, rt, len(train_ex), len(val_ex))
        summary = run_training(model, train_ex, val_ex, cfg, rt, save)
        finish_run(model, summary, cfg, rt, save)
        if demo and rt.master:
            compare_on_demo(tok, test_rows, cfg, rt)
    except BaseException:
        teardown(rt, finished=False)
        raise
    teardown(rt, finished=True)
    return model, summary


def prepare_demo(cfg, rt):
    """The demo's base (built once) and data; points --model and --data at them. Returns the test
    rows."""
    if cfg.data:
        fail("--data needs --model (the demo writes its own data)")
    data = os.path.join(cfg.demo_dir, "data")
    cfg.model, cfg.data = os.path.join(cfg.demo_dir, "base"), os.path.join(data, "train.json")
    cached = os.path.exists(os.path.join(cfg.model, "config.json"))
    log(rt, None, None, demo_plan(cfg, cached))
    if not cached:
        build_demo_base(cfg.model, cfg, rt)
    train_rows, test_rows = synthetic.finetune_split(cfg.demo_n_train, cfg.demo_n_test,
                                                     seed=cfg.seed)
    if rt.master:
        write_json(os.path.join(data, "train.json"), train_rows)
        write_json(os.path.join(data, "test.json"), test_rows)
    if rt.world > 1:
        dist.barrier()
    return test_rows


def check_paths(cfg):
    if not os.path.isdir(cfg.model):
        fail(f"--model={cfg.model}: no such folder")
    if not cfg.data:
        fail("--data is required with --model (a JSON file of instruction/input/output rows)")
    if not os.path.isfile(cfg.data):
        fail(f"--data={cfg.data}: no such file")


# what a run leaves in --out
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "resume.pt", "log.jsonl")


def check_out(cfg, demo, rt):
    """--out (default: <demo_dir>/<adapter>, or out/<model>-<adapter>) must take files, and a folder
    holding an earlier run is only continued (--resume) or replaced when asked to (--overwrite):
    no run is lost by mistake."""
    name = os.path.basename(os.path.normpath(cfg.model))
    cfg.out = cfg.out or (os.path.join(cfg.demo_dir, cfg.adapter) if demo else
                          os.path.join("out", f"{name}-{cfg.adapter}"))
    try:
        check_writable(cfg.out, "--out")
    except ValueError as e:
        fail(e)
    if cfg.resume and cfg.overwrite and not demo:  # the demo's default is overwrite=True
        fail("--resume=true continues the run in --out, --overwrite=true replaces it: give one")
    earlier = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out, f))]
    if earlier and not cfg.resume and not cfg.overwrite:
        fail(f"--out={cfg.out} holds an earlier run ({', '.join(earlier)}): continue it with "
             "--resume=true, replace it with --overwrite=true, or give another --out")
    if rt.world > 1:  # every process has looked before rank 0 clears the folder
        dist.barrier()
    if earlier and not cfg.resume and rt.master:  # replaced: none of the earlier run is kept
        for f in earlier:
            os.remove(os.path.join(cfg.out, f))


def load_base(cfg, rt):
    try:
        base = load_model(cfg.model, rt.device, rt.dtype, cfg.quantize)
        tok = Tokenizer.from_pretrained(cfg.model)
        check_vocab(tok, base.config.vocab_size, cfg.model)
    except (OSError, ValueError, KeyError) as e:
        why = e.args[0] if isinstance(e, KeyError) else e
        fail(f"--model={cfg.model}: cannot load the checkpoint: {why}")
    if cfg.cutoff_len > base.config.block_size:
        fail(f"--cutoff_len={cfg.cutoff_len} exceeds the model's context of "
             f"{base.config.block_size} tokens")
    if cfg.batch_size % (cfg.micro_batch_size * rt.world):
        fail(f"--batch_size={cfg.batch_size} is not a multiple of --micro_batch_size="
             f"{cfg.micro_batch_size} x {rt.world} processes")
    return base, tok


def prepare_data(cfg, tok, rt):
    """--data -> (training, validation) examples: rows validated, exact duplicates dropped (so that
    no validation row is also trained on), a seeded split, tokenized."""
    try:
        rows = load_rows(cfg.data, TRAIN_REQUIRE)
    except (DataError, OSError) as e:
        fail(e)
    rows, n_dup = dedupe(rows)
    if n_dup:
        log(rt, None, None, f"{cfg.data}: dropped {n_dup} duplicate rows (same instruction, input "
                            "and output)")
    if len(rows) <= cfg.val_set_size:
        fail(f"{cfg.data}: {len(rows)} rows" + (" without duplicates" if n_dup else "") +
             f", not more than --val_set_size={cfg.val_set_size}")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = cfg.val_set_size
    train_ex, n_cut, n_dropped = tokenize(tok, [rows[i] for i in perm[n_val:]], cfg)
    val_ex = tokenize(tok, [rows[i] for i in perm[:n_val]], cfg)[0]
    if n_cut or n_dropped:
        log(rt, None, None, f"{n_cut} training rows cut at --cutoff_len={cfg.cutoff_len} tokens, "
                            f"{n_dropped} dropped (nothing left to learn)")
    if not train_ex:
        fail(f"{cfg.data}: no training example left")
    return train_ex, val_ex


def attach_adapter(base, cfg, options, demo, rt, n_train, n_val):
    """The adapter on the frozen base, and the save() that writes it with what eval.py needs to
    score it."""
    torch.manual_seed(cfg.seed)
    try:
        model = adapters.add_adapter(base, cfg.adapter, **options)
    except ValueError as e:
        fail(e)
    model.grad_checkpoint = cfg.grad_ckpt
    trainable, total = adapters.count_parameters(model)
    log(rt, None, None, f"{cfg.adapter} adapter on {cfg.model}: {trainable:,} trainable of "
                        f"{total:,} parameters ({100 * trainable / total:.2f}%); {n_train} "
                        f"training, {n_val} validation rows")
    if demo:
        log(rt, None, None, explain_trainable(cfg.adapter, options, trainable, total))
        log(rt, None, None, f"2/3 fine-tuning: loss per step, validation loss every "
                            f"{cfg.eval_interval} steps (the best is kept)")
    extra = dict(template=TEMPLATE_NAME, data=cfg.data)
    if demo:
        extra.update(dataset=os.path.join(cfg.demo_dir, "data", "test.json"), answer_type="number")

    def save():
        adapter_io.save_adapter(model, cfg.out, base_model=cfg.model, extra=extra)
    return model, save


def run_training(model, train_ex, val_ex, cfg, rt, save):
    """train() into --out, with one clear line for running out of memory or of disk."""
    sparse = model.adapter_configs["default"]["options"].get("sparse")
    before_step = (lambda step: adapters.sparse_step(model, step)) if sparse else None
    try:
        return train(model, train_ex, val_ex, cfg, rt, out=cfg.out, save=save,
                     before_step=before_step)
    except torch.cuda.OutOfMemoryError:
        fail(f"out of memory on {rt.device} with --micro_batch_size={cfg.micro_batch_size} and "
             f"--cutoff_len={cfg.cutoff_len}: lower --micro_batch_size (--batch_size stays, by "
             "more accumulation steps), or try --grad_ckpt=true, --dtype=bfloat16 or a shorter "
             f"--cutoff_len. Checkpoints in {cfg.out} are intact")
    except OSError as e:
        fail(f"--out={cfg.out}: writing failed ({e}); every file there is whole, from the last "
             "checkpoint")


def finish_run(model, summary, cfg, rt, save):
    """Sparse (MoSA) and reparameterised prefix adapters train in a form folded into a plain adapter
    at the end: the best one, saved in training form (also by a run this one resumed). Then the
    summary line."""
    trainable, total = adapters.count_parameters(model)  # as trained
    if adapters.in_training_form(model) and rt.master:
        best = os.path.join(cfg.out, "adapter_model.safetensors")
        adapter_io.fill_adapter(model, "default", load_file(best), best)
        adapters.finish_adapters(model)
        save()
    best = summary["best_val"]
    log(rt, cfg.out, dict(summary=summary, trainable=trainable, total=total),
        f"done: {summary['steps']} steps in {summary['time_s']:.0f}s, {trainable:,} trainable "
        f"parameters ({100 * trainable / total:.2f}%), best val loss {best and round(best, 4)}; "
        f"adapter in {cfg.out}")


def compare_on_demo(tok, test_rows, cfg, rt):
    """The demo's last step: exact match of the frozen base vs base + the adapter just saved."""
    print(f"3/3 scoring the base, then base + {cfg.adapter}, on {len(test_rows)} held-out "
          "problems", flush=True)
    def base():
        return load_model(cfg.model, rt.device, rt.dtype, cfg.quantize)
    base_acc = accuracy(base(), tok, test_rows, rt)
    tuned = adapter_io.load_adapter(base(), cfg.out)
    acc = accuracy(tuned, tok, test_rows, rt)
    log(rt, cfg.out, dict(base_acc=base_acc, adapter_acc=acc),
        f"exact match on {len(test_rows)} held-out two-step problems: base "
        f"{100 * base_acc:.1f}% -> {cfg.adapter} {100 * acc:.1f}% "
        f"({100 * (acc - base_acc):+.1f} points)")
    print("next: python chat.py --prompt=\"...\" (ask it), python plot.py (pictures of every "
          "run), python eval.py (all adapters in one table), python inspect_adapter.py (what it "
          "learned)")


def teardown(rt, finished):
    """End DDP on every path. After a finished run, first wait for every process (rank 0 may still
    be writing files): a process that exits while another still holds the process group can die
    with SIGABRT ("terminate called without an active exception") in gloo's teardown. After an
    error, no waiting: the other processes may never get there."""
    if rt.world > 1 and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
