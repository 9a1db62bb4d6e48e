"""Exercise 5: answer extraction for a new dataset, one whose answers are fractions ("3/4", "1 1/2",
"\\frac{5}{8}").

data/scoring.py reads a math answer as LLM-Adapters does: the LAST number in the response,
"-?\\d+\\.?\\d*", as a float. On a fraction dataset that reads "3/4" as 4. Write the extraction for
it, in the same spirit (the last answer-like thing in the response wins), with exact arithmetic
(fractions.Fraction), following the rules of exercises/README.md (exercise 5). Then:

    python -m pytest exercises/scoring
"""
import re  # noqa: F401 (you will want it)
from fractions import Fraction  # noqa: F401


def extract_fraction(response):
    """The LAST answer in `response` as a Fraction (3/4, 1 1/2 -> 3/2, \\frac{5}{8}, 0.75 -> 3/4,
    1,250 -> 1250, negative signs), or None when there is none. A fraction with a zero denominator
    is no answer."""
    raise NotImplementedError("extract_fraction")  # TODO


def is_correct(extracted, label):
    """Exact comparison: 2/4 equals "1/2" and "0.5"; 0.333 does not equal 1/3. The label is a string
    in any of the forms extract_fraction reads, an int, or a Fraction. None (nothing extracted) is
    always wrong."""
    raise NotImplementedError("is_correct")  # TODO


def score(response, label):
    """(extracted answer, correct?) for one response, as data/scoring.py's score."""
    pred = extract_fraction(response)
    return pred, is_correct(pred, label)
