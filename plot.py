"""
Pictures of training runs, drawn as SVG by hand (svg.py; no plotting library needed).

    python plot.py                                 # every run in out/demo/ -> loss.svg, results.svg
    python plot.py --runs=out/a,out/b --out=pics   # runs: folders holding train.py's log.jsonl

loss.svg     training loss (thin) and validation loss (thick, dots) against the step, a colour per
             adapter kind (the same in every picture; a second run of a kind dashed), log y: late
             improvements stay visible.
results.svg  exact match against trainable parameters (log x), a dot per adapter, the base as a
             dashed line: the paper's "accuracy vs % params" picture, for runs that logged
             accuracies (the demo's).
"""
import math
import os
import sys
import zlib
from xml.sax.saxutils import escape

from adapters import KINDS
from cli import DEMO_DIR, ConfigError, configure, fail
from files import check_writable, read_json, read_jsonl, write_atomic
from svg import svg, tag

DEFAULTS = dict(
    runs=[],              # run folders (comma-separated); [] = each one in --demo_dir with a log
    out="",               # where the pictures go; "" = --demo_dir, or the first run's parent folder
    demo_dir=DEMO_DIR,
)
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
# a colour per adapter kind, so a kind looks the same in every picture whichever runs are drawn
KIND_COLORS = dict(zip(KINDS, COLORS))  # any other kind: a colour from its name's hash
W, H, LEFT, RIGHT, TOP, BOTTOM = 700, 400, 64, 170, 36, 48  # canvas, margins (legend on the right)
NUMBERS = ("step", "loss", "val_loss", "adapter_acc", "base_acc", "trainable")  # what is drawn

# ------------------------------------------------------------------------------ a tiny SVG chart
def ticks(lo, hi, log):
    """Round tick values within [lo, hi]: 1-2-5 steps, or on a log axis powers of ten (and 2 and
    5 times them when the range spans at most two decades)."""
    if log:
        lo_e, hi_e = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        mults = (1,) if hi_e - lo_e > 2 else (1, 2, 5)
        found = [v for v in (m * 10 ** e for e in range(lo_e, hi_e + 1) for m in mults)
                 if lo <= v <= hi]
        return found if len(found) >= 2 else [v for v in ticks(lo, hi, False) if v > 0]  # narrow
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
    """An SVG document: axes with ticks and a grid, every series, a legend. A series is a dict:
    name, points [(x, y)], color, cls (its class attribute), line (draw a polyline: True), dots,
    width, legend (list it: True), dash (a stroke-dasharray: a second run of a kind). hlines:
    (y, name, color) dashed lines; ylim: (low, high)."""
    pts = [p for s in series for p in s["points"]] + [(None, y) for y, _, _ in hlines]
    xs, ys = [x for x, _ in pts if x is not None], [y for _, y in pts]
    x0, x1 = (min(xs) / 1.5, max(xs) * 1.5) if logx else (min(xs), max(xs))
    y0, y1 = ylim or ((min(ys) / 1.1, max(ys) * 1.1) if logy else (min(0, min(ys)), max(ys) * 1.05))
    sx, sy = scale(x0, x1, LEFT, W - RIGHT, logx), scale(y0, y1, H - BOTTOM, TOP, logy)
    out = [tag("text", escape(title), x=LEFT, y=20, font_size=14, font_weight="bold")]
    for v in ticks(x0, x1, logx):
        out += [tag("line", x1=sx(v), y1=TOP, x2=sx(v), y2=H - BOTTOM, stroke="#eee"),
                tag("text", label(v), x=sx(v), y=H - BOTTOM + 16, text_anchor="middle")]
    for v in ticks(y0, y1, logy):
        out += [tag("line", x1=LEFT, y1=sy(v), x2=W - RIGHT, y2=sy(v), stroke="#eee"),
                tag("text", label(v), x=LEFT - 6, y=sy(v) + 4, text_anchor="end")]
    out += [tag("rect", x=LEFT, y=TOP, width=W - LEFT - RIGHT, height=H - TOP - BOTTOM, fill="none",
                stroke="#333"),
            tag("text", escape(xlabel), x=(LEFT + W - RIGHT) / 2, y=H - 10, text_anchor="middle"),
            tag("text", escape(ylabel), text_anchor="middle",
                transform=f"translate(16 {(TOP + H - BOTTOM) / 2}) rotate(-90)")]
    for y, name, color in hlines:
        out.append(tag("line", f"<title>{escape(name)}</title>", x1=LEFT, y1=sy(y), x2=W - RIGHT,
                       y2=sy(y), stroke=color, stroke_dasharray="6 4"))
    for s in series:
        if s.get("line", True):
            xy = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s["points"])
            dash = {"stroke_dasharray": s["dash"]} if s.get("dash") else {}
            out.append(tag("polyline", class_=s["cls"], data_run=escape(s["name"]), points=xy,
                           fill="none", stroke=s["color"], stroke_width=s.get("width", 1.2),
                           **dash))
        if s.get("dots"):  # a second run of a kind: hollow dots
            fill = "white" if s.get("dash") else s["color"]
            out += [tag("circle", cx=sx(x), cy=sy(y), r=3.5, fill=fill, stroke=s["color"])
                    for x, y in s["points"]]
    legend = [(s["name"], s["color"], s.get("dash")) for s in series if s.get("legend", True)]
    for i, (name, color, dash) in enumerate(legend + [(n, c, None) for _, n, c in hlines]):
        y = TOP + 8 + 18 * i
        out += [tag("rect", x=W - RIGHT + 12, y=y - 8, width=12, height=10,
                    fill="white" if dash else color, stroke=color),
                tag("text", escape(name), x=W - RIGHT + 30, y=y + 1)]
    return svg(W, H, out)


