"""Training batches: random windows of a token corpus, packed with ``cu_seqlens`` at document starts.

A batch is ``batch_size`` rows of ``seq_len + 1`` tokens (inputs and next-token targets). Each row is cut
into sequences at its start and at every BOS token, and all rows are packed into one stream of
``batch_size * seq_len`` tokens with ``cu_seqlens``, so attention and the key convolution never cross a
document. A row may instead hold a retrieval sample (``flashmoba.data.niah``), which starts with BOS.

Windows are drawn by a numpy generator seeded with (seed, rank, step, micro-step): a batch depends only
on its step, so a resumed run sees exactly the batches the uninterrupted one would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flashmoba._checks import check_real
from flashmoba.data.corpus import TokenCorpus
from flashmoba.data.niah import TASKS, make_sample


@dataclass
class PackedBatch:
    """Packed sequences: ``input_ids``/``targets`` ``[total]`` int64 (target -100: none), int32
    ``cu_seqlens``; ``loss_weights`` (float32 ``[total]`` or None) weights each target in the training loss.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    loss_weights: torch.Tensor | None = None

    def to(self, device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            self.cu_seqlens.to(device, non_blocking=True),
            self.max_seqlen,
            None if self.loss_weights is None else self.loss_weights.to(device, non_blocking=True),
        )

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def with_static_shapes(self, row_length: int) -> PackedBatch:
        """The same batch with shapes that take few values, for CUDA graphs: ``cu_seqlens`` padded to a
        power-of-two number of sequences by repeating its last offset (empty sequences at the end, which
        every kernel skips), and ``max_seqlen`` the row length (an upper bound, as it must be). The
        tokens, and so every output and gradient, are unchanged."""
        if row_length < self.max_seqlen:
            raise ValueError(f"row_length must be >= max_seqlen ({self.max_seqlen}), got {row_length}")
        sequences = self.num_sequences
        padding = (1 << max(sequences - 1, 0).bit_length()) - sequences
        cu_seqlens = torch.cat([self.cu_seqlens, self.cu_seqlens[-1:].expand(padding)])
        return PackedBatch(self.input_ids, self.targets, cu_seqlens, row_length, self.loss_weights)


def pack_rows(rows: np.ndarray, bos_id: int) -> PackedBatch:
    """Pack ``rows [batch, seq_len + 1]`` into a ``PackedBatch`` of ``batch * seq_len`` tokens.

    Inputs are ``rows[:, :-1]``, targets ``rows[:, 1:]``. A sequence starts at each row start and at each
    input token equal to ``bos_id``. The last token of a document keeps its target (the next document's
    BOS): predicting it means predicting where a document ends.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must be [batch, seq_len + 1] with seq_len >= 1, got shape {rows.shape}")
    batch, seq_len = rows.shape[0], rows.shape[1] - 1
    inputs, targets = rows[:, :-1], rows[:, 1:]
    starts = inputs == bos_id
    starts[:, 0] = True
    start_positions = np.flatnonzero(starts.reshape(-1))
    cu_seqlens = np.append(start_positions, batch * seq_len).astype(np.int32)
    max_seqlen = int(np.diff(cu_seqlens).max())
    return PackedBatch(
        torch.from_numpy(inputs.reshape(-1).copy()),
        torch.from_numpy(targets.reshape(-1).copy()),
        torch.from_numpy(cu_seqlens),
        max_seqlen,
    )


def sample_windows(corpus: TokenCorpus, batch_size: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``[batch_size, length]`` int64 windows at uniformly random offsets of the corpus (shards weighted by
    size)."""
    usable = np.array([max(0, len(shard) - length + 1) for shard in corpus.shards], dtype=np.float64)
    if usable.sum() == 0:
        raise ValueError(f"corpus {corpus.name!r} has no shard of at least {length} tokens")
    shard_indices = rng.choice(len(corpus.shards), size=batch_size, p=usable / usable.sum())
    rows = np.empty((batch_size, length), dtype=np.int64)
    for row, shard_index in enumerate(shard_indices):
        start = int(rng.integers(int(usable[shard_index])))
        rows[row] = corpus.shards[shard_index][start : start + length]
    return rows


def batch_rng(seed: int, rank: int, step: int, micro_step: int = 0) -> np.random.Generator:
    """The generator of one micro-batch: a pure function of its coordinates (exact resume)."""
    return np.random.default_rng([seed, rank, step, micro_step])


def sample_batch(
    corpus: TokenCorpus,
    batch_size: int,
    seq_len: int,
    rng: np.random.Generator,
    *,
    task_fraction: float = 0.0,
    tasks: tuple[str, ...] = TASKS,
    answer_loss_weight: float = 1.0,
) -> PackedBatch:
    """A packed training batch; each row is a retrieval sample with probability ``task_fraction``.

    With ``answer_loss_weight != 1`` the batch carries ``loss_weights``: that weight on the targets of
    retrieval answers (the tokens that can only be predicted by finding the needle), 1 elsewhere.
    """
    task_fraction = check_real("task_fraction", task_fraction, minimum=0.0, maximum=1.0)
    answer_loss_weight = check_real("answer_loss_weight", answer_loss_weight, exclusive_minimum=0)
    rows = sample_windows(corpus, batch_size, seq_len + 1, rng)
    weights = np.ones((batch_size, seq_len), dtype=np.float32) if answer_loss_weight != 1.0 else None
    if task_fraction > 0:
        for row in np.flatnonzero(rng.random(batch_size) < task_fraction):
            task = tasks[int(rng.integers(len(tasks)))]
            sample = make_sample(task, seq_len + 1, rng)
            rows[row] = sample.tokens
            if weights is not None:  # token p of the row is the target at index p - 1
                weights[row, sample.answer_span[0] - 1 : sample.answer_span[1] - 1] = answer_loss_weight
    batch = pack_rows(rows, corpus.bos_id)
    if weights is not None:
        batch.loss_weights = torch.from_numpy(weights.reshape(-1))
    return batch
