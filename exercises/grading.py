"""Helpers shared by the graders: which implementation to grade (EXERCISE_IMPL, see
exercises/conftest.py), the rules every graded file must keep (exercises/README.md, "Rules"), and
tiny random models to grade it on.

The rules are checked when the file is loaded, before any test runs, so a file that breaks one
fails every test of its exercise with one message saying which rule and where:

- its own work: no import of what holds the answer (FORBIDDEN, per exercise; the reference
  solutions and the graders, always), no class built on it, and the names the exercise asks for
  (OWN) written in the file itself, not imported or inherited;
- the stub's interface: the same names and signatures, and the same given values (constants such
  as placement's LR, VeRA's KIND.defaults), since the graders read them.
"""
import ast
import functools
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXERCISES = ("lora", "vera", "placement", "rope_kv", "scoring")

# What a submission may not use, per exercise: the project's (or a library's) implementation of
# what the exercise asks for. Dotted names: a module stands for everything in it, "[]" for any
# subscript ("adapters.KINDS[].places": the places of any kind in the table).
FORBIDDEN = {
    "lora": ("adapters", "peft"),
    "vera": ("peft",),
    "placement": ("adapters.PLACEMENTS", "adapters._bottleneck_places", "adapters.KINDS[].places",
                  "slots.slots"),
    "rope_kv": ("model.rope_angles", "model.apply_rope", "model.LayerCache",
                "model.KVCache.__init__", "model.KVCache.extend", "transformers"),
    "scoring": (),
}
# Never, in any exercise: the reference solutions, the graders and their helpers, and the ways
# around this check (a module looked up by name, code run from a string).
ALWAYS_FORBIDDEN = ("solutions", "exercises", "grading", "conftest", "importlib", "builtins",
                    "sys.modules")
DYNAMIC = ("__import__", "exec", "eval", "compile")
# The names each exercise asks for, which the file must define itself; for a class, the methods
# it must define in its own body (rope_kv's KVCache inherits model.KVCache's plumbing, not these;
# without its own `layer`, model.py's LayerCache would do the work of yours).
OWN = {
    "lora": {"LoRA": ("__init__", "forward", "merge", "unmerge")},
    "vera": {"projections": (), "VeRA": ("__init__", "delta", "forward", "merge", "unmerge"),
             "places": (), "make": ()},
    "placement": {"places": (), "measure": ()},
    "rope_kv": {"rope_angles": (), "apply_rope": (), "LayerCache": ("update",),
                "KVCache": ("__init__", "extend", "layer")},
    "scoring": {"extract_fraction": (), "is_correct": ()},
}
# super().<method> would run the parent's implementation of a method the file must write
NO_SUPER = {"rope_kv": {"KVCache": ("__init__", "extend")}}


class Refused(Exception):
    """A graded file breaks a rule; the message says which and where."""


def impl_path(exercise):
    """The file EXERCISE_IMPL selects for `exercise` (see exercises/conftest.py)."""
    choice = os.environ.get("EXERCISE_IMPL", "stub")
    if choice == "stub":
        return HERE / exercise / "stub.py"
    if choice == "solution":
        path = HERE / "solutions" / f"{exercise}.py"
        if not path.exists():
            pytest.skip(f"{path} is not here (withheld by the instructor)")
        return path
    return Path(choice) / f"{exercise}.py"


def load_impl(exercise):
    """The module to grade for `exercise`, chosen by EXERCISE_IMPL, once it keeps the rules; a file
    that breaks one fails the test (and so every test of the exercise) with the reason."""
    path = impl_path(exercise)
    if not path.exists():
        pytest.fail(f"EXERCISE_IMPL={os.environ.get('EXERCISE_IMPL')!r}: no {path}",
                    pytrace=False)
    try:
        check_source(exercise, path.read_text(encoding="utf-8"), path)
        module = _exec(f"graded_{exercise}", path)
        check_module(exercise, module, path)
        return module
    except (Refused, UnicodeDecodeError) as e:
        reason = f"{path}: {e}" if isinstance(e, UnicodeDecodeError) else str(e)
    pytest.fail(reason, pytrace=False)  # outside the except: the message alone, no chained trace


