"""train.py: the embedded demo end to end (tiny sizes), every adapter kind, resume equivalence, bf16
autocast, DDP on gloo, and every configuration / input error with its message. Runs in-process
(train.main(argv)) except DDP, which spawns two processes. The demo base is built once per session,
shrunk (2 layers x 64) and pretrained for 40 steps."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import adapter_io
import adapters
import train
from data import synthetic
from data.prepare import write_json
from data.template import format_prompt
from checkpoints import load_model
from tokenizer import Tokenizer

TINY = dict(n_layer=2, n_head=4, n_embd=64, intermediate_size=176)
DEMO_ARGS = ["--demo_base_steps=40", "--demo_base_docs=3000", "--demo_n_train=200",
             "--demo_n_test=20", "--max_steps=12", "--learning_rate=1e-2", "--warmup_steps=2",
             "--val_set_size=20", "--eval_interval=6", "--log_interval=1", "--threads=0"]


def records(out, key="loss"):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The embedded demo with reduced sizes: builds the tiny base, writes the data, fine-tunes LoRA,
    evaluates."""
    root = tmp_path_factory.mktemp("demo")
    saved = dict(train.DEMO_MODEL)
    train.DEMO_MODEL.update(TINY)
    try:
        model, summary = train.main([f"--demo_dir={root}", *DEMO_ARGS])
    finally:
        train.DEMO_MODEL.clear()
        train.DEMO_MODEL.update(saved)
    return root, model, summary


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
            and "exact match on 4" in out)
    assert os.path.getmtime(root / "base" / "model.safetensors") == stamp


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


def test_demo_base_pretrains_with_its_own_threads(tmp_path, monkeypatch):
    seen = []

    def fake_train(model, train_ex, val_ex, cfg, rt, **kw):
        seen.append((torch.get_num_threads(), cfg.max_steps, cfg.batch_size))
        return dict(steps=0, best_val=0.0, time_s=0.0)
    monkeypatch.setattr(train, "train", fake_train)
    cfg, _ = train.get_config(["--demo_base_threads=3", "--demo_base_docs=3000",
                               "--demo_base_steps=7"])
    rt = train.setup(cfg)
    before = torch.get_num_threads()
    try:
        train.build_demo_base(str(tmp_path / "base"), cfg, rt)
        # the fine-tune's single thread
        assert seen == [(3, 7, 32)] and torch.get_num_threads() == before == 1
        assert os.path.exists(tmp_path / "base" / "model.safetensors")
    finally:
        torch.set_num_threads(train.TORCH_THREADS)


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
    monkeypatch.setattr(train, "collate", oom)
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


def test_train_on_inputs_false_masks_the_prompt(demo):
    tok = Tokenizer.from_pretrained(demo[0] / "base")
    row = {"instruction": "Tom has 3 pens. How many pens does Tom have now?", "input": "",
           "output": "3."}
    cfg = train.get_config(["--model=x", "--train_on_inputs=false"])[0]
    (x, y), = train.tokenize(tok, [row], cfg)[0]
    prompt = tok.encode(format_prompt(row["instruction"]), bos=True)
    full = tok.encode(format_prompt(row["instruction"]) + "3.", bos=True, eos=True)
    assert (x == full[:-1] and y[:len(prompt) - 1] == [-100] * (len(prompt) - 1)
            and y[len(prompt) - 1:] == full[len(prompt):])
    # cut: no EOS; then a prompt longer than cutoff_len is dropped
    cfg.cutoff_len, cfg.train_on_inputs = 12, True
    (x, y), = train.tokenize(tok, [row], cfg)[0]
    assert len(x) == 11 and y == full[1:12] and tok.eos_id not in y
    cfg.train_on_inputs = False
    assert train.tokenize(tok, [row], cfg) == ([], 1, 1)


def test_setup_applies_the_dtype_and_the_adapter_matmul_precision(monkeypatch):
    seen = []
    monkeypatch.setattr(adapters, "fast_fp32_matmuls",
                        lambda device, dtype: seen.append((device, dtype)))
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        rt = train.setup(train.get_config(["--device=cpu", f"--dtype={name}", "--threads=0"])[0])
        assert rt.dtype == dtype and seen[-1] == (torch.device("cpu"), dtype)
        assert ((rt.ctx.fast_dtype == dtype) if dtype != torch.float32
                else not isinstance(rt.ctx, torch.autocast))


def test_epoch_plan_is_deterministic_and_shards_for_ddp():
    examples = [([0] * (1 + i % 7), [0] * (1 + i % 7)) for i in range(50)]
    cfg = train.get_config(["--model=x", "--batch_size=8", "--micro_batch_size=2"])[0]
    one = train.SimpleNamespace(rank=0, world=1)
    plan = train.epoch_plan(examples, cfg, 0, one)
    assert (plan == train.epoch_plan(examples, cfg, 0, one)
            != train.epoch_plan(examples, cfg, 1, one))
    assert (sorted(i for step in plan for mb in step for i in mb) == list(range(50))
            and len(plan[0]) == 4)
    ranks = [train.epoch_plan(examples, cfg, 0, train.SimpleNamespace(rank=r, world=2))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and all(len(a) == len(b) for a, b in zip(*ranks))
    assert len(ranks[0][0]) == 2  # batch 8 = 2 micro-batches x 2 examples x 2 processes
    seen = [i for p in ranks for step in p for mb in step for i in mb]
    # padded by repeating, like DistributedSampler
    assert set(seen) == set(range(50)) and len(seen) == 52


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


def test_thread_picker_keeps_the_faster(monkeypatch, capsys):
    before = torch.get_num_threads()
    for slow, fast in ((2, 1), (1, 2)):
        clock = [0.0]

        def tick():  # each step costs 10 on `slow` threads, 1 on `fast`
            clock[0] += 10.0 if torch.get_num_threads() == slow else 1.0
            return clock[0]
        monkeypatch.setattr(train.time, "perf_counter", tick)
        picker = train.ThreadPicker(2, every=20, probe=3)
        try:
            chosen = []
            for step in range(45):
                picker(step)
                chosen.append(torch.get_num_threads())
            # probes: 3 steps on one thread, then on two; a thrashing probe stops after one step
            probe = [1, 1, 1, 2] + ([2, 2] if fast == 2 else [])
            assert chosen[:len(probe)] == probe
            after = chosen[len(probe):20] + chosen[20 + len(probe):40]
            assert set(after) == {fast}
        finally:
            torch.set_num_threads(before)
    assert "step 4: 1 thread(s) from here" in capsys.readouterr().out


def test_demo_explains_trainable_against_llama_7b():
    line = train.explain_trainable("lora", {}, 221184, 1107072)
    assert "19.98% of this 1.1M toy" in line and "56,098,816" in line and "(0.83%)" in line
