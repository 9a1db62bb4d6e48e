"""Helpers shared by the graders: which implementation to grade (EXERCISE_IMPL, see
exercises/conftest.py) and tiny random models to grade it on."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def load_impl(exercise):
    """The module to grade for `exercise`, chosen by EXERCISE_IMPL (see exercises/conftest.py)."""
    choice = os.environ.get("EXERCISE_IMPL", "stub")
    if choice == "stub":
        path = HERE / exercise / "stub.py"
    elif choice == "solution":
        path = HERE / "solutions" / f"{exercise}.py"
        if not path.exists():
            pytest.skip(f"{path} is not here (withheld by the instructor)")
    else:
        path = Path(choice) / f"{exercise}.py"
    if not path.exists():
        raise FileNotFoundError(f"EXERCISE_IMPL={choice!r}: no {path}")
    name = f"graded_{exercise}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def randomize(model, seed=0, std=0.1):
    """Every weight random (norm scales around 1), so that no weight is a no-op and a bug shows in
    the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.2 * noise if p.dim() == 1 and name.endswith("weight") else std * noise)
    return model.eval()


def tiny(name="tiny-llama", seed=0, **overrides):
    """A randomised fp32 model of a tiny preset (2 layers, n_embd 64), in eval mode."""
    from model import Config, Transformer
    torch.manual_seed(seed)
    return randomize(Transformer(Config.from_name(name, **overrides)), seed)


def token_ids(model, B=2, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


def fit(model, steps, lr, seed=0):
    """`steps` AdamW steps (no weight decay) on one batch of random tokens, in train mode, on the
    trainable parameters only. Returns the loss before each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "no trainable parameter"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids = token_ids(model, B=4, T=16, seed=seed)
    model.train()
    losses = []
    for _ in range(steps):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
