"""export.py: a merged Hugging Face folder that transformers loads with our logits, the adapter
alone in PEFT's layout, and refusals of one line."""
import os

import pytest
import torch

from conftest import saved_lora, trained_adapter

import export
from checkpoints import load_model


def test_export_merged_loads_in_transformers_with_our_logits(tiny_dir, tmp_path):
    tf = pytest.importorskip("transformers")
    ours = trained_adapter(tiny_dir, "lora", tmp_path / "lora", r=4)
    export.main([f"--model={tiny_dir}", f"--adapter_dir={tmp_path / 'lora'}",
                 f"--out={tmp_path / 'merged'}"])
    tokenizer = (tmp_path / "merged" / "tokenizer.model").read_bytes()
    assert tokenizer == (tiny_dir / "tokenizer.model").read_bytes()
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    x = torch.randint(0, 360, (2, 9))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)[0]).abs().max().item()
        moved = (ours(x)[0] - load_model(tiny_dir)(x)[0]).abs().max()
        assert diff < 1e-5 and moved > 1e-3  # and the adapter matters


def test_export_peft_loads_in_peft(tiny_dir, tmp_path):
    tf, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    ours = trained_adapter(tiny_dir, "lora", tmp_path / "lora", r=4,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    export.main([f"--model={tiny_dir}", f"--adapter_dir={tmp_path / 'lora'}",
                 f"--out={tmp_path / 'peft'}", "--format=peft"])
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    x = torch.randint(0, 360, (1, 7))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max() < 1e-5


def test_export_refuses_what_cannot_merge(tiny_dir, tmp_path, capsys):
    trained_adapter(tiny_dir, "series", tmp_path / "series", bottleneck=8)
    with pytest.raises(SystemExit, match="series adapter cannot be merged"):
        export.main([f"--model={tiny_dir}", f"--adapter_dir={tmp_path / 'series'}",
                     f"--out={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match=r"export.py: error: --adapter_dir=.*nowhere: no such"):
        export.main([f"--model={tiny_dir}", f"--adapter_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(SystemExit, match="--format=gguf: expected one of merged, peft"):
        export.main([f"--model={tiny_dir}", f"--adapter_dir={tmp_path / 'series'}",
                     "--format=gguf"])
    with pytest.raises(SystemExit, match="--adapter_dir is required with --model"):
        export.main([f"--model={tiny_dir}"])
    with pytest.raises(SystemExit, match="unknown setting --adapter; settings: model, "):
        # --adapter is an adapter kind elsewhere (train.py, bench.py): here the folder has its name
        export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'series'}"])


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
def test_export_writes_over_nothing_unless_asked(train_base, tmp_path):
    lora = saved_lora(train_base, tmp_path / "lora")
    out = tmp_path / "export"
    export.main([f"--model={train_base}", f"--adapter_dir={lora}", f"--out={out}", "--format=peft"])
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=f"--out={out} already holds adapter_config.json, "
                                         "adapter_model.safetensors: replace them with "
                                         "--overwrite=true"):
        export.main([f"--model={train_base}", f"--adapter_dir={lora}", f"--out={out}"])
    assert (out / "adapter_model.safetensors").read_bytes() == before
    loads = []  # refused before the base is loaded (minutes for a 7B model)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(export, "load_for_tool", lambda *a, **k: loads.append(1))
        with pytest.raises(SystemExit, match="already holds"):
            export.main([f"--model={train_base}", f"--adapter_dir={lora}", f"--out={out}"])
    assert not loads
    export.main([f"--model={train_base}", f"--adapter_dir={lora}", f"--out={out}",
                 "--overwrite=true"])
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
    assert "adapter_config.json" not in os.listdir(out)  # the earlier export's files went
    load_model(out)
    weights = (train_base / "model.safetensors").read_bytes()
    for into in (train_base, train_base / "merged", lora):  # never where its inputs are
        with pytest.raises(SystemExit, match=f"--out={into} lies in or holds "
                                             "--(model|adapter_dir)="):
            export.main([f"--model={train_base}", f"--adapter_dir={lora}", f"--out={into}",
                         "--overwrite=true"])
    assert (train_base / "model.safetensors").read_bytes() == weights
    assert not (train_base / "merged").exists()
