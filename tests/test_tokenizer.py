"""tokenizer.py (Tokenizer.from_pretrained choosing the kind, the sentencepiece kind, check_vocab)
and tokenizer_base.py (stop ids, generation_config.json), against the reference
implementations (sentencepiece, Hugging Face transformers, llama_models), all offline. The
byte-level BPE kind is tests/test_bpe.py's, the templates' encoding tests/test_template.py's.

Fixtures are built inside the tests: a tiny sentencepiece model, a tiny tiktoken file. The real
Llama 3 tokenizer.model is used when llama_models is installed (test-only, requirements-dev.txt).
"""

import base64
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bpe import BPETokenizer  # noqa: E402
# the texts and the Llama 3 fixture (ours, tiktoken's and llama_models' from the same file) are
# the BPE tests': the choice of kind uses them too
from test_bpe import TEXTS, llama3, llama3_file  # noqa: E402, F401
from tokenizer import SentencePieceTokenizer, Tokenizer  # noqa: E402
from tokenizer_base import TokenizerError  # noqa: E402


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


# ---- which kind, from the files ------------------------------------------------------------------


def test_missing_files_names_folder(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")  # half a pair is not enough
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as err:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value) and "merges.txt" in str(err.value)
    with pytest.raises(ValueError, match="expected"):
        Tokenizer.from_pretrained(tmp_path / "vocab.json")


def test_llama3_told_by_content(llama3, sp_dir, tmp_path):
    """tokenizer.model holds either kind: the content decides, under any name."""
    path = llama3_file()
    (tmp_path / "tokenizer.model").write_bytes(path.read_bytes())
    (tmp_path / "llama.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    assert isinstance(Tokenizer.from_pretrained(tmp_path), BPETokenizer)
    assert isinstance(Tokenizer.from_pretrained(tmp_path / "llama.model"), SentencePieceTokenizer)
    assert (pickle.loads(pickle.dumps(Tokenizer.from_pretrained(tmp_path))).encode("I'LL")
            == llama3[1].encode_ordinary("I'LL"))


# ---- stop ids ------------------------------------------------------------------------------------


def test_stop_ids_and_generation_config(sp_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    assert Tokenizer.from_pretrained(tmp_path).stop_ids == {2}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    assert Tokenizer.from_pretrained(tmp_path).stop_ids == {2, 7}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 5}')
    assert Tokenizer.from_pretrained(tmp_path).stop_ids == {2, 5}
    for bad in ('{"eos_token_id": "</s>"}', '{"eos_token_id": [2, 320]}'):
        (tmp_path / "generation_config.json").write_text(bad)
        with pytest.raises(TokenizerError, match=r"generation_config\.json: eos_token_id must be "
                                                 r"an id or a list of ids below 320"):
            Tokenizer.from_pretrained(tmp_path)


# ---- corrupt files -------------------------------------------------------------------------------


def test_corrupt_tokenizer_model(tmp_path, sp_dir):
    path = tmp_path / "tokenizer.model"

    def error(content, match):
        path.write_bytes(content)
        with pytest.raises(TokenizerError, match=match) as err:
            Tokenizer.from_pretrained(tmp_path)
        assert str(path) in str(err.value) and "ModelProto" not in str(err.value)

    either = "expected a sentencepiece model or a tiktoken BPE file"
    error(b"", rf"tokenizer\.model: empty file; {either}")
    error(b"\n \n", rf"tokenizer\.model: empty file; {either}")
    unreadable = (r"tokenizer\.model: could not be read as a sentencepiece model, nor is it a "
                  r"tiktoken BPE file \(lines 'base64\(token\) rank'")
    error(b"\x00\x01garbage\xff" * 10, unreadable)
    error((sp_dir / "tokenizer.model").read_bytes()[:1000], unreadable)  # truncated
    error(b"<html>not found</html>\n", unreadable)
    tokens = [base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)]
    error(b"".join(tokens[:2]) + b"!!! 2\n" + b"".join(tokens[3:]),
          r"tokenizer\.model: line 3 is not 'base64\(token\) rank': b'!!! 2'")
    error(b"".join(tokens[:2]) + b"YQ==\n", r"line 3 is not 'base64\(token\) rank'")
    error(b"".join(tokens) + b"YWI= 256\nYWI= 257\n", r"tokenizer\.model: ranks must be 0\.\.256")
    error(b"".join(t.replace(b" %d" % i, b" %d" % (i - 1)) for i, t in enumerate(tokens) if i),
          r"tokenizer\.model: 1 single bytes \(e\.g\. b'\\x00'\) are not tokens")


def test_corrupt_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    for content, match in [("", r"tokenizer\.json: empty file; expected JSON"),
                           ('{"model": ', r"tokenizer\.json: not a valid JSON file"),
                           ("[]", r"tokenizer\.json: expected a Hugging Face tokenizer\.json"),
                           ('{"model": {"type": "BPE"}}', r"expected a Hugging Face")]:
        path.write_text(content)
        with pytest.raises(TokenizerError, match=match):
            Tokenizer.from_pretrained(tmp_path)
