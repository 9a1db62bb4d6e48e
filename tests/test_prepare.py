"""data/prepare.py on fixtures (reading, validating, the leakage and duplicate checks, the copies
it writes and its command line), plus a smoke test on the real release."""

import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import prepare as P  # noqa: E402
from data.prepare import write_json  # noqa: E402
from data.scoring import extract_answer, is_correct  # noqa: E402

FIX = os.path.join(ROOT, "tests", "fixtures", "data")
RELEASE = os.path.join(FIX, "release")
BAD = os.path.join(FIX, "bad")
REAL = os.environ.get("LLM_ADAPTERS_DATA",
                      os.path.join(ROOT, "..", "shared", "data", "llm-adapters"))


# ---------------------------------------------------------------- validation
def test_load_rows_good():
    rows = P.load_rows(os.path.join(RELEASE, "dataset", "AddSub", "test.json"), P.TEST_REQUIRE)
    assert len(rows) == 3 and rows[2]["answer"] == "1,234"
    rows = P.load_rows(os.path.join(RELEASE, "ft-training_set", "math_data.json"), P.TRAIN_REQUIRE)
    assert len(rows) == 4 and rows[3]["input"] == "Good morning"


@pytest.mark.parametrize("file,require,needles", [
    ("not_json.json", ("instruction",), ["not valid JSON", "line"]),
    ("not_list.json", ("instruction",), ["expected a JSON list", "dict"]),
    ("missing_instruction.json", ("instruction",), ["row 2", "missing field 'instruction'"]),
    ("wrong_type.json", ("instruction", "output"),
     ["row 1", "'output'", "must be a string", "int"]),
    ("empty_instruction.json", ("instruction",), ["row 0", "'instruction' is empty"]),
    ("not_a_dict_row.json", ("instruction",), ["row 1", "expected a JSON object", "str"]),
    ("bad_answer.json", P.TEST_REQUIRE, ["row 1", "'answer'", "NoneType"]),
    ("missing_instruction.json", P.TEST_REQUIRE, ["row 0", "missing field 'answer'"]),
])
def test_load_rows_errors_name_file_row_field(file, require, needles):
    with pytest.raises(P.DataError) as e:
        P.load_rows(os.path.join(BAD, file), require)
    msg = str(e.value)
    assert file in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_validate_row_direct():
    assert P.validate_row({"instruction": "q", "answer": 3}, "f.json", 0, P.TEST_REQUIRE)
    with pytest.raises(P.DataError, match=r"f\.json: row 5: field 'input' must be a string"):
        P.validate_row({"instruction": "q", "input": ["x"]}, "f.json", 5)
    with pytest.raises(P.DataError,
                       match=r"row 0: field 'answer' must be a string or number, got bool"):
        P.validate_row({"instruction": "q", "answer": True}, "f.json", 0)
    with pytest.raises(P.DataError, match="'answer' is empty"):
        P.validate_row({"instruction": "q", "answer": " "}, "f.json", 0, P.TEST_REQUIRE)
    with pytest.raises(FileNotFoundError):
        P.load_rows(os.path.join(BAD, "no_such_file.json"))


# ---------------------------------------------------------------- find / leakage / prepare
def test_find_datasets():
    found = P.find_datasets(RELEASE)
    assert sorted(found["test"]) == ["AQuA", "AddSub", "boolq"]
    assert sorted(found["train"]) == ["math_data"]
    assert [os.path.basename(p) for p in found["ignored"]] == ["AQuA.json"]
    for name in ["SVAMP", "hellaswag", "ARC-Challenge", "math_10k", "commonsense_170k", "gsm8k"]:
        assert name in found["missing"]
    assert "AddSub" not in found["missing"]
    with pytest.raises(FileNotFoundError):
        P.find_datasets(BAD)


def test_leakage_exact_and_normalized():
    train = P.load_rows(os.path.join(RELEASE, "ft-training_set", "math_data.json"))
    tests = {"AddSub": P.load_rows(os.path.join(RELEASE, "dataset", "AddSub", "test.json")),
             "boolq": P.load_rows(os.path.join(RELEASE, "dataset", "boolq", "test.json"))}
    counts = P.leakage(train, tests)
    # row 0 is copied verbatim; row 1 differs only in whitespace (double space, newline, trailing)
    assert counts["AddSub"] == {"exact": 1, "normalized": 2, "total": 3}
    assert counts["boolq"] == {"exact": 0, "normalized": 0, "total": 2}
    assert P.normalize("  a \n b\t c ") == "a b c"