def _exec(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the file's own error, as one line: the test reports it as the grade
        raise Refused(f"{path}: importing it raised {type(e).__name__}: {e}") from e
    return module


# ------------------------------------------------------------------------------ the file's own work
def check_source(exercise, source, path="<submission>"):
    """Refused (with the line) if the file does not parse, or imports or names what FORBIDDEN and
    ALWAYS_FORBIDDEN rule out. Reads the text only: nothing of the file runs."""
    try:
        tree = ast.parse(source, str(path))
    except SyntaxError as e:
        raise Refused(f"{path}, line {e.lineno}: SyntaxError: {e.msg}") from None
    aliases, docs = _aliases(tree), _docstrings(tree)
    for node in ast.walk(tree):
        for name in _names_used(node, aliases):
            rule = _rule_broken(exercise, name)
            if rule:
                raise Refused(f"{path}, line {node.lineno}: uses {name} ({rule})")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in DYNAMIC:
            raise Refused(f"{path}, line {node.lineno}: calls {node.func.id}() (code the grader "
                          "cannot read is not allowed)")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and "solutions" in node.value and id(node) not in docs:
            raise Refused(f"{path}, line {node.lineno}: names the reference solutions")
    _check_super(exercise, tree, path)


def _docstrings(tree):
    """The ids of the docstring nodes (prose, which loads nothing)."""
    return {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}


def _aliases(tree):
    """{local name: dotted name} of every import, and of every plain `x = <imported name...>`."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):  # `import a.b` binds a; `import a.b as x` binds x to a.b
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    for _ in range(2):  # x = adapters; y = x.LoRA: a second pass resolves chains of two
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                    and isinstance(node.targets[0], ast.Name):
                dotted = _dotted(node.value, out)
                if dotted:
                    out[node.targets[0].id] = dotted
    return out


def _dotted(node, aliases):
    """"adapters.KINDS[].places" for `A.KINDS["series"].places` after `import adapters as A`; None
    for an expression that does not start at an imported name."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return base and f"{base}.{node.attr}"
    if isinstance(node, ast.Subscript):
        base = _dotted(node.value, aliases)
        return base and f"{base}[]"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id == "getattr" and len(node.args) >= 2 \
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
        base = _dotted(node.args[0], aliases)
        return base and f"{base}.{node.args[1].value}"
    return None


def _names_used(node, aliases):
    """The dotted names an import statement or an expression node refers to."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        module = "." * node.level + (node.module or "")
        if any(a.name == "*" for a in node.names):
            return [f"{module}.*"]
        return [module, *(f"{module}.{a.name}" for a in node.names)]
    if isinstance(node, (ast.Name, ast.Attribute, ast.Subscript, ast.Call)):
        dotted = _dotted(node, aliases)
        return [dotted] if dotted else []
    return []


def _within(name, entry):
    return name == entry or name.startswith(entry + ".") or name.startswith(entry + "[")


def _rule_broken(exercise, name):
    """Why `name` may not be used in `exercise`, or None."""
    if name.endswith(".*"):
        return "a star import hides what it brings in: import names one by one"
    if name.split(".")[0].startswith("test_") or name.startswith("."):
        return "the graders, and relative imports, are not for submissions"
    for entry in ALWAYS_FORBIDDEN:
        if _within(name, entry):
            return f"off limits in every exercise: {entry}"
    for entry in FORBIDDEN[exercise]:
        if _within(name, entry):
            return f"off limits in exercise {exercise}: {entry} holds what you are asked to write"
    return None


def _check_super(exercise, tree, path):
    """super().extend(...) in KVCache would be model.py's extend, the method to be written."""
    for cls in ast.walk(tree):
        methods = NO_SUPER.get(exercise, {}).get(getattr(cls, "name", None), ())
        if not isinstance(cls, ast.ClassDef) or not methods:
            continue
        for node in ast.walk(cls):
            if isinstance(node, ast.Attribute) and node.attr in methods \
                    and isinstance(node.value, ast.Call) \
                    and getattr(node.value.func, "id", None) == "super":
                raise Refused(f"{path}, line {node.lineno}: {cls.name} calls super().{node.attr}, "
                              f"the parent's {node.attr}: write {cls.name}.{node.attr} yourself")


def check_module(exercise, module, path="<submission>"):
    """After loading: the names of OWN are the file's own (not imported, not inherited), no class
    derives from a forbidden one, and names, signatures and given values are the stub's."""
    for name, methods in OWN[exercise].items():
        obj = getattr(module, name, None)
        if obj is None:
            continue  # the tests that use it say so
        if getattr(obj, "__module__", module.__name__) != module.__name__:
            raise Refused(f"{path}: {name} comes from {obj.__module__}: write it in this file")
        if isinstance(obj, type):
            _check_class(exercise, obj, methods, module, path)
    _check_interface(exercise, module, path)


def _check_class(exercise, cls, methods, module, path):
    for base in cls.__mro__[1:]:
        if base.__module__ == "builtins":  # object, tuple (a NamedTuple's base)
            continue
        qual = f"{base.__module__}.{base.__qualname__}"
        rule = _rule_broken(exercise, qual) or _rule_broken(exercise, base.__module__)
        if rule:
            raise Refused(f"{path}: {cls.__name__} derives from {qual} ({rule})")
    for m in methods:
        fn = cls.__dict__.get(m)
        if fn is None:
            raise Refused(f"{path}: {cls.__name__}.{m} is inherited: write it in {cls.__name__}")
        if getattr(fn, "__module__", module.__name__) != module.__name__:
            raise Refused(f"{path}: {cls.__name__}.{m} comes from {fn.__module__}: write it here")


# ----------------------------------------------------------------------------- the stub's interface
@functools.cache
def stub(exercise):
    """The stub as shipped: the interface to keep, and the given code (placement's task)."""
    return _exec(f"stub_{exercise}", HERE / exercise / "stub.py")


def _check_interface(exercise, module, path):
    """The stub's functions and classes with the same signatures (the graders call them so), and its
    given values unchanged (the graders read them: placement's LR, VeRA's KIND.defaults, ...)."""
    given = stub(exercise)
    for name, want in vars(given).items():
        if name.startswith("_"):
            continue
        got = getattr(module, name, None)
        if getattr(want, "__module__", None) == given.__name__ and callable(want):
            if got is None:
                continue  # the tests that use it say so
            _same_signature(name, want, got, path)
            for m, fn in vars(want).items() if isinstance(want, type) else ():
                if inspect.isfunction(fn) and hasattr(got, m):
                    _same_signature(f"{name}.{m}", fn, getattr(got, m), path)
        elif _given(want) is not None and _given(got) != _given(want):
            raise Refused(f"{path}: {name} = {_given(got)!r}, the stub gives {_given(want)!r}: "
                          "keep the given values")


def _same_signature(name, want, got, path):
    def params(f):
        try:
            return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]
        except (TypeError, ValueError):
            return None
    if params(got) != params(want):
        sig = inspect.signature
        raise Refused(f"{path}: {name}{sig(got) if params(got) else ''} differs from the stub's "
                      f"{name}{sig(want)}: keep the stub's names and signatures")


