"""The README and docs/ name the code as it is: every `module.py: Name.attr`, `module.name`,
class name and file path they mention exists, so a rename that forgets the prose fails here."""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODULES = sorted(p.stem for p in ROOT.glob("*.py")) + ["data." + p.stem for p in
                                                       (ROOT / "data").glob("*.py")]
CODE = re.compile(r"`([^`\n]+)`")
FILE_REF = re.compile(r"^((?:data/)?\w+)\.py: ([A-Za-z_][\w.]*)")       # `model.py: Block.forward`
DOTTED = re.compile(r"^((?:data\.)?[a-z_]+)\.([A-Za-z_][\w.]*)(?:\(.*\))?$")  # `adapters.merge(...)`
CLASS = re.compile(r"^([A-Z][a-z]+[A-Z]\w*|[A-Z][a-z]+)$")              # `KVCache`, `LoRA`, `Block`
TEST_REF = re.compile(r"^(tests/\w+\.py)::(\w+)")                        # `tests/x.py::test_y`
CLASS_ATTR = re.compile(r"^([A-Z]\w*)\.([a-z_][\w.]*)(?:\(.*\))?$")         # `Linear.adapter`
PATH = re.compile(r"^((?:tests|docs|data|config|exercises)/[\w./-]+\.(?:py|md|json)|\w+\.py)$")
DATA_FILE = re.compile(r"\.(safetensors|model|json|jsonl|pth|bin|pt|svg|csv|txt|md)$")


def instances(mod):
    """For model.py: a tiny model and its submodules, whose hook slots (`Linear.adapter`,
    `Block.post_attn`, ...) are attributes set in __init__, not on the class."""
    if not hasattr(mod, "Transformer"):
        return {}
    model = mod.Transformer(mod.Config())
    return {type(m).__name__: m for m in model.modules() if type(m).__module__ == mod.__name__}


def resolve(module, dotted):
    """module.dotted -> the object; `model.eval` in prose means the model object's method, so a name
    model.py lacks is looked up on its Transformer too, and `Class.slot` on an instance."""
    mod = importlib.import_module(module.replace("/", "."))
    first, *rest = dotted.split(".")
    starts = [(mod, dotted.split(".")), (getattr(mod, "Transformer", None), dotted.split("."))]
    if rest and first in (built := instances(mod)):
        starts.append((built[first], rest))
    for obj, parts in starts:
        try:
            for part in parts:
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AttributeError(f"{module}.{dotted}")


def owner(name):
    """The project module that defines class `name` (None: not one of ours, e.g. `nn.Module`)."""
    for module in MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        if isinstance(obj, type) and obj.__module__ == module:
            return module
    return None


def references(doc):
    """(kind, text) for each code span of `doc` that names the project's code."""
    for span in CODE.findall(doc.read_text(encoding="utf-8")):
        span = span.strip()
        if m := TEST_REF.match(span):
            yield "test", (m[1], m[2])
        elif PATH.match(span) and "*" not in span and "<" not in span:
            yield "path", span
        elif (m := FILE_REF.match(span)) and m[1].replace("/", ".") in MODULES:
            yield "code", (m[1], m[2])
        elif (m := DOTTED.match(span)) and m[1] in MODULES and not DATA_FILE.search(span):
            yield "code", (m[1], m[2])
        elif (m := CLASS_ATTR.match(span)) and (module := owner(m[1])):
            yield "code", (module, f"{m[1]}.{m[2]}")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_name_the_docs_mention_exists(doc):
    missing = []
    for kind, ref in references(doc):
        if kind == "path":
            if not (ROOT / ref).exists():
                missing.append(ref)
            continue
        if kind == "test":
            path, name = ref
            source = (ROOT / path).read_text() if (ROOT / path).exists() else ""
            if not re.search(rf"^def {name}\(", source, re.M):
                missing.append(f"{path}::{name}")
            continue
        module, dotted = ref
        try:
            resolve(module, dotted)
        except (AttributeError, ModuleNotFoundError):
            missing.append(f"{module}.{dotted}")
    assert not missing, f"{doc.name} names what the code no longer has: {missing}"


