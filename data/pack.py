"""
Padding-free packing (train.py --pack=true): the examples of a micro-batch laid side by side in
one row instead of one padded row each, so no compute goes to padding.

    x, y, positions = collate_packed(examples, idx, device)    (1, T): T = their total length

The model keeps the examples apart (model.py, Transformer.forward(positions=...)): positions
restart at 0 where an example starts, a token attends only to its own example's tokens up to
itself, and rotary, ALiBi and learned positions count from the example's start. An example's
targets are its own ids shifted by one (train.py), so no loss crosses a boundary either.

Why one row per micro-batch, not rows of cutoff_len filled first-fit: the micro-batches stay the
unpacked plan's, so a packed step computes exactly the unpacked step's loss (each micro-batch's mean
over its target tokens) with the same number of forward passes on every process (FSDP gathers
weights at each one), and there is no padding at all. Rows of cutoff_len leave the tail of most
rows empty: on math_data.json (GPT-2 BPE, cutoff_len 256, 136 tokens on average) 6% of the slots
stayed padding that way (first-fit decreasing over each step), against 0% here
(docs/measurements.md). A row holds at most micro_batch_size x cutoff_len tokens, the most an
unpacked micro-batch holds, so memory is bounded as before.
"""
import torch


def collate_padded(examples, idx, device):
    """The examples idx -> right-padded x, y (B, T): padding is id 0 with target -100, and causal
    attention hides it from the real tokens (the unpacked batches)."""
    T = max(len(examples[i][0]) for i in idx)
    x, y = (torch.zeros(len(idx), T, dtype=torch.long),
            torch.full((len(idx), T), -100, dtype=torch.long))
    for r, i in enumerate(idx):
        ids, targets = examples[i]
        x[r, :len(ids)], y[r, :len(targets)] = torch.tensor(ids), torch.tensor(targets)
    return x.to(device), y.to(device)


def collate_packed(examples, idx, device):
    """The examples idx ((ids, targets) pairs) -> x, y, positions (1, T): their ids and targets
    side by side, each example's positions 0, 1, ..."""
    x = torch.tensor([t for i in idx for t in examples[i][0]], dtype=torch.long)
    y = torch.tensor([t for i in idx for t in examples[i][1]], dtype=torch.long)
    positions = torch.cat([torch.arange(len(examples[i][0])) for i in idx])
    return x[None].to(device), y[None].to(device), positions[None].to(device)


def padding_share(lengths, batches):
    """The share of token slots that hold padding when each of `batches` (lists of example indices)
    is one right-padded row per example, as long as its longest."""
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / sum(len(b) * max(lengths[i] for i in b) for b in batches)
