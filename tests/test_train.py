"""train.py: every adapter kind trained by the one loop (Run.fit), resume equivalence, bf16 / fp16
autocast, DDP on gloo, the run recipes in config/, and every configuration / input error with its
message. Runs in-process (train.main(argv)) except DDP, which spawns two processes. The base is the
demo's (demo.build_base), shrunk (2 layers x 64), pretrained for 40 steps once per session; the demo
itself is tested in test_demo.py."""
import glob
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import adapter_io
import adapters
import cli
import demo as demo_py
import distributed
import files
import run_files
import train
from data import prepare
from data import synthetic
from data.prepare import write_json
from checkpoints import load_model

# the project root, not imported from conftest: DDP's spawned processes re-import this file
ROOT = Path(__file__).resolve().parent.parent

TINY = dict(n_layer=2, n_head=4, n_embd=64, intermediate_size=176)


def records(out, key="loss"):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """(root, ...): root/base is the demo's base with reduced sizes, built once."""
    root = tmp_path_factory.mktemp("demo")
    cfg, _ = demo_py.get_config(["--demo_base_steps=40", "--demo_base_docs=3000", "--threads=0"])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(demo_py, "MODEL", TINY)
        demo_py.build_base(str(root / "base"), cfg, distributed.setup(cfg.device, cfg.dtype, cfg.threads))
    return (root,)


@pytest.fixture(scope="session")
def rows(demo):
    """A small training file in LLM-Adapters' format (the demo's two-step task)."""
    path = demo[0] / "rows.json"
    write_json(path, synthetic.finetune_split(64, 8, seed=1)[0])
    return path


def run(demo, rows, out, *args):
    """train.main on the session's tiny base and rows, 8-example steps, a 16-example validation
    split."""
    return train.main([f"--model={demo[0] / 'base'}", f"--data={rows}", f"--out={out}",
                       "--batch_size=8", "--micro_batch_size=4", "--val_set_size=16",
                       "--warmup_steps=0", "--log_interval=1", "--threads=0", *args])


@pytest.mark.parametrize("kind", list(adapters.KINDS))
def test_each_adapter_trains(demo, rows, tmp_path, kind):
    model, summary = run(demo, rows, tmp_path, f"--adapter={kind}", "--max_steps=8",
                         "--learning_rate=1e-2", "--eval_interval=8")
    losses = [r["loss"] for r in records(tmp_path)]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert (os.path.exists(tmp_path / "adapter_model.safetensors")
            and os.path.exists(tmp_path / "resume.pt"))


def test_adapter_options_from_command_line(demo, rows, tmp_path):
    model, _ = run(demo, rows, tmp_path, "--adapter=lora", "--r=4",
                   "--target_modules=q_proj,v_proj", "--max_steps=1")
    opts = json.load(open(tmp_path / "adapter_config.json"))["options"]
    assert opts["r"] == 4 and opts["target_modules"] == ["q_proj", "v_proj"]
    model, _ = run(demo, rows, tmp_path / "p", "--adapter=parallel", "--bottleneck=16",
                   "--placement=attn", "--scaling=learned", "--max_steps=1")
    assert model.layers[0].beside_attn is not None and model.layers[0].beside_mlp is None


def test_gated_prefix_from_command_line(demo, rows, tmp_path):
    model, _ = run(demo, rows, tmp_path, "--adapter=prefix", "--gated=true", "--layers=1",
                   "--max_steps=2")
    assert model.layers[0].attn.prefix is None
    gated = model.layers[1].attn.prefix["default"]
    # the gate opened while training
    assert isinstance(gated, adapters.GatedPrefix) and gated.gate.item() != 0
    opts = json.load(open(tmp_path / "adapter_config.json"))["options"]
    assert opts["gated"] is True and opts["layers"] == 1


def test_sparse_and_reparam_adapters_are_merged_at_the_end(demo, rows, tmp_path):
    run(demo, rows, tmp_path / "s", "--adapter=series", "--sparse=2", "--max_steps=2",
        "--eval_interval=1")
    run(demo, rows, tmp_path / "p", "--adapter=prefix", "--reparam=16", "--max_steps=2",
        "--eval_interval=1")
    assert json.load(open(tmp_path / "s" / "adapter_config.json"))["options"]["sparse"] == 0
    assert json.load(open(tmp_path / "p" / "adapter_config.json"))["options"]["reparam"] == 0
    for sub in ("s", "p"):  # the merged adapters load as plain ones
        adapter_io.load_adapter(load_model(demo[0] / "base"), tmp_path / sub)


