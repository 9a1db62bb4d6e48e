"""slots.py: the hook slots adapters sit in. slots() finds every filled slot by its type, whatever
attribute it sits under. What each Slot type computes with several adapters (composition, the
gated prefix refused beside others, detach) is tested through adapters.py in
tests/test_adapters.py."""
import torch.nn as nn

import adapters as A
from conftest import tiny_model
from slots import PostSlot, slots


def test_slots_are_found_by_type_not_by_name():
    """slots() walks the model for Slot modules, so a hook slot under any attribute is found (no
    file lists the slot names)."""
    model = A.add_adapter(tiny_model("llama"), "series", bottleneck=4)
    model.layers[0].extra_slot = PostSlot()  # under a name model.py does not have
    model.layers[0].extra_slot["x"] = nn.Identity()
    found = {(m, a) for m, a, _ in slots(model)}
    assert ("layers.0", "extra_slot") in found and ("layers.1", "post_mlp") in found
    assert len(found) == model.config.n_layer + 1
