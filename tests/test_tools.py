"""The tools around training: export.py (merged HF folder, PEFT), chat.py (streaming), plot.py (SVG
pictures), inspect_adapter.py (attention weights, what an adapter learned), and the demo's thread
choice and messages in train.py."""
import json
import os
import xml.etree.ElementTree as ET

import pytest
import torch

from conftest import randomize_, tiny_model

import adapter_io
import adapters
import chat
import eval as ev
import export
import inspect_adapter
import plot
import train
from checkpoints import load_model
from data.template import format_prompt


def trained(base_dir, kind, out, **options):
    """An adapter of `kind` on the base in base_dir with random (non-zero) weights, saved to out."""
    model = adapters.add_adapter(load_model(base_dir), kind, **options)
    torch.manual_seed(1)
    for _, _, slot in adapters.slots(model):
        randomize_(slot, std=0.05)
    adapter_io.save_adapter(model, out, base_model=str(base_dir))
    return model.eval()


def test_export_merged_loads_in_transformers_with_our_logits(tiny_dir, tmp_path):
    tf = pytest.importorskip("transformers")
    ours = trained(tiny_dir, "lora", tmp_path / "lora", r=4)
    export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'lora'}",
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
    ours = trained(tiny_dir, "lora", tmp_path / "lora", r=4,
                   target_modules=["q_proj", "v_proj", "down_proj"])
    export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'lora'}",
                 f"--out={tmp_path / 'peft'}", "--format=peft"])
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    x = torch.randint(0, 360, (1, 7))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max() < 1e-5


def test_export_refuses_what_cannot_merge(tiny_dir, tmp_path, capsys):
    trained(tiny_dir, "series", tmp_path / "series", bottleneck=8)
    with pytest.raises(SystemExit, match="series adapter cannot be merged"):
        export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'series'}",
                     f"--out={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match=r"--adapter=.*nowhere: no such folder"):
        export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'nowhere'}"])
    with pytest.raises(SystemExit, match="--format=gguf: expected one of merged, peft"):
        export.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'series'}", "--format=gguf"])


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_chat_streams_the_greedy_generation(tiny_dir, tmp_path, capsys, kind):
    options = {"r": 4} if kind == "lora" else {"num_virtual_tokens": 3}
    trained(tiny_dir, kind, tmp_path / kind, **options)
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


