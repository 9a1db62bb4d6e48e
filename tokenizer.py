"""
Tokenizers for the base models of LLM-Adapters, without transformers/tokenizers at runtime.

    # a folder, or a tokenizer.model / tokenizer.json file
    tok = Tokenizer.from_pretrained("path/to/model")
    ids = tok.encode("Hello world", bos=tok.add_bos)
    text = tok.decode(ids)

Two kinds are supported, both giving the same ids as Hugging Face's tokenizers:
- SentencePiece `tokenizer.model` (LLaMA): a thin wrapper over the sentencepiece library.
- Byte-level BPE (GPT-2, GPT-J, OPT, BLOOM): our own implementation, read from vocab.json +
  merges.txt, OpenAI's encoder.json + vocab.bpe, or a Hugging Face tokenizer.json.
"""

import heapq
import json
from pathlib import Path

# GPT-2's pre-tokenizer needs \p{L} / \p{N} unicode classes, which the stdlib `re` lacks
import regex
import sentencepiece as spm

# GPT-2's pre-tokenizer: splits text into words (with their leading space), numbers, punctuation
# runs and whitespace; BPE then runs inside each piece only, so merges never cross these boundaries.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode char map: BPE tokens are strings over these 256
    chars. Printable latin-1 bytes map to themselves; the rest (control chars, space, ...) are
    shifted to 256+n, so that vocab files never contain whitespace or control characters (a space
    becomes 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class Tokenizer:
    """Common interface: encode/decode plus bos_id, eos_id, pad_id, vocab_size and add_bos (whether
    the Hugging Face tokenizer of this model prepends BOS by default: LLaMA and OPT yes,
    GPT-2/GPT-J/BLOOM no)."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    add_bos: bool = False

    @staticmethod
    def from_pretrained(path):
        """Pick the tokenizer from the files found: tokenizer.model,
        vocab.json + merges.txt, encoder.json + vocab.bpe, then
        tokenizer.json (the separate BPE files are the reference format)."""
        path = Path(path)
        if path.is_file():
            if path.suffix == ".model":
                return SentencePieceTokenizer(path)
            if path.suffix == ".json" and path.name not in ("vocab.json", "encoder.json"):
                return BPETokenizer.from_tokenizer_json(path)
            raise ValueError(f"{path}: expected a sentencepiece .model file, a tokenizer.json, "
                             "or a folder (pass the folder for vocab.json + merges.txt)")
        looked_for = ["tokenizer.model", "vocab.json + merges.txt", "encoder.json + vocab.bpe",
                      "tokenizer.json"]
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path / "tokenizer.model")
        for vocab, merges in [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]:
            if (path / vocab).is_file() and (path / merges).is_file():
                return BPETokenizer.from_files(path / vocab, path / merges)
        if (path / "tokenizer.json").is_file():
            return BPETokenizer.from_tokenizer_json(path / "tokenizer.json")
        raise FileNotFoundError(f"no tokenizer files in {path}: looked for {', '.join(looked_for)}")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


def check_vocab(tok, n_embed, path):
    """A tokenizer and a model go together only if every id the tokenizer gives has an embedding row
    (the model's table may be larger, padded for speed, never smaller): one error now, not an
    IndexError in the middle of a run."""
    ids = (tok.vocab_size - 1, tok.bos_id, tok.eos_id, tok.pad_id)
    top = max(i for i in ids if isinstance(i, int))
    if top >= n_embed:
        raise ValueError(f"{path}: the tokenizer's ids go up to {top}, but the model's embedding "
                         f"has {n_embed} rows: tokenizer and weights are of different models")


class SentencePieceTokenizer(Tokenizer):
    """LLaMA's tokenizer.model: sentencepiece does all the work, so ids are sentencepiece's own."""

    add_bos = True  # HF LlamaTokenizer (and LLM-Adapters' prompts) start every sequence with <s>

    def __init__(self, model_file):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # LLaMA's model has no pad piece (pad_id() == -1); like LLM-Adapters
        # (`tokenizer.pad_token_id = 0`) we pad with id 0 (<unk>), which is masked out of attention
        # and loss anyway.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])


class BPETokenizer(Tokenizer):
    """Byte-level BPE as in GPT-2: text -> special tokens split out -> pre-tokenizer pieces -> utf-8
    bytes mapped to unicode chars -> greedy merges by rank (lowest first) -> ids."""

    def __init__(self, vocab, merges, special_tokens=None, splits=(("regex", GPT2_PATTERN),),
                 config=None, name="?"):
        # vocab: token -> id; merges: list of (a, b) pairs, earliest learned first; special_tokens:
        # token -> id of tokens matched verbatim in the text before BPE (e.g. <|endoftext|>);
        # splits: pre-tokenizer steps; config: HF tokenizer_config / special_tokens_map dict naming
        # bos/eos/pad tokens; name: for messages.
        self.encoder = dict(vocab)
        self.ranks = {}
        for n, (a, b) in enumerate(merges, start=1):
            if a not in self.encoder or b not in self.encoder or a + b not in self.encoder:
                raise ValueError(f"{name}: merge #{n} '{a} {b}' "
                                 "uses a token missing from the vocabulary")
            self.ranks.setdefault((a, b), n)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # V1 for the regexes read from tokenizer.json: they are Oniguruma regexes, which allow
        # nested character classes such as BLOOM's [^(\s|[.,!?])]; the regex module parses those
        # only in V1 mode
        self.splits = [(kind, regex.compile(p, regex.V1 if kind == "split" else regex.V0))
                       for kind, p in splits]
        self.special = dict(special_tokens or {})

        # bos/eos/pad/unk token strings: from the HF config when given, else GPT-2's defaults
        # (<|endoftext|> for all but pad, as HF GPT2Tokenizer), or BLOOM's <s> </s> <unk> <pad> for
        # a vocab with </s> instead
        config = config or {}
        known = {**self.encoder, **self.special}
        if "</s>" in known and "<|endoftext|>" not in known:
            defaults = {k: t if t in known else None for k, t in
                        [("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>"),
                         ("unk_token", "<unk>")]}
        else:
            defaults = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                        "pad_token": None, "unk_token": "<|endoftext|>"}
        names = {k: config.get(k) or d for k, d in defaults.items()}
        # AddedToken dicts
        names = {k: v.get("content") if isinstance(v, dict) else v for k, v in names.items()}
        names["bos_token"] = names["bos_token"] or names["eos_token"]
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extra = [t.get("content") if isinstance(t, dict) else t for t in extra]
        for tok in [t for t in names.values() if t] + extra:
            # named special tokens are split out of the text like HF does; one missing from the
            # vocab gets the next free id, as HF adds it
            if tok not in self.special:
                self.special[tok] = self.encoder.get(
                    tok, max([*self.encoder.values(), *self.special.values()]) + 1)
        self.bos_id, self.eos_id = (self.special[names["bos_token"]],
                                    self.special[names["eos_token"]])
        # GPT-2/GPT-J have no pad token: pad with eos (padding
        # is masked out of attention and loss anyway)
        self.pad_id = self.special[names["pad_token"]] if names["pad_token"] else self.eos_id
        self.add_bos = bool(config.get("add_bos_token", False))

        self.decoder = {i: t for t, i in self.encoder.items()}
        self.decoder.update({i: t for t, i in self.special.items()})
        self.vocab_size = max(self.decoder) + 1
        # longest first, so that a special token containing another one wins
        alternatives = sorted(self.special, key=len, reverse=True)
        self.special_re = (regex.compile("(" + "|".join(map(regex.escape, alternatives)) + ")")
                           if alternatives else None)
        # words repeat a lot in text: cache their ids, like GPT-2's encoder.py
        # (a plain dict keeps the tokenizer picklable for multiprocessing data
        # loaders; cleared when big so memory stays bounded)
        self.cache = {}

    # ---- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_file, merges_file):
        """vocab.json + merges.txt (Hugging Face names) or encoder.json + vocab.bpe (OpenAI names).
        Special tokens and bos/eos/pad come from tokenizer_config.json / special_tokens_map.json /
        added_tokens.json next to the files when present (OPT), else GPT-2's <|endoftext|>."""
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        vocab = _read_json(vocab_file)
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise ValueError(f"{vocab_file}: expected a JSON object "
                             "mapping token strings to integer ids")
        merges = []
        lines = merges_file.read_text(encoding="utf-8").split("\n")
        for n, line in enumerate(lines, start=1):
            if (n == 1 and line.startswith("#version")) or not line.strip():
                continue  # header written by the BPE trainers; trailing empty line
            pair = line.rstrip("\r").split(" ")
            if len(pair) != 2 or not all(pair):
                raise ValueError(f"{merges_file}: line {n} is not a merge 'a b': {line[:80]!r}")
            merges.append(pair)
        config, special = _read_config(vocab_file.parent)
        return cls(vocab, merges, special, config=config, name=str(merges_file))

    @classmethod
    def from_tokenizer_json(cls, path):
        """Hugging Face's tokenizer.json: a BPE model with a ByteLevel pre-tokenizer (GPT-2), or a
        Split regex followed by ByteLevel without its own regex (BLOOM). Not read: the
        post_processor (use encode's bos/eos flags) and added tokens' lstrip/rstrip/single_word
        flags (all off in these models)."""
        path = Path(path)
        tj = _read_json(path)
        model = tj.get("model") if isinstance(tj, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
            raise NotImplementedError(f"{path}: only BPE models are supported, "
                                      f"not {model and model.get('type')}")
        if (tj.get("normalizer") or model.get("continuing_subword_prefix")
                or model.get("end_of_word_suffix")):
            raise NotImplementedError(f"{path}: normalizers and subword prefixes/suffixes "
                                      "are not supported")
        # merges are saved as "a b" strings (tokenizers < 0.20) or as [a, b] pairs
        merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
        if not all(isinstance(m, list) and len(m) == 2 for m in merges):
            raise ValueError(f"{path}: model.merges must hold 'a b' strings or [a, b] pairs")
        pre = tj.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        byte_level = any(step.get("type") == "ByteLevel" for step in steps)
        if not byte_level or (tj.get("decoder") or {}).get("type") != "ByteLevel":
            raise NotImplementedError(f"{path}: only byte-level BPE (ByteLevel pre-tokenizer and "
                                      "decoder) is supported")
        splits = []
        for step in steps:
            kind = step.get("type")
            if kind == "ByteLevel" and not step.get("add_prefix_space", False):
                if step.get("use_regex", True):
                    splits.append(("regex", GPT2_PATTERN))
            elif (kind == "Split" and step.get("behavior") == "Isolated"
                  and not step.get("invert", False)):
                pattern = step["pattern"]
                splits.append(("split", pattern["Regex"] if "Regex" in pattern
                               else regex.escape(pattern["String"])))
            else:
                raise NotImplementedError(f"{path}: unsupported pre-tokenizer step "
                                          f"{json.dumps(step)[:200]}")
        # all added tokens (special or not) are matched verbatim before BPE, as HF does
        special = {t["content"]: t["id"] for t in tj.get("added_tokens") or []}
        config, extra = _read_config(path.parent)
        return cls(model["vocab"], merges, {**special, **extra}, splits=splits, config=config,
                   name=str(path))

    # ---- encoding --------------------------------------------------------------------------------

    def _pieces(self, text):
        """Run the pre-tokenizer steps; 'regex' keeps the matches (GPT-2's pattern covers all text),
        'split' (HF Split, behavior Isolated) keeps both the matches and the text between them."""
        pieces = [text]
        for kind, pattern in self.splits:
            out = []
            for piece in pieces:
                if kind == "regex":
                    out += pattern.findall(piece)
                    continue
                start = 0
                for m in pattern.finditer(piece):
                    out += [s for s in (piece[start:m.start()], m.group()) if s]
                    start = m.end()
                out += [piece[start:]] if start < len(piece) else []
            pieces = out
        return pieces

    def _bpe(self, piece):
        """Repeatedly merge the adjacent pair learned earliest (lowest rank; leftmost on ties), as
        GPT-2's encoder.py does. A heap of candidate pairs over a linked list of parts keeps long
        words (URLs, base64, CJK runs) near-linear instead of quadratic; HF tokenizers merges in the
        same order."""
        parts = [self.byte_encoder[b] for b in piece.encode("utf-8")]
        nxt, prv = list(range(1, len(parts))) + [-1], list(range(-1, len(parts) - 1))
        heap = [(self.ranks[p], i, *p) for i, p in enumerate(zip(parts, parts[1:]))
                if p in self.ranks]
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
                if left >= 0 and right >= 0 and (parts[left], parts[right]) in self.ranks:
                    heapq.heappush(heap, (self.ranks[parts[left], parts[right]], left,
                                          parts[left], parts[right]))
        return [self.encoder[p] for p in parts if p is not None]

    def encode(self, text, bos=False, eos=False):
        ids = [self.bos_id] if bos else []
        # with a capturing group, split() returns text
        # chunks at even and special tokens at odd positions
        chunks = self.special_re.split(text) if self.special_re else [text]
        for i, chunk in enumerate(chunks):
            if i % 2:
                ids.append(self.special[chunk])
            else:
                for piece in self._pieces(chunk):
                    if piece not in self.cache:
                        if len(self.cache) >= 100_000:
                            self.cache.clear()
                        self.cache[piece] = self._bpe(piece)
                    ids.extend(self.cache[piece])
        return ids + [self.eos_id] * eos

    def decode(self, ids):
        # like HF's ByteLevel decoder: tokens over the byte alphabet become
        # raw bytes, any other token (an added token such as "<pad>" is
        # fine either way) its utf-8; then invalid utf-8 -> U+FFFD
        out = bytearray()
        for i in ids:
            token = self.decoder[int(i)]
            if all(c in self.byte_decoder for c in token):
                out += bytes(self.byte_decoder[c] for c in token)
            else:
                out += token.encode("utf-8")
        return out.decode("utf-8", errors="replace")


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None


def _read_config(folder):
    """Merge HF's special_tokens_map.json and tokenizer_config.json (which wins), and collect the
    added tokens of added_tokens.json and tokenizer_config's added_tokens_decoder as {token: id}."""
    config, special = {}, {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            config.update(_read_json(folder / name))
    if (folder / "added_tokens.json").is_file():
        special.update(_read_json(folder / "added_tokens.json"))
    for i, tok in (config.get("added_tokens_decoder") or {}).items():
        special[tok["content"]] = int(i)
    return config, special
