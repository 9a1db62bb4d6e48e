"""
Packing (train.py --pack=true): a step's examples laid side by side in rows of at most cutoff_len
tokens instead of one padded row each, so no compute goes to padding.

    rows = pack(idx, lengths, cutoff_len)       example indices -> rows (lists of indices)
    per_process = pack_step(idx, lengths, cutoff_len, world, micro_batch_size)
    x, y, positions = collate_packed(examples, rows, device)

The model keeps the examples apart (model.py, Transformer.forward(positions=...)): positions
restart at 0 where an example starts, a token attends only to its own example's tokens up to
itself, and rotary, ALiBi and learned positions count from the example's start. An example's
targets are its own ids shifted by one (train.py), so no loss crosses a boundary either: a packed
step computes exactly the losses of the same examples unpacked.
"""
import torch


def pack(idx, lengths, cutoff_len):
    """First-fit decreasing: the examples `idx` (lengths[i] tokens each, at most cutoff_len) ->
    rows, lists of example indices whose lengths sum to at most cutoff_len. Longest first, each
    into the first row it fits: within 22% of the fewest rows possible (Johnson's bound), and
    deterministic."""
    rows, room = [], []
    for i in sorted(idx, key=lambda i: -lengths[i]):  # stable: equal lengths keep their order
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(cutoff_len)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def pack_step(idx, lengths, cutoff_len, world, micro_batch_size):
    """One optimizer step's examples (those of every process) -> for each process its micro-batches,
    each a list of at most micro_batch_size rows. As few forward passes as the rows need, and the
    same number on every process: under FSDP each forward pass gathers weights from all of them.
    Where that leaves a process short of rows, rows holding several examples are split (every
    process has at least as many examples as micro-batches in the unpacked plan, so there are
    enough)."""
    rows = pack(idx, lengths, cutoff_len)
    n_micro = -(-len(rows) // (world * micro_batch_size))
    slots = world * n_micro
    while len(rows) < slots:
        row = max(rows, key=len)
        if len(row) < 2:
            raise ValueError(f"{len(idx)} examples cannot fill {slots} micro-batches")
        rows.remove(row)
        rows += [row[:len(row) // 2], row[len(row) // 2:]]
    # fullest rows first, dealt round-robin: every micro-batch gets rows of every fill
    rows.sort(key=lambda r: -sum(lengths[i] for i in r))
    micro = [rows[s::slots] for s in range(slots)]  # slot s: process s % world, pass s // world
    return [micro[rank::world] for rank in range(world)]


def collate_packed(examples, rows, device):
    """Rows of examples ((ids, targets) pairs) -> x, y, positions (len(rows), T), T the longest
    row. Each example's ids and targets side by side, its positions 0, 1, ...; the tail of a
    shorter row is padding (id 0, target -100) numbered as one more example of its own, which no
    real token attends to."""
    T = max(sum(len(examples[i][0]) for i in row) for row in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    positions = torch.zeros(len(rows), T, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            ids, targets = examples[i]
            n = len(ids)
            x[r, t:t + n], y[r, t:t + n] = torch.tensor(ids), torch.tensor(targets)
            positions[r, t:t + n] = torch.arange(n)
            t += n
        positions[r, t:] = torch.arange(T - t)
    return x.to(device), y.to(device), positions.to(device)


def padding_share(lengths, batches, packed):
    """The share of token slots that hold padding, over `batches` (unpacked: lists of example
    indices, each padded to its longest; packed: lists of rows, each padded to its longest row)."""
    real = slots = 0
    for batch in batches:
        sizes = ([sum(lengths[i] for i in row) for row in batch] if packed
                 else [lengths[i] for i in batch])
        real += sum(sizes)
        slots += len(sizes) * max(sizes)
    return 1 - real / slots