def test_prepare_writes_validated_copies(tmp_path, capsys):
    out = tmp_path / "out"
    assert P.main(["--from", RELEASE, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "AddSub" in text and "missing" in text and "SVAMP" in text
    assert ("WARNING leakage: math_data contains 1 exact / 2 whitespace-normalised of 3 AddSub"
            in text)
    for name in ["AQuA", "AddSub", "boolq"]:
        src = json.load(open(os.path.join(RELEASE, "dataset", name, "test.json"), encoding="utf-8"))
        assert P.load_rows(out / name / "test.json", P.TEST_REQUIRE) == src
    assert len(P.load_rows(out / "train" / "math_data.json", P.TRAIN_REQUIRE)) == 4
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]   # no temp files left
    report = P.prepare(RELEASE, None, verbose=False)
    assert (report["test"] == {"AQuA": 1, "AddSub": 3, "boolq": 2}
            and report["train"] == {"math_data": 4})
    assert report["leakage"] == {"math_data": {"AddSub": {"exact": 1, "normalized": 2, "total": 3}}}


def test_prepare_reports_bad_file(tmp_path, capsys):
    root = tmp_path / "release"
    shutil.copytree(RELEASE, root)
    shutil.copy(os.path.join(BAD, "bad_answer.json"), root / "dataset" / "boolq" / "test.json")
    out = tmp_path / "out"
    assert P.main(["--from", str(root), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert ("ERROR" in text and os.path.join("boolq", "test.json") in text
            and "row 1: field 'answer'" in text)
    assert (out / "AddSub" / "test.json").exists() and not (out / "boolq").exists()


def test_write_json_atomic_replaces(tmp_path):
    path = tmp_path / "a" / "x.json"
    P.write_json(path, [{"instruction": "old"}])
    P.write_json(path, [{"instruction": "new é"}])
    assert json.load(open(path, encoding="utf-8")) == [{"instruction": "new é"}]
    assert os.listdir(tmp_path / "a") == ["x.json"]


# ------------------------------------------------------------ the real release (skipped without it)
REAL_TEST_ROWS = {"AQuA": 254, "ARC-Easy": 2376, "AddSub": 395, "MultiArith": 600, "SingleEq": 508,
                  "boolq": 3270, "gsm8k": 1319, "mathqa": 2985, "mawps": 238, "openbookqa": 500,
                  "piqa": 1838, "social_i_qa": 1954, "winogrande": 1267}


@pytest.mark.skipif(not os.path.isdir(REAL), reason=f"no LLM-Adapters release at {REAL}")
def test_real_release_validates():
    report = P.prepare(REAL, None, verbose=True)   # shown with pytest -s
    assert report["errors"] == []
    assert report["test"] == REAL_TEST_ROWS
    assert report["train"]["math_data"] == 3260
    for name in ["SVAMP", "hellaswag", "ARC-Challenge", "math_10k", "commonsense_170k"]:
        assert name in report["missing"]
    # math_data.json holds ~80% of five math test sets (known leakage)
    leak = report["leakage"]["math_data"]
    assert {k: (v["exact"], v["normalized"]) for k, v in leak.items()} == {
        "AQuA": (203, 203), "AddSub": (316, 316), "MultiArith": (491, 491),
        "SingleEq": (406, 406), "gsm8k": (1055, 1055), "mawps": (0, 54)}


@pytest.mark.skipif(not os.path.isdir(REAL), reason=f"no LLM-Adapters release at {REAL}")
def test_real_commonsense_gold_outputs_score_correct():
    # the released commonsense outputs read "the correct answer is answerN": all must score correct
    for name in ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "openbookqa"]:
        rows = P.load_rows(os.path.join(REAL, "dataset", name, "test.json"), P.TEST_REQUIRE)
        assert all(is_correct(name, extract_answer(name, r["output"]), r["answer"])
                   for r in rows), name


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
def test_prepare_reports_duplicates_and_conflicts(tmp_path):
    rows = [{"instruction": f"q{i}", "answer": str(i)} for i in range(4)]
    dataset = tmp_path / "release" / "dataset" / "AddSub"
    write_json(dataset / "test.json", rows + [rows[1], {"instruction": "q2", "answer": "7"}])
    report = P.prepare(tmp_path / "release", verbose=False)
    assert report["duplicates"] == [f"{dataset / 'test.json'}: 1 rows repeat an earlier row "
                                    "exactly (rows 4); 1 rows ask an earlier question with another "
                                    "answer (rows 5)"]
    assert report["test"]["AddSub"] == 6  # reported, kept


def test_prepare_command_line_errors(tmp_path, capsys):
    assert P.main(["--from", str(tmp_path / "nothing")]) == 2
    assert "prepare.py: error: --from=" in capsys.readouterr().err
    (tmp_path / "release" / "dataset").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    assert P.main(["--from", str(tmp_path / "release"), "--out", str(tmp_path / "file")]) == 2
    assert "--out=" in capsys.readouterr().err


def test_prepare_never_writes_into_the_release_and_asks_before_writing_over(tmp_path, capsys):
    release = tmp_path / "release"
    write_json(release / "dataset" / "AddSub" / "test.json", [{"instruction": "q", "answer": "1"}])
    released = (release / "dataset" / "AddSub" / "test.json").read_bytes()
    for out in (release / "dataset", release):
        assert P.main(["--from", str(release), "--out", str(out), "--overwrite"]) == 2
        assert "lies in or holds --from=" in capsys.readouterr().err
    assert (release / "dataset" / "AddSub" / "test.json").read_bytes() == released
    assert P.main(["--from", str(release), "--out", str(tmp_path / "out")]) == 0
    assert P.main(["--from", str(release), "--out", str(tmp_path / "out")]) == 2
    assert "already holds AddSub: replace them with --overwrite" in capsys.readouterr().err
    assert P.main(["--from", str(release), "--out", str(tmp_path / "out"),
                         "--overwrite"]) == 0
    # the refusal's own spelling works too; =false still refuses
    assert P.main(["--from", str(release), "--out", str(tmp_path / "out"),
                   "--overwrite=false"]) == 2
    assert P.main(["--from", str(release), "--out", str(tmp_path / "out"),
                   "--overwrite=true"]) == 0
