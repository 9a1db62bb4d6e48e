r"""
Fine-tune a LLaMA-family model with an adapter, LLM-Adapters' recipe. Read top to bottom: the
settings, the data (rows -> examples -> micro-batches: data/examples.py), Run (one run's state)
with Run.fit (the loop), then main() and the steps around the loop.

    python train.py --model=<checkpoint dir> --adapter=lora --data=math_10k.json --out=out/x
    python train.py config/math10k_lora.py --model=<dir>     # a run as a file (config/), overrides
    torchrun --nproc_per_node=4 train.py --model=...         # DistributedDataParallel, same code
    torchrun --nproc_per_node=8 train.py --model=... --fsdp=true   # the base sharded (FSDP2);
                                                  # several machines: distributed.py's docstring
    python train.py --adapter=parallel                       # no --model: the CPU demo (demo.py)

Every global below is a --key=value setting, and so is every option of the chosen adapter kind in
adapters.KINDS (--r=16 --target_modules=q_proj,v_proj --bottleneck=64 ...); config files (Python
assignments as in nanoGPT, or a JSON object) come first. --out gets the adapter with the best
validation loss (adapter_model.safetensors + adapter_config.json), resume.pt and log.jsonl, each
written to a temporary name and renamed; a --out that holds a run is refused unless --resume=true
(continue it) or --overwrite=true (replace it, once the new run has loaded its inputs), and so is
a --out another run is writing to (its lock file, <out>/.lock): run_files.py.
Arrows: demo.py imports this file; this file names demo.py only in main(), to hand it a command
line without --model (the demo's own settings, --demo_*, are demo.py's).
"""
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

import adapter_io
import adapters
import distributed
from checkpoints import load_model
from cli import (DTYPES, ConfigError, check_choice, check_threads, compile_blocks, compile_setting,
                 configure, fail, read_args, reason, settle)
from data.examples import deal, micro_batches, tokenize
from data.pack import collate_packed, collate_padded
from data.prepare import TRAIN_REQUIRE, DataError, dedupe, load_rows
from data.template import TEMPLATES
from files import append_jsonl
from loss import LOSS_CHUNK_LOGITS
from mosa import sparse_step
from quantize import MODES as QUANT_MODES
from run_files import (RESUME_KEYS, claim_out, clear_earlier_run, read_state, restore_rng,
                       rng_states, write_state)
from tokenizer import Tokenizer, check_vocab

# --------------------------------------------------------------------------------------------------
# what to train
model = ""                # checkpoint folder (HF or Meta layout, + tokenizer); "" = the demo
data = ""                 # LLM-Adapters JSON rows: instruction, input (optional), output
out = ""                  # "" = out/<model folder name>-<adapter> (the demo: <demo_dir>/<adapter>)
adapter = "lora"          # a kind of adapters.KINDS: lora dora ia3 series parallel prefix prompt
resume = False            # continue from <out>/resume.pt, to an uninterrupted run's losses
overwrite = False         # replace the run already in --out (else a used --out is refused)
# LLM-Adapters' recipe
template = "alpaca"       # prompt format (data/template.py): alpaca | llama3-chat (instruct models)
cutoff_len = 256          # examples are cut to this many tokens (then without EOS)
train_on_inputs = True    # false: no loss on the prompt (targets -100)
group_by_length = True    # micro-batches of examples of similar length: little padding
batch_size = 16           # examples per optimizer step over all processes, in micro-batches
micro_batch_size = 4
learning_rate = 3e-4      # AdamW
weight_decay = 0.0
warmup_steps = 100        # linear warmup, then decay to 0 at the last step
decay = "linear"          # linear | cosine
num_epochs = 3
max_steps = 0             # > 0: this many optimizer steps instead (the schedule ends there)
val_set_size = 120        # rows held out; the adapter is saved whenever their loss improves
eval_interval = 200       # steps between validations (each also writes resume.pt)
grad_clip = 1.0           # 0 = off
seed = 42
# system
device = ""               # cuda | cpu | mps; "" = cuda if available, else cpu
dtype = ""                # of the frozen base and autocast: bfloat16 | float16 (+ GradScaler)
                          # | float32; "" = bfloat16 on cuda (else float16), float32 elsewhere
