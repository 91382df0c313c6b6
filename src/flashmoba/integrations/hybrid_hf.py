"""flashmoba's hybrid LM as a transformers model: ``HybridLMConfig`` and ``HybridLMForCausalLM``.

``HybridLMForCausalLM`` holds a ``flashmoba.models.HybridLM`` under ``model`` (so its weights are the
checkpoint's, prefixed ``model.``), saves with ``save_pretrained`` (safetensors and ``config.json``),
loads with ``from_pretrained`` and generates with transformers' ``generate()``. The config's fields are
``ModelConfig``'s, checked by it; ``num_hidden_layers``, ``num_attention_heads`` and
``num_key_value_heads`` read them under transformers' names. ``flashmoba export-hf RUN_DIR OUT_DIR``
writes one from a ``flashmoba train`` checkpoint (``export_checkpoint``).

Importing this module registers the model type ``"flashmoba_hybrid"`` with ``AutoConfig`` and
``AutoModelForCausalLM``.

What ``forward`` computes is ``HybridLM.forward``. A batch with padding (an ``attention_mask`` with
zeros, as batched ``generate`` makes it) runs each row's real tokens (one run: left or right padding) as
a sequence of its own, so a row gives what it gives alone; padded positions get zero logits. Greedy and
sampling ``generate`` decode with flashmoba's own cache (``flashmoba.models.generation.HybridCache``:
sliding windows, the MoBA centroid cache, the key-convolution state), the very computation of
``flashmoba generate``: the model keeps no transformers ``Cache``; ``_prepare_cache_for_generation`` puts a
``HybridGenerationState`` into generate's model keyword arguments (which carry it from step to step),
``prepare_inputs_for_generation`` passes it the tokens it has not seen, and ``forward`` runs them through
``HybridLM.forward_with_cache``. Where that cache cannot follow (padded prompts, beam search, assisted
decoding, a sequence past the length generate announced), each step recomputes the whole sequence
instead: exact, O(length) per step.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from flashmoba.models.checkpoint import find_checkpoint, read_checkpoint
from flashmoba.models.generation import HybridCache
from flashmoba.models.hybrid import HybridLM, ModelConfig

MODEL_TYPE = "flashmoba_hybrid"

__all__ = [
    "MODEL_TYPE",
    "HybridGenerationState",
    "HybridLMConfig",
    "HybridLMForCausalLM",
    "export_checkpoint",
]

_MODEL_FIELDS = {f.name: f.default for f in fields(ModelConfig)}
_STATE = "flashmoba_generation_state"  # the model keyword argument that carries the state
_CACHED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


class HybridGenerationState:
    """One ``generate`` call's flashmoba ``HybridCache``, made at its first step for sequences of up to
    ``max_length`` tokens, and the tokens it holds (``length``). ``cached`` turns False, for the rest of
    the call, where it cannot follow (padding); the steps then recompute the sequence."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.cache = None
        self.length = 0
        self.cached = True

    def new_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """What the next forward gets of generate's ``input_ids`` (all of them when not cached)."""
        if self.cached and self.cache is None:
            padded = attention_mask is not None and not bool(attention_mask.bool().all())
            self.cached = not padded and input_ids.shape[1] <= self.max_length
        if self.cached and input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"generate announced sequences of at most {self.max_length} tokens, got {input_ids.shape[1]}"
            )
        return input_ids[:, self.length :] if self.cached else input_ids

    def logits(self, model: HybridLM, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.cache = HybridCache(model, input_ids.shape[0], self.max_length)
        logits = model.forward_with_cache(input_ids, self.cache)
        self.length += input_ids.shape[1]
        return logits


class HybridLMConfig(PretrainedConfig):
    """A ``ModelConfig`` as a transformers config: its fields by name (defaults: ``ModelConfig``'s),
    checked by ``ModelConfig``; other keywords go to ``PretrainedConfig``."""

    model_type = MODEL_TYPE
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
        "intermediate_size": "mlp_hidden_size",
        "rms_norm_eps": "norm_eps",
    }

    def __init__(self, **kwargs):
        values = {name: kwargs.pop(name, default) for name, default in _MODEL_FIELDS.items()}
        ModelConfig(**values)  # every check of the model's own config, naming the field
        for name, value in values.items():
            setattr(self, name, value)
        kwargs["tie_word_embeddings"] = values["tie_embeddings"]
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, name) for name in _MODEL_FIELDS})


