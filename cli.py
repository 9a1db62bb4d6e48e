"""
The command line of every script: nanoGPT's configurator.py, typed, plus the one fail(), the one
choice of device, dtype and compilation, and the loading the scripts share:

    python train.py [config.py | config.json ...] [--key=value | --key value | --flag] ...

Each script keeps its settings as plain defaults (globals at its top) and calls `configure`. Config
files come first, in order: Python assignments as in nanoGPT (`learning_rate = 1e-4`) or a JSON
object; then the command line. A value is converted to its default's type: ints, floats, strings,
booleans (true/false, 1/0, yes/no, or a bare --flag), lists (comma-separated, or JSON). An unknown
key, a value of the wrong type, a misspelt boolean or a number that is not finite (nan, inf: no
setting's maths takes one) is a ConfigError whose one line names the key and what was expected;
the scripts print it and exit.

`device_and_dtype` is the one choice of device and dtype for every script, `compile_setting` reads
--compile and `compile_blocks` applies it. `load` is a base model folder (+ an adapter folder) ->
model, tokenizer and the adapter's extra settings (eval.py); `load_for_tool` the same from a
tool's --model and --adapter_dir (chat, export, inspect_adapter), the demo's by default, whose
folders `tool_dirs` finds first;
`template_of` the prompt template the adapter was trained with.
"""
import json
import math
import os
import sys
from types import SimpleNamespace

import torch

from adapter_io import load_adapter, read_adapter_config
from checkpoints import load_model
from data.template import TEMPLATE_NAME, TEMPLATES
from tokenizer import Tokenizer, check_vocab

HERE = os.path.dirname(os.path.abspath(__file__))  # the scripts' folder
BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
# the embedded demo's folder: base/, data/, one folder per adapter (demo.py, eval.py, tools)
DEMO_DIR = "out/demo"
DTYPES = ("", "bfloat16", "float16", "float32")


class ConfigError(ValueError):
    """A setting the user gave is wrong; the message names it and what was expected."""


def reason(e):
    """An exception's message: a KeyError's own words (str() would quote them), else str(e)."""
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


def fail(msg):
    """Stop with one line, `<script>.py: error: <msg>`, and no traceback; msg may be an exception
    (its reason). The script is the one the user ran: the outermost of this folder's files on the
    call stack (train.py, also when run_files.py finds the mistake), else the file whose code
    called fail (data/prepare.py)."""
    frame = sys._getframe(1)
    script = frame.f_globals.get("__file__", "python")
    while frame is not None:
        f = frame.f_globals.get("__file__") or ""
        if os.path.dirname(os.path.abspath(f)) == HERE:
            script = f
        frame = frame.f_back
    msg = reason(msg) if isinstance(msg, BaseException) else msg
    raise SystemExit(f"{os.path.basename(script)}: error: {msg}")


def configure(argv, defaults, doc="", options=None, explain=None):
    """argv -> (settings namespace, options dict); see settle. `--help` prints doc and the settings,
    then exits."""
    if "--help" in argv or "-h" in argv:
        print(doc + "\nsettings: " + " ".join(f"--{k}={v}" for k, v in defaults.items()))
        raise SystemExit(0)
    return settle(read_args(argv, defaults), defaults, options, explain)


def settle(given, defaults, options=None, explain=None):
    """{key: raw value} -> (settings namespace, options dict), each value typed like its default.
    `options(given)` -> {key: default} of the extra keys allowed for these settings (train.py: the
    chosen adapter's options), returned apart. `explain(key, given)` -> a sentence for an unknown
    key, or None."""
    allowed = options(given) if options else {}
    cfg, opts = dict(defaults), {}
    for key, value in given.items():
        if key in defaults:
            cfg[key] = coerce(key, value, defaults[key])
        elif key in allowed:
            opts[key] = coerce(key, value, allowed[key], word_ok=True)
        else:
            raise ConfigError((explain and explain(key, given))
                              or f"unknown setting --{key}; settings: " + ", ".join(defaults)
                              + (f"; options: {', '.join(allowed)}" if allowed else ""))
    return SimpleNamespace(**cfg), opts


