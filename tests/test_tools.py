"""The tools around training: export.py (merged HF folder, PEFT), chat.py (streaming), plot.py (SVG pictures),
inspect_adapter.py (attention weights, what an adapter learned), and the demo's thread choice in train.py."""
import io
import json
import xml.etree.ElementTree as ET

import pytest
import torch

from conftest import randomize_, tiny_model
from test_eval import tiny_dir  # noqa: F401  (the fixture: a tiny LLaMA folder with a sentencepiece tokenizer)

import adapters
import chat
import eval as ev
import export
import train
from checkpoints import load_model
from data.template import format_prompt


def trained(base_dir, kind, out, **options):
    """An adapter of `kind` on the base in base_dir with random (non-zero) weights, saved to out."""
    model = adapters.add_adapter(load_model(base_dir), kind, **options)
    torch.manual_seed(1)
    for _, _, slot in adapters.slots(model):
        randomize_(slot, std=0.05)
    adapters.save_adapter(model, out, base_model=str(base_dir))
    return model.eval()


def test_export_merged_loads_in_transformers_with_our_logits(tiny_dir, tmp_path):
    tf = pytest.importorskip("transformers")
    ours = trained(tiny_dir, "lora", tmp_path / "lora", r=4)
    export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'lora'}", f"--out={tmp_path / 'merged'}"])
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    x = torch.randint(0, 360, (2, 9))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)[0]).abs().max().item()
        assert diff < 1e-5 and (ours(x)[0] - load_model(tiny_dir)(x)[0]).abs().max() > 1e-3  # the adapter matters


def test_export_peft_loads_in_peft(tiny_dir, tmp_path):
    tf, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    ours = trained(tiny_dir, "lora", tmp_path / "lora", r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'lora'}", f"--out={tmp_path / 'peft'}",
                 "--format=peft"])
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    x = torch.randint(0, 360, (1, 7))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max() < 1e-5


def test_export_refuses_what_cannot_merge(tiny_dir, tmp_path, capsys):
    trained(tiny_dir, "series", tmp_path / "series", bottleneck=8)
    with pytest.raises(SystemExit, match="series adapter cannot be merged"):
        export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'series'}", f"--out={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match=r"--adapter=.*nowhere: no such folder"):
        export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'nowhere'}"])
    with pytest.raises(SystemExit, match="--format=gguf: expected one of merged, peft"):
        export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'series'}", "--format=gguf"])


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_chat_streams_the_greedy_generation(tiny_dir, tmp_path, capsys, kind):
    trained(tiny_dir, kind, tmp_path / kind, **({"r": 4} if kind == "lora" else {"num_virtual_tokens": 3}))
    question = "how many apples does Tom have now"
    text = chat.main([f"--model={tiny_dir}", f"--adapter={tmp_path / kind}", f"--prompt={question}",
                      "--max_new_tokens=24"])
    model, tok, _ = ev.load(tiny_dir, tmp_path / kind, "cpu", torch.float32)
    expected = ev.generate_batch(model, tok, [format_prompt(question)], 24)[0]
    assert text == expected and capsys.readouterr().out == expected + "\n" and len(expected) > 5


def test_chat_stream_yields_tokens_one_at_a_time(tiny_dir):
    model, tok, _ = ev.load(tiny_dir, "", "cpu", torch.float32)
    ids = tok.encode(format_prompt("how many pens"), bos=True)
    steps = chat.stream(model, ids, 6)
    first = next(steps)  # available before the rest is computed
    assert [first, *steps] == model.generate(torch.tensor([ids]), 6)[0, len(ids):].tolist()
