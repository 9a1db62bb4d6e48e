"""bpe.py, our byte-level BPE, against the reference implementations (GPT-2's vocabulary through
Hugging Face transformers, the `tokenizers` library, tiktoken, llama_models), all offline: every
file form (vocab.json + merges.txt, encoder.json + vocab.bpe, tokenizer.json, tiktoken
tokenizer.model) and every refused step.

Fixtures are built inside the tests: tiny byte-level BPE vocabularies trained with the `tokenizers`
library, a tiny tiktoken file. The real GPT-2 vocabulary is used when ../shared/data/gpt2-bpe
exists, the real Llama 3 tokenizer.model when llama_models is installed (test-only,
requirements-dev.txt).
"""

import base64
import inspect
import json
import pickle
import random
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bpe import LLAMA3_PATTERN, BPETokenizer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from tokenizer_base import TokenizerError, UnsupportedTokenizer  # noqa: E402

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
        ids = tok.encode(text, bos=True, allowed_special="all")
        assert [tok.bos_id] + hf_ids(tok, text) == ids == hf(text)["input_ids"], repr(text)


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


def test_no_end_of_text_token(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "merges.txt").write_text("a b\n")
    with pytest.raises(TokenizerError, match=r"merges\.txt: no end-of-text token"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "ab"}')
    assert Tokenizer.from_pretrained(tmp_path).eos_id == 2


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


# ---- Llama 3: tiktoken tokenizer.model, real ----------------------------------------------------

# written out here rather than imported, so that a wrong bpe.LLAMA3_PATTERN cannot pass
LLAMA3_PATTERN_REF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_TEXTS = TEXTS + [
    "DON'T", "I'LL", "WE'RE THEY'VE I'M HE'D IT'S", "don’t won't", "'S'T'RE'VE'M'LL'D",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "def f(x):\r\n    return {'a': [1, 2]}\r\n", "x = 1_000_000; y=0x1F; z = 3.14e-10",
    "1234567890", "12345 678 9", "٣٤٥ ١٢", "１２３４５", "x²³ Ⅻ ½",
    "a       b", "\t\t\tx", "\n\n\n", " \n\n \n", "x   \n  y", "\r\n\r\n", "end\r\n",
    "a\u3000\u3000b", "line\r\rcr", "tabs\t\n\tmix \x0b\x0c",
    "naïve ﬁancé ſtraße İstanbul \u212a", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚", "مرحبا بالعالم", "नमस्ते दुनिया",
    "안녕하세요", "こんにちは世界", "สวัสดีชาวโลก", "e\u0301 a\u200bb \ufeff",
    "<|eot_id|>", "<|begin_of_text|>hi<|start_header_id|>user<|end_header_id|>\n\n",
    "<|reserved_special_token_5|> <|eot_id|><|eot_id|>", "<|eot_id",
    "a" * 3000, "https://example.com/a/b?c=d&e=f#g aGVsbG8gd29ybGQ=",
]
LLAMA3_ALPHABET = (list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u3000\u200babcXYZsStTdDlLmMvVrReE")
                   + list("0123456789٣５²Ⅻ.,;:!?()[]{}<>|/\\\"'`~@#$%^&*-_=+")
                   + list("éßſ\u212aİ\u0301中文字한국😀👍🏽\u200d👩ΩЖمन")
                   + ["\r\n", "'s", "'S", "'ll", "'LL", "'t", "'T", "'re", "'VE", "'m", "'D",
                      "   ", "the", " the", "ing", "123456", "<|eot_id|>", "<|begin_of_text|>"])


def random_strings(n, alphabet, seed=0, longest=30):
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))
            for _ in range(n)]


def llama3_file():
    llama_models = pytest.importorskip("llama_models")
    path = Path(llama_models.__file__).parent / "llama3/tokenizer.model"
    if not path.is_file():
        pytest.skip(f"llama_models ships no {path}")
    return path


