"""
The one place where files are read and written raw: atomic writes (a temporary beside the target,
then a rename), safe pickle loading (weights_only), JSON objects and JSON lines, the checks that a
folder takes files and is not in use, and the lock that keeps two runs out of one folder. Every
other module goes through these, so each guarantee is written once.
"""
import contextlib
import json
import os
import pickle
import re
import secrets
import tempfile
from pathlib import Path

import torch

# a temporary of write_atomic: .<target name>.<pid of its writer>.<random>.tmp, so two writers
# never share one and a temporary whose writer died (kill -9 between write and rename) is known
TMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")
OLD_TMP = re.compile(r"^\.[^.]+\.[^.]+\.tmp$")  # the name earlier versions used: .<name>.<ext>.tmp
LOCK = ".lock"


def alive(pid):
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def clean_temporaries(folder):
    """Remove the temporaries left in `folder` by writers that died before their rename."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            m = TMP.match(name)
            if m and not alive(int(m[1])) or not m and OLD_TMP.match(name):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))


def write_atomic(path, data):
    """Write `data` (bytes, text, or a function that writes to a binary file object, e.g.
    lambda f: torch.save(x, f)) to a temporary file beside `path`, then rename it: a crash or a full
    disk never leaves half a file. Temporaries that killed writers left in the folder go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temporaries(path.parent)
    # O_EXCL: a name no other writer holds; mode 0o666 less the umask, as a plain open gives
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.replace(tmp, path)
    except RuntimeError as e:  # torch.save reports a failed write (a full disk) as a RuntimeError
        raise OSError(f"{path}: cannot write it ({str(e).splitlines()[0]})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def check_writable(folder, flag):
    """Before any long work: `folder` (the value of `flag`, e.g. --out) exists or can be made, and
    takes files. Otherwise one ValueError naming the flag: no run ends with nowhere to write."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag}={folder} is a file, expected a folder (give another {flag})")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"{flag}={folder}: cannot write there ({e.strerror or e}); "
                         f"give another {flag}") from None


def check_unused(folder, flag, overwrite, names=None, resume=None):
    """A writer writes over nothing it was not asked to: `folder` (the value of `flag`) must hold
    none of `names` (None: no file at all), unless overwrite. resume (train.py's --resume, None
    elsewhere): the files are an earlier run, which --resume=true may also continue. Returns the
    files found (the ones the writer may replace)."""
    if not os.path.isdir(folder):
        return []
    found = sorted(f for f in os.listdir(folder) if not f.startswith(".")
                   and (f in names if names is not None else True))
    if not found or overwrite or resume:
        return found
    listed = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
    if resume is None:
        raise ValueError(f"{flag}={folder} already holds {listed}: replace them with "
                         f"--overwrite=true, or give another {flag}")
    raise ValueError(f"{flag}={folder} holds an earlier run ({listed}): continue it with "
                     f"--resume=true, replace it with --overwrite=true, or give another {flag}")


def check_outside(out, flag, inputs):
    """`out` (the value of `flag`) is neither one of the folders `inputs` ({flag: folder}) nor
    inside one, nor holds one: writing there would write over what is being read."""
    o = os.path.realpath(out)
    for other, src in inputs.items():
        if not src:
            continue
        s = os.path.realpath(src)
        if o == s or o.startswith(s + os.sep) or s.startswith(o + os.sep):
            raise ValueError(f"{flag}={out} lies in or holds {other}={src}: it would write over "
                             f"the files it reads; give another {flag}")


@contextlib.contextmanager
def lock(folder, flag):
    """Hold `folder`'s lock file (holding our pid) while a run writes there: a second run into the
    same folder is one ValueError naming the process that holds it. The lock dies with its
    process (an flock), so the lock file of a killed run is taken over, never in the way."""
    import fcntl
    path = os.path.join(folder, LOCK)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise ValueError(f"{flag}={folder} is in use by another run (process {holder}, "
                             f"{path}): wait for it to end, or give another {flag}") from None
        # the holder before us may have removed the file between our open and our lock
        if os.path.exists(path) and os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
            break
        f.close()
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        f.close()


def unreadable(f, why, kind="PyTorch checkpoint"):
    """The one error for a weight file that cannot be read."""
    return ValueError(f"{f}: cannot read it ({why}): truncated or not a {kind}; re-download or "
                      "re-save it")


def torch_load(f, map_location="cpu", mmap=True):
    """Safe pickle load: weights_only never runs code; mmap where the file format allows it (not the
    pre-1.6 one). A refused, truncated or foreign file is a ValueError that names it."""
    try:
        try:
            return torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused a name the pickle calls or builds (torch's wording varies between
        # versions: "Unsupported global: GLOBAL x", "unsupported GLOBAL x ... is blocked",
        # "Can only build ..."); anything else means the bytes are no pickle it reads
        refused = re.search(r"GLOBAL (\S+)|Can only [a-z ]+", str(e))
        if not refused:
            raise unreadable(f, "not a pickle") from None
        what = refused[1] or refused[0].lower()
        raise ValueError(f"{f}: refused as unsafe: it pickles {what}, not only tensors and plain "
                         "containers, and loading it could run code (weights_only=True); re-save "
                         "its tensors, e.g. as safetensors") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise unreadable(f, str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def read_state_dict(f):
    """{name: tensor} of one .bin/.pth/.pt file, loaded by torch_load, checked to be a dict of
    tensors."""
    d = torch_load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a dict of tensor name -> tensor, got a {type(d).__name__}")
    for k, t in d.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{f}: {k!r} is a {type(t).__name__}, expected a tensor")
    return d


def read_json(f):
    """A JSON object from file `f`, or one ValueError naming the file."""
    try:
        d = json.loads(Path(f).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: cannot read JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def read_jsonl(f):
    """The JSON objects of file `f`, one a line (blank lines skipped), or one ValueError naming the
    file and the line."""
    try:
        lines = Path(f).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{f}: not one JSON object a line: line {i} is not JSON "
                             f"({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{f}: not one JSON object a line: line {i} is a JSON "
                             f"{type(d).__name__}")
        records.append(d)
    return records


def append_jsonl(f, record):
    """Append one JSON object to file `f` as a line (read_jsonl reads them back)."""
    with open(f, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
