"""distributed.py: FSDP2 over two gloo processes on the CPU. The base loads sharded (each process
keeps its part, every tensor equal to the one-process load), an adapter trained over two processes
ends where one process ends (fp32), and so does train.py --fsdp=true, killed and resumed. One spawn
runs every library case, to keep the test short on a busy machine. No port is raced for: the
library spawn rendezvouses through a file, train.py's processes join a store this test holds; and
the process group has a timeout, so a hang fails instead of waiting forever."""
import json
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import adapter_io
import adapters
import distributed
import run_files
import train
from checkpoints import load_model
from data import synthetic
from data.prepare import write_json

FAMILIES = ("llama", "bloom", "opt")  # untied head; tied head and ALiBi; learned positions
CASES = {"lora": dict(dropout=0.0), "dora": dict(dropout=0.0), "prompt": {},
         "prefix": dict(gated=True)}
STEPS = 3


def batches(family, step):
    """The step's two halves (one per process): 2 rows each, a prompt without loss."""
    g = torch.Generator().manual_seed(100 * step + len(family))
    x = torch.randint(3, 256, (4, 9), generator=g)
    y = torch.roll(x, -1, 1)
    y[:, :3] = -100
    return [(x[:2], y[:2]), (x[2:], y[2:])]


def train_steps(model, family, world, rank):
    """STEPS AdamW steps; each process runs its half, or one process both halves (accumulated,
    each half's loss / 2: the average that two processes make). -> losses, adapter state."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(STEPS):
        halves = batches(family, step)
        mine = [halves[rank]] if world > 1 else halves
        total = torch.zeros(())
        for x, y in mine:
            loss = model(x, y)[1] / len(mine)
            loss.backward()
            total += loss.detach()
        distributed.average_gradients(params, world)
        if world > 1:
            dist.all_reduce(total)
            total /= world
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total.item())
    return losses, adapters.adapter_state(model, "default")


def worker(rank, root, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=2, timeout=timedelta(seconds=600))
    try:
        results = {}
        for family, kind in cases:
            model = distributed.load_sharded(root / family, torch.device("cpu"), torch.float32)
            if kind is None:  # the load itself: every part this process's share of the tensor
                results[family] = {n: (p.full_tensor(), p.to_local().numel())
                                   for n, p in model.named_parameters()}
                continue
            torch.manual_seed(0)
            distributed.add_adapter(model, kind, **CASES[kind])
            model.loss_chunk = 5  # the head's weight, gathered by the root, read in backward too
            model.grad_checkpoint = True  # each block gathered again for its recomputation
            model.train()
            results[family, kind] = train_steps(model, family, 2, rank)
        torch.save(results, root / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    # imported here: the spawned processes import this file, and another test may have put an
    # exercises/conftest.py before tests/ on the path they inherit
    from conftest import make_hf_checkpoint
    root = tmp_path_factory.mktemp("fsdp")
    for family in FAMILIES:
        make_hf_checkpoint(root / family, family, layout="safetensors-sharded")
    cases = [(f, None) for f in FAMILIES] + [("llama", k) for k in CASES] + \
        [(f, "lora") for f in FAMILIES[1:]]
    mp.spawn(worker, args=(root, cases), nprocs=2)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return root, ranks


@pytest.mark.parametrize("family", FAMILIES)
def test_each_process_keeps_its_part_of_the_base(two_processes, family):
    root, ranks = two_processes
    whole = load_model(root / family)
    params = dict(whole.named_parameters())
    assert ranks[0][family].keys() == params.keys()  # tied: the head is the embedding, once
    for n, p in params.items():
        for r in range(2):
            assert torch.equal(ranks[r][family][n][0], p), n
        kept = [ranks[r][family][n][1] for r in range(2)]
        assert sum(kept) == p.numel() and max(kept) <= -(-p.size(0) // 2) * p[0].numel(), n
    held = sum(ranks[0][family][n][1] for n in params)
    assert held <= 0.55 * sum(p.numel() for p in params.values())  # half of the base, not all


@pytest.mark.parametrize("family, kind", [("llama", k) for k in CASES] +
                         [(f, "lora") for f in FAMILIES[1:]])
def test_two_processes_train_the_adapter_one_process_does(two_processes, family, kind):
    """DoRA's magnitudes start from the sharded weights' row norms, prompt tuning's soft tokens from
    the sharded embedding's rows: both equal a one-process start. The reference check: a second
    adapter with another seed ends elsewhere."""
    root, ranks = two_processes
    model = load_model(root / family)
    torch.manual_seed(0)
    adapters.add_adapter(model, kind, **CASES[kind])
    model.loss_chunk = 5
    losses, state = train_steps(model, family, 1, 0)
    for r in range(2):
        got_losses, got = ranks[r][family, kind]
        assert got_losses == pytest.approx(losses, rel=1e-6, abs=0)
        assert got.keys() == state.keys()
        for n in state:
            assert torch.allclose(got[n], state[n], atol=1e-6, rtol=0), n
    other = load_model(root / family)
    torch.manual_seed(1)
    adapters.add_adapter(other, kind, **CASES[kind])
    moved = train_steps(other, family, 1, 0)[1]
    assert any(not torch.allclose(moved[n], state[n], atol=1e-4) for n in state)


def test_a_quantized_base_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="--quantize=nf4 with --fsdp=true: .*buffers"):
        distributed.load_sharded(tmp_path, torch.device("cpu"), torch.float32, "nf4")


def test_one_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init(torch.device("cpu")) == (0, 1, torch.device("cpu"))
    assert not dist.is_initialized()


def test_setup_applies_the_dtype_and_the_adapter_matmul_precision(monkeypatch):
    seen = []
    monkeypatch.setattr(adapters, "fast_fp32_matmuls",
                        lambda device, dtype: seen.append((device, dtype)))
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        rt = distributed.setup("cpu", name, threads=0)
        assert rt.dtype == dtype and seen[-1] == (torch.device("cpu"), dtype)
        assert ((rt.ctx.fast_dtype == dtype) if dtype != torch.float32
                else not isinstance(rt.ctx, torch.autocast))


# ------------------------------------------------------------------------ train.py --fsdp=true
class Interrupt(Exception):
    pass


def train_worker(rank, port, argv, crash_after):
    """One of two train.py processes, as torchrun starts them. The rendezvous store is the test's
    (TORCHELASTIC_USE_AGENT_STORE: the processes join it, none opens a port). crash_after: the
    step after whose log line both processes stop, as if killed."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    log = train.log

    def crash(rt, out, record, text):
        log(rt, out, record, text)
        if record and record.get("step") == crash_after and "loss" in record:
            raise Interrupt
    train.log = crash
    try:
        train.main(argv)
    except Interrupt:
        pass
    finally:
        train.log = log


