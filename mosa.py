"""
MoSA's sparse split & merge for the bottleneck adapters (series, parallel; their option sparse=N):

  Split          one weight split into N disjoint random parts, each its own parameter
  sparse_step    the part of every Split that trains at an optimizer step (train.py, each step)
  join_sparse    after training: each Split back into one plain weight (the kinds' finish)

What MoSA calls merging is join_sparse here: "merge" means only the fold of an adapter into its
base weight (adapters.merge). adapters.py builds a Bottleneck's down and up as Splits when
sparse > 0; this file knows nothing else of the adapters.
"""
import torch
import torch.nn as nn


class Split(nn.Module):
    """One weight split into n disjoint random parts, each its own parameter, so an optimizer step
    on one part cannot move the others. While training, only the `active` part runs, scaled by n
    so the expected weight is the full one (as inverted dropout); in eval all parts together are
    the weight."""

    def __init__(self, w, n):
        super().__init__()
        self.n, self.active = n, None
        self.register_buffer("part", (torch.randperm(w.numel()) % n).view(w.shape).to(torch.uint8))
        self.parts = nn.ParameterList(nn.Parameter(w[self.part == k].clone()) for k in range(n))

    def adapter_params(self):  # the partition too: it says which entry each part holds
        return ["part", *(f"parts.{k}" for k in range(self.n))]

    @property
    def weight(self):
        w = torch.zeros(self.part.shape, dtype=self.parts[0].dtype, device=self.part.device)
        if self.training and self.active is not None:
            return w.masked_scatter(self.part == self.active, self.parts[self.active] * self.n)
        for k in range(self.n):
            w = w.masked_scatter(self.part == k, self.parts[k])
        return w

    def joined(self):
        """The plain nn.Linear (no bias) whose weight all parts together make up."""
        w = self.eval().weight.detach()
        linear = nn.Linear(w.size(1), w.size(0), bias=False, device=w.device)
        linear.weight = nn.Parameter(w, requires_grad=self.parts[0].requires_grad)
        return linear


def sparse_step(model, step):
    """Pick the part of every Split that trains at this optimizer step: random, but a function of
    the step so a resumed run picks the same. Parts that did not run get no gradient (None), so the
    optimizer must zero grads with set_to_none=True (PyTorch's default) for AdamW to leave them
    untouched."""
    splits = [m for m in model.modules() if isinstance(m, Split)]
    if splits:
        k = int(torch.randint(splits[0].n, (), generator=torch.Generator().manual_seed(step)))
        for m in splits:
            m.active = k % m.n


def join_sparse(model):
    """Replace each Split by the one plain nn.Linear its parts make up, and record sparse=0 in the
    options of the adapters that had it (what MoSA calls merging)."""
    for owner in list(model.modules()):
        for attr, child in list(owner.named_children()):
            if isinstance(child, Split):
                setattr(owner, attr, child.joined())
    for cfg in model.adapter_configs.values():
        if cfg["options"].get("sparse"):
            cfg["options"] = {**cfg["options"], "sparse": 0}
