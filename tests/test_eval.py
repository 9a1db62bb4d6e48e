"""eval.py on a tiny random LLaMA with a tiny sentencepiece tokenizer: batch-size invariance, EOS,
beam search against exhaustive search, files and table, dataset lookup, config and error
messages."""
import itertools
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, left_pad, randomize_, sentence
from data.prepare import DataError
from data.template import format_prompt
from model import Config, Transformer

import eval as ev

@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model, tok, _ = ev.load(tiny_dir, "", "cpu", torch.float32)
    return model, tok


def write_set(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.json").write_text(json.dumps(rows))
    return folder / "test.json"


def number_rows(n, seed=0):
    rng = random.Random(seed)
    return [{"instruction": sentence(rng, 2, 25) + "?", "input": "", "output": "",
             "answer": str(rng.randint(0, 9))}
            for _ in range(n)]


def option_rows(n, seed=1):
    rng = random.Random(seed)
    return [{"instruction": sentence(rng, 2, 10), "input": "A) 1 B) 2 C) 3",
             "answer": rng.choice("ABC")}
            for _ in range(n)]


# --------------------------------------------------------------------------------------- generation
def test_batch_size_does_not_change_predictions(loaded):
    model, tok = loaded
    rng = random.Random(1)
    prompts = [format_prompt(sentence(rng, 1, 40)) for _ in range(12)]
    assert len({len(tok.encode(p)) for p in prompts}) > 8  # lengths vary: batches are padded
    one = ev.generate_batch(model, tok, prompts, 12, batch_size=1)
    assert ev.generate_batch(model, tok, prompts, 12, batch_size=8) == one
    assert ev.generate_batch(model, tok, prompts, 12, batch_size=5) == one
    assert len(set(one)) > 6  # different prompts, different answers: the order was restored


def test_eos_stops_and_is_cut(loaded):
    model, tok = loaded
    prompts = [tok.encode(format_prompt(w), bos=True)
               for w in ("how many apples", "Tom buys more pens and")]
    free = ev.generate_ids(model, prompts, 10, batch_size=2)  # no EOS: 10 tokens each
    assert [len(x) for x in free] == [10, 10]
    eos = free[0][3]
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = ev.generate_ids(model, prompts[:1], 10, eos_id=eos)
    finally:
        hook.remove()
    first = free[0].index(eos)
    assert got == [free[0][:first]]
    # prefill + one step per token before EOS: generation stopped there
    assert len(calls) == first + 1
    both = ev.generate_ids(model, prompts, 10, batch_size=2, eos_id=eos)
    assert both == [x[:x.index(eos)] if eos in x else x for x in free]  # the other row went on


def test_long_prompts_are_cut_from_the_left(loaded, capsys, monkeypatch):
    model, tok = loaded
    prompts = [format_prompt("how many " * 30), format_prompt("Tom")]
    room = len(tok.encode(prompts[1], bos=True)) + 5  # the short prompt fits, the long one does not
    monkeypatch.setattr(model.config, "block_size", room + 8)
    out = ev.generate_batch(model, tok, prompts, 8, batch_size=2)
    assert (len(out) == 2
            and f"1 of 2 prompts are longer than {room} tokens" in capsys.readouterr().err)
    ids = tok.encode(prompts[0], bos=True)
    cut = [ids[:1] + ids[1 - room:]]  # BOS kept
    assert [tok.decode(x) for x in ev.generate_ids(model, cut, 8, eos_id=tok.eos_id)] == out[:1]
    with pytest.raises(ValueError, match="no room"):
        ev.generate_batch(model, tok, prompts, room + 8)


# -------------------------------------------------------------------------------------- beam search
@pytest.fixture(scope="module")
def small_vocab_model():
    torch.manual_seed(0)
    model = randomize_(Transformer(Config.from_name("tiny-llama", vocab_size=8)), seed=3).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # peaked distributions: beams, greedy and the optimum disagree
    return model


def exhaustive_best(model, prompt, depth, eos, length_penalty):
    """The best continuation over every sequence of up to `depth` tokens that ends in EOS, and every
    one of exactly `depth` tokens, scored by a full forward pass without cache
    (score = sum log p / len ** length_penalty)."""
    V = model.config.vocab_size
    words = [t for t in range(V) if t != eos]
    cands = [list(s) + [eos] for n in range(depth) for s in itertools.product(words, repeat=n)]
    cands += [list(s) for s in itertools.product(words, repeat=depth)]
    scores = []
    with torch.no_grad():
        for n in range(1, depth + 1):  # one forward pass per length
            seqs = torch.tensor([c for c in cands if len(c) == n])
            logp = F.log_softmax(
                model(torch.cat((torch.tensor(prompt).expand(len(seqs), -1), seqs), 1))[0], -1)
            logp = (logp[:, len(prompt) - 1:-1].gather(2, seqs[:, :, None]).sum((1, 2))
                    / n ** length_penalty)
            scores += zip(logp.tolist(), seqs.tolist())
    best = max(scores)[1]
    return best[:-1] if best[-1] == eos else best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_exhaustive_optimum(small_vocab_model, length_penalty):
    # with num_beams >= 7 ** 2 live prefixes nothing is pruned within 3 steps, so beam search
    # must be exact
    model, eos = small_vocab_model, 2
    prompts = [[1, 5, 3], [1, 4], [1, 7, 6, 5, 3, 0]]
    idx, mask = left_pad([torch.tensor(p) for p in prompts])
    got = ev.beam_search(model, idx, mask, 3, num_beams=64, eos_id=eos,
                         length_penalty=length_penalty)
    want = [exhaustive_best(model, p, 3, eos, length_penalty) for p in prompts]
    assert got == want
    greedy = ev.generate_ids(model, prompts, 3, eos_id=eos)
    # the test is not trivial
    assert any(g != w for g, w in zip(greedy, want)) or length_penalty == 1.0


def test_one_beam_is_greedy_and_beams_are_batch_invariant(small_vocab_model, loaded):
    model, tok = loaded
    rng = random.Random(2)
    prompts = [tok.encode(format_prompt(sentence(rng, 1, 30)), bos=True) for _ in range(5)]
    greedy = ev.generate_ids(model, prompts, 10, batch_size=5, eos_id=tok.eos_id)
    assert ev.generate_ids(model, prompts, 10, batch_size=5, eos_id=tok.eos_id,
                           num_beams=1) == greedy
    idx, mask = left_pad([torch.tensor(p) for p in prompts])
    assert ev.beam_search(model, idx, mask, 10, num_beams=1, eos_id=tok.eos_id) == greedy
    small = small_vocab_model  # EOS is likely here, so hypotheses finish at different steps
    short = [[1, 5, 3], [1, 4], [1, 7, 6, 5, 3, 0], [1, 2, 2]]
    assert ev.generate_ids(small, short, 6, eos_id=2) == [
        ev.beam_search(small, *left_pad([torch.tensor(p)]), 6, num_beams=1, eos_id=2)[0]
        for p in short]
    batched = ev.generate_ids(small, short, 6, batch_size=4, eos_id=2, num_beams=3)
    assert batched == ev.generate_ids(small, short, 6, batch_size=1, eos_id=2, num_beams=3)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_scores_match_a_full_forward(small_vocab_model, length_penalty):
    # the cached, reordered beams must score each hypothesis as a plain forward pass over
    # prompt + hypothesis does
    model, eos = small_vocab_model, 2
    prompts = [[1, 5, 3], [1, 4], [1, 7, 6, 5, 3, 0], [1, 2, 2], [1, 3], [1, 6, 0, 0, 4]]
    got = ev.beam_search(model, *left_pad([torch.tensor(p) for p in prompts]), 8, num_beams=3,
                         eos_id=eos, length_penalty=length_penalty, return_scores=True)
    for p, (score, ids) in zip(prompts, got):
        seq = ids + [eos] * (len(ids) < 8)
        logp = F.log_softmax(model(torch.tensor([p + seq]))[0][0, len(p) - 1:-1], -1)
        total = logp.gather(1, torch.tensor(seq)[:, None]).sum().item()
        assert score == pytest.approx(total / len(seq) ** length_penalty, abs=1e-5)
    assert {len(ids) for _, ids in got} != {8}  # some finished early with EOS


# ----------------------------------------------------------------------------------------- evaluate
def test_scoring_of_responses(loaded, monkeypatch):
    model, tok = loaded

    def run(dataset, responses, answers, **kw):
        monkeypatch.setattr(ev, "generate_batch", lambda model, tok, prompts, *a: responses)
        rows = [{"instruction": "q", "input": "x", "answer": a} for a in answers]
        records, acc = ev.evaluate(model, tok, rows, dataset, progress=False, **kw)
        return [r["extracted"] for r in records], [r["correct"] for r in records], acc, records

    got, correct, acc, records = run("gsm8k",
                                     ["The answer is 1,234.", "3 then 4\n### Response:\n5", "none"],
                                     ["1234", "4", "7"])
    # the text after a second "### Response:" is not read, as in LLM-Adapters
    assert got == [1234.0, 4.0, None]
    assert correct == [True, True, False] and acc == 2 / 3
    assert (records[0]["prompt"] == format_prompt("q", "x") and records[0]["id"] == 0
            and records[0]["label"] == "1234")
    responses = ["B", "Answer: (C)", "(d)"]
    # the paper's reading
    assert run("AQuA", responses, "BCD")[:3] == (["B", "A", None], [True, False, False], 1 / 3)
    assert run("AQuA", responses, "BCD", strict=True)[:3] == (["B", "C", None], [True, True, False],
                                                              2 / 3)
    assert run("boolq", ["True", "it is false"], ["true", "false"])[0] == [None, "false"]
    assert run("boolq", ["True", "it is false"], ["true", "false"],
               strict=True)[0] == ["true", "false"]


def main1(argv):
    """eval.main for one model row: its summary."""
    (summary,) = ev.main(argv).values()
    return summary


def test_main_writes_jsonl_summary_and_table(tiny_dir, tmp_path, capsys):
    nums = write_set(tmp_path / "data" / "numbers", number_rows(7))
    opts = write_set(tmp_path / "data" / "letters", option_rows(5))
    out = tmp_path / "res"
    for path, name in ((nums, "numbers"), (opts.parent, "letters")):  # a test.json or its folder
        summary = main1([f"--model={tiny_dir}", f"--dataset={path}", f"--out={out}",
                         "--max_new_tokens=6", "--batch_size=3"])
        rows = json.loads((tmp_path / "data" / name / "test.json").read_text())
        assert list(summary) == [name, "average"] and summary[name]["n"] == len(rows)
        assert json.loads((out / "summary.json").read_text()) == summary
        records = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in records] == list(range(len(rows)))
        assert [r["prompt"] for r in records] == [format_prompt(r["instruction"], r["input"])
                                                  for r in rows]
        assert [r["label"] for r in records] == [r["answer"] for r in rows]
        assert set(records[0]) == {"id", "prompt", "response", "extracted", "label", "correct"}
        assert summary[name]["accuracy"] == sum(r["correct"] for r in records) / len(records)
        table = capsys.readouterr().out.strip().splitlines()
        assert (table[0] == f"| Model | {name} | Avg |"
                and table[2].startswith(f"| {tiny_dir.name} | "))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_markdown_table_layout():
    table = {"llama": {"gsm8k": 0.25, "AQuA": 0.25}, "llama + lora": {"gsm8k": 0.5, "AQuA": 0.25}}
    assert ev.markdown_table(table).splitlines() == [
        "| Model | gsm8k | AQuA | Avg |", "|---|---:|---:|---:|", "| llama | 25.0 | 25.0 | 25.0 |",
        "| llama + lora | 50.0 | 25.0 | 37.5 |"]


