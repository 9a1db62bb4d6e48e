"""Reliability (issue 14): no run lost, no traceback for bad input, nothing accepted silently.
Each test is one case of the fault-injection trial: a bad file, setting or folder gets one line
naming it; loaders refuse what does not fit instead of guessing. A tiny random LLaMA with a
sentencepiece tokenizer stands in for a real base model."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapter_io
import adapters
import cli
import files
import eval as evaluation
import train
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
