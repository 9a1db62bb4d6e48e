"""
Tokenizers for the base models, without transformers, tokenizers or tiktoken at runtime.

    # a folder, or a tokenizer.model / tokenizer.json file
    tok = Tokenizer.from_pretrained("path/to/model")
    ids = tok.encode("Hello world", bos=tok.add_bos)
    text = tok.decode(ids)

Two kinds, both giving the ids of the reference implementations:
- SentencePiece `tokenizer.model` (LLaMA 1/2): a thin wrapper over the sentencepiece library, here.
- Byte-level BPE (GPT-2, GPT-J, OPT, BLOOM, Llama 3, Qwen2/2.5): our own implementation in bpe.py,
  read from vocab.json + merges.txt, OpenAI's encoder.json + vocab.bpe, a Hugging Face
  tokenizer.json, or Llama 3's tiktoken `tokenizer.model` (lines "base64(token) rank"), which is
  told apart from a sentencepiece model by its content.
Both have the interface of tokenizer_base.BaseTokenizer.

Special tokens (<|endoftext|>, </s>, <|eot_id|>, <|start_header_id|>, ...) are control tokens:
encode() never makes them from text, as sentencepiece and tiktoken's encode_ordinary do, so a data
row cannot end a turn or open a header by containing their text. Templates add them by id
(special_id, or encode(..., allowed_special=...)). Hugging Face's added tokens that are not special
are vocabulary, split out of the text as Hugging Face does. `stop_ids` holds every id that ends a
generation (eos, and end-of-turn tokens such as Llama 3's <|eot_id|>).

`python bench.py --suite=tokenizer` times ours against tiktoken (docs/tokenizers.md).
"""

from pathlib import Path

import sentencepiece as spm

from bpe import TIKTOKEN_FORMAT, TIKTOKEN_LINE, BPETokenizer
from tokenizer_base import BaseTokenizer, TokenizerError


class Tokenizer:
    """The entry point: Tokenizer.from_pretrained(path) returns the kind the files hold,
    SentencePieceTokenizer or bpe.BPETokenizer, both with tokenizer_base.BaseTokenizer's interface
    (encode, decode, bos_id, eos_id, pad_id, vocab_size, add_bos, special_id, stop_ids). The
    choice lives here, apart from the base class, because bpe.py builds on that class: a base
    that named its kinds would import bpe.py, which imports it."""

    @staticmethod
    def from_pretrained(path):
        """Pick the tokenizer from the files found: tokenizer.model (sentencepiece or tiktoken, by
        its content), vocab.json + merges.txt, encoder.json + vocab.bpe, then tokenizer.json (the
        separate BPE files are the reference format)."""
        path = Path(path)
        if path.is_file():
            if path.suffix == ".model":
                return _from_model_file(path)
            if path.suffix == ".json" and path.name not in ("vocab.json", "encoder.json"):
                return BPETokenizer.from_tokenizer_json(path)
            raise TokenizerError(f"{path}: expected a tokenizer.model, a tokenizer.json, "
                                 "or a folder (pass the folder for vocab.json + merges.txt)")
        looked_for = ["tokenizer.model", "vocab.json + merges.txt", "encoder.json + vocab.bpe",
                      "tokenizer.json"]
        if (path / "tokenizer.model").is_file():
            return _from_model_file(path / "tokenizer.model")
        for vocab, merges in [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]:
            if (path / vocab).is_file() and (path / merges).is_file():
                return BPETokenizer.from_files(path / vocab, path / merges)
        if (path / "tokenizer.json").is_file():
            return BPETokenizer.from_tokenizer_json(path / "tokenizer.json")
        raise FileNotFoundError(f"no tokenizer files in {path}: looked for {', '.join(looked_for)}")


def _from_model_file(path):
    """A tokenizer.model is a sentencepiece model (protobuf) or, for Llama 3, a tiktoken BPE text
    file: told apart by the first line, never by the name."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head.strip():
        raise TokenizerError(f"{path}: empty file; expected a sentencepiece model or "
                             f"{TIKTOKEN_FORMAT}")
    if TIKTOKEN_LINE.fullmatch(head.split(b"\n", 1)[0]):
        return BPETokenizer.from_tiktoken(path)
    return SentencePieceTokenizer(path)


class SentencePieceTokenizer(BaseTokenizer):
    """LLaMA's tokenizer.model: sentencepiece does all the work, so ids are sentencepiece's own."""

    add_bos = True  # HF LlamaTokenizer (and LLM-Adapters' prompts) start every sequence with <s>

    def __init__(self, model_file):
        self.name = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError):
            raise TokenizerError(f"{model_file}: could not be read as a sentencepiece model, nor "
                                 f"is it {TIKTOKEN_FORMAT}") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # LLaMA's model has no pad piece (pad_id() == -1); like LLM-Adapters
        # (`tokenizer.pad_token_id = 0`) we pad with id 0 (<unk>), which is masked out of attention
        # and loss anyway.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.vocab_size = self.sp.vocab_size()
        # control pieces (<s>, </s>): sentencepiece never makes them from text either
        self.special = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                        if self.sp.is_control(i)}
        self.set_stop_ids(Path(model_file).parent)

    def encode_ordinary(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])


def check_vocab(tok, n_embed, path):
    """A tokenizer and a model go together only if every id the tokenizer gives has an embedding row
    (the model's table may be larger, padded for speed, never smaller): one error now, not an
    IndexError in the middle of a run."""
    ids = (tok.vocab_size - 1, tok.bos_id, tok.eos_id, tok.pad_id)
    top = max(i for i in ids if isinstance(i, int))
    if top >= n_embed:
        raise ValueError(f"{path}: the tokenizer's ids go up to {top}, but the model's embedding "
                         f"has {n_embed} rows: tokenizer and weights are of different models")
