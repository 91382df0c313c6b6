"""Integrations with other libraries, each imported on its own (``import flashmoba`` loads none of them):

- ``flashmoba.integrations.transformers``: ``attn_implementation="moba"`` for transformers models, and
  ``MoBACache``, the centroid cache for their ``generate()``;
- ``flashmoba.integrations.hybrid_hf``: flashmoba's hybrid LM as a transformers model
  (``HybridLMConfig``, ``HybridLMForCausalLM``, ``export_checkpoint`` behind ``flashmoba export-hf``).
"""