def read_args(argv, defaults):
    """Config files, then --key=value / --key value / --flag -> {key: value} (strings from the
    command line)."""
    given, argv = {}, list(argv)
    while argv:
        arg = argv.pop(0)
        if not arg.startswith("--"):
            given.update(read_file(arg))
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            is_bool = isinstance(defaults.get(key), bool)
            if is_bool and (not argv or argv[0].lower() not in BOOLS):
                value = "true"  # a bare --flag sets a bool
            elif not argv or argv[0].startswith("--"):
                raise ConfigError(f"--{key}: expected --{key}=value or --{key} value")
            else:
                value = argv.pop(0)  # --key value, as in `python train.py --adapter parallel`
        given[key] = value
    return given


def read_file(path):
    """A config file: Python assignments (nanoGPT's) or a JSON object -> {key: value}."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file (settings are given as --key=value)")
    try:
        with open(path) as f:
            text = f.read()
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            exec(text, values := {})
            values = {k: v for k, v in values.items()
                      if not k.startswith("_") and type(v).__name__ != "module"}
    except Exception as e:  # a config file is code: whatever it raises is the file's mistake
        raise ConfigError(f"{path}: cannot read the config file ({type(e).__name__}: {e})") \
            from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings")
    return values


def coerce(key, value, default, word_ok=False):
    """A value (a string from the command line, or typed from a config file) -> its default's type.
    A default of None takes JSON or a comma-separated list; word_ok lets a float option take a word
    (--scaling=learned), which the option's own check then judges."""
    want = type(default)
    if isinstance(value, str) and want is not str:
        try:
            if default is None:
                return (json.loads(value) if value[:1] in "[{0123456789-"
                        else [v for v in value.split(",") if v])
            if want is bool:
                return BOOLS[value.lower()]
            number = [v for v in value.split(",") if v] if want is list else want(value)
        except (KeyError, ValueError):
            if word_ok and want is float and value.isalpha():
                return value
            raise ConfigError(f"--{key}={value}: expected "
                              f"{'true or false' if want is bool else want.__name__}, "
                              f"like the default {default!r}") from None
        return check_finite(key, number)
    if want is float and type(value) is int or want is list and type(value) is tuple:
        value = want(value)
    if default is not None and type(value) is not want:
        raise ConfigError(f"{key}={value!r}: expected {want.__name__}, "
                          f"like the default {default!r}")
    return check_finite(key, value)


