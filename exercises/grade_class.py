"""Grade a class: every student's files, each exercise in a pytest run of its own.

    python exercises/grade_class.py SUBMISSIONS_DIR [--out grades.csv] [--timeout 300]
                                    [--exercises lora,scoring] [--jobs 2]

SUBMISSIONS_DIR holds one folder per student, named for the student, with the files they hand in
under the names of the exercises: lora.py, vera.py, placement.py, rope_kv.py, scoring.py (any of
them; a missing one scores 0). Each file is graded as `EXERCISE_IMPL=<student folder> python -m
pytest exercises/<exercise>` would grade it, in a subprocess of its own that --timeout ends.

Points (POINTS, also in exercises/README.md): an exercise's points are shared equally by its
grading tests that ran; a test that skips here (PEFT parity without peft) counts for no one. A file
that breaks a rule (exercises/README.md, "Rules"), does not parse or load, or runs past --timeout
scores 0 for that exercise, with the reason; the other exercises are graded all the same.

--out writes a CSV: a row per student, exercise and grading test (outcome, points, the failure's
first line), a row per student and exercise with test "TOTAL" (points, and the reason when 0), and
a row per student with exercise "ALL". The summary on stdout: points per student and exercise.
"""
import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from grading import EXERCISES, Refused, check_source  # noqa: E402

