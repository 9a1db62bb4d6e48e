"""bench.py smoke test on the CPU (tiny-llama): it runs every adapter and both tasks and reports its fields.
No timing assertions: speed lives in the printed numbers, not in tests."""
import importlib

import pytest


@pytest.fixture
def bench():
    import bench as b
    return importlib.reload(b)  # module-level defaults are overridden per run


@pytest.mark.parametrize("adapter", ["lora", "dora", "ia3", "series", "parallel", "prefix",
                                     "prompt"])
def test_train_smoke(bench, adapter):
    res = bench.main([f"--adapter={adapter}", "--steps=1", "--warmup=1", "--micro_batch=2", "--seq_len=16"])
    assert res["ours"]["tok_s"] > 0 and res["ours"]["trainable"] > 0


def test_generate_and_baseline(bench):
    pytest.importorskip("peft")
    res = bench.main(["--task=generate", "--batch=2", "--prompt_len=8", "--new_tokens=4", "--baseline"])
    assert res["ours"]["new_tok_s"] > 0 and res["hf_peft"]["new_tok_s"] > 0 and res["speedup"] > 0


def test_bad_options(bench):
    with pytest.raises(SystemExit, match="unknown option"):
        bench.main(["--nope=1"])
    with pytest.raises(SystemExit, match="unknown adapter"):
        bench.main(["--adapter=adalora"])
