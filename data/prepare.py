"""LLM-Adapters' released datasets -> validated copies in the project's data folder.

    python data/prepare.py --from ../shared/data/llm-adapters [--out data/out] [--overwrite]

Reads ``<root>/dataset/<name>/test.json`` (test sets), ``<root>/dataset/<name>/train.json``
(per-task training splits, where released) and ``<root>/ft-training_set/*.json``
(fine-tuning sets: math_data.json, math_10k.json, commonsense_170k.json, ...).
Every row is checked (``validate_row``); errors name the file, the row index and
the field. Valid files are copied atomically to ``<out>/<name>/test.json`` and
``<out>/train/<file>.json`` (per-task splits as ``<out>/train/<name>_train.json``); an ``--out``
that already holds files needs ``--overwrite``, one inside ``--from`` is refused.
Other JSON files in a task folder (AQuA.json, addsub_1.json, mawps/trainset.json, ...)
are the original datasets in other formats; they are listed as ignored.

It then prints which of the paper's sets are missing, and a leakage table: how
many test questions (``instruction``) also occur in each training file, exactly
and after whitespace normalisation.

Reused by train.py / eval.py: ``load_rows(path, require=...)`` returns the
validated rows of one file (eval: ``require=TEST_REQUIRE``; train: ``TRAIN_REQUIRE``).
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from files import check_outside, check_unused, check_writable, write_atomic  # noqa: E402
from data.scoring import COMMONSENSE, MATH  # noqa: E402

PAPER_TEST_SETS = MATH + COMMONSENSE
PAPER_TRAIN_SETS = ["math_10k", "math_50k", "commonsense_170k"]
TEST_REQUIRE = ("instruction", "answer")
TRAIN_REQUIRE = ("instruction", "output")


class DataError(ValueError):
    """A data file or row is malformed; the message names the file (and row, field)."""


def validate_row(row, path, i, require=("instruction",)):
    """Check one row; return it, or raise DataError naming ``path``, row ``i`` and the field.

    Rules: a dict; every field in ``require`` present; ``instruction`` a non-empty
    str; ``input`` / ``output`` str when present; ``answer`` a str or number when
    present (a non-empty str when required)."""
    where = f"{path}: row {i}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in require:
        if field not in row:
            raise DataError(f"{where}: missing field '{field}' "
                            f"(has: {', '.join(row) or 'nothing'})")
    for field in ("instruction", "input", "output"):
        if field in row and not isinstance(row[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, "
                            f"got {type(row[field]).__name__}")
    if "instruction" in row and not row["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    if "answer" in row:
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: field 'answer' must be a string or number, "
                            f"got {type(answer).__name__}")
        if "answer" in require and isinstance(answer, str) and not answer.strip():
            raise DataError(f"{where}: field 'answer' is empty")
    return row


def load_rows(path, require=("instruction",)) -> list:
    """The rows of a JSON list-of-dicts file, each validated; DataError otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON "
                        f"({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{path}: the list of rows is empty")
    for i, row in enumerate(rows):
        validate_row(row, path, i, require)
    return rows


def find_datasets(root) -> dict:
    """Locate the files under a release folder.

    Returns {"test": {name: path}, "train": {name: path}, "missing": [names], "ignored": [paths]}
    where train names are the file stems of ft-training_set/*.json and "<task>_train"
    for dataset/<task>/train.json; "missing" lists the paper's sets not found."""
    dataset_dir = os.path.join(root, "dataset")
    ft_dir = os.path.join(root, "ft-training_set")
    if not (os.path.isdir(dataset_dir) or os.path.isdir(ft_dir)):
        raise FileNotFoundError(f"{root}: has neither dataset/ nor ft-training_set/")
    test, train, ignored = {}, {}, []
    for task_dir in sorted(glob.glob(os.path.join(dataset_dir, "*", ""))):
        name = os.path.basename(os.path.dirname(task_dir))
        for path in sorted(glob.glob(os.path.join(task_dir, "*.json"))):
            file = os.path.basename(path)
            if file == "test.json":
                test[name] = path
            elif file == "train.json":
                train[f"{name}_train"] = path
            else:
                ignored.append(path)
    for path in sorted(glob.glob(os.path.join(ft_dir, "*.json"))):
        train[os.path.splitext(os.path.basename(path))[0]] = path
    missing = ([n for n in PAPER_TEST_SETS if n not in test]
               + [n for n in PAPER_TRAIN_SETS if n not in train])
    return {"test": test, "train": train, "missing": missing, "ignored": ignored}


def normalize(text: str) -> str:
    """Whitespace-normalised text: runs of whitespace -> one space, ends stripped."""
    return " ".join(text.split())


def leakage(train_rows, test_sets) -> dict:
    """How many rows of each test set have an ``instruction`` that also occurs in training.

    test_sets: {name: rows}. Returns {name: {"exact": n, "normalized": m, "total": rows}};
    "normalized" compares whitespace-normalised text, so it counts the exact ones too."""
    exact = {r["instruction"] for r in train_rows}
    norm = {normalize(r["instruction"]) for r in train_rows}
    return {name: {"exact": sum(r["instruction"] in exact for r in rows),
                   "normalized": sum(normalize(r["instruction"]) in norm for r in rows),
                   "total": len(rows)}
            for name, rows in test_sets.items()}


