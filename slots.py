"""
The hook slots of model.py as adapters.py fills them. A slot is a plain attribute, None until an
adapter is attached; then it holds a Slot: the adapters sharing that hook, by name, of which only
the `active` ones run, in the order they were added. How several combine depends on the hook:

  LinearSlot   Linear.adapter                     (x, y, linear) -> y, each handed the last y
  PostSlot     Block.post_attn / post_mlp         y -> y, one after another
  BesideSlot   Block.beside_attn / beside_mlp     h -> the sum of what each adds
  PrefixSlot   Attention.prefix                   (x, qkv) -> (k, v, gate): prefixes side by side
  PromptSlot   Transformer.prompt                 (B, T, C) -> (B, n_tokens + T, C)

attach puts an adapter module in a slot, slots(model) finds every filled one (by type, so no file
lists the slot names but model.py and SLOT_TYPES), and find_linears turns projection names into
the Linears whose `adapter` slot a kind fills.
"""
import torch
import torch.nn as nn

from model import Linear


class Slot(nn.ModuleDict):
    """The adapters sharing one hook slot, by name; only the names in `active` run, in the order
    they were added."""

    def __init__(self):
        super().__init__()
        self.active = set()

    def running(self):
        return [m for name, m in self.items() if name in self.active]


class LinearSlot(Slot):  # Linear.adapter: (x, y, linear) -> y
    def forward(self, x, y, linear):
        for m in self.running():
            y = m(x, y, linear)
        return y


class PostSlot(Slot):  # Block.post_attn / post_mlp: y -> y
    def forward(self, y):
        for m in self.running():
            y = m(y)
        return y


class BesideSlot(Slot):  # Block.beside_attn / beside_mlp: h -> what to add
    def forward(self, h):
        return sum(m(h) for m in self.running())


class PrefixSlot(Slot):  # Attention.prefix: (x, qkv) -> (k, v, gate), or None when nothing runs
    def forward(self, x, qkv):
        kvs = [m(x, qkv) for m in self.running()]
        if any(gate is not None for _, _, gate in kvs):
            if len(kvs) > 1:
                names = ", ".join(n for n in self if n in self.active)
                raise ValueError(f"a gated prefix cannot run beside other prefixes ({names}); "
                                 "pick one with set_active")
            return kvs[0]
        return ((torch.cat([k for k, _, _ in kvs], 2), torch.cat([v for _, v, _ in kvs], 2), None)
                if kvs else None)


class PromptSlot(Slot):  # Transformer.prompt: (B, T, C) -> (B, n_tokens + T, C)
    @property
    def n_tokens(self):
        return sum(m.n_tokens for m in self.running())

    def forward(self, x):
        for m in reversed(self.running()):  # the first added ends up first
            x = m(x)
        return x


SLOT_TYPES = {"adapter": LinearSlot, "post_attn": PostSlot, "post_mlp": PostSlot,
              "beside_attn": BesideSlot, "beside_mlp": BesideSlot, "prefix": PrefixSlot,
              "prompt": PromptSlot}


def attach(owner, slot, name, module):
    """Put `module` in owner.<slot> under `name`, active; an empty slot first gets its Slot."""
    if getattr(owner, slot) is None:
        # new modules follow the model's mode
        setattr(owner, slot, SLOT_TYPES[slot]().train(owner.training))
    s = getattr(owner, slot)
    s[name] = module
    s.active.add(name)


def detach(model, name):
    """Take adapter `name` out of every slot; a slot left empty goes back to None."""
    for mname, attr, s in list(slots(model)):
        if name in s:
            del s[name]
            s.active.discard(name)
            if not len(s):
                setattr(model.get_submodule(mname), attr, None)


def slots(model):
    """(module name, slot attribute, Slot) for every filled hook slot of the model."""
    for path, s in model.named_modules():
        if isinstance(s, Slot):
            mname, _, attr = path.rpartition(".")
            yield mname, attr, s


def no_lm_head(config, source):
    """The one refusal of an adapter on lm_head. Tied (Llama 3.2 1B/3B, Qwen2.5 <= 3B, BLOOM, OPT)
    it is the input embedding matrix too, so a LoRA merged into it would change the embeddings as
    well, and untying it would change the model (torchtune refuses it for this reason)."""
    why = ("it is tied to the input embeddings (tie_embeddings), so a LoRA merged there would "
           "change them too; untying it would change the model" if config.tie_embeddings
           else "only the projections inside the blocks have adapter slots")
    return ValueError(f"{source}: lm_head takes no adapter: {why}")


def find_linears(model, names, option):
    """{module name: Linear} of the projections called `names`; an unknown name is an error naming
    `option` and listing the known."""
    if "lm_head" in names:
        raise no_lm_head(model.config, option)
    found = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    known = sorted({n.rsplit(".", 1)[-1] for n in found})
    unknown = [t for t in names if t not in known]
    if unknown:
        raise ValueError(f"{option}: unknown linear name(s) {unknown} for {model.config.arch}; "
                         f"known: {known}")
    return {n: m for n, m in found.items() if n.rsplit(".", 1)[-1] in names}
