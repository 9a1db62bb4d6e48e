"""
Pictures of training runs, drawn as SVG by hand (no plotting library needed; any browser shows them).

    python plot.py                                 # every run in out/demo/ -> out/demo/loss.svg, results.svg
    python plot.py --runs=out/a,out/b --out=pics   # runs = folders that hold train.py's log.jsonl

loss.svg     training loss (thin line) and validation loss (thick, dots) against the step, one colour per run,
             log y: late improvements stay visible.
results.svg  exact-match accuracy against trainable parameters (log x), one dot per adapter and the base as a
             dashed line: the paper's "accuracy vs % params" picture. Drawn for runs whose log holds accuracies
             (the demo's).
"""
import json
import math
import os
import sys
from xml.sax.saxutils import escape

from checkpoints import write_atomic
from configurator import DEMO_DIR, ConfigError, configure

DEFAULTS = dict(
    runs=[],              # run folders (comma-separated); empty = every folder in --demo_dir with a log.jsonl
    out="",               # where the pictures go; "" = --demo_dir, or the first run's parent folder
    demo_dir=DEMO_DIR,
)
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H, LEFT, RIGHT, TOP, BOTTOM = 680, 400, 64, 150, 36, 48  # canvas and margins (the legend sits on the right)


def fail(msg):
    raise SystemExit(f"plot.py: error: {msg}")


# ---------------------------------------------------------------------------------------------- a tiny SVG chart
def ticks(lo, hi, log):
    """Round tick values within [lo, hi]: 1-2-5 steps, or on a log axis powers of ten (and 2, 5 x them when
    the range spans less than two decades)."""
    if log:
        lo_e, hi_e = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        mults = (1,) if hi_e - lo_e > 2 else (1, 2, 5)
        found = [m * 10 ** e for e in range(lo_e, hi_e + 1) for m in mults if lo <= m * 10 ** e <= hi]
        return found if len(found) >= 3 else [v for v in ticks(lo, hi, False) if v > 0]  # a narrow range
    step = 10 ** math.floor(math.log10((hi - lo) / 5 or 1))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= 6)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def scale(lo, hi, a, b, log):
    """value -> pixel, mapping [lo, hi] onto [a, b] (linearly, or linearly in log10)."""
    f = math.log10 if log else float
    lo, hi = (f(lo), f(hi)) if hi > lo else (f(lo) - 1, f(lo) + 1)
    return lambda v: a + (f(v) - lo) / (hi - lo) * (b - a)


def label(v):
    return f"{v:,.0f}" if abs(v) >= 1000 or v == int(v) else f"{v:g}"


def chart(series, title, xlabel, ylabel, logx=False, logy=False, hlines=(), ylim=None):
    """An SVG document: axes with ticks and a grid, then every series, then a legend. A series is a dict:
    name, points [(x, y)], color, cls (its class attribute), line (a polyline, True) or dots only, width.
    hlines: (y, name, color) dashed horizontal lines; ylim: (low, high) instead of the data's range."""
    pts = [p for s in series for p in s["points"]] + [(None, y) for y, _, _ in hlines]
    xs, ys = [x for x, _ in pts if x is not None], [y for _, y in pts]
    x0, x1 = (min(xs) / 1.5, max(xs) * 1.5) if logx else (min(xs), max(xs))
    y0, y1 = (min(ys) / 1.1, max(ys) * 1.1) if logy else (min(0, min(ys)), max(ys) * 1.05 or 1)
    y0, y1 = ylim or (y0, y1)
    sx, sy = scale(x0, x1, LEFT, W - RIGHT, logx), scale(y0, y1, H - BOTTOM, TOP, logy)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    for v in ticks(x0, x1, logx):
        out += [f'<line x1="{sx(v):.1f}" y1="{TOP}" x2="{sx(v):.1f}" y2="{H - BOTTOM}" stroke="#eee"/>',
                f'<text x="{sx(v):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{label(v)}</text>']
    for v in ticks(y0, y1, logy):
        out += [f'<line x1="{LEFT}" y1="{sy(v):.1f}" x2="{W - RIGHT}" y2="{sy(v):.1f}" stroke="#eee"/>',
                f'<text x="{LEFT - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{label(v)}</text>']
    out += [f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" '
            'stroke="#333"/>',
            f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 10}" text-anchor="middle">{escape(xlabel)}</text>',
            f'<text transform="translate(16 {(TOP + H - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
            f'{escape(ylabel)}</text>']
    for y, name, color in hlines:
        out.append(f'<line x1="{LEFT}" y1="{sy(y):.1f}" x2="{W - RIGHT}" y2="{sy(y):.1f}" stroke="{color}" '
                   f'stroke-dasharray="6 4"><title>{escape(name)}</title></line>')
    for s in series:
        xy = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s["points"])
        if s.get("line", True):
            out.append(f'<polyline class="{s["cls"]}" data-run="{escape(s["name"])}" points="{xy}" fill="none" '
                       f'stroke="{s["color"]}" stroke-width="{s.get("width", 1.2)}"/>')
        if s.get("dots"):
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{s["color"]}"/>' for x, y in s["points"]]
    legend = [(s["name"], s["color"]) for s in series if s.get("legend", True)] + [(n, c) for _, n, c in hlines]
    for i, (name, color) in enumerate(legend):
        y = TOP + 8 + 18 * i
        out += [f'<rect x="{W - RIGHT + 12}" y="{y - 8}" width="12" height="10" fill="{color}"/>',
                f'<text x="{W - RIGHT + 30}" y="{y + 1}">{escape(name)}</text>']
    return "\n".join(out + ["</svg>"]) + "\n"