@pytest.fixture(scope="module")
def llama3():
    """Ours from the real Llama 3 tokenizer.model, and tiktoken.Encoding built from the same file
    with the pattern above and llama_models' special tokens."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    path = llama3_file()
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(path)
    ref = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN_REF,
                            mergeable_ranks=load_tiktoken_bpe(str(path)),
                            special_tokens=meta.special_tokens)
    return Tokenizer.from_pretrained(path), ref, meta


def test_llama3_layout_and_ids(llama3):
    tok, ref, meta = llama3
    assert isinstance(tok, BPETokenizer) and meta.pat_str == LLAMA3_PATTERN_REF == LLAMA3_PATTERN
    assert tok.special == meta.special_tokens and len(tok.special) == 256
    assert tok.special_id("<|eot_id|>") == 128009
    assert tok.special_id("<|start_header_id|>") == 128006
    assert ((tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.add_bos)
            == (meta.bos_id, meta.eos_id, meta.pad_id, meta.n_words, True)
            == (128000, 128001, 128004, 128256, True))
    assert tok.stop_ids == set(meta.stop_tokens) == {128001, 128008, 128009}
    for text in ["Hello world", "DON'T", " \r\n x"]:
        assert tok.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: no special token <\|im_end\|>"):
        tok.special_id("<|im_end|>")


@pytest.mark.parametrize("text", LLAMA3_TEXTS)
def test_llama3_matches_tiktoken(llama3, text):
    tok, ref, _ = llama3
    ids = tok.encode(text)
    assert ids == ref.encode_ordinary(text), repr(text)
    assert tok.decode(ids) == ref.decode(ids) == text
    assert hf_ids(tok, text) == ref.encode(text, allowed_special="all"), repr(text)


def test_llama3_random_strings(llama3):
    """10,000 seeded strings of pieces chosen to hit the pattern's edges; ours and tiktoken agree
    on every id (and the time stays small thanks to the piece cache)."""
    tok, ref, _ = llama3
    t0 = time.perf_counter()
    for text in random_strings(10_000, LLAMA3_ALPHABET):
        ids = tok.encode(text)
        assert ids == ref.encode_ordinary(text), repr(text)
        assert tok.decode(ids) == text
    assert time.perf_counter() - t0 < 60


def test_llama3_special_text_is_text(llama3):
    tok, ref, _ = llama3
    text = "Q<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special.values()) and ids == ref.encode_ordinary(text)
    assert tok.encode("<|eot_id|>", allowed_special={"<|eot_id|>"}) == [128009]
    assert 128006 not in tok.encode(text, allowed_special={"<|eot_id|>"})
    with pytest.raises(ValueError, match="allowed_special: <|im_end|> not special tokens"):
        tok.encode(text, allowed_special={"<|im_end|>"})


def test_llama3_partial_decode(llama3):
    """Slices that cut multi-byte characters decode with U+FFFD, like tiktoken's decode."""
    tok, ref, _ = llama3
    ids = tok.encode("😀 中文 é👩‍👧 𝔘")
    for i in range(len(ids)):
        for j in range(i + 1, len(ids) + 1):
            assert tok.decode(ids[i:j]) == ref.decode(ids[i:j])
    assert tok.decode([128009, 128000]) == "<|eot_id|><|begin_of_text|>"


# ---- tiktoken files, tiny (tiktoken only) --------------------------------------------------------


def write_tiktoken(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))


def random_tiktoken_vocab(n=400, seed=0):
    """The 256 bytes, then n tokens each joining two random earlier ones: many are not reached by
    merging smaller tokens, so both tiktoken's rank rule and its whole-piece lookup matter."""
    rng = random.Random(seed)
    tokens = [bytes([b]) for b in range(256)]
    pool = [c.encode() for c in "abstdlSTD '\n1é"]
    while len(tokens) < 256 + n:
        t = rng.choice(pool) + rng.choice(pool)
        if len(t) <= 8 and t not in tokens:
            tokens.append(t)
            pool.append(t)
    return tokens