def test_walkthrough_class_names_exist():
    """Bare class names in the walkthrough (`Bottleneck`, `KVCache`, ...) are classes of the code."""
    modules = [importlib.import_module(m) for m in MODULES if not m.startswith(("bench", "setup"))]
    text = (ROOT / "docs" / "walkthrough.md").read_text(encoding="utf-8")
    names = {s for s in CODE.findall(text) if CLASS.match(s)} - {"None", "True", "False"}
    missing = sorted(n for n in names if not any(hasattr(m, n) for m in modules))
    assert not missing, f"walkthrough.md names classes the code does not have: {missing}"


def test_the_checker_can_fail(tmp_path):
    """The reference finder sees a stale name (so the tests above are not hollow)."""
    doc = tmp_path / "stale.md"
    doc.write_text("See `model.py: Transformer.no_such_method`, `adapters.no_such_fn`, `nofile.py`, "
                   "`Block.no_such_slot`, `tests/test_docs.py::test_no_such_test`.")
    refs = list(references(doc))
    assert ("code", ("model", "Transformer.no_such_method")) in refs
    assert ("code", ("adapters", "no_such_fn")) in refs and ("path", "nofile.py") in refs
    assert ("code", ("model", "Block.no_such_slot")) in refs
    assert ("test", ("tests/test_docs.py", "test_no_such_test")) in refs
    with pytest.raises(AttributeError):
        resolve("model", "Transformer.no_such_method")
    with pytest.raises(AttributeError):
        resolve("model", "Linear.no_such_slot")
    assert resolve("model", "Linear.adapter") is None  # a slot: set in __init__, empty


# ------------------------------------------------------ the README's arrows (its Layout section)
SCRIPTS = {"train", "eval", "demo", "bench"}
TOOLS = {"chat", "export", "plot", "inspect_adapter", "quant_report"}
LEAVES = {"files", "svg", "presets", "loss", "mosa", "tokenizer_base", "generate",
          "data.pack", "data.scoring", "data.template"}
# the one arrow back, lazy: train.main hands a command line without --model to the demo, which is
# built on train.py
BACK = {("train", "demo")}


def imports(path, project):
    """{(module it imports, names taken)} of one file, imports inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {(a.name, ()) for a in node.names if a.name in project}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in project:
            found.add((node.module, tuple(a.name for a in node.names)))
        elif isinstance(node, ast.ImportFrom) and node.module == "data":
            found |= {("data." + a.name, ()) for a in node.names}
    return found


def private_uses(path, project):
    """`module._name` read in a file that imported that module."""
    tree = ast.parse(path.read_text())
    return {f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in project and n.attr.startswith("_") and not n.attr.startswith("__")}


def cycle(graph):
    """A list of modules that import each other round a circle, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return path[path.index(d):] + [d] if d in path else [m, d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[m] = "done"
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, [m]))), None)


def test_the_arrows_point_one_way():
    files = {("data." + p.stem if p.parent.name == "data" else p.stem): p
             for p in [*ROOT.glob("*.py"), *(ROOT / "data").glob("*.py")]
             if p.name != "__init__.py"}
    graph = {m: {d for d, _ in imports(p, files)} for m, p in files.items()}
    assert cycle({m: ds - {d for s, d in BACK if s == m} for m, ds in graph.items()}) is None
    for m, p in files.items():
        taken = [f"{d}.{n}" for d, names in imports(p, files) for n in names if n.startswith("_")]
        assert not taken and not private_uses(p, files), f"{m}.py uses private names"
        if m in TOOLS:
            assert not graph[m] & (SCRIPTS | TOOLS), f"tool {m}.py imports a script or tool"
    for leaf in LEAVES:
        assert not graph[leaf], f"{leaf} imports {graph[leaf]}"
    assert graph["model"] == {"presets", "loss"}
    assert {d for s, d in BACK} <= set(files) and all(d in graph[s] for s, d in BACK)


def test_the_arrow_checks_can_fail(tmp_path):
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    (tmp_path / "x.py").write_text("import model\nfrom adapters import _attach\nmodel._opt\n")
    project = {"model", "adapters"}
    assert imports(tmp_path / "x.py", project) == {("model", ()), ("adapters", ("_attach",))}
    assert private_uses(tmp_path / "x.py", project) == {"model._opt"}