# ------------------------------------------------------------------------------ runs -> pictures
def read_log(run):
    """A run folder's log.jsonl -> its records (train.py writes one JSON object a line), each field
    that is drawn checked to be a number."""
    path = os.path.join(run, "log.jsonl")
    try:
        records = read_jsonl(path)
    except ValueError as e:
        fail(f"{e} (a log.jsonl that train.py wrote?)")
    for i, r in enumerate(records, 1):
        for k in NUMBERS:
            v = r.get(k)
            if k in r and (isinstance(v, bool) or not isinstance(v, (int, float))
                           or not math.isfinite(v)):
                fail(f"{path}: record {i}: field {k!r} is {v!r}, expected a finite number")
    return records


def kind_of(run):
    """The adapter kind of a run folder (its adapter_config.json), else the folder's name."""
    name = os.path.basename(os.path.normpath(run))
    try:
        kind = read_json(os.path.join(run, "adapter_config.json")).get("kind", name)
    except ValueError:  # no adapter saved yet, or not ours: the name stands in
        return name
    return kind if isinstance(kind, str) else name


def colors(kinds):
    """{run: (colour, dashed)}: the kind's colour (a colour from the name's checksum for a kind
    not in KIND_COLORS); a second run of the same kind is drawn dashed."""
    seen, out = set(), {}
    for run, kind in kinds.items():
        color = KIND_COLORS.get(kind) or COLORS[zlib.crc32(kind.encode()) % len(COLORS)]
        out[run] = (color, "5 3" if kind in seen else None)
        seen.add(kind)
    return out


def find_runs(demo_dir):
    hint = "(run `python train.py` first, or give --runs)"
    if not os.path.isdir(demo_dir):
        fail(f"{demo_dir}: no such folder {hint}")
    runs = sorted(os.path.join(demo_dir, d) for d in os.listdir(demo_dir)
                  if os.path.isfile(os.path.join(demo_dir, d, "log.jsonl")))
    if not runs:
        fail(f"{demo_dir}: no run folders with a log.jsonl {hint}")
    return runs


def loss_chart(logs, styles):
    """{run name: records} -> the loss picture: thin training, thick validation curves."""
    series = []
    for name, recs in logs.items():
        color, dash = styles[name]
        steps = [r for r in recs if "step" in r]
        train = [(r["step"], r["loss"]) for r in steps if "loss" in r and r["loss"] > 0]
        val = [(r["step"], r["val_loss"]) for r in steps if "val_loss" in r and r["val_loss"] > 0]
        series.append(dict(name=name, points=train, color=color, cls="loss", dash=dash))
        series.append(dict(name=f"{name} val", points=val, color=color, cls="val", width=2.5,
                           dots=True, legend=False, dash=dash))
    if not any(s["points"] for s in series):
        return None
    return chart([s for s in series if s["points"]], "training loss (thin) and validation loss "
                 "(thick)", "step", "loss per target token (log)", logy=True)


def results_chart(logs, styles):
    """{run name: records} -> accuracy against trainable parameters; None if no run has one."""
    dots, base = [], None
    for name, recs in logs.items():
        color, dash = styles[name]
        acc = [r for r in recs if "adapter_acc" in r and "base_acc" in r]
        summary = [r for r in recs if "trainable" in r]
        if acc and summary:
            base, a = acc[-1]["base_acc"], 100 * acc[-1]["adapter_acc"]
            dots.append(dict(name=f"{name} ({a:.1f}%)", points=[(summary[-1]["trainable"], a)],
                             color=color, cls="result", line=False, dots=True, dash=dash))
    if not dots:
        return None
    # the axis runs a little past 100, so a dot at 100% is drawn whole inside the frame
    return chart(dots, "accuracy against trainable parameters", "trainable parameters (log)",
                 "exact match, %", logx=True, ylim=(0, 104),
                 hlines=[(100 * base, f"base ({100 * base:.1f}%)", "#777")])


def main(argv=None):
    try:
        cfg, _ = configure(sys.argv[1:] if argv is None else argv, DEFAULTS, __doc__)
    except ConfigError as e:
        fail(e)
    runs = cfg.runs or find_runs(cfg.demo_dir)
    for run in runs:
        if not os.path.isfile(os.path.join(run, "log.jsonl")):
            fail(f"--runs: {run} has no log.jsonl (a folder train.py wrote)")
    first_parent = os.path.dirname(os.path.normpath(runs[0])) or "."
    out = cfg.out or (first_parent if cfg.runs else cfg.demo_dir)
    try:
        check_writable(out, "--out")
    except ValueError as e:
        fail(e)
    names = {r: os.path.basename(os.path.normpath(r)) for r in runs}
    if len(set(names.values())) < len(runs):  # out/a/lora and out/b/lora: the paths tell apart
        names = {r: os.path.normpath(r) for r in runs}
    logs = {names[r]: read_log(r) for r in runs}
    styles = colors({names[r]: kind_of(r) for r in runs})
    pictures = {"loss.svg": loss_chart(logs, styles), "results.svg": results_chart(logs, styles)}
    if not any(pictures.values()):
        fail(f"--runs: no losses or accuracies to draw in {', '.join(runs)}")
    written = [os.path.join(out, name) for name, text in pictures.items() if text]
    for path in written:
        write_atomic(path, pictures[os.path.basename(path)])
    print(f"wrote {' and '.join(written)} ({len(runs)} run(s): {', '.join(logs)})")
    return written


if __name__ == "__main__":
    main()
