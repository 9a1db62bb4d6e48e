"""Exercise 3: move a series adapter to another placement, and measure what it buys.

A series adapter y -> y + up(tanh(down(y))) sits on a block's `post_attn` or `post_mlp` slot
(model.py, Block). LLM-Adapters found after the MLP best (Pfeiffer); Houlsby put one after both
sublayers. Here you write where the adapters go for four placements, and a small experiment that
trains each on the same task from the same seed:

    "attn"     post_attn of every block
    "mlp"      post_mlp of every block
    "both"     post_attn and post_mlp of every block (per block: attn first)
    "mlp_top"  post_mlp of the top half of the blocks only (the last n_layer // 2)

Read exercises/README.md (exercise 3) for the exact protocol, then run the grader and your
experiment:

    python -m pytest exercises/placement
    python exercises/placement/stub.py
"""
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
    """Given: a random tiny-llama base (seeded) and one batch of counting sequences: each row starts
    at a random token and counts up by one (mod 64); the model must learn "next = previous + 1".
    Returns (base, x, y)."""
    torch.manual_seed(seed)
    base = Transformer(Config.from_name("tiny-llama")).eval()
    start = torch.randint(0, 64, (8, 1), generator=torch.Generator().manual_seed(seed))
    seq = (start + torch.arange(17)) % 64
    return base, seq[:, :-1], seq[:, 1:]


def places(model, placement):
    """[(module name, slot attribute)] for `placement`, blocks in order, e.g. ("layers.0",
    "post_attn")."""
    raise NotImplementedError("places")  # TODO


def measure(placement, steps=40, seed=0):
    """Train a series adapter at `placement` on task(seed) and return a dict with keys
    placement, places (your places()), trainable (number of trainable parameters), loss_before (the
    loss before any step), loss_after (after `steps` AdamW steps). The protocol is in
    exercises/README.md."""
    raise NotImplementedError("measure")  # TODO


def compare(steps=40, seed=0):
    """measure() every placement; returns the list of dicts, in PLACEMENTS order."""
    return [measure(p, steps, seed) for p in PLACEMENTS]


if __name__ == "__main__":
    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    print(f"{'placement':10} {'trainable':>9} {'loss before':>11} {'loss after':>10}")
    for r in compare():
        print(f"{r['placement']:10} {r['trainable']:9,} {r['loss_before']:11.4f}",
              f"{r['loss_after']:10.4f}")
