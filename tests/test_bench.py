"""bench.py smoke tests on the CPU (tiny-llama): every adapter, both tasks, the HF+PEFT baseline,
the suite, and bad settings. No timing assertions: speed lives in the printed numbers, not in
tests."""
import json
import os
import subprocess
import sys

import pytest

import bench
from cli import ConfigError

SMALL = ["--steps=1", "--warmup=0", "--seq_len=16", "--prompt_len=8", "--new_tokens=4"]


@pytest.mark.parametrize("adapter", ["lora", "dora", "ia3", "series", "parallel", "prefix",
                                     "prompt"])
def test_train_smoke(adapter):
    res = bench.main([f"--adapter={adapter}", "--micro_batch=2", *SMALL])
    assert res["ours"]["tok_s"] > 0 and res["ours"]["trainable"] > 0
    assert res["ours"]["first_step_s"] > 0
    assert res["model"] == "tiny-llama" and res["compiled"] is False  # auto: off on the CPU


def test_generate_with_lora_and_baseline():
    pytest.importorskip("peft")
    res = bench.main(["--task=generate", "--adapter=lora", "--batch=2", *SMALL, "--baseline"])
    assert res["ours"]["new_tok_s"] > 0 and res["hf_peft"]["new_tok_s"] > 0 and res["speedup"] > 0


def test_suite_runs_rows_in_their_own_processes(tmp_path, capsys):
    out = tmp_path / "suite.json"
    report = bench.main(["--suite=lora4,decode1", f"--out={out}", *SMALL])
    assert json.loads(out.read_text()) == report
    rows = {r["key"]: r["result"] for r in report["rows"]}
    assert rows["lora4"]["ours"]["tok_s"] > 0 and rows["decode1"]["ours"]["new_tok_s"] > 0
    assert "--micro_batch=4" in report["rows"][0]["args"] and rows["decode1"]["adapter"] == "none"
    table = capsys.readouterr().out
    assert "| LoRA, micro-batch 4 |" in table and "| decode, batch 1, +4 |" in table
    if "skipped" not in rows["lora4"]["hf_peft"]:  # transformers + peft installed: side by side
        assert rows["lora4"]["speedup"] > 0 and table.count("×") >= 1


def test_bare_suite_means_all_and_the_footer_names_the_rows_torch(monkeypatch, tmp_path):
    """`python bench.py --suite`, as the README writes it, runs every row (each in its own process;
    here the processes are stood in for). The footer gives the torch of the rows, not this one's."""
    ran = []

    def row(args, settings):
        ran.append(settings)
        if settings.get("fsdp"):
            return {"skipped": "FSDP needs more than one GPU; this machine has 0"}
        return {"device": "H200", "torch": "2.11.0+cu130", "ours": {"tok_s": 10, "peak_gib": 1.0,
                                                                    "first_step_s": 1.0}}
    monkeypatch.setattr(bench, "run_row", row)
    report = bench.main(["--suite", f"--out={tmp_path / 's.json'}"])
    assert [r["key"] for r in report["rows"]] == list(bench.SUITE) and len(ran) == len(bench.SUITE)
    assert report["table"].endswith("(H200, torch 2.11.0+cu130; GiB: peak allocated)")
    assert "| LoRA, micro-batch 4, FSDP over every GPU | skipped: FSDP needs more than one GPU" \
        in report["table"]
    assert bench.main(["--suite", "--steps=1", f"--out={tmp_path / 's.json'}"])["rows"]


def test_cpu_rows_report_peak_resident_memory():
    res = bench.main(["--micro_batch=2", *SMALL])
    assert 0.05 < res["ours"]["peak_gib"] < 64  # the process's resident high-water mark, in GiB


def test_packed_and_padded_side_by_side():
    """One run times packed rows and padded ones (grouped by length, and in random order) on the
    same examples; packed rows hold no padding, the padded ones some."""
    res = bench.main(["--lengths=math", "--pack", "--micro_batch=4", *SMALL,
                      "--seq_len=256"])["ours"]
    assert res["padding"] == 0.0 and res["tok_s"] > 0
    ways = res["compared"]
    assert set(ways) == {"padded, grouped by length", "padded, random order"}
    random_order, grouped = ways["padded, random order"], ways["padded, grouped by length"]
    assert random_order["padding"] > grouped["padding"] > 0
    lengths = bench.draw_lengths("math", 3000, 256)
    assert 120 < sum(lengths) / len(lengths) < 150 and max(lengths) <= 256  # math_data's shape


def test_loss_rows_change_only_the_loss():
    full = bench.main(["--vocab_size=1000", "--chunked_loss=false", *SMALL])
    chunked = bench.main(["--vocab_size=1000", *SMALL])
    assert full["ours"]["trainable"] == chunked["ours"]["trainable"] and chunked["ours"]["tok_s"]


