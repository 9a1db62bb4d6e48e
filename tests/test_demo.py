"""demo.py: the embedded demo end to end through `train.main` without --model (tiny sizes: a base of
2 layers x 64 pretrained for 40 steps, built once per session), the cached base, the base built on
one thread whatever the caller's, and the demo's messages."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import adapter_io
import demo as demo_py
import distributed
import train
from checkpoints import load_model
from tokenizer import Tokenizer

TINY = dict(n_layer=2, n_head=4, n_embd=64, intermediate_size=176)
DEMO_ARGS = ["--demo_base_steps=40", "--demo_base_docs=3000", "--demo_n_train=200",
             "--demo_n_test=20", "--max_steps=12", "--learning_rate=1e-2", "--warmup_steps=2",
             "--val_set_size=20", "--eval_interval=6", "--log_interval=1", "--threads=0"]


def records(out, key="loss"):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setattr(demo_py, "MODEL", TINY)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`python train.py` with reduced sizes: builds the tiny base, writes the data, fine-tunes LoRA,
    scores."""
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(demo_py, "MODEL", TINY)
        model, summary = train.main([f"--demo_dir={root}", *DEMO_ARGS])
    return root, model, summary


def test_demo_end_to_end(demo, capsys):
    root, model, summary = demo
    base = root / "base"
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(base))
    assert not os.path.exists(f"{base}.tmp")
    tok = Tokenizer.from_pretrained(base)
    for split in ("train", "test"):
        data = json.load(open(root / "data" / f"{split}.json"))
        assert data and set(data[0]) == {"instruction", "input", "output", "answer"}
        assert all(tok.sp.unk_id() not in tok.encode(r["instruction"] + r["output"]) for r in data)
    losses = [r["loss"] for r in records(root / "lora")]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    accuracy = [r for r in records(root / "lora", "adapter_acc")][0]
    assert 0 <= accuracy["base_acc"] <= 1 and 0 <= accuracy["adapter_acc"] <= 1
    config = json.load(open(root / "lora" / "adapter_config.json"))
    assert config["kind"] == "lora" and config["extra"]["template"] == "alpaca"
    assert (config["extra"]["dataset"].endswith("test.json")
            and config["extra"]["answer_type"] == "number")
    # the adapter saved at the last validation (the best: it improved) loads onto a fresh base, same
    # logits
    assert summary["best_val"] == records(root / "lora", "val_loss")[-1]["val_loss"]
    fresh = adapter_io.load_adapter(load_model(base), root / "lora")
    x = torch.tensor([tok.encode("Tom has 3 pens. Then Tom finds 4 more pens.", bos=True)])
    model.eval()
    assert torch.equal(fresh.eval()(x)[0], model(x)[0])


def test_demo_uses_cached_base(demo, capsys):
    root = demo[0]
    stamp = os.path.getmtime(root / "base" / "model.safetensors")
    train.main([f"--demo_dir={root}", *DEMO_ARGS, "--max_steps=1", "--adapter=prompt",
                "--demo_n_test=4"])
    out = capsys.readouterr().out
    assert ("building the demo base" not in out and "trainable of" in out
            and "on LLaMA-7B trains" in out and "exact match on 4" in out)
    assert os.path.getmtime(root / "base" / "model.safetensors") == stamp


def test_demo_recipe_replaces_only_the_defaults_not_given(demo):
    """Without --model the demo's recipe (and its learning rate per kind) replaces train.py's
    defaults; a setting given on the command line wins."""
    cfg = demo_py.get_config(["--adapter=prefix"])[0]
    assert (cfg.learning_rate, cfg.threads, cfg.train_on_inputs) == (2e-1, 1, False)
    cfg = demo_py.get_config(["--adapter=prefix", "--learning_rate=1e-3"])[0]
    assert cfg.learning_rate == 1e-3 and train.get_config([])[0].learning_rate == 3e-4


@pytest.mark.parametrize("key, value, expected", [
    ("demo_base_docs", "100", "at least 201"), ("demo_n_test", "0", "at least 1"),
    ("demo_n_train", "-1", "at least 1"), ("demo_base_steps", "0", "at least 1")])
