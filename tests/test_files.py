"""files.py: atomic writes whose temporaries never collide and never outlive a killed writer, the
folder lock that keeps two runs apart, safe pickle loading whatever words torch uses to refuse, and
the readers of JSON objects and JSON lines. Each test is a class of fault a trial met."""
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

import files
from conftest import ROOT


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------- atomic writes
def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    """A write that starts while another to the same file is in flight: both complete, the last
    rename wins, nothing is left. (With one fixed temporary name the inner writer removed the
    outer one's temporary, whose rename then failed.)"""
    target = tmp_path / "adapter_config.json"

    def outer(f):
        f.write(b"first")
        files.write_atomic(target, "second")  # another writer, meanwhile
        assert target.read_text() == "second"
    files.write_atomic(target, outer)
    assert target.read_text() == "first" and os.listdir(tmp_path) == ["adapter_config.json"]


def test_a_temporary_left_by_a_killed_writer_goes_with_the_next_write(tmp_path):
    """kill -9 between the write and the rename leaves the temporary; the next write to that folder
    removes it (and the one-name temporaries of earlier versions), never a live writer's."""
    code = ("import sys, time, files\n"
            "def slow(f):\n"
            "    f.write(b'half'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
            f"files.write_atomic({str(tmp_path / 'adapter_model.safetensors')!r}, slow)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    left = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert len(left) == 1 and f".{p.pid}." in left[0]  # the kill left it
    (tmp_path / ".resume.pt.tmp").write_bytes(b"half")  # an earlier version's fixed name
    alive = tmp_path / f".log.jsonl.{os.getpid()}.x1.tmp"  # a writer that still runs: this one
    alive.write_bytes(b"")
    files.write_atomic(tmp_path / "adapter_config.json", "{}")
    assert set(os.listdir(tmp_path)) == {"adapter_config.json", alive.name}


def test_a_failed_write_leaves_nothing_and_keeps_the_earlier_file(tmp_path):
    target = tmp_path / "resume.pt"
    target.write_bytes(b"earlier")

    def full(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(target, full)
    assert os.listdir(tmp_path) == ["resume.pt"] and target.read_bytes() == b"earlier"


def test_full_disk_inside_torch_save_is_an_os_error(tmp_path):
    """torch.save reports a failed write as a RuntimeError; write_atomic makes it an OSError naming
    the file."""
    def write(f):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                           "writing file")
    with pytest.raises(OSError, match="resume.pt: cannot write it .*PytorchStreamWriter failed"):
        files.write_atomic(tmp_path / "resume.pt", write)
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    """A temporary made private (mkstemp's 0600) would stay private after the rename."""
    files.write_atomic(tmp_path / "config.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "config.json").st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------- the lock
def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    with files.lock(tmp_path, "--out") as path:
        assert open(path).read().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=f"--out={tmp_path} is in use by another run "
                                             f"\\(process {os.getpid()}"):
            with files.lock(tmp_path, "--out"):
                pass
    assert os.listdir(tmp_path) == []  # released: the lock file goes
    with files.lock(tmp_path, "--out"):  # and the folder can be locked again
        pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    (tmp_path / files.LOCK).write_text(f"{dead_pid()}\n")  # what kill -9 leaves
    with files.lock(tmp_path, "--out") as path:
        assert open(path).read().strip() == str(os.getpid())


def test_a_lock_held_by_another_process(tmp_path):
    code = ("import sys, time, files\n"
            f"with files.lock({str(tmp_path)!r}, '--out'):\n"
            "    print('locked', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by another run \\(process {p.pid},"):
            with files.lock(tmp_path, "--out"):
                pass
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    with files.lock(tmp_path, "--out"):  # its process died: the lock went with it
        pass


# ---------------------------------------------------------------------------- folders in use
def test_check_unused_and_check_outside(tmp_path):
    assert files.check_unused(tmp_path / "new", "--out", False) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".lock").write_text("1")  # hidden files are no earlier work
    assert files.check_unused(tmp_path / "out", "--out", False) == []
    (tmp_path / "out" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--out=.*out already holds config.json: replace them "
                                         "with --overwrite=true"):
        files.check_unused(tmp_path / "out", "--out", False)
    assert files.check_unused(tmp_path / "out", "--out", True) == ["config.json"]
    # a run's folder (train.py): --resume=true may continue it too, and the refusal says so
    run = ("adapter_model.safetensors", "resume.pt")
    (tmp_path / "out" / "resume.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"--out=.*out holds an earlier run \(resume.pt\): "
                                         "continue it with --resume=true, replace it with "
                                         "--overwrite=true"):
        files.check_unused(tmp_path / "out", "--out", False, run, resume=False)
    assert files.check_unused(tmp_path / "out", "--out", False, run, resume=True) == ["resume.pt"]
    assert files.check_unused(tmp_path / "out", "--out", True, run, resume=False) == ["resume.pt"]
    model = tmp_path / "model"
    for out in (model, model / "sub", tmp_path):
        with pytest.raises(ValueError, match="lies in or holds --model="):
            files.check_outside(out, "--out", {"--model": model})
    files.check_outside(tmp_path / "model2", "--out", {"--model": model, "--adapter": ""})