class Interrupt(Exception):
    pass


def test_resume_gives_the_same_losses(demo, rows, tmp_path, monkeypatch):
    # lora has dropout
    args = ["--adapter=lora", "--max_steps=6", "--eval_interval=3", "--learning_rate=1e-2"]
    run(demo, rows, tmp_path / "a", *args)
    full = [r["loss"] for r in records(tmp_path / "a")]

    log = train.log

    def crash_after_step_4(rt, out, record, text):
        log(rt, out, record, text)
        if record and record.get("step") == 4 and "loss" in record:
            # killed mid-run: the checkpoint of step 3 is on disk, nothing of step 4
            raise Interrupt
    monkeypatch.setattr(train, "log", crash_after_step_4)
    with pytest.raises(Interrupt):
        run(demo, rows, tmp_path / "b", *args)
    monkeypatch.setattr(train, "log", log)
    assert torch.load(tmp_path / "b" / "resume.pt", weights_only=True)["step"] == 3
    run(demo, rows, tmp_path / "b", *args, "--resume=true")
    resumed = {r["step"]: r["loss"] for r in records(tmp_path / "b")}
    assert [resumed[s] for s in range(1, 7)] == full  # exactly, in fp32
    with pytest.raises(SystemExit, match="--learning_rate=0.02 differs from the checkpoint's 0.01"):
        run(demo, rows, tmp_path / "b", *args, "--resume=true", "--learning_rate=2e-2")


def test_resumed_sparse_run_merges_the_best_adapter_of_the_first_run(demo, rows, tmp_path,
                                                                      monkeypatch):
    """A sparse (MoSA) adapter trains split and is merged at the end from the best one saved; when
    that best was saved before an interruption, the resumed run still merges it (validation losses
    scripted: best at step 2)."""
    args = ["--adapter=series", "--sparse=2", "--max_steps=4", "--eval_interval=2",
            "--bottleneck=8"]

    def scripted_val_losses():
        values = iter([1.0, 2.0])
        monkeypatch.setattr(train, "val_loss", lambda *a: next(values))
    scripted_val_losses()
    run(demo, rows, tmp_path / "a", *args)
    log = train.log

    def crash_at_step_3(rt, out, record, text):
        log(rt, out, record, text)
        if record and record.get("step") == 3:
            raise Interrupt
    scripted_val_losses()
    monkeypatch.setattr(train, "log", crash_at_step_3)
    with pytest.raises(Interrupt):
        run(demo, rows, tmp_path / "b", *args)
    monkeypatch.setattr(train, "log", log)
    # step 4 does not improve on the first run's 1.0
    monkeypatch.setattr(train, "val_loss", lambda *a: 2.0)
    run(demo, rows, tmp_path / "b", *args, "--resume=true")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(tmp_path / "b" / "adapter_config.json"))["options"]["sparse"] == 0


