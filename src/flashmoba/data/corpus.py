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

from flashmoba._checks import check_real
from flashmoba.data.tokenizer import ByteTokenizer

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
TOKEN_SUFFIXES = (".bin", ".npy")


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


def _text_file_documents(path: Path) -> Iterator[tuple[str, str]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines):
                if line.strip():
                    record = json.loads(line)
                    if "text" not in record:
                        raise ValueError(f"{path}:{line_number + 1}: a jsonl record needs a 'text' field")
                    yield f"{path}:{line_number}", record["text"]
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
        text = record["text"]
        yield f"{spec}:{index}", text
        seen += len(text)
        if seen >= max_bytes:
            return


def _tokenize_documents(documents, tokenizer: ByteTokenizer, val_fraction: float, name: str):
    train_parts, val_parts = [], []
    for doc_name, text in documents:
        tokens = tokenizer.encode_array(text, bos=True)
        (val_parts if _in_validation(doc_name, val_fraction) else train_parts).append(tokens)
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


def _load_token_shards(paths: list[Path], bos_id: int, val_fraction: float, name: str):
    train, val = [], []
    for path in paths:
        tokens = (
            np.load(path, mmap_mode="r")
            if path.suffix == ".npy"
            else np.memmap(path, dtype=np.uint16, mode="r")
        )
        if tokens.ndim != 1:
            raise ValueError(f"token shard {path} must be 1-D, got shape {tokens.shape}")
        cut = int(len(tokens) * (1 - val_fraction))
        train.append(tokens[:cut])
        val.append(tokens[cut:])
    return TokenCorpus(train, bos_id, f"{name}/train"), TokenCorpus(val, bos_id, f"{name}/val")


def _corpus_files(spec: str) -> list[Path]:
    """The files a path spec names: a directory's corpus files, a glob's matches, or the one file."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + TOKEN_SUFFIXES)
    if any(ch in spec for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)))
    if path.exists():
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
) -> tuple[TokenCorpus, TokenCorpus]:
    """(train, validation) corpora for ``spec`` (see the module docstring for the accepted forms)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"corpus spec must be a non-empty str, got {spec!r}")
    val_fraction = check_real("val_fraction", val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tokenizer = ByteTokenizer()
    if spec == "python":
        documents = list(python_source_documents()) + list(python_prose_documents())
        return _tokenize_documents(documents, tokenizer, val_fraction, "python")
    if spec.startswith("hf:"):
        return _tokenize_documents(_hf_documents(spec, max_bytes), tokenizer, val_fraction, spec)

    paths = _corpus_files(spec)
    token_paths = [p for p in paths if p.suffix in TOKEN_SUFFIXES]
    text_paths = [p for p in paths if p.suffix in TEXT_SUFFIXES]
    if token_paths and text_paths:
        raise ValueError(f"corpus {spec!r} mixes text files and token shards; give one kind")
    if token_paths:
        return _load_token_shards(
            token_paths, tokenizer.bos_id if bos_id is None else bos_id, val_fraction, spec
        )
    if not text_paths:
        raise ValueError(f"corpus {spec!r} has no {TEXT_SUFFIXES + TOKEN_SUFFIXES} files")
    return _tokenize_documents(_text_files_documents(text_paths, max_bytes), tokenizer, val_fraction, spec)
