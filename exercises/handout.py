"""Build the students' copy of the repository.

    python exercises/handout.py OUT_DIR

OUT_DIR (new, or an empty folder) receives the files git tracks in this working tree, as they are
in it, less WITHHELD: exercises/solutions/, the reference solutions and the planted bugs that
quote them. It becomes a fresh git repository with one commit, so no history in it holds the
solutions (deleting the folder in this repository would leave them in its history). Before it
writes anything it checks that no file it copies quotes a line of the reference solutions that
neither the project's code nor a stub holds.

In the copy, the graders run on the stubs as they do here; EXERCISE_IMPL=solution and the parts of
tests/test_exercises.py that need the solutions skip.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WITHHELD = ("exercises/solutions/",)
SOLUTIONS = ROOT / "exercises" / "solutions"
# the course material, where a quoted reference line would be a leak (the rest is the project)
COURSE = ("exercises/", "tests/test_exercises.py")
SHORTEST = 30  # a shorter line (`return y`, `import torch`) says nothing of the solution


def fail(message):
    print(f"handout.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        fail("expected one argument, OUT_DIR (python exercises/handout.py OUT_DIR)")
    out = Path(argv[0])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"OUT_DIR {out} exists and is not an empty folder")
    files = handed_out(tracked())
    leaks = quoted_reference(files)
    if leaks:
        fail(f"{leaks[0][0]} quotes the reference solution: {leaks[0][1]!r}")
    copy(files, out)
    commit(out)
    print(f"{out}: {len(files)} files, one commit; left out: {', '.join(WITHHELD)}")


def git(*args, cwd=ROOT):
    """git, blind to a GIT_DIR or index the caller may have set (as in a hook)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE",
                                                             "GIT_INDEX_FILE")}
    try:
        return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              check=True).stdout
    except FileNotFoundError:
        fail("git is not installed")
    except subprocess.CalledProcessError as e:
        fail(f"git {' '.join(args)}: {e.stderr.strip().splitlines()[-1:] or e.returncode}")


def tracked():
    return [p for p in git("ls-files", "-z").split("\0") if p]


def handed_out(paths):
    """The tracked paths a student gets: not withheld, and still in the working tree (a file
    deleted but not yet committed is gone; a submodule's folder is not a file)."""
    return [p for p in paths if not p.startswith(WITHHELD)
            and ((ROOT / p).is_symlink() or (ROOT / p).is_file())]


def reference_lines():
    """The lines of the reference solutions that only they hold: in no stub, and in none of the
    project's own files (model.py's rotary is no secret)."""
    lines = {line.strip() for f in SOLUTIONS.glob("*.py") if f.name != "planted_bugs.py"
             for line in f.read_text().splitlines() if len(line.strip()) >= SHORTEST}
    for p in handed_out(tracked()):
        if not p.startswith(COURSE) or p.endswith("/stub.py"):
            lines -= {line.strip() for line in read(ROOT / p).splitlines()}
    return lines


def quoted_reference(paths, root=ROOT):
    """[(path, line)] for course files among `paths` that quote a line only the reference holds."""
    if not SOLUTIONS.is_dir():
        return []
    secret = reference_lines()
    return [(p, line.strip()) for p in paths if p.startswith(COURSE)
            for line in read(root / p).splitlines() if line.strip() in secret]


def read(path):
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
        return ""  # binary data, a link to a folder: nothing a solution could be quoted in


def copy(paths, out):
    out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        src, dst = ROOT / p, out / p
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def commit(out):
    quiet = ["-c", "user.name=handout", "-c", "user.email=handout@localhost",
             "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null"]
    git("init", "-q", cwd=out)
    git("add", "-A", "-f", ".", cwd=out)  # -f: every copied file was tracked, ignored or not
    git(*quiet, "commit", "-q", "-m", "The course repository", cwd=out)


if __name__ == "__main__":
    main()
