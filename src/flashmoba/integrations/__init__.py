"""Integrations with other libraries, each imported on its own (``import flashmoba`` loads none of them):

- ``flashmoba.integrations.transformers``: ``attn_implementation="moba"`` for transformers models.
"""
