"""
What a training run leaves in its --out folder, and how the next run takes it up:

    with claim_out(out, overwrite, resume, master) as earlier:  # held for the whole run
        ...                                       # the new run loads and checks its inputs
        clear_earlier_run(out, earlier, resume, world, master)  # only then (--overwrite)
        write_state(out, state)                   # resume.pt, at every validation
        state = read_state(out, device, now, shapes)  # --resume: checked to continue that run

RUN_FILES are a run's files. A --out that holds them is refused unless --resume=true continues the
run or --overwrite=true replaces it (files.check_unused), and so is a --out another run is writing
to (its lock file, <out>/.lock): no run is lost by mistake. resume.pt holds the trainable weights,
the optimizer and GradScaler states, the step (the schedule is a function of it), every process's
RNG state (rng_states), the settings a resumed run must share (RESUME_KEYS) and the adapter's
options; with them a resumed run reaches an uninterrupted run's losses.
"""
import os
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist

from cli import fail
from files import check_unused, check_writable, lock, torch_load, write_atomic

# what a run leaves in --out
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "resume.pt", "log.jsonl")
# what a resumed run must share with the one it continues (the adapter's options are compared too)
RESUME_KEYS = ("model", "data", "adapter", "batch_size", "micro_batch_size", "learning_rate",
               "warmup_steps", "decay", "num_epochs", "max_steps", "seed", "cutoff_len",
               "train_on_inputs", "val_set_size")
# the entries without which a file is not a resume.pt
STATE_KEYS = {"step", "trainable", "config", "rng", "optimizer"}


@contextmanager
def claim_out(out, overwrite, resume, master):
    """--out must take files, and hold no earlier run unless --resume=true continues it or
    --overwrite=true replaces it (files.check_unused). The first process holds its lock file
    (files.lock) for the whole `with` body. Yields the earlier run's files."""
    with ExitStack() as held:
        try:
            check_writable(out, "--out")
            if master:
                held.enter_context(lock(out, "--out"))
            earlier = check_unused(out, "--out", overwrite, RUN_FILES, resume=resume)
        except ValueError as e:  # not a folder, read-only, in use by another run, or used
            fail(e)
        yield earlier


def clear_earlier_run(out, earlier, resume, world, master):
    """--overwrite: delete the earlier run's files, once the new run's model, data and adapter are
    loaded and checked (a new run that cannot start leaves the earlier one whole)."""
    if world > 1:  # every process has looked before rank 0 clears the folder
        dist.barrier()
    if earlier and not resume and master:  # replaced: none of the earlier run is kept
        for f in earlier:
            os.remove(os.path.join(out, f))


def rng_states(device, world):
    """Every process's RNG state (CPU, and CUDA on CUDA), by rank; every process must call it."""
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
    rngs = [rng] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    return rngs


def restore_rng(rngs, rank, world, device):
    """This process's RNG state from rng_states' list (rank 0's, from a run of another world
    size)."""
    rng = rngs[rank if len(rngs) == world else 0]
    torch.set_rng_state(rng["cpu"].cpu())
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu())


def write_state(out, state):
    """<out>/resume.pt: a temporary file, then renamed (a crash leaves the previous one whole)."""
    write_atomic(os.path.join(out, "resume.pt"), lambda f: torch.save(state, f))


def read_state(out, device, now, shapes):
    """<out>/resume.pt -> its state, once checked that this run continues that one: now is this
    run's settings and adapter options by name, shapes its trainable parameters' shapes by name."""
    path = os.path.join(out, "resume.pt")
    if not os.path.exists(path):
        fail(f"--resume: no checkpoint {path}")
    try:
        state = torch_load(path, map_location=device, mmap=False)
    except ValueError as e:
        fail(f"--resume: {e}")
    if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
        fail(f"--resume: {path} is not a resume checkpoint written by train.py")
    for key, was in {**state["config"], **(state.get("options") or {})}.items():
        if now.get(key) != was:
            fail(f"--resume: --{key}={now.get(key)!r} differs from the checkpoint's {was!r}")
    if sorted(state["trainable"]) != sorted(shapes):
        fail(f"--resume: {path} holds other trainable parameters than this adapter's")
    for n, shape in shapes.items():
        saved = state["trainable"][n].shape
        if saved != shape:
            fail(f"--resume: {path} holds {n} of shape {tuple(saved)}, this adapter's is "
                 f"{tuple(shape)}: its options differ from that run's")
    return state