POINTS = {"lora": 20, "vera": 25, "placement": 15, "rope_kv": 25, "scoring": 15}
FIELDS = ["student", "exercise", "test", "outcome", "points", "max_points", "reason"]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the flag and what is wrong with it
        print(f"grade_class.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    args = parse(argv)
    students = sorted(p for p in args.submissions.iterdir()
                      if p.is_dir() and not p.name.startswith("."))
    jobs = [(s, ex) for s in students for ex in args.exercises]
    with ThreadPoolExecutor(args.jobs) as pool:
        graded = list(pool.map(lambda job: grade_safely(*job, args.timeout), jobs))
    rows = [row for g in graded for row in g] + totals(students, graded, args.exercises)
    print(summary(students, rows, args.exercises))  # first: a CSV that cannot be written loses none
    if args.out:
        try:
            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                writer.writeheader()
                writer.writerows(rows)
        except OSError as e:
            Parser().error(f"--out {args.out}: {e.strerror}")
        print(f"\n{len(rows)} rows written to {args.out}")


def parse(argv):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("submissions", type=Path, metavar="SUBMISSIONS_DIR")
    p.add_argument("--out", type=Path, help="the CSV to write")
    p.add_argument("--timeout", type=float, default=300, help="seconds per student and exercise")
    p.add_argument("--exercises", default=",".join(EXERCISES), help="which, comma separated")
    p.add_argument("--jobs", type=int, default=1, help="pytest runs at once")
    args = p.parse_args(argv)
    if not args.submissions.is_dir():
        p.error(f"SUBMISSIONS_DIR {args.submissions}: no such folder")
    if not any(s.is_dir() and not s.name.startswith(".") for s in args.submissions.iterdir()):
        loose = sorted(f.name for f in args.submissions.glob("*.py"))
        p.error(f"SUBMISSIONS_DIR {args.submissions} holds no student folders"
                + (f" (it holds {', '.join(loose)}: one student's files? use the folder above)"
                   if loose else ""))
    args.exercises = [e.strip() for e in args.exercises.split(",") if e.strip()]
    unknown = [e for e in args.exercises if e not in EXERCISES]
    if unknown or not args.exercises:
        p.error(f"--exercises: unknown {unknown or 'none given'}; known: {', '.join(EXERCISES)}")
    if args.timeout <= 0 or args.jobs < 1:
        p.error("--timeout must be more than 0 and --jobs at least 1")
    if args.out and not args.out.parent.resolve().is_dir():
        p.error(f"--out {args.out}: no folder {args.out.parent}")
    if args.out and not os.access(args.out.parent.resolve(), os.W_OK):
        p.error(f"--out {args.out}: {args.out.parent} is not writable")
    return args


def grade_safely(student_dir, exercise, timeout):
    """grade(), and 0 with the reason for whatever it did not foresee: one student's file must not
    stop the grading of the class."""
    try:
        return grade(student_dir, exercise, timeout)
    except Exception as e:
        return [dict(student=student_dir.name, exercise=exercise, test="TOTAL",
                     outcome="not graded", points=0, max_points=POINTS[exercise],
                     reason=f"grade_class.py could not grade it: {type(e).__name__}: {e}")]


def grade(student_dir, exercise, timeout):
    """The rows of one student's exercise: one per grading test, then its TOTAL row."""
    student, path = student_dir.name, student_dir / f"{exercise}.py"
    total = dict(student=student, exercise=exercise, test="TOTAL", max_points=POINTS[exercise])
    if not path.exists():
        return [dict(total, outcome="missing", points=0, reason=f"no {path.name} handed in")]
    try:
        check_source(exercise, path.read_text(encoding="utf-8"), f"{student}/{path.name}")
    except UnicodeDecodeError:
        return [dict(total, outcome="refused", points=0,
                     reason=f"{student}/{path.name}: not UTF-8 text")]
    except Refused as e:
        return [dict(total, outcome="refused", points=0, reason=one_line(e))]
    tests, failure = run_grader(student_dir.resolve(), exercise, timeout)
    if failure:
        return [dict(total, outcome="not graded", points=0, reason=failure)]
    ran = [t for t in tests if t["outcome"] != "skipped"]
    share = POINTS[exercise] / len(ran) if ran else 0
    rows = [dict(student=student, exercise=exercise, max_points=round(share, 4),
                 points=round(share, 4) if t["outcome"] == "passed" else 0, **t) for t in tests]
    passed = sum(t["outcome"] == "passed" for t in ran)
    messages = {t["reason"] for t in ran if t["outcome"] == "failed"}
    reason = "" if passed else messages.pop() if len(messages) == 1 else "every grading test failed"
    return rows + [dict(total, outcome=f"{passed}/{len(ran)} passed",
                        points=round(share * passed, 2), reason=reason)]


def run_grader(student_dir, exercise, timeout):
    """([{test, outcome, reason}], None), or (None, why no result came back)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml, log = Path(tmp) / "report.xml", Path(tmp) / "output.txt"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}", f"exercises/{exercise}"]
        env = {**os.environ, "EXERCISE_IMPL": str(student_dir), "PYTHONDONTWRITEBYTECODE": "1"}
        with open(log, "w") as out:  # a file, not a pipe: a chatty submission cannot fill memory
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its whole group: pytest and what it started
                proc.wait()
                return None, f"ran past --timeout={timeout:g} s (an endless loop?)"
        tests = read_report(xml)
        if not tests:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            return None, (f"the grader ended without a report (exit {proc.returncode})"
                          + "".join(f": {line[:200]}" for line in tail))
        return tests, None


def read_report(xml):
    """The tests of pytest's JUnit XML; [] when there is none to read (the run died, or the graded
    code wrote over it)."""
    try:
        cases = list(ET.parse(xml).iter("testcase"))
    except (OSError, ET.ParseError):
        return []
    tests = []
    for case in cases:
        bad = [c for c in case if c.tag in ("failure", "error")]
        skipped = any(c.tag == "skipped" for c in case)
        outcome = "failed" if bad else "skipped" if skipped else "passed"
        tests.append(dict(test=case.get("name"), outcome=outcome,
                          reason=one_line(bad[0].get("message", "")) if bad else ""))
    return tests


def one_line(message):
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def totals(students, graded, exercises):
    """A row per student with exercise "ALL": the sum of the exercises' TOTAL rows."""
    points = {}
    for rows in graded:
        for r in rows:
            if r["test"] == "TOTAL":
                points[r["student"]] = points.get(r["student"], 0) + r["points"]
    most = sum(POINTS[e] for e in exercises)
    return [dict(student=s.name, exercise="ALL", test="TOTAL", outcome="", reason="",
                 points=round(points.get(s.name, 0), 2), max_points=most) for s in students]


def summary(students, rows, exercises):
    total = {(r["student"], r["exercise"]): r for r in rows if r["test"] == "TOTAL"}
    width = max([7, *(len(s.name) for s in students)])
    lines = [f"{'student':{width}} " + " ".join(f"{e:>9}" for e in exercises) + f" {'total':>9}",
             f"{'(points)':{width}} " + " ".join(f"{POINTS[e]:>9}" for e in exercises)
             + f" {sum(POINTS[e] for e in exercises):>9}"]
    for s in students:
        cells = [total[s.name, e]["points"] for e in [*exercises, "ALL"]]
        lines.append(f"{s.name:{width}} " + " ".join(f"{c:>9g}" for c in cells))
    zeros = [f"  {s.name}/{e}: {total[s.name, e]['reason']}" for s in students for e in exercises
             if total[s.name, e]["points"] == 0 and total[s.name, e]["reason"]]
    return "\n".join(lines + (["", "why 0:", *zeros] if zeros else []))


if __name__ == "__main__":
    main()
