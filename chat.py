"""
Ask a base model + adapter a question and watch the answer appear token by token (LLM-Adapters'
generate.py, without the web UI).

    python chat.py --model=<base dir> --adapter=<adapter dir> --prompt="What is 3 + 4 * 2?"
    python chat.py --model=<base dir> --adapter=<adapter dir>     # interactive: a question a line
    python chat.py --prompt="Tom has 3 pens. Then Tom finds 4 more pens. How many pens does Tom
                             have now?"                           # the demo's base + lora
    python chat.py ... --temperature=0.8 --top_k=40               # sampled instead of greedy

The question goes through the adapter's training template (data/template.py, the Alpaca prompt), so
the model sees the kind of prompt it was fine-tuned on; generation stops at EOS or --max_new_tokens.
"""
import os
import sys

import torch

from cli import DEMO_DIR, ConfigError, configure, device_and_dtype, fail
from eval import TEMPLATES, load
from model import sample

DEFAULTS = dict(
    model="",             # base model folder; "" = the demo's base (<demo_dir>/base)
    adapter="",           # adapter folder; "" = none with --model, else the demo's lora
    prompt="",            # the instruction; "" = ask interactively
    input="",             # optional context, the template's "### Input:" part
    max_new_tokens=256,
    temperature=0.0,      # 0 = greedy
    top_k=0,              # 0 = all tokens (with --temperature > 0)
    seed=1337,
    device="",
    dtype="",
    demo_dir=DEMO_DIR,
)



@torch.no_grad()
def stream(model, ids, max_new_tokens, temperature=0.0, top_k=None, eos_id=None):
    """Yield the ids that follow the prompt `ids` one at a time, as they are chosen, up to EOS (not
    yielded): model.generate's loop (KV cache, `sample`) for one row, as a generator."""
    n_soft = model.prompt.n_tokens if model.prompt is not None else 0
    cache = model.new_cache(1, len(ids) + max_new_tokens + n_soft)
    idx = torch.tensor([ids], device=model.embed.weight.device)
    logits, _ = model(idx, cache=cache, last_only=True)
    for _ in range(max_new_tokens):
        nxt = sample(logits[:, -1], temperature, top_k)
        if nxt.item() == eos_id:
            return
        yield nxt.item()
        logits, _ = model(nxt[:, None], cache=cache, last_only=True)


def answer(model, tok, prompt, cfg, out=None):
    """Stream the response to one prompt to `out` (stdout); return its text. Text is written once
    it decodes to whole characters (a byte-level token can hold half of one)."""
    ids = tok.encode(prompt, bos=getattr(tok, "add_bos", True))
    n_soft = model.prompt.n_tokens if model.prompt is not None else 0
    room = model.config.block_size - len(ids) - n_soft
    if room < 1:
        fail(f"the prompt is {len(ids)} tokens, the model's context {model.config.block_size}")
    new, shown, out = [], "", out or sys.stdout
    steps = stream(model, ids, min(cfg.max_new_tokens, room), cfg.temperature, cfg.top_k or None,
                   tok.eos_id)
    for t in steps:
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tok.decode(new)
    out.write(text[len(shown):] + "\n")
    return text


def load_for_tool(cfg, fail, device="cpu", dtype=None, need_adapter=False):
    """A tool's --model and --adapter (chat, export, inspect_adapter) -> (model, tok, extra,
    model_dir, adapter_dir), through eval.load. Without --model: the demo's base and its lora. A
    missing folder or a checkpoint that does not load ends the run with one line, by fail()."""
    model_dir = cfg.model or os.path.join(cfg.demo_dir, "base")
    adapter_dir = cfg.adapter or ("" if cfg.model else os.path.join(cfg.demo_dir, "lora"))
    if need_adapter and not adapter_dir:
        fail("--adapter is required with --model: the adapter folder")
    hint = "" if cfg.model else " (run `python train.py` first)"
    for flag, path in (("model", model_dir), ("adapter", adapter_dir)):
        if path and not os.path.isdir(path):
            fail(f"--{flag}={path}: no such folder{hint}")
    try:
        return (*load(model_dir, adapter_dir, device, dtype), model_dir, adapter_dir)
    except (OSError, ValueError, KeyError) as e:
        fail(e.args[0] if isinstance(e, KeyError) and e.args else e)


def main(argv=None):
    try:
        cfg, _ = configure(sys.argv[1:] if argv is None else argv, DEFAULTS, __doc__)
        device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    except ConfigError as e:
        fail(e)
    if cfg.max_new_tokens < 1 or cfg.temperature < 0 or cfg.top_k < 0:
        fail("--max_new_tokens must be at least 1, --temperature and --top_k 0 or more")
    model, tok, extra, model_dir, adapter_dir = load_for_tool(cfg, fail, device, dtype)
    template = TEMPLATES.get(extra.get("template", "alpaca"))
    if template is None:
        fail(f"{adapter_dir}: unknown prompt template {extra['template']!r}; known: "
             f"{', '.join(TEMPLATES)}")
    torch.manual_seed(cfg.seed)
    if cfg.prompt:
        return answer(model, tok, template(cfg.prompt, cfg.input), cfg)
    print(f"{model_dir}" + (f" + {adapter_dir}" if adapter_dir else "") + ": ask a question "
          "(an empty line or Ctrl-D ends)", file=sys.stderr)
    while True:
        try:
            question = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not question:
            break
        answer(model, tok, template(question, ""), cfg)


if __name__ == "__main__":
    main()