def test_out_of_memory_gives_a_hint(demo, rows, tmp_path, monkeypatch):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "collate_padded", oom)
    with pytest.raises(SystemExit, match=r"out of memory on cpu with --micro_batch_size=4 "
                                         r".*lower --micro_batch_size"):
        run(demo, rows, tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast_on_cpu(demo, rows, tmp_path, dtype):
    """The frozen base in bf16/fp16, the adapter and its optimizer state in fp32; fp16 goes through
    a GradScaler. The losses follow the fp32 run's within half-precision rounding."""
    name = str(dtype).split(".")[1]
    args = ["--adapter=series", "--max_steps=3", "--eval_interval=3"]
    run(demo, rows, tmp_path / "fp32", *args)
    model, summary = run(demo, rows, tmp_path / name, *args, f"--dtype={name}")
    assert model.embed.weight.dtype == dtype and model.lm_head.weight.dtype == dtype
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    state = torch.load(tmp_path / name / "resume.pt", weights_only=True)
    assert all(t.dtype == torch.float32
               for s in state["optimizer"]["state"].values() for t in s.values()
               if t.numel() > 1)
    # a disabled scaler's state is empty
    assert ("scale" in state["scaler"]) == (dtype == torch.float16)
    full = [r["loss"] for r in records(tmp_path / "fp32")]
    # measured: <4e-4
    assert [r["loss"] for r in records(tmp_path / name)] == pytest.approx(full, rel=1e-3)
    assert summary["best_val"] is not None


def test_grad_checkpointing_gives_the_same_losses(demo, rows, tmp_path):
    run(demo, rows, tmp_path / "a", "--adapter=lora", "--max_steps=3")
    run(demo, rows, tmp_path / "b", "--adapter=lora", "--max_steps=3", "--grad_ckpt=true")
    a, b = ([r["loss"] for r in records(tmp_path / x)] for x in "ab")
    assert a == pytest.approx(b, rel=1e-5)


def test_torch_compile_gives_the_same_losses(demo, rows, tmp_path):
    # no dropout: compiled RNG differs from eager
    args = ["--adapter=series", "--max_steps=2", "--eval_interval=2"]
    run(demo, rows, tmp_path / "eager", *args)
    run(demo, rows, tmp_path / "compiled", *args, "--compile=true")
    for key in ("loss", "val_loss"):
        eager, compiled = ([r[key] for r in records(tmp_path / d, key)]
                           for d in ("eager", "compiled"))
        assert len(eager) == (2 if key == "loss" else 1)
        assert compiled == pytest.approx(eager, rel=1e-4)


def ddp_worker(rank, port, argv, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, _ = train.main(argv)
    torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
               f"{out}/rank{rank}.pt")


def test_ddp_gloo_two_processes_agree_with_one(demo, rows, tmp_path):
    """2 processes x 2 accumulation steps of micro-batch 2 see the same 8 examples a step as 1
    process x 4: the ranks end identical, and the losses equal the single-process run's (no dropout,
    so no rank-dependent randomness)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    argv = [f"--model={demo[0] / 'base'}", f"--data={rows}", "--batch_size=8",
            "--micro_batch_size=2", "--val_set_size=16", "--max_steps=3", "--eval_interval=3",
            "--adapter=lora", "--dropout=0", "--learning_rate=1e-2", "--log_interval=1",
            "--threads=0"]
    mp.spawn(ddp_worker, args=(port, argv + [f"--out={out}"], tmp_path), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = adapter_io.load_adapter(load_model(demo[0] / "base"), out)  # rank 0 wrote it
    assert all(torch.equal(t, a[n]) for n, t in fresh.named_parameters() if n in a)
    assert len(records(out)) == 3  # one log, by rank 0
    single, _ = train.main(argv + [f"--out={tmp_path / 'single'}"])
    for key in ("loss", "val_loss"):
        assert [r[key] for r in records(out, key)] == pytest.approx(
            [r[key] for r in records(tmp_path / "single", key)], rel=1e-5)
    assert all(torch.allclose(p, a[n], atol=1e-6) for n, p in single.named_parameters() if n in a)


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    (["--learnin_rate=1"], "unknown setting --learnin_rate"),
    (["--TEMPLATE_NAME=x"], "unknown setting --TEMPLATE_NAME"),
    (["--batch_size=abc"], "--batch_size=abc: expected int"),
    (["--batch_size=1.5"], "--batch_size=1.5: expected int"),
    (["--train_on_inputs=maybe"], "expected true or false"),
    (["--model"], "--model: expected --model=value or --model value"),
    (["--adapter=lora", "--bottleneck=64"],
     "--bottleneck does not apply to --adapter=lora .*series, parallel"),
    (["--adapter=prompt", "--r=8"], "--r does not apply to --adapter=prompt"),
    (["--adapter=adapterx"], "unknown adapter 'adapterx'"),
    (["--decay=step"], "--decay=step: expected one of linear, cosine"),
    (["--model=/no/such/dir", "--data=x.json"], "--model=/no/such/dir: no such folder"),
    (["--model=."], "--data is required"),
    (["--data=x.json"], "--data needs --model"),
    (["missing_config.py"], "missing_config.py: no such config file"),
])
def test_config_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.main(argv)


def test_a_model_in_a_config_file_is_no_demo(tmp_path):
    """main() hands a run without --model to the demo before reading the settings: a --model given
    by a config file counts, and the demo's settings are unknown to a run with a model."""
    (tmp_path / "run.py").write_text(f"model = {str(tmp_path / 'nothing')!r}\n")
    with pytest.raises(SystemExit, match="train.py: error: --model=.*nothing: no such folder"):
        train.main([str(tmp_path / "run.py"), "--data=x.json"])
    with pytest.raises(SystemExit, match="unknown setting --demo_n_test"):
        train.main(["--model=m", "--demo_n_test=4"])
    assert train.get_config(["--model=m"])[0].model == "m"


def test_command_line_error_exits_with_the_message():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "train.py", "--adapter=series", "--r=8"], cwd=root,
                       capture_output=True, text=True)
    assert (p.returncode == 1
            and "train.py: error: --r does not apply to --adapter=series" in p.stderr)
    assert "Traceback" not in p.stderr


