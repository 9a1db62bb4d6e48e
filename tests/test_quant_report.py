"""quant_report.py: the bytes it reports are those of the model loaded with --quantize, the errors
are those of quantize -> dequantize, and a folder that does not load is one line."""
import re
import subprocess
import sys

import pytest
import torch

import quant_report
from checkpoints import load_model
from conftest import ROOT, make_hf_checkpoint, truncate
from quantize import MODES, dequantize, model_bytes, quantize


def rows(text):
    """The report's table -> {mode: (bytes, bits, mean error, max error)}."""
    found = re.findall(r"^\| (\S+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+)(?:, ([\d.]+))? \|$", text,
                       re.M)
    return {m: (int(b.replace(",", "")), float(bits), float(mean), float(mx or mean))
            for m, b, bits, mean, mx in found}


def test_a_folders_bytes_are_those_of_the_model_loaded_quantized(tmp_path, capsys):
    path, _ = make_hf_checkpoint(tmp_path / "m", "llama")
    quant_report.main([f"--model={path}"])
    table = rows(capsys.readouterr().out)
    assert set(table) == {"bf16", *MODES}
    assert table["bf16"][0] == model_bytes(load_model(path, dtype=torch.bfloat16))
    for mode in MODES:  # projections packed, everything else in bf16: as load_model makes it
        assert table[mode][0] == model_bytes(load_model(path, dtype=torch.bfloat16,
                                                        quantize=mode)), mode
    # the error of layer 0 recomputed by hand: the report measures every layer, not one
    model = load_model(path, dtype=torch.float32)
    ws = [m.weight for n, m in model.layers[0].named_modules() if n.endswith("_proj")]
    err = sum((dequantize(quantize(w, "nf4"), "nf4", w.shape, torch.float32) - w).square().sum()
              for w in ws)
    layer0 = (err / sum(w.square().sum() for w in ws)).sqrt().item()
    assert table["nf4"][2] <= table["nf4"][3] and abs(layer0 - table["nf4"][2]) < 0.01
    assert table["int8"][2] < table["nf4"][2]  # 8 bits per weight err less than 4


def test_a_preset_is_counted_from_one_layer_on_the_meta_device(capsys):
    quant_report.main(["--model=tiny-llama"])
    table = rows(capsys.readouterr().out)
    _, (layer,) = quant_report.preset_layers("tiny-llama")
    n, rows_ = sum(w.numel() for w in layer.values()), sum(len(w) for w in layer.values())
    assert table["int8"][1] == pytest.approx(8 + 32 * rows_ / n, abs=1e-3)  # + fp32 scale a row
    assert table["nf4"][1] == pytest.approx(4 + 32 / 64, abs=0.01)  # + an fp32 absmax per 64
    assert table["bf16"][0] > table["int8"][0] > table["nf4"][0] > table["nf4-dq"][0]


def test_a_folder_that_does_not_load_is_one_line(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path / "m", "llama")
    truncate(path / "model.safetensors")
    for source, message in ((path, f"{path / 'model.safetensors'}: cannot read it"),
                            (tmp_path / "nothing", ".*nothing: neither a preset .* nor a")):
        p = subprocess.run([sys.executable, "quant_report.py", f"--model={source}"], cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert re.match(f"quant_report.py: error: {message}", p.stderr.strip().splitlines()[-1])
