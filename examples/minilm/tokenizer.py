"""BERT's uncased WordPiece tokenizer, from vocab.txt, in plain Python.

all-MiniLM-L6-v2 reads text through BERT's tokenizer; the workload container has no
``tokenizers`` package, so this is a re-implementation. It follows the reference the
model is used with, Hugging Face's fast tokenizer as configured by the model's
tokenizer.json (``BertNormalizer`` with lowercasing and accent stripping,
``BertPreTokenizer``, ``WordPiece``, the ``[CLS] $A [SEP]`` template), step by step:

1. special tokens written literally in the text (``[MASK]``, ``[SEP]``…) are matched first,
   on the raw text, and become their ids;
2. cleaning: NUL, U+FFFD and control characters (Unicode category C*, except tab, newline
   and carriage return) are dropped; whitespace becomes a space;
3. CJK ideographs get spaces around them, so each is a word of its own;
4. accents are stripped (NFD, then non-spacing marks removed) and the text lowercased;
5. words are split on whitespace, and every punctuation character (ASCII symbols and
   Unicode category P*) is a word of its own;
6. each word is cut greedily into the longest vocabulary pieces, left to right, pieces
   after the first prefixed ``##``; a word with no such cutting, or over 100 characters,
   becomes ``[UNK]``.

Lowercasing is per character, as the reference does it (so a word-final capital sigma
becomes the medial small sigma, where ``str.lower`` on the whole word gives the final one).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

CLS, SEP, UNK, PAD, MASK = "[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
MAX_CHARS_PER_WORD = 100
PREFIX = "##"

# The CJK Unified Ideograph blocks BERT isolates (not Hangul, kana or other CJK scripts,
# which it treats like any letters).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False  # whitespace, turned into a space rather than dropped
    return unicodedata.category(ch).startswith("C")


def _is_whitespace(ch: str) -> bool:
    # Unicode White_Space; the control characters among it are dropped before this is asked.
    return ch.isspace()


def _is_punctuation(ch: str) -> bool:
    # BERT counts every ASCII non-alphanumeric printable ($, +, ^, `…) as punctuation,
    # though Unicode files some of them as symbols.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
    """Steps 2 to 4: clean, space out CJK ideographs, strip accents, lowercase."""
    out: list[str] = []
    for ch in text:
        if ch in "\x00\ufffd" or _is_control(ch):
            continue
        if _is_whitespace(ch):
            out.append(" ")
        elif _is_cjk(ord(ch)):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    decomposed = unicodedata.normalize("NFD", "".join(out))
    return "".join(c.lower() for c in decomposed if unicodedata.category(c) != "Mn")


def pre_tokenize(text: str) -> list[str]:
    """Step 5, on normalised text: whitespace-separated words, punctuation split off."""
    words: list[str] = []
    current: list[str] = []
    for ch in text:
        if _is_whitespace(ch) or _is_punctuation(ch):
            if current:
                words.append("".join(current))
                current = []
            if not _is_whitespace(ch):
                words.append(ch)
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


class WordPieceTokenizer:
    """Text to BERT token ids, for one vocabulary."""

    def __init__(self, vocab: dict[str, int]) -> None:
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks special tokens {missing}")
        self.vocab = vocab
        self.cls_id, self.sep_id, self.unk_id = vocab[CLS], vocab[SEP], vocab[UNK]
        # Longest first, so that no special token is matched by a prefix of another.
        alternatives = sorted(SPECIAL_TOKENS, key=len, reverse=True)
        self._special = re.compile("|".join(re.escape(t) for t in alternatives))
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_vocab_file(cls, path: Path | str) -> WordPieceTokenizer:
        """One token per line; a token's id is its line number (from 0). A duplicate line
        would make ids ambiguous, so it is refused."""
        vocab: dict[str, int] = {}
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                token = line.rstrip("\n").rstrip("\r")
                if token in vocab:
                    raise ValueError(
                        f"{path}:{i + 1}: token {token!r} already on line {vocab[token] + 1}"
                    )
                vocab[token] = i
        return cls(vocab)

    def word_ids(self, word: str) -> list[int]:
        """Step 6 for one word: greedy longest-match-first WordPiece."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids: list[int] = []
        start = 0
        while start < len(word) and len(word) <= MAX_CHARS_PER_WORD:
            end = len(word)
            found = None
            while end > start:
                piece = word[start:end] if start == 0 else PREFIX + word[start:end]
                found = self.vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                break  # one piece with no match makes the whole word unknown
            ids.append(found)
            start = end
        if start < len(word):
            ids = [self.unk_id]
        # Bounded, so that hostile input cannot grow it without limit.
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def tokenize_ids(self, text: str) -> list[int]:
        """The ids of ``text``, without [CLS]/[SEP] and without truncation."""
        ids: list[int] = []
        pos = 0
        for match in self._special.finditer(text):
            for word in pre_tokenize(normalize(text[pos : match.start()])):
                ids.extend(self.word_ids(word))
            ids.append(self.vocab[match.group()])
            pos = match.end()
        for word in pre_tokenize(normalize(text[pos:])):
            ids.extend(self.word_ids(word))
        return ids

    def encode(self, text: str, max_len: int = 256) -> list[int]:
        """``[CLS] tokens [SEP]``, the tokens cut so the whole is at most ``max_len`` ids."""
        if max_len < 2:
            raise ValueError(f"max_len {max_len} leaves no room for [CLS] and [SEP]")
        body = self.tokenize_ids(text)[: max_len - 2]
        return [self.cls_id, *body, self.sep_id]
