"""T5 tokenizer: sentencepiece `spiece.model`, with the ids of transformers 5's T5Tokenizer."""

from __future__ import annotations

import json
import re
import struct
import unicodedata
from pathlib import Path

import mlx.core as mx
import sentencepiece as spm

# Unicode White_Space (Rust's char::is_whitespace), what the tokenizers WhitespaceSplit splits on.
_WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_META = "\u2581"  # "▁", sentencepiece's escaped space
_UNK_PENALTY = 10.0  # the unknown-character score is the lowest piece score minus this
_ZWJ, _ZWNJ = "\u200d", "\u200c"


def _fields(buf: bytes) -> list[tuple[int, bytes | int]]:
    """(field number, value) pairs of one protobuf message (length-delimited values as bytes)."""
    out, pos = [], 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(buf):
        key = varint()
        wire = key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size = varint()
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((key >> 3, value))
    return out


def _precompiled_charsmap(model_proto: bytes) -> bytes:
    """NormalizerSpec.precompiled_charsmap of a sentencepiece ModelProto (b"" if none)."""
    for number, spec in _fields(model_proto):
        if number == 3:  # normalizer_spec
            for field, value in _fields(spec):
                if field == 2:
                    return value
    return b""


def _user_defined(model_proto: bytes) -> list[str]:
    """Pieces of type USER_DEFINED (split out of the raw text like special tokens)."""
    pieces = [dict(_fields(p)) for n, p in _fields(model_proto) if n == 1]
    return [p[1].decode() for p in pieces if p.get(3) == 4]


def _is_extend(ch: str) -> bool:
    """Characters that join the previous one in a grapheme cluster (Extend, SpacingMark, ZWJ)."""
    cp = ord(ch)
    return (
        unicodedata.category(ch) in ("Mn", "Me", "Mc")
        or ch in (_ZWJ, _ZWNJ)
        or 0x1F3FB <= cp <= 0x1F3FF
        or 0xFF9E <= cp <= 0xFF9F
        or 0xE0020 <= cp <= 0xE007F
    )


def _is_control(ch: str) -> bool:
    """Grapheme_Cluster_Break=Control (no marks attach to it)."""
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cf") and ch not in (_ZWJ, _ZWNJ)


def _graphemes(text: str) -> list[str]:
    """Approximate extended grapheme clusters: a base character and the marks that follow it."""
    clusters: list[str] = []
    for ch in text:
        last = clusters[-1] if clusters else ""
        if (last and _is_extend(ch) and not _is_control(last[-1])) or (last == "\r" and ch == "\n"):
            clusters[-1] += ch
        else:
            clusters.append(ch)
    return clusters


class _CharsMap:
    """sentencepiece's precompiled character map, applied like tokenizers' `Precompiled` normalizer."""

    def __init__(self, blob: bytes):
        (trie_size,) = struct.unpack_from("<I", blob)
        self._units = struct.unpack_from(f"<{trie_size // 4}I", blob, 4)
        self._strings = blob[4 + trie_size :]

    def _transform(self, chunk: str) -> str | None:
        """Replacement of the shortest mapped prefix of `chunk` (darts-clone prefix search)."""
        units, pos = self._units, 0
        pos ^= (units[0] >> 10) << ((units[0] & (1 << 9)) >> 6)
        for byte in chunk.encode():
            pos ^= byte
            unit = units[pos]
            if unit & ((1 << 31) | 0xFF) != byte:
                return None
            pos ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:
                start = units[pos] & ((1 << 31) - 1)
                return self._strings[start : self._strings.index(b"\0", start)].decode()
        return None

    def __call__(self, text: str) -> str:
        """Normalized text: whole short graphemes first, then character by character."""
        out = []
        for grapheme in _graphemes(text):
            if len(grapheme.encode()) < 6:
                norm = self._transform(grapheme)
                if norm is not None:
                    out.append(norm)
                    continue
            for ch in grapheme:
                norm = self._transform(ch)
                out.append(ch if norm is None else norm)
        return "".join(out)


