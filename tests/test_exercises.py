"""The exercises' graders are not hollow:

- every grading test FAILS on the stubs as shipped (exercises/*/stub.py),
- every grading test PASSES on the reference solutions (exercises/solutions/),
- every typical bug (a mutant: the reference with one deliberate mistake, MUTANTS) is caught by the
  grading tests named for it.

Each run is pytest in a subprocess (the graders import the graded file by path, chosen by
EXERCISE_IMPL), read back test by test from its JUnit XML. When an instructor has deleted
exercises/solutions/, the reference and mutant checks skip. A grading test that skips (e.g. the
PEFT parity grade without peft installed) must skip on both sides.
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
    if not (ROOT / "exercises" / "solutions").is_dir():
        pytest.skip("exercises/solutions/ withheld")
    on_stub = request.getfixturevalue("on_stub")
    on_ref = run_graders("solution", tmp_path)
    assert set(on_ref) == set(on_stub)
    failed = [t for t, r in on_ref.items() if r == "failed"]
    assert not failed, f"grading tests that fail on the reference solutions: {failed}"
    skipped_here = {t for t, r in on_ref.items() if r == "skipped"}
    skipped_there = {t for t, r in on_stub.items() if r == "skipped"}
    assert skipped_here == skipped_there, "a test must skip on both sides or on neither"


# (exercise, the bug, text in the reference solution, what the bug makes of it, the grading tests
# that must catch it)
MUTANTS = [
    ("lora", "A and B both start at zero",
     "nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))",
     "nn.init.zeros_(self.lora_A.weight)",
     ["test_init_B_zero_A_random", "test_gradients_at_step_0", "test_trains",
      "test_accuracy_above_the_bar"]),
    ("lora", "the update is added again once merged",
     "        if self.merged:\n            return y\n", "",
     ["test_merge_equals_unmerged_and_unmerge_restores"]),
    ("lora", "dropout on the layer's output too",
     "return y + (self.lora_B", "return self.dropout(y) + (self.lora_B",
     ["test_dropout_only_on_the_adapter_input"]),
    ("lora", "scaled by alpha, not alpha / r",
     "alpha / r", "alpha",
     ["test_forward_matches_adapters_lora", "test_model_logits_match_adapters_lora"]),
    ("vera", "b starts at one",
     "torch.zeros(d_out)", "torch.ones(d_out)",
     ["test_init_identity"]),
    ("vera", "A and B saved with every layer",
     "persistent=False", "persistent=True",
     ["test_A_B_shared_frozen_and_not_saved"]),
    ("vera", "a copy of A and B per layer",
     "@functools.lru_cache(maxsize=None)\n", "",
     ["test_projections_are_peft_s_draw", "test_A_B_shared_frozen_and_not_saved"]),
    ("vera", "the wrong block of A",
     "F.linear(x, self.A[:, :self.d_in])", "F.linear(x, self.A[:, -self.d_in:])",
     ["test_forward_is_the_formula", "test_merge_equals_unmerged"]),
    ("placement", "a loss that was never measured",
     "loss_after = model(x, y)[1].item()", "loss_after = 0.9 * loss_before",
     ["test_loss_after_matches_a_direct_run"]),
    ("placement", "mlp_top on the bottom half",
     "first = n - n // 2 if", "first = 0 if",
     ["test_places_mlp_top", "test_trainable_counts"]),
    ("placement", "Houlsby with the MLP first",
     '"both": ["post_attn", "post_mlp"]', '"both": ["post_mlp", "post_attn"]',
     ["test_places_match_the_project"]),
    ("placement", "every parameter counted",
     "trainable=sum(p.numel() for p in trainable)",
     "trainable=sum(p.numel() for p in model.parameters())",
     ["test_trainable_counts"]),
    ("rope_kv", "rope_theta ignored",
     "c.rope_theta **", "10000.0 **",
     ["test_angles_match_model"]),
    ("rope_kv", "rotate-half with interleaved pairs",
     "if interleaved else (xr[..., :rd // 2]", "if True else (xr[..., :rd // 2]",
     ["test_rotate_half_matches_model", "test_model_logits_with_your_rope"]),
    ("rope_kv", "the cache always writes the keys at slot 0",
     "self.k.index_copy_(2, self.slots,", "self.k.index_copy_(2, self.slots - self.slots[0],",
     ["test_cache_stores_and_returns", "test_decoding_equals_full_forward",
      "test_generate_with_your_cache"]),
    ("rope_kv", "padding marked as a real token in the cache",
     "self.valid.index_copy_(1, slots, valid.to(torch.bool))",
     "self.valid.index_copy_(1, slots, torch.ones_like(valid, dtype=torch.bool))",
     ["test_cache_marks_valid_slots", "test_decoding_equals_full_forward",
      "test_generate_with_your_cache"]),
    ("scoring", "the first answer, not the last",
     "found[-1]", "found[0]",
     ["test_cases", "test_agrees_with_data_scoring_on_plain_numbers"]),
    ("scoring", "no mixed numbers",
     "part is not None and part < 1", "False",
     ["test_cases", "test_is_correct"]),
    ("scoring", "every comma removed",
     're.sub(r"(?<=\\d),(?=\\d)", "", text)', 'text.replace(",", "")',
     ["test_cases"]),
]


def mutant_rounds():
    """The mutants in rounds of at most one per exercise (one grader run per round)."""
    rounds = []
    for m in MUTANTS:
        for r in rounds:
            if m[0] not in r:
                r[m[0]] = m
                break
        else:
            rounds.append({m[0]: m})
    return rounds


ROUNDS = mutant_rounds()


@pytest.mark.parametrize("round_", ROUNDS, ids=[f"round{i}" for i in range(len(ROUNDS))])
def test_every_mutant_is_caught(round_, tmp_path):
    solutions = ROOT / "exercises" / "solutions"
    if not solutions.is_dir():
        pytest.skip("exercises/solutions/ withheld (the mutants are made from it)")
    for name, (_, bug, old, new, _) in round_.items():
        src = (solutions / f"{name}.py").read_text()
        assert src.count(old) >= 1, f"mutant {bug!r}: {old!r} is not in the reference any more"
        (tmp_path / f"{name}.py").write_text(src.replace(old, new))
    tests = sorted({t for m in round_.values() for t in m[4]})
    dirs = [f"exercises/{name}" for name in round_]
    results = run_graders(tmp_path, tmp_path, (*dirs, "-k", " or ".join(tests)))
    for name, (_, bug, _, _, must_fail) in round_.items():
        failed = {t.split("::")[1].split("[")[0] for t, r in results.items()
                  if t.startswith(f"exercises.{name}.") and r == "failed"}
        missed = sorted(set(must_fail) - failed)
        assert not missed, f"exercise {name}, mutant {bug!r} is not caught by {missed}"
