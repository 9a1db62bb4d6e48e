"""
What every tokenizer kind shares: the errors, the interface (encode with special tokens, decode,
special ids, stop ids) and the Hugging Face files beside a tokenizer that name its special tokens
(tokenizer_config.json, special_tokens_map.json, added_tokens.json, generation_config.json).

The kinds build on BaseTokenizer: SentencePieceTokenizer (tokenizer.py) and BPETokenizer (bpe.py);
tokenizer.py picks one from the files. This file imports no project file, so both can import it.
"""

import functools
import json
from pathlib import Path

import regex

# special tokens that end a turn (Llama 3: end of text, of a message, of a turn; Qwen/GPT-2): a
# model emits them only to stop, so they are stop ids wherever the vocabulary has them
END_OF_TURN = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read or does not fit: the message names the file and says
    what was expected."""


class UnsupportedTokenizer(TokenizerError, NotImplementedError):
    """A tokenizer file declaring a step (model, normalizer, pre-tokenizer, ...) not implemented
    here. Refused by name: ignoring it would give other ids than the model was trained on."""


class BaseTokenizer:
    """Common interface: encode/decode plus bos_id, eos_id, pad_id, vocab_size and add_bos (whether
    the Hugging Face tokenizer of this model prepends BOS by default: LLaMA, Llama 3 and OPT yes,
    GPT-2/GPT-J/BLOOM/Qwen no); special: control token -> id; stop_ids: the ids that end a
    generation; name: the file, for messages. A kind implements encode_ordinary and decode."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    add_bos: bool = False
    special: dict = {}
    stop_ids: frozenset = frozenset()
    name: str = "?"

    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allowed_special=()) -> list[int]:
        """text -> ids, with bos/eos ids around it when asked. The text of a special token is
        ordinary text unless allowed_special names it (a token, a set of them, or "all")."""
        ids = [self.bos_id] if bos else []
        for n, chunk in enumerate(self._split_special(text, allowed_special)):
            if n % 2:
                ids.append(self.special[chunk])
            elif chunk:
                ids += self.encode_ordinary(chunk)
        return ids + [self.eos_id] * eos

    def _split_special(self, text, allowed):
        """text -> [text, special, text, ...]: the allowed special tokens at odd positions."""
        allowed = (self.special.keys() if allowed == "all" else
                   {allowed} if isinstance(allowed, str) else set(allowed))
        unknown = allowed - self.special.keys()
        if unknown:
            raise ValueError(f"allowed_special: {', '.join(sorted(unknown))} "
                             f"not special tokens of {self.name}")
        return alternation(frozenset(allowed)).split(text) if allowed else [text]

    def special_id(self, token: str) -> int:
        """The id of a special token, for templates: one clear error if this vocabulary lacks it
        (a Llama 3 chat template on a LLaMA tokenizer)."""
        if token not in self.special:
            raise TokenizerError(f"{self.name}: no special token {token} in this tokenizer; "
                                 f"it has {', '.join(list(self.special)[:12]) or 'none'}")
        return self.special[token]

    def encode_ordinary(self, text: str) -> list[int]:
        """text -> ids, the text of special tokens encoded as text (tiktoken's name)."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def set_stop_ids(self, folder):
        """eos, the end-of-turn tokens of the vocabulary, and generation_config.json's eos_token_id
        (an id or a list of ids) when the folder has one."""
        ids = {self.eos_id, *(self.special[t] for t in END_OF_TURN if t in self.special)}
        ids.update(_generation_eos(folder, self.vocab_size))
        self.stop_ids = frozenset(ids)


@functools.lru_cache(maxsize=64)
def alternation(tokens):
    """A regex matching any of the tokens, longest first (so a token containing another wins), as
    one capturing group: split() then puts the matches at odd positions."""
    return regex.compile("(" + "|".join(map(regex.escape, sorted(tokens, key=len, reverse=True)))
                         + ")")


def json_of(path):
    """The JSON in a tokenizer file, or one TokenizerError naming it."""
    text = Path(path).read_bytes()
    if not text.strip():
        raise TokenizerError(f"{path}: empty file; expected JSON")
    try:
        return json.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not a valid JSON file ({e})") from None


def read_config(folder):
    """Merge HF's special_tokens_map.json and tokenizer_config.json (which wins); collect
    tokenizer_config's added_tokens_decoder ({id: {content, special}}) and added_tokens.json
    (non-special) as ({special token: id}, {other token: (id, normalized)})."""
    config, special, added = {}, {}, {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            config.update(json_of(folder / name))
    if (folder / "added_tokens.json").is_file():
        added.update({t: (i, False) for t, i in json_of(folder / "added_tokens.json").items()})
    for i, tok in (config.get("added_tokens_decoder") or {}).items():
        if tok.get("special", True):
            special[tok["content"]] = int(i)
        else:
            added[tok["content"]] = (int(i), bool(tok.get("normalized")))
    return config, special, added


def _generation_eos(folder, vocab_size):
    """generation_config.json's eos_token_id (an id or a list: Llama 3 Instruct lists
    <|end_of_text|>, <|eom_id|>, <|eot_id|>) when the folder has that file."""
    path = Path(folder) / "generation_config.json" if folder else None
    if path is None or not path.is_file():
        return []
    eos = json_of(path).get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and 0 <= i < vocab_size for i in eos):
        raise TokenizerError(f"{path}: eos_token_id must be an id or a list of ids below "
                             f"{vocab_size}, got {eos!r:.80}")
    return eos
