"""Exercise 1: LoRA (Hu et al. 2021, arXiv 2106.09685). Fill in the three places marked TODO.

A LoRA adapter sits in the `Linear.adapter` hook of model.py: the layer computes y = W x + b and
hands (x, y, linear) to the adapter, which returns y + (alpha / r) * B A x. Only A (r, d_in) and B
(d_out, r) train. Read exercises/README.md (exercise 1) for what the grader checks, then run it:

    python -m pytest exercises/lora
"""
import math

import torch
import torch.nn as nn


class LoRA(nn.Module):
    def __init__(self, d_in, d_out, r, alpha, dropout=0.0):
        super().__init__()
        # PEFT's names, so weights compare with adapters.LoRA's and PEFT's:
        # lora_A.weight is (r, d_in), lora_B.weight is (d_out, r).
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        self.scale, self.dropout, self.merged = alpha / r, nn.Dropout(dropout), False
        # TODO: initialise A and B so that (1) a fresh adapter changes nothing and (2) training can
        # move both. (Which one must be zero? What happens to the gradients if both are?) Hint:
        # nn.init.kaiming_uniform_ with a=math.sqrt(5) is what nn.Linear and PEFT use.
        raise NotImplementedError("LoRA.__init__: initialise lora_A and lora_B")

    def delta(self):
        """The update to the base weight, (d_out, d_in): what merge folds into W."""
        return self.lora_B.weight @ self.lora_A.weight * self.scale

    def forward(self, x, y, linear):
        # TODO: return y plus the low-rank update of x (dropout on the adapter's input only). Once
        # merged, the update is already inside linear.weight: do not add it twice.
        raise NotImplementedError("LoRA.forward")

    @torch.no_grad()
    def merge(self, linear):
        # TODO: fold the update into linear.weight (in its dtype); unmerge undoes it.
        raise NotImplementedError("LoRA.merge")

    @torch.no_grad()
    def unmerge(self, linear):
        raise NotImplementedError("LoRA.unmerge")
