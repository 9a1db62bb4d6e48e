"""chat.py: the answer streamed through generate.py's callback equals the batched greedy response,
arrives token by token, stops on any of the tokenizer's stop ids, and says when max_new_tokens cut
it."""
import io
from types import SimpleNamespace

import pytest
import torch

from conftest import trained_adapter

import chat
from cli import load
from data.template import TEMPLATES, format_prompt
from generate import MAX_NEW_TOKENS, generate_batch, generate_ids

ALPACA = TEMPLATES["alpaca"]


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_chat_streams_the_greedy_generation(tiny_dir, tmp_path, capsys, kind):
    options = {"r": 4} if kind == "lora" else {"num_virtual_tokens": 3}
    trained_adapter(tiny_dir, kind, tmp_path / kind, **options)
    question = "how many apples does Tom have now"
    text = chat.main([f"--model={tiny_dir}", f"--adapter_dir={tmp_path / kind}",
                      f"--prompt={question}", "--max_new_tokens=24"])
    model, tok, _ = load(tiny_dir, tmp_path / kind, "cpu", torch.float32)
    expected = generate_batch(model, tok, [ALPACA.encode_prompt(tok, question)], 24)[0]
    captured = capsys.readouterr()
    assert text == expected.text and captured.out == expected.text + "\n"
    assert len(expected.text) > 5 and expected.stop == MAX_NEW_TOKENS
    assert "[stopped: max_new_tokens]" in captured.err  # the limit cut it, and chat says so


class Written(io.StringIO):
    """stdout that notes how many forward passes the model had run at each write."""

    def __init__(self, forwards):
        super().__init__()
        self.forwards, self.at = forwards, []

    def write(self, text):
        self.at.append(len(self.forwards))
        return super().write(text)


def test_chat_writes_each_token_as_it_comes(tiny_dir):
    model, tok, _ = load(tiny_dir, "", "cpu", torch.float32)
    forwards = []
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    out = Written(forwards)
    ids = ALPACA.encode_prompt(tok, "how many pens")
    try:
        text = chat.answer(model, tok, ids, SimpleNamespace(max_new_tokens=8, temperature=0.0,
                                                            top_k=0), out)
    finally:
        hook.remove()
    # the first text is out after the prefill and before the last step: streamed, not at the end
    assert out.at[0] == 1 and len(forwards) == 8 and len(set(out.at)) > 3
    assert ids == tok.encode(format_prompt("how many pens"), bos=True)
    assert text == tok.decode(generate_ids(model, [ids], 8, stop_ids=[tok.eos_id])[0])


def test_chat_stops_on_a_second_stop_id(tiny_dir, monkeypatch, capsys):
    # Llama 3 ends a turn with <|eot_id|>, not its EOS: any of tok.stop_ids ends the answer
    model, tok, _ = load(tiny_dir, "", "cpu", torch.float32)
    cfg = SimpleNamespace(max_new_tokens=12, temperature=0.0, top_k=0)
    prompt = ALPACA.encode_prompt(tok, "Tom buys more pens and")
    free = generate_ids(model, [prompt], 12)[0]
    assert tok.eos_id not in free and len(free) == 12
    assert chat.answer(model, tok, prompt, cfg, io.StringIO()) == tok.decode(free)
    assert "[stopped: max_new_tokens]" in capsys.readouterr().err
    second = free[3]  # a token the model emits: as a stop id it ends the answer there
    assert tok.stop_ids == {tok.eos_id}  # a LLaMA tokenizer: its EOS alone
    monkeypatch.setattr(tok, "stop_ids", frozenset({tok.eos_id, second}))
    out = io.StringIO()
    text = chat.answer(model, tok, prompt, cfg, out)
    n = free.index(second)
    assert text == tok.decode(free[:n]) and out.getvalue() == text + "\n" and n <= 3
    assert "[stopped" not in capsys.readouterr().err


def test_chat_errors_are_one_line(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"chat.py: error: --adapter_dir=.*nowhere: no such"):
        chat.main([f"--model={tiny_dir}", f"--adapter_dir={tmp_path / 'nowhere'}", "--prompt=x"])
    with pytest.raises(SystemExit, match="chat.py: error: --max_new_tokens must be at least 1"):
        chat.main([f"--model={tiny_dir}", "--max_new_tokens=0", "--prompt=x"])
    with pytest.raises(SystemExit, match=r"run `python train.py` first"):
        chat.main([f"--demo_dir={tmp_path / 'demo'}", "--prompt=x"])
