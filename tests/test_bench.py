"""bench.py smoke tests on the CPU (tiny-llama): every adapter, both tasks, the HF+PEFT baseline,
the suite, and bad settings. No timing assertions: speed lives in the printed numbers, not in
tests."""
import json

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


BAD = {  # one setting -> the start of its one-line error
    "--nope=1": "unknown setting --nope", "--adapter=adalora": "--adapter=adalora: expected one of",
    "--adapter=none": "or none with --task=generate", "--compile=maybe": "--compile=maybe",
    "--baseline=ture": "--baseline=ture: expected true or false",
    "--suite=lora5": "--suite=lora5: expected all or some of",
    "--model=llama-8b": "--model=llama-8b: expected a preset",
    "--task=decode": "--task=decode: expected one of train, generate",
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


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
@pytest.mark.parametrize("flag, message", [("--warmup=-1", "--warmup=-1: must be at least 0"),
                                           ("--n_layer=-2", "--n_layer=-2: must be at least 0"),
                                           ("--peak_tflops=0", "--peak_tflops=0.0: must be more")])
def test_bench_settings_out_of_range(flag, message):
    with pytest.raises(ConfigError, match=message):
        bench.parse([flag])
