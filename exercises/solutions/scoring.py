"""Reference solution of exercise 5 (fraction answers). Not in the students' copy:
exercises/handout.py leaves this folder out."""
import re
from fractions import Fraction

# one answer-like thing, tried in this order at each place: \frac{a}{b}, a mixed number, a/b, a
# decimal
_ANSWER = re.compile(r"""
      (?P<fsign>-?)\\[dt]?frac\{(?P<fnum>-?\d+)\}\{(?P<fden>-?\d+)\}
    | (?P<whole>-?\d+)\ (?P<mnum>\d+)/(?P<mden>\d+)
    | (?P<num>-?\d+)/(?P<den>\d+)
    | (?P<dec>-?\d+(?:\.\d+)?)
""", re.VERBOSE)


def _fraction(num, den):
    return Fraction(int(num), int(den)) if int(den) != 0 else None


def _answers(text):
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,250 -> 1250, while "1/2, 3/4" stays apart
    for m in _ANSWER.finditer(text):
        if m["fnum"] is not None:
            f = _fraction(m["fnum"], m["fden"])
            yield None if f is None else -f if m["fsign"] else f
        elif m["whole"] is not None:
            whole, part = int(m["whole"]), _fraction(m["mnum"], m["mden"])
            if part is not None and part < 1:  # a whole number and a proper fraction: mixed
                yield whole - part if m["whole"].startswith("-") else whole + part
            else:  # "2 4/3" or "2 1/0": two separate things
                yield Fraction(whole)
                yield part
        elif m["num"] is not None:
            yield _fraction(m["num"], m["den"])
        else:
            yield Fraction(m["dec"])


def extract_fraction(response):
    found = [f for f in _answers(response) if f is not None]
    return found[-1] if found else None


def is_correct(extracted, label):
    if extracted is None:
        return False
    want = label if isinstance(label, (int, Fraction)) else extract_fraction(str(label))
    return want is not None and Fraction(extracted) == want


def score(response, label):
    pred = extract_fraction(response)
    return pred, is_correct(pred, label)
