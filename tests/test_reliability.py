"""Reliability (issue 14): no run lost, no traceback for bad input, nothing accepted silently.
Each test is one case of the fault-injection trial: a bad file, setting or folder gets one line
naming it; loaders refuse what does not fit instead of guessing. A tiny random LLaMA with a
sentencepiece tokenizer stands in for a real base model."""
import errno
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapter_io
import adapters
import chat
import bench
import export
import cli
import files
import eval as evaluation
import inspect_adapter
import plot
import train
from cli import ConfigError
from checkpoints import load_model, save_model
from conftest import ROOT, make_hf_checkpoint, make_hf_model, make_meta_checkpoint
from data import prepare, synthetic
from data.prepare import write_json
from model import Config, Transformer
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A checkpoint folder train.py and eval.py take as --model (random weights: nothing here needs
    a good model), and a training file of 40 rows."""
    root = tmp_path_factory.mktemp("base")
    synthetic.train_tokenizer(synthetic.pretrain_corpus(300, seed=0), str(root / "tokenizer"))
    torch.manual_seed(0)
    vocab = Tokenizer.from_pretrained(root).vocab_size
    config = Config("t", vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, intermediate_size=64,
                    block_size=256)
    save_model(Transformer(config), root)
    write_json(root / "rows.json", synthetic.finetune_split(40, 4, seed=1)[0])
    return root


def run(base, out, *args, data=None):
    return train.main([f"--model={base}", f"--data={data or base / 'rows.json'}", f"--out={out}",
                       "--adapter=lora", "--r=4", "--batch_size=4", "--micro_batch_size=2",
                       "--val_set_size=4", "--max_steps=2", "--eval_interval=2", "--warmup_steps=0",
                       "--log_interval=1", "--threads=0", *args])


# ------------------------------------------------------------------------------------ no run lost
def test_a_used_out_is_refused_unless_resumed_or_overwritten(base, tmp_path):
    run(base, tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in train.RUN_FILES}
    refused = f"--out={tmp_path} holds an earlier run .*--resume=true.*--overwrite=true"
    with pytest.raises(SystemExit, match=refused):
        run(base, tmp_path, "--learning_rate=1e-2")
    assert before == {f: (tmp_path / f).read_bytes() for f in train.RUN_FILES}  # untouched
    run(base, tmp_path, "--resume=true")  # continuing is allowed (here: nothing left to do)
    with pytest.raises(SystemExit, match="--resume=true continues .* --overwrite=true replaces"):
        run(base, tmp_path, "--resume=true", "--overwrite=true")
    run(base, tmp_path, "--learning_rate=1e-2", "--overwrite=true")
    adapter = "adapter_model.safetensors"
    assert (tmp_path / adapter).read_bytes() != before[adapter]
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["config"]["learning_rate"] == 1e-2


def test_resume_with_other_adapter_options_is_refused(base, tmp_path):
    run(base, tmp_path)
    with pytest.raises(SystemExit, match="--resume: --r=8 differs from the checkpoint's 4"):
        run(base, tmp_path, "--resume=true", "--r=8")


@pytest.mark.parametrize("key, value, expected", [
    ("micro_batch_size", "0", "at least 1"), ("batch_size", "0", "at least 1"),
    ("eval_interval", "0", "at least 1"), ("log_interval", "0", "at least 1"),
    ("learning_rate", "-1", "more than 0"), ("learning_rate", "0", "more than 0"),
    ("val_set_size", "-5", "at least 0"), ("num_epochs", "0", "at least 1"),
    ("max_steps", "-3", "at least 0"), ("grad_clip", "-1", "at least 0"),
    ("cutoff_len", "1", "at least 2"), ("demo_base_docs", "100", "at least 201"),
])
def test_numeric_settings_out_of_range(key, value, expected):
    with pytest.raises(SystemExit, match=f"--{key}={value}(\\.0)?: expected {expected}"):
        train.get_config(["--model=m", f"--{key}={value}"])


def test_every_numeric_setting_has_a_range():
    numeric = {k for k, v in train.DEFAULTS.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(train.MINIMUM)


def test_out_that_cannot_take_files(base, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--out=.*file is a file, expected a folder"):
        run(base, tmp_path / "file")
    with pytest.raises(SystemExit, match="--out=.*file/sub: cannot write there"):
        run(base, tmp_path / "file" / "sub")
    read_only = "/sys/nano-llm-adapters-test"  # read-only for everyone, root included
    if os.path.isdir("/sys"):
        with pytest.raises(SystemExit, match=f"--out={read_only}: cannot write there"):
            run(base, read_only)


def test_full_disk_mid_run_is_one_line_and_leaves_no_temporary_file(base, tmp_path, monkeypatch):
    def full(path, data):  # resume.pt: half of it written, then the disk is full
        def write(f):
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        files.write_atomic(path, write)
    monkeypatch.setattr(train, "write_atomic", full)
    with pytest.raises(SystemExit, match=f"--out={tmp_path}: writing failed .*No space left"):
        run(base, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(set(train.RUN_FILES) - {"resume.pt"})


def test_full_disk_inside_torch_save_is_an_os_error(tmp_path):
    """torch.save reports a failed write as a RuntimeError; write_atomic makes it an OSError naming
    the file."""
    def write(f):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                           "writing file")
    with pytest.raises(OSError, match="resume.pt: cannot write it .*PytorchStreamWriter failed"):
        files.write_atomic(tmp_path / "resume.pt", write)
    assert os.listdir(tmp_path) == []


def test_overwrite_removes_the_earlier_run_only_once_the_new_one_has_started(base, tmp_path):
    """--overwrite=true with inputs that fail (data that is not JSON, a model that does not load,
    an adapter option the model lacks): the new run stops with one line and the earlier run is
    whole. With good inputs it is replaced, and temporaries that killed writers left go too."""
    run(base, tmp_path / "out")
    before = {f: (tmp_path / "out" / f).read_bytes() for f in train.RUN_FILES}
    (tmp_path / "bad.json").write_text("not json")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.model"):
        (broken / f).write_bytes((base / f).read_bytes())
    (broken / "model.safetensors").write_bytes(b"x" * 100)
    for args, data, model, message in (
            ((), tmp_path / "bad.json", base, "bad.json: not valid JSON"),
            ((), base / "rows.json", broken, "--model=.*broken: cannot load the checkpoint"),
            (("--target_modules=nothing",), None, base, "nothing")):
        with pytest.raises(SystemExit, match=message):
            run(model, tmp_path / "out", "--overwrite=true", *args, data=data)
        assert before == {f: (tmp_path / "out" / f).read_bytes() for f in train.RUN_FILES}
    dead = tmp_path / "out" / ".adapter_model.safetensors.999999999.x.tmp"  # no such pid
    dead.write_bytes(b"half")
    run(base, tmp_path / "out", "--overwrite=true", "--learning_rate=1e-2")
    assert before["adapter_model.safetensors"] != (tmp_path / "out" /
                                                   "adapter_model.safetensors").read_bytes()
    assert sorted(os.listdir(tmp_path / "out")) == sorted(train.RUN_FILES)


def test_a_second_run_into_the_same_out_is_refused(base, tmp_path):
    """Two runs into one --out at once: the second is refused naming the first's process; once
    the first is killed its lock file is taken over."""
    out = tmp_path / "out"
    argv = [sys.executable, "train.py", f"--model={base}", f"--data={base / 'rows.json'}",
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
            run(base, out, "--overwrite=true")
    finally:
        first.kill()
        first.wait()
    assert (out / files.LOCK).read_text().strip() == str(first.pid)  # what kill -9 leaves
    run(base, out, "--overwrite=true")  # taken over
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


def test_unreadable_resume_checkpoint(base, tmp_path):
    run(base, tmp_path)
    data = (tmp_path / "resume.pt").read_bytes()
    (tmp_path / "resume.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit, match=r"--resume: .*resume.pt: cannot read it .*truncated"):
        run(base, tmp_path, "--resume=true")
    torch.save({"step": 1}, tmp_path / "resume.pt")
    with pytest.raises(SystemExit, match="is not a resume checkpoint written by train.py"):
        run(base, tmp_path, "--resume=true")


def test_training_rows_are_deduplicated_before_the_validation_split(base, tmp_path, capsys):
    rows = json.loads((base / "rows.json").read_text())[:20]
    write_json(tmp_path / "twice.json", rows + rows)
    run(base, tmp_path / "out", data=tmp_path / "twice.json")
    assert "dropped 20 duplicate rows" in capsys.readouterr().out
    assert prepare.dedupe(rows + rows[:3]) == (rows, 3)


# ----------------------------------------------------------------------------------- weight files
def garbage(f):
    f.write_bytes(b"not a checkpoint at all" * 4)


def truncate(f):
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def empty(f):
    f.write_bytes(b"")


class Unsafe:
    def __reduce__(self):
        return (print, ("this ran",))


def unsafe(f):
    torch.save({"w": Unsafe()}, f)


def a_list(f):
    torch.save([torch.ones(2)], f)


@pytest.mark.parametrize("layout, file", [("safetensors", "model.safetensors"),
                                          ("bin", "pytorch_model.bin")])
@pytest.mark.parametrize("damage", [truncate, empty, garbage])
def test_damaged_weight_files(tmp_path, layout, file, damage):
    path, _ = make_hf_checkpoint(tmp_path, "llama", layout=layout)
    damage(path / file)
    with pytest.raises(ValueError, match=f"{path / file}: cannot read it"):
        load_model(path)


@pytest.mark.parametrize("damage, message", [(unsafe, "refused as unsafe"),
                                             (a_list, "expected a dict .* got a list")])
def test_foreign_pickles(tmp_path, damage, message, capsys):
    path, _ = make_hf_checkpoint(tmp_path, "llama", layout="bin")
    damage(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"pytorch_model.bin: {message}"):
        load_model(path)
    assert "this ran" not in capsys.readouterr().out


def test_damaged_model_is_one_line_on_the_command_line(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path / "m", "llama")
    truncate(path / "model.safetensors")
    write_json(tmp_path / "set" / "test.json", [{"instruction": "1 + 1?", "answer": "2"}])
    argv = [f"--model={path}", f"--dataset={tmp_path / 'set'}", f"--out={tmp_path / 'out'}"]
    p = subprocess.run([sys.executable, "eval.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"eval.py: error: {path / 'model.safetensors'}: cannot read it")


def test_non_float_weight_is_refused_not_cast(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "llama")
    sd = load_file(path / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].long()
    save_file(sd, path / "model.safetensors")
    refused = "model.safetensors: norm.weight is torch.int64, expected a floating-point tensor"
    with pytest.raises(ValueError, match=refused):
        load_model(path)


def test_config_field_of_the_wrong_type_or_missing(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": "128"}))
    with pytest.raises(ValueError, match="config.json: field 'hidden_size' is '128', expected an "):
        load_model(path)
    del config["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: missing field 'num_hidden_layers'"):
        load_model(path)


def edited(path, name, **fields):
    """Rewrite the JSON file path/name with `fields` changed (None = JSON null)."""
    d = json.loads((path / name).read_text())
    (path / name).write_text(json.dumps({**d, **fields}))


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=None), "field 'hidden_size' is null, which this model type needs"),
    (dict(intermediate_size=-64), "field 'intermediate_size' is -64, expected an integer of at "
                                  "least 1"),
    (dict(num_attention_heads=0), "field 'num_attention_heads' is 0, expected an integer"),
    (dict(rms_norm_eps=float("nan")), "field 'rms_norm_eps' is nan, expected a number above 0"),
    (dict(rope_theta=-1.0), "field 'rope_theta' is -1.0, expected a number above 0"),
    (dict(tie_word_embeddings="yes"), "field 'tie_word_embeddings' is 'yes', expected true or "
                                      "false"),
    (dict(rope_scaling="llama3"), "field 'rope_scaling' is 'llama3', expected a JSON object"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": "8"}), "field 'factor' is '8'"),
    (dict(num_key_value_heads=3), "field 'num_attention_heads' \\(4\\) is not a multiple of "
                                  "'num_key_value_heads' \\(3\\)"),
    (dict(head_dim=None, hidden_size=30), "field 'hidden_size' \\(30\\) is not a multiple of "
                                          "'num_attention_heads' \\(4\\)"),
    (dict(head_dim=7), "the rotary dimension \\(7, field 'rotary_dim' or 'head_dim'\\) must be "
                       "even"),
])
def test_config_json_fields_are_checked_where_they_are_read(tmp_path, fields, message):
    """Each class of bad value in config.json: null where a value is needed, a negative or zero
    count, a non-finite or negative float, a string for a boolean, a nested object that is not
    one (or holds a bad number), sizes that do not divide. One ValueError naming file and field,
    not a TypeError/RuntimeError/ZeroDivisionError from torch."""
    path, _ = make_hf_checkpoint(tmp_path, "llama")
    load_model(path)  # the checkpoint as written loads: the edit alone is refused
    edited(path, "config.json", **fields)
    with pytest.raises(ValueError, match=f"{path / 'config.json'}: {message}"):
        load_model(path)


@pytest.mark.parametrize("fields, message", [
    (dict(n_heads=0), "field 'n_heads' is 0, expected an integer of at least 1"),
    (dict(dim=None), "field 'dim' is null, which this model type needs"),
    (dict(multiple_of=-32), "field 'multiple_of' is -32"),
    (dict(norm_eps="1e-5"), "field 'norm_eps' is '1e-5', expected a number above 0"),
    (dict(vocab_size=0), "field 'vocab_size' is 0, expected an integer of at least 1"),
    (dict(n_heads=5), "field 'dim' \\(64\\) is not a multiple of 'n_heads' \\(5\\)"),
])
def test_params_json_fields_are_checked_where_they_are_read(tmp_path, fields, message):
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"))
    load_model(path)
    edited(path, "params.json", **fields)
    with pytest.raises(ValueError, match=f"{path / 'params.json'}: {message}"):
        load_model(path)


def test_params_json_missing_field(tmp_path):
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"))
    params = json.loads((path / "params.json").read_text())
    del params["dim"]
    (path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="params.json: missing field 'dim'"):
        load_model(path)


def test_index_shard_outside_the_folder_is_refused(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path / "m", "llama", layout="safetensors-sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    shard = path / index["weight_map"][first]
    (tmp_path / "elsewhere.safetensors").write_bytes(shard.read_bytes())
    index["weight_map"][first] = "../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard '\.\./elsewhere\.safetensors' is not a file name"):
        load_model(path)


# ------------------------------------------------------------------------------- Meta checkpoints
def meta_shards(path):
    return [(f, torch.load(f, weights_only=True)) for f in sorted(path.glob("consolidated.*.pth"))]


def test_meta_llama1_per_layer_rope_freqs_are_skipped(tmp_path):
    hf = make_hf_model("llama")
    path = make_meta_checkpoint(tmp_path, hf, n_shards=2)
    plain = {k: v.clone() for k, v in load_model(path).state_dict().items()}  # not file-mapped
    for f, sd in meta_shards(path):  # as LLaMA-1's consolidated.*.pth files carry them
        sd.update({f"layers.{i}.attention.inner_attention.rope.freqs": torch.ones(4)
                   for i in range(2)})
        torch.save(sd, f)
    loaded = load_model(path).state_dict()
    assert loaded.keys() == plain.keys() and all(torch.equal(plain[k], loaded[k]) for k in plain)


def test_meta_every_shard_is_checked(tmp_path):
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"), n_shards=2)
    (f, sd), = meta_shards(path)[1:]
    torch.save({**sd, "layers.0.attention.wz.weight": torch.ones(2)}, f)
    with pytest.raises(KeyError, match=r"consolidated\.01\.pth: 1 tensors match no LLaMA"):
        load_model(path)
    torch.save({**sd, "norm.weight": torch.ones(3)}, f)
    shape = r"consolidated\.01\.pth: norm\.weight has shape \(3,\), consolidated\.00"
    with pytest.raises(ValueError, match=shape):
        load_model(path)


def test_meta_shards_must_hold_equal_parts(tmp_path):
    """Model-parallel shards split a tensor in equal parts: one cut differently is refused by name
    (before: torch.cat's "Sizes of tensors must match")."""
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"), n_shards=2)
    (f, sd), = meta_shards(path)[1:]
    torch.save({**sd, "layers.0.attention.wq.weight": sd["layers.0.attention.wq.weight"][:, :-2]},
               f)
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: layers\.0\.attention\.wq\."
                                         r"weight has shape \(32, 62\), consolidated\.00\.pth "
                                         r"has \(32, 64\)"):
        load_model(path)