def test_limit_and_beams(tiny_dir, tmp_path):
    path = write_set(tmp_path / "gsm8k", number_rows(6))
    summary = main1([f"--model={tiny_dir}", "--dataset=gsm8k", f"--data_dir={tmp_path}",
                     f"--out={tmp_path / 'o'}", "--limit=3", "--max_new_tokens=4", "--num_beams=2"])
    assert (summary["gsm8k"]["n"] == 3
            and len((tmp_path / "o" / "gsm8k.jsonl").read_text().splitlines()) == 3)
    assert path.exists()


def test_group_skips_missing_sets_with_a_warning(tiny_dir, tmp_path, capsys):
    write_set(tmp_path / "gsm8k", number_rows(2))
    write_set(tmp_path / "AQuA", option_rows(2))
    summary = main1([f"--model={tiny_dir}", "--dataset=math", f"--data_dir={tmp_path}",
                     f"--out={tmp_path / 'o'}", "--max_new_tokens=2"])
    assert list(summary) == ["gsm8k", "AQuA", "average"]
    err = capsys.readouterr().err
    assert "skipping 5 missing set(s): AddSub, MultiArith, SingleEq, mawps, SVAMP" in err
    with pytest.raises(FileNotFoundError, match="none of boolq"):
        ev.find_datasets("commonsense", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SVAMP: no SVAMP/test.json"):
        # a single named set: an error; names match case-insensitively
        ev.find_datasets("svamp", str(tmp_path))


def test_dataset_errors(tiny_dir, tmp_path):
    with pytest.raises(ValueError,
                       match=r"unknown dataset 'nope'; known: AddSub, .*gsm8k.*; groups: math"):
        ev.main([f"--model={tiny_dir}", "--dataset=nope", f"--data_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="missing.json: no such test file"):
        ev.main([f"--model={tiny_dir}", f"--dataset={tmp_path / 'missing.json'}"])
    bad = write_set(tmp_path / "bad",
                    [{"instruction": "q", "answer": "1"}, {"instruction": "no answer"}])
    with pytest.raises(DataError, match=rf"{bad}: row 1: missing field 'answer'"):
        ev.main([f"--model={tiny_dir}", f"--dataset={bad}"])
    words = write_set(tmp_path / "words",
                      [{"instruction": "q", "answer": "yes"}, {"instruction": "r", "answer": "no"}])
    with pytest.raises(ValueError, match="cannot infer the answer kind"):
        ev.main([f"--model={tiny_dir}", f"--dataset={words}", "--max_new_tokens=1",
                 f"--out={tmp_path / 'o'}"])
    summary = main1([f"--model={tiny_dir}", f"--dataset={words}", "--kind=yes,no",
                     "--max_new_tokens=1", f"--out={tmp_path / 'o'}"])
    assert summary["words"]["n"] == 2
    with pytest.raises(ValueError, match="--dataset is required"):
        ev.main([f"--model={tiny_dir}"])


def test_out_of_memory_gives_a_hint(tiny_dir, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(ev, "generate_ids", oom)
    path = write_set(tmp_path / "numbers", number_rows(2))
    with pytest.raises(MemoryError, match=r"numbers: out of memory on cpu with --batch_size=7 "
                                          r".*lower --batch_size"):
        ev.main([f"--model={tiny_dir}", f"--dataset={path}", "--batch_size=7",
                 f"--out={tmp_path / 'o'}"])


def test_config_parsing():
    cfg = ev.parse_config(["--batch_size=8", "--strict", "--dtype=float32", "--kind=number"])
    assert cfg["batch_size"] == 8 and cfg["strict"] is True and cfg["num_beams"] == 1
    assert ev.parse_config(["--strict=false"])["strict"] is False
    spaced = ev.parse_config(["--dataset", "gsm8k", "--strict", "--batch_size", "8",
                              "--num_beams", "4"])
    assert spaced == ev.parse_config(["--dataset=gsm8k", "--strict", "--batch_size=8",
                                      "--num_beams=4"])
    assert ev.parse_config(["--strict", "false", "--limit", "3"])["strict"] is False
    for argv, match in ((["--batchsize=8"], "unknown setting --batchsize; settings: model"),
                        (["gsm8k"], "gsm8k: no such config file"),
                        (["--batch_size=big"], "--batch_size=big: expected int"),
                        (["--limit"], "--limit: expected --limit=value"),
                        (["--strict=maybe"], "expected true or false"),
                        (["--num_beams=0"], "at least 1"),
                        (["--dtype=fp8"], "expected bfloat16, float16")):
        with pytest.raises(ValueError, match=match):
            ev.parse_config(argv)
    assert ev.parse_kind("") is None and ev.parse_kind("option") == "option"
    assert ev.parse_kind("true, false") == ["true", "false"]


# ----------------------------------------------------------------------------------- adapters, demo
def test_adapter_template_leakage_and_base_check(tiny_dir, tmp_path, capsys, monkeypatch):
    adapters = pytest.importorskip("adapters")
    adapter_io = pytest.importorskip("adapter_io")
    monkeypatch.chdir(tmp_path)
    rows = number_rows(3)
    write_set(tmp_path / "gsm8k", rows)
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"instruction": rows[1]["instruction"], "output": "x"}]))
    model, _, _ = ev.load(tiny_dir, "", "cpu", torch.float32)
    adapters.add_adapter(model, "lora", r=2, alpha=4)
    # train.py names the training file "data"
    for name, template in (("mylora", "alpaca"), ("other", "vicuna")):
        adapter_io.save_adapter(model, tmp_path / name,
                                extra={"template": template, "data": str(train)})
    args = [f"--model={tiny_dir}", "--dataset=gsm8k", f"--data_dir={tmp_path}",
            "--max_new_tokens=3"]
    summary = main1(args + ["--adapter=mylora"])
    assert ((tmp_path / "out" / "eval" / "mylora" / "summary.json").exists()
            and summary["gsm8k"]["n"] == 3)
    captured = capsys.readouterr()
    assert "gsm8k: 1 of 3 test questions also occur in the adapter's training data" in captured.err
    assert f"| {tiny_dir.name} + mylora |" in captured.out
    with pytest.raises(ValueError, match="unknown prompt template 'vicuna'; known: alpaca"):
        ev.main(args + ["--adapter=other"])
    other = Transformer(Config.from_name("tiny-llama", vocab_size=360, n_layer=1))
    adapters.add_adapter(other, "lora", r=2, alpha=4)
    adapter_io.save_adapter(other, tmp_path / "wrong")
    with pytest.raises(ValueError, match="another base model"):
        ev.main(args + ["--adapter=wrong"])


