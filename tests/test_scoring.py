"""Answer extraction / scoring as LLM-Adapters defines it (data/scoring.py)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.scoring import (COMMONSENSE, ANSWER_TYPES, MATH, NUMBER, OPTION,  # noqa: E402
                          extract_answer, get_answer_type, infer_answer_type, is_correct, score)

NUMERIC = ["AddSub", "MultiArith", "SingleEq", "gsm8k", "mawps", "SVAMP"]


def test_groups_and_answer_types():
    assert MATH == ["AddSub", "MultiArith", "SingleEq", "gsm8k", "AQuA", "mawps", "SVAMP"]
    assert COMMONSENSE == ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande",
                           "ARC-Easy", "ARC-Challenge", "openbookqa"]
    for name in MATH + COMMONSENSE + ["mathqa"]:
        assert name in ANSWER_TYPES
    assert all(ANSWER_TYPES[n] == NUMBER for n in NUMERIC)
    assert ANSWER_TYPES["AQuA"] == OPTION and ANSWER_TYPES["mathqa"] == OPTION
    assert ANSWER_TYPES["boolq"] == ["true", "false"]
    # as the reference regex
    assert ANSWER_TYPES["social_i_qa"] == [f"answer{i}" for i in range(1, 6)]


# ---- numbers: remove commas, LAST match of -?\d+\.?\d*, |pred - label| <= 0.001
@pytest.mark.parametrize("dataset", NUMERIC)
@pytest.mark.parametrize("response,expected", [
    ("The answer is 1,234.5.", 1234.5),
    ("The answer is -7", -7.0),
    ("It dropped to -3.25 degrees.", -3.25),
    ("3 apples and 4 pears, so 7", 7.0),
    ("The answer is 12.", 12.0),
    ("12", 12.0),
    ("Total: 1,000,000 dollars", 1000000.0),
    ("0.5 of 10 is 5.0", 5.0),
    ("3-4", -4.0),  # reference quirk: the '-' is read as a sign
])
def test_extract_number(dataset, response, expected):
    assert extract_answer(dataset, response) == expected


@pytest.mark.parametrize("dataset", NUMERIC)
def test_no_number_is_none_and_wrong(dataset):
    assert extract_answer(dataset, "I do not know.") is None
    assert extract_answer(dataset, "") is None
    assert is_correct(dataset, None, "4") is False
    assert score(dataset, "no idea", "0") == (None, False)


def test_number_tolerance_and_labels():
    assert is_correct("gsm8k", 4.0005, "4")
    assert is_correct("gsm8k", 3.9995, "4.0")
    assert is_correct("gsm8k", 1.001, "1")       # boundary: <= 0.001 (in float arithmetic,
    assert not is_correct("gsm8k", 4.0011, "4")  # as in the reference: no extra epsilon)
    assert not is_correct("gsm8k", 4.002, "4")
    assert is_correct("AddSub", 1000.0, "1,000")  # commas removed from the label
    assert is_correct("MultiArith", 15.0, "15.0")
    assert is_correct("mawps", 1.8333, "1.8333333333333335")
    assert is_correct("SVAMP", -2.0, -2)          # numeric labels work too
    assert score("AddSub", "1,000 + 234 = 1,234. The answer is 1,234.", "1,234") == (1234.0, True)
    assert score("SingleEq", "The answer is 5 apples, not 6", "5") == (6.0, False)


# ---- AQuA: FIRST A-E anywhere (reference regex 'A|B|C|D|E', case-sensitive, no word boundary)
def test_aqua_paper_rule():
    assert extract_answer("AQuA", "(C) because B is too small") == "C"
    assert extract_answer("AQuA", "The answer is (D).") == "D"
    assert extract_answer("AQuA", "the answer is c") is None        # case-sensitive
    assert extract_answer("AQuA", "") is None
    # reference quirk: the 'A' of 'Answer' is the first match
    assert extract_answer("AQuA", "Answer: (C) because B...") == "A"
    assert score("AQuA", "(E)", "E") == ("E", True)
    assert score("AQuA", "(E)", "A") == ("E", False)
    assert extract_answer("mathqa", "so it is B ) 27.675") == "B"


def test_aqua_strict_rule():
    assert extract_answer("AQuA", "Answer: (C) because B...", strict=True) == "C"
    assert extract_answer("AQuA", "Dividing gives 4, so B.", strict=True) == "B"
    assert extract_answer("AQuA", "no letter here", strict=True) is None


# ---- commonsense: FIRST choice word, case-sensitive as the reference
@pytest.mark.parametrize("dataset,response,expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false, although true in some cases", "false"),
    ("boolq", "True", None),                       # reference does not lowercase
    ("boolq", "the correct answer is True or false", "false"),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "Solution1", None),
    ("social_i_qa", "answer2 ... answer1", "answer2"),
    ("social_i_qa", "the correct answer is answer4", "answer4"),  # reference regex allows 1..5
    ("ARC-Easy", "answer5", "answer5"),
    ("ARC-Challenge", "the correct answer is answer3.", "answer3"),
    ("openbookqa", "I think answer1", "answer1"),
    ("hellaswag", "ending4 then ending1", "ending4"),
    ("winogrande", "the correct answer is option2", "option2"),
    ("winogrande", "no idea", None),
])
def test_commonsense_extract(dataset, response, expected):
    assert extract_answer(dataset, response) == expected


def test_commonsense_correct():
    assert score("boolq", "the correct answer is true", "true") == ("true", True)
    assert score("boolq", "True", "true") == (None, False)
    assert score("social_i_qa", "answer2 ... answer1", "answer1") == ("answer2", False)
    assert score("winogrande", "option1", "option1") == ("option1", True)


def test_commonsense_strict():
    assert extract_answer("boolq", "True", strict=True) == "true"
    assert extract_answer("piqa", "Solution2 is better", strict=True) == "solution2"
    assert extract_answer("boolq", "untrue", strict=True) is None
    assert extract_answer("boolq", "untrue") == "true"   # reference: no word boundary


# ---- dataset names and answer types
def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError) as e:
        extract_answer("nope", "42")
    assert "nope" in str(e.value) and "gsm8k" in str(e.value) and "winogrande" in str(e.value)


def test_names_paths_and_explicit_answer_type():
    assert get_answer_type("GSM8K") == NUMBER and get_answer_type("aqua") == OPTION
    assert get_answer_type("data/out/ARC-Easy/") == ANSWER_TYPES["ARC-Easy"]
    assert extract_answer("my_set", "so 41, then 42", answer_type="number") == 42.0
    assert extract_answer("my_set", "(B)", answer_type="option") == "B"
    assert extract_answer("my_set", "yes or no: no", answer_type=["yes", "no"]) == "yes"
    assert is_correct("my_set", 42.0, "42", answer_type="number")
    with pytest.raises(ValueError):
        get_answer_type("my_set", answer_type="letters")


def test_infer_answer_type_from_labels():
    assert infer_answer_type(["4", "1,000", "15.0", 3]) == NUMBER
    assert infer_answer_type(["A", "E", "C"]) == OPTION
    assert infer_answer_type(["answer1", "answer4"]) == ANSWER_TYPES["ARC-Easy"]
    assert infer_answer_type(["option2", "option1"]) == ["option1", "option2"]
    assert get_answer_type("folder/unknown", labels=["true", "false"]) == ["true", "false"]
    with pytest.raises(ValueError):
        infer_answer_type(["maybe", "perhaps"])
    with pytest.raises(ValueError):
        infer_answer_type([])