def write_run(folder, kind, n_steps, trainable, acc):
    """A run folder as train.py leaves it: log.jsonl with loss, val_loss, summary, accuracy."""
    folder.mkdir(parents=True)
    recs = [dict(step=s, loss=3.0 / s, lr=1e-3, tok_s=100) for s in range(1, n_steps + 1)]
    recs += [dict(step=s, val_loss=2.0 / s) for s in range(5, n_steps + 1, 5)]
    recs += [dict(summary=dict(steps=n_steps), trainable=trainable, total=10 ** 6),
             dict(base_acc=0.08, adapter_acc=acc)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def polylines(svg_path, cls):
    root = ET.parse(svg_path).getroot()
    lines = root.iter("{http://www.w3.org/2000/svg}polyline")
    return {p.get("data-run"): p.get("points").split() for p in lines if p.get("class") == cls}


def test_plot_draws_every_demo_run(tmp_path, capsys):
    runs = {"lora": write_run(tmp_path / "lora", "lora", 20, 221184, 1.0),
            "prefix": write_run(tmp_path / "prefix", "prefix", 12, 10240, 0.835)}
    (tmp_path / "base").mkdir()  # folders without a log are not runs
    loss, results = plot.main([f"--demo_dir={tmp_path}"])
    for name, recs in runs.items():  # a polyline per run, a point per logged step (and validation)
        assert len(polylines(loss, "loss")[name]) == sum("loss" in r for r in recs)
        assert len(polylines(loss, "val")[f"{name} val"]) == sum("val_loss" in r for r in recs)
    assert set(polylines(loss, "loss")) == {"lora", "prefix"}
    root = ET.parse(results).getroot()
    dots = [c for c in root.iter("{http://www.w3.org/2000/svg}circle")]
    assert len(dots) == 2 and float(dots[0].get("cx")) > float(dots[1].get("cx"))  # more params
    assert float(dots[0].get("cy")) < float(dots[1].get("cy"))  # higher accuracy, higher up
    assert "prefix (83.5%)" in open(results).read() and "wrote" in capsys.readouterr().out


def test_plot_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no run folders with a log.jsonl"):
        plot.main([f"--demo_dir={tmp_path}"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"bad/log.jsonl: not one JSON object a line"):
        plot.main([f"--runs={tmp_path / 'bad'}"])
    with pytest.raises(SystemExit, match="has no log.jsonl"):
        plot.main([f"--runs={tmp_path}"])


def test_ticks_are_round_and_inside():
    assert plot.ticks(0, 100, False) == [0, 20, 40, 60, 80, 100]
    assert plot.ticks(1e3, 3e5, True) == [1000, 10000, 100000]
    assert plot.ticks(1e3, 3e4, True) == [1000, 2000, 5000, 10000, 20000]
    assert all(0.3 <= t <= 0.9 for t in plot.ticks(0.3, 0.9, True))


@pytest.mark.parametrize("family", ["llama-gqa", "gptj", "bloom"])
def test_attention_weights_times_values_is_the_fused_output(family):
    qkv = ["query_key_value"] if family == "bloom" else ["q_proj", "k_proj", "v_proj"]
    model = adapters.add_adapter(tiny_model(family), "lora", r=4, target_modules=qkv)
    for _, _, slot in adapters.slots(model):
        randomize_(slot, std=0.05)  # the adapter on q/k/v must be part of the recomputed weights
    model.eval()
    outs = []  # what each output projection receives: the fused SDPA output, heads side by side
    hooks = [m.attn.get_submodule(m.attn.out_name).register_forward_pre_hook(
        lambda _, a: outs.append(a[0])) for m in model.layers]
    x = torch.randint(0, 256, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row: the mask path
    for attention_mask in (None, mask):
        outs.clear()
        layers = inspect_adapter.attention_weights(model, x, attention_mask)
        assert len(layers) == len(outs) == model.config.n_layer
        for (w, v), fused in zip(layers, outs):
            assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5) and (w.triu(1) == 0).all()
            assert torch.allclose((w @ v).transpose(1, 2).flatten(2), fused, atol=1e-5)
    for h in hooks:
        h.remove()


def test_adapter_summary_knows_lora_gates_bottlenecks_and_the_rest():
    model = tiny_model("llama")
    adapters.add_adapter(model, "lora", name="l", r=2, target_modules=["v_proj"])
    adapters.add_adapter(model, "prefix", name="g", gated=True, num_virtual_tokens=2)
    adapters.add_adapter(model, "series", name="s", bottleneck=4)
    adapters.add_adapter(model, "prompt", name="p", num_virtual_tokens=3)
    with torch.no_grad():
        lora = model.layers[1].attn.v_proj.adapter["l"]
        lora.lora_B.weight.fill_(0.1)
        model.layers[0].attn.prefix["g"].gate.fill_(0.25)
    rows = {(layer, place, q): v for layer, place, q, v in inspect_adapter.adapter_summary(model)}
    assert rows[1, "attn.v_proj", "l:norm(dW)"] == pytest.approx(lora.delta().norm().item())
    assert rows[0, "attn.v_proj", "l:norm(dW)"] == 0  # B starts at zero
    assert rows[0, "attn.prefix", "g:gate"] == 0.25
    assert rows[1, "post_mlp", "s:norm(up)"] == 0 and rows[1, "post_mlp", "s:norm(down)"] > 0
    assert rows[-1, "prompt", "p:norm(embedding)"] > 0  # a kind without its own summary: norms
    grids = inspect_adapter.adapter_grids(inspect_adapter.adapter_summary(model), "x")
    svg = inspect_adapter.stack(grids)
    assert ET.fromstring(svg).tag.endswith("svg")


def test_inspect_command_writes_pictures(tiny_dir, tmp_path, capsys):
    trained(tiny_dir, "lora", tmp_path / "lora", r=2)
    written = inspect_adapter.main([f"--model={tiny_dir}", f"--adapter={tmp_path / 'lora'}",
                                    "--prompt=how many pens", "--layer=1"])
    assert [os.path.basename(w) for w in written] == ["adapter.svg", "attention.svg"]
    for w in written:
        ET.parse(w)
    assert "| 1 | mlp.down_proj | norm(dW) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--layer=5: the model has 2 layers"):
        inspect_adapter.main([f"--model={tiny_dir}", "--layer=5"])


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


def test_eval_demo_table_points_to_the_pictures(tiny_dir, tmp_path, capsys):
    import shutil
    shutil.copytree(tiny_dir, tmp_path / "base")
    trained(tmp_path / "base", "lora", tmp_path / "lora", r=2)
    rows = [dict(instruction="how many pens", input="", output="3", answer="3")] * 2
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.json").write_text(json.dumps(rows))
    ev.main([f"--demo_dir={tmp_path}", "--max_new_tokens=4", f"--out={tmp_path / 'eval'}"])
    assert "pictures: python plot.py" in capsys.readouterr().err
