"""Answer extraction and scoring, as LLM-Adapters (Hu et al. 2023) defines them.

Reference: LLM-Adapters' evaluate.py (math) and commomsense_evaluate.py
(commonsense). The generated text scored here is the model's continuation
after the prompt (their ``output.split("### Response:")[1].strip()``).

Rules (default, ``strict=False``: identical to LLM-Adapters):

- "number" tasks (AddSub, MultiArith, SingleEq, gsm8k, mawps, SVAMP): delete
  every ",", take the LAST match of ``-?\\d+\\.?\\d*`` as a float.  Correct when
  ``abs(pred - float(label)) <= 0.001``.  Quirk kept: "3-4" reads as -4.
- "option" tasks (AQuA, mathqa): the FIRST match of ``A|B|C|D|E`` anywhere in
  the response, case-sensitive and with no word boundary -- so in
  "Answer: (C)" the "A" of "Answer" wins.  That is what produced the paper's
  AQuA numbers, so it is the default.  Correct when equal to the label.
- commonsense tasks: the FIRST match of the dataset's choice words, e.g.
  ``true|false`` for boolq, case-sensitive (LLM-Adapters does NOT lowercase:
  "True" is not an answer).  social_i_qa / ARC / openbookqa all use
  ``answer1|...|answer5`` as in the reference.  Correct when equal to the label.

Differences from the reference, on purpose: a response with no answer
extracts to ``None`` (they return ``float('inf')`` / ``""``; both score as
wrong either way), and dataset names are matched case-insensitively.

``strict=True`` is an optional, non-paper reading for analysis: choices must be
whole words (``\\b``), commonsense words match case-insensitively ("True" ->
"true"), and option letters must stand alone ("Answer: (C)" -> "C").
Numbers are read the same way in both modes.

Datasets not in ``ANSWER_TYPES`` (e.g. a folder given by path): pass
``answer_type="number" | "option" | [choice, ...]`` explicitly, or pass the test
set's labels to ``get_answer_type`` / ``infer_answer_type`` (all numeric ->
"number", all in A-E -> "option", all within one known choice list -> that
list).
"""

import os
import re

NUMBER = "number"
OPTION = "option"
TOLERANCE = 0.001
OPTION_LETTERS = ["A", "B", "C", "D", "E"]
_ANSWERS = ["answer1", "answer2", "answer3", "answer4", "answer5"]

MATH = ["AddSub", "MultiArith", "SingleEq", "gsm8k", "AQuA", "mawps", "SVAMP"]
COMMONSENSE = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande",
               "ARC-Easy", "ARC-Challenge", "openbookqa"]

# dataset name -> "number" | "option" | list of choice words (regex order = list order)
ANSWER_TYPES = {
    "AddSub": NUMBER, "MultiArith": NUMBER, "SingleEq": NUMBER, "gsm8k": NUMBER,
    "mawps": NUMBER, "SVAMP": NUMBER,
    "AQuA": OPTION,
    "mathqa": OPTION,  # not in the paper's tables; its test.json is in the release
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "social_i_qa": _ANSWERS,
    "ARC-Easy": _ANSWERS, "ARC-Challenge": _ANSWERS, "openbookqa": _ANSWERS,
    "hellaswag": ["ending1", "ending2", "ending3", "ending4"],
    "winogrande": ["option1", "option2"],
}

_NUMBER_RE = re.compile(r"-?\d+\.?\d*")
_LOWER = {k.lower(): k for k in ANSWER_TYPES}


def _check_answer_type(t):
    if t in (NUMBER, OPTION):
        return t
    if isinstance(t, (list, tuple)) and t and all(isinstance(c, str) and c for c in t):
        return list(t)
    raise ValueError(f"answer_type must be 'number', 'option' or a list of choice strings, "
                     f"got {t!r}")


def _is_number_label(label) -> bool:
    if isinstance(label, bool):
        return False
    if isinstance(label, (int, float)):
        return True
    return (isinstance(label, str)
            and _NUMBER_RE.fullmatch(label.replace(",", "").strip()) is not None)


def infer_answer_type(labels):
    """Guess the answer type from a test set's labels (see module docstring); ValueError if
    unclear."""
    labels = list(labels)
    if not labels:
        raise ValueError("cannot infer the answer type from an empty label list")
    if all(_is_number_label(x) for x in labels):
        return NUMBER
    if all(x in OPTION_LETTERS for x in labels):
        return OPTION
    for choices in ANSWER_TYPES.values():
        if isinstance(choices, list) and all(x in choices for x in labels):
            return list(choices)
    raise ValueError("cannot infer the answer type from labels like "
                     f"{sorted(set(map(str, labels)))[:8]}; "
                     "pass answer_type='number' | 'option' | [choices]")


def get_answer_type(dataset: str, answer_type=None, labels=None):
    """The answer type of a dataset: explicit ``answer_type``, else its name (or a path's last
    component, case-insensitive), else inferred from ``labels``."""
    if answer_type is not None:
        return _check_answer_type(answer_type)
    name = os.path.basename(str(dataset).rstrip("/\\"))
    key = name if name in ANSWER_TYPES else _LOWER.get(name.lower())
    if key is not None:
        return ANSWER_TYPES[key]
    if labels is not None:
        return infer_answer_type(labels)
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(ANSWER_TYPES)}. "
                     "For another dataset pass answer_type='number' | 'option' | [choices] "
                     "(or its labels).")


def extract_number(response: str):
    """LAST number in the response (commas removed) as a float, or None."""
    found = _NUMBER_RE.findall(response.replace(",", ""))
    return float(found[-1]) if found else None


def extract_choice(response: str, choices, strict: bool = False):
    """FIRST of ``choices`` found in the response, or None (see module docstring)."""
    pattern = "|".join(re.escape(c) for c in choices)
    if not strict:
        found = re.findall(pattern, response.strip())
        return found[0] if found else None
    letters = all(c in OPTION_LETTERS for c in choices)
    flags = 0 if letters else re.IGNORECASE
    m = re.search(rf"\b(?:{pattern})\b", response, flags)
    if m is None:
        return None
    canon = {c.lower(): c for c in choices}
    return canon[m.group(0).lower()]


def extract_answer(dataset: str, response: str, answer_type=None, strict: bool = False):
    """Answer in a generated response: float for number tasks, a choice string
    otherwise, None when nothing is found. ``answer_type`` overrides the dataset name."""
    t = get_answer_type(dataset, answer_type)
    if t == NUMBER:
        return extract_number(response)
    return extract_choice(response, OPTION_LETTERS if t == OPTION else t, strict)


def is_correct(dataset: str, extracted, label, answer_type=None) -> bool:
    """Whether an extracted answer matches the label (None is always wrong).
    Number tasks: |pred - label| <= 0.001, label read as a float after removing commas."""
    if extracted is None:
        return False
    if get_answer_type(dataset, answer_type) == NUMBER:
        return abs(float(extracted) - float(str(label).replace(",", ""))) <= TOLERANCE
    return extracted == label


def score(dataset: str, response: str, label, answer_type=None, strict: bool = False):
    """(extracted answer, correct?) for one response."""
    pred = extract_answer(dataset, response, answer_type, strict)
    return pred, is_correct(dataset, pred, label, answer_type)
