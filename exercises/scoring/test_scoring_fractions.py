"""Grader of exercise 5 (fraction answers): tricky cases, and agreement with data/scoring.py's
reading on responses that hold only whole and decimal numbers (there the new rule must not change a
single answer)."""
import random
from fractions import Fraction as F

import pytest

from data.scoring import extract_number
from grading import load_impl


@pytest.fixture(scope="module")
def impl():
    return load_impl("scoring")


CASES = [
    ("The answer is 3/4.", F(3, 4)),
    ("So x = -2/6", F(-1, 3)),                          # reduced, sign kept
    ("She ate 1 1/2 pizzas.", F(3, 2)),                 # a mixed number
    ("The change is -2 1/4 degrees", F(-9, 4)),         # a negative mixed number
    ("It is 2 4/3", F(4, 3)),                           # improper after a whole: 2, then 4/3
    ("$\\frac{5}{8}$", F(5, 8)),                        # LaTeX
    ("so the answer is $-\\frac{1}{3}$.", F(-1, 3)),
    ("\\dfrac{10}{4}", F(5, 2)),
    ("0.125 of the cake", F(1, 8)),                     # decimals exactly
    ("1,250 apples", F(1250)),                          # thousands separator
    ("First 1/2, then 3/4", F(3, 4)),                   # a comma after a fraction ends it
    ("Take 3, 1/4 of them", F(1, 4)),                   # a comma ends a number: not 3 1/4
    ("3/4 of 12 is 9", F(9)),                           # the last answer wins, whatever its form
    ("answer 2, as 4/0 is undefined", F(2)),            # zero denominator: no answer
    ("x = 7/1", F(7)),
    ("It is 12.", F(12)),                               # a full stop is no decimal point
    ("0.1", F(1, 10)),                                  # exactly: not float's 0.1000000000000000055
    ("it is 2.3 now", F(23, 10)),
    ("-0.35", F(-7, 20)),
    ("2.50", F(5, 2)),
    ("3-4", F(-4)),                                     # - right before digits: a sign, as
    ("from 10-3/4", F(-3, 4)),                          #   data/scoring.py reads "3-4"
    ("7 - 3/4", F(3, 4)),                               # a - apart from the digits is no sign
    ("1  1/2", F(1, 2)),                                # two spaces: not a mixed number
    ("1\n1/2", F(1, 2)),                                # a line break: not a mixed number
    ("1 2/4", F(3, 2)),                                 # mixed, its fraction reduced
    ("$\\tfrac{3}{4}$", F(3, 4)),
    ("-\\tfrac{6}{8}", F(-3, 4)),
    ("5 then \\frac{1}{0}", F(5)),                      # zero denominator: look further left
    ("2 1/0", F(2)),
    ("1,250,000", F(1250000)),
    ("no numbers at all", None),
    ("", None),
]


@pytest.mark.parametrize("response, want", CASES, ids=[c[0][:30] or "empty" for c in CASES])
def test_cases(impl, response, want):
    got = impl.extract_fraction(response)
    assert got == want, f"{response!r}: got {got!r}, want {want!r}"
    assert got is None or isinstance(got, F), "a fractions.Fraction"


def test_agrees_with_data_scoring_on_plain_numbers(impl):
    """Words, whole numbers, negatives, "3-4" and decimals only: the same answer as extract_number,
    as an exact value."""
    rng = random.Random(0)
    words = ["so", "the", "answer", "is", "apples", "total", "=", "step", "x", "then"]
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(0, 8)):
            r = rng.random()
            parts.append(rng.choice(words) if r < 0.4 else str(rng.randint(-999, 999)) if r < 0.6
                         else f"{rng.randint(0, 99)}-{rng.randint(0, 99)}" if r < 0.7
                         else f"{rng.randint(-99, 99)}.{rng.randint(0, 10 ** rng.randint(1, 3))}")
        text = rng.choice([" ", ". ", "? "]).join(parts) + rng.choice(["", ".", "!"])
        want, got = extract_number(text), impl.extract_fraction(text)
        assert (got is None) == (want is None), f"{text!r}: {got} vs {want}"
        assert got is None or float(got) == want, f"{text!r}: {got} vs {want}"


@pytest.mark.parametrize("extracted, label, ok", [
    (F(1, 2), "2/4", True), (F(1, 2), "0.5", True), (F(1, 2), F(1, 2), True), (F(3), 3, True),
    (F(-3, 2), "-1 1/2", True), (F(5, 8), "\\frac{5}{8}", True), (F(1250), "1,250", True),
    (F(1, 3), "0.333", False), (F(3, 4), "4/3", False), (None, "1/2", False), (F(0), "0", True),
    (F(1, 10), "0.1", True), (F(3, 4), "\\tfrac{3}{4}", True), (F(-4), -4, True),
    (F(3, 2), "1 1/2", True), (F(1, 2), "1  1/2", True), (F(1, 2), "no answer here", False),
])
def test_is_correct(impl, extracted, label, ok):
    assert impl.is_correct(extracted, label) is ok


def test_score(impl):
    assert impl.score("so she has 2 1/2 left", "5/2") == (F(5, 2), True)
    assert impl.score("so she has 2 1/2 left", "2") == (F(5, 2), False)
    assert impl.score("I don't know", "1/2") == (None, False)
