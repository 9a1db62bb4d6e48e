"""tokenizer.py and the templates' encoding against the reference implementations (sentencepiece,
Hugging Face tokenizers, tiktoken, llama_models), all offline.

Fixtures are built inside the tests: a tiny sentencepiece model, tiny byte-level BPE vocabularies
trained with the `tokenizers` library, a tiny tiktoken file. The real GPT-2 vocabulary is used when
../shared/data/gpt2-bpe exists, the real Llama 3 tokenizer.model when llama_models is installed
(test-only, requirements-dev.txt).
"""

import base64
import inspect
import json
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.template import (TEMPLATES, TemplateError, format_example, format_prompt,  # noqa: E402
                           response_of)
from tokenizer import (LLAMA3_PATTERN, LLAMA3_SPECIAL, BPETokenizer,  # noqa: E402
                       SentencePieceTokenizer, Tokenizer, TokenizerError, UnsupportedTokenizer,
                       cut_at_stop)

GPT2_DIR = ROOT.parent / "shared/data/gpt2-bpe"
# Qwen2/Qwen2.5's pre-tokenizer (their tokenizer.json): Llama 3's with single digits
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = [
    "Hello world",
    "I'm sure they'll say we don't know; you've, we'd, she's",
    "I'M LOUD 'S 'LL",
    "multiple    spaces   here",
    "tabs\tand\t\ttabs",
    "para one\n\npara two\n",
    "trailing spaces   ",
    "   leading spaces",
    " \n \t \r\n ",
    "café naïve résumé",
    "中文字符测试",
    "Ελληνικά κείμενο",
    "emoji 😀👍🏽 👩‍👩‍👧 family",
    "numbers 3.14159 12,345 and 2024-01-01",
    "text<|endoftext|>more text",
    "<|endoftext|>",
    "a <|endoftext|> b<|endoftext|><|endoftext|>",
    "def f(x):\n    return x**2  # code\n",
    "\u00a0nbsp\u2003em space\u3000ideographic \ufeffBOM",
    "",
]


def random_texts(n, seed=0):
    """Short strings over an alphabet of tricky pieces: whitespace kinds, contractions, specials,
    unicode."""
    alphabet = list(" \t\n\r\x0b\xa0\u2003abcXYZ019'sltredvm.,!?-_<>|éß中文😀\u200d👩ΩЖ")
    alphabet += ["<|endoftext|>", "'ll", "   "]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(n)]


def hf_ids(tok, text):
    """Our ids with special tokens allowed, as Hugging Face encodes text; checks on the way that
    plain encode() makes no special id from the text, and that only special text changes it."""
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special.values()), repr(text)
    ids = tok.encode(text, allowed_special="all")
    assert plain == ids or any(s in text for s in tok.special), repr(text)
    return ids


def hf_gpt2(vocab_file, merges_file):
    """HF GPT2Tokenizer from explicit files. transformers 4.x takes vocab_file=/merges_file=; 5.x
    takes the paths as vocab=/merges= (and silently builds an empty tokenizer from vocab_file=),
    hence the check."""
    from transformers import GPT2Tokenizer

    if "vocab_file" in inspect.signature(GPT2Tokenizer.__init__).parameters:
        hf = GPT2Tokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file))
    else:
        hf = GPT2Tokenizer(vocab=str(vocab_file), merges=str(merges_file))
    assert len(hf) > 256, "HF GPT2Tokenizer did not load the vocabulary"
    return hf


def test_runtime_does_not_import_hf():
    code = ("import sys, tokenizer, data.template; "
            "assert not {'transformers', 'tokenizers', 'peft', 'tiktoken', 'llama_models'} "
            "& set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---- sentencepiece (LLaMA) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog while adapters tune large language models "
             "12 345 café").split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    folder = tmp_path_factory.mktemp("llama")
    # LLaMA-like settings: bpe, byte fallback for unseen chars, no normalization, whitespace kept as
    # is
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(folder / "tokenizer"), vocab_size=320,
        model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    return folder


