"""
The embedded CPU demo: `python train.py` without --model (or `python demo.py`), no downloads.

    python train.py                          # LoRA; --adapter=parallel, series, prefix, ... too

No weights can be downloaded, so the demo carries its own base: a sentencepiece tokenizer and a tiny
LLaMA (MODEL) pretrained on synthetic arithmetic (data/synthetic.py) by train.py's own loop, cached
in <demo_dir>/base/ like any checkpoint. It then writes a related task, two-step problems in
LLM-Adapters' rows (<demo_dir>/data/), runs train.py's recipe on it (train.finetune) with RECIPE's
settings in place of the defaults not given, and ends with the exact-match accuracy of the frozen
base vs base + adapter on the held-out test split.

The same numbers on every CPU, whatever its load or core count: the base is pretrained on one
thread, and the fine-tune runs on one by RECIPE (threads=1). On two threads some of torch's float
reductions add their terms in another order, which changes the base's weights in their last bits,
and 900 steps later its validation loss and the adapters' scores.

Its own settings (SETTINGS: --demo_dir, --demo_n_test, ...) go on train.py's command line with
the others; with --model they are unknown settings, since they would change nothing.

Arrows: demo.py imports train.py (get_config, check_ranges, Run, finetune, log) and
distributed.py (session); train.py names this file only in its main(), to hand over a command line
without --model.
"""
import os
import shutil
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

import adapter_io
import adapters
import distributed
import train
from checkpoints import load_model, save_model
from cli import DEMO_DIR, ConfigError, fail
from data import synthetic
from data.prepare import write_json
from eval import evaluate
from model import Transformer
from presets import Config
from tokenizer import Tokenizer

# the demo's settings, beside train.py's (python train.py --demo_n_test=50)
SETTINGS = dict(
    demo_dir=DEMO_DIR,    # its base/, data/ and one folder per adapter
    demo_n_train=4000,    # two-step training rows (val_set_size of them for validation)
    demo_n_test=200,      # held-out two-step problems for the accuracy comparison
    demo_base_steps=900,  # pretraining steps of the base, on one CPU thread so that its weights
                          # are the same on every machine (built once: delete <demo_dir>/base)
    demo_base_docs=30000,  # documents in its pretraining corpus
)
# their smallest values (train.check_ranges); the base holds out 200 of its documents for validation
MINIMUM = dict(demo_n_train=1, demo_n_test=1, demo_base_steps=1, demo_base_docs=201)
# The demo fine-tunes a tiny model in ~2 minutes; these replace train.py's defaults unless set
# explicitly. One CPU thread: the same numbers everywhere (above), and on a busy 2-core machine two
# threads are several times slower, as every small matrix product then waits for the slower one.
# A demo run is remade in a minute, so rerunning it replaces the previous one (overwrite).
RECIPE = dict(learning_rate=3e-3, warmup_steps=20, train_on_inputs=False, eval_interval=100,
              threads=1, overwrite=True)
LR = {"prefix": 2e-1, "prompt": 1e-1,  # a few thousand parameters, far from the base's weights
      "ia3": 1e-1}  # 2,432 scales: 96.0% at 1e-1, 84.0% at 3e-2
# Pretraining the base, by the same Run.fit: whole documents, mixed lengths in every batch.
BASE_RECIPE = dict(learning_rate=1.5e-3, warmup_steps=50, decay="cosine", batch_size=32,
                   micro_batch_size=32, train_on_inputs=True, group_by_length=False,
                   eval_interval=500, resume=False)
MODEL = dict(n_layer=4, n_head=4, n_embd=128, intermediate_size=352)
# rough times of the demo's parts on an idle 2-core CPU (README), for the plan printed up front
ETA_S = dict(base=120, finetune=80, score=15)


def recipe(kind):
    """train.py's defaults that the demo replaces, for an adapter of this kind."""
    return {**RECIPE, "learning_rate": LR.get(kind, RECIPE["learning_rate"])}


def get_config(argv):
    """train.get_config with the demo's settings and recipe -> (cfg, adapter options)."""
    cfg, options = train.get_config(argv, recipe, SETTINGS)
    try:
        train.check_ranges(cfg, MINIMUM)
    except ConfigError as e:
        fail(e)
    return cfg, options