def test_meta_shard_values_must_be_tensors(tmp_path):
    path = make_meta_checkpoint(tmp_path, make_hf_model("llama"), n_shards=2)
    (f, sd), = meta_shards(path)[1:]
    torch.save({**sd, "norm.weight": [1.0] * 64}, f)
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: 'norm\.weight' is a list, "
                                         "expected a tensor"):
        load_model(path)


# -------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_larger_than_the_embedding(base, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        (small / f).write_bytes((base / f).read_bytes())
    config = json.loads((small / "config.json").read_text())
    sd = load_file(small / "model.safetensors")
    rows = 100  # fewer embedding rows than the tokenizer has ids
    sd.update({k: v[:rows] for k, v in sd.items()
               if k in ("model.embed_tokens.weight", "lm_head.weight")})
    save_file(sd, small / "model.safetensors")
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    too_small = f"the tokenizer's ids go up to 3\\d\\d, but the model's embedding has {rows} rows"
    with pytest.raises(SystemExit, match=f"--model={small}: .*{too_small}"):
        run(small, tmp_path / "out", data=base / "rows.json")
    with pytest.raises(ValueError, match="tokenizer's ids go up to"):
        cli.load(small, "", "cpu", torch.float32)


# --------------------------------------------------------------------------------------- adapters
def saved_lora(base, tmp_path, **kw):
    model = adapters.add_adapter(load_model(base), "lora", r=4)
    adapter_io.save_adapter(model, tmp_path, **kw)
    return tmp_path