class HybridLMForCausalLM(PreTrainedModel, GenerationMixin):
    """``HybridLM`` with transformers' model interface (see the module docstring)."""

    config_class = HybridLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: HybridLMConfig):
        super().__init__(config)
        self.model = HybridLM(config.to_model_config())
        self.post_init()

    def _init_weights(self, module) -> None:
        """``HybridLM`` initialises its own weights (``reset_parameters``); loaded weights replace them."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no transformers cache: every step recomputes the sequence

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value) -> None:
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``[batch, seqlen, vocab]`` of ``input_ids`` ``[batch, seqlen]`` (and the mean
        cross-entropy of next-token prediction when ``labels`` are given, -100 ignored, shifted as
        transformers' causal LMs do). ``logits_to_keep`` > 0 keeps the last that many positions."""
        if input_ids is None:
            raise ValueError("input_ids is required (HybridLMForCausalLM takes no inputs_embeds)")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported; pass input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be a [batch, seqlen] tensor, got {getattr(input_ids, 'shape', input_ids)}"
            )
        state = kwargs.get(_STATE)
        if state is not None and state.cached:
            if labels is not None:
                raise ValueError("labels are not supported with a generation state (generate's cache)")
            logits = state.logits(self.model, input_ids)
        else:
            logits = self._logits(input_ids, attention_mask)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100
            )
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return self.model(input_ids)[0]
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}"
            )
        real = attention_mask.bool()
        if bool(real.all()):
            return self.model(input_ids)[0]
        logits = None
        for row in range(input_ids.shape[0]):
            positions = real[row].nonzero().flatten()
            if positions.numel() == 0:
                continue
            first, last = int(positions[0]), int(positions[-1])
            if last - first + 1 != positions.numel():
                raise ValueError(
                    f"attention_mask row {row}: its real tokens must be one run (left or right padding)"
                )
            row_logits = self.model(input_ids[row : row + 1, first : last + 1])[0]
            if logits is None:
                logits = row_logits.new_zeros(*input_ids.shape, row_logits.shape[-1])
            logits[row, first : last + 1] = row_logits[0]
        if logits is None:
            return self.model.lm_head.weight.new_zeros(*input_ids.shape, self.config.vocab_size)
        return logits

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """Greedy and sampling generation get a ``HybridGenerationState`` (see the module docstring);
        the other modes (beam search reorders, assisted decoding crops) recompute every step."""
        mode = args[0] if args and isinstance(args[0], GenerationMode) else kwargs.get("generation_mode")
        if not isinstance(mode, GenerationMode):
            mode = generation_config.get_generation_mode()
        if generation_config.use_cache and mode in _CACHED_MODES and generation_config.max_length:
            model_kwargs[_STATE] = HybridGenerationState(int(generation_config.max_length))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The tokens the generation state has not seen, or (without one) the whole sequence so far."""
        state = kwargs.get(_STATE)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if state is not None:
            inputs = {"input_ids": state.new_tokens(input_ids, attention_mask), _STATE: state}
            if not state.cached:
                inputs["attention_mask"] = attention_mask
        return inputs


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def export_checkpoint(run_or_checkpoint, out_dir, *, overwrite: bool = False) -> Path:
    """Write a ``flashmoba train`` checkpoint (a file, or a run directory's latest) as a transformers
    model into ``out_dir`` (``config.json`` and ``model.safetensors``); returns the checkpoint read.

    ``out_dir`` must be empty or absent unless ``overwrite``; even then only the files the export writes
    are replaced (nothing else in ``out_dir`` is removed), and ``out_dir`` may not hold the checkpoint
    or lie inside the run directory it came from."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
    checkpoint_path = find_checkpoint(str(run_or_checkpoint)).resolve()
    out_dir = Path(out_dir)
    resolved = out_dir.resolve()
    run_dir = (
        checkpoint_path.parent.parent
        if checkpoint_path.parent.name == "checkpoints"
        else checkpoint_path.parent
    )
    if _inside(checkpoint_path, resolved) or _inside(resolved, run_dir):
        raise ValueError(
            f"out_dir {out_dir} must lie outside the run directory {run_dir} and not hold the checkpoint "
            f"{checkpoint_path}: the export never writes among a run's files"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"out_dir {out_dir} is not empty; pass overwrite=True (--overwrite) to replace the export's "
            "files in it"
        )
    checkpoint = read_checkpoint(checkpoint_path)
    config = HybridLMConfig(**ModelConfig.from_dict(checkpoint["config"]["model"]).to_dict())
    model = HybridLMForCausalLM(config)
    model.model.load_state_dict(checkpoint["model"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written into a fresh directory beside out_dir, then moved in file by file: an interrupted export
    # leaves out_dir as it was, and save_pretrained's clean-up of old weight files never runs in out_dir.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.export-") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        out_dir.mkdir(exist_ok=True)
        for written in sorted(Path(staging).iterdir()):
            os.replace(written, out_dir / written.name)  # save_pretrained writes files only
    return checkpoint_path


AutoConfig.register(MODEL_TYPE, HybridLMConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridLMConfig, HybridLMForCausalLM, exist_ok=True)