def main(argv=None):
    """The demo's three steps: the base (built once), the fine-tune, the score."""
    cfg, options = get_config(sys.argv[1:] if argv is None else argv)
    if cfg.model:
        fail(f"--model={cfg.model}: the demo builds its own base (train.py takes --model)")
    if cfg.data:
        fail("--data needs --model (the demo writes its own data)")
    data = os.path.join(cfg.demo_dir, "data")
    cfg.model, cfg.data = os.path.join(cfg.demo_dir, "base"), os.path.join(data, "train.json")
    cfg.out = cfg.out or os.path.join(cfg.demo_dir, cfg.adapter)
    cfg.overwrite = cfg.overwrite and not cfg.resume  # RECIPE's overwrite gives way to --resume
    with distributed.session(cfg.device, cfg.dtype, cfg.threads) as rt:
        cached = os.path.exists(os.path.join(cfg.model, "config.json"))
        say(rt, plan(cfg, cached))
        if not cached:
            build_base(cfg.model, cfg, rt)
        train_rows, test_rows = synthetic.finetune_split(cfg.demo_n_train, cfg.demo_n_test,
                                                         seed=cfg.seed)
        if rt.master:
            write_json(os.path.join(data, "train.json"), train_rows)
            write_json(os.path.join(data, "test.json"), test_rows)
        if rt.world > 1:
            dist.barrier()
        say(rt, f"2/3 fine-tuning: loss per step, validation loss every {cfg.eval_interval} steps "
                "(the best is kept)")
        model, summary = train.finetune(cfg, options, rt, extra=dict(
            dataset=os.path.join(data, "test.json"), answer_type="number"))
        say(rt, explain_trainable(cfg.adapter, options, *adapters.count_parameters(model)))
        if rt.master:
            compare(cfg, rt, test_rows)
    return model, summary


def say(rt, text):
    if rt.master:
        print(text, flush=True)


def build_base(path, cfg, rt):
    """The demo's base model, built in path.tmp and renamed when complete: a sentencepiece tokenizer
    trained on the synthetic corpus, and a tiny LLaMA pretrained on it by train.Run; config.json,
    model.safetensors, tokenizer.model."""
    t0, tmp = time.time(), path + ".tmp"
    docs = synthetic.pretrain_corpus(cfg.demo_base_docs, seed=cfg.seed)
    say(rt, f"1/3 building the demo base model in {path} (once): a tokenizer, then pretraining on "
            f"{len(docs)} synthetic arithmetic documents")
    if rt.master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        synthetic.train_tokenizer(docs, os.path.join(tmp, "tokenizer"))
    if rt.world > 1:
        dist.barrier()
    tok = Tokenizer.from_pretrained(tmp)
    torch.manual_seed(cfg.seed)
    base = Transformer(Config("demo-base", vocab_size=tok.vocab_size, block_size=cfg.cutoff_len,
                              **MODEL))
    examples = [(ids[:-1], ids[1:]) for ids in (tok.encode(d, bos=True, eos=True) for d in docs)]
    pcfg = SimpleNamespace(**{**vars(cfg), **BASE_RECIPE, "max_steps": cfg.demo_base_steps})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine (module docstring)
    try:
        summary = train.Run(base.to(rt.device), examples[200:], examples[:200], pcfg, rt).fit()
    finally:
        torch.set_num_threads(threads)
    if rt.master:
        save_model(base, tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if rt.world > 1:
        dist.barrier()
    say(rt, f"demo base model: {sum(p.numel() for p in base.parameters()):,} parameters, "
            f"pretrained {summary['steps']} steps in {summary['time_s']:.0f}s, "
            f"val loss {summary['best_val']:.3f}; built in {time.time() - t0:.0f}s")


def plan(cfg, base_cached):
    """The demo's three steps and the time they take, printed before anything runs."""
    eta = sum(ETA_S.values()) - (ETA_S["base"] if base_cached else 0)
    base = f": cached in {cfg.model}, skipped" if base_cached else f", ~{ETA_S['base']} s"
    return (f"the embedded demo, in 3 steps (about {eta / 60:.1f} min on an idle 2-core CPU, up to "
            f"twice that on a busy one):\n"
            f"  1/3 build the tiny base model once (tokenizer + {cfg.demo_base_steps} pretraining "
            f"steps on one thread){base}\n"
            f"  2/3 fine-tune a {cfg.adapter} adapter on two-step problems, the base frozen, "
            f"~{ETA_S['finetune']} s\n"
            f"  3/3 score the base and base + {cfg.adapter} on {cfg.demo_n_test} held-out "
            f"problems, ~{ETA_S['score']} s")


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


def compare(cfg, rt, test_rows):
    """The demo's last step: exact match of the frozen base vs base + the adapter just saved."""
    print(f"3/3 scoring the base, then base + {cfg.adapter}, on {len(test_rows)} held-out "
          "problems", flush=True)

    def base():
        return load_model(cfg.model, rt.device, rt.dtype, cfg.quantize)
    tok = Tokenizer.from_pretrained(cfg.model)
    base_acc = accuracy(base(), tok, test_rows, rt)
    acc = accuracy(adapter_io.load_adapter(base(), cfg.out), tok, test_rows, rt)
    train.log(rt, cfg.out, dict(base_acc=base_acc, adapter_acc=acc),
              f"exact match on {len(test_rows)} held-out two-step problems: base "
              f"{100 * base_acc:.1f}% -> {cfg.adapter} {100 * acc:.1f}% "
              f"({100 * (acc - base_acc):+.1f} points)")
    print("next: python chat.py --prompt=\"...\" (ask it), python plot.py (pictures of every "
          "run), python eval.py (all adapters in one table), python inspect_adapter.py (what it "
          "learned)")


if __name__ == "__main__":
    main()
