"""flashmoba eval's scoring: an oracle model scores 100%, a wrong one 0%; router recall at full top-k is
100%."""

import torch
from torch import nn

from flashmoba.evaluation.retrieval import default_lengths, evaluate_retrieval
from flashmoba.models import HybridLM, model_config_from_preset


class OracleLM(nn.Module):
    """Runs a real tiny model (so the router hooks fire) but returns logits that put all mass on the true
    next token (``shift=1``) or on a wrong one (``shift`` > 1)."""

    def __init__(self, topk: int, shift: int = 1):
        super().__init__()
        self.inner = HybridLM(
            model_config_from_preset("tiny", moba_block_size=32, moba_topk=topk, backend="reference")
        )
        self.config = self.inner.config
        self.shift = shift

    def moba_layers(self):
        return self.inner.moba_layers()

    def forward(self, tokens):
        self.inner(tokens)
        following = torch.roll(tokens, -self.shift, dims=1)
        if self.shift > 1:  # a token that is surely not the next one
            following = (torch.roll(tokens, -1, dims=1) + 1) % self.config.vocab_size
        return nn.functional.one_hot(following, self.config.vocab_size).float(), None


def test_oracle_scores_everything_and_a_wrong_model_nothing():
    right = evaluate_retrieval(OracleLM(topk=64).eval(), "niah1", 600, 3, torch.device("cpu"))
    assert right["accuracy"] == 1.0 and right["token_accuracy"] == 1.0
    # With top-k covering every block, the needle's block is always selected.
    assert right["router_recall"] == {"1": 1.0, "3": 1.0}
    wrong = evaluate_retrieval(OracleLM(topk=2, shift=2).eval(), "niah3", 700, 2, torch.device("cpu"))
    assert wrong["accuracy"] == 0.0 and wrong["token_accuracy"] == 0.0
    assert set(wrong["router_recall"]) == {"1", "3"} and all(
        0 <= r <= 1 for r in wrong["router_recall"].values()
    )


def test_too_short_lengths_are_reported_not_crashed():
    result = evaluate_retrieval(OracleLM(topk=2).eval(), "niah1", 100, 2, torch.device("cpu"))
    assert result["accuracy"] is None and "too short" in result["error"]


def test_default_lengths_span_half_to_eight_times_the_training_length():
    assert default_lengths(8192) == [4096, 8192, 16384, 32768, 65536]
    assert default_lengths(512) == [512, 1024, 2048, 4096]