@pytest.mark.parametrize("config, message", [
    ([1, 2], "expected a JSON object, got list"),
    ({"options": {}}, "missing field.s. kind"),
    ({"kind": "lora"}, "missing field.s. options"),
    ({"kind": "lora", "options": [4]}, "'options' is a list, expected a JSON object"),
])
def test_bad_adapter_config(base, tmp_path, config, message):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"adapter_config.json: {message}"):
        adapter_io.load_adapter(load_model(base), tmp_path)


def with_config(path, change):
    """Rewrite path/adapter_config.json through change(dict) (in place)."""
    config = json.loads((path / "adapter_config.json").read_text())
    change(config)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("kind, options, message", [
    ("lora", dict(alpha="16"), "alpha='16': expected a number"),
    ("lora", dict(alpha=float("nan")), "alpha=nan: expected a number"),
    ("lora", dict(r="4"), "r='4': expected an integer"),
    ("lora", dict(r=4.0), "r=4.0: expected an integer"),
    ("lora", dict(dropout="abc"), "dropout='abc': expected a number"),
    ("lora", dict(target_modules="q_proj"), "target_modules='q_proj': expected a list of module "
                                            "names or null"),
    ("lora", dict(target_modules=[1, 2]), "target_modules=\\[1, 2\\]: expected a list"),
    ("prefix", dict(gated="yes"), "gated='yes': expected true or false"),
    ("parallel", dict(scaling="big"), "scaling='big': expected a number or 'learned'"),
    ("parallel", dict(placement=1), "placement=1: expected a string"),
])
def test_adapter_config_options_of_the_wrong_type(base, tmp_path, kind, options, message):
    """Every option of every kind is typed like its default where adapter_config.json is read
    (before: "alpha": "16" was a TypeError inside LoRA's forward)."""
    model = adapters.add_adapter(load_model(base), kind, **{"lora": dict(r=4), "prefix": {},
                                                           "parallel": dict(bottleneck=4)}[kind])
    adapter_io.save_adapter(model, tmp_path)
    adapter_io.load_adapter(load_model(base), tmp_path)  # as saved, it loads
    with_config(tmp_path, lambda c: c["options"].update(options))
    with pytest.raises(ValueError, match=f"adapter_config.json: {message}"):
        adapter_io.load_adapter(load_model(base), tmp_path)
    with_config(tmp_path, lambda c: c.update(kind="lorra"))
    with pytest.raises(ValueError, match="adapter_config.json: kind 'lorra' is not an adapter"):
        adapter_io.load_adapter(load_model(base), tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("r", "8", "field 'r' is '8', expected an integer"),
    ("lora_alpha", "16", "field 'lora_alpha' is '16', expected a number"),
    ("use_rslora", "yes", "field 'use_rslora' is 'yes', expected true or false"),
    ("use_dora", 1, "field 'use_dora' is 1, expected true or false"),
    ("target_modules", [1], "field 'target_modules' is \\[1\\], expected a list of module names"),
    ("lora_dropout", [0.1], "field 'lora_dropout' is \\[0.1\\], expected a number"),
])
def test_peft_adapter_config_fields_of_the_wrong_type(base, tmp_path, field, value, message):
    path = saved_lora(base, tmp_path, format="peft")
    adapter_io.load_adapter(load_model(base), path)
    with_config(path, lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=f"adapter_config.json: {message}"):
        adapter_io.load_adapter(load_model(base), path)