def duplicates(rows, answer="answer"):
    """Rows that repeat an earlier row exactly, and rows that ask an earlier row's question
    (instruction and input) with another ``answer`` field: two lists of row indices."""
    first_row, first_question, repeated, conflicting = {}, {}, [], []
    for i, row in enumerate(rows):
        key = json.dumps(row, sort_keys=True)
        question = (row["instruction"], row.get("input") or "")
        if key in first_row:
            repeated.append(i)
        elif question in first_question:
            if rows[first_question[question]].get(answer) != row.get(answer):
                conflicting.append(i)
        first_row.setdefault(key, i)
        first_question.setdefault(question, i)
    return repeated, conflicting


def describe_duplicates(path, rows, answer="answer"):
    """One line on the duplicates of a file (row indices as in the file), or None."""
    repeated, conflicting = duplicates(rows, answer)

    def listed(idx):
        return ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")
    parts = []
    if repeated:
        parts.append(f"{len(repeated)} rows repeat an earlier row exactly "
                     f"(rows {listed(repeated)})")
    if conflicting:
        parts.append(f"{len(conflicting)} rows ask an earlier question with another {answer} "
                     f"(rows {listed(conflicting)})")
    return f"{path}: {'; '.join(parts)}" if parts else None


def dedupe(rows):
    """The rows without exact repeats (the first of each kept, in order), and how many went."""
    repeated = set(duplicates(rows, "output")[0])
    return [r for i, r in enumerate(rows) if i not in repeated], len(repeated)


def write_json(path, rows):
    """Write rows to path atomically (files.write_atomic: temporary file, then renamed)."""
    write_atomic(path, json.dumps(rows, ensure_ascii=False, indent=1))


def prepare(root, out=None, verbose=True) -> dict:
    """Validate (and, when ``out`` is given, copy) every set; return a report:
    {"test": {name: rows}, "train": {name: rows}, "missing", "ignored",
     "errors": [messages], "duplicates": [messages],
     "leakage": {train name: {test name: counts}}} (nonzero only)."""
    say = print if verbose else (lambda *a, **k: None)
    found = find_datasets(root)
    report = {"test": {}, "train": {}, "missing": found["missing"], "ignored": found["ignored"],
              "errors": [], "duplicates": [], "leakage": {}}
    loaded = {"test": {}, "train": {}}
    for split, require in (("test", TEST_REQUIRE), ("train", TRAIN_REQUIRE)):
        for name, path in found[split].items():
            try:
                rows = load_rows(path, require)
            except DataError as e:
                report["errors"].append(str(e))
                continue
            loaded[split][name] = rows
            report[split][name] = len(rows)
            dup = describe_duplicates(path, rows, "answer" if split == "test" else "output")
            if dup:  # reported, not removed: the released test sets stay as the paper scored them
                report["duplicates"].append(dup)
            if out is not None:
                dest = (os.path.join(out, name, "test.json") if split == "test"
                        else os.path.join(out, "train", f"{name}.json"))
                write_json(dest, rows)
    for name, rows in loaded["train"].items():
        hits = {t: c for t, c in leakage(rows, loaded["test"]).items() if c["normalized"]}
        if hits:
            report["leakage"][name] = hits

    say(f"{'set':<20} {'split':<6} {'rows':>7}  source")
    for split in ("test", "train"):
        for name, n in report[split].items():
            say(f"{name:<20} {split:<6} {n:>7}  {os.path.relpath(found[split][name], root)}")
    for name in report["missing"]:
        say(f"{name:<20} {'-':<6} {'missing':>7}  (in the paper, not in {root})")
    if report["ignored"]:
        say(f"ignored (original-format files): "
            f"{', '.join(os.path.relpath(p, root) for p in report['ignored'])}")
    for msg in report["errors"]:
        say(f"ERROR {msg}")
    for msg in report["duplicates"]:
        say(f"WARNING duplicates: {msg}")
    for train_name, hits in report["leakage"].items():
        for test_name, c in hits.items():
            say(f"WARNING leakage: {train_name} contains {c['exact']} exact / {c['normalized']} "
                f"whitespace-normalised of {c['total']} {test_name} test questions")
    if out is not None:
        say(f"wrote {len(report['test'])} test sets and {len(report['train'])} training files "
            f"to {out}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="root", required=True,
                        help="release folder (has dataset/, ft-training_set/)")
    parser.add_argument("--out", default="data/out", help="output folder (default: data/out)")
    parser.add_argument("--check", action="store_true",
                        help="validate and report only; write nothing")
    # --overwrite, or --overwrite=true as every other script (and the refusal) spells it
    parser.add_argument("--overwrite", nargs="?", const="true", default="false",
                        choices=("true", "false"),
                        help="write over what an earlier run left in --out (else it is refused)")
    args = parser.parse_args(argv)
    try:
        if not os.path.isdir(args.root):
            raise FileNotFoundError(f"--from={args.root}: no such folder (the LLM-Adapters "
                                    "release, with dataset/ and ft-training_set/)")
        if not args.check:  # the release is read as it is: never written over
            check_outside(args.out, "--out", {"--from": args.root})
            check_writable(args.out, "--out")
            check_unused(args.out, "--out", args.overwrite == "true")
        report = prepare(args.root, None if args.check else args.out)
    except (OSError, ValueError) as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
