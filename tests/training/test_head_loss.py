"""The training loop's head and loss: the loss alone from the model (``return_logits=False``), and the
head compiled beside the blocks in a mode without CUDA graphs."""

import numpy as np
import pytest
import torch

from flashmoba.data import pack_rows
from flashmoba.models import HybridLM, model_config_from_preset
from flashmoba.training import loop
from flashmoba.training.config import TrainConfig
from flashmoba.training.runtime import COMPILE_MODES, head_compile_mode

SEQ_LEN = 19


def tiny_config(**overrides) -> TrainConfig:
    """The tiny preset's model (a bare ``TrainConfig`` holds the 340M one) with rows of SEQ_LEN tokens."""
    model = model_config_from_preset("tiny", backend="reference")
    return TrainConfig(preset="tiny", model=model, seq_len=SEQ_LEN, batch_size=2, **overrides)


class RecordingModel(torch.nn.Module):
    """A model that records the keywords of each call and passes the call on."""

    def __init__(self, model: HybridLM):
        super().__init__()
        self.model = model
        self.keywords = []

    def forward(self, *args, **keywords):
        self.keywords.append(keywords)
        return self.model(*args, **keywords)


def test_head_compile_mode_is_the_blocks_mode_without_cuda_graphs():
    assert head_compile_mode("reduce-overhead") == "default"
    assert head_compile_mode("default") == "default"
    assert head_compile_mode("max-autotune-no-cudagraphs") == "max-autotune-no-cudagraphs"
    assert set(map(head_compile_mode, COMPILE_MODES)) <= set(COMPILE_MODES)


@pytest.mark.parametrize("pack_documents", [True, False])
def test_batch_loss_asks_for_the_loss_alone(pack_documents):
    config = tiny_config(pack_documents=pack_documents)
    torch.manual_seed(0)
    model = HybridLM(config.model)
    recording = RecordingModel(model)
    rows = np.random.default_rng(1).integers(1, config.model.vocab_size, size=(2, SEQ_LEN + 1))
    rows[0, 7] = 0  # a second document in the first row (BOS 0) when packed
    batch = pack_rows(rows, bos_id=0)
    batch.targets[[2, 30]] = -100
    batch.loss_weights = torch.rand(2 * SEQ_LEN) * 3
    objective, loss = loop.batch_loss(recording, batch, batch, config)
    assert objective is loss
    assert [keywords["return_logits"] for keywords in recording.keywords] == [False]
    # The loss is the one of the logits path.
    if pack_documents:
        _, expected = model(
            batch.input_ids,
            targets=batch.targets,
            cu_seqlens=batch.cu_seqlens,
            max_seqlen=batch.max_seqlen,
            loss_weights=batch.loss_weights,
        )
    else:
        _, expected = model(
            batch.input_ids.view(2, SEQ_LEN),
            targets=batch.targets.view(2, SEQ_LEN),
            loss_weights=batch.loss_weights.view(2, SEQ_LEN),
        )
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_build_model_compiles_the_head_where_it_compiles_the_blocks(monkeypatch, mode):
    # compile_mode is None on CPU; here it is forced, and the compile calls are recorded, not run.
    calls = []
    monkeypatch.setattr(loop, "compile_mode", lambda config, device: mode)
    monkeypatch.setattr(HybridLM, "compile_blocks", lambda self, **options: calls.append(("blocks", options)))
    monkeypatch.setattr(HybridLM, "compile_head", lambda self, **options: calls.append(("head", options)))
    loop.build_model(tiny_config(), torch.device("cpu"))
    assert calls == [("blocks", {"mode": mode}), ("head", {"mode": head_compile_mode(mode)})]


def test_cpu_run_keeps_an_eager_head():
    model, _, _ = loop.build_model(tiny_config(), torch.device("cpu"))
    assert model._compiled_head_loss is None
