"""eval.py on a tiny random LLaMA with a tiny sentencepiece tokenizer: scoring, the stop reason of
each response and the count of those cut by max_new_tokens, files and table, dataset lookup, config
and error messages. Its generation (batch-size invariance, stop ids, beam search against exhaustive
search) is tested in test_generate.py."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_hf_checkpoint, sentence, trained_adapter, truncate
from cli import load
from data.prepare import DataError, write_json
from data.template import format_prompt
from generate import MAX_NEW_TOKENS, STOP_TOKEN, Response
from model import Transformer
from presets import Config

import eval as ev


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model, tok, _ = load(tiny_dir, "", "cpu", torch.float32)
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


# ----------------------------------------------------------------------------------------- evaluate
def test_scoring_of_responses(loaded, monkeypatch):
    model, tok = loaded

    def run(dataset, responses, answers, **kw):
        stops = [STOP_TOKEN, MAX_NEW_TOKENS] * len(responses)
        monkeypatch.setattr(ev, "generate_batch", lambda model, tok, prompts, *a: [
            Response(text, stop) for text, stop in zip(responses, stops)])
        rows = [{"instruction": "q", "input": "x", "answer": a} for a in answers]
        records, acc = ev.evaluate(model, tok, rows, dataset, progress=False, **kw)
        assert [r["stop"] for r in records] == stops[:len(rows)]  # each record says why it ended
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
                         "--max_new_tokens=6", "--batch_size=3", "--overwrite=true"])
        rows = json.loads((tmp_path / "data" / name / "test.json").read_text())
        assert list(summary) == [name, "average"] and summary[name]["n"] == len(rows)
        assert json.loads((out / "summary.json").read_text()) == summary
        records = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in records] == list(range(len(rows)))
        assert [r["prompt"] for r in records] == [format_prompt(r["instruction"], r["input"])
                                                  for r in rows]
        assert [r["label"] for r in records] == [r["answer"] for r in rows]
        assert set(records[0]) == {"id", "prompt", "response", "stop", "extracted", "label",
                                   "correct"}
        assert summary[name]["accuracy"] == sum(r["correct"] for r in records) / len(records)
        # a random model rarely says EOS: most responses run into max_new_tokens, and are counted
        cut = sum(r["stop"] == MAX_NEW_TOKENS for r in records)
        assert {r["stop"] for r in records} <= {STOP_TOKEN, MAX_NEW_TOKENS} and cut > 0
        assert summary[name]["cut"] == cut
        captured = capsys.readouterr()
        assert f"{cut} cut by max_new_tokens" in captured.err
        table = captured.out.strip().splitlines()
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
        ev.find_test_sets("commonsense", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SVAMP: no SVAMP/test.json"):
        # a single named set: an error; names match case-insensitively
        ev.find_test_sets("svamp", str(tmp_path))


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
    with pytest.raises(ValueError, match="cannot infer the answer type"):
        ev.main([f"--model={tiny_dir}", f"--dataset={words}", "--max_new_tokens=1",
                 f"--out={tmp_path / 'o'}"])
    summary = main1([f"--model={tiny_dir}", f"--dataset={words}", "--answer_type=yes,no",
                     "--max_new_tokens=1", f"--out={tmp_path / 'o'}"])
    assert summary["words"]["n"] == 2
    with pytest.raises(ValueError, match="--dataset is required"):
        ev.main([f"--model={tiny_dir}"])


def test_out_of_memory_gives_a_hint(tiny_dir, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(ev, "generate_batch", oom)
    path = write_set(tmp_path / "numbers", number_rows(2))
    with pytest.raises(MemoryError, match=r"numbers: out of memory on cpu with --batch_size=7 "
                                          r".*lower --batch_size"):
        ev.main([f"--model={tiny_dir}", f"--dataset={path}", "--batch_size=7",
                 f"--out={tmp_path / 'o'}"])


def test_config_parsing():
    cfg = ev.parse_config(["--batch_size=8", "--strict", "--dtype=float32",
                           "--answer_type=number"])
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
    assert ev.parse_answer_type("") is None and ev.parse_answer_type("option") == "option"
    assert ev.parse_answer_type("true, false") == ["true", "false"]
    with pytest.raises(ValueError, match="--answer_type=yes: expected number, option or"):
        ev.parse_answer_type("yes")


# ----------------------------------------------------------------------------------- adapters, demo
def test_adapter_template_leakage_and_base_check(tiny_dir, tmp_path, capsys, monkeypatch):
    adapters = pytest.importorskip("adapters")
    adapter_io = pytest.importorskip("adapter_io")
    monkeypatch.chdir(tmp_path)
    rows = number_rows(3)
    write_set(tmp_path / "gsm8k", rows)
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"instruction": rows[1]["instruction"], "output": "x"}]))
    model, _, _ = load(tiny_dir, "", "cpu", torch.float32)
    adapters.add_adapter(model, "lora", r=2, alpha=4)
    # train.py names the training file "data"
    for name, template in (("mylora", "alpaca"), ("other", "vicuna")):
        adapter_io.save_adapter(model, tmp_path / name,
                                extra={"template": template, "data": str(train)})
    args = [f"--model={tiny_dir}", "--dataset=gsm8k", f"--data_dir={tmp_path}",
            "--max_new_tokens=3"]
    summary = main1(args + ["--adapter_dir=mylora"])
    assert ((tmp_path / "out" / "eval" / "mylora" / "summary.json").exists()
            and summary["gsm8k"]["n"] == 3)
    captured = capsys.readouterr()
    assert "gsm8k: 1 of 3 test questions also occur in the adapter's training data" in captured.err
    assert f"| {tiny_dir.name} + mylora |" in captured.out
    with pytest.raises(ValueError, match="unknown prompt template 'vicuna'; known: alpaca"):
        ev.main(args + ["--adapter_dir=other"])
    other = Transformer(Config.from_name("tiny-llama", vocab_size=360, n_layer=1))
    adapters.add_adapter(other, "lora", r=2, alpha=4)
    adapter_io.save_adapter(other, tmp_path / "wrong")
    with pytest.raises(ValueError, match="another base model"):
        ev.main(args + ["--adapter_dir=wrong"])


def test_demo_evaluates_the_base_and_every_trained_adapter(tiny_dir, tmp_path, capsys, monkeypatch):
    """`python eval.py` after `python train.py --adapter=<kind>` runs: a row for the base, then one
    per adapter."""
    adapters = pytest.importorskip("adapters")
    adapter_io = pytest.importorskip("adapter_io")
    monkeypatch.chdir(tmp_path)
    demo = tmp_path / "demo"
    shutil.copytree(tiny_dir, demo / "base")
    write_set(demo / "data", number_rows(4))
    for kind in ("series", "lora"):
        model = adapters.add_adapter(load(tiny_dir, "", "cpu", torch.float32)[0], kind)
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
    only = ev.main([f"--adapter_dir={demo / 'lora'}", "--max_new_tokens=4",
                    f"--out={tmp_path / 'one'}", f"--demo_dir={demo}"])
    assert list(only) == ["base + lora"] and only["base + lora"] == summaries["base + lora"]


def test_demo_missing_tells_to_run_train(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run `python train.py` first"):
        ev.main([f"--demo_dir={tmp_path / 'demo'}"])
    # the command line: a one-line message, no traceback
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py")], cwd=tmp_path,
                       capture_output=True, text=True)
    assert (r.returncode == 1 and "run `python train.py` first" in r.stderr
            and "Traceback" not in r.stderr)


def test_eval_demo_table_points_to_the_pictures(tiny_dir, tmp_path, capsys):
    shutil.copytree(tiny_dir, tmp_path / "base")
    trained_adapter(tmp_path / "base", "lora", tmp_path / "lora", r=2)
    rows = [dict(instruction="how many pens", input="", output="3", answer="3")] * 2
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.json").write_text(json.dumps(rows))
    ev.main([f"--demo_dir={tmp_path}", "--max_new_tokens=4", f"--out={tmp_path / 'eval'}"])
    assert "pictures: python plot.py" in capsys.readouterr().err


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
def test_damaged_model_is_one_line_on_the_command_line(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path / "m", "llama")
    truncate(path / "model.safetensors")
    write_json(tmp_path / "set" / "test.json", [{"instruction": "1 + 1?", "answer": "2"}])
    argv = [f"--model={path}", f"--dataset={tmp_path / 'set'}", f"--out={tmp_path / 'out'}"]
    p = subprocess.run([sys.executable, "eval.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"eval.py: error: {path / 'model.safetensors'}: cannot read it")


def test_eval_checks_out_before_evaluating_and_reports_duplicates(train_base, tmp_path,
                                                                  monkeypatch, capsys):
    rows = [{"instruction": "1 + 1?", "answer": "2"}] * 2
    write_json(tmp_path / "set" / "test.json", rows)
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(ev, "evaluate",
                        lambda *a, **k: pytest.fail("evaluated before checking --out"))
    with pytest.raises(ValueError, match="--out=.*file is a file"):
        ev.main([f"--model={train_base}", f"--dataset={tmp_path / 'set'}",
                 f"--out={tmp_path / 'file'}"])
    assert "1 rows repeat an earlier row exactly (rows 1)" in capsys.readouterr().err


def test_a_used_out_is_refused_unless_overwrite(tiny_dir, tmp_path):
    """eval.py writes over no earlier results: a --out holding summary.json or a set's .jsonl is
    refused before anything is evaluated, unless --overwrite=true."""
    nums = write_set(tmp_path / "data" / "numbers", number_rows(3))
    args = [f"--model={tiny_dir}", f"--dataset={nums}", "--max_new_tokens=4",
            f"--out={tmp_path / 'ev'}"]
    main1(args)
    before = (tmp_path / "ev" / "summary.json").read_text()
    with pytest.raises(ValueError, match="already holds numbers.jsonl, summary.json.*--overwrite"):
        main1(args)
    assert (tmp_path / "ev" / "summary.json").read_text() == before
    main1(args + ["--overwrite=true"])