def test_config_files(tmp_path, demo, rows):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": "fast"}))
    with pytest.raises(SystemExit, match="expected float"):
        train.get_config([str(bad)])
    bad.write_text(json.dumps({"warmup": 3}))
    with pytest.raises(SystemExit, match="unknown setting --warmup"):
        train.get_config([str(bad)])
    py = tmp_path / "x.py"
    py.write_text("import math\nadapter = 'series'\nbottleneck = 32\nlearning_rate = 1e-3\n"
                  "num_epochs = 2\n")
    cfg, options = train.get_config([str(py), "--num_epochs=5", "--model=m"])
    assert (cfg.adapter, cfg.learning_rate, cfg.num_epochs, options) == ("series", 1e-3, 5,
                                                                         {"bottleneck": 32})


def test_input_errors(demo, rows, tmp_path):
    with pytest.raises(SystemExit, match="cannot load the checkpoint.*no params.json"):
        run(demo, rows, tmp_path, f"--model={tmp_path}")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q2"}]))
    with pytest.raises(SystemExit, match="row 1: missing field 'output'"):
        run(demo, bad, tmp_path)
    bad.write_text("[{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        run(demo, bad, tmp_path)
    bad.write_text("[]")
    with pytest.raises(SystemExit, match="the list of rows is empty"):
        run(demo, bad, tmp_path)
    bad.write_text(json.dumps([{"instruction": f"q{i}", "output": "a"} for i in range(10)]))
    with pytest.raises(SystemExit, match="10 rows, not more than --val_set_size=16"):
        run(demo, bad, tmp_path)
    with pytest.raises(SystemExit, match="no such file"):
        run(demo, tmp_path / "nothing.json", tmp_path)
    with pytest.raises(SystemExit, match="--cutoff_len=100000 exceeds the model's context of 256"):
        run(demo, rows, tmp_path, "--cutoff_len=100000")
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        run(demo, rows, tmp_path / "fresh", "--resume=true")
    assert not os.path.exists(tmp_path / "adapter_config.json")  # nothing half-written


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(demo, rows, tmp_path, monkeypatch):
    with pytest.raises(SystemExit,
                       match=r"loss is (nan|inf) at step \d.*stopped before writing anything"):
        run(demo, rows, tmp_path / "lr", "--learning_rate=1e30", "--grad_clip=0", "--max_steps=20")
    add_adapter = adapters.add_adapter

    # logits turn NaN from the 4th training step on (2 forwards a step)
    def add_poisoned(model, kind, **options):
        model, calls = add_adapter(model, kind, **options), [0]

        def hook(module, args, out):
            calls[0] += model.training
            return out * float("nan") if model.training and calls[0] > 6 else out
        model.lm_head.register_forward_hook(hook)
        return model
    monkeypatch.setattr(adapters, "add_adapter", add_poisoned)
    with pytest.raises(SystemExit,
                       match=r"loss is nan at step 4 .* Last good checkpoint: .* \(step 2\)"):
        run(demo, rows, tmp_path, "--max_steps=20", "--eval_interval=2")
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["trainable"].values())
    monkeypatch.setattr(adapters, "add_adapter", add_adapter)
    adapter_io.load_adapter(load_model(demo[0] / "base"), tmp_path)  # the saved adapter still loads


def test_key_space_value_form():
    """`python train.py --adapter parallel`, as users type it, equals --adapter=parallel."""
    cfg, options = train.get_config(["--adapter", "parallel", "--bottleneck", "64", "--resume"])
    assert (cfg.adapter, options, cfg.resume) == ("parallel", {"bottleneck": 64}, True)
    assert train.get_config(["--adapter=parallel", "--bottleneck=64",
                             "--resume=true"])[1] == options
    assert train.get_config(["--resume", "false", "--grad_ckpt"])[0].resume is False


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "config" / "*.py"))),
                         ids=os.path.basename)
