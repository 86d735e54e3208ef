"""The tokenizer: a Hugging Face ``tokenizers.Tokenizer`` with the special tokens the model relies on.

``[CLS]`` (or ``<s>``/``[DOC]`` in a tokenizer from elsewhere) is the document's ``[DOC]`` token,
``[MASK]`` feeds the MLM objective and ``[PAD]`` fills batches. No separator tokens are added:
the hierarchy lives in the position enumerations, not in the token stream.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from lhtcli.data.documents import Document
from lhtcli.errors import DataError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # ids 0..4 in a trained tokenizer

# Spellings used by common pretrained tokenizers, in order of preference.
DOC_CANDIDATES = ("[CLS]", "<s>", "[DOC]", "<cls>")
MASK_CANDIDATES = ("[MASK]", "<mask>")
PAD_CANDIDATES = ("[PAD]", "<pad>")
UNK_CANDIDATES = ("[UNK]", "<unk>")
SEP_CANDIDATES = ("[SEP]", "</s>", "<sep>")

PREFIX = "##"  # WordPiece's mark of a word-internal piece
MAX_WORD_CHARS = 100  # longer "words" (URLs, hashes) become [UNK] rather than bloating the vocabulary


def _sentences(documents: Iterable[Document]) -> Iterator[str]:
    for document in documents:
        for section in document:
            yield from section


def count_words(
    sentences: Iterable[str],
    normalizer: normalizers.Normalizer,
    pre_tokenizer: pre_tokenizers.PreTokenizer,
    max_chars: int | None = None,
) -> Counter[str]:
    """Word frequencies after normalisation and pre-tokenisation, as the tokenizer will see them."""
    counts: Counter[str] = Counter()
    chunk: list[str] = []
    seen_chars = 0

    def flush() -> None:
        # One call per chunk: the Rust side is fast, the per-call overhead is not.
        text = normalizer.normalize_str("\n".join(chunk))
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
        chunk.clear()

    for sentence in sentences:
        chunk.append(sentence)
        seen_chars += len(sentence)
        if len(chunk) >= 1000:
            flush()
        if max_chars is not None and seen_chars >= max_chars:
            break
    if chunk:
        flush()
    return counts


def _merge(symbols: list[str], left: str, right: str, merged: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_wordpiece_vocab(counts: Counter[str], vocab_size: int, min_frequency: int = 2) -> list[str]:
    """A WordPiece vocabulary (special tokens first) learnt by byte-pair-style merges.

    This replaces ``tokenizers.trainers.WordPieceTrainer``, whose result changes from run to run
    (it breaks ties between equally frequent pairs by ids assigned in hash-map order). Here ties go
    to the lexicographically smallest pair, so the same corpus always gives the same vocabulary.
    Merging stops at ``vocab_size`` or when no pair occurs ``min_frequency`` times.
    """
    vocab = list(SPECIAL_TOKENS)
    chars: Counter[str] = Counter()
    for word, count in counts.items():
        chars[word[0]] += count
        for ch in word[1:]:
            chars[PREFIX + ch] += count
    # A corpus with more distinct characters than the vocabulary keeps the most frequent ones.
    alphabet = sorted(chars, key=lambda t: (-chars[t], t))[: max(vocab_size - len(vocab), 0)]
    vocab += sorted(alphabet)
    known = set(vocab)

    words: list[list[str]] = []
    freqs: list[int] = []
    for word, count in sorted(counts.items()):
        symbols = [word[0]] + [PREFIX + ch for ch in word[1:]]
        if len(word) <= MAX_WORD_CHARS and known.issuperset(symbols):
            words.append(symbols)
            freqs.append(count)

    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:], strict=False):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    # A lazy max-heap: entries whose count is out of date are skipped when popped.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -negative:
            continue
        if count < min_frequency:
            break
        left, right = pair
        merged = left + right.removeprefix(PREFIX)
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed: set[tuple[str, str]] = set()
        for i in where.pop(pair):
            old_pairs = list(zip(words[i], words[i][1:], strict=False))
            words[i] = _merge(words[i], left, right, merged)
            new_pairs = list(zip(words[i], words[i][1:], strict=False))
            for p in old_pairs:
                pair_counts[p] -= freqs[i]
                changed.add(p)
            for p in new_pairs:
                pair_counts[p] += freqs[i]
                where[p].add(i)
                changed.add(p)
            for p in set(old_pairs) - set(new_pairs) - {pair}:
                where[p].discard(i)
        pair_counts.pop(pair, None)
        changed.discard(pair)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return vocab


class LHTTokenizer:
    """A tokenizer plus the ids of its ``[DOC]``, ``[MASK]``, ``[PAD]`` and ``[UNK]`` tokens."""

    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer") -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        # Text that happens to spell "[MASK]" must stay text, not become the special token.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.pad_id = self._require(PAD_CANDIDATES, "padding", source)
        self.doc_id = self._require(DOC_CANDIDATES, "document ([DOC]/CLS)", source)
        self.mask_id = self._require(MASK_CANDIDATES, "mask", source)
        self.unk_id = self._find(UNK_CANDIDATES)
        self.sep_id = self._find(SEP_CANDIDATES)
        special = {tid for tid, added in tokenizer.get_added_tokens_decoder().items() if added.special}
        known = {self.pad_id, self.doc_id, self.mask_id, self.unk_id, self.sep_id}
        self.special_ids: frozenset[int] = frozenset(special | {i for i in known if i is not None})

    def _find(self, candidates: tuple[str, ...]) -> int | None:
        for token in candidates:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def _require(self, candidates: tuple[str, ...], role: str, source: str) -> int:
        token_id = self._find(candidates)
        if token_id is None:
            names = " or ".join(candidates)
            raise DataError(
                f"{source} has no {role} token (looked for {names}); add it to the tokenizer or use "
                "data.tokenizer: train"
            )
        return token_id

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(cls, documents: Iterable[Document], vocab_size: int, max_chars: int | None = 50_000_000) -> LHTTokenizer:
        """A lower-casing WordPiece tokenizer trained on the sentences of ``documents``.

        Only the first ``max_chars`` characters are read: word statistics settle long before that,
        and a huge corpus should not delay the first training step by minutes.
        """
        normalizer = normalizers.BertNormalizer(lowercase=True)
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        counts = count_words(_sentences(documents), normalizer, pre_tokenizer, max_chars)
        if not counts:
            raise DataError("cannot train a tokenizer: the training corpus has no text")
        vocab = learn_wordpiece_vocab(counts, vocab_size)
        tokenizer = Tokenizer(
            models.WordPiece(
                {token: i for i, token in enumerate(vocab)}, unk_token=UNK, max_input_chars_per_word=MAX_WORD_CHARS
            )
        )
        tokenizer.normalizer = normalizer
        tokenizer.pre_tokenizer = pre_tokenizer
        tokenizer.decoder = decoders.WordPiece()
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(tokenizer, "the trained tokenizer")

    @classmethod
    def from_file(cls, path: str | Path) -> LHTTokenizer:
        """Load a Hugging Face ``tokenizer.json``."""
        path = Path(path)
        if path.is_dir():
            raise DataError(f"data.tokenizer {path} is a directory; give the tokenizer.json file inside it")
        if not path.is_file():
            raise DataError(
                f"tokenizer file not found: {path}; give a Hugging Face tokenizer.json or data.tokenizer: train"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not a tokenizer.json (not UTF-8 text)") from None
        except OSError as exc:
            raise DataError(f"cannot read tokenizer file {path}: {exc.strerror or exc}") from None
        return cls.from_json_str(text, source=str(path))

    @classmethod
    def from_json_str(cls, text: str, source: str = "tokenizer") -> LHTTokenizer:
        try:
            json.loads(text)
            tokenizer = Tokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises plain Exception with a serde message
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise DataError(
                f"{source} is not a Hugging Face tokenizer.json ({detail}); export one with "
                "tokenizer.save('tokenizer.json') or use data.tokenizer: train"
            ) from None
        return cls(tokenizer, source)

    def to_json_str(self) -> str:
        return self._tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        """Write atomically, so a crash never leaves half a tokenizer next to a run."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json_str(), encoding="utf-8")
        tmp.replace(path)

    # ------------------------------------------------------------------ use

    @property
    def backend(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_document(self, doc: Document) -> list[list[list[int]]]:
        """Token ids per sentence per section, without special tokens."""
        sentences = [sentence for section in doc for sentence in section]
        if not sentences:
            return [[] for _ in doc]
        encodings = self._tokenizer.encode_batch_fast(sentences, add_special_tokens=False)
        flat = iter(encodings)
        return [[next(flat).ids for _ in section] for section in doc]

    def encode_text(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def id_to_token(self, token_id: int) -> str:
        token = self._tokenizer.id_to_token(token_id)
        return token if token is not None else UNK

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def decode_ids(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """One label per id, for axis ticks in figures."""
        return [self.id_to_token(i) for i in ids]
