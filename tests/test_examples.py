"""data/examples.py: rows -> examples in each template (the prompt masked, the cut at cutoff_len),
and an epoch's micro-batches: a pure function of the seed, dealt evenly to the processes."""
from pathlib import Path

import pytest

from data.examples import deal, micro_batches, tokenize
from data.template import format_prompt
from tokenizer import Tokenizer


def test_train_on_inputs_false_masks_the_prompt(train_base):
    tok = Tokenizer.from_pretrained(train_base)
    row = {"instruction": "Tom has 3 pens. How many pens does Tom have now?", "input": "",
           "output": "3."}
    (x, y), = tokenize(tok, [row], "alpaca", cutoff_len=256, train_on_inputs=False)[0]
    prompt = tok.encode(format_prompt(row["instruction"]), bos=True)
    full = tok.encode(format_prompt(row["instruction"]) + "3.", bos=True, eos=True)
    assert (x == full[:-1] and y[:len(prompt) - 1] == [-100] * (len(prompt) - 1)
            and y[len(prompt) - 1:] == full[len(prompt):])
    # cut: no EOS; then a prompt longer than cutoff_len is dropped
    (x, y), = tokenize(tok, [row], "alpaca", cutoff_len=12, train_on_inputs=True)[0]
    assert len(x) == 11 and y == full[1:12] and tok.eos_id not in y
    assert tokenize(tok, [row], "alpaca", cutoff_len=12, train_on_inputs=False) == ([], 1, 1)



def test_the_prompt_is_encoded_again_only_when_its_loss_is_masked(train_base):
    """Alpaca's prompt length costs a second encoding; train_on_inputs=True (the default) needs
    none, and gets the same examples as when it is counted."""
    tok = Tokenizer.from_pretrained(train_base)
    rows = [{"instruction": f"Tom has {n} pens. How many pens does Tom have now?", "input": "",
             "output": f"{n}."} for n in range(5)]
    calls = []
    encode = tok.encode
    tok.encode = lambda text, **kw: calls.append(text) or encode(text, **kw)
    got = tokenize(tok, rows, "alpaca", cutoff_len=256, train_on_inputs=True)
    assert len(calls) == len(rows)
    assert tokenize(tok, rows, "alpaca", cutoff_len=256, train_on_inputs=False)[0] != got[0]
    assert len(calls) == 3 * len(rows)  # masked: each prompt encoded again for its length
    tok.encode = encode
    assert got == tokenize(tok, rows, "alpaca", 256, True)


def test_llama3_chat_template_examples():
    """--template=llama3-chat: the example is Llama 3 Instruct's dialog (llama_models' ChatFormat,
    the real tokenizer), the loss masked on the prompt and ending on <|eot_id|>, never on the
    tokenizer's EOS; the Alpaca template encodes the same row otherwise."""
    llama_models = pytest.importorskip("llama_models")
    pytest.importorskip("tiktoken")

    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    tok = Tokenizer.from_pretrained(path)
    row = {"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5"}
    [(ids, targets)], _, _ = tokenize(tok, [row], "llama3-chat", 256, train_on_inputs=False)
    meta = ChatFormat(MetaTokenizer(path))
    prompt = meta.encode_dialog_prompt([RawMessage(role="user", content=row["instruction"])]).tokens
    full = prompt + tok.encode(row["output"]) + [128009]
    assert ids == full[:-1] and targets[-1] == 128009 and 128001 not in full
    assert targets[:len(prompt) - 1] == [-100] * (len(prompt) - 1)
    assert targets[len(prompt) - 1:] == full[len(prompt):]
    alpaca, _, _ = tokenize(tok, [row], "alpaca", 256, train_on_inputs=False)
    assert alpaca[0][0] != ids


def epoch_plan(lengths, epoch, rank=0, world=1, seed=42, batch_size=8, micro_batch_size=2):
    """What train.py's Run.epoch_plan computes (group_by_length, its default)."""
    micro = micro_batches(lengths, micro_batch_size, seed + epoch, group_by_length=True)
    return deal(micro, batch_size // (micro_batch_size * world), rank, world)


def test_epoch_plan_is_deterministic_and_shards_for_ddp():
    lengths = [1 + i % 7 for i in range(50)]
    plan = epoch_plan(lengths, 0)
    assert plan == epoch_plan(lengths, 0) != epoch_plan(lengths, 1)
    assert (sorted(i for step in plan for mb in step for i in mb) == list(range(50))
            and len(plan[0]) == 4)
    ranks = [epoch_plan(lengths, 0, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and all(len(a) == len(b) for a, b in zip(*ranks))
    assert len(ranks[0][0]) == 2  # batch 8 = 2 micro-batches x 2 examples x 2 processes
    seen = [i for p in ranks for step in p for mb in step for i in mb]
    # padded by repeating, like DistributedSampler
    assert set(seen) == set(range(50)) and len(seen) == 52
