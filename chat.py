"""
Ask a base model + adapter a question and watch the answer appear token by token (LLM-Adapters'
generate.py, without the web UI).

    python chat.py --model=<base dir> --adapter_dir=<adapter dir> --prompt="What is 3 + 4 * 2?"
    python chat.py --model=<base dir> --adapter_dir=<adapter dir>  # interactive: a question a line
    python chat.py --prompt="Tom has 3 pens. Then Tom finds 4 more pens. Then Tom loses 2 pens.
                             How many pens does Tom have now?"    # the demo's base + lora
    python chat.py ... --temperature=0.8 --top_k=40               # sampled instead of greedy

The question goes through the adapter's training template (data/template.py: Alpaca's prompt, or
Llama 3's chat turns), so the model sees the kind of prompt it was fine-tuned on. Generation
(generate.py's one decode loop, streamed by its callback) stops on any of the tokenizer's stop
ids; an answer cut by --max_new_tokens (or by the model's context) ends with a note saying so, on
stderr.
"""
import sys

import torch

from cli import DEMO_DIR, ConfigError, configure, device_and_dtype, fail, load_for_tool, template_of
from generate import generate

DEFAULTS = dict(
    model="",             # base model folder; "" = the demo's base (<demo_dir>/base)
    adapter_dir="",       # folder of a trained adapter; "" = the demo's lora, none with --model
    prompt="",            # the instruction; "" = ask interactively
    input="",             # optional context, the template's "### Input:" part
    template="",          # alpaca | llama3-chat; "" = the adapter's, Alpaca for a bare base
    max_new_tokens=256,
    temperature=0.0,      # 0 = greedy
    top_k=0,              # 0 = all tokens (with --temperature > 0)
    seed=1337,
    device="",
    dtype="",
    demo_dir=DEMO_DIR,
)


def answer(model, tok, ids, cfg, out=None):
    """Stream the response to one prompt of token ids to `out` (stdout); return its text. Text is
    written once it decodes to whole characters (a byte-level token can hold half of one)."""
    room = model.config.block_size - len(ids) - model.n_soft_tokens()
    if room < 1:
        fail(f"the prompt is {len(ids)} tokens, the model's context {model.config.block_size}")
    limit, stops = min(cfg.max_new_tokens, room), tok.stop_ids
    new, shown, out = [], "", out or sys.stdout

    def show(token):  # token (1,): called by the decode loop before it computes the next one
        nonlocal shown
        if token.item() in stops:
            return
        new.append(token.item())
        text = tok.decode(new)
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text

    idx = torch.tensor([ids], device=model.embed.weight.device)
    generate(model, idx, limit, cfg.temperature, cfg.top_k or None, stops, callback=show)
    text = tok.decode(new)
    out.write(text[len(shown):] + "\n")
    if len(new) == limit:  # no stop id came: the limit ended the answer
        why = ("max_new_tokens" if limit == cfg.max_new_tokens
               else f"the model's context of {model.config.block_size} tokens is full")
        print(f"[stopped: {why}]", file=sys.stderr)
    return text


def main(argv=None):
    try:
        cfg, _ = configure(sys.argv[1:] if argv is None else argv, DEFAULTS, __doc__)
        device, dtype = device_and_dtype(cfg.device, cfg.dtype)
        if cfg.max_new_tokens < 1 or cfg.temperature < 0 or cfg.top_k < 0:
            raise ConfigError("--max_new_tokens must be at least 1, --temperature and --top_k 0 "
                              "or more")
        model, tok, extra, model_dir, adapter_dir = load_for_tool(cfg, device, dtype)
        template = template_of(extra, adapter_dir, cfg.template)
    except ConfigError as e:
        fail(e)
    torch.manual_seed(cfg.seed)
    loaded = f"{model_dir}" + (f" + {adapter_dir}" if adapter_dir else " (no adapter)")
    if cfg.prompt:  # what answers, on stderr: stdout holds the answer alone
        print(loaded, file=sys.stderr)
        return answer(model, tok, template.encode_prompt(tok, cfg.prompt, cfg.input), cfg)
    print(f"{loaded}: ask a question (an empty line or Ctrl-D ends)", file=sys.stderr)
    while True:
        try:
            question = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not question:
            break
        answer(model, tok, template.encode_prompt(tok, question), cfg)


if __name__ == "__main__":
    main()
