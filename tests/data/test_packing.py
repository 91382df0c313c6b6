"""data/packing.py: packing with cu_seqlens, batches as a function of their coordinates, retrieval rows
in the training mixture and their answer weights."""

import numpy as np
import pytest
import torch

from flashmoba.data import ByteTokenizer, PackedBatch, TokenCorpus, batch_rng, pack_rows, sample_batch

tokenizer = ByteTokenizer()


def test_pack_rows_starts_a_sequence_at_each_row_and_each_bos():
    bos = tokenizer.bos_id
    rows = np.array([[bos, 1, 2, bos, 3, 4], [5, 6, bos, 7, 8, 9]])
    batch = pack_rows(rows, bos)
    assert batch.input_ids.tolist() == [bos, 1, 2, bos, 3, 5, 6, bos, 7, 8]
    assert batch.targets.tolist() == [1, 2, bos, 3, 4, 6, bos, 7, 8, 9]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 7, 10] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 3


def test_batches_are_a_pure_function_of_their_coordinates():
    corpus = TokenCorpus([np.arange(5000, dtype=np.uint16) % 256], tokenizer.bos_id, "numbers")
    first = sample_batch(corpus, 3, 64, batch_rng(7, 1, 12))
    again = sample_batch(corpus, 3, 64, batch_rng(7, 1, 12))
    other = sample_batch(corpus, 3, 64, batch_rng(7, 1, 13))
    assert torch.equal(first.input_ids, again.input_ids) and not torch.equal(first.input_ids, other.input_ids)
    # Windows are contiguous slices of the corpus, targets shifted by one.
    rows = first.input_ids.view(3, 64)
    assert torch.equal(first.targets.view(3, 64)[:, :-1], rows[:, 1:])
    assert ((rows[:, 1:] - rows[:, :-1]) % 256 == 1).all()


def test_task_rows_in_the_training_mixture_are_whole_samples():
    corpus = TokenCorpus([np.zeros(10_000, dtype=np.uint16) + ord("a")], tokenizer.bos_id, "a")
    batch = sample_batch(corpus, 4, 600, batch_rng(0, 0, 0), task_fraction=1.0, tasks=("niah1",))
    rows = batch.input_ids.view(4, 600)
    assert (rows[:, 0] == tokenizer.bos_id).all()
    assert all("special magic numbers" in tokenizer.decode(row.tolist()) for row in rows)


def test_answer_loss_weight_marks_exactly_the_answer_targets():
    corpus = TokenCorpus([np.zeros(10_000, dtype=np.uint16) + ord("a")], tokenizer.bos_id, "a")
    plain = sample_batch(corpus, 6, 600, batch_rng(3, 0, 0), task_fraction=0.5)
    assert plain.loss_weights is None
    batch = sample_batch(corpus, 6, 600, batch_rng(3, 0, 0), task_fraction=0.5, answer_loss_weight=7.0)
    assert torch.equal(batch.input_ids, plain.input_ids)  # the weight never changes the batch itself
    weights, targets = batch.loss_weights.view(6, 600), batch.targets.view(6, 600)
    task_rows = [r for r in range(6) if targets[r, -1] == ord(".")]  # samples end with the answer's "."
    assert 0 < len(task_rows) < 6
    for row in range(6):
        weighted = torch.nonzero(weights[row] == 7.0).flatten().tolist()
        if row not in task_rows:
            assert weighted == [] and (weights[row] == 1).all()
            continue
        text = tokenizer.decode(targets[row, weighted].tolist())
        prompt = tokenizer.decode(batch.input_ids.view(6, 600)[row, : weighted[0] + 1].tolist())
        value = text.strip()
        # The weighted targets are " VALUE", right before the final ".", and VALUE stands in the haystack.
        assert text == " " + value and weighted[-1] == 600 - 2 and value and value in prompt
        assert (weights[row][[i for i in range(600) if i not in weighted]] == 1).all()
    with pytest.raises(ValueError, match="answer_loss_weight"):
        sample_batch(corpus, 2, 600, batch_rng(0, 0, 0), answer_loss_weight=0.0)


@pytest.mark.parametrize("sequences, padded", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (9, 16)])
def test_static_shapes_pad_the_sequences_to_a_power_of_two_with_empty_ones(sequences, padded):
    bounds = [0, *range(3, 3 * sequences, 3), 3 * sequences + 2]
    batch = PackedBatch(
        torch.arange(bounds[-1]), torch.arange(bounds[-1]), torch.tensor(bounds, dtype=torch.int32), 5
    )
    static = batch.with_static_shapes(64)
    assert static.cu_seqlens.tolist() == bounds + [bounds[-1]] * (padded - sequences)
    assert static.max_seqlen == 64 and static.cu_seqlens.dtype == torch.int32
    assert static.input_ids is batch.input_ids and static.targets is batch.targets
    with pytest.raises(ValueError, match=r"row_length must be >= max_seqlen \(5\), got 4"):
        batch.with_static_shapes(4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_static_shapes_leave_the_model_s_loss_and_gradients_unchanged(backend):
    """Empty trailing sequences and a larger max_seqlen change no output: bitwise on the CPU."""
    from flashmoba.models import HybridLM, model_config_from_preset

    torch.manual_seed(0)
    model = HybridLM(model_config_from_preset("tiny", backend=backend, kconv_size=3))
    rows = np.random.default_rng(0).integers(0, 256, size=(2, 97))
    rows[:, :] = np.where(rows == tokenizer.bos_id, 0, rows)
    rows[0, 40] = tokenizer.bos_id  # three sequences, padded to four
    batch = pack_rows(rows, tokenizer.bos_id)
    results = []
    for version in (batch, batch.with_static_shapes(96)):
        model.zero_grad()
        _, loss = model(version.input_ids, version.targets, version.cu_seqlens, version.max_seqlen)
        loss.backward()
        results.append((loss.detach(), [parameter.grad.clone() for parameter in model.parameters()]))
    (loss, grads), (static_loss, static_grads) = results
    assert batch.with_static_shapes(96).num_sequences == 4 and batch.num_sequences == 4 - 1
    assert torch.equal(loss, static_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, static_grads))
