"""What ``flashmoba eval`` measures on a trained model: held-out perplexity, S-NIAH retrieval accuracy,
and the MoBA router's recall of the needle's block.

- ``perplexity``: mean next-token loss over packed held-out batches, its exp, and bits per token (= bits
  per byte with the byte tokenizer).
- ``evaluate_retrieval``: a sample is right when greedy decoding after the prompt produces the value,
  computed in one forward pass by checking that the argmax at every answer position is the answer's next
  token (teacher forcing makes the two identical). Needles sit at evenly spaced depths.
- Router recall, per MoBA layer: the share of (sample, query head) pairs in which a block holding the
  needle's value is among the blocks selected for the last prompt token (the query that must produce
  the answer).

Forward passes run under ``flashmoba.training.runtime.autocast`` at precision ``auto``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flashmoba._checks import check_int, check_positive_int
from flashmoba.data import TASKS, RetrievalSample, batch_rng, make_sample, sample_batch
from flashmoba.models.hybrid import HybridLM
from flashmoba.training.runtime import autocast

__all__ = ["HELDOUT_MICRO_STEP", "RouterProbe", "default_lengths", "evaluate_retrieval", "perplexity"]

# The micro-step id of held-out batches: past any training accumulation and apart from training's
# validation batches.
HELDOUT_MICRO_STEP = 2**31 - 2


@torch.no_grad()
def perplexity(
    model: HybridLM, corpus, seq_len: int, batch_size: int, batches: int, device, seed: int = 0
) -> dict:
    total_loss, total_tokens = 0.0, 0
    for index in range(batches):
        rng = batch_rng(seed, 0, index, micro_step=HELDOUT_MICRO_STEP)
        batch = sample_batch(corpus, batch_size, seq_len, rng).to(device)
        with autocast(device):
            _, loss = model(batch.input_ids, batch.targets, batch.cu_seqlens, batch.max_seqlen)
        tokens = int((batch.targets != -100).sum())
        total_loss += float(loss) * tokens
        total_tokens += tokens
    mean = total_loss / total_tokens
    return {
        "loss": mean,
        "perplexity": math.exp(mean),
        "bits_per_token": mean / math.log(2),
        "tokens": total_tokens,
    }


class RouterProbe:
    """Forward hooks on the MoBA layers that record, for one query position per row, the selected blocks."""

    def __init__(self, model: HybridLM):
        self.layers = model.moba_layers()
        self.query_positions: list[int] = []
        self.selections: dict[int, torch.Tensor] = {}  # layer -> [batch, heads, topk]
        self.handles = [attn.register_forward_hook(self._hook(index)) for index, attn in self.layers]

    def _hook(self, layer_index: int):
        def hook(module, args, output):
            selected = module.select_blocks(args[0])  # [batch, seqlen, heads, topk]
            rows = torch.arange(selected.shape[0], device=selected.device)
            positions = torch.tensor(self.query_positions, device=selected.device)
            self.selections[layer_index] = selected[rows, positions].cpu()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _retrieval_samples(task: str, length: int, samples: int, distractors: int, seed: int):
    """``samples`` samples of ``task`` at ``length`` tokens, needles at evenly spaced depths."""
    rng = np.random.default_rng([seed, TASKS.index(task), length])
    depths = (np.arange(samples) + 0.5) / samples
    return [make_sample(task, length, rng, depth=float(d), distractors=distractors) for d in depths]


def _answer_scores(logits: torch.Tensor, tokens: torch.Tensor, chunk: list[RetrievalSample]):
    """(samples right, answer tokens right, answer tokens) of a batch, by the argmax before each answer
    token."""
    correct = correct_tokens = answer_tokens = 0
    for row, sample in enumerate(chunk):
        first, last = sample.answer_span
        predicted = logits[row, first - 1 : last - 1].argmax(-1)
        correct += bool(torch.equal(predicted, tokens[row, first:last]))
        correct_tokens += int((predicted == tokens[row, first:last]).sum())
        answer_tokens += last - first
    return correct, correct_tokens, answer_tokens


def _needle_hits(selected: torch.Tensor, block_size: int, chunk: list[RetrievalSample]) -> int:
    """(sample, head) pairs of a batch whose selection ``[rows, heads, topk]`` holds a block of the value."""
    hits = 0
    for row, sample in enumerate(chunk):
        value_start, value_end = sample.value_span
        needle_blocks = torch.arange(value_start // block_size, (value_end - 1) // block_size + 1)
        hits += int(torch.isin(selected[row], needle_blocks).any(-1).sum())
    return hits


@torch.no_grad()
def evaluate_retrieval(
    model: HybridLM,
    task: str,
    length: int,
    samples: int,
    device: torch.device,
    *,
    max_tokens_per_batch: int = 65536,
    distractors: int = 0,
    seed: int = 0,
) -> dict:
    """Accuracy of ``task`` at ``length`` tokens and, per MoBA layer, the router's recall of the needle
    block."""
    samples = check_positive_int("samples", samples)
    max_tokens_per_batch = check_positive_int("max_tokens_per_batch", max_tokens_per_batch)
    distractors = check_int("distractors", distractors, minimum=0)
    try:
        all_samples = _retrieval_samples(task, length, samples, distractors, seed)
    except ValueError as error:  # the length cannot hold the task's template
        return {
            "task": task,
            "length": length,
            "samples": 0,
            "accuracy": None,
            "token_accuracy": None,
            "router_recall": {},
            "error": str(error),
        }
    probe = RouterProbe(model)
    correct = correct_tokens = answer_tokens = 0
    recall_hits = {index: 0 for index, _ in probe.layers}
    recall_total = 0
    rows_per_batch = max(1, max_tokens_per_batch // length)
    try:
        for start in range(0, samples, rows_per_batch):
            chunk = all_samples[start : start + rows_per_batch]
            tokens = torch.from_numpy(np.stack([s.tokens for s in chunk])).to(device)
            probe.query_positions = [s.prompt_length - 1 for s in chunk]
            with autocast(device):
                logits, _ = model(tokens)
            right, right_tokens, scored_tokens = _answer_scores(logits, tokens, chunk)
            correct += right
            correct_tokens += right_tokens
            answer_tokens += scored_tokens
            for layer_index, attn in probe.layers:
                recall_hits[layer_index] += _needle_hits(
                    probe.selections[layer_index], attn.block_size, chunk
                )
            recall_total += len(chunk) * model.config.num_heads
    finally:
        probe.remove()
    return {
        "task": task,
        "length": length,
        "samples": samples,
        "accuracy": correct / samples,
        "token_accuracy": correct_tokens / answer_tokens,  # partial credit: answer tokens right
        "router_recall": {str(i): recall_hits[i] / recall_total for i in recall_hits} if recall_total else {},
    }


def default_lengths(train_seq_len: int) -> list[int]:
    """Half the training length to 8x it in powers of two (8K training gives the paper's 4K..64K), >= 512."""
    return sorted({max(512, train_seq_len * 2**p // 2) for p in range(5)})
