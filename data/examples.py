"""
Rows -> training examples -> an epoch's micro-batches, the data steps of train.py that are not the
recipe's choices:

    examples, n_cut, n_dropped = tokenize(tok, rows, "alpaca", cutoff_len=256, train_on_inputs=True)
    micro = micro_batches(lengths, micro_batch_size, seed + epoch)  # lists of example indices
    steps = deal(micro, per_step, rank, world)  # this process's optimizer steps

An example is a pair (ids, targets) of equal length, the targets being the ids shifted by one
(nanoGPT style) with -100 where no loss is taken. data/pack.py turns a micro-batch of them into
tensors (padded rows, or one packed row).
"""
import torch

from data.template import TEMPLATES

# group_by_length sorts within groups of this many micro-batches (Hugging Face's)
LENGTH_GROUP = 50


def tokenize(tok, rows, template, cutoff_len, train_on_inputs):
    """LLM-Adapters' examples in the template's encoding (Alpaca: [BOS] prompt + response EOS;
    llama3-chat: header pieces, the response ending in <|eot_id|>), cut at cutoff_len; the
    targets are the ids shifted by one, -100 on the prompt when train_on_inputs is false.
    Returns (examples, number cut, number dropped): a row left without any target (its prompt
    fills cutoff_len) is dropped."""
    examples, n_cut, n_dropped = [], 0, 0
    for row in rows:
        ids, n_prompt = TEMPLATES[template].encode_example(tok, row,
                                                           count_prompt=not train_on_inputs)
        n_cut += len(ids) > cutoff_len
        ids = ids[:cutoff_len]
        targets = ids[1:]
        if not train_on_inputs:
            targets = [-100] * (n_prompt - 1) + targets[n_prompt - 1:]
        if all(t == -100 for t in targets):
            n_dropped += 1
        else:
            examples.append((ids[:-1], targets[:len(ids) - 1]))
    return examples, n_cut, n_dropped


def micro_batches(lengths, size, seed, group_by_length=True):
    """One epoch's micro-batches of `size` example indices (the last may be short), given the
    examples' lengths: a pure function of seed, so a resumed run gets the same ones.
    group_by_length sorts by length within groups of LENGTH_GROUP micro-batches (little padding),
    then shuffles the micro-batches so that a step still mixes lengths."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        group = LENGTH_GROUP * size
        order = [i for s in range(0, len(order), group)
                 for i in sorted(order[s:s + group], key=lambda i: lengths[i])]
    micro = [order[s:s + size] for s in range(0, len(order), size)]
    if group_by_length:
        micro = [micro[i] for i in torch.randperm(len(micro), generator=g).tolist()]
    return micro


def deal(micro, per_step, rank=0, world=1):
    """The micro-batches -> this process's optimizer steps, each a list of per_step of them: the
    list is padded to a multiple of world by repeating its start (DistributedSampler's rule), so
    that every process takes as many steps, and dealt round-robin."""
    micro = (micro + micro[:-len(micro) % world])[rank::world]
    return [micro[s:s + per_step] for s in range(0, len(micro), per_step)]
