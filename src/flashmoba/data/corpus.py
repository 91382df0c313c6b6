"""Corpora as flat token arrays: the embedded offline default, text/jsonl files, token shards, HF datasets.

A corpus is one or more 1-D token arrays ("shards"; numpy arrays or memory maps) in which each document
starts with the BOS token. Training samples random windows from them (``flashmoba.data.packing``).

Sources (``load_corpus(spec)``):

- ``"python"`` (default): text that ships with Python itself, so it needs no download: the standard
  library's own ``.py`` sources (tests excluded, about 12 MB) and the English reference prose of
  ``pydoc_data.topics``. Its content depends on the Python version that runs it.
- a ``.txt`` / ``.md`` file (one document per file), a ``.jsonl`` file (one document per line, field
  ``"text"``), or a directory of those: tokenized in memory with the byte tokenizer.
- ``.bin`` (raw uint16 tokens, the nanoGPT format) or ``.npy`` token shards, memory-mapped, documents
  starting at ``bos_id``; a directory or glob pattern of shards. Use ``vocab_size``/``bos_id`` of the
  tokenizer that made them.
- ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face dataset read in streaming mode (needs the optional
  ``datasets`` extra and a network); the first ``max_bytes`` of text are tokenized in memory.

Held-out split: text sources put a document in validation when a hash of its name falls in
``val_fraction``; token shards keep their last ``val_fraction`` of tokens for validation.

Bad data is refused while loading, with a ``ValueError`` that names the file (and the line of a jsonl
file): a jsonl line that is not JSON or lacks a string ``"text"`` field; a token shard that is empty,
odd-sized (its byte size is not whole tokens), of a non-integer dtype, or (given ``vocab_size``) holds
an id outside ``[0, vocab_size)``; a corpus with no files, no text, or (given ``seq_len``) no room for
one row of ``seq_len + 1`` tokens in its training or validation split.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashmoba._checks import check_int, check_positive_int, check_real
from flashmoba.data.tokenizer import ByteTokenizer

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
TOKEN_SUFFIXES = (".bin", ".npy")
BIN_DTYPE = np.dtype(np.uint16)  # the token type of raw .bin shards
ID_CHECK_CHUNK = 1 << 22  # tokens per vectorised range check of a (memory-mapped) shard


@dataclass
class TokenCorpus:
    """Token shards (1-D integer arrays) whose documents start with ``bos_id``."""

    shards: list[np.ndarray]
    bos_id: int
    name: str

    @property
    def num_tokens(self) -> int:
        return int(sum(len(shard) for shard in self.shards))


# ----------------------------------------------------------------------------------------------------
# Text that ships with Python
# ----------------------------------------------------------------------------------------------------


def _is_test_path(parts: tuple[str, ...]) -> bool:
    return any(part in ("site-packages", "idle_test", "lib2to3") or part.startswith("test") for part in parts)


def python_source_documents() -> Iterator[tuple[str, str]]:
    """(name, text) of the standard library's ``.py`` files, tests excluded, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _is_test_path(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        try:
            yield f"stdlib/{relative.as_posix()}", path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # unreadable or non-UTF-8 files are skipped
            continue


def python_prose_documents() -> Iterator[tuple[str, str]]:
    """(name, text) of English prose shipped with Python: the help topics of ``pydoc_data``."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out; fall back to module docstrings
        yield from _docstring_documents()
        return
    for key in sorted(topics):
        yield f"pydoc/{key}", topics[key]


def _docstring_documents() -> Iterator[tuple[str, str]]:
    import ast

    for name, source in python_source_documents():
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        docstrings = [
            ast.get_docstring(node)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        text = "\n\n".join(d for d in docstrings if d and len(d) > 80)
        if text:
            yield f"docstrings/{name}", text


def natural_text() -> str:
    """English prose for natural-text haystacks (whitespace collapsed to single spaces)."""
    text = " ".join(text for _, text in python_prose_documents())
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _in_validation(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode("utf-8")) % 10_000 < val_fraction * 10_000


def _jsonl_documents(path: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of each non-blank line of a jsonl file; a bad line is refused with its number."""
    with path.open("rb") as lines:
        for line_index, raw in enumerate(lines):
            where = f"{path}:{line_index + 1}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: line is not valid UTF-8 (byte {error.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where}: line is not valid JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{where}: a jsonl record must be a JSON object with a 'text' field, "
                    f"got a JSON {type(record).__name__}"
                )
            if "text" not in record:
                raise ValueError(f"{where}: a jsonl record needs a 'text' field, got fields {sorted(record)}")
            text = record["text"]
            if not isinstance(text, str):
                raise ValueError(
                    f"{where}: field 'text' must be a string, got {type(text).__name__} {text!r:.40}"
                )
            yield f"{path}:{line_index}", text


def _text_file_documents(path: Path) -> Iterator[tuple[str, str]]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path)
    else:
        yield str(path), path.read_text(encoding="utf-8", errors="replace")


