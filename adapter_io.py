"""
Adapter folders, ours and Hugging Face PEFT's, both ways:

    save_adapter(model, path, name)      adapter_model.safetensors + adapter_config.json; with
                                         format="peft" a LoRA, DoRA or IA3 folder PEFT loads
    load_adapter(model, path)            ours, or a PEFT LoRA, DoRA, IA3 or adaption-prompt folder;
                                         strict, and a failed load leaves the model as it was
    read_adapter_config(path)            the one place an adapter_config.json is read and checked
    fill_adapter(model, name, state)     tensors into an attached adapter: same keys, same shapes

Our keys are adapters.adapter_state's: the tensors each adapter module names (adapter_params) under
its place in the model, without the adapter's name. PEFT's are base_model.model.<official module>.
<the same tensor name>: LoRA, DoRA and IA3 name their tensors as PEFT does, so no table renames
them. Imports adapters and checkpoints; neither imports this file.
"""
import json
import math
import re
from pathlib import Path

import torch

from adapters import (KINDS, add_adapter, adapter_names, adapter_state, adapter_tensors,
                      default_targets, ia3_targets, remove_adapter)
from checkpoints import hf_name
from files import read_json, read_state_dict, unreadable, write_atomic
from model import Linear
from slots import no_lm_head, slots


def _base_identity(c):
    keys = ("arch", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
            "intermediate_size")
    return {k: getattr(c, k) for k in keys}


# ------------------------------------------------------------------------------------------- save
def save_adapter(model, path, name="default", base_model=None, extra=None, format="native"):
    """Write adapter `name`: adapter_model.safetensors + adapter_config.json. format="peft" writes a
    LoRA, DoRA or IA3 folder that Hugging Face PEFT loads (keys base_model.model.<official module>.
    lora_A.weight, .lora_magnitude_vector, .ia3_l)."""
    from safetensors.torch import save
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; attached: {adapter_names(model)}")
    kind, options = model.adapter_configs[name]["kind"], model.adapter_configs[name]["options"]
    if format == "peft":
        if kind not in PEFT_CONFIGS:
            raise ValueError(f"format='peft': a {kind} adapter ({name!r}) has no PEFT folder; "
                             f"PEFT folders are written for {', '.join(PEFT_CONFIGS)} adapters")
        state = peft_state(model, name)
        config = {"task_type": "CAUSAL_LM", "inference_mode": True,
                  "base_model_name_or_path": base_model,
                  **PEFT_CONFIGS[kind](model.config, kind, options)}
    elif format == "native":
        state = adapter_state(model, name)
        config = {"kind": kind, "name": name, "options": options, "base_model": base_model,
                  "base": _base_identity(model.config), "extra": extra or {}}
    else:
        raise ValueError(f"format={format!r}: expected 'native' or 'peft'")
    path = Path(path)
    state = {k: t.contiguous() for k, t in state.items()}
    write_atomic(path / "adapter_model.safetensors", save(state))
    write_atomic(path / "adapter_config.json", json.dumps(config, indent=2))


def peft_state(model, name, keep_vars=False):
    """Adapter `name`'s tensors under PEFT's keys, base_model.model.<official module>.<tensor>: for
    the kinds that sit on projections (PEFT_CONFIGS)."""
    out = {}
    for mname, _, s in slots(model):
        if name in s:
            module = hf_name(model.config, mname + ".weight").removesuffix(".weight")
            for k, t in adapter_tensors(s[name], keep_vars).items():
                out[f"base_model.model.{module}.{k}"] = t
    return out


def _peft_lora(c, kind, o):  # DoRA is PEFT's LoRA with use_dora
    return {"peft_type": "LORA", "r": o["r"], "lora_alpha": o["alpha"],
            "lora_dropout": o["dropout"], "bias": "none",
            "target_modules": o["target_modules"] or default_targets(c),
            "fan_in_fan_out": False, "use_dora": kind == "dora"}