def test_damaged_adapter_weights(base, tmp_path):
    path = saved_lora(base, tmp_path)
    truncate(path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors: cannot read it"):
        adapter_io.load_adapter(load_model(base), path)


def test_peft_target_modules_must_match_the_tensors(base, tmp_path):
    path = saved_lora(base, tmp_path, format="peft")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    disagree = r"target_modules \['q_proj'\] disagree .*\['down_proj', 'k_proj', 'q_proj'"
    with pytest.raises(ValueError, match=disagree):
        adapter_io.load_adapter(load_model(base), path)


def altered_lora(base, tmp_path, change):
    """A saved LoRA whose first tensor is replaced by change(tensor); returns (folder, its key)."""
    path = saved_lora(base, tmp_path)
    sd = load_file(path / "adapter_model.safetensors")
    key = next(iter(sd))
    save_file({**sd, key: change(sd[key])}, path / "adapter_model.safetensors")
    return path, key


def test_integer_adapter_weight_is_refused(base, tmp_path):
    path, key = altered_lora(base, tmp_path, lambda t: t.long())
    with pytest.raises(ValueError, match=f"{key} is torch.int64, this model expects torch.float32"):
        adapter_io.load_adapter(load_model(base), path)


def test_failed_load_adapter_leaves_the_model_as_it_was(base, tmp_path):
    path, _ = altered_lora(base, tmp_path, lambda t: t[:1])  # a wrong shape
    model = load_model(base)
    for p in model.parameters():
        p.requires_grad_(True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="has shape"):
        adapter_io.load_adapter(model, path)
    assert all(p.requires_grad for p in model.parameters()) and model.adapter_configs == {}
    assert model.state_dict().keys() == state.keys()


# ---------------------------------------------------------------------------------- data and eval
def test_prepare_reports_duplicates_and_conflicts(tmp_path):
    rows = [{"instruction": f"q{i}", "answer": str(i)} for i in range(4)]
    dataset = tmp_path / "release" / "dataset" / "AddSub"
    write_json(dataset / "test.json", rows + [rows[1], {"instruction": "q2", "answer": "7"}])
    report = prepare.prepare(tmp_path / "release", verbose=False)
    assert report["duplicates"] == [f"{dataset / 'test.json'}: 1 rows repeat an earlier row "
                                    "exactly (rows 4); 1 rows ask an earlier question with another "
                                    "answer (rows 5)"]
    assert report["test"]["AddSub"] == 6  # reported, kept


def test_prepare_command_line_errors(tmp_path, capsys):
    assert prepare.main(["--from", str(tmp_path / "nothing")]) == 2
    assert "prepare.py: error: --from=" in capsys.readouterr().err
    (tmp_path / "release" / "dataset").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    assert prepare.main(["--from", str(tmp_path / "release"), "--out", str(tmp_path / "file")]) == 2
    assert "--out=" in capsys.readouterr().err


def test_eval_checks_out_before_evaluating_and_reports_duplicates(base, tmp_path, monkeypatch,
                                                                  capsys):
    rows = [{"instruction": "1 + 1?", "answer": "2"}] * 2
    write_json(tmp_path / "set" / "test.json", rows)
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(evaluation, "evaluate",
                        lambda *a, **k: pytest.fail("evaluated before checking --out"))
    with pytest.raises(ValueError, match="--out=.*file is a file"):
        evaluation.main([f"--model={base}", f"--dataset={tmp_path / 'set'}",
                         f"--out={tmp_path / 'file'}"])
    assert "1 rows repeat an earlier row exactly (rows 1)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ tools
def plot_run(folder, kind, acc=0.5, trainable=1000, extra=()):
    """A run folder as train.py leaves it (log.jsonl, adapter_config.json), with `extra` lines."""
    folder.mkdir(parents=True)
    recs = [dict(step=s, loss=3.0 / s) for s in range(1, 6)] + [dict(step=5, val_loss=1.0),
                                                               dict(trainable=trainable),
                                                               dict(base_acc=0.1, adapter_acc=acc)]
    lines = [json.dumps(r) for r in recs] + list(extra)
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "adapter_config.json").write_text(json.dumps({"kind": kind, "options": {}}))
    return folder


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "line 9 is a JSON list"),
    ('"step 6"', "line 9 is a JSON str"),
    ('{"step": 6, "loss": "1.5"}', "record 9: field 'loss' is '1.5', expected a finite number"),
    ('{"step": 6, "loss": NaN}', "record 9: field 'loss' is nan, expected a finite number"),
    ('{"step": null, "loss": 1.0}', "record 9: field 'step' is None, expected a finite number"),
])
def test_plot_a_log_line_that_is_not_a_record(tmp_path, line, message):
    run = plot_run(tmp_path / "lora", "lora", extra=[line])
    with pytest.raises(SystemExit, match=f"{run / 'log.jsonl'}: .*{message}"):
        plot.main([f"--runs={run}", f"--out={tmp_path / 'pics'}"])
    assert not (tmp_path / "pics").exists() or os.listdir(tmp_path / "pics") == []


