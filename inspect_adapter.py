"""
Look inside a model: the attention weights of one example, and what an adapter learned.

    python inspect_adapter.py --model=<base> --adapter_dir=<adapter> [--prompt=...] [--layer=-1]
    python inspect_adapter.py              # the demo: out/demo/base + lora, a held-out problem

Prints a table of the adapter, a row per place: LoRA's update dW = scale * B A as its Frobenius
norm and as a fraction of norm(W) (how far each projection moved); a gated prefix's gate; a
bottleneck's down/up norms; for kinds it does not know, each parameter's norm. Writes (to --out,
default the adapter folder) adapter.svg, that table as layer x place heatmaps with a colour scale,
and attention.svg, one layer's attention weights for the prompt, a heatmap per head.

Attention weights: the model's attention is fused (scaled_dot_product_attention never forms the
weights), so they are recomputed from each layer's own inputs, caught by a forward pre-hook: q, k, v
from the layer's `qkv` (adapters on q/k/v included), rotary positions, then
softmax(q k^T / sqrt(d) + mask). Prefix keys are left out: with a prefix adapter these are the
weights over the real tokens only.
"""
import math
import os
import sys
from xml.sax.saxutils import escape

import torch
import torch.nn.functional as F

import adapters
from cli import DEMO_DIR, ConfigError, configure, fail, load_for_tool, template_of
from data.prepare import TEST_REQUIRE, load_rows
from files import check_writable, write_atomic
from model import Attention, apply_rope
from slots import slots
from svg import svg, tag

DEFAULTS = dict(
    model="",             # base model folder; "" = the demo's base
    adapter_dir="",       # folder of a trained adapter; "" = the demo's lora, none with --model
    prompt="",            # the instruction whose attention is drawn; "" = a demo test problem
    layer=-1,             # which layer's attention to draw (negative: from the top)
    out="",               # "" = the adapter folder (or out/inspect for a base alone)
    demo_dir=DEMO_DIR,
)


# ------------------------------------------------------------------------------ attention weights
def unfused_attention(attn, x, rope, mask):
    """One Attention's weights (B, H, T, S) and values (B, H, S, D), as its fused SDPA call uses
    (without a KV cache): weights @ values is that call's output."""
    q, k, v = attn.qkv(x)
    if rope is not None:
        q, k = (apply_rope(t, *rope, attn.c.rope_interleaved) for t in (q, k))
    groups = attn.c.n_head // attn.c.n_kv_head  # grouped-query attention: a k/v head per group
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    T, S = scores.shape[-2:]
    if mask is None:  # the model passes None for plain causal attention
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:  # ALiBi: a float bias, -inf where masked
        scores = scores + mask
    return F.softmax(scores.float(), dim=-1).to(v.dtype), v