def _peft_ia3(c, kind, o):
    targets, feedforward = ia3_targets(c, o)
    return {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward,
            "fan_in_fan_out": False}


# kind -> (model config, kind, options) -> PEFT's adapter_config.json fields
PEFT_CONFIGS = {"lora": _peft_lora, "dora": _peft_lora, "ia3": _peft_ia3}


# ------------------------------------------------------------------------------------------- load
PEFT_FIELDS = {"LORA": ("r", "lora_alpha"), "IA3": ("target_modules",),  # what _from_peft reads
               "ADAPTION_PROMPT": ("adapter_len", "adapter_layers")}  # (other types: refused there)


# what a value must be, and the types of PEFT's fields that _from_peft reads (null: left out)
INT, NUMBER, BOOL, STRING = "an integer", "a number", "true or false", "a string"
NAMES, NAMES_OR_NULL, LIST = "a list of module names", "a list of module names or null", "a list"
PEFT_TYPES = {"peft_type": STRING, "r": INT, "lora_alpha": NUMBER, "lora_dropout": NUMBER,
              "use_rslora": BOOL, "use_dora": BOOL, "fan_in_fan_out": BOOL, "bias": STRING,
              "target_modules": NAMES, "feedforward_modules": NAMES, "adapter_len": INT,
              "adapter_layers": INT}
# options of ours that take any number although their default is an integer; that take a word
ANY_NUMBER, WORDS = {"alpha"}, {"scaling": ("learned",)}


def is_a(v, what):
    """Whether JSON value v is `what` (one of the descriptions above)."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    names = isinstance(v, list) and all(isinstance(n, str) for n in v)
    return {INT: number and isinstance(v, int), NUMBER: number, BOOL: isinstance(v, bool),
            STRING: isinstance(v, str), NAMES: names or isinstance(v, str),  # PEFT: a regex
            NAMES_OR_NULL: names or v is None, LIST: isinstance(v, list)}[what]


def option_type(k, default):
    """What option k's value must be, from its default in KINDS (None: not checked here)."""
    if default is None:
        return NAMES_OR_NULL
    if isinstance(default, bool):
        return BOOL
    if isinstance(default, (int, float)):
        return INT if isinstance(default, int) and k not in ANY_NUMBER else NUMBER
    return STRING if isinstance(default, str) else LIST if isinstance(default, (list, tuple)) \
        else None