# --------------------------------------------------------------------------------- safe loading
class System:
    """A pickle that would run a shell command when loaded."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_that_runs_a_command_is_refused_as_unsafe(tmp_path):
    ran = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": System(ran)}, tmp_path / "resume.pt")
    with pytest.raises(ValueError, match=r"resume.pt: refused as unsafe: it pickles "
                                         r"(posix|nt)\.system"):
        files.torch_load(tmp_path / "resume.pt")
    assert not ran.exists()


@pytest.mark.parametrize("wording", [
    "Weights only load failed. ... Unsupported global: GLOBAL builtins.print was not an allowed "
    "global by default.",                                                    # torch 2.4 - 2.12
    "Weights only load failed. ... Trying to load unsupported GLOBAL posix.system whose module "
    "posix is blocked.",                                                     # torch 2.13
    "Weights only load failed. ... Can only build Tensor, Parameter, OrderedDict or types "
    "allowlisted via `add_safe_globals`, but got <class 'x'>",
])
def test_every_wording_of_a_refusal_says_refused(tmp_path, monkeypatch, wording):
    def load(*a, **k):
        raise pickle.UnpicklingError(wording)
    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(ValueError, match="x.pt: refused as unsafe"):
        files.torch_load(tmp_path / "x.pt")


@pytest.mark.parametrize("content, why", [
    (b"", "EOFError"), (b"not a checkpoint at all" * 4, "not a pickle"),
])
def test_bytes_that_are_no_checkpoint(tmp_path, content, why):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(ValueError, match=f"x.pt: cannot read it \\({why}\\): truncated"):
        files.torch_load(tmp_path / "x.pt")


def test_a_state_dict_holds_tensors_only(tmp_path):
    torch.save({"w": torch.ones(2), "b": [1.0, 2.0]}, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="x.bin: 'b' is a list, expected a tensor"):
        files.read_state_dict(tmp_path / "x.bin")
    torch.save([torch.ones(2)], tmp_path / "y.bin")
    with pytest.raises(ValueError, match="y.bin: expected a dict of tensor name -> tensor, got "
                                         "a list"):
        files.read_state_dict(tmp_path / "y.bin")


# ----------------------------------------------------------------------------------- JSON
def test_read_json_and_jsonl(tmp_path):
    f = tmp_path / "a.json"
    f.write_text("[1]")
    with pytest.raises(ValueError, match="a.json: expected a JSON object, got list"):
        files.read_json(f)
    f.write_text("{")
    with pytest.raises(ValueError, match="a.json: cannot read JSON"):
        files.read_json(f)
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert files.read_jsonl(log) == [{"step": 1}, {"step": 2}]  # blank lines are no records
    for line, what in (("[1, 2]", "line 2 is a JSON list"), ("{", "line 2 is not JSON"),
                       ('"x"', "line 2 is a JSON str")):
        log.write_text('{"step": 1}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"log.jsonl: not one JSON object a line: {what}"):
            files.read_jsonl(log)
    with pytest.raises(ValueError, match="nothing.jsonl: cannot read it"):
        files.read_jsonl(tmp_path / "nothing.jsonl")
    log.write_text("")
    for record in ({"step": 1, "loss": 0.5}, {"summary": {"steps": 1}}):
        files.append_jsonl(log, record)
    assert files.read_jsonl(log) == [{"step": 1, "loss": 0.5}, {"summary": {"steps": 1}}]