def _given(value):
    """A given value in a comparable form: plain data as it is, a NamedTuple (VeRA's KIND) by its
    plain fields; None for what is not data (modules, functions, classes)."""
    if isinstance(value, type) or inspect.ismodule(value) or inspect.isroutine(value):
        return None
    if isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "_asdict"):
        return {k: _given(v) for k, v in value._asdict().items() if _given(v) is not None} or None
    if isinstance(value, (tuple, list)):
        return type(value)(_given(v) for v in value)
    if isinstance(value, dict):
        return {k: _given(v) for k, v in value.items()}
    return None


# -------------------------------------------------------------------------- tiny models to grade on
# torch is imported in the helpers that use it: grade_class.py reads the rules above and should not
# wait for torch to load.
def randomize(model, seed=0, std=0.1):
    """Every weight random (norm scales around 1), so that no weight is a no-op and a bug shows in
    the logits."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.dim() == 1 and name.endswith("weight") else std * noise)
    return model.eval()


def tiny(name="tiny-llama", seed=0, **overrides):
    """A randomised fp32 model of a tiny preset (2 layers, n_embd 64), in eval mode."""
    import torch
    from model import Transformer
    from presets import Config
    torch.manual_seed(seed)
    return randomize(Transformer(Config.from_name(name, **overrides)), seed)


def token_ids(model, B=2, T=9, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


def assert_merge_keeps_parameters(model):
    """adapters.merge, then unmerge: the same Parameter objects stay (none replaced by a new
    trainable one), the trainable count does not change, and the adapter stays fp32."""
    import torch

    import adapters
    params, counts = dict(model.named_parameters()), adapters.count_parameters(model)
    for fold in (adapters.merge, adapters.unmerge):
        fold(model)
        now = dict(model.named_parameters())
        assert now.keys() == params.keys() and all(now[n] is p for n, p in params.items()), \
            f"{fold.__name__} replaced a parameter"
        assert adapters.count_parameters(model) == counts, "the trainable count changed"
        assert all(p.dtype == torch.float32 for p in now.values())


def fit(model, steps, lr, seed=0):
    """`steps` AdamW steps (no weight decay) on one batch of random tokens, in train mode, on the
    trainable parameters only. Returns the loss before each step."""
    import torch
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