SP_TEXTS = [t for t in TEXTS if "<|endoftext|>" not in t] + ["the quick brown fox", " lead",
                                                             "two  spaces"]


def test_sentencepiece_matches_library(sp_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = Tokenizer.from_pretrained(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.add_bos) == (1, 2, 0, 320, True)
    for text in SP_TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.encode(text, bos=True, eos=True) == [1] + ids + [2]
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == sp.decode(ids) == text
    assert pickle.loads(pickle.dumps(tok)).encode("the fox") == sp.encode("the fox")
    # a direct path to the .model file works too
    assert (Tokenizer.from_pretrained(sp_dir / "tokenizer.model").encode("the fox")
            == sp.encode("the fox"))


def test_sentencepiece_matches_hf_llama(sp_dir):
    transformers = pytest.importorskip("transformers")
    try:
        hf = transformers.LlamaTokenizerFast.from_pretrained(str(sp_dir))
        assert len(hf) == 320
    except Exception as e:  # e.g. transformers 5 needs protobuf to convert a tokenizer.model
        pytest.skip("HF LlamaTokenizerFast cannot load the model offline "
                    f"(transformers 5 needs protobuf): {e!s:.150}")
    tok = Tokenizer.from_pretrained(sp_dir)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    # text starting with whitespace is left out: transformers 5 drops one leading space there (its
    # non-legacy Metaspace), while sentencepiece and LLM-Adapters-era LlamaTokenizer (legacy) keep
    # it
    for text in [t for t in SP_TEXTS if not t[:1].isspace()]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text


# ---- GPT-2 byte-level BPE, real vocabulary -------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip(f"real GPT-2 vocabulary not found at {GPT2_DIR}")
    pytest.importorskip("transformers")
    return (Tokenizer.from_pretrained(GPT2_DIR),
            hf_gpt2(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe"))


def test_gpt2_special_ids(gpt2):
    tok, hf = gpt2
    assert isinstance(tok, BPETokenizer)
    assert ((tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.add_bos)
            == (50256, 50256, 50256, 50257, False))
    assert tok.vocab_size == len(hf) and tok.eos_id == hf.eos_token_id
    assert tok.encode("Hello world", bos=True, eos=True) == [50256, 15496, 995, 50256]


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_matches_hf(gpt2, text):
    tok, hf = gpt2
    ids = hf_ids(tok, text)
    assert ids == hf.encode(text), text
    assert tok.decode(ids) == text


def test_gpt2_random_texts_and_partial_decode(gpt2):
    tok, hf = gpt2
    for text in random_texts(500):
        ids = hf_ids(tok, text)
        assert ids == hf.encode(text), repr(text)
        assert tok.decode(ids) == text
    # slices that cut multi-byte characters apart decode with U+FFFD like HF (errors="replace")
    ids = tok.encode("😀 中文 é👩‍👧")
    for i in range(len(ids)):
        for j in range(i + 1, len(ids) + 1):
            assert tok.decode(ids[i:j]) == hf.decode(ids[i:j], clean_up_tokenization_spaces=False)


def test_gpt2_hf_file_names(gpt2, tmp_path):
    """The same vocabulary under HF's names (vocab.json + merges.txt) gives the same ids."""
    tok, _ = gpt2
    (tmp_path / "vocab.json").write_bytes((GPT2_DIR / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((GPT2_DIR / "vocab.bpe").read_bytes())
    other = Tokenizer.from_pretrained(tmp_path)
    assert all(other.encode(t) == tok.encode(t) for t in TEXTS)


# ---- tiny self-made byte-level BPE (runs without ../shared) --------------------------------------

CORPUS_WORDS = ("the quick brown fox jumps over a dog adapter tuning don't they'll I'm "
                "café 中文 3.14 12,345 …。")
CORPUS_WORDS = CORPUS_WORDS.split()


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    ends = ["", "\n", "  ", "\t"]
    return [" ".join(rng.choice(CORPUS_WORDS) for _ in range(10)) + rng.choice(ends)
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory):
    """GPT-2-style: vocab.json + merges.txt (with '#version' header) and the same model as
    tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("tiny_bpe")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=400, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(folder))
    json_folder = folder / "json"
    json_folder.mkdir()
    bpe.save(str(json_folder / "tokenizer.json"))
    return folder


def test_tiny_bpe_matches_hf(tiny_bpe):
    pytest.importorskip("transformers")
    assert (tiny_bpe / "merges.txt").read_text().startswith("#version")
    tok = Tokenizer.from_pretrained(tiny_bpe)
    hf = hf_gpt2(tiny_bpe / "vocab.json", tiny_bpe / "merges.txt")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 0)  # <|endoftext|> is id 0 here
    assert tok.vocab_size == len(hf)
    for text in TEXTS + corpus(20, seed=1) + random_texts(300):
        ids = hf_ids(tok, text)
        assert ids == hf.encode(text), repr(text)
        assert tok.decode(ids) == text


def test_tiny_bpe_long_word_pickle_and_file_preference(tiny_bpe, tmp_path):
    pytest.importorskip("transformers")
    hf = hf_gpt2(tiny_bpe / "vocab.json", tiny_bpe / "merges.txt")
    rng = random.Random(3)
    # one pre-token, many merges
    long_word = "".join(rng.choice("thequickbrownfoxjumps") for _ in range(20_000))
    for text in [long_word, "a" * 5001, "中文" * 2000]:
        assert Tokenizer.from_pretrained(tiny_bpe).encode(text) == hf.encode(text)
    # vocab.json + merges.txt win over a tokenizer.json in the same folder (here a broken one)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny_bpe / name).read_bytes())
    (tmp_path / "tokenizer.json").write_text("not json")
    tok = Tokenizer.from_pretrained(tmp_path)
    # picklable, e.g. for multiprocessing data loaders
    clone = pickle.loads(pickle.dumps(tok))
    text = "the quick fox<|endoftext|>"
    assert (clone.encode(text, allowed_special="all") == hf_ids(tok, text) == hf.encode(text))
    assert clone.encode(text) == tok.encode(text) != hf.encode(text)


def test_tokenizer_json_gpt2_style(tiny_bpe, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    path = tiny_bpe / "json" / "tokenizer.json"
    ref = HFTokenizer.from_file(str(path))
    # merges saved as [a, b] pairs (tokenizers >= 0.20) and as "a b" strings (older files)
    data = json.loads(path.read_text())
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m
                               for m in data["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    for tok in [Tokenizer.from_pretrained(path.parent), Tokenizer.from_pretrained(path),
                Tokenizer.from_pretrained(tmp_path)]:
        assert (tok.eos_id, tok.vocab_size) == (0, ref.get_vocab_size())
        for text in TEXTS + random_texts(200):
            ids = hf_ids(tok, text)
            assert ids == ref.encode(text).ids, repr(text)
            assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False) == text


def test_opt_style_config(tiny_bpe, tmp_path):
    """OPT: GPT2Tokenizer files plus a config naming </s> as bos/eos, <pad> as pad, and
    add_bos_token."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=400, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],  # OPT's ids 0-3
                            show_progress=False)
    bpe.save_model(str(tmp_path))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True,
         "bos_token": {"content": "</s>", "lstrip": False, "__type": "AddedToken"},
         "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "</s>",
         "tokenizer_class": "GPT2Tokenizer"}))
    tok = Tokenizer.from_pretrained(tmp_path)
    hf = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (2, 2, 1, True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (2, 2, 1)
    for text in ["the fox</s> jumps", "<pad>hi</s>", "plain text", ""] + random_texts(50):
        assert ([tok.bos_id] + hf_ids(tok, text) == tok.encode(text, bos=True, allowed_special="all")
                == hf(text)["input_ids"]), repr(text)


def test_tokenizer_json_bloom_style(tmp_path):
    """BLOOM: a Split regex (an Oniguruma nested character class) then ByteLevel without GPT-2's
    regex."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    ref = tokenizers.Tokenizer(models.BPE())
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), behavior="isolated",
                             invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    ref.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    ref.train_from_iterator(corpus(), trainer=trainer)
    # an added token beyond the vocab: counts in vocab_size, split out of text
    ref.add_tokens(["<extra>"])
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.vocab_size == ref.get_vocab_size() == ref.token_to_id("<extra>") + 1
    texts = TEXTS + corpus(20, seed=2) + random_texts(300) + ["a…b。c，d, e! <extra>?",
                                                              "x<extra>y</s>"]
    for text in texts:
        ids = hf_ids(tok, text)
        assert ids == ref.encode(text).ids, repr(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False) == text


# ---- errors --------------------------------------------------------------------------------------


def test_missing_files_names_folder(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")  # half a pair is not enough
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as err:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value) and "merges.txt" in str(err.value)
    with pytest.raises(ValueError, match="expected"):
        Tokenizer.from_pretrained(tmp_path / "vocab.json")


def small_vocab(tmp_path, merges):
    vocab = {c: i for i, c in enumerate(["a", "b", "ab", "<|endoftext|>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(merges)


def test_small_handmade_vocab(tmp_path):
    small_vocab(tmp_path, "#version: 0.2\na b\n")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("abba<|endoftext|>", allowed_special={"<|endoftext|>"}) == [2, 1, 0, 3]


@pytest.mark.parametrize("merges, match", [
    ("#version: 0.2\nab\n", r"merges\.txt: line 2"),            # not "a b"
    ("a b c\n", r"merges\.txt: line 1"),
    ("a zz\n", r"merges\.txt: merge #1 'a zz' uses a token missing"),
])
def test_malformed_merges(tmp_path, merges, match):
    small_vocab(tmp_path, merges)
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_vocab(tmp_path):
    small_vocab(tmp_path, "a b\n")
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": ')
    with pytest.raises(ValueError, match=r"vocab\.json: not a valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text('["a", "b"]')
    with pytest.raises(ValueError, match=r"vocab\.json: expected a JSON object"):
        Tokenizer.from_pretrained(tmp_path)


def test_unsupported_tokenizer_json(tmp_path):
    """A step not implemented here is refused with its name, never skipped: skipping it would
    give other ids than the model saw. The error is a ValueError (the scripts print one line) and
    a NotImplementedError."""
    def refused(match, **changes):
        data = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "added_tokens": [],
                "normalizer": None,
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
                "decoder": {"type": "ByteLevel"}}
        (tmp_path / "tokenizer.json").write_text(json.dumps({**data, **changes}))
        with pytest.raises(UnsupportedTokenizer, match=r"tokenizer\.json: " + match) as err:
            Tokenizer.from_pretrained(tmp_path)
        assert isinstance(err.value, ValueError) and isinstance(err.value, NotImplementedError)

    refused(r"unsupported pre-tokenizer step Digits",
            pre_tokenizer={"type": "Sequence",
                           "pretokenizers": [{"type": "Digits"}, {"type": "ByteLevel"}]})
    refused(r"unsupported pre-tokenizer step Split .*Removed", pre_tokenizer={
        "type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Removed", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]})
    refused(r"unsupported pre-tokenizer step ByteLevel .*add_prefix_space\": true",
            pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True})
    refused(r"only byte-level BPE", pre_tokenizer={"type": "Whitespace"})  # not byte-level at all
    refused(r"only byte-level BPE", decoder={"type": "Metaspace"})
    refused(r"only BPE models are supported, not WordPiece",
            model={"type": "WordPiece", "vocab": {"a": 0}})
    refused(r"BPE dropout", model={"type": "BPE", "vocab": {"a": 0}, "merges": [], "dropout": 0.1})
    refused(r"unsupported normalizer Lowercase", normalizer={"type": "Lowercase"})
    refused(r"unsupported normalizer Prepend", normalizer={
        "type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Prepend", "prepend": "_"}]})
    refused(r"added token '<x>' sets lstrip", added_tokens=[
        {"id": 1, "content": "<x>", "lstrip": True, "rstrip": False, "single_word": False,
         "special": True, "normalized": False}])