def check_options(kind, options):
    """Each option of an adapter `kind` typed like its default in KINDS: ValueError naming the
    option otherwise (an unknown option is add_adapter's to name). The kind's own check then judges
    the values."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not an adapter kind ({', '.join(KINDS)})")
    defaults = KINDS[kind].defaults
    for k, v in options.items():
        what, words = option_type(k, defaults.get(k)), WORDS.get(k, ())
        if k in defaults and what and not is_a(v, what) and v not in words:
            raise ValueError(f"{k}={v!r}: expected {what}" + "".join(f" or {w!r}" for w in words))


def read_adapter_config(path):
    """adapter_config.json: ours (kind, options) or PEFT's (peft_type); one clear line naming the
    file otherwise. Every check of an adapter config belongs here: its shape, and the type of every
    option (ours) or field (PEFT's) that reaches the maths."""
    f = Path(path) / "adapter_config.json"
    config = read_json(f)
    peft_type = config.get("peft_type")
    need = PEFT_FIELDS.get(peft_type, ()) if peft_type else ("kind", "options")
    missing = [k for k in need if k not in config]
    if missing:
        raise ValueError(f"{f}: missing field(s) {', '.join(missing)} (written by "
                         "adapter_io.save_adapter or PEFT?)")
    if "options" in config and not isinstance(config["options"], dict):
        what = type(config["options"]).__name__
        raise ValueError(f"{f}: 'options' is a {what}, expected a JSON object")
    if peft_type is not None:
        for k, what in PEFT_TYPES.items():
            if config.get(k) is not None and not is_a(config[k], what):
                raise ValueError(f"{f}: field {k!r} is {config[k]!r}, expected {what}")
        return config
    try:
        check_options(config["kind"], config["options"])
    except ValueError as e:
        raise ValueError(f"{f}: {e}") from None
    return config


def load_adapter(model, path, name=None):
    """Attach and fill the adapter saved in `path` (ours, or a Hugging Face PEFT LoRA, DoRA, IA3 or
    adaption-prompt folder); strict. On any error the model is left as it was (no adapter,
    requires_grad unchanged)."""
    path = Path(path)
    config = read_adapter_config(path)
    if "peft_type" in config:
        kind, options, state = _from_peft(model, path, config)
    else:
        base = _base_identity(model.config)
        diff = {k: (v, base.get(k)) for k, v in config.get("base", {}).items() if base.get(k) != v}
        if diff:
            raise ValueError(f"{path}: adapter was trained on another base model "
                             f"(saved, this model): {diff}")
        kind, options, state = config["kind"], config["options"], _read_tensors(path)
    name = name or config.get("name", "default")
    trainable = {p: p.requires_grad for p in model.parameters()}  # add_adapter freezes the base
    add_adapter(model, kind, name=name, **options)
    try:
        fill_adapter(model, name, state, path)
    except (KeyError, ValueError):
        remove_adapter(model, name)  # leave the model as it was
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        raise
    return model


def fill_adapter(model, name, state, source):
    """Copy `state` (keyed as adapter_state) into adapter `name`, strictly: the same keys, the same
    shapes."""
    expected = adapter_state(model, name)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{source}: adapter tensors do not match: missing {missing[:6]}, "
                       f"unexpected {unexpected[:6]}")
    for k, t in state.items():
        # floats may be cast (bf16 -> fp32); an int where a float belongs is an error
        want, floats = expected[k].dtype, isinstance(t, torch.Tensor) and t.is_floating_point()
        cast_ok = floats and want.is_floating_point
        if not isinstance(t, torch.Tensor) or t.dtype != want and not cast_ok:
            what = getattr(t, "dtype", type(t).__name__)
            raise ValueError(f"{source}: {k} is {what}, this model expects {want}")
        if t.shape != expected[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(t.shape)}, "
                             f"this model expects {tuple(expected[k].shape)}")
        expected[k].copy_(t)  # adapter_state's tensors share storage with the parameters