def test_tiny_tiktoken_matches_tiktoken(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    tokens = random_tiktoken_vocab()
    write_tiktoken(tmp_path / "tokenizer.model", tokens)
    special = {t: len(tokens) + i for i, t in enumerate(["<|begin_of_text|>", "<|end_of_text|>",
                                                         "<|eot_id|>"])}
    tok = BPETokenizer.from_tiktoken(tmp_path / "tokenizer.model", special_tokens=special)
    ref = tiktoken.Encoding("tiny", pat_str=LLAMA3_PATTERN_REF,
                            mergeable_ranks={t: i for i, t in enumerate(tokens)},
                            special_tokens=special)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (656, 657, 659)
    assert tok.stop_ids == {657, 658}
    alphabet = list("abstdlSTD '\n\r1234é中") + ["<|eot_id|>", "'S", "'ll", "  "]
    for text in random_strings(3000, alphabet, seed=1):
        ids = tok.encode(text)
        assert ids == ref.encode_ordinary(text), repr(text)
        assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
        assert tok.decode(ids) == text
    # the pattern and specials are not in a tiktoken file: only Llama 3's size is read by default
    with pytest.raises(UnsupportedTokenizer, match=r"tokenizer\.model: a tiktoken BPE file of "
                                                   r"656 tokens; only Llama 3's \(128000\)"):
        Tokenizer.from_pretrained(tmp_path)


# ---- Hugging Face tokenizer.json: Llama 3 and Qwen2 styles ---------------------------------------


@pytest.fixture(scope="module")
def llama3_json(llama3, tmp_path_factory):
    """The real Llama 3 vocabulary as a tokenizer.json (transformers' TikTokenConverter, as the HF
    checkpoints were made: Split + ByteLevel, ignore_merges) and its `tokenizers` reference."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter

        converter = TikTokenConverter(vocab_file=str(llama3_file()), pattern=LLAMA3_PATTERN_REF)
        hf = converter.converted()
    except (ImportError, TypeError) as e:
        pytest.skip(f"transformers' TikTokenConverter is not usable here: {e}")
    hf.add_special_tokens(sorted(llama3[2].special_tokens, key=llama3[2].special_tokens.get))
    path = tmp_path_factory.mktemp("llama3_json") / "tokenizer.json"
    hf.save(str(path))
    data = json.loads(path.read_text())
    assert data["model"]["ignore_merges"] and data["normalizer"] is None
    assert [s["type"] for s in data["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
    return Tokenizer.from_pretrained(path), HFTokenizer.from_file(str(path))


def test_llama3_tokenizer_json(llama3, llama3_json):
    """Same model, two files: the tokenizer.json gives the ids of `tokenizers` and of tiktoken."""
    tok, hf = llama3_json
    from_model, ref, _ = llama3
    assert (tok.special == from_model.special and tok.stop_ids == from_model.stop_ids
            and (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)
            == (128000, 128001, 128004, 128256))
    for text in LLAMA3_TEXTS + random_strings(2000, LLAMA3_ALPHABET, seed=2):
        ids = hf_ids(tok, text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, repr(text)
        assert ids == ref.encode(text, allowed_special="all"), repr(text)
        assert tok.encode(text) == from_model.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def train_hf_bpe(pattern, specials, normalizer=None, vocab_size=500, extra_vocab=()):
    """A tiny byte-level BPE as Llama 3's and Qwen2's tokenizer.json are laid out: a Split regex,
    ByteLevel without its own regex, ByteLevel decoder, special tokens added after the vocab.
    extra_vocab: tokens put in the vocabulary without a merge that makes them."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    ref = HFTokenizer(models.BPE())
    if normalizer is not None:
        ref.normalizer = normalizer
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ref.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    ref.train_from_iterator(corpus() + ["café naïve 中文 12345 DON'T I'LL\r\n"] * 5,
                            trainer=trainer)
    data = json.loads(ref.to_str())
    for token in extra_vocab:
        data["model"]["vocab"][token] = len(data["model"]["vocab"])
    ref = HFTokenizer.from_str(json.dumps(data))
    ref.add_special_tokens(specials)
    return ref


def load_both(data, folder):
    """Write tokenizer.json; ours and `tokenizers`' from it."""
    from tokenizers import Tokenizer as HFTokenizer

    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return (Tokenizer.from_pretrained(folder),
            HFTokenizer.from_file(str(folder / "tokenizer.json")))


UNICODE_TEXTS = ["cafe\u0301 café", "ﬁ ² Ⅻ ½ ｶﾞ ㈱ Å Å", "한국어 \u1112\u1161\u11ab", "x\u0338 ≯",
                 "<|im_end|>\u0338", "<|eot_id|>\u0301", "ǅ ǆ"]


def test_tokenizer_json_llama3_style_ignore_merges(tmp_path):
    """ignore_merges: a piece that is itself in the vocabulary is that one token, without merging.
    ' zebra' is put in the vocabulary and no merge makes it, so the setting changes its ids."""
    pytest.importorskip("tokenizers")
    from tokenizers import processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    ref = train_hf_bpe(LLAMA3_PATTERN_REF, specials, extra_vocab=["Ġzebra"])
    ref.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        special_tokens=[("<|begin_of_text|>", ref.token_to_id("<|begin_of_text|>"))])
    data = json.loads(ref.to_str())
    zebra_id = ref.token_to_id("Ġzebra")
    texts = (TEXTS + LLAMA3_TEXTS[len(TEXTS):] + UNICODE_TEXTS + [" zebra", "zebra zebras"]
             + random_strings(1000, LLAMA3_ALPHABET + [" zebra"], seed=3))
    zebra = {}
    for ignore in (True, False):
        data["model"]["ignore_merges"] = ignore
        tok, hf = load_both(data, tmp_path / str(ignore))
        assert tok.add_bos and tok.bos_id == hf.token_to_id("<|begin_of_text|>")
        assert tok.stop_ids == {hf.token_to_id(t) for t in specials[1:] if "of_text" in t
                                or "eot" in t}
        for text in texts:
            ids = hf_ids(tok, text)
            assert tok.encode(text, bos=True, allowed_special="all") == hf.encode(text).ids
            assert ids == hf.encode(text, add_special_tokens=False).ids, repr(text)
            assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        zebra[ignore] = tok.encode(" zebra")
    assert zebra[True] == [zebra_id] != zebra[False]