@pytest.mark.parametrize("tool", ["plot", "inspect_adapter"])
def test_tools_check_out_before_writing(base, tmp_path, tool):
    """An --out that is a file, or under one: one line naming --out (before: FileExistsError)."""
    (tmp_path / "file").write_text("x")
    if tool == "plot":
        run = plot_run(tmp_path / "lora", "lora")
        args = [f"--runs={run}"]
    else:
        args = [f"--model={base}", f"--adapter_dir={saved_lora(base, tmp_path / 'lora')}"]
    main = plot.main if tool == "plot" else inspect_adapter.main
    with pytest.raises(SystemExit, match=f"--out={tmp_path / 'file'} is a file, expected a "
                                         "folder"):
        main(args + [f"--out={tmp_path / 'file'}"])
    with pytest.raises(SystemExit, match=f"--out={tmp_path / 'file' / 'sub'}: cannot write "
                                         "there"):
        main(args + [f"--out={tmp_path / 'file' / 'sub'}"])


def svg_root(path):
    import xml.etree.ElementTree as ET
    return ET.parse(path).getroot()


def svg_all(root, name):
    return list(root.iter("{http://www.w3.org/2000/svg}" + name))


def test_plot_results_a_dot_at_100_percent_lies_inside_the_frame(tmp_path):
    run = plot_run(tmp_path / "lora", "lora", acc=1.0)
    _, results = plot.main([f"--runs={run}", f"--out={tmp_path}"])
    dot, = svg_all(svg_root(results), "circle")
    assert float(dot.get("cy")) - float(dot.get("r")) >= plot.TOP  # was cut by the frame's top


