"""Reference solution of exercise 3 (placement). Not in the students' copy: exercises/handout.py
leaves this folder out."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, to run this
import adapters  # noqa: E402
from model import Transformer  # noqa: E402
from presets import Config  # noqa: E402

PLACEMENTS = ("attn", "mlp", "both", "mlp_top")
BOTTLENECK, LR = 8, 3e-2


def task(seed=0):
    torch.manual_seed(seed)
    base = Transformer(Config.from_name("tiny-llama")).eval()
    start = torch.randint(0, 64, (8, 1), generator=torch.Generator().manual_seed(seed))
    seq = (start + torch.arange(17)) % 64
    return base, seq[:, :-1], seq[:, 1:]


def places(model, placement):
    n = model.config.n_layer
    subs = {"attn": ["post_attn"], "mlp": ["post_mlp"], "both": ["post_attn", "post_mlp"],
            "mlp_top": ["post_mlp"]}[placement]
    first = n - n // 2 if placement == "mlp_top" else 0
    return [(f"layers.{i}", s) for i in range(first, n) for s in subs]


def measure(placement, steps=40, seed=0):
    model, x, y = task(seed)
    kind = adapters.KINDS["series"]._replace(places=lambda m, o: places(m, placement), check=None)
    adapters.KINDS["series_at"] = kind
    try:
        torch.manual_seed(seed)
        adapters.add_adapter(model, "series_at", bottleneck=BOTTLENECK)
    finally:
        del adapters.KINDS["series_at"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    model.train()
    with torch.no_grad():
        loss_before = model(x, y)[1].item()
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss_after = model(x, y)[1].item()
    return dict(placement=placement, places=places(model, placement),
                trainable=sum(p.numel() for p in trainable), loss_before=loss_before,
                loss_after=loss_after)


def compare(steps=40, seed=0):
    return [measure(p, steps, seed) for p in PLACEMENTS]


if __name__ == "__main__":
    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    print(f"{'placement':10} {'trainable':>9} {'loss before':>11} {'loss after':>10}")
    for r in compare():
        print(f"{r['placement']:10} {r['trainable']:9,} {r['loss_before']:11.4f}",
              f"{r['loss_after']:10.4f}")