def _read_tensors(path):
    """adapter_model.safetensors, else adapter_model.bin (loaded without running pickled code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    f = path / "adapter_model.safetensors"
    if f.exists():
        try:
            return load_file(f)
        except SafetensorError as e:
            raise unreadable(f, e, "safetensors file") from None
    if (path / "adapter_model.bin").exists():
        return read_state_dict(path / "adapter_model.bin")
    raise FileNotFoundError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


# ------------------------------------------------------------------------------ PEFT folders in
def _from_peft(model, path, config):
    """A PEFT LoRA (DoRA: use_dora), IA3 or adaption-prompt folder -> (kind, options, our state)."""
    if config["peft_type"] == "ADAPTION_PROMPT":
        return _from_peft_adaption_prompt(model, path, config)
    if config["peft_type"] == "IA3":
        return _from_peft_ia3(model, path, config)
    unsupported = {k: config[k] for k in ("rank_pattern", "alpha_pattern", "modules_to_save",
                                          "layers_to_transform", "fan_in_fan_out") if config.get(k)}
    if config["peft_type"] != "LORA" or config.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{path}: only plain PEFT LoRA (bias='none') or DoRA, IA3 and "
                         f"ADAPTION_PROMPT are supported; got peft_type={config['peft_type']}, "
                         f"bias={config.get('bias')}, {unsupported}")
    tensors, targets = _peft_tensors(model, path, config, "lora_")
    r = config["r"]
    # rsLoRA scales alpha/sqrt(r)
    alpha = config["lora_alpha"] * (math.sqrt(r) if config.get("use_rslora") else 1)
    kind = "dora" if config.get("use_dora") else "lora"
    options = dict(r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0),
                   target_modules=sorted(targets))
    return kind, options, _at_places(model, kind, options, tensors)


def _at_places(model, kind, options, tensors):
    """{(module name, tensor name): t} -> our state, keyed through the kind's own places (module
    name -> slot), as adapter_state keys it."""
    slot = dict(KINDS[kind].places(model, options))
    return {f"{module}.{slot[module]}.{k}": t for (module, k), t in tensors.items()}


def _peft_tensors(model, path, config, marker):
    """A PEFT folder's tensors -> ({(our module name, tensor name): t}, the targeted linear names),
    which must be the config's target_modules. Keys are base_model.model.<official module>.
    <marker>...; marker: "lora_" (A, B, DoRA's m) or "ia3_l"."""
    ours = {hf_name(model.config, n + ".weight").removesuffix(".weight"): n
            for n, m in model.named_modules() if isinstance(m, Linear)}
    tensors, targets = {}, set()
    for k, t in _read_tensors(path).items():
        module, _, rest = k.removeprefix("base_model.model.").rpartition("." + marker)
        rest = marker + rest.replace(".default.", ".")  # keys may carry the adapter name
        if k.removeprefix("base_model.model.").startswith("lm_head."):
            raise no_lm_head(model.config, path)
        if module not in ours:
            raise KeyError(f"{path}: tensor {k} names no projection of this {model.config.arch} "
                           "model")
        tensors[ours[module], rest] = t
        targets.add(module.rsplit(".", 1)[-1])
    named = config.get("target_modules")
    named = [named] if isinstance(named, str) else named
    named = sorted({n.rsplit(".", 1)[-1] for n in named or []})  # PEFT may write "mlp.fc2"
    if named and named != sorted(targets):  # the config and the tensors must agree
        raise ValueError(f"{path}: adapter_config.json's target_modules {named} "
                         f"disagree with the modules its tensors adapt {sorted(targets)}")
    return tensors, targets


def _from_peft_ia3(model, path, config):
    """PEFT's (IA)^3: per target an ia3_l, (d_out, 1), or (1, d_in) on feedforward_modules (a list
    of names, maybe with a parent: "mlp.dense_4h_to_h")."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str) or config.get("fan_in_fan_out") or config.get("modules_to_save"):
        raise ValueError(f"{path}: only PEFT IA3 with a list of feedforward_modules is supported; "
                         f"got feedforward_modules={ff!r}, "
                         f"fan_in_fan_out={config.get('fan_in_fan_out')}, "
                         f"modules_to_save={config.get('modules_to_save')}")
    tensors, targets = _peft_tensors(model, path, config, "ia3_l")
    ff = sorted({f.rsplit(".", 1)[-1] for f in ff})
    options = dict(target_modules=sorted(targets), feedforward_modules=ff)
    return "ia3", options, _at_places(model, "ia3", options, tensors)


def _from_peft_adaption_prompt(model, path, config):
    """PEFT's LLaMA-Adapter (per layer: adaption_prompt (1, P, C) and adaption_gate (1,)) -> our
    gated prefix, on the same top adapter_layers layers."""
    options = dict(num_virtual_tokens=config["adapter_len"], gated=True,
                   layers=config["adapter_layers"])
    place = {int(re.search(r"layers\.(\d+)\.", m)[1]): m
             for m, _ in KINDS["prefix"].places(model, options)}
    tensors = {}
    for k, t in _read_tensors(path).items():
        m = re.search(r"layers\.(\d+)\.[^.]+\.adaption_(prompt|gate)$", k)
        if m is None or int(m[1]) not in place:
            raise KeyError(f"{path}: {k} is not the adaption prompt or gate of one of the top "
                           f"{options['layers']} decoder layers")
        prompt = m[2] == "prompt"
        tensors[place[int(m[1])], "embedding" if prompt else "gate"] = t[0] if prompt else t
    return "prefix", options, _at_places(model, "prefix", options, tensors)