def test_plot_a_kind_keeps_its_colour_when_runs_are_added(tmp_path):
    """Colours come from the adapter kind, not from the run's place in the list: adding a run (or
    another order) changes no colour; a second run of a kind is dashed, in the same colour."""
    def colours(names):
        runs = ",".join(str(tmp_path / n) for n in names)
        loss, _ = plot.main([f"--runs={runs}", f"--out={tmp_path / 'pics'}"])
        return {p.get("data-run"): (p.get("stroke"), p.get("stroke-dasharray"))
                for p in svg_all(svg_root(loss), "polyline") if p.get("class") == "loss"}
    for name, kind in (("lora", "lora"), ("series", "series"), ("dora", "dora"),
                       ("prefix", "prefix"), ("gated", "prefix")):
        plot_run(tmp_path / name, kind)
    two = colours(["series", "lora"])
    four = colours(["dora", "prefix", "lora", "series", "gated"])
    assert two["lora"] == four["lora"] and two["series"] == four["series"]
    assert len({c for c, _ in four.values()}) == 4  # four kinds, four colours
    assert four["gated"] == (four["prefix"][0], "5 3") and four["prefix"][1] is None
    assert four["lora"][0] == plot.KIND_COLORS["lora"]


def test_inspect_pictures_have_a_scale_upright_labels_and_the_table_a_heading(base, tmp_path,
                                                                             capsys):
    lora = saved_lora(base, tmp_path / "lora")
    adapter_svg, attention_svg = inspect_adapter.main(
        [f"--model={base}", f"--adapter_dir={lora}", "--prompt=what is 2 + 3",
         f"--out={tmp_path}"])
    out = capsys.readouterr().out
    assert out.startswith(f"## what the lora adapter in {lora} learned") and "| layer |" in out
    for picture, size in ((adapter_svg, 26), (attention_svg, 12)):
        root = svg_root(picture)
        columns = [t for t in svg_all(root, "text") if "rotate" in (t.get("transform") or "")]
        assert columns and all(t.get("transform").endswith("rotate(-90)") for t in columns)
        xs = sorted({float(t.get("transform").split("(")[1].split()[0]) for t in columns})
        assert min(b - a for a, b in zip(xs, xs[1:])) >= min(size, 10)  # font size 10: no overlap
        # the colour scale: a bar of 10 colours from the least to the largest value
        fills = [r.get("fill") for r in svg_all(root, "rect") if r.get("width") == "16"]
        assert len(fills) % 10 == 0 and fills[0] == inspect_adapter.heat(0, 0, 1)
        assert fills[9] == inspect_adapter.heat(1, 0, 1) != "rgb(255,255,255)"


