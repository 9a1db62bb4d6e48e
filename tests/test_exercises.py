"""The exercises' graders are not hollow, and the instructor's tools work:

- every grading test FAILS on the stubs as shipped (exercises/*/stub.py),
- every grading test PASSES on the reference solutions (exercises/solutions/),
- every planted bug (the reference with one typical mistake, exercises/solutions/planted_bugs.py)
  is caught by the grading tests named for it,
- exercises/grade_class.py grades a folder of students into the right CSV, a bad file scoring 0
  with its reason, and exercises/README.md gives its points,
- exercises/handout.py builds a students' copy whose history holds no solution.

Each grading run is pytest in a subprocess (the graders import the graded file by path, chosen by
EXERCISE_IMPL), read back test by test from its JUnit XML. Where exercises/solutions/ is withheld
(as in the students' copy), the checks that need it skip. A grading test that skips (e.g. the PEFT
parity grade without peft installed, the CUDA-graph grade without CUDA) must skip on both sides.
"""
import csv
import importlib.util
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "exercises" / "solutions"
EXERCISES = ("lora", "vera", "placement", "rope_kv", "scoring")


def run_graders(impl, tmp_path, args=("exercises",)):
    """{test id: "passed" | "failed" | "skipped"} of the graders (all, or those `args` select), run
    against EXERCISE_IMPL=impl."""
    xml = tmp_path / "graders.xml"
    env = {**os.environ, "EXERCISE_IMPL": str(impl)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert xml.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    out = {}
    for case in ET.parse(xml).iter("testcase"):
        tags = {child.tag for child in case}
        result = "skipped" if "skipped" in tags else "passed"
        out[f"{case.get('classname')}::{case.get('name')}"] = \
            "failed" if tags & {"failure", "error"} else result
    return out


@pytest.fixture(scope="module")
def on_stub(tmp_path_factory):
    return run_graders("stub", tmp_path_factory.mktemp("stub"))


def test_every_exercise_has_a_grader(on_stub):
    for name in EXERCISES:
        n = sum(t.startswith(f"exercises.{name}.") for t in on_stub)
        assert n >= 5, f"exercises/{name}: {n} grading tests"


def test_every_grading_test_fails_on_the_stubs(on_stub):
    passed = [t for t, r in on_stub.items() if r == "passed"]
    assert not passed, f"grading tests that pass on the stubs as shipped (hollow): {passed}"


def test_every_grading_test_passes_on_the_reference(request, tmp_path):
    if not SOLUTIONS.is_dir():
        pytest.skip("exercises/solutions/ withheld")
    on_stub = request.getfixturevalue("on_stub")
    on_ref = run_graders("solution", tmp_path)
    assert set(on_ref) == set(on_stub)
    failed = [t for t, r in on_ref.items() if r == "failed"]
    assert not failed, f"grading tests that fail on the reference solutions: {failed}"
    skipped_here = {t for t, r in on_ref.items() if r == "skipped"}
    skipped_there = {t for t, r in on_stub.items() if r == "skipped"}
    assert skipped_here == skipped_there, "a test must skip on both sides or on neither"


def planted_bugs():
    """exercises/solutions/planted_bugs.py's PLANTED, or [] where the solutions are withheld."""
    path = SOLUTIONS / "planted_bugs.py"
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("planted_bugs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PLANTED


def rounds(bugs):
    """The bugs in rounds of at most one per exercise (one grader run per round)."""
    out = []
    for bug in bugs:
        for r in out:
            if bug[0] not in r:
                r[bug[0]] = bug
                break
        else:
            out.append({bug[0]: bug})
    return out


ROUNDS = rounds(planted_bugs()) or [None]  # None: withheld, one test that says so


@pytest.mark.parametrize("round_", ROUNDS, ids=[f"round{i}" for i in range(len(ROUNDS))])
def test_every_planted_bug_is_caught(round_, tmp_path):
    if round_ is None:
        pytest.skip("exercises/solutions/ withheld (the planted bugs are made from it)")
    for name, (_, bug, old, new, _) in round_.items():
        src = (SOLUTIONS / f"{name}.py").read_text()
        assert src.count(old) >= 1, f"planted bug {bug!r}: {old!r} is not in the reference any more"
        (tmp_path / f"{name}.py").write_text(src.replace(old, new))
    tests = sorted({t for bug in round_.values() for t in bug[4]})
    dirs = [f"exercises/{name}" for name in round_]
    results = run_graders(tmp_path, tmp_path, (*dirs, "-k", " or ".join(tests)))
    for name, (_, bug, _, _, must_fail) in round_.items():
        failed = {t.split("::")[1].split("[")[0] for t, r in results.items()
                  if t.startswith(f"exercises.{name}.") and r == "failed"}
        missed = sorted(set(must_fail) - failed)
        assert not missed, f"exercise {name}, planted bug {bug!r} is not caught by {missed}"


# ------------------------------------------------------------------------------ the class grader
def grade_class(*args, timeout=300):
    cmd = [sys.executable, str(ROOT / "exercises" / "grade_class.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_readme_gives_grade_class_s_points(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "exercises"))  # undone after the test: spawned processes
    # of later tests must find tests/conftest.py, not exercises/conftest.py
    from grade_class import POINTS
    readme = (ROOT / "exercises" / "README.md").read_text()
    table = {m[1]: int(m[2]) for m in re.finditer(r"`(\w+)/stub\.py` \| (\d+) \|", readme)}
    assert table == POINTS, "exercises/README.md's points differ from grade_class.POINTS"


def test_grade_class_two_students(tmp_path):
    """alice hands in the reference scoring; bob a scoring that takes the first answer (partial
    points), a LoRA that imports the project's and a VeRA that does not parse (0, with reasons)."""
    if not SOLUTIONS.is_dir():
        pytest.skip("exercises/solutions/ withheld (alice hands in the reference)")
    scoring = (SOLUTIONS / "scoring.py").read_text()
    for student, files in {"alice": {"scoring.py": scoring},
                           "bob": {"scoring.py": scoring.replace("found[-1]", "found[0]"),
                                   "lora.py": "from adapters import LoRA  # noqa\n",
                                   "vera.py": "def register(:\n"}}.items():
        (tmp_path / "subs" / student).mkdir(parents=True)
        for name, text in files.items():
            (tmp_path / "subs" / student / name).write_text(text)
    out = tmp_path / "grades.csv"
    proc = grade_class(tmp_path / "subs", "--out", out, "--exercises", "lora,vera,scoring",
                       "--jobs", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_csv(out)
    total = {(r["student"], r["exercise"]): r for r in rows if r["test"] == "TOTAL"}
    points = {k: float(r["points"]) for k, r in total.items()}
    assert points["alice", "scoring"] == points["alice", "ALL"] == 15
    assert points["alice", "lora"] == 0 and "no lora.py" in total["alice", "lora"]["reason"]
    assert points["bob", "lora"] == 0 and "uses adapters" in total["bob", "lora"]["reason"]
    assert points["bob", "vera"] == 0 and "SyntaxError" in total["bob", "vera"]["reason"]
    bob = [r for r in rows if r["student"] == "bob" and r["exercise"] == "scoring"
           and r["test"] != "TOTAL"]
    failed = {r["test"] for r in bob if r["outcome"] == "failed"}
    assert "test_agrees_with_data_scoring_on_plain_numbers" in failed
    assert "test_cases[3/4 of 12 is 9]" in failed
    passed = sum(r["outcome"] == "passed" for r in bob)
    assert 0 < passed < len(bob)
    got = points["bob", "scoring"]
    assert got == round(15 * passed / len(bob), 2) == round(sum(float(r["points"]) for r in bob), 2)
    assert points["bob", "ALL"] == got
    assert "bob/vera:" in proc.stdout and "alice" in proc.stdout


def test_grade_class_zero_with_reason(tmp_path):
    """An endless loop runs into --timeout and scores 0, with the reason; the command's own mistakes
    are one line each."""
    (tmp_path / "carol").mkdir()
    (tmp_path / "carol" / "scoring.py").write_text("while True:\n    pass\n")
    out = tmp_path / "grades.csv"
    proc = grade_class(tmp_path, "--out", out, "--exercises", "scoring", "--timeout", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [carol] = [r for r in read_csv(out) if r["exercise"] == "scoring"]
    assert float(carol["points"]) == 0 and "--timeout" in carol["reason"]
    for args, says in [((tmp_path / "nobody",), "no such folder"),
                       ((tmp_path / "carol",), "holds no student folders"),
                       ((tmp_path, "--exercises", "lora,lorax"), "--exercises"),
                       ((tmp_path, "--out", tmp_path / "no" / "g.csv"), "--out")]:
        proc = grade_class(*args)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- the handout
def handout(out):
    return subprocess.run([sys.executable, str(ROOT / "exercises" / "handout.py"), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def test_handout_has_no_solutions_in_its_history(tmp_path, monkeypatch):
    out = tmp_path / "handout"
    proc = handout(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (out / "exercises" / "solutions").exists()
    assert git(out, "rev-list", "--all", "--count").stdout.strip() == "1", "one commit"
    assert git(out, "show", "HEAD:exercises/solutions/lora.py").returncode != 0
    assert git(out, "status", "--porcelain").stdout == "", "every copied file is committed"
    here = set(git(ROOT, "ls-files").stdout.split())
    assert set(git(out, "ls-files").stdout.split()) <= here
    assert {"exercises/lora/stub.py", "exercises/grading.py", "tests/test_exercises.py"} <= \
        set(git(out, "ls-files").stdout.split())
    if SOLUTIONS.is_dir():
        history = {line[1:].strip() for line in git(out, "log", "--all", "-p").stdout.splitlines()
                   if line.startswith("+")}
        monkeypatch.syspath_prepend(str(ROOT / "exercises"))
        from handout import reference_lines
        secret = reference_lines()
        assert len(secret) > 20
        quoted = sorted(secret & history)
        assert not quoted, f"the handout's history quotes the reference: {quoted[:3]}"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_exercises.py", "-k", "reference or planted or readme"],
                          cwd=out, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "skipped" in proc.stdout, proc.stdout[-2000:]


def test_handout_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = handout(tmp_path)
    assert proc.returncode == 2 and "not an empty folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
