r"""
Evaluate a base model, or a base model + adapter, on LLM-Adapters' test sets (or any set in their
format).

    python eval.py              # the embedded demo: out/demo/base alone
                                # and + each adapter trained in out/demo/
    python eval.py --model=<dir> [--adapter=<dir>] \
                   --dataset=gsm8k|AQuA|...|math|commonsense|path/to/test.json \
                   [--data_dir=<dir>] [--limit=N] [--batch_size=32] [--num_beams=4] [--strict] \
                   [--out=<dir>]

Writes <out>/<dataset>.jsonl (one record per example, in the test file's order) and
<out>/summary.json, and prints a markdown table in the paper's layout. Unlike LLM-Adapters'
evaluate.py: batched generation with a KV cache, prompts sorted by length (longest first),
left-padded with an attention mask.

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
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from adapter_io import load_adapter, read_adapter_config
from adapters import KINDS, fast_fp32_matmuls
from data.prepare import TEST_REQUIRE, TRAIN_REQUIRE, describe_duplicates, leakage, load_rows
from data.scoring import COMMONSENSE, DATASET_KIND, MATH, NUMBER, OPTION, get_kind, score
from data.template import TEMPLATES, response_of
from checkpoints import load_model
from files import check_writable, write_atomic
import fast
from fast import DecodeStep, compile_blocks, compile_setting, prefill
from cli import DEMO_DIR, DTYPES, ConfigError, configure, device_and_dtype
from quantize import MODES as QUANT_MODES
from tokenizer import Tokenizer, check_vocab

# --------------------------------------------------------------------------------------------------
# defaults; override any with --key=value or --key value (booleans: --strict or --strict=false),
# as in train.py
DEFAULTS = dict(
    model="",             # base model folder (Hugging Face or Meta layout); "" = the embedded demo
    adapter="",           # adapter folder (adapter_config.json); "" = the base alone
                          # (demo: and + each trained one)
    dataset="",           # a name, a group (math, commonsense), or a path to a test.json
                          # or its folder
    data_dir="",          # folder of <name>/test.json;
                          # "" = data/out, then ../shared/data/llm-adapters/dataset
    kind="",              # answer kind of a set not known by name:
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
    demo_dir=DEMO_DIR,    # where train.py's embedded demo lives (without --model)
)
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


def parse_kind(kind):
    """--kind value -> None (infer), "number", "option" or a list of choice words."""
    if kind in ("", NUMBER, OPTION):
        return kind or None
    choices = [c.strip() for c in kind.split(",") if c.strip()]
    if len(choices) < 2:
        raise ValueError(f"--kind={kind}: expected number, option or a comma-separated list of "
                         "choice words")
    return choices


def find_datasets(spec, data_dir=""):
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
    known = {n.lower(): n for n in DATASET_KIND}
    names = GROUPS.get(spec.lower(), [known.get(spec.lower(), spec)])
    found = {}
    for name in names:
        paths = [p for p in (os.path.join(d, name, "test.json") for d in dirs) if os.path.isfile(p)]
        if paths:
            found[name] = paths[0]
    where = " or ".join(dirs)
    if spec.lower() not in GROUPS and not found:
        if spec.lower() not in known:
            raise ValueError(f"unknown dataset {spec!r}; known: {', '.join(DATASET_KIND)}; groups: "
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
# generation

@torch.no_grad()
def beam_search(model, idx, attention_mask, max_new_tokens, num_beams, eos_id=None,
                length_penalty=1.0, return_scores=False):
    """Batched beam search with a KV cache, as Hugging Face's (early_stopping=False): every step
    keeps the num_beams best unfinished continuations; a continuation ending in EOS among the
    num_beams best candidates becomes a hypothesis, scored sum(log p) / len ** length_penalty with
    len = generated tokens incl. EOS (HF counts the prompt and its padding there, which makes
    results depend on the batch). An example is done once it has num_beams hypotheses and none of
    its live beams scores better now; at max_new_tokens the live beams become hypotheses too.
    idx (B, T) left-padded with attention_mask (B, T). Returns the best continuation of each row, a
    list of ids without EOS (with return_scores: (score, ids) pairs)."""
    B, T = idx.shape
    K = num_beams
    n_soft = model.prompt.n_tokens if model.prompt is not None else 0
    cache = model.new_cache(B, T + max_new_tokens + n_soft)
    logits = prefill(model, cache, idx, attention_mask)
    cache.repeat(K)  # K beams per example, rows b*K .. b*K+K-1
    step = DecodeStep(model, cache)
    logp = F.log_softmax(logits[:, -1].float(), dim=-1).repeat_interleave(K, 0)  # (B*K, V)
    scores = torch.full((B, K), -math.inf, device=idx.device)
    scores[:, 0] = 0.0  # at first all K beams of an example are the same: keep one
    seqs = [[] for _ in range(B * K)]
    hyps = [[] for _ in range(B)]  # (score, ids)
    done = [max_new_tokens == 0] * B
    for n in range(1, max_new_tokens + 1):  # n: generated tokens after this step
        live = next_beams(scores, logp, seqs, hyps, done, eos_id, n ** length_penalty)
        if n == max_new_tokens or all(done):
            break
        cache.reorder(torch.tensor([row for _, row, _ in live], device=idx.device))
        seqs = [seqs[row] + [t] for _, row, t in live]
        scores = torch.tensor([s for s, _, _ in live], device=idx.device).view(B, K)
        logits = step(torch.tensor([[t] for _, _, t in live], device=idx.device))
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)
    for b in range(B):  # at the end the live beams of unfinished examples are hypotheses too
        if not done[b]:
            hyps[b] += [(s / n ** length_penalty, seqs[row] + [t])
                        for s, row, t in live[b * K:(b + 1) * K] if s > -math.inf]
    best = [max(h, key=lambda x: x[0]) if h else (0.0, []) for h in hyps]
    return best if return_scores else [ids for _, ids in best]


def next_beams(scores, logp, seqs, hyps, done, eos_id, norm):
    """One step of beam search: from the K beams of each example (scores (B, K), logp (B*K, V))
    the 2K best candidates; those ending in EOS among the K best become hypotheses (score / norm)
    in hyps, the others the K new beams. Marks examples done (in `done`).
    -> [(score, source row, token)] for the B*K new beams; dead beams (done examples, too few
    candidates) score -inf."""
    B, K = scores.shape
    V = logp.size(-1)
    top, flat = (scores.view(-1, 1) + logp).view(B, K * V).topk(min(2 * K, K * V), dim=1)
    top, beam, tok = top.tolist(), (flat // V).tolist(), (flat % V).tolist()
    live = []
    for b in range(B):
        keep = []
        for rank in range(len(top[b]) if not done[b] else 0):
            s, row, t = top[b][rank], b * K + beam[b][rank], tok[b][rank]
            if s == -math.inf or len(keep) == K:
                break
            if t == eos_id:
                if rank < K:
                    hyps[b].append((s / norm, seqs[row]))
            else:
                keep.append((s, row, t))
        keep += [(-math.inf, b * K, 0)] * (K - len(keep))
        if not done[b]:  # nothing left to explore, or no live beam beats the K best hypotheses
            worst = sorted(h[0] for h in hyps[b])[-K] if len(hyps[b]) >= K else -math.inf
            done[b] = keep[0][0] == -math.inf or worst >= keep[0][0] / norm
        live += keep
    return live


def generate_ids(model, prompt_ids, max_new_tokens, batch_size=32, eos_id=None, pad_id=0,
                 num_beams=1, length_penalty=1.0, progress=None):
    """Continuations of token-id prompts (each cut before its first EOS), in the order given.
    Batches are taken in order of prompt length, longest first, left-padded. progress(done, total)
    is called after each batch."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    device = model.embed.weight.device
    out = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        batch = [prompt_ids[i] for i in order[start:start + batch_size]]
        T = max(map(len, batch))
        idx = torch.tensor([[pad_id] * (T - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch], device=device)
        if num_beams == 1:
            new = fast.generate(model, idx, max_new_tokens, eos_id=eos_id, attention_mask=mask)
            new = new[:, T:].tolist()
        else:
            new = beam_search(model, idx, mask, max_new_tokens, num_beams, eos_id, length_penalty)
        for i, ids in zip(order[start:start + batch_size], new):
            out[i] = ids[:ids.index(eos_id)] if eos_id in ids else ids
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return out


def generate_batch(model, tok, prompts, max_new_tokens, batch_size=32, num_beams=1,
                   length_penalty=1.0, progress=None):
    """Greedy (or beam) responses to text prompts, decoded, in the order given. A prompt that leaves
    no room for max_new_tokens within the model's block_size is cut from the left (BOS kept), with a
    warning."""
    n_soft = model.prompt.n_tokens if model.prompt is not None else 0
    room = model.config.block_size - max_new_tokens - n_soft
    bos = getattr(tok, "add_bos", True)
    if room < 1 + bos:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"block_size {model.config.block_size}")
    ids = [tok.encode(p, bos=bos) for p in prompts]
    cut = sum(len(x) > room for x in ids)
    if cut:
        warn(f"{cut} of {len(ids)} prompts are longer than {room} tokens "
             f"(block_size {model.config.block_size} - max_new_tokens {max_new_tokens}) "
             "and were cut from the left")
        ids = [x if len(x) <= room else x[:bos] + x[len(x) - room + bos:] for x in ids]
    new = generate_ids(model, ids, max_new_tokens, batch_size, tok.eos_id, tok.pad_id, num_beams,
                       length_penalty, progress)
    return [tok.decode(x) for x in new]