def test_export_writes_over_nothing_unless_asked(base, tmp_path):
    lora = saved_lora(base, tmp_path / "lora")
    out = tmp_path / "export"
    export.main([f"--model={base}", f"--adapter_dir={lora}", f"--out={out}", "--format=peft"])
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=f"--out={out} already holds adapter_config.json, "
                                         "adapter_model.safetensors: replace them with "
                                         "--overwrite=true"):
        export.main([f"--model={base}", f"--adapter_dir={lora}", f"--out={out}"])
    assert (out / "adapter_model.safetensors").read_bytes() == before
    export.main([f"--model={base}", f"--adapter_dir={lora}", f"--out={out}", "--overwrite=true"])
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
    assert "adapter_config.json" not in os.listdir(out)  # the earlier export's files went
    load_model(out)
    weights = (base / "model.safetensors").read_bytes()
    for into in (base, base / "merged", lora):  # never where the inputs are, even if asked
        with pytest.raises(SystemExit, match=f"--out={into} lies in or holds "
                                             "--(model|adapter_dir)="):
            export.main([f"--model={base}", f"--adapter_dir={lora}", f"--out={into}",
                         "--overwrite=true"])
    assert (base / "model.safetensors").read_bytes() == weights
    assert not (base / "merged").exists()


def test_prepare_never_writes_into_the_release_and_asks_before_writing_over(tmp_path, capsys):
    release = tmp_path / "release"
    write_json(release / "dataset" / "AddSub" / "test.json", [{"instruction": "q", "answer": "1"}])
    released = (release / "dataset" / "AddSub" / "test.json").read_bytes()
    for out in (release / "dataset", release):
        assert prepare.main(["--from", str(release), "--out", str(out), "--overwrite"]) == 2
        assert "lies in or holds --from=" in capsys.readouterr().err
    assert (release / "dataset" / "AddSub" / "test.json").read_bytes() == released
    assert prepare.main(["--from", str(release), "--out", str(tmp_path / "out")]) == 0
    assert prepare.main(["--from", str(release), "--out", str(tmp_path / "out")]) == 2
    assert "already holds AddSub: replace them with --overwrite" in capsys.readouterr().err
    assert prepare.main(["--from", str(release), "--out", str(tmp_path / "out"),
                         "--overwrite"]) == 0


