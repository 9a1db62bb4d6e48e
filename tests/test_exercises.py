"""The exercises' graders are not hollow: every grading test FAILS on the stubs as shipped
(exercises/*/stub.py) and PASSES on the reference solutions (exercises/solutions/). Each side is one
pytest run in a subprocess (the graders import the graded file by path, under EXERCISE_IMPL), read
back test by test from its JUnit XML.

When an instructor has deleted exercises/solutions/, the reference side is skipped. A grading test
that skips (e.g. the PEFT parity grade without peft installed) must skip on both sides.
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ("lora", "vera", "placement", "rope_kv", "scoring")


def run_graders(impl, tmp_path):
    """{test id: "passed" | "failed" | "skipped"} of every grader, run against
    EXERCISE_IMPL=impl."""
    xml = tmp_path / f"{impl}.xml"
    env = {**os.environ, "EXERCISE_IMPL": impl}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "exercises"]
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


def test_every_grading_test_passes_on_the_reference(on_stub, tmp_path):
    if not (ROOT / "exercises" / "solutions").is_dir():
        pytest.skip("exercises/solutions/ withheld")
    on_ref = run_graders("solution", tmp_path)
    assert set(on_ref) == set(on_stub)
    failed = [t for t, r in on_ref.items() if r == "failed"]
    assert not failed, f"grading tests that fail on the reference solutions: {failed}"
    skipped_here = {t for t, r in on_ref.items() if r == "skipped"}
    skipped_there = {t for t, r in on_stub.items() if r == "skipped"}
    assert skipped_here == skipped_there, "a test must skip on both sides or on neither"
