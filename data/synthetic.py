"""Synthetic arithmetic data for the embedded demo (demo.py: `python train.py` without --model),
sized for what a ~1M-parameter model learns on one CPU thread in a few minutes. Everything is a pure
function of its seed.

Word problems about one person's things, with numbers 0..MAX_NUMBER (intermediate results included):
  one step   "Ann has 7 pens. Then Ann finds 5 more pens. How many pens does Ann have now?"
             -> "7 + 5 = 12. The answer is 12."
  two steps  "... Then Ann finds 5 more pens. Then Ann loses 3 pens. How many ...?"
             -> "7 + 5 = 12. 12 - 3 = 9. The answer is 9."

- `pretrain_corpus`: the base model's text: equations ("7 + 5 = 12"), one- and two-step problems as
  plain text, and ONE-step problems inside the Alpaca template (data/template.py). So the base can
  do the arithmetic, but in the template it has only ever answered one step: asked a two-step
  question there, it mostly stops after one.
- `finetune_split`: the adapter's task, TWO-step problems in LLM-Adapters' JSON rows (instruction,
  input, output, answer; the answer is the output's last number), i.e. learning to follow the
  instruction. The test problems are `held_out` triples (a, b, c), which no training text of either
  stage contains.
- `train_tokenizer`: the base model's sentencepiece tokenizer, trained on the pretraining corpus.
"""
import os
import random

from data.template import format_example

MAX_NUMBER = 20
NAMES = ["Tom", "Ann", "Sam", "Mia", "Ben", "Lea", "Max", "Eva", "Leo", "Zoe", "Kim", "Raj"]
ITEMS = ["apples", "pens", "cards", "books", "coins", "eggs", "balls", "cups", "toys", "shells",
         "stamps", "kites"]
GAIN = ["{n} gets {b} more {x}", "{n} buys {b} more {x}", "{n} finds {b} more {x}",
        "{n} wins {b} more {x}"]
LOSS = ["{n} gives {b} {x} to {m}", "{n} loses {b} {x}", "{n} sells {b} {x}",
        "{m} takes {b} {x} from {n}"]
QUESTION = "How many {x} does {n} have now?"
# every two-step problem a + b - c with all numbers in range, and the ones kept out of all training
# text (1 in 8)
TRIPLES = [(a, b, c) for a in range(1, MAX_NUMBER) for b in range(1, MAX_NUMBER - a + 1)
           for c in range(1, a + b + 1)]


def held_out(a, b, c):
    return (7 * a + 3 * b + c) % 8 == 0


def one_step(rng):
    """A random one-step problem: (question, worked answer, answer)."""
    n, m = rng.sample(NAMES, 2)
    x = rng.choice(ITEMS)
    if rng.random() < 0.5:
        a = rng.randint(0, MAX_NUMBER - 1)
        b = rng.randint(1, MAX_NUMBER - a)
        c, op, verb = a + b, "+", rng.choice(GAIN)
    else:
        a = rng.randint(1, MAX_NUMBER)
        b = rng.randint(1, a)
        c, op, verb = a - b, "-", rng.choice(LOSS)
    question = (f"{n} has {a} {x}. Then {verb.format(n=n, m=m, b=b, x=x)}. "
                f"{QUESTION.format(n=n, x=x)}")
    return question, f"{a} {op} {b} = {c}. The answer is {c}.", c


def two_step(a, b, c, rng):
    """The problem a + b - c with random names and items: (question, worked answer, answer)."""
    n, m = rng.sample(NAMES, 2)
    x = rng.choice(ITEMS)
    gain, loss = (rng.choice(GAIN).format(n=n, m=m, b=b, x=x),
                  rng.choice(LOSS).format(n=n, m=m, b=c, x=x))
    question = f"{n} has {a} {x}. Then {gain}. Then {loss}. {QUESTION.format(n=n, x=x)}"
    return (question,
            f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. The answer is {a + b - c}.",
            a + b - c)


def pretrain_corpus(n, seed=0):
    """n documents: 1/10 equations, 1/10 one-step and 2/5 two-step problems as plain text, 2/5
    one-step problems in the template."""
    rng = random.Random(seed)
    train_triples = [t for t in TRIPLES if not held_out(*t)]
    docs = []
    for _ in range(n):
        r = rng.random()
        question, worked, _ = (two_step(*rng.choice(train_triples), rng) if 0.2 <= r < 0.6
                               else one_step(rng))
        if r < 0.1:
            docs.append(worked.split(".")[0])  # "7 + 5 = 12"
        elif r < 0.6:
            docs.append(f"{question} {worked}")
        else:
            prompt, response = format_example({"instruction": question, "input": "",
                                               "output": worked})
            docs.append(prompt + response)
    return docs


def finetune_rows(triples, seed=0):
    """LLM-Adapters rows {instruction, input, output, answer} for a list of (a, b, c) triples."""
    rng = random.Random(seed)
    rows = []
    for a, b, c in triples:
        question, worked, answer = two_step(a, b, c, rng)
        rows.append({"instruction": question, "input": "", "output": worked, "answer": str(answer)})
    return rows


def finetune_split(n_train, n_test, seed=0):
    """(train rows, test rows) of the two-step task: test problems are n_test of the held-out
    triples, training cycles through the others (in a seeded order, fresh wording each time)."""
    rng = random.Random(seed)
    test = [t for t in TRIPLES if held_out(*t)]
    train = [t for t in TRIPLES if not held_out(*t)]
    if n_test > len(test):
        raise ValueError(f"n_test={n_test}: there are {len(test)} held-out two-step problems")
    test = rng.sample(test, n_test)
    rng.shuffle(train)
    return (finetune_rows([train[i % len(train)] for i in range(n_train)], seed + 1),
            finetune_rows(test, seed + 2))


def train_tokenizer(docs, prefix, vocab_size=320):
    """A sentencepiece BPE tokenizer for the corpus, written to <prefix>.model, with LLaMA's ids
    (unk 0, bos 1, eos 2, no pad piece). Digits are split; pieces may span spaces, so the template's
    fixed sentences are a few tokens each; "\n" is a piece of its own, so the prompt's tokens are a
    prefix of the prompt + response's."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
        split_digits=True, split_by_whitespace=False, max_sentencepiece_length=64,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["\n"], character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    os.remove(prefix + ".vocab")