def test_fsdp_row_under_torchrun_on_two_cpu_processes():
    """The FSDP path of bench.py on gloo: two processes, each its part of the base; rank 0 prints
    the one JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "bench.py", "--fsdp", "--micro_batch=2", *SMALL],
                       capture_output=True, text=True, timeout=600, env=env,
                       cwd=os.path.dirname(os.path.abspath(bench.__file__)))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["processes"] == 2 and res["ours"]["tok_s_all"] == 2 * res["ours"]["tok_s"]


BAD = {  # one setting -> the start of its one-line error
    "--nope=1": "unknown setting --nope", "--adapter=adalora": "--adapter=adalora: expected one of",
    "--adapter=none": "or none with --task=generate", "--compile=maybe": "--compile=maybe",
    "--baseline=ture": "--baseline=ture: expected true or false",
    "--suite=lora5": "--suite=lora5: expected all or some of",
    "--model=llama-8b": "--model=llama-8b: expected a preset",
    "--task=decode": "--task=decode: expected one of train, generate",
    "--lengths=code": "--lengths=code: expected one of math, demo",
    "--pack": "--pack needs --lengths",
    "--fsdp": "--fsdp: start bench.py with torchrun",
    "--tokenizer=x": "--tokenizer=x: only with --task=tokenizer",
}


@pytest.mark.parametrize("setting", BAD)
def test_bad_settings_are_one_line(setting):
    with pytest.raises(SystemExit, match=BAD[setting]):
        bench.main([setting])


def test_ops_counts_the_lean_adapter_path():
    # the lean path: per LoRA call one cast of x, dropout (3 ops on the CPU), two matmuls, one add
    # that scales, casts and adds (it was 9: a second cast and a multiply more)
    res = bench.main(["--task=ops", "--adapter=lora"])["ours"]
    assert 4 <= res["forward_ops_per_call"] <= 7 and res["backward_ops_per_layer"] > 0
    series = bench.main(["--task=ops", "--adapter=series"])["ours"]
    assert 3 <= series["forward_ops_per_layer"] <= 6  # scaling 1.0 multiplies nothing


# ---- the tokenizer row: our BPE against tiktoken (docs/tokenizers.md) ----------------------------


def test_tokenizer_row_gives_tiktokens_ids(capsys):
    """Llama 3's tokenizer.model, 10,000 Alpaca rows: ours and tiktoken's ids equal, both timed."""
    pytest.importorskip("llama_models")
    pytest.importorskip("tiktoken")
    res = bench.main(["--task=tokenizer"])
    ours = res["ours"]
    (way, theirs), = ours["compared"].items()
    assert "error" not in res and way.startswith("tiktoken ") and res["rows"] == 10_000
    assert ours["tok_s"] > 0 and theirs["tok_s"] > 0 and ours["tokens"] > 100_000
    assert "same ids: True" in capsys.readouterr().err


def test_tokenizer_rows_without_the_data(tmp_path):
    """Without LLM-Adapters' data the rows are generated, of the real rows' length; with it, they
    are its rows in the Alpaca template."""
    texts, source = bench.tokenizer_rows(200, root=tmp_path)
    assert len(texts) == 200 and source.startswith("generated rows (found 0 real rows")
    assert all("### Response:" in t for t in texts) and 200 < sum(map(len, texts)) / 200 < 800
    (tmp_path / "ft-training_set").mkdir()
    rows = [{"instruction": f"Q{i}?", "input": "", "output": f"A{i}"} for i in range(3)]
    (tmp_path / "ft-training_set/math_data.json").write_text(json.dumps(rows))
    texts, source = bench.tokenizer_rows(3, root=tmp_path)
    assert source == f"rows of {tmp_path}" and "Q2?" in texts[2] and texts[2].endswith("A2")


def test_tokenizer_row_errors_are_one_line(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    run = subprocess.run([sys.executable, "bench.py", "--task=tokenizer",
                          f"--tokenizer={tmp_path / 'tokenizer.model'}"],
                         cwd=os.path.dirname(os.path.abspath(bench.__file__)),
                         capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "tokenizer.model: empty file" in run.stderr
    # a BPE that tiktoken cannot read (vocab.json + merges.txt): refused by name
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2,
                                                     "<|endoftext|>": 3}))
    (tmp_path / "merges.txt").write_text("a b\n")
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(SystemExit, match=r"expected a tiktoken-format tokenizer\.model"):
        bench.main(["--task=tokenizer", f"--tokenizer={tmp_path}"])


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
@pytest.mark.parametrize("flag, message", [("--warmup=-1", "--warmup=-1: must be at least 0"),
                                           ("--n_layer=-2", "--n_layer=-2: must be at least 0"),
                                           ("--peak_tflops=0", "--peak_tflops=0.0: must be more")])
def test_bench_settings_out_of_range(flag, message):
    with pytest.raises(ConfigError, match=message):
        bench.parse([flag])