def check_finite(key, value):
    """nan or inf reaches no setting: each one's maths (a learning rate, a clip, a temperature)
    would turn every number it touches into nan, found steps later or never."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"--{key}={value}: expected a finite number")
    return value


def check_threads(key, n):
    """A thread count (0 = torch's default) is at most this machine's CPU count: far more threads
    than cores only slows torch down, and enough of them crash it."""
    most = os.cpu_count() or 1
    if not 0 <= n <= most:
        raise ConfigError(f"--{key}={n}: expected 0 (torch's default) to {most}, "
                          "this machine's CPU count")


def check_choice(cfg, key, choices):
    if getattr(cfg, key) not in choices:
        raise ConfigError(f"--{key}={getattr(cfg, key)}: expected one of "
                          f"{', '.join(c or repr(c) for c in choices)}")


def device_and_dtype(device="", dtype=""):
    """--device and --dtype -> (torch.device, torch.dtype): cuda if available, else cpu; bfloat16 on
    cuda (float16 where the GPU lacks bf16), float32 elsewhere."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in ("cuda", "cpu", "mps"):
        raise ConfigError(f"--device={device}: expected cuda, cpu or mps")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device={device}, but CUDA is not available here (use --device=cpu)")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype}: expected one of bfloat16, float16, float32")
    if not dtype:
        dtype = ("float32" if not cuda
                 else "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    return torch.device(device), getattr(torch, dtype)


def compile_setting(value, device):
    """--compile: "" = auto, on for CUDA and off elsewhere (inductor compiles slowly on a CPU, for
    a small gain); true/false (yes/no, 1/0) force it. -> bool."""
    if value == "":
        return torch.device(device).type == "cuda"
    if value.lower() not in BOOLS:
        raise ConfigError(f"--compile={value}: expected true or false, or nothing for auto "
                          "(on for CUDA)")
    return BOOLS[value.lower()]


def compile_blocks(model, **options):
    """Regional compilation: torch.compile each Block on its own. The blocks share their code and
    shapes and carry no layer index (each is handed its own LayerCache), so one compiled graph
    serves every layer and compile time does not grow with depth (a whole 7B model did not compile
    in 120 s; by block, 24 s). Returns the model."""
    for block in model.layers:
        block.compile(**options)
    return model


# --------------------------------------------------------------------------------------------------
# the loading the scripts share

def load(model_dir, adapter_dir="", device=None, dtype=None, quantize=""):
    """(model in eval mode, tokenizer, the adapter config's "extra" dict) for a base folder and
    optional adapter folder ("" = none)."""
    model = load_model(model_dir, device=device, dtype=dtype, quantize=quantize)
    tok = Tokenizer.from_pretrained(model_dir)
    check_vocab(tok, model.config.vocab_size, model_dir)
    extra = {}
    if adapter_dir:  # the adapter keeps its own dtype (adapters.py runs adapter maths in fp32)
        model = load_adapter(model, adapter_dir)  # raises for an adapter of another base model
        extra = read_adapter_config(adapter_dir).get("extra") or {}
    return model.eval(), tok, extra


def tool_dirs(cfg, need_adapter=False):
    """A tool's --model and --adapter_dir -> (model_dir, adapter_dir), checked to be folders, before
    anything is loaded. Without --model: the demo's base and its lora. A missing folder is a
    ConfigError of one line (the tool prints it by fail())."""
    model_dir = cfg.model or os.path.join(cfg.demo_dir, "base")
    adapter_dir = cfg.adapter_dir or ("" if cfg.model else os.path.join(cfg.demo_dir, "lora"))
    if need_adapter and not adapter_dir:
        raise ConfigError("--adapter_dir is required with --model: the folder of a trained "
                          "adapter")
    hint = "" if cfg.model else " (run `python train.py` first)"
    for flag, path in (("model", model_dir), ("adapter_dir", adapter_dir)):
        if path and not os.path.isdir(path):
            raise ConfigError(f"--{flag}={path}: no such folder{hint}")
    return model_dir, adapter_dir


def load_for_tool(cfg, device="cpu", dtype=None, need_adapter=False):
    """A tool's --model and --adapter_dir (tool_dirs) -> (model, tok, extra, model_dir,
    adapter_dir), by load. A checkpoint that does not load is a ConfigError of one line."""
    model_dir, adapter_dir = tool_dirs(cfg, need_adapter)
    try:
        return (*load(model_dir, adapter_dir, device, dtype), model_dir, adapter_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(reason(e)) from None


def template_of(extra, adapter_dir="", given=""):
    """The prompt template (data/template.py): --template as `given`, else the one named in an
    adapter's extra settings, Alpaca when none is. A name not known here, or a --template other
    than the one the adapter was trained with, is a ConfigError naming it."""
    recorded = extra.get("template") if adapter_dir else None
    if given and recorded and given != recorded:
        raise ConfigError(f"--template={given}, but {adapter_dir} was trained with the {recorded} "
                          "template (leave --template out to use it)")
    name = given or recorded or TEMPLATE_NAME
    if name not in TEMPLATES:
        where = (f"--template={name}:" if given
                 else f"{adapter_dir}: unknown prompt template {name!r};")
        raise ConfigError(f"{where} known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
