r"""
Evaluate a base model, or a base model + adapter, on LLM-Adapters' test sets (or any set in their
format).

    python eval.py              # the embedded demo: out/demo/base alone
                                # and + each adapter trained in out/demo/
    python eval.py --model=<dir> [--adapter_dir=<dir>] \
                   --dataset=gsm8k|AQuA|...|math|commonsense|path/to/test.json \
                   [--data_dir=<dir>] [--limit=N] [--batch_size=32] [--num_beams=4] [--strict] \
                   [--out=<dir>]

Writes <out>/<dataset>.jsonl (one record per example, in the test file's order) and
<out>/summary.json, and prints a markdown table in the paper's layout. Unlike LLM-Adapters'
evaluate.py: batched generation with a KV cache (generate.py), prompts sorted by length (longest
first), left-padded with an attention mask. A response ends on any of the tokenizer's stop ids;
each record says why it ended ("stop": stop_token or max_new_tokens), and the report counts the
responses cut by --max_new_tokens (an answer cut short is likely scored wrong).

Batch size: a left-padded row is computed as it would be alone (positions count real tokens, padding
is masked, every batch gets a mask), so predictions do not depend on the batch size; only the
rounding can, where kernels for other shapes sum in another order. fp32: identical in the tests and
on the demo (logits differ by ~1e-6, far below greedy's margins). bf16/fp16 round each matmul to ~3
significant digits, so a near-tie between the top two tokens can resolve differently at another
batch size, and the rest of that response then differs: expect a few responses in a thousand to
change, and accuracies to move by a fraction of a point. Use --dtype=float32 for runs that must
match exactly.
"""
import json
import os
import sys
import time

import torch

from adapters import KINDS, fast_fp32_matmuls
from cli import (DEMO_DIR, DTYPES, ConfigError, compile_blocks, compile_setting, configure,
                 device_and_dtype, fail, load, template_of)
from data.prepare import TEST_REQUIRE, TRAIN_REQUIRE, describe_duplicates, leakage, load_rows
from data.scoring import ANSWER_TYPES, COMMONSENSE, MATH, NUMBER, OPTION, get_answer_type, score
from data.template import TEMPLATES, response_of
from files import check_unused, check_writable, write_atomic
from generate import MAX_NEW_TOKENS, generate_batch
from quantize import MODES as QUANT_MODES

# --------------------------------------------------------------------------------------------------
# defaults; override any with --key=value or --key value (booleans: --strict or --strict=false),
# as in train.py
DEFAULTS = dict(
    model="",             # base model folder (Hugging Face or Meta layout); "" = the embedded demo
    adapter_dir="",       # folder of a trained adapter (adapter_config.json); "" = the base
                          # alone (demo: and + each trained one)
    dataset="",           # a name, a group (math, commonsense), or a path to a test.json
                          # or its folder
    data_dir="",          # folder of <name>/test.json;
                          # "" = data/out, then ../shared/data/llm-adapters/dataset
    template="",          # alpaca | llama3-chat; "" = the adapter's, Alpaca for a bare base
    answer_type="",       # how to read the answers of a set not known by name:
                          # number | option | choice1,choice2,...
    limit=0,              # only the first N examples of each set (0 = all)
    batch_size=32,
    num_beams=1,          # 1 = greedy; the paper's math setting is 4
    length_penalty=1.0,   # beam score: sum of log-probs / (generated tokens ** length_penalty)
    max_new_tokens=0,     # 0 = 256 for math (number/option answers), 32 for commonsense;
                          # at most block_size/2
    strict=False,         # strict answer reading (data/scoring.py) instead of the paper's
    dtype="",             # bfloat16 | float16 | float32; "" = bfloat16 on cuda, float32 on cpu
    quantize="",          # frozen base in int8 | nf4 | nf4-dq (quantize.py); "" = in dtype
    device="",            # "" = cuda if available, else cpu
    compile="",           # compile each block: "" = on for CUDA, off elsewhere; true | false
    out="",               # "" = out/eval/<adapter name, or base model name>
    overwrite=False,      # replace the results already in --out (else a used --out is refused;
                          # the demo, without --model, replaces its own)
    demo_dir=DEMO_DIR,    # where train.py's embedded demo lives (without --model)
)
RESULT_FILES = ["summary.json"]  # and <set>.jsonl: what a run writes into --out
ROOT = os.path.dirname(os.path.abspath(__file__))
DATA_DIRS = [os.path.join(ROOT, "data", "out"),
             os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "llm-adapters",
                                           "dataset"))]
