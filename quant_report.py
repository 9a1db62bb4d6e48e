"""
What quantizing a base costs and saves, before loading it for training (quantize.py does the maths).

    python quant_report.py --model=llama-7b        # a preset: one layer of random weights
    python quant_report.py --model=out/demo/base   # a checkpoint folder: its own weights

Prints, for bf16 and each mode of quantize.py, the bytes of the model (projections packed,
everything else in bf16), the bits per projection weight and the relative error of each layer.
A preset is built on the meta device (no memory) and one layer of random N(0, 0.02) projections
is quantized for real, counted n_layer times; a folder's every layer is measured.
"""
import os
import sys

import torch

from checkpoints import load_model
from cli import ConfigError, configure, fail
from model import Transformer
from presets import PRESETS, Config
from quantize import MODES, dequantize, is_projection, quantize

DEFAULTS = dict(model="llama-7b")  # a preset name or a checkpoint folder


def layer_report(weights, mode):
    """{name: W} of one layer -> (bytes of the packed weights, relative Frobenius error of the
    layer: sqrt(sum ||W - dequantize(quantize(W))||^2 / sum ||W||^2) over its projections)."""
    nbytes, err, norm = 0, 0.0, 0.0
    for w in weights.values():
        q = quantize(w, mode)
        nbytes += sum(t.numel() * t.element_size() for t in q.values())
        err += (dequantize(q, mode, w.shape, torch.float32) - w.float()).square().sum().item()
        norm += w.float().square().sum().item()
    return nbytes, (err / norm) ** 0.5


def report(model, layers, source):
    """Print, per mode, the bytes of the model and the error of its layers. layers: {name: W} of
    each layer measured (fewer than n_layer: each stands for n_layer / len(layers) layers)."""
    n_layer = model.config.n_layer
    n_proj = sum(w.numel() for w in layers[0].values()) * n_layer
    rest = 2 * (sum(p.numel() for p in model.parameters()) - n_proj)  # bf16
    print(f"{source}: {n_proj + rest // 2:,} parameters, {n_proj:,} in projections")
    print("| mode | bytes | bits per projection weight | relative error per layer (mean, max) |")
    print(f"| bf16 | {2 * n_proj + rest:,} | 16 | 0 |")
    for mode in MODES:
        per_layer = [layer_report(w, mode) for w in layers]
        nbytes = sum(b for b, _ in per_layer) * n_layer // len(layers)
        errors = [e for _, e in per_layer]
        print(f"| {mode} | {nbytes + rest:,} | {8 * nbytes / n_proj:.3f} | "
              f"{sum(errors) / len(errors):.4f}, {max(errors):.4f} |")


def preset_layers(name):
    """A preset on the meta device and one layer of random N(0, 0.02) projections (quantized for
    real, counted n_layer times)."""
    with torch.device("meta"):
        model = Transformer(Config.from_name(name))
    torch.manual_seed(0)
    return model, [{n: torch.randn(m.weight.shape) * 0.02
                    for n, m in model.layers[0].named_modules() if is_projection(m)}]


def folder_layers(path):
    """A checkpoint folder in fp32 and the projections of each of its layers."""
    model = load_model(path, dtype=torch.float32)
    return model, [{n: m.weight for n, m in block.named_modules() if is_projection(m)}
                   for block in model.layers]


def main(argv):
    try:
        cfg, _ = configure(argv, DEFAULTS, __doc__)
    except ConfigError as e:
        fail(e)
    if cfg.model not in PRESETS and not os.path.isdir(cfg.model):
        fail(f"--model={cfg.model}: neither a preset ({', '.join(PRESETS)}) nor a checkpoint "
             "folder")
    try:
        model, layers = (preset_layers if cfg.model in PRESETS else folder_layers)(cfg.model)
    except (OSError, ValueError, KeyError) as e:  # a checkpoint that does not load: one line
        fail(e)
    report(model, layers, cfg.model)


if __name__ == "__main__":
    main(sys.argv[1:])
