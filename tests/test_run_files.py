"""run_files.py on its own: resume.pt written and read back whole, every way a resume.pt can fail
to continue this run refused with one line before anything of it is used, the claim on --out (an
earlier run refused unless continued or replaced, a second claim refused while the first holds)
and --overwrite clearing only the earlier run's files. train.py's end-to-end resume tests are in
tests/test_train.py."""
import os

import pytest
import torch

import run_files as R

CPU = torch.device("cpu")


def state(**over):
    s = dict(step=3, best_val=1.5, rng=R.rng_states(CPU, 1),
             trainable={"a.lora_A": torch.randn(2, 4), "a.lora_B": torch.zeros(4, 2)},
             optimizer={"state": {}, "param_groups": []}, scaler={},
             config={"seed": 42, "learning_rate": 3e-4}, options={"r": 2})
    return {**s, **over}


NOW = {"seed": 42, "learning_rate": 3e-4, "r": 2}
SHAPES = {"a.lora_A": (2, 4), "a.lora_B": (4, 2)}


def test_resume_state_round_trip(tmp_path):
    s = state()
    R.write_state(str(tmp_path), s)
    back = R.read_state(str(tmp_path), CPU, NOW, SHAPES)
    assert back["step"] == 3 and back["config"] == s["config"]
    for n, t in s["trainable"].items():
        assert torch.equal(back["trainable"][n], t)
    assert [f for f in os.listdir(tmp_path)] == ["resume.pt"]  # no temporary left behind


@pytest.mark.parametrize("now, shapes, message", [
    ({**NOW, "seed": 7}, SHAPES, r"--seed=7 differs from the checkpoint's 42"),
    ({**NOW, "r": 4}, SHAPES, r"--r=4 differs from the checkpoint's 2"),
    (NOW, {"a.lora_A": (2, 4)}, r"holds other trainable parameters than this adapter's"),
    (NOW, {**SHAPES, "a.lora_B": (4, 3)}, r"holds a.lora_B of shape \(4, 2\), this adapter's is "
                                          r"\(4, 3\)"),
])
def test_a_resume_state_of_another_run_is_refused(tmp_path, now, shapes, message):
    R.write_state(str(tmp_path), state())
    R.read_state(str(tmp_path), CPU, NOW, SHAPES)  # the same settings continue it
    with pytest.raises(SystemExit, match="error: --resume: .*" + message):
        R.read_state(str(tmp_path), CPU, now, shapes)


def test_what_is_not_a_resume_state_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="error: --resume: no checkpoint .*resume.pt"):
        R.read_state(str(tmp_path), CPU, NOW, SHAPES)
    R.write_state(str(tmp_path), {"step": 1})
    with pytest.raises(SystemExit, match="is not a resume checkpoint written by train.py"):
        R.read_state(str(tmp_path), CPU, NOW, SHAPES)


def test_rng_states_restore_the_same_draws():
    rngs = R.rng_states(CPU, 1)
    first = torch.rand(5)
    R.restore_rng(rngs, 0, 1, CPU)
    assert torch.equal(torch.rand(5), first)
    R.restore_rng(rngs * 2, 0, 2, CPU)  # rank 0's of a two-process run
    assert torch.equal(torch.rand(5), first)


def test_claim_out_refuses_an_earlier_run_unless_continued_or_replaced(tmp_path):
    out = str(tmp_path / "run")
    with R.claim_out(out, overwrite=False, resume=False, master=True) as earlier:
        assert not earlier
        (tmp_path / "run" / "log.jsonl").write_text("{}\n")
        with pytest.raises(SystemExit, match="is in use by another run"):  # held by the first
            with R.claim_out(out, overwrite=True, resume=False, master=True):
                pass
    with pytest.raises(SystemExit, match="holds an earlier run .*log.jsonl.*--resume=true"):
        with R.claim_out(out, overwrite=False, resume=False, master=True):
            pass
    for overwrite, resume in ((True, False), (False, True)):
        with R.claim_out(out, overwrite=overwrite, resume=resume, master=True) as earlier:
            assert list(earlier) == ["log.jsonl"]


def test_overwrite_clears_only_the_earlier_runs_files(tmp_path):
    for f in (*R.RUN_FILES, "notes.txt"):
        (tmp_path / f).write_text("x")
    R.clear_earlier_run(str(tmp_path), ["resume.pt", "log.jsonl"], resume=True, world=1,
                        master=True)  # continued: everything kept
    assert len(os.listdir(tmp_path)) == len(R.RUN_FILES) + 1
    R.clear_earlier_run(str(tmp_path), ["resume.pt", "log.jsonl"], resume=False, world=1,
                        master=True)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", "notes.txt"])