GROUPS = {"math": MATH, "commonsense": COMMONSENSE}


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def parse_config(argv):
    """--key=value (or --key value, config files) -> config dict, through configurator.py as
    train.py does."""
    cfg = vars(configure(argv, DEFAULTS, __doc__)[0])
    for key in ("batch_size", "num_beams"):
        if cfg[key] < 1:
            raise ConfigError(f"--{key}={cfg[key]}: must be at least 1")
    for key in ("limit", "max_new_tokens"):
        if cfg[key] < 0:
            raise ConfigError(f"--{key}={cfg[key]}: must be 0 or more")
    if cfg["dtype"] not in DTYPES:
        raise ConfigError(f"--dtype={cfg['dtype']}: expected bfloat16, float16 or float32")
    if cfg["quantize"] not in ("", *QUANT_MODES):
        raise ConfigError(f"--quantize={cfg['quantize']}: expected one of {', '.join(QUANT_MODES)}")
    compile_setting(cfg["compile"], "cpu")  # a word it does not know is a ConfigError here
    return cfg


def parse_answer_type(value):
    """--answer_type value -> None (infer), "number", "option" or a list of choice words."""
    if value in ("", NUMBER, OPTION):
        return value or None
    choices = [c.strip() for c in value.split(",") if c.strip()]
    if len(choices) < 2:
        raise ValueError(f"--answer_type={value}: expected number, option or a comma-separated "
                         "list of choice words")
    return choices


def find_test_sets(spec, data_dir=""):
    """--dataset value -> [(name, path of its test.json)]. A group skips (with a warning) its sets
    that are missing locally; a single named set that is missing is an error."""
    if os.path.exists(spec) or spec.endswith(".json"):
        path = os.path.join(spec, "test.json") if os.path.isdir(spec) else spec
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such test file")
        base = os.path.basename(path)
        name = (os.path.basename(os.path.dirname(os.path.abspath(path))) if base == "test.json"
                else base[:-5])
        return [(name, path)]
    dirs = [data_dir] if data_dir else DATA_DIRS
    known = {n.lower(): n for n in ANSWER_TYPES}
    names = GROUPS.get(spec.lower(), [known.get(spec.lower(), spec)])
    found = {}
    for name in names:
        paths = [p for p in (os.path.join(d, name, "test.json") for d in dirs) if os.path.isfile(p)]
        if paths:
            found[name] = paths[0]
    where = " or ".join(dirs)
    if spec.lower() not in GROUPS and not found:
        if spec.lower() not in known:
            raise ValueError(f"unknown dataset {spec!r}; known: {', '.join(ANSWER_TYPES)}; groups: "
                             f"{', '.join(GROUPS)}; or a path to a test.json (or its folder)")
        raise FileNotFoundError(f"{names[0]}: no {names[0]}/test.json in {where} "
                                "(see data/prepare.py)")
    missing = [n for n in names if n not in found]
    if missing and found:
        warn(f"{spec}: skipping {len(missing)} missing set(s): {', '.join(missing)} "
             f"(no <name>/test.json in {where})")
    elif missing:
        raise FileNotFoundError(f"{spec}: none of {', '.join(names)} found as <name>/test.json "
                                f"in {where}")
    return list(found.items())


# --------------------------------------------------------------------------------------------------
# evaluation

def progress_printer(name):
    """progress(done, total) that prints examples/s and the ETA to stderr."""
    t0 = time.time()

    def progress(done, total):
        rate = done / max(time.time() - t0, 1e-9)
        end = "\n" if done == total or not sys.stderr.isatty() else ""
        print(f"\r{name}: {done}/{total} examples, {rate:.1f} examples/s, "
              f"ETA {(total - done) / rate:.0f}s", end=end, file=sys.stderr, flush=True)
    return progress