def test_demo_settings_out_of_range(key, value, expected):
    """The demo's settings are checked as train.py's are, on train.py's command line too."""
    with pytest.raises(SystemExit, match=f"--{key}={value}: expected {expected}"):
        demo_py.get_config([f"--{key}={value}"])
    with pytest.raises(SystemExit, match=f"--{key}={value}: expected {expected}"):
        train.main([f"--{key}={value}"])


def test_every_demo_setting_has_a_range_and_only_the_demo_takes_them():
    numeric = {k for k, v in demo_py.SETTINGS.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(demo_py.MINIMUM) and not set(demo_py.SETTINGS) & set(train.DEFAULTS)
    assert demo_py.get_config(["--demo_n_test=7"])[0].demo_n_test == 7
    with pytest.raises(SystemExit, match="unknown setting --demo_n_test"):
        train.get_config(["--model=m", "--demo_n_test=7"])


def test_help_lists_the_demo_settings_without_model(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0 and "--demo_n_test=200" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.main(["--model=m", "--help"])
    out = capsys.readouterr().out
    assert "--learning_rate=0.0003" in out and "--demo_n_test" not in out


def test_demo_refuses_a_model_of_its_own(tmp_path):
    with pytest.raises(SystemExit, match="--data needs --model"):
        train.main(["--data=x.json"])
    with pytest.raises(SystemExit, match="demo.py: error: --model=m: the demo builds its own"):
        demo_py.main(["--model=m"])


def build(tmp_path, name, caller_threads, steps=6):
    """A small base build (tokenizer + a few pretraining steps) started with caller_threads set.
    Returns its weights and the thread counts its training steps ran on."""
    cfg, _ = demo_py.get_config([f"--demo_base_steps={steps}", "--demo_base_docs=3000",
                                 "--threads=0"])
    seen, fit = [], train.Run.fit

    def spy(run):
        seen.append(torch.get_num_threads())
        return fit(run)
    before = torch.get_num_threads()
    torch.set_num_threads(caller_threads)
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(train.Run, "fit", spy)
            demo_py.build_base(str(tmp_path / name), cfg, distributed.setup(cfg.device, cfg.dtype, cfg.threads))
        assert torch.get_num_threads() == caller_threads  # the caller's count is back
    finally:
        torch.set_num_threads(before)
    return load_file(tmp_path / name / "model.safetensors"), seen


def test_base_build_is_independent_of_the_thread_count(tmp_path, tiny_model):
    """On two threads some float reductions add in another order (the last bits of a sum move),
    which over 900 steps changes the base's weights and every score of the demo: the base is built
    on one thread, whatever the caller's count, and comes out bit for bit the same. Unpinned, this
    6-step build already differs between 1 and 2 threads on an Intel Xeon; on an AMD Zen machine
    its matmuls agree either way, so the thread count its steps ran on is checked too."""
    one, threads_one = build(tmp_path, "one", 1)
    two, threads_two = build(tmp_path, "two", 2)
    assert threads_one == threads_two == [1]
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    x = torch.randn(60000, generator=torch.Generator().manual_seed(0))
    sums = []
    for n in (1, 2):  # the reason: a reduction of this size does differ between 1 and 2 threads
        torch.set_num_threads(n)
        sums.append(x.sum())
    torch.set_num_threads(1)
    assert not torch.equal(*sums)


def test_demo_explains_trainable_against_llama_7b():
    line = demo_py.explain_trainable("lora", {}, 221184, 1107072)
    assert "19.98% of this 1.1M toy" in line and "56,098,816" in line and "(0.83%)" in line


def test_demo_plan_names_the_steps():
    cfg = demo_py.get_config(["--adapter=series"])[0]
    cfg.model = "out/demo/base"
    fresh, cached = demo_py.plan(cfg, False), demo_py.plan(cfg, True)
    assert "1/3 build the tiny base" in fresh and "on one thread" in fresh
    assert "cached in out/demo/base, skipped" in cached and "2/3 fine-tune a series" in cached