@torch.no_grad()
def attention_weights(model, idx, attention_mask=None):
    """Run the model on idx (B, T); per layer (weights (B, H, T, T), values (B, H, T, D))."""
    captured = []

    def grab(attn, args):  # Attention.forward(x, rope, mask, cache): keep its inputs
        captured.append((attn, args[0], args[1], args[2]))
    hooks = [m.register_forward_pre_hook(grab) for m in model.modules() if isinstance(m, Attention)]
    try:
        model(idx, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return [unfused_attention(attn, x, rope, mask) for attn, x, rope, mask in captured]


# ---------------------------------------------------------------------- what an adapter learned
def adapter_summary(model):
    """Rows (layer, place, quantity, value) for every adapter module on the model's hook slots."""
    rows = []
    for owner_name, attr, slot in slots(model):
        owner = model.get_submodule(owner_name)
        parts = owner_name.split(".")
        layer = int(parts[1]) if parts[0] == "layers" else -1
        where = parts[2:] if layer >= 0 else [p for p in parts if p]  # e.g. attn.q_proj
        place = ".".join(where + ([attr] if attr != "adapter" else []))
        for name, m in slot.items():
            tag = f"{name}:" if len(model.adapter_configs) > 1 else ""
            for quantity, value in describe(m, owner):
                rows.append((layer, place, tag + quantity, value))
    return rows


@torch.no_grad()
def describe(m, owner):
    """(quantity, value) pairs saying what one adapter module holds."""
    if isinstance(m, adapters.LoRA):
        d = m.delta().float().norm().item()
        return [("norm(dW)", d), ("norm(dW)/norm(W)", d / owner.weight.float().norm().item())]
    if isinstance(m, adapters.GatedPrefix):
        return [("gate", m.gate.item())]
    if isinstance(m, adapters.Bottleneck):
        return [("norm(down)", m.down.weight.norm().item()),
                ("norm(up)", m.up.weight.norm().item())]
    # a kind not known here: the norm of each parameter
    return [(f"norm({n})", p.float().norm().item()) for n, p in m.named_parameters()]


def table(rows, heading):
    lines = [f"## {heading}", "", "| layer | place | quantity | value |", "|---:|---|---|---:|"]
    return "\n".join(lines + [f"| {layer if layer >= 0 else '-'} | {place} | {q} | {v:.4g} |"
                              for layer, place, q, v in rows])


# ------------------------------------------------------------------------------ heatmaps
def heat(v, lo, hi):
    """A pale-to-dark blue colour for v in [lo, hi] (pale, not white: the least cell shows)."""
    t = 0.0 if hi <= lo else (v - lo) / (hi - lo)
    return f"rgb({round(235 - 205 * t)},{round(242 - 157 * t)},{round(252 - 72 * t)})"


def colour_scale(lo, hi, x, y, steps=10, w=16):
    """A bar of `steps` colours from lo to hi with both values written at its ends."""
    out = [tag("rect", x=x + w * i, y=y, width=w, height=10, fill=heat(i / (steps - 1), 0, 1))
           for i in range(steps)]
    return out + [tag("text", f"{lo:.3g}", x=x - 4, y=y + 9, text_anchor="end"),
                  tag("text", f"{hi:.3g}", x=x + w * steps + 4, y=y + 9)]


def grid(title, cells, rows, cols, size=26, label_w=150):
    """A heatmap of cells {(row, col): value}, rows and cols the labels in order, pale the least
    value and dark blue the largest, a colour scale below -> (width, height, SVG elements). Column
    labels stand upright, so that labels of narrow columns never overlap."""
    lo, hi = min(cells.values(), default=0.0), max(cells.values(), default=0.0)
    top = 24 + 6 * max(map(len, cols), default=0) + 6  # ~6 pixels a character at font size 10
    out = [tag("text", escape(title), x=4, y=14, font_size=13, font_weight="bold")]
    for j, c in enumerate(cols):
        x = label_w + size * j + size / 2 + 3  # + half the text's height: centred on the column
        out.append(tag("text", escape(c), transform=f"translate({x} {top - 4}) rotate(-90)"))
    for i, r in enumerate(rows):
        y = top + size * i
        out.append(tag("text", escape(r), x=label_w - 4, y=y + size / 2 + 3, text_anchor="end"))
        out += [tag("rect", f"<title>{escape(f'{r} {c}: {cells[r, c]:.4g}')}</title>",
                    x=label_w + size * j, y=y, width=size, height=size, stroke="#ccc",
                    fill=heat(cells[r, c], lo, hi)) for j, c in enumerate(cols) if (r, c) in cells]
    bottom = top + size * len(rows) + 10
    out += colour_scale(lo, hi, label_w, bottom)
    width = max(label_w + size * len(cols) + 20, label_w + 16 * 10 + 60, 8 * len(title))
    return width, bottom + 30, out


def stack(grids):
    """Heatmaps one below the other, as one SVG document."""
    parts, y = [], 0
    for _, h, elements in grids:
        parts.append(tag("g", "\n".join(elements), transform=f"translate(0 {y})"))
        y += h
    return svg(max(w for w, _, _ in grids), y, parts, font_size=10)


def adapter_grids(rows, title):
    """The summary as heatmaps, one per quantity (LoRA's norm(dW) and norm(dW)/norm(W), ...): layers
    down, places across."""
    def name(layer):
        return f"layer {layer}" if layer >= 0 else "model"
    layers = [name(layer) for layer in sorted({layer for layer, *_ in rows})]
    grids = []
    for q in dict.fromkeys(q for *_, q, _ in rows):
        cells = {(name(layer), place): v for layer, place, qq, v in rows if qq == q}
        places = list(dict.fromkeys(place for _, place in cells))
        grids.append(grid(f"{title}: {q}", cells, layers, places))
    return grids


def attention_grids(weights, tokens, layer):
    """One layer's weights (H, T, T) of a single example: a heatmap per head, queries down, keys
    across."""
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    return [grid(f"layer {layer}, head {h}: attention weights (row = query, column = key)",
                 {(labels[i], labels[j]): w for i, row in enumerate(weights[h].tolist())
                  for j, w in enumerate(row) if j <= i},
                 labels, labels, size=12, label_w=90) for h in range(weights.size(0))]


def main(argv=None):
    try:
        cfg, _ = configure(sys.argv[1:] if argv is None else argv, DEFAULTS, __doc__)
        model, tok, extra, _, adapter_dir = load_for_tool(cfg)
        template = template_of(extra, adapter_dir)
    except ConfigError as e:
        fail(e)
    if not -model.config.n_layer <= cfg.layer < model.config.n_layer:
        fail(f"--layer={cfg.layer}: the model has {model.config.n_layer} layers")
    out = cfg.out or adapter_dir or os.path.join("out", "inspect")
    try:
        check_writable(out, "--out")
    except ValueError as e:
        fail(e)
    written = []
    if adapter_dir:
        rows = adapter_summary(model)
        kinds = ", ".join(sorted({c["kind"] for c in model.adapter_configs.values()}))
        print(table(rows, f"what the {kinds} adapter in {adapter_dir} learned, place by place"))
        written.append(os.path.join(out, "adapter.svg"))
        title = os.path.basename(os.path.normpath(adapter_dir))
        write_atomic(written[-1], stack(adapter_grids(rows, title)))
    prompt = cfg.prompt
    if not prompt:
        test = os.path.join(cfg.demo_dir, "data", "test.json")
        exists = os.path.isfile(test)
        prompt = load_rows(test, TEST_REQUIRE)[0]["instruction"] if exists else "What is 2 + 3?"
    ids = template.encode_prompt(tok, prompt)
    layer = cfg.layer % model.config.n_layer
    weights, _ = attention_weights(model, torch.tensor([ids]))[layer]
    # labels: a token's text, cut short; "" (BOS, a lone space) shows as "."
    tokens = [tok.decode([i]).replace("\n", "\\n")[:12] or "." for i in ids]
    written.append(os.path.join(out, "attention.svg"))
    write_atomic(written[-1], stack(attention_grids(weights[0], tokens, layer)))
    print(f"wrote {' and '.join(written)}")
    return written


if __name__ == "__main__":
    main()
