"""distributed.py: FSDP2 over two gloo processes on the CPU. The base loads sharded (each process
keeps its part, every tensor equal to the one-process load), and an adapter trained over two
processes ends where one process ends (fp32). One spawn runs every case, to keep the test short on
a busy machine; its process group rendezvouses through a file (no port to race for) with a
timeout, so a hang fails instead of waiting forever."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import adapters
import distributed
from checkpoints import load_model
from conftest import make_hf_checkpoint

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


def train(model, family, world, rank):
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
            results[family, kind] = train(model, family, 2, rank)
        torch.save(results, root / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
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
    losses, state = train(model, family, 1, 0)
    for r in range(2):
        got_losses, got = ranks[r][family, kind]
        assert got_losses == pytest.approx(losses, rel=1e-6, abs=0)
        assert got.keys() == state.keys()
        for n in state:
            assert torch.allclose(got[n], state[n], atol=1e-6, rtol=0), n
    other = load_model(root / family)
    torch.manual_seed(1)
    adapters.add_adapter(other, kind, **CASES[kind])
    moved = train(other, family, 1, 0)[1]
    assert any(not torch.allclose(moved[n], state[n], atol=1e-4) for n in state)


def test_a_quantized_base_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="--quantize=nf4 with --fsdp=true: .*buffers"):
        distributed.load_sharded(tmp_path, torch.device("cpu"), torch.float32, "nf4")


def test_one_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init(torch.device("cpu")) == (0, 1, torch.device("cpu"))
    assert not dist.is_initialized()