def test_tokenizer_json_qwen2_style(tmp_path):
    """Qwen2/2.5: NFC normalizer, single-digit numbers, <|endoftext|> <|im_start|> <|im_end|>, a
    non-special added token, and the stop ids of tokenizer_config + generation_config."""
    tokenizers = pytest.importorskip("tokenizers")
    ref = train_hf_bpe(QWEN2_PATTERN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                       normalizer=tokenizers.normalizers.NFC())
    ref.add_tokens(["<tool_call>"])  # not special: vocabulary, split from text always
    data = json.loads(ref.to_str())
    assert data["normalizer"] == {"type": "NFC"}
    end, im_end = ref.token_to_id("<|endoftext|>"), ref.token_to_id("<|im_end|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, end]}))
    tok, hf = load_both(data, tmp_path)
    assert (tok.eos_id, tok.pad_id, tok.add_bos, tok.stop_ids) == (im_end, end, False,
                                                                    {im_end, end})
    assert tok.encode("12345") == hf.encode("12345").ids and len(tok.encode("12345")) == 5
    assert tok.encode("cafe\u0301") == tok.encode("café")  # NFC before the BPE
    assert ref.token_to_id("<tool_call>") in tok.encode("a<tool_call>b")
    alphabet = LLAMA3_ALPHABET + ["<|im_end|>", "<tool_call>", "\u0338", "Å", "ﬁ"]
    # NFC joins ">" and U+0338 into "≯": the normalized added token is then not found, as in HF
    assert ref.token_to_id("<tool_call>") not in tok.encode("<tool_call>\u0338")
    for text in TEXTS + UNICODE_TEXTS + random_strings(1000, alphabet, seed=4):
        ids = hf_ids(tok, text)
        assert ids == hf.encode(text).ids, repr(text)


@pytest.mark.parametrize("normalizer", [
    {"type": "NFD"}, {"type": "NFKC"}, {"type": "NFKD"},
    {"type": "Sequence", "normalizers": [{"type": "NFKD"}, {"type": "NFC"}]}])
def test_tokenizer_json_unicode_normalizers(tmp_path, normalizer):
    pytest.importorskip("tokenizers")
    data = json.loads(train_hf_bpe(QWEN2_PATTERN, ["<|endoftext|>", "<|im_end|>"]).to_str())
    tok, hf = load_both({**data, "normalizer": normalizer}, tmp_path)
    plain, _ = load_both({**data, "normalizer": None}, tmp_path / "plain")
    assert any(tok.encode(t) != plain.encode(t) for t in UNICODE_TEXTS)
    for text in UNICODE_TEXTS + TEXTS:
        assert hf_ids(tok, text) == hf.encode(text).ids, repr(text)


@pytest.mark.parametrize("pattern", [r" ?\p{L}+|\p{N}", r"( ?\p{L}+)|(\p{N})"])
def test_tokenizer_json_split_keeps_gaps(tmp_path, pattern):
    """A Split regex that leaves text between its matches: Isolated keeps that text as pieces,
    with or without capturing groups in the regex."""
    pytest.importorskip("tokenizers")
    tok, hf = load_both(json.loads(train_hf_bpe(pattern, ["<|endoftext|>"]).to_str()), tmp_path)
    assert tok.splits[0][0] == ("spans" if "(" in pattern else "split")
    for text in TEXTS + UNICODE_TEXTS + random_strings(300, LLAMA3_ALPHABET, seed=5):
        assert hf_ids(tok, text) == hf.encode(text).ids, repr(text)