def test_demo_evaluates_the_base_and_every_trained_adapter(tiny_dir, tmp_path, capsys, monkeypatch):
    """`python eval.py` after `python train.py --adapter=...` runs: a row for the base, then one per
    adapter."""
    adapters = pytest.importorskip("adapters")
    adapter_io = pytest.importorskip("adapter_io")
    monkeypatch.chdir(tmp_path)
    demo = tmp_path / "demo"
    shutil.copytree(tiny_dir, demo / "base")
    write_set(demo / "data", number_rows(4))
    for kind in ("series", "lora"):
        model = adapters.add_adapter(ev.load(tiny_dir, "", "cpu", torch.float32)[0], kind)
        for p in adapters.adapter_state(model, "default").values():
            p.normal_(0, 0.5)  # trained adapters: each changes the answers
        adapter_io.save_adapter(model, demo / kind)
    summaries = ev.main(["--max_new_tokens=4", f"--demo_dir={demo}"])
    # adapters in adapters.py's order
    assert list(summaries) == ["base", "base + lora", "base + series"]
    table = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" |")[0] for line in table[2:]] == ["| base", "| base + lora",
                                                           "| base + series"]
    responses = {}
    for row, sub in (("base", "base"), ("base + lora", "lora"), ("base + series", "series")):
        lines = (tmp_path / "out" / "eval" / sub / "demo.jsonl").read_text().splitlines()
        assert summaries[row]["demo"]["n"] == len(lines) == 4
        responses[sub] = [json.loads(line)["response"] for line in lines]
    assert responses["lora"] != responses["base"] and responses["series"] != responses["base"]
    # one adapter named on the command line: that row only, the same answers
    only = ev.main([f"--adapter={demo / 'lora'}", "--max_new_tokens=4", f"--out={tmp_path / 'one'}",
                    f"--demo_dir={demo}"])
    assert list(only) == ["base + lora"] and only["base + lora"] == summaries["base + lora"]


def test_demo_missing_tells_to_run_train(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run `python train.py` first"):
        ev.main([f"--demo_dir={tmp_path / 'demo'}"])
    # the command line: a one-line message, no traceback
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py")], cwd=tmp_path,
                       capture_output=True, text=True)
    assert (r.returncode == 1 and "run `python train.py` first" in r.stderr
            and "Traceback" not in r.stderr)