def test_config_recipes_name_only_real_settings(path, tmp_path):
    """Each run recipe in config/ reads through the configurator with train.py's defaults and its
    adapter's options: every key is a setting or an option of that kind, of the right type. A
    misspelt key in a copy is refused."""
    def options(given):
        return adapters.KINDS[given.get("adapter", train.adapter)].defaults
    cfg, opts = cli.configure([path], train.DEFAULTS, options=options)
    train.check_ranges(cfg)
    assert cfg.model and cfg.data.endswith(".json") and cfg.out.startswith("out/")
    assert cfg.batch_size % cfg.micro_batch_size == 0 and cfg.cutoff_len == 256
    assert opts and set(opts) <= set(adapters.KINDS[cfg.adapter].defaults)
    assert train.get_config([path])[1] == opts  # and through train.py's own reading
    text = open(path).read()
    misspelt = tmp_path / "misspelt.py"
    misspelt.write_text(text.replace("learning_rate =", "learnin_rate ="))
    with pytest.raises(cli.ConfigError, match="unknown setting --learnin_rate"):
        cli.configure([str(misspelt)], train.DEFAULTS, options=options)


def test_config_recipes_follow_the_paper():
    read = {os.path.basename(p)[:-3]: train.get_config([p])
            for p in glob.glob(str(ROOT / "config" / "*.py"))}
    assert set(read) == {"math10k_lora", "math10k_series", "math10k_parallel", "math10k_prefix",
                         "commonsense170k_lora"}
    cfg, lora = read["math10k_lora"]
    assert (cfg.adapter, lora["r"], lora["alpha"], cfg.learning_rate, cfg.batch_size,
            cfg.micro_batch_size, cfg.num_epochs) == ("lora", 32, 64, 3e-4, 16, 4, 3)
    assert lora["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    for kind in ("series", "parallel"):
        cfg, opts = read[f"math10k_{kind}"]
        assert (cfg.adapter, opts["bottleneck"], cfg.learning_rate) == (kind, 256, 3e-4)
    cfg, prefix = read["math10k_prefix"]
    assert (prefix["num_virtual_tokens"], cfg.learning_rate) == (10, 3e-2)
    assert read["commonsense170k_lora"][0].data.endswith("commonsense_170k.json")


def test_ddp_is_told_of_unused_parameters_only_for_sparse_adapters(demo, monkeypatch):
    """find_unused_parameters makes DDP search the autograd graph after every forward; only a
    sparse (MoSA) adapter leaves trainable parameters without a gradient at a step."""
    seen = []
    monkeypatch.setattr(train, "DDP", lambda module, **kw: seen.append(kw) or module)
    cfg = train.get_config(["--model=x", "--compile=false"])[0]
    rt = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, rank=0, world=2)
    examples = [([1, 2, 3], [2, 3, 4])] * 8
    for kind, options, unused in (("series", dict(sparse=2), True), ("series", {}, False),
                                  ("lora", {}, False)):
        model = adapters.add_adapter(load_model(demo[0] / "base"), kind, **options)
        train.Run(model, examples, [], cfg, rt)
        assert seen[-1]["find_unused_parameters"] is unused, kind


# ------------------------------------------------------------------------ --template
def test_unknown_template_is_refused():
    with pytest.raises(SystemExit, match="--template=chatml: expected one of alpaca, llama3-chat"):
        train.get_config(["--model=x", "--template=chatml"])


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
def train_run(base, out, *args, data=None):
    return train.main([f"--model={base}", f"--data={data or base / 'rows.json'}", f"--out={out}",
                       "--adapter=lora", "--r=4", "--batch_size=4", "--micro_batch_size=2",
                       "--val_set_size=4", "--max_steps=2", "--eval_interval=2", "--warmup_steps=0",
                       "--log_interval=1", "--threads=0", *args])


def test_a_used_out_is_refused_unless_resumed_or_overwritten(train_base, tmp_path):
    train_run(train_base, tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in run_files.RUN_FILES}
    refused = f"--out={tmp_path} holds an earlier run .*--resume=true.*--overwrite=true"
    with pytest.raises(SystemExit, match=refused):
        train_run(train_base, tmp_path, "--learning_rate=1e-2")
    assert before == {f: (tmp_path / f).read_bytes() for f in run_files.RUN_FILES}  # untouched
    train_run(train_base, tmp_path, "--resume=true")  # continuing is allowed (nothing left to do)
    with pytest.raises(SystemExit, match="--resume=true continues .* --overwrite=true replaces"):
        train_run(train_base, tmp_path, "--resume=true", "--overwrite=true")
    train_run(train_base, tmp_path, "--learning_rate=1e-2", "--overwrite=true")
    adapter = "adapter_model.safetensors"
    assert (tmp_path / adapter).read_bytes() != before[adapter]
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["config"]["learning_rate"] == 1e-2


