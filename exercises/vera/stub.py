"""Exercise 2: VeRA, an adapter kind adapters.py does not ship (Kopiczko et al. 2024, arXiv
2310.11454).

LoRA trains A (r, d_in) and B (d_out, r) on every linear. VeRA trains neither: ONE pair of random
matrices, frozen and shared by every adapted linear of the model, is scaled by two small trainable
vectors per linear:

    y + b * (B[:d_out] @ (d * (A[:, :d_in] @ x)))    d (r,) starts at d_initial, b (d_out,) at 0

A and B are sized for the largest adapted linear (d_in_max, d_out_max); a smaller linear uses their
top-left block. So a linear costs r + d_out trainable numbers instead of LoRA's r * (d_in + d_out).

Fill in the TODOs, then `register()` makes `adapters.add_adapter(model, "vera", r=16)` work, and
merge, unmerge and adapter_io's save_adapter and load_adapter with it. Read exercises/README.md
(exercise 2), then run the grader:

    python -m pytest exercises/vera
"""
import math  # noqa: F401 (you may need it)

import torch
import torch.nn as nn
import torch.nn.functional as F  # noqa: F401

import adapters
from adapters import Kind
from slots import find_linears  # noqa: F401 (you may need it)


def projections(seed, r, d_in, d_out):
    """The shared frozen A (r, d_in) and B (d_out, r), drawn as PEFT's VeRA draws them, so that the
    same seed (VeraConfig.projection_prng_key) gives the same matrices: one torch.Generator seeded
    with `seed`, A first, then B, each uniform in [-bound, bound] with bound = sqrt(6 / fan_in)
    (Kaiming uniform for a ReLU gain; fan_in is a matrix's number of columns). Return the same
    tensors for the same arguments (functools.lru_cache), so every layer and every model shares one
    copy."""
    raise NotImplementedError("projections")  # TODO


class VeRA(nn.Module):
    """The Linear.adapter hook: (x, y, linear) -> y + b * B_s (d * A_s x). A, B: the shared
    projections."""

    def __init__(self, A, B, d_in, d_out, d_initial):
        super().__init__()
        # TODO: keep A and B as buffers that are NOT saved with the adapter (register_buffer(...,
        # persistent=False): they are a function of the seed, and shared), the trainable vectors as
        # parameters named vera_lambda_d (r,), starting at d_initial, and vera_lambda_b (d_out,),
        # starting at zero (PEFT's names); d_in, d_out say which block of A and B this linear uses.
        self.merged = False
        raise NotImplementedError("VeRA.__init__")

    def delta(self):
        """The update to the base weight (d_out, d_in), as merge folds it in."""
        raise NotImplementedError("VeRA.delta")  # TODO

    def forward(self, x, y, linear):
        raise NotImplementedError("VeRA.forward")  # TODO (nothing to add once merged)

    @torch.no_grad()
    def merge(self, linear):
        raise NotImplementedError("VeRA.merge")  # TODO

    @torch.no_grad()
    def unmerge(self, linear):
        raise NotImplementedError("VeRA.unmerge")  # TODO


def places(model, o):
    """[(module name, "adapter")] for every Linear named in o["target_modules"] (None:
    adapters.default_targets)."""
    raise NotImplementedError("places")  # TODO: find_linears finds them by name


def make(model, owner, slot, o):
    """The VeRA module for one Linear (`owner`): A and B sized for the largest linear among ALL the
    targets."""
    raise NotImplementedError("make")  # TODO


KIND = Kind(defaults=dict(r=256, d_initial=0.1, projection_prng_key=0, target_modules=None),
            places=places, make=make)


def register():
    """Add "vera" to the project's table of kinds, at runtime (adapters.py itself is not changed).
    The table lives in this Python process only: `python train.py --adapter=vera` starts a new
    process, which never calls register(), and answers "unknown adapter 'vera'". In a process that
    called register(), train.main(["--adapter=vera", "--r=16", ...]) trains it, options and all."""
    adapters.KINDS["vera"] = KIND