class T5Tokenizer:
    """Text to T5 token ids, matching transformers' T5Tokenizer (tokenizers backend) exactly.

    The pipeline is the one transformers 5 builds for T5: special tokens (`<pad>`, `</s>`, `<unk>`,
    `<extra_id_N>`) are split out of the raw text first; every other segment gets the sentencepiece
    character map (nmt_nfkc) without sentencepiece's own whitespace handling, is split on Unicode
    whitespace, each word gets a leading "▁", and a Unigram Viterbi (unknown characters fused into
    one `<unk>`) picks the pieces; `</s>` is appended.
    """

    def __init__(self, model_file: str | Path, extra_ids: int = 100):
        model_file = str(model_file)
        sp = spm.SentencePieceProcessor(model_file=model_file)
        proto = sp.serialized_model_proto()
        charsmap = _precompiled_charsmap(proto)
        self._normalize = _CharsMap(charsmap) if charsmap else str
        n = sp.get_piece_size()
        pieces = [sp.id_to_piece(i) for i in range(n)]
        scores = [sp.get_score(i) for i in range(n)]
        # Sentinels follow the sentencepiece vocabulary in reverse: <extra_id_0> is the last id.
        pieces += [f"<extra_id_{i}>" for i in range(extra_ids - 1, -1, -1)]
        scores += [0.0] * extra_ids
        self._vocab = {p: (i, s) for i, (p, s) in enumerate(zip(pieces, scores, strict=True))}
        self._max_piece = max(len(p) for p in pieces)
        self._unk_score = min(scores) - _UNK_PENALTY
        self.unk_id = sp.unk_id()
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else 0
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else 1
        self.vocab_size = len(pieces)
        special = [pieces[i] for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
        special += _user_defined(proto) + [f"<extra_id_{i}>" for i in range(extra_ids)]
        self._special = {p: self._vocab[p][0] for p in special}
        alternatives = sorted(special, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> T5Tokenizer:
        """Load `spiece.model` (and `extra_ids` from `tokenizer_config.json`) from a folder."""
        path = Path(path)
        extra_ids = 100
        config = path / "tokenizer_config.json"
        if config.exists():
            extra_ids = int(json.loads(config.read_text()).get("extra_ids", extra_ids))
        return cls(path / "spiece.model", extra_ids=extra_ids)

    def _viterbi(self, word: str) -> list[int]:
        """Best Unigram segmentation of one "▁"-prefixed word (ties keep the first path found)."""
        size = len(word)
        best: list[tuple[float, int, int] | None] = [None] * (size + 1)  # (score, start, id)
        best[0] = (0.0, 0, -1)
        for start in range(size):
            base = best[start][0]
            has_single = False
            for end in range(start + 1, min(size, start + self._max_piece) + 1):
                entry = self._vocab.get(word[start:end])
                if entry is None:
                    continue
                candidate = entry[1] + base
                if best[end] is None or candidate > best[end][0]:
                    best[end] = (candidate, start, entry[0])
                has_single = has_single or end == start + 1
            if not has_single:
                candidate = self._unk_score + base
                if best[start + 1] is None or candidate > best[start + 1][0]:
                    best[start + 1] = (candidate, start, self.unk_id)
        ids: list[int] = []
        end = size
        while end > 0:
            _, start, token = best[end]
            if not (token == self.unk_id and ids and ids[-1] == self.unk_id):  # fuse unknowns
                ids.append(token)
            end = start
        return ids[::-1]

    def _encode_text(self, text: str) -> list[int]:
        """Ids of a segment without special tokens."""
        ids: list[int] = []
        for word in _WHITESPACE.split(self._normalize(text)):
            if not word:
                continue
            if not word.startswith(_META):
                word = _META + word
            for part in re.split(f"(?={_META})", word):
                if part:
                    ids.extend(self._viterbi(part))
        return ids

    def tokenize(self, text: str) -> list[int]:
        """Ids of one prompt, `</s>` appended."""
        ids: list[int] = []
        for i, segment in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self._special[segment])
            elif segment:
                ids.extend(self._encode_text(segment))
        return ids + [self.eos_id]

    def encode(self, prompts: str | list[str]) -> tuple[mx.array, mx.array]:
        """(input_ids, attention_mask), int32 (batch, length), right-padded with `pad_id`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        rows = [self.tokenize(p) for p in prompts]
        length = max(len(r) for r in rows)
        ids = [r + [self.pad_id] * (length - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (length - len(r)) for r in rows]
        return mx.array(ids, dtype=mx.int32), mx.array(mask, dtype=mx.int32)