def _hf_documents(spec: str, max_bytes: int) -> Iterator[tuple[str, str]]:
    try:
        import datasets  # optional extra: pip install flashmoba[data]
    except ImportError as error:
        raise ImportError(
            "corpus 'hf:...' needs the optional 'datasets' package: pip install 'flashmoba[data]'"
        ) from error
    parts = spec[len("hf:") :].split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    seen = 0
    for index, record in enumerate(stream):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(
                f"{spec}: record {index} needs a string 'text' field, got "
                + (f"{type(text).__name__}" if isinstance(record, dict) and "text" in record else "none")
            )
        yield f"{spec}:{index}", text
        seen += len(text)
        if seen >= max_bytes:
            return


def _tokenize_documents(documents, tokenizer: ByteTokenizer, val_fraction: float, name: str):
    train_parts, val_parts, count, characters = [], [], 0, 0
    for doc_name, text in documents:
        tokens = tokenizer.encode_array(text, bos=True)
        (val_parts if _in_validation(doc_name, val_fraction) else train_parts).append(tokens)
        count += 1
        characters += len(text)
    if count == 0:
        raise ValueError(
            f"corpus {name!r} is empty: it has no documents (no text, or only blank jsonl lines)"
        )
    if characters == 0:
        raise ValueError(f"corpus {name!r} is empty: its {count} document(s) have no text")
    if not train_parts or not val_parts:  # too few documents to split by name: hold out the tail instead
        everything = np.concatenate(train_parts + val_parts)
        if len(everything) < 4:
            raise ValueError(f"corpus {name!r} is empty or too small ({len(everything)} tokens)")
        cut = int(len(everything) * (1 - val_fraction))
        train_parts = [everything[:cut]]
        val_parts = [np.array([tokenizer.bos_id], dtype=np.uint16), everything[cut:]]
    train = TokenCorpus([np.concatenate(train_parts).astype(np.uint16)], tokenizer.bos_id, f"{name}/train")
    val = TokenCorpus([np.concatenate(val_parts).astype(np.uint16)], tokenizer.bos_id, f"{name}/val")
    return train, val


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy file's header, read without loading the data."""
    with path.open("rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(file)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(file)
        except ValueError as error:
            raise ValueError(f"token shard {path} is not a valid .npy file: {error}") from None
        return shape, dtype, file.tell()


def _open_token_shard(path: Path) -> np.ndarray:
    """A token shard, memory-mapped, after checking that its bytes are a whole 1-D integer array."""
    size = path.stat().st_size
    if path.suffix == ".npy":
        shape, dtype, offset = _npy_header(path)
        if dtype.kind not in "iu":
            kind = "a float" if dtype.kind == "f" else "a non-integer"
            raise ValueError(f"token shard {path} has {kind} dtype {dtype}; token ids need an integer dtype")
        if len(shape) != 1:
            raise ValueError(f"token shard {path} must be 1-D, got shape {shape}")
        expected = offset + shape[0] * dtype.itemsize
        if size != expected:
            raise ValueError(
                f"token shard {path} is odd-sized: its header promises {shape[0]} {dtype} tokens "
                f"({expected} bytes with the header), but the file has {size} bytes"
            )
        if shape[0] == 0:
            raise ValueError(f"token shard {path} is empty (0 tokens)")
        return np.load(path, mmap_mode="r")
    if size % BIN_DTYPE.itemsize:
        raise ValueError(
            f"token shard {path} is odd-sized: {size} bytes is not a multiple of {BIN_DTYPE.itemsize}, "
            f"the size of one {BIN_DTYPE} token (truncated or not a .bin token file?)"
        )
    if size == 0:
        raise ValueError(f"token shard {path} is empty (0 tokens)")
    return np.memmap(path, dtype=BIN_DTYPE, mode="r")


def check_token_ids(tokens: np.ndarray, vocab_size: int, source) -> None:
    """Refuse an id of ``tokens`` outside ``[0, vocab_size)``, naming ``source`` and the first bad one.

    Vectorised over chunks of ``ID_CHECK_CHUNK`` tokens, so a memory-mapped shard is read once in pieces;
    nothing is read when the dtype cannot hold a bad id."""
    info = np.iinfo(tokens.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return
    for start in range(0, len(tokens), ID_CHECK_CHUNK):
        chunk = tokens[start : start + ID_CHECK_CHUNK]
        if int(chunk.min()) >= 0 and int(chunk.max()) < vocab_size:
            continue
        bad = int(np.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0])
        raise ValueError(
            f"token shard {source}: token {start + bad} is id {int(chunk[bad])}, outside the vocabulary "
            f"[0, {vocab_size})"
        )


def _load_token_shards(paths: list[Path], bos_id: int, val_fraction: float, name: str, vocab_size):
    train, val = [], []
    for path in paths:
        tokens = _open_token_shard(path)
        if vocab_size is not None:
            check_token_ids(tokens, vocab_size, path)
        cut = int(len(tokens) * (1 - val_fraction))
        train.append(tokens[:cut])
        val.append(tokens[cut:])
    return TokenCorpus(train, bos_id, f"{name}/train"), TokenCorpus(val, bos_id, f"{name}/val")


def _check_room_for_a_row(corpus: TokenCorpus, split: str, seq_len: int, val_fraction: float) -> None:
    """One row of ``seq_len + 1`` tokens must fit in one shard (windows never cross shards)."""
    longest = max((len(shard) for shard in corpus.shards), default=0)
    if longest < seq_len + 1:
        hint = f"a larger val_fraction (now {val_fraction})" if split == "validation" else "more data"
        raise ValueError(
            f"corpus {corpus.name!r} is too short to cut one row of seq_len + 1 = {seq_len + 1} tokens: "
            f"the longest shard of its {split} split has {longest} tokens; use a shorter seq_len or {hint}"
        )


def _corpus_files(spec: str) -> list[Path]:
    """The corpus files a path spec names: a directory's, a glob's matches, or the one file."""
    suffixes = TEXT_SUFFIXES + TOKEN_SUFFIXES
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
        if not files:
            raise ValueError(f"corpus directory {spec!r} holds no {suffixes} files")
        return files
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)))
        if not matches:
            raise ValueError(f"corpus pattern {spec!r} matches no files")
        files = [p for p in matches if p.suffix in suffixes and p.is_file()]
        if not files:
            shown = ", ".join(p.name for p in matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise ValueError(f"corpus pattern {spec!r} matches no {suffixes} files (it matches {shown})")
        return files
    if path.exists():
        if path.suffix not in suffixes:
            raise ValueError(f"corpus file {spec!r} has suffix {path.suffix!r}; expected one of {suffixes}")
        return [path]
    raise ValueError(
        f"corpus {spec!r} is neither 'python', 'hf:NAME', nor an existing file, directory or glob"
    )


def _text_files_documents(text_paths: list[Path], max_bytes: int) -> Iterator[tuple[str, str]]:
    """The documents of the text files in order, until their text reaches ``max_bytes``."""
    seen = 0
    for text_path in text_paths:
        for document in _text_file_documents(text_path):
            yield document
            seen += len(document[1])
            if seen >= max_bytes:
                return


def load_corpus(
    spec: str = "python",
    *,
    val_fraction: float = 0.05,
    bos_id: int | None = None,
    max_bytes: int = 200_000_000,
    vocab_size: int | None = None,
    seq_len: int | None = None,
) -> tuple[TokenCorpus, TokenCorpus]:
    """(train, validation) corpora for ``spec`` (see the module docstring for the accepted forms).

    ``vocab_size`` (the model's): every token id must lie in ``[0, vocab_size)`` (token shards are scanned
    for it; text sources need ``vocab_size >= 257``, the byte tokenizer's); None: not checked.
    ``seq_len``: both splits must hold one row of ``seq_len + 1`` tokens in a shard; None: not checked.
    """
    if not isinstance(spec, str):
        raise TypeError(f"corpus spec must be a str, got {type(spec).__name__} {spec!r}")
    if not spec:
        raise ValueError("corpus spec must be a non-empty str, got ''")
    val_fraction = check_real("val_fraction", val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    max_bytes = check_positive_int("max_bytes", max_bytes)
    if vocab_size is not None:
        vocab_size = check_positive_int("vocab_size", vocab_size)
    if seq_len is not None:
        seq_len = check_positive_int("seq_len", seq_len)
    if bos_id is not None:
        bos_id = check_int("bos_id", bos_id, minimum=0)
        if vocab_size is not None and bos_id >= vocab_size:
            raise ValueError(f"bos_id {bos_id} is outside the vocabulary [0, {vocab_size})")

    train, val = _load(spec, val_fraction, bos_id, max_bytes, vocab_size)
    if seq_len is not None:
        _check_room_for_a_row(train, "training", seq_len, val_fraction)
        _check_room_for_a_row(val, "validation", seq_len, val_fraction)
    return train, val


def _load(
    spec: str, val_fraction: float, bos_id, max_bytes: int, vocab_size
) -> tuple[TokenCorpus, TokenCorpus]:
    tokenizer = ByteTokenizer()
    is_text = spec == "python" or spec.startswith("hf:")
    paths: list[Path] = []
    if not is_text:
        paths = _corpus_files(spec)
        token_paths = [p for p in paths if p.suffix in TOKEN_SUFFIXES]
        if token_paths and len(token_paths) < len(paths):
            raise ValueError(f"corpus {spec!r} mixes text files and token shards; give one kind")
        if token_paths:
            return _load_token_shards(
                token_paths, tokenizer.bos_id if bos_id is None else bos_id, val_fraction, spec, vocab_size
            )
    if vocab_size is not None and vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"corpus {spec!r} is text, tokenized by the byte tokenizer (ids 0..{tokenizer.vocab_size - 1}), "
            f"which needs vocab_size >= {tokenizer.vocab_size}, got {vocab_size}"
        )
    if spec == "python":
        documents = list(python_source_documents()) + list(python_prose_documents())
        return _tokenize_documents(documents, tokenizer, val_fraction, "python")
    if spec.startswith("hf:"):
        return _tokenize_documents(_hf_documents(spec, max_bytes), tokenizer, val_fraction, spec)
    return _tokenize_documents(_text_files_documents(paths, max_bytes), tokenizer, val_fraction, spec)
