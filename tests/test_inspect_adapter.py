"""inspect_adapter.py: attention weights recomputed from each layer's own inputs (times the values:
the fused attention's output), the table of what an adapter learned, and the pictures."""
import os
import xml.etree.ElementTree as ET

import pytest
import torch

from conftest import randomize_, saved_lora, tiny_model, trained_adapter

import adapters
import inspect_adapter
from slots import slots

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("family", ["llama-gqa", "gptj", "bloom"])
def test_attention_weights_times_values_is_the_fused_output(family):
    qkv = ["query_key_value"] if family == "bloom" else ["q_proj", "k_proj", "v_proj"]
    model = adapters.add_adapter(tiny_model(family), "lora", r=4, target_modules=qkv)
    for _, _, slot in slots(model):
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
    trained_adapter(tiny_dir, "lora", tmp_path / "lora", r=2)
    written = inspect_adapter.main([f"--model={tiny_dir}", f"--adapter_dir={tmp_path / 'lora'}",
                                    "--prompt=how many pens", "--layer=1"])
    assert [os.path.basename(w) for w in written] == ["adapter.svg", "attention.svg"]
    for w in written:
        ET.parse(w)
    assert "| 1 | mlp.down_proj | norm(dW) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--layer=5: the model has 2 layers"):
        inspect_adapter.main([f"--model={tiny_dir}", "--layer=5"])
    with pytest.raises(SystemExit, match=r"inspect_adapter.py: error: --model=.*nowhere: no such"):
        inspect_adapter.main([f"--model={tmp_path / 'nowhere'}"])


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
def test_inspect_pictures_have_a_scale_upright_labels_and_the_table_a_heading(train_base, tmp_path,
                                                                             capsys):
    lora = saved_lora(train_base, tmp_path / "lora")
    adapter_svg, attention_svg = inspect_adapter.main(
        [f"--model={train_base}", f"--adapter_dir={lora}", "--prompt=what is 2 + 3",
         f"--out={tmp_path}"])
    out = capsys.readouterr().out
    assert out.startswith(f"## what the lora adapter in {lora} learned") and "| layer |" in out
    for picture, size in ((adapter_svg, 26), (attention_svg, 12)):
        root = ET.parse(picture).getroot()
        columns = [t for t in root.iter(SVG + "text") if "rotate" in (t.get("transform") or "")]
        assert columns and all(t.get("transform").endswith("rotate(-90)") for t in columns)
        xs = sorted({float(t.get("transform").split("(")[1].split()[0]) for t in columns})
        assert min(b - a for a, b in zip(xs, xs[1:])) >= min(size, 10)  # font size 10: no overlap
        # the colour scale: a bar of 10 colours from the least to the largest value
        fills = [r.get("fill") for r in root.iter(SVG + "rect") if r.get("width") == "16"]
        assert len(fills) % 10 == 0 and fills[0] == inspect_adapter.heat(0, 0, 1)
        assert fills[9] == inspect_adapter.heat(1, 0, 1) != "rgb(255,255,255)"


def test_inspect_checks_out_before_writing(train_base, tmp_path):
    """An --out that is a file, or under one: one line naming --out (before: FileExistsError)."""
    (tmp_path / "file").write_text("x")
    args = [f"--model={train_base}", f"--adapter_dir={saved_lora(train_base, tmp_path / 'lora')}"]
    with pytest.raises(SystemExit, match=f"--out={tmp_path / 'file'} is a file, expected a "
                                         "folder"):
        inspect_adapter.main(args + [f"--out={tmp_path / 'file'}"])
    with pytest.raises(SystemExit, match=f"--out={tmp_path / 'file' / 'sub'}: cannot write "
                                         "there"):
        inspect_adapter.main(args + [f"--out={tmp_path / 'file' / 'sub'}"])