@pytest.mark.parametrize("flag, message", [("--warmup=-1", "--warmup=-1: must be at least 0"),
                                           ("--n_layer=-2", "--n_layer=-2: must be at least 0"),
                                           ("--peak_tflops=0", "--peak_tflops=0.0: must be more")])
def test_bench_settings_out_of_range(flag, message):
    with pytest.raises(ConfigError, match=message):
        bench.parse([flag])


def test_a_prompt_past_opts_position_table(base):
    """OPT's learned positions end at max_position_embeddings: a longer input is one ValueError
    (before: an IndexError on a CPU, a device-side assert on a GPU), with or without a cache."""
    model = Transformer(Config.from_name("tiny-opt", block_size=16)).eval()
    model(torch.zeros(1, 16, dtype=torch.long))  # the whole table is usable
    with pytest.raises(ValueError, match="17 tokens, but tiny-opt has learned positions for 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache(1, 32)
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="17 tokens"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_quantize_report_of_a_folder_that_does_not_load(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path / "m", "llama")
    truncate(path / "model.safetensors")
    for source, message in ((path, f"{path / 'model.safetensors'}: cannot read it"),
                            (tmp_path / "nothing", ".*nothing: neither a preset .* nor a")):
        p = subprocess.run([sys.executable, "quantize.py", str(source)], cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert re.match(f"quantize.py: error: {message}", p.stderr.strip().splitlines()[-1])


def test_chat_says_which_adapter_answers(base, tmp_path, capsys):
    """--prompt mode: one line on stderr names the base and the adapter loaded (stdout keeps the
    answer alone), so a wrong --adapter_dir is seen."""
    lora = saved_lora(base, tmp_path / "lora")
    chat.main([f"--model={base}", f"--adapter_dir={lora}", "--prompt=2 + 3?",
               "--max_new_tokens=2"])
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == f"{base} + {lora}" and str(lora) not in captured.out
    chat.main([f"--model={base}", "--prompt=2 + 3?", "--max_new_tokens=2"])
    assert capsys.readouterr().err.splitlines()[0] == f"{base} (no adapter)"