def evaluate(model, tok, rows, dataset, answer_type=None, strict=False, template="alpaca",
             max_new_tokens=0, batch_size=32, num_beams=1, length_penalty=1.0, progress=True):
    """Generate a response to every row and score it. answer_type: None = from the dataset name,
    else the labels; max_new_tokens: 0 = the default for the answer type (see DEFAULTS).
    Returns (records, accuracy); records in the rows' order:
    id, prompt, response, stop (why it ended: stop_token or max_new_tokens), extracted, label,
    correct."""
    answer_type = get_answer_type(dataset, answer_type, labels=[r["answer"] for r in rows])
    max_new_tokens = max_new_tokens or min(32 if isinstance(answer_type, list) else 256,
                                           model.config.block_size // 2)
    t = TEMPLATES[template]
    prompts = [t.text(r["instruction"], r.get("input") or "") for r in rows]
    ids = [t.encode_prompt(tok, r["instruction"], r.get("input") or "") for r in rows]
    responses = generate_batch(model, tok, ids, max_new_tokens, batch_size, num_beams,
                               length_penalty, progress_printer(dataset) if progress else None)
    records = []
    for i, (row, prompt, (text, stop)) in enumerate(zip(rows, prompts, responses)):
        pred, correct = score(dataset, response_of(text), row["answer"], answer_type, strict)
        records.append(dict(id=i, prompt=prompt, response=text.strip(), stop=stop,
                            extracted=pred, label=row["answer"], correct=correct))
    return records, sum(r["correct"] for r in records) / len(records)


# --------------------------------------------------------------------------------------------------
# files and the command line

def markdown_table(table):
    """{model row: {dataset: accuracy}} in the paper's layout: a row per model, the datasets, then
    Avg, in percent."""
    cols = list(next(iter(table.values()))) + ["Avg"]
    lines = ["| Model | " + " | ".join(cols) + " |", "|---" + "|---:" * len(cols) + "|"]
    for row_name, accuracies in table.items():
        values = list(accuracies.values())
        lines.append(f"| {row_name} | "
                     + " | ".join(f"{100 * a:.1f}" for a in values + [sum(values) / len(values)])
                     + " |")
    return "\n".join(lines)


def run(cfg, adapter_dir, rows, answer_type, device, dtype, out):
    """Evaluate the base model + adapter_dir ("" = none) on every set of rows; write
    <out>/<set>.jsonl and <out>/summary.json. Returns ({set: accuracy}, the summary)."""
    model, tok, extra = load(cfg["model"], adapter_dir, device, dtype, cfg["quantize"])
    if compile_setting(cfg["compile"], device):
        compile_blocks(model)  # decoding: a CUDA graph of compiled blocks (generate.DecodeStep)
    template = template_of(extra, adapter_dir, cfg["template"]).name
    # the adapter's training file (train.py: "data")
    train = extra.get("train_data") or extra.get("data")
    if train and os.path.isfile(train):
        for name, c in leakage(load_rows(train, TRAIN_REQUIRE), rows).items():
            if c["normalized"]:
                warn(f"{name}: {c['normalized']} of {c['total']} test questions also occur in "
                     f"the adapter's training data {train}")
    accuracies, n, cut = {}, {}, {}
    for name, data in rows.items():
        t0 = time.time()
        try:
            records, accuracies[name] = evaluate(model, tok, data, name, answer_type,
                                                 cfg["strict"], template, cfg["max_new_tokens"],
                                                 cfg["batch_size"], cfg["num_beams"],
                                                 cfg["length_penalty"])
        except torch.cuda.OutOfMemoryError as e:
            raise MemoryError(f"{name}: out of memory on {device} with "
                              f"--batch_size={cfg['batch_size']} and "
                              f"--num_beams={cfg['num_beams']}: "
                              "lower --batch_size (results do not depend on it)") from e
        n[name] = len(records)
        cut[name] = sum(r["stop"] == MAX_NEW_TOKENS for r in records)
        write_atomic(os.path.join(out, f"{name}.jsonl"),
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"{name}: accuracy {100 * accuracies[name]:.1f}% of {len(records)}, "
              f"{cut[name]} cut by max_new_tokens "
              f"({len(records) / (time.time() - t0):.1f} examples/s)", file=sys.stderr)
    summary = {k: {"accuracy": a, "n": n[k], "cut": cut[k]} for k, a in accuracies.items()}
    summary["average"] = sum(accuracies.values()) / len(accuracies)
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/summary.json and {len(rows)} JSONL file(s)", file=sys.stderr)
    return accuracies, summary


def main(argv=None):
    """Returns {model row name: summary}: one row, or for the demo without --adapter_dir the base
    and every adapter that train.py left in the demo folder."""
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    adapter_dirs = [cfg["adapter_dir"]]
    if not cfg["model"]:  # the embedded demo
        demo_dir = cfg["demo_dir"]
        cfg["model"] = os.path.join(demo_dir, "base")
        test = os.path.join(demo_dir, "data", "test.json")
        trained = [d for d in (os.path.join(demo_dir, k) for k in KINDS)
                   if os.path.isfile(os.path.join(d, "adapter_config.json"))]
        adapter_dirs = [cfg["adapter_dir"]] if cfg["adapter_dir"] else ["", *trained]
        needed = [cfg["model"], *filter(None, adapter_dirs)] + ([] if cfg["dataset"] else [test])
        missing = [p for p in needed if not os.path.exists(p)]
        if adapter_dirs == [""]:  # no adapter trained yet
            missing.append(os.path.join(demo_dir, "<adapter>"))
        if missing:
            raise FileNotFoundError("the embedded demo is not built "
                                    f"({', '.join(missing)} missing): "
                                    "run `python train.py` first, "
                                    "or pass --model=<dir> --dataset=<name>")
        datasets = (find_test_sets(cfg["dataset"], cfg["data_dir"]) if cfg["dataset"]
                    else [("demo", test)])
    elif not cfg["dataset"]:
        raise ValueError(f"--dataset is required with --model: a name "
                         f"({', '.join(ANSWER_TYPES)}), a group ({', '.join(GROUPS)}) or a path "
                         "to a test.json")
    else:
        datasets = find_test_sets(cfg["dataset"], cfg["data_dir"])
    answer_type = parse_answer_type(cfg["answer_type"])
    rows = {name: load_rows(path, TEST_REQUIRE)[:cfg["limit"] or None] for name, path in datasets}
    for (name, path), data in zip(datasets, rows.values()):
        dup = describe_duplicates(path, data)
        if dup:  # kept, so that scores stay comparable with the paper's
            warn(f"{dup}; all are scored, as in the paper")

    device, dtype = device_and_dtype(cfg["device"], cfg["dtype"])
    fast_fp32_matmuls(device, dtype)
    table, summaries, outs = {}, {}, {}
    for adapter_dir in adapter_dirs:
        names = [os.path.basename(os.path.normpath(p)) for p in (cfg["model"], adapter_dir) if p]
        row = " + ".join(names)
        if cfg["out"] and len(adapter_dirs) == 1:
            outs[row] = cfg["out"]
        else:
            # out/eval/<adapter or model name>; several rows get one such folder each inside --out
            outs[row] = os.path.join(cfg["out"] or os.path.join("out", "eval"), names[-1])
    demo = cfg["model"] == os.path.join(cfg["demo_dir"], "base")  # the demo replaces its own
    for out in outs.values():  # before the evaluation, not after it
        check_writable(out, "--out")
        check_unused(out, "--out", cfg["overwrite"] or demo, RESULT_FILES + [f"{name}.jsonl"
                                                                          for name in rows])
    for (row, out), adapter_dir in zip(outs.items(), adapter_dirs):
        table[row], summaries[row] = run(cfg, adapter_dir, rows, answer_type, device, dtype, out)
    print(markdown_table(table))
    # the demo: where its pictures are (plot.py)
    if demo:
        print("pictures: python plot.py (training curves and accuracy vs trainable parameters of "
              f"every run, in {cfg['demo_dir']}/loss.svg and results.svg)", file=sys.stderr)
    return summaries


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, KeyError, NotImplementedError, MemoryError) as e:
        fail(e)
