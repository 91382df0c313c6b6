"""A byte-level tokenizer: token i < 256 is the byte i of the UTF-8 text, token 256 marks a document start."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens plus one BOS token; needs no vocabulary file, so it works offline.

    Every document is stored as ``[BOS] + bytes``; the BOS token is where a packed batch starts a new
    sequence (see ``flashmoba.data.packing``).
    """

    vocab_size = 257
    bos_id = 256

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if bos else ids

    def encode_array(self, text: str, *, bos: bool = False) -> np.ndarray:
        """Like ``encode`` but as a uint16 numpy array (fast for long texts)."""
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        return np.concatenate([np.array([self.bos_id], dtype=np.uint16), data]) if bos else data

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; BOS and ids outside the byte range are dropped, bad UTF-8 is replaced."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")
