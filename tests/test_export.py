"""export.py: a merged Hugging Face folder that transformers loads with our logits, the adapter
alone in PEFT's layout, and refusals of one line."""
import pytest
import torch

from conftest import trained_adapter

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