def test_resume_with_other_adapter_options_is_refused(train_base, tmp_path):
    train_run(train_base, tmp_path)
    with pytest.raises(SystemExit, match="--resume: --r=8 differs from the checkpoint's 4"):
        train_run(train_base, tmp_path, "--resume=true", "--r=8")


@pytest.mark.parametrize("key, value, expected", [
    ("micro_batch_size", "0", "at least 1"), ("batch_size", "0", "at least 1"),
    ("eval_interval", "0", "at least 1"), ("log_interval", "0", "at least 1"),
    ("learning_rate", "-1", "more than 0"), ("learning_rate", "0", "more than 0"),
    ("val_set_size", "-5", "at least 0"), ("num_epochs", "0", "at least 1"),
    ("max_steps", "-3", "at least 0"), ("grad_clip", "-1", "at least 0"),
    ("cutoff_len", "1", "at least 2"),
])
def test_numeric_settings_out_of_range(key, value, expected):
    with pytest.raises(SystemExit, match=f"--{key}={value}(\\.0)?: expected {expected}"):
        train.get_config(["--model=m", f"--{key}={value}"])


def test_every_numeric_setting_has_a_range():
    numeric = {k for k, v in train.DEFAULTS.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(train.MINIMUM)


def test_out_that_cannot_take_files(train_base, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--out=.*file is a file, expected a folder"):
        train_run(train_base, tmp_path / "file")
    with pytest.raises(SystemExit, match="--out=.*file/sub: cannot write there"):
        train_run(train_base, tmp_path / "file" / "sub")
    read_only = "/sys/nano-llm-adapters-test"  # read-only for everyone, root included
    if os.path.isdir("/sys"):
        with pytest.raises(SystemExit, match=f"--out={read_only}: cannot write there"):
            train_run(train_base, read_only)


def test_full_disk_mid_run_is_one_line_and_leaves_no_temporary_file(train_base, tmp_path,
                                                                     monkeypatch):
    def full(path, data):  # resume.pt: half of it written, then the disk is full
        def write(f):
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        files.write_atomic(path, write)
    monkeypatch.setattr(run_files, "write_atomic", full)
    with pytest.raises(SystemExit, match=f"--out={tmp_path}: writing failed .*No space left"):
        train_run(train_base, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(set(run_files.RUN_FILES) - {"resume.pt"})


def test_overwrite_removes_the_earlier_run_only_once_the_new_one_has_started(train_base, tmp_path):
    """--overwrite=true with inputs that fail (data that is not JSON, a model that does not load,
    an adapter option the model lacks): the new run stops with one line and the earlier run is
    whole. With good inputs it is replaced, and temporaries that killed writers left go too."""
    train_run(train_base, tmp_path / "out")
    before = {f: (tmp_path / "out" / f).read_bytes() for f in run_files.RUN_FILES}
    (tmp_path / "bad.json").write_text("not json")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.model"):
        (broken / f).write_bytes((train_base / f).read_bytes())
    (broken / "model.safetensors").write_bytes(b"x" * 100)
    for args, data, model, message in (
            ((), tmp_path / "bad.json", train_base, "bad.json: not valid JSON"),
            ((), train_base / "rows.json", broken, "--model=.*broken: cannot load the checkpoint"),
            (("--target_modules=nothing",), None, train_base, "nothing")):
        with pytest.raises(SystemExit, match=message):
            train_run(model, tmp_path / "out", "--overwrite=true", *args, data=data)
        assert before == {f: (tmp_path / "out" / f).read_bytes() for f in run_files.RUN_FILES}
    dead = tmp_path / "out" / ".adapter_model.safetensors.999999999.x.tmp"  # no such pid
    dead.write_bytes(b"half")
    train_run(train_base, tmp_path / "out", "--overwrite=true", "--learning_rate=1e-2")
    assert before["adapter_model.safetensors"] != (tmp_path / "out" /
                                                   "adapter_model.safetensors").read_bytes()
    assert sorted(os.listdir(tmp_path / "out")) == sorted(run_files.RUN_FILES)


def test_a_second_run_into_the_same_out_is_refused(train_base, tmp_path):
    """Two runs into one --out at once: the second is refused naming the first's process; once
    the first is killed its lock file is taken over."""
    out = tmp_path / "out"
    argv = [sys.executable, "train.py", f"--model={train_base}",
            f"--data={train_base / 'rows.json'}",
            f"--out={out}", "--adapter=lora", "--r=4", "--batch_size=4", "--micro_batch_size=2",
            "--val_set_size=4", "--max_steps=100000", "--eval_interval=100000", "--threads=1"]
    first = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):  # until it holds the lock (torch's import takes seconds)
            if (out / files.LOCK).exists() and (out / files.LOCK).read_text().strip():
                break
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        with pytest.raises(SystemExit, match=f"--out={out} is in use by another run "
                                             f"\\(process {first.pid},"):
            train_run(train_base, out, "--overwrite=true")
    finally:
        first.kill()
        first.wait()
    assert (out / files.LOCK).read_text().strip() == str(first.pid)  # what kill -9 leaves
    train_run(train_base, out, "--overwrite=true")  # taken over
    assert not (out / files.LOCK).exists()


@pytest.mark.parametrize("key", ["learning_rate", "weight_decay", "grad_clip"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_settings_are_refused_before_training(key, value):
    """(before: --learning_rate=nan was torch's "Invalid learning rate" traceback, =inf a nan
    validation loss steps later)"""
    with pytest.raises(SystemExit, match=f"--{key}={value}: expected a finite number"):
        train.get_config(["--model=m", f"--{key}={value}"])


def test_threads_beyond_the_cpus_are_refused():
    """(before: --threads=100000 was a segmentation fault)"""
    with pytest.raises(SystemExit, match="--threads=100000: expected 0 .* to \\d+, this "
                                         "machine's CPU count"):
        train.get_config(["--model=m", "--threads=100000"])
    train.get_config(["--model=m", f"--threads={os.cpu_count()}"])


def test_adapter_options_on_the_command_line_are_typed(capsys):
    """An option's word where a number belongs (before: --dropout=abc was a TypeError in
    nn.Dropout)."""
    with pytest.raises(SystemExit, match="--dropout='abc': expected a number"):
        train.get_config(["--model=m", "--dropout=abc"])
    cfg, options = train.get_config(["--model=m", "--adapter=parallel", "--scaling=learned"])
    assert options == {"scaling": "learned"}


def test_unreadable_resume_checkpoint(train_base, tmp_path):
    train_run(train_base, tmp_path)
    data = (tmp_path / "resume.pt").read_bytes()
    (tmp_path / "resume.pt").write_bytes(data[:len(data) // 2])
    # found by run_files.py, named as the script the user ran
    with pytest.raises(SystemExit, match=r"^train.py: error: --resume: .*resume.pt: cannot read "
                                         r"it .*truncated"):
        train_run(train_base, tmp_path, "--resume=true")
    torch.save({"step": 1}, tmp_path / "resume.pt")
    with pytest.raises(SystemExit, match="is not a resume checkpoint written by train.py"):
        train_run(train_base, tmp_path, "--resume=true")


def test_training_rows_are_deduplicated_before_the_validation_split(train_base, tmp_path, capsys):
    rows = json.loads((train_base / "rows.json").read_text())[:20]
    write_json(tmp_path / "twice.json", rows + rows)
    train_run(train_base, tmp_path / "out", data=tmp_path / "twice.json")
    assert "dropped 20 duplicate rows" in capsys.readouterr().out
    assert prepare.dedupe(rows + rows[:3]) == (rows, 3)


def test_tokenizer_larger_than_the_embedding(train_base, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        (small / f).write_bytes((train_base / f).read_bytes())
    config = json.loads((small / "config.json").read_text())
    sd = load_file(small / "model.safetensors")
    rows = 100  # fewer embedding rows than the tokenizer has ids
    sd.update({k: v[:rows] for k, v in sd.items()
               if k in ("model.embed_tokens.weight", "lm_head.weight")})
    save_file(sd, small / "model.safetensors")
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    too_small = f"the tokenizer's ids go up to 3\\d\\d, but the model's embedding has {rows} rows"
    with pytest.raises(SystemExit, match=f"--model={small}: .*{too_small}"):
        train_run(small, tmp_path / "out", data=train_base / "rows.json")
    with pytest.raises(ValueError, match="tokenizer's ids go up to"):
        cli.load(small, "", "cpu", torch.float32)
