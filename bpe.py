"""
Our byte-level BPE (GPT-2, GPT-J, OPT, BLOOM, Llama 3, Qwen2/2.5), read from any of its file forms:
vocab.json + merges.txt (Hugging Face names), encoder.json + vocab.bpe (OpenAI's), a Hugging Face
tokenizer.json, or Llama 3's tiktoken `tokenizer.model` (lines "base64(token) rank").

The ids are those of the reference implementations (GPT-2's encoder.py, Hugging Face tokenizers,
tiktoken), checked in tests/test_bpe.py. Tokenizer.from_pretrained (tokenizer.py) picks this kind
from the files; the interface and the errors are tokenizer_base.py's.
"""

import base64
import binascii
import heapq
import json
import unicodedata
from pathlib import Path

# the pre-tokenizers need \p{L}/\p{N} unicode classes and scoped flags, which the stdlib `re` lacks
import regex

from tokenizer_base import (BaseTokenizer, TokenizerError, UnsupportedTokenizer, alternation,
                            json_of, read_config)

# GPT-2's pre-tokenizer: splits text into words (with their leading space), numbers, punctuation
# runs and whitespace; BPE then runs inside each piece only, so merges never cross these boundaries.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Llama 3's (llama_models/llama3/tokenizer.py): contractions in any case, a letter run takes one
# leading non-letter (" the", "(the"), numbers go in groups of at most 3 digits, and newlines stay
# with the punctuation or whitespace before them. A tiktoken file does not store its pattern.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_N_BASE = 128_000  # ranks in Llama 3's tokenizer.model; its 256 special tokens follow
# Llama 3's special tokens, ids 128000..128255 in this order (llama_models/llama3/tokenizer.py)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(2, 258 - len(LLAMA3_SPECIAL))]