def spawn_two(argv, crash_after=None):
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=600))
    mp.spawn(train_worker, args=(store.port, argv, crash_after), nprocs=2)


def records(out, key):
    with open(out / "log.jsonl") as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def test_train_fsdp_two_processes_equal_one_resume_included(tiny_dir, tmp_path):
    """train.py --fsdp=true on two gloo processes, killed after step 3 (resume.pt holds step 2) and
    resumed: the losses of all four steps, the validation losses and the adapter equal a
    one-process run's, and it leaves the same files, with the same tensors in them (fp32)."""
    rows = tmp_path / "rows.json"
    write_json(rows, synthetic.finetune_split(64, 8, seed=1)[0])
    argv = [f"--model={tiny_dir}", f"--data={rows}", "--batch_size=8", "--micro_batch_size=2",
            "--val_set_size=16", "--max_steps=4", "--eval_interval=2", "--adapter=lora",
            "--dropout=0", "--learning_rate=1e-2", "--log_interval=1", "--threads=0"]
    two = tmp_path / "two"
    spawn_two(argv + [f"--out={two}", "--fsdp=true"], crash_after=3)
    assert torch.load(two / "resume.pt", weights_only=True)["step"] == 2
    spawn_two(argv + [f"--out={two}", "--fsdp=true", "--resume=true"])
    one = tmp_path / "one"
    train.main(argv + [f"--out={one}"])
    for key in ("loss", "val_loss"):
        a, b = records(two, key), records(one, key)
        assert sorted(a) == sorted(b) and [a[s] for s in a] == pytest.approx(
            [b[s] for s in a], rel=1e-6, abs=0), key
    assert sorted(os.listdir(two)) == sorted(os.listdir(one)) == sorted(run_files.RUN_FILES)
    a, b = (load_file(d / "adapter_model.safetensors") for d in (two, one))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    fresh = adapter_io.load_adapter(load_model(tiny_dir), two)  # the files load as any run's
    assert adapters.count_parameters(fresh)[0] == sum(t.numel() for t in a.values())
    assert json.loads((two / "adapter_config.json").read_text()) == \
        json.loads((one / "adapter_config.json").read_text())
    ra, rb = (torch.load(d / "resume.pt", weights_only=True) for d in (two, one))
    assert ra.keys() == rb.keys() and ra["step"] == rb["step"] == 4
    assert all(torch.allclose(ra["trainable"][k], rb["trainable"][k], atol=1e-6, rtol=0)
               for k in rb["trainable"])


@pytest.mark.parametrize("argv, message", [
    (["--fsdp=true"], "--fsdp=true shards the base over the processes torchrun starts"),
    (["--pack=true", "--adapter=prompt"], "--pack=true with --adapter=prompt: the soft tokens"),
])
def test_train_refuses_what_cannot_run(argv, message, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match=message):
        train.main(["--model=.", "--data=x.json", *argv])