# ---------------------------------------------------------------------------------------------- runs -> pictures
def read_log(run):
    """A run folder's log.jsonl -> its records (train.py writes one JSON object a line)."""
    path = os.path.join(run, "log.jsonl")
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        fail(f"{path}: cannot read the training log ({e.strerror})")
    except ValueError as e:
        fail(f"{path}: not one JSON object a line ({e})")


def find_runs(demo_dir):
    if not os.path.isdir(demo_dir):
        fail(f"{demo_dir}: no such folder (run `python train.py` first, or give --runs)")
    runs = sorted(os.path.join(demo_dir, d) for d in os.listdir(demo_dir)
                  if os.path.isfile(os.path.join(demo_dir, d, "log.jsonl")))
    if not runs:
        fail(f"{demo_dir}: no run folders with a log.jsonl (run `python train.py` first, or give --runs)")
    return runs


def loss_chart(logs):
    """{run name: records} -> the loss picture: a thin training curve and a thick validation curve per run."""
    series = []
    for (name, recs), color in zip(logs.items(), COLORS * 9):
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r and "step" in r and r["loss"] > 0]
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r and r["val_loss"] > 0]
        series.append(dict(name=name, points=train, color=color, cls="loss"))
        if val:
            series.append(dict(name=f"{name} val", points=val, color=color, cls="val", width=2.5, dots=True,
                               legend=False))
    return chart([s for s in series if s["points"]], "training loss (thin) and validation loss (thick)", "step",
                 "loss per target token (log)", logy=True)


def results_chart(logs):
    """{run name: records} -> accuracy against trainable parameters, or None when no run logged accuracies."""
    dots, base = [], None
    for (name, recs), color in zip(logs.items(), COLORS * 9):
        acc = [r for r in recs if "adapter_acc" in r]
        summary = [r for r in recs if "trainable" in r]
        if acc and summary:
            base = acc[-1]["base_acc"]
            dots.append(dict(name=f"{name} ({100 * acc[-1]['adapter_acc']:.1f}%)", color=color, cls="result",
                             points=[(summary[-1]["trainable"], 100 * acc[-1]["adapter_acc"])], line=False,
                             dots=True))
    if not dots:
        return None
    return chart(dots, "accuracy against trainable parameters", "trainable parameters (log)",
                 "exact match, %", logx=True, hlines=[(100 * base, f"base ({100 * base:.1f}%)", "#777")],
                 ylim=(0, 100))


def main(argv=None):
    try:
        cfg, _ = configure(sys.argv[1:] if argv is None else argv, DEFAULTS, __doc__)
    except ConfigError as e:
        fail(e)
    runs = cfg.runs or find_runs(cfg.demo_dir)
    for run in runs:
        if not os.path.isfile(os.path.join(run, "log.jsonl")):
            fail(f"--runs: {run} has no log.jsonl (a folder train.py wrote)")
    out = cfg.out or (cfg.demo_dir if not cfg.runs else os.path.dirname(os.path.normpath(runs[0])) or ".")
    logs = {os.path.basename(os.path.normpath(r)): read_log(r) for r in runs}
    written = [os.path.join(out, "loss.svg")]
    write_atomic(written[0], loss_chart(logs))
    results = results_chart(logs)
    if results:
        written.append(os.path.join(out, "results.svg"))
        write_atomic(written[1], results)
    print(f"wrote {' and '.join(written)} ({len(runs)} run(s): {', '.join(logs)})")
    return written


if __name__ == "__main__":
    main()