def progress_printer(name):
    """progress(done, total) that prints examples/s and the ETA to stderr."""
    t0 = time.time()

    def progress(done, total):
        rate = done / max(time.time() - t0, 1e-9)
        end = "\n" if done == total or not sys.stderr.isatty() else ""
        print(f"\r{name}: {done}/{total} examples, {rate:.1f} examples/s, "
              f"ETA {(total - done) / rate:.0f}s", end=end, file=sys.stderr, flush=True)
    return progress


def evaluate(model, tok, rows, dataset, kind=None, strict=False, template="alpaca",
             max_new_tokens=0, batch_size=32, num_beams=1, length_penalty=1.0, progress=True):
    """Generate a response to every row and score it. kind: None = from the dataset name, else the
    labels; max_new_tokens: 0 = the default for the kind (see DEFAULTS).
    Returns (records, accuracy); records in the rows' order:
    id, prompt, response, extracted, label, correct."""
    kind = get_kind(dataset, kind, labels=[r["answer"] for r in rows])
    max_new_tokens = max_new_tokens or min(32 if isinstance(kind, list) else 256,
                                           model.config.block_size // 2)
    prompts = [TEMPLATES[template](r["instruction"], r.get("input") or "") for r in rows]
    responses = generate_batch(model, tok, prompts, max_new_tokens, batch_size, num_beams,
                               length_penalty, progress_printer(dataset) if progress else None)
    records = []
    for i, (row, prompt, response) in enumerate(zip(rows, prompts, responses)):
        pred, correct = score(dataset, response_of(response), row["answer"], kind, strict)
        records.append(dict(id=i, prompt=prompt, response=response.strip(), extracted=pred,
                            label=row["answer"], correct=correct))
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


def load(model_dir, adapter_dir, device, dtype, quantize=""):
    """(model in eval mode, tokenizer, the adapter config's "extra" dict) for a base folder and
    optional adapter."""
    model = load_model(model_dir, device=device, dtype=dtype, quantize=quantize)
    tok = Tokenizer.from_pretrained(model_dir)
    check_vocab(tok, model.config.vocab_size, model_dir)
    extra = {}
    if adapter_dir:  # the adapter keeps its own dtype (adapters.py runs adapter maths in fp32)
        model = load_adapter(model, adapter_dir)  # raises for an adapter of another base model
        extra = read_adapter_config(adapter_dir).get("extra") or {}
    return model.eval(), tok, extra


def run(cfg, adapter_dir, rows, kind, device, dtype, out):
    """Evaluate the base model + adapter_dir ("" = none) on every set of rows; write
    <out>/<set>.jsonl and <out>/summary.json. Returns ({set: accuracy}, the summary)."""
    model, tok, extra = load(cfg["model"], adapter_dir, device, dtype, cfg["quantize"])
    if compile_setting(cfg["compile"], device):
        compile_blocks(model)  # decoding: a CUDA graph of compiled blocks (fast.DecodeStep)
    template = extra.get("template", "alpaca")
    if template not in TEMPLATES:
        raise ValueError(f"{adapter_dir}: unknown prompt template {template!r}; "
                         f"known: {', '.join(TEMPLATES)}")
    # the adapter's training file (train.py: "data")
    train = extra.get("train_data") or extra.get("data")
    if train and os.path.isfile(train):
        for name, c in leakage(load_rows(train, TRAIN_REQUIRE), rows).items():
            if c["normalized"]:
                warn(f"{name}: {c['normalized']} of {c['total']} test questions also occur in "
                     f"the adapter's training data {train}")
    accuracies, n = {}, {}
    for name, data in rows.items():
        t0 = time.time()
        try:
            records, accuracies[name] = evaluate(model, tok, data, name, kind, cfg["strict"],
                                                 template, cfg["max_new_tokens"],
                                                 cfg["batch_size"], cfg["num_beams"],
                                                 cfg["length_penalty"])
        except torch.cuda.OutOfMemoryError as e:
            raise MemoryError(f"{name}: out of memory on {device} with "
                              f"--batch_size={cfg['batch_size']} and "
                              f"--num_beams={cfg['num_beams']}: "
                              "lower --batch_size (results do not depend on it)") from e
        n[name] = len(records)
        write_atomic(os.path.join(out, f"{name}.jsonl"),
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"{name}: accuracy {100 * accuracies[name]:.1f}% of {len(records)} "
              f"({len(records) / (time.time() - t0):.1f} examples/s)", file=sys.stderr)
    summary = {k: {"accuracy": a, "n": n[k]} for k, a in accuracies.items()}
    summary["average"] = sum(accuracies.values()) / len(accuracies)
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/summary.json and {len(rows)} JSONL file(s)", file=sys.stderr)
    return accuracies, summary


def main(argv=None):
    """Returns {model row name: summary}: one row, or for the demo without --adapter the base and
    every adapter that train.py left in the demo folder."""
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    adapter_dirs = [cfg["adapter"]]
    if not cfg["model"]:  # the embedded demo
        demo = cfg["demo_dir"]
        cfg["model"] = os.path.join(demo, "base")
        test = os.path.join(demo, "data", "test.json")
        trained = [d for d in (os.path.join(demo, k) for k in KINDS)
                   if os.path.isfile(os.path.join(d, "adapter_config.json"))]
        adapter_dirs = [cfg["adapter"]] if cfg["adapter"] else ["", *trained]
        needed = [cfg["model"], *filter(None, adapter_dirs)] + ([] if cfg["dataset"] else [test])
        missing = [p for p in needed if not os.path.exists(p)]
        if adapter_dirs == [""]:  # no adapter trained yet
            missing.append(os.path.join(demo, "<adapter>"))
        if missing:
            raise FileNotFoundError("the embedded demo is not built "
                                    f"({', '.join(missing)} missing): "
                                    "run `python train.py` first, "
                                    "or pass --model=<dir> --dataset=<name>")
        datasets = (find_datasets(cfg["dataset"], cfg["data_dir"]) if cfg["dataset"]
                    else [("demo", test)])
    elif not cfg["dataset"]:
        raise ValueError(f"--dataset is required with --model: a name ({', '.join(DATASET_KIND)}), "
                         f"a group ({', '.join(GROUPS)}) or a path to a test.json")
    else:
        datasets = find_datasets(cfg["dataset"], cfg["data_dir"])
    kind = parse_kind(cfg["kind"])
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
    for out in outs.values():  # before the evaluation, not after it
        check_writable(out, "--out")
    for (row, out), adapter_dir in zip(outs.items(), adapter_dirs):
        table[row], summaries[row] = run(cfg, adapter_dir, rows, kind, device, dtype, out)
    print(markdown_table(table))
    # the demo: where its pictures are (plot.py)
    if cfg["model"] == os.path.join(cfg["demo_dir"], "base"):
        print("pictures: python plot.py (training curves and accuracy vs trainable parameters of "
              f"every run, in {cfg['demo_dir']}/loss.svg and results.svg)", file=sys.stderr)
    return summaries


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, KeyError, NotImplementedError, MemoryError) as e:
        sys.exit(f"eval.py: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
