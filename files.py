"""
The one place where files are read and written raw: atomic writes (a temporary beside the target,
then a rename), safe pickle loading (weights_only), JSON objects, and the check that a folder takes
files. Every other module goes through these, so each guarantee is written once.
"""
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch


def write_atomic(path, data):
    """Write `data` (bytes, text, or a function that writes to a binary file object, e.g.
    lambda f: torch.save(x, f)) to a temporary file beside `path`, then rename it: a crash or a full
    disk never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if callable(data):
            with open(tmp, "wb") as f:
                data(f)
        else:
            (tmp.write_bytes(data) if isinstance(data, bytes)
             else tmp.write_text(data, encoding="utf-8"))
        os.replace(tmp, path)
    except RuntimeError as e:  # torch.save reports a failed write (a full disk) as a RuntimeError
        raise OSError(f"{path}: cannot write it ({str(e).splitlines()[0]})") from None
    finally:
        tmp.unlink(missing_ok=True)


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
        if "Unsupported global" not in str(e):  # no class was refused: the bytes are not a pickle
            raise unreadable(f, "not a pickle") from None
        raise ValueError(f"{f}: refused as unsafe: it pickles objects other than tensors and plain "
                         "containers, and loading them could run code (weights_only=True); "
                         "re-save its tensors, e.g. as safetensors") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise unreadable(f, str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def read_state_dict(f):
    """{name: tensor} of one .bin/.pth/.pt file, loaded by torch_load, checked to be a dict."""
    d = torch_load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a dict of tensor name -> tensor, got a {type(d).__name__}")
    return d


def read_json(f):
    """A JSON object from file `f`, or one ValueError naming the file."""
    try:
        d = json.loads(Path(f).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: cannot read JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d