quantize = ""             # frozen base in int8 | nf4 | nf4-dq (QLoRA 4-bit, + double quant.)
grad_ckpt = False         # recompute activations in backward: less memory, ~30% slower
compile = ""              # compile each block: "" = on for CUDA, off elsewhere; true | false
pack = False              # a micro-batch's examples side by side in one row, no padding
                          # (data/pack.py); the same losses. Not with --adapter=prompt
chunked_loss = True       # the loss from chunks of logits, never all of them (model.py)
fsdp = False              # under torchrun: the frozen base sharded over the processes (FSDP2,
                          # distributed.py), not whole on each (DDP)
threads = 0               # CPU threads for torch; 0 = torch's default
log_interval = 10
# --------------------------------------------------------------------------------------------------
# the settings above (lower-case, unlike imported names)
DEFAULTS = {k: v for k, v in globals().items()
            if k.islower() and not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# The smallest allowed value of every numeric setting, checked in one place (check_ranges);
# learning_rate must exceed its 0.
MINIMUM = dict(cutoff_len=2, batch_size=1, micro_batch_size=1, learning_rate=0.0, weight_decay=0.0,
               warmup_steps=0, num_epochs=1, max_steps=0, val_set_size=0, eval_interval=1,
               grad_clip=0.0, seed=0, threads=0, log_interval=1)


def get_config(argv, recipe=None, more=None):
    """Defaults <- config files <- --key=value (cli.py) -> (cfg, adapter options). The demo's, from
    demo.py: more, {key: default} of settings beyond these; recipe(kind), {setting: value} in place
    of the defaults."""
    defaults = {**DEFAULTS, **(more or {})}
    if "--help" in argv or "-h" in argv:
        configure(argv, defaults, __doc__)
    try:
        given = read_args(argv, defaults)
        kind = given.get("adapter", adapter)
        if kind not in adapters.KINDS:
            raise ConfigError(f"unknown adapter {kind!r}; adapters: {', '.join(adapters.KINDS)}")
        cfg, options = settle(given, {**defaults, **(recipe(kind) if recipe else {})},
                              lambda _: adapters.KINDS[kind].defaults, explain_option)
        try:  # typed like the kind's defaults, as in an adapter_config.json (--dropout=abc)
            adapter_io.check_options(kind, options)
        except ValueError as e:
            raise ConfigError(f"--{e}") from None
        check_choice(cfg, "decay", ("linear", "cosine"))
        check_choice(cfg, "template", tuple(TEMPLATES))
        check_choice(cfg, "dtype", DTYPES)
        check_choice(cfg, "quantize", ("", *QUANT_MODES))
        compile_setting(cfg.compile, "cpu")  # a word it does not know is a ConfigError here
        check_ranges(cfg)
        check_threads("threads", cfg.threads)
        check_scale(cfg)
    except ConfigError as e:
        fail(e)
    return cfg, options


def check_ranges(cfg, minimum=MINIMUM):
    for key, low in minimum.items():
        value = getattr(cfg, key)
        if value < low or key == "learning_rate" and value == low:
            bound = "more than" if key == "learning_rate" else "at least"
            raise ConfigError(f"--{key}={value}: expected {bound} {low}")


def check_scale(cfg):
    """--pack and --fsdp where they cannot run: refused by name."""
    if cfg.pack and cfg.adapter == "prompt":
        raise ConfigError("--pack=true with --adapter=prompt: the soft tokens would sit once in "
                          "front of a packed row, seen by its first example only")
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        raise ConfigError("--fsdp=true shards the base over the processes torchrun starts: run "
                          "torchrun --nproc_per_node=N train.py ... (N > 1)")
    if cfg.fsdp and cfg.quantize:
        raise ConfigError(f"--quantize={cfg.quantize} with --fsdp=true: a quantized base keeps its "
                          "packed weights in buffers, which FSDP does not shard; give one or the "
                          "other")


def explain_option(key, given):
    """The error for an option of another adapter kind than the chosen one."""
    kind = given.get("adapter", adapter)
    owners = [k for k, entry in adapters.KINDS.items() if key in entry.defaults]
    return owners and (f"--{key} does not apply to --adapter={kind} "
                       f"(it is an option of {', '.join(owners)}); "
                       f"{kind} options: {', '.join(adapters.KINDS[kind].defaults)}")


def log(rt, out, record, text):
    """Print text (first process only), and append record to <out>/log.jsonl (plot.py reads it)."""
    if rt.master:
        print(text, flush=True)
        if out and record:
            append_jsonl(os.path.join(out, "log.jsonl"), record)


# --------------------------------------------------------------------------------------------------
# data: rows -> examples (input ids, targets) -> micro-batches (data/examples.py)


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

    def examples(rows):  # -> (examples, number cut, number dropped)
        return tokenize(tok, rows, cfg.template, cfg.cutoff_len, cfg.train_on_inputs)
    train_ex, n_cut, n_dropped = examples([rows[i] for i in perm[n_val:]])
    val_ex = examples([rows[i] for i in perm[:n_val]])[0]
    if n_cut or n_dropped:
        log(rt, None, None, f"{n_cut} training rows cut at --cutoff_len={cfg.cutoff_len} tokens, "
                            f"{n_dropped} dropped (nothing left to learn)")
    if not train_ex:
        fail(f"{cfg.data}: no training example left")
    return train_ex, val_ex


# --------------------------------------------------------------------------------------------------
# the run: its state on one object, and the loop


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
    # as many passes on every process: under FSDP each one gathers weights from all of them
    end = -(-len(order) // (rt.world * mb)) * rt.world * mb
    for s in range(rt.rank * mb, end, rt.world * mb):
        idx = order[s:s + mb]
        x, y = collate_padded(examples, idx or order[:1], rt.device)  # none left: a pass counting 0
        with rt.ctx:
            loss = model(x, y)[1]
        if idx:
            total += torch.stack([loss.float() * (y != -100).sum(), (y != -100).sum().float()])
    if rt.world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def wrap(model, cfg, rt, unused):
    """The module the loop calls: the loss in chunks (--chunked_loss), each block compiled
    (--compile), then DDP across processes unless FSDP shards it already. unused: some trainable
    parameters get no gradient at a step, which DDP must be told (it then searches the autograd
    graph after every forward, so only then)."""
    model.loss_chunk = LOSS_CHUNK_LOGITS // model.config.vocab_size if cfg.chunked_loss else 0
    fwd = compile_blocks(model) if compile_setting(cfg.compile, rt.device) else model
    if rt.world > 1 and not distributed.is_sharded(model):
        # buffers never change in training (a quantized base lives in them): no broadcast per step
        fwd = DDP(fwd, device_ids=[rt.device] if rt.device.type == "cuda" else None,
                  find_unused_parameters=unused, broadcast_buffers=False)
    return fwd


class Run:
    """One training run's state: settings, model and the module the loop calls (compiled, DDP),
    AdamW, GradScaler (float16), step, best validation loss, and the folder it writes (out: the
    adapter whenever validation improves, with `extra` in its config, resume.pt, log.jsonl; None:
    nothing). fit() is the loop, for every adapter and for the demo's base."""

    def __init__(self, model, train_ex, val_ex, cfg, rt, out=None, extra=None):
        self.model, self.train_ex, self.val_ex, self.cfg, self.rt = model, train_ex, val_ex, cfg, rt
        self.out, self.extra = out, extra
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.learning_rate,
                                     weight_decay=cfg.weight_decay,
                                     fused=rt.device.type == "cuda" or None)  # one kernel on a GPU
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
        # a sparse (MoSA) adapter trains one part of each split weight a step, the rest get no grad
        self.sparse = bool((adapter_options(model) or {}).get("sparse"))
        self.fwd = wrap(model, cfg, rt, unused=self.sparse)
        self.sharded = distributed.is_sharded(model)  # FSDP: the base split over the processes
        self.steps_per_epoch = len(self.epoch_plan(0))
        self.total = cfg.max_steps or cfg.num_epochs * self.steps_per_epoch
        self.step, self.best, self.saved_at = 0, math.inf, None  # saved_at: step of resume.pt

    def epoch_plan(self, epoch):
        """This process's optimizer steps of one epoch, each a list of micro-batches (lists of
        example indices): a pure function of (seed, epoch), so a resumed run gets the same
        batches; grouped by length with --group_by_length, dealt to the processes."""
        cfg, rt = self.cfg, self.rt
        lengths = [len(ids) for ids, _ in self.train_ex]
        micro = micro_batches(lengths, cfg.micro_batch_size, cfg.seed + epoch, cfg.group_by_length)
        return deal(micro, cfg.batch_size // (cfg.micro_batch_size * rt.world), rt.rank, rt.world)

    def fit(self):
        """Train to self.total steps (from resume.pt with --resume). Returns a summary dict."""
        cfg, rt = self.cfg, self.rt
        if cfg.resume:
            self.load_state()
        self.model.train()
        t0, start, tokens, epoch, loss = time.time(), self.step, 0, None, None
        while self.step < self.total:
            # an epoch's batches are a function of (seed, epoch): a resumed run gets the same ones
            e, i = divmod(self.step, self.steps_per_epoch)
            if e != epoch:
                epoch, batches = e, self.epoch_plan(e)
            micro = batches[i]  # this step's micro-batches, lists of example indices
            if self.sparse:  # pick the part of each split weight that trains at this step
                sparse_step(self.model, self.step)
            lr = get_lr(self.step, self.total, cfg)
            for group in self.opt.param_groups:
                group["lr"] = lr
            # forward and backward of each micro-batch: the gradients add up in .grad
            # this step's loss, summed on the device, and its tokens, counted on the host: no
            # copy to the device per micro-batch
            step_loss, n_tokens = torch.zeros((), device=rt.device), 0
            for k, idx in enumerate(micro):
                if cfg.pack:  # (1, T): the examples side by side, positions restarting at each
                    x, y, pos = collate_packed(self.train_ex, idx, rt.device)
                else:
                    (x, y), pos = collate_padded(self.train_ex, idx, rt.device), None  # (B, T)
                if isinstance(self.fwd, DDP):
                    # DDP all-reduces the gradients during backward: only needed once the last
                    # micro-batch has added its share, so the others skip it (what no_sync does)
                    self.fwd.require_backward_grad_sync = k == len(micro) - 1
                with rt.ctx:
                    _, loss = self.fwd(x, y, positions=pos)  # mean over targets not -100
                    loss = loss / len(micro)  # the step's loss: the mean over its micro-batches
                # under float16 the loss is scaled up first, so that small gradients do not
                # underflow to zero (GradScaler; a no-op in other dtypes)
                self.scaler.scale(loss).backward()
                step_loss += loss.detach().float()
                n_tokens += sum(len(self.train_ex[j][0]) for j in idx)
            stats = torch.stack([step_loss, torch.tensor(float(n_tokens), device=rt.device)])
            if self.sharded:  # the adapter is whole on every process: average its gradients
                distributed.average_gradients(self.params, rt.world)
            if rt.world > 1:  # every process logs, and stops, on the same numbers
                dist.all_reduce(stats)
            loss, tokens = stats[0].item() / rt.world, tokens + int(stats[1].item())
            if not math.isfinite(loss):  # before the update: the last checkpoint stays good
                self.stop(f"loss is {loss} at step {self.step + 1} (lr {lr:.2e})")
            if cfg.grad_clip:
                self.scaler.unscale_(self.opt)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.scaler.step(self.opt)  # skipped when float16 gradients overflowed
            self.scaler.update()
            # set_to_none: the memory is freed until the next backward, and a part of a sparse
            # adapter that gets no gradient is left alone by AdamW
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            dt = time.time() - t0
            if self.step == start + 1 and compile_setting(cfg.compile, rt.device):
                log(rt, None, None, f"first step {dt:.1f}s (compiling included)")
            if self.step % cfg.log_interval == 0 or self.step in (start + 1, self.total):
                eta = round(dt / (self.step - start) * (self.total - self.step))
                mem = (torch.cuda.max_memory_allocated(rt.device) / 2**20
                       if rt.device.type == "cuda" else 0)
                log(rt, self.out, dict(step=self.step, loss=loss, lr=lr, tok_s=round(tokens / dt),
                                       eta_s=eta, mem_mb=round(mem), time_s=round(dt, 1)),
                    f"step {self.step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"{tokens / dt:.0f} tok/s | eta {eta // 60}m{eta % 60:02d}s"
                    + (f" | peak mem {mem:.0f} MiB" if mem else ""))
            if self.step % cfg.eval_interval == 0 or self.step == self.total:
                self.validate()
                self.save_state()
        return dict(steps=self.step, loss=loss, best_val=self.best if self.val_ex else None,
                    time_s=time.time() - t0)

    def validate(self):
        """Validation loss; the adapter saved by rank 0 when it improved (always, without validation
        rows)."""
        val = val_loss(self.fwd, self.val_ex, self.cfg, self.rt) if self.val_ex else None
        if val is not None and not math.isfinite(val):
            self.stop(f"validation loss is {val} at step {self.step}")
        improved = val is None or val < self.best
        self.best = val if improved and val is not None else self.best
        if improved and self.out and self.rt.master:
            self.save()
        if val is not None:
            saved = "(best" + (", saved)" if self.out else ")")
            log(self.rt, self.out, dict(step=self.step, val_loss=val),
                f"step {self.step}: val loss {val:.4f} "
                + (saved if improved else f"(best {self.best:.4f})"))

    def save(self):
        """The adapter into out, with what eval.py needs to score it (extra: template, data...)."""
        adapter_io.save_adapter(self.model, self.out, base_model=self.cfg.model, extra=self.extra)

    def stop(self, what):
        fail(f"{what}: stopped before writing anything of this step. Last good checkpoint: "
             + (f"{self.out} (step {self.saved_at})" if self.saved_at is not None
                else "none written yet"))

    def save_state(self):
        """<out>/resume.pt (run_files.py): trainable weights, optimizer, GradScaler, step (the
        schedule is a function of it) and every process's RNG state, with the settings a resumed
        run must share."""
        if not self.out:
            return
        rngs = rng_states(self.rt.device, self.rt.world)  # every process takes part
        if self.rt.master:
            write_state(self.out, dict(
                step=self.step, best_val=self.best, rng=rngs,
                trainable={n: p.detach().cpu() for n, p in self.named},
                optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(),
                config={k: getattr(self.cfg, k) for k in RESUME_KEYS},
                options=adapter_options(self.model)))
        self.saved_at = self.step

    def load_state(self):
        """save_state's mirror: restore everything it wrote, once run_files.read_state has
        checked that this run continues that one."""
        rt = self.rt
        now = {**vars(self.cfg), **(adapter_options(self.model) or {})}
        state = read_state(self.out, rt.device, now, {n: p.shape for n, p in self.named})
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(state["trainable"][n])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], rt.rank, rt.world, rt.device)
        log(rt, None, None, f"resumed from {os.path.join(self.out, 'resume.pt')} at step "
                            f"{state['step']}")
        self.step, self.best, self.saved_at = state["step"], state["best_val"], state["step"]

    def finish(self, summary):
        """After fit: sparse (MoSA) and reparameterised prefix adapters train in a form folded into
        a plain adapter at the end: the best one, saved in training form (also by a run this one
        resumed), folded and saved again. Then the summary line."""
        trainable, total = adapters.count_parameters(self.model)  # as trained
        if adapters.in_training_form(self.model) and self.rt.master:
            best = os.path.join(self.out, "adapter_model.safetensors")
            adapter_io.fill_adapter(self.model, "default", load_file(best), best)
            adapters.finish_adapters(self.model)
            self.save()
        best = summary["best_val"]
        log(self.rt, self.out, dict(summary=summary, trainable=trainable, total=total),
            f"done: {summary['steps']} steps in {summary['time_s']:.0f}s, {trainable:,} trainable "
            f"parameters ({100 * trainable / total:.2f}%), best val loss "
            f"{best and round(best, 4)}; adapter in {self.out}")


def adapter_options(model):
    """The options of the adapter being trained (None while pretraining the demo base)."""
    return model.adapter_configs.get("default", {}).get("options")


# --------------------------------------------------------------------------------------------------
# the steps around the loop


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not names_a_model(argv):  # the embedded demo: its own base and data, this recipe, a score
        import demo  # demo.py imports this file: named here only, where the run is handed over
        return demo.main(argv)
    cfg, options = get_config(argv)
    with distributed.session(cfg.device, cfg.dtype, cfg.threads) as rt:
        return finetune(cfg, options, rt)


def names_a_model(argv):
    """Whether argv (its config files included) gives a --model, read before the settings are
    checked: a run without one is the demo's, which has settings of its own (--demo_n_test=...)."""
    try:
        return bool(read_args([a for a in argv if a not in ("--help", "-h")], DEFAULTS)
                    .get("model"))
    except ConfigError as e:
        fail(e)


def finetune(cfg, options, rt, extra=None):
    """The recipe on --model and --data into --out: the adapter on the frozen base, trained by
    Run.fit, saved with what eval.py needs to score it (+ extra: more of it, from the demo).
    Returns (model, summary)."""
    check_inputs(cfg)
    name = os.path.basename(os.path.normpath(cfg.model))
    cfg.out = cfg.out or os.path.join("out", f"{name}-{cfg.adapter}")
    # held to the end: a second run into this --out is refused
    with claim_out(cfg.out, cfg.overwrite, cfg.resume, rt.master) as earlier:
        base, tok = load_base(cfg, rt)
        train_ex, val_ex = prepare_data(cfg, tok, rt)
        model = attach_adapter(base, cfg, options)
        trainable, total = adapters.count_parameters(model)
        log(rt, None, None, f"{cfg.adapter} adapter on {cfg.model}: {trainable:,} trainable of "
                            f"{total:,} parameters ({100 * trainable / total:.2f}%); "
                            f"{len(train_ex)} training, {len(val_ex)} validation rows")
        # only now that the new run has all it needs
        clear_earlier_run(cfg.out, earlier, cfg.resume, rt.world, rt.master)
        run = Run(model, train_ex, val_ex, cfg, rt, out=cfg.out,
                  extra=dict(template=cfg.template, data=cfg.data, **(extra or {})))
        try:
            summary = run.fit()
        except torch.cuda.OutOfMemoryError:
            fail(f"out of memory on {rt.device} with --micro_batch_size={cfg.micro_batch_size} "
                 f"and --cutoff_len={cfg.cutoff_len}: lower --micro_batch_size (--batch_size "
                 "stays, by more accumulation steps), or try --grad_ckpt=true, --dtype=bfloat16 "
                 f"or a shorter --cutoff_len. Checkpoints in {cfg.out} are intact")
        except OSError as e:
            fail(f"--out={cfg.out}: writing failed ({e}); every file there is whole, from the "
                 "last checkpoint")
        run.finish(summary)
        return model, summary


def check_inputs(cfg):
    if not os.path.isdir(cfg.model):
        fail(f"--model={cfg.model}: no such folder")
    if not cfg.data:
        fail("--data is required with --model (a JSON file of instruction/input/output rows)")
    if not os.path.isfile(cfg.data):
        fail(f"--data={cfg.data}: no such file")
    if cfg.resume and cfg.overwrite:
        fail("--resume=true continues the run in --out, --overwrite=true replaces it: give one")


def load_base(cfg, rt):
    try:
        load = distributed.load_sharded if cfg.fsdp else load_model
        base = load(cfg.model, rt.device, rt.dtype, cfg.quantize)
        tok = Tokenizer.from_pretrained(cfg.model)
        check_vocab(tok, base.config.vocab_size, cfg.model)
    except (OSError, ValueError, KeyError) as e:
        fail(f"--model={cfg.model}: cannot load the checkpoint: {reason(e)}")
    if cfg.cutoff_len > base.config.block_size:
        fail(f"--cutoff_len={cfg.cutoff_len} exceeds the model's context of "
             f"{base.config.block_size} tokens")
    if cfg.batch_size % (cfg.micro_batch_size * rt.world):
        fail(f"--batch_size={cfg.batch_size} is not a multiple of --micro_batch_size="
             f"{cfg.micro_batch_size} x {rt.world} processes")
    return base, tok


def attach_adapter(base, cfg, options):
    """The adapter on the frozen base (seeded: the same initial weights on every process)."""
    torch.manual_seed(cfg.seed)
    try:
        add = distributed.add_adapter if cfg.fsdp else adapters.add_adapter
        model = add(base, cfg.adapter, **options)
    except ValueError as e:
        fail(e)
    model.grad_checkpoint = cfg.grad_ckpt
    return model


if __name__ == "__main__":
    main()