# the first line of a tiktoken BPE file ("base64(token) rank"); a sentencepiece model is protobuf
TIKTOKEN_LINE = regex.compile(rb"[A-Za-z0-9+/]+=*[ \t]+[0-9]+\s*")
TIKTOKEN_FORMAT = "a tiktoken BPE file (lines 'base64(token) rank', as Llama 3's)"


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode char map: BPE tokens are strings over these 256
    chars. Printable latin-1 bytes map to themselves; the rest (control chars, space, ...) are
    shifted to 256+n, so that vocab files never contain whitespace or control characters (a space
    becomes 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_CHARS = [c for _, c in sorted(bytes_to_unicode().items())]  # byte value -> its char
BYTE_VALUES = {c: b for b, c in enumerate(BYTE_CHARS)}  # its char -> the byte value


class BPETokenizer(BaseTokenizer):
    """Byte-level BPE as in GPT-2: text -> special and added tokens split out -> normalizer ->
    pre-tokenizer pieces -> utf-8 bytes mapped to unicode chars -> merges by rank (lowest first)
    -> ids."""

    def __init__(self, vocab, merges=None, special_tokens=None, splits=(("regex", GPT2_PATTERN),),
                 config=None, name="?", added_tokens=None, normalizers=(), ignore_merges=False,
                 add_bos=None, folder=None):
        # vocab: token -> id. merges: (a, b) pairs, earliest learned first; None = tiktoken's rule,
        # where a pair's rank is the rank (id) of the token it makes. special_tokens: control
        # token -> id. added_tokens: token -> (id, normalized) of HF's non-special added tokens.
        # splits: pre-tokenizer steps; normalizers: unicode forms applied first; ignore_merges: a
        # piece that is itself a token is that token. config: HF tokenizer_config dict naming
        # bos/eos/pad; add_bos: the default when config does not say; folder: for
        # generation_config.json; name: for messages.
        self.name = name
        self.encoder = dict(vocab)
        self.ranks = None if merges is None else self._merge_ranks(merges)
        self.ignore_merges = ignore_merges
        self.splits = [_compile_step(kind, p) for kind, p in splits]
        self.normalizers = tuple(normalizers)
        self.special = dict(special_tokens or {})
        added = dict(added_tokens or {})
        self._set_named_ids(config or {}, add_bos, added)
        self.added = {t: i for t, (i, _) in added.items()}
        # Hugging Face matches added tokens in the raw text, normalizes the rest, then matches the
        # added tokens that are normalized themselves (all at once when there is no normalizer)
        late = {t for t, (_, normalized) in added.items() if normalized and self.normalizers}
        self.added_raw = frozenset(self.added.keys() - late)
        self.added_normalized = frozenset(late)

        self.decoder = {i: t for t, i in self.encoder.items()}
        self.decoder.update({i: t for t, i in {**self.added, **self.special}.items()})
        self.vocab_size = max(self.decoder) + 1
        self.set_stop_ids(folder)
        # words repeat a lot in text: cache their ids, like GPT-2's encoder.py (a plain dict keeps
        # the tokenizer picklable for multiprocessing data loaders; cleared when big so memory
        # stays bounded)
        self.cache = {}

    def _merge_ranks(self, merges):
        """(a, b) -> rank from 1 (earliest learned); every part must be in the vocabulary."""
        ranks = {}
        for n, (a, b) in enumerate(merges, start=1):
            if a not in self.encoder or b not in self.encoder or a + b not in self.encoder:
                raise TokenizerError(f"{self.name}: merge #{n} '{a} {b}' "
                                     "uses a token missing from the vocabulary")
            ranks.setdefault((a, b), n)
        return ranks

    def _set_named_ids(self, config, add_bos, added):
        """bos/eos/pad ids from the HF config's token names, else the vocabulary family's. Named
        tokens are special; one the config names but the vocabulary lacks gets the next free id,
        as HF adds it."""
        known = {**self.encoder, **self.special, **added}
        names = {k: config.get(k) or d for k, d in _default_names(known).items()}
        names = {k: v.get("content") if isinstance(v, dict) else v for k, v in names.items()}
        if not names["eos_token"]:
            raise TokenizerError(f"{self.name}: no end-of-text token (<|endoftext|>, </s> or "
                                 "<|end_of_text|>); name one as eos_token in tokenizer_config.json")
        names["bos_token"] = names["bos_token"] or names["eos_token"]
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extra = [t.get("content") if isinstance(t, dict) else t for t in extra]
        for tok in [t for t in names.values() if t] + extra:
            if tok in added:
                self.special[tok] = added.pop(tok)[0]
            elif tok not in self.special:
                taken = [*self.encoder.values(), *self.special.values(),
                         *(i for i, _ in added.values())]
                self.special[tok] = self.encoder.get(tok, max(taken) + 1)
        self.bos_id = self.special[names["bos_token"]]
        self.eos_id = self.special[names["eos_token"]]
        # GPT-2/GPT-J have no pad token: pad with eos (padding is masked out of attention and loss)
        self.pad_id = self.special[names["pad_token"]] if names["pad_token"] else self.eos_id
        self.add_bos = bool(config.get("add_bos_token", add_bos or False))

    # ---- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_file, merges_file):
        """vocab.json + merges.txt (Hugging Face names) or encoder.json + vocab.bpe (OpenAI names).
        Special tokens and bos/eos/pad come from tokenizer_config.json / special_tokens_map.json /
        added_tokens.json next to the files when present (OPT), else GPT-2's <|endoftext|>."""
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        vocab = json_of(vocab_file)
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise TokenizerError(f"{vocab_file}: expected a JSON object "
                                 "mapping token strings to integer ids")
        merges = []
        lines = merges_file.read_text(encoding="utf-8").split("\n")
        for n, line in enumerate(lines, start=1):
            if (n == 1 and line.startswith("#version")) or not line.strip():
                continue  # header written by the BPE trainers; trailing empty line
            pair = line.rstrip("\r").split(" ")
            if len(pair) != 2 or not all(pair):
                raise TokenizerError(f"{merges_file}: line {n} is not a merge 'a b': {line[:80]!r}")
            merges.append(pair)
        config, special, added = read_config(vocab_file.parent)
        return cls(vocab, merges, special, config=config, name=str(merges_file),
                   added_tokens=added, folder=vocab_file.parent)

    @classmethod
    def from_tiktoken(cls, path, pattern=LLAMA3_PATTERN, special_tokens=None):
        """A tiktoken BPE file: one "base64(token bytes) rank" per line, ranks 0..n-1, a token's
        rank being both its id and its merge priority. The file holds neither the pre-tokenizer
        pattern nor the special tokens, so only Llama 3's (128,000 ranks) is read by default; pass
        pattern and special_tokens (token -> id) for another."""
        path = Path(path)
        ranks = _read_tiktoken(path)
        if special_tokens is None:
            if len(ranks) != LLAMA3_N_BASE:
                raise UnsupportedTokenizer(
                    f"{path}: a tiktoken BPE file of {len(ranks)} tokens; only Llama 3's "
                    f"({LLAMA3_N_BASE}) is known (the file stores no pattern or special tokens)")
            special_tokens = {t: LLAMA3_N_BASE + i for i, t in enumerate(LLAMA3_SPECIAL)}
        vocab = {"".join(BYTE_CHARS[b] for b in token): rank for token, rank in ranks.items()}
        config, special, added = read_config(path.parent)
        return cls(vocab, None, {**special_tokens, **special}, splits=[("regex", pattern)],
                   config=config, name=str(path), added_tokens=added, ignore_merges=True,
                   add_bos=True, folder=path.parent)

    @classmethod
    def from_tokenizer_json(cls, path):
        """Hugging Face's tokenizer.json: a BPE model (ignore_merges read) with an optional unicode
        normalizer (NFC for Qwen2), a ByteLevel pre-tokenizer (GPT-2) or a Split regex followed by
        ByteLevel without its own regex (BLOOM, Llama 3, Qwen2), and added tokens (special ones are
        control tokens). A step not implemented here is refused by name. From the post_processor,
        only whether it puts BOS first (Llama 3) is read: encode's bos/eos flags do the rest."""
        path = Path(path)
        tj = json_of(path)
        model = tj.get("model") if isinstance(tj, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise TokenizerError(f"{path}: expected a Hugging Face tokenizer.json, a JSON object "
                                 "whose 'model' holds a 'vocab' of token -> id")
        _check_bpe_model(path, model)
        # merges are saved as "a b" strings (tokenizers < 0.20) or as [a, b] pairs
        merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
        if not all(isinstance(m, list) and len(m) == 2 for m in merges):
            raise TokenizerError(f"{path}: model.merges must hold 'a b' strings or [a, b] pairs")
        normalizers = _normalizer_forms(path, tj.get("normalizer"))
        splits = _pre_tokenizer_splits(path, tj.get("pre_tokenizer"))
        if (tj.get("decoder") or {}).get("type") != "ByteLevel":
            raise UnsupportedTokenizer(f"{path}: only byte-level BPE (ByteLevel pre-tokenizer and "
                                       "decoder) is supported")
        special, added = _added_tokens(path, tj.get("added_tokens") or [])
        config, more_special, more_added = read_config(path.parent)
        # tokenizer_config.json may list the same tokens: tokenizer.json's flags win
        listed = special.keys() | added.keys()
        special.update({t: i for t, i in more_special.items() if t not in listed})
        added.update({t: v for t, v in more_added.items() if t not in listed})
        return cls(vocab, merges, special, splits=splits,
                   config=config, name=str(path), added_tokens=added,
                   normalizers=normalizers, ignore_merges=bool(model.get("ignore_merges")),
                   add_bos=_prepends_special(tj.get("post_processor")), folder=path.parent)

    # ---- encoding --------------------------------------------------------------------------------

    def encode_ordinary(self, text):
        ids, cache = [], self.cache
        for chunk, added_id in self._chunks(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            for piece in self._pieces(chunk):
                piece_ids = cache.get(piece)  # the hot loop: one dict lookup per piece
                if piece_ids is None:
                    if len(cache) >= 100_000:
                        cache.clear()
                    piece_ids = cache[piece] = self._bpe(piece)
                ids += piece_ids
        return ids

    def _chunks(self, text):
        """(text, None) and (added token, its id) in order: added tokens matched in the raw text,
        the rest normalized, then the added tokens that are normalized themselves matched."""
        for n, raw in enumerate(alternation(self.added_raw).split(text)
                                if self.added_raw else [text]):
            if n % 2:
                yield raw, self.added[raw]
                continue
            for form in self.normalizers:
                raw = unicodedata.normalize(form, raw)
            late = (alternation(self.added_normalized).split(raw) if self.added_normalized
                    else [raw])
            yield from ((s, self.added[s] if m % 2 else None) for m, s in enumerate(late) if s)

    def _pieces(self, text):
        """Run the pre-tokenizer steps (see _compile_step): 'regex' keeps the matches, 'split' and
        'spans' (HF Split, behavior Isolated) the matches and the text between them."""
        if len(self.splits) == 1 and self.splits[0][0] == "regex":
            return self.splits[0][1].findall(text)  # GPT-2, tiktoken: one regex over all text
        pieces = [text]
        for kind, pattern in self.splits:
            if kind == "regex":
                pieces = [s for piece in pieces for s in pattern.findall(piece)]
            elif kind == "split":
                pieces = [s for piece in pieces for s in pattern.split(piece) if s]
            else:
                pieces = [s for piece in pieces for s in _isolated(pattern, piece)]
        return pieces

    def _bpe(self, piece):
        """Repeatedly merge the adjacent pair of lowest rank (leftmost on ties), as GPT-2's
        encoder.py, tiktoken and HF tokenizers do; with ignore_merges (tiktoken, Llama 3's
        tokenizer.json) a piece that is itself a token is that token. A heap of candidate pairs
        over a linked list of parts keeps long words (URLs, base64, CJK runs) near-linear."""
        word = "".join(BYTE_CHARS[b] for b in piece.encode("utf-8"))
        if self.ignore_merges and word in self.encoder:
            return [self.encoder[word]]
        rank = self._rank_function()
        parts = list(word)
        nxt, prv = list(range(1, len(parts))) + [-1], list(range(-1, len(parts) - 1))
        heap = [(r, i, a, b) for i, (a, b) in enumerate(zip(parts, parts[1:]))
                if (r := rank(a, b)) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if parts[i] != a or j < 0 or parts[j] != b:
                # stale: one side was merged into something else since this entry was pushed
                continue
            parts[i], parts[j] = a + b, None
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            # the merged part forms new pairs with its neighbours
            for left, right in ((prv[i], i), (i, nxt[i])):
                if left >= 0 and right >= 0:
                    r = rank(parts[left], parts[right])
                    if r is not None:
                        heapq.heappush(heap, (r, left, parts[left], parts[right]))
        return [self.encoder[p] for p in parts if p is not None]

    def _rank_function(self):
        """(a, b) -> rank or None: the merge list's order, or (tiktoken) the merged token's rank."""
        if self.ranks is None:
            encoder = self.encoder
            return lambda a, b: encoder.get(a + b)
        ranks = self.ranks
        return lambda a, b: ranks.get((a, b))

    def decode(self, ids):
        # like HF's ByteLevel decoder: tokens over the byte alphabet become raw bytes, any other
        # token (an added token such as "<pad>" is fine either way) its utf-8; then invalid utf-8
        # -> U+FFFD, as tiktoken and HF do
        out = bytearray()
        for i in ids:
            token = self.decoder[int(i)]
            if all(c in BYTE_VALUES for c in token):
                out += bytes(BYTE_VALUES[c] for c in token)
            else:
                out += token.encode("utf-8")
        return out.decode("utf-8", errors="replace")


def _compile_step(kind, pattern):
    """A pre-tokenizer step -> (kind, compiled regex). 'regex': matches only (GPT-2's and Llama 3's
    patterns match all text). 'split': a tokenizer.json Split regex wrapped in one capturing group,
    so that regex.split gives the text between matches and the matches, at C speed; 'spans' when
    the regex has groups of its own, which split would return too. V1 mode: tokenizer.json holds
    Oniguruma regexes, which allow nested character classes such as BLOOM's [^(\\s|[.,!?])], and
    the regex module parses those only in V1 mode."""
    if kind == "regex":
        return kind, regex.compile(pattern)
    plain = regex.compile(pattern, regex.V1)
    return ("spans", plain) if plain.groups else ("split", regex.compile(f"({pattern})", regex.V1))


def _isolated(pattern, text):
    """The matches of pattern and the non-empty text between them, in order."""
    start = 0
    for m in pattern.finditer(text):
        yield from (s for s in (text[start:m.start()], m.group()) if s)
        start = m.end()
    if start < len(text):
        yield text[start:]


def _default_names(known):
    """bos/eos/pad/unk token names when no config gives them, by the vocabulary's family."""
    if "<|begin_of_text|>" in known:  # Llama 3; pad as llama_models does
        pad = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in known else None
        return {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                "pad_token": pad, "unk_token": None}
    if "</s>" in known and "<|endoftext|>" not in known:  # BLOOM, OPT
        return {k: t if t in known else None for k, t in
                [("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>"),
                 ("unk_token", "<unk>")]}
    # GPT-2 (as HF GPT2Tokenizer: <|endoftext|> for all but pad), Qwen2
    end = "<|endoftext|>" if "<|endoftext|>" in known else None
    return {"bos_token": end, "eos_token": end, "pad_token": None, "unk_token": end}


def _read_tiktoken(path):
    """A tiktoken BPE file -> {token bytes: rank}, checked: ranks 0..n-1 each once, and every single
    byte a token (else some text could not be encoded)."""
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}: line {n} is not 'base64(token) rank': "
                                 f"{line[:80]!r}; expected {TIKTOKEN_FORMAT}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once "
                             "(a rank or a token appears twice, or ranks are missing)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} single bytes (e.g. {bytes(missing[:3])!r}) "
                             "are not tokens; a byte-level BPE file has all 256")
    return ranks


def _check_bpe_model(path, model):
    if model.get("type", "BPE") != "BPE":
        raise UnsupportedTokenizer(f"{path}: only BPE models are supported, not {model['type']}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise UnsupportedTokenizer(f"{path}: BPE {key} is not supported")


def _steps(spec, key):
    """A tokenizer.json component -> its steps: a Sequence's list under key, a single step alone,
    none for null."""
    if not spec:
        return []
    return spec.get(key) or [] if spec.get("type") == "Sequence" else [spec]


def _normalizer_forms(path, spec):
    """tokenizer.json's normalizer -> the unicode forms it applies, in order (Qwen2: NFC)."""
    steps = _steps(spec, "normalizers")
    forms = [step.get("type") for step in steps]
    unknown = [f for f in forms if f not in ("NFC", "NFD", "NFKC", "NFKD")]
    if unknown:
        raise UnsupportedTokenizer(f"{path}: unsupported normalizer {unknown[0]} "
                                   "(supported: NFC, NFD, NFKC, NFKD and a Sequence of them)")
    return forms


def _pre_tokenizer_splits(path, spec):
    """tokenizer.json's pre_tokenizer -> our split steps: Split(Isolated) regexes, then ByteLevel
    last (GPT-2's regex when its use_regex is on)."""
    steps = _steps(spec, "pretokenizers")
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise UnsupportedTokenizer(f"{path}: only byte-level BPE (ByteLevel pre-tokenizer, last, "
                                   "and decoder) is supported")
    splits = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and step is steps[-1] and not step.get("add_prefix_space", False):
            if step.get("use_regex", True):
                splits.append(("regex", GPT2_PATTERN))
        elif (kind == "Split" and step.get("behavior") == "Isolated"
              and not step.get("invert", False)):
            pattern = step["pattern"]
            splits.append(("split", pattern["Regex"] if "Regex" in pattern
                           else regex.escape(pattern["String"])))
        else:
            raise UnsupportedTokenizer(f"{path}: unsupported pre-tokenizer step {kind} "
                                       f"{json.dumps(step)[:200]}")
    return splits


def _added_tokens(path, entries):
    """tokenizer.json's added_tokens -> ({special token: id}, {other token: (id, normalized)})."""
    special, added = {}, {}
    for t in entries:
        flags = [k for k in ("lstrip", "rstrip", "single_word") if t.get(k)]
        if flags:
            raise UnsupportedTokenizer(f"{path}: added token {t.get('content')!r} sets "
                                       f"{', '.join(flags)}, which is not supported")
        if t.get("special"):
            special[t["content"]] = t["id"]
        else:
            added[t["content"]] = (t["id"], bool(t.get("normalized")))
    return special, added


def _prepends_special(spec):
    """Whether the post_processor puts a special token before the text (Llama 3's
    TemplateProcessing puts <|begin_of_text|>): the model's default add_bos."""
    steps = _steps(spec, "processors")
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            return "SpecialToken" in step["single"][0]
    return None
