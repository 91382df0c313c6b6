"""The paper's hybrid language model: sliding-window layers with RoPE alternating with global MoBA layers.

Architecture (paper section 5.1): a decoder-only transformer whose layers alternate between

- sliding-window attention (window 256) with rotary position embeddings, and
- global attention without positional encoding (NoPE): MoBA, or dense causal attention as the baseline,
  optionally with the key convolution (kconv3 / kconv5).

The paper counts layers from 1 and calls the odd ones sliding-window: here layer ``i`` (0-based) is
sliding-window when ``i`` is even and global when ``i`` is odd, so the first layer is local and the last
one global.

Choices the paper leaves open (documented here, all configurable through ``ModelConfig``):

- Pre-norm RMSNorm (eps 1e-6) before attention and MLP, and a final RMSNorm: the Llama layout of the
  fla models this line of work builds on.
- MLP: SwiGLU (``down(silu(gate(x)) * up(x))``). The 340M preset's intermediate size 2816 is exactly fla's
  SwiGLU size for hidden 1024 (2/3 * 4 * 1024 rounded up to 256).
- Untied input embedding and output head (fla's default); ``tie_embeddings=True`` ties them.
- Multi-head attention (kv heads = heads): the paper's 16 x 64 = 1024 and 32 x 64 = 2048 widths read as
  MHA. ``num_kv_heads`` enables GQA.
- No biases, no dropout. RoPE base 10000 on sliding-window layers only.
- The key convolution, when enabled, sits in every global layer (the layers MoBA routes in).
- Initialisation: normal(0, 0.02) for linear and embedding weights, output projections of each residual
  branch scaled by 1/sqrt(2 * num_layers) (GPT-2); the key convolution keeps its own init (see KeyConv).
- Vocabulary: 257 by default, the byte tokenizer of ``flashmoba.data`` (256 bytes + a BOS token). The
  paper uses the 32K Llama-2 tokenizer; set ``vocab_size`` for token shards made with another tokenizer.

Parameter counts (untied, vocab 32000, non-embedding in brackets): ``340m`` about 374M (308M),
``1b`` about 1.74B (1.61B; the paper's hidden 2048 / MLP 8192 with SwiGLU is larger than its name).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flashmoba._checks import check_bool, check_choice, check_int, check_positive_int
from flashmoba.api import BACKENDS, _check_kernel_config
from flashmoba.nn.attention import MoBAAttention, PackedSequences
from flashmoba.nn.keyconv import KeyConv

if TYPE_CHECKING:  # for annotations only: importing flashmoba.ops imports Triton
    from flashmoba.ops.config import KernelConfig

GLOBAL_ATTENTION_KINDS = ("moba", "dense")
# Key convolution widths the train command offers (0: none); ModelConfig itself takes any width >= 0.
KCONV_SIZES = (0, 3, 5)
POSITIVE_INT_FIELDS = (
    "vocab_size",
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_hidden_size",
    "window_size",
    "moba_block_size",
    "moba_topk",
)


@dataclass
class ModelConfig:
    """Shape and options of the hybrid model (defaults: the paper's 340M with MoBA-128, k = 8).

    Each field's metadata holds its ``help`` text and, for some, the ``choices`` its train flag offers;
    ``flashmoba train`` generates its ``--model.*`` flags from them.
    """

    vocab_size: int = field(default=257, metadata={"help": "vocabulary size (257: the byte tokenizer)"})
    num_layers: int = field(default=24, metadata={"help": "layers, alternating sliding-window and global"})
    hidden_size: int = field(default=1024, metadata={"help": "model width"})
    num_heads: int = field(default=16, metadata={"help": "query heads"})
    num_kv_heads: int = field(default=16, metadata={"help": "key/value heads (fewer than heads: GQA)"})
    head_dim: int = field(default=64, metadata={"help": "width of one head (even, for RoPE)"})
    mlp_hidden_size: int = field(default=2816, metadata={"help": "SwiGLU intermediate width"})
    window_size: int = field(
        default=256, metadata={"help": "sliding-window layers: keys seen per query, its own included"}
    )
    global_attention: str = field(
        default="moba",
        metadata={"help": "attention of the global layers", "choices": GLOBAL_ATTENTION_KINDS},
    )
    moba_block_size: int = field(default=128, metadata={"help": "MoBA block size"})
    moba_topk: int = field(default=8, metadata={"help": "MoBA blocks per query (its own block included)"})
    kconv_size: int = field(
        default=0,
        metadata={"help": "key convolution width in the global layers (0: none)", "choices": KCONV_SIZES},
    )
    rope_base: float = field(default=10000.0, metadata={"help": "RoPE base of the sliding-window layers"})
    global_rope: bool = field(
        default=False, metadata={"help": "RoPE in the global layers too (default: NoPE, the paper's layout)"}
    )
    norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    tie_embeddings: bool = field(default=False, metadata={"help": "tie the input embedding and output head"})
    init_std: float = field(default=0.02, metadata={"help": "standard deviation of the initial weights"})
    backend: str = field(
        default="auto",
        metadata={"help": "flashmoba backend of the MoBA layers (auto: Triton on CUDA)", "choices": BACKENDS},
    )
    use_flash_varlen: bool = field(
        default=True,
        metadata={
            "help": "packed dense and sliding-window attention on PyTorch's flash varlen kernel where it "
            "runs (CUDA, 16-bit); off: SDPA"
        },
    )

    def __post_init__(self):
        for name in POSITIVE_INT_FIELDS:
            check_positive_int(f"ModelConfig.{name}", getattr(self, name))
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        check_choice("ModelConfig.global_attention", self.global_attention, GLOBAL_ATTENTION_KINDS)
        check_int("ModelConfig.kconv_size", self.kconv_size, minimum=0)
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig.head_dim must be even (RoPE), got {self.head_dim}")

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


# Model presets. The training defaults that go with each (sequence length, batch) live in
# flashmoba.training.config.TRAIN_PRESETS.
MODEL_PRESETS: dict[str, dict] = {
    # CPU tests and smoke runs: 4 layers, 0.2M parameters.
    "tiny": dict(
        num_layers=4,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_hidden_size=176,
        window_size=64,
        moba_block_size=32,
        moba_topk=4,
    ),
    # Single-GPU experiments (the paper's layer pattern and head_dim 64, fewer and narrower layers).
    "small": dict(
        num_layers=8, hidden_size=256, num_heads=4, num_kv_heads=4, head_dim=64, mlp_hidden_size=704
    ),
    "medium": dict(
        num_layers=12, hidden_size=512, num_heads=8, num_kv_heads=8, head_dim=64, mlp_hidden_size=1408
    ),
    # The paper's models (section 5.1).
    "340m": dict(
        num_layers=24, hidden_size=1024, num_heads=16, num_kv_heads=16, head_dim=64, mlp_hidden_size=2816
    ),
    "1b": dict(
        num_layers=24, hidden_size=2048, num_heads=32, num_kv_heads=32, head_dim=64, mlp_hidden_size=8192
    ),
}


def model_config_from_preset(preset: str, **overrides) -> ModelConfig:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"preset must be one of {sorted(MODEL_PRESETS)}, got {preset!r}")
    return ModelConfig(**{**MODEL_PRESETS[preset], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, mlp_hidden_size, bias=False)
        self.down_proj = nn.Linear(mlp_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def cross_entropy_loss(
    logits: torch.Tensor, targets: torch.Tensor, loss_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss of ``logits [..., vocab_size]`` (in the dtype the loss is computed in: the model passes
    float32) at ``targets`` (the shape of ``logits`` without its last axis; -100: not scored).

    Without ``loss_weights``: the mean cross-entropy over the scored targets. With ``loss_weights`` (float,
    the shape of ``targets``): the weighted sum over the scored targets, divided by their count (not by
    the weights' sum), so that weight 1 everywhere gives the plain mean and extra weight adds to the
    objective."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    if loss_weights is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
    per_token = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="none")
    scored = flat_targets != -100
    return (per_token * loss_weights.reshape(-1).float()).sum() / scored.sum().clamp(min=1)


def _head_loss(
    model: HybridLM, x: torch.Tensor, targets: torch.Tensor, loss_weights: torch.Tensor | None
) -> torch.Tensor:
    """``model``'s final norm, head, float32 upcast and loss of the last block's output ``x``: the function
    ``HybridLM.compile_head`` compiles. A module-level function taking the model rather than a bound
    method, so that a compiled copy held by the model holds no reference to it (a deep copy of the model
    then runs its own weights)."""
    logits = model.lm_head(model.final_norm(x)).float()
    return cross_entropy_loss(logits, targets, loss_weights)


def is_global_layer(layer_index: int) -> bool:
    """Global (MoBA or dense, NoPE) layers are the odd 0-based ones; the even ones use sliding windows."""
    return layer_index % 2 == 1


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.is_global = is_global_layer(layer_index)
        common = dict(
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            backend=config.backend,
            use_flash_varlen=config.use_flash_varlen,
        )
        if self.is_global:
            attention = dict(
                attention=config.global_attention,
                block_size=config.moba_block_size,
                topk=config.moba_topk,
                kconv_size=config.kconv_size,
                rope=config.global_rope,
                rope_base=config.rope_base,
            )
        else:
            attention = dict(
                attention="sliding", window_size=config.window_size, rope=True, rope_base=config.rope_base
            )
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = MoBAAttention(config.hidden_size, config.num_heads, **common, **attention)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.mlp_hidden_size)

    def forward(self, x: torch.Tensor, packed: PackedSequences | None, context_parallel=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), packed=packed, context_parallel=context_parallel)
        return x + self.mlp(self.mlp_norm(x))

    def forward_with_cache(self, x: torch.Tensor, cache) -> torch.Tensor:
        """``forward`` for x ``[batch, T, hidden]`` following the tokens in this layer's ``cache``."""
        x = x + self.attn.forward_with_cache(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class HybridLM(nn.Module):
    """The hybrid decoder-only LM.

    ``forward(input_ids, targets=None, cu_seqlens=None, max_seqlen=None, loss_weights=None)``:

    - ``input_ids [batch, seqlen]`` int64: one sequence per row; or
    - ``input_ids [total]`` with ``cu_seqlens`` (int32 ``[n + 1]``): packed sequences (documents) that
      never attend to each other. ``cu_seqlens`` may stay on the CPU when the tokens are on a GPU: it is
      checked on the host, so no step then waits for the GPU (see ``PackedSequences``); or
    - ``input_ids [batch, seqlen_local]`` with ``context_parallel`` (``flashmoba.parallel.ContextParallel``):
      this rank's contiguous slice of each row; the loss is then that of the local targets only.

    Returns ``(logits, loss)``: logits ``[..., vocab_size]`` (float32 when ``targets`` is given), loss the
    mean cross-entropy over targets that are not -100 (None without targets). ``loss_weights`` (float, the
    shape of ``targets``) scales each target's cross-entropy; the sum is still divided by the number of
    scored targets (``cross_entropy_loss``).

    ``return_logits=False`` (needs ``targets``) returns ``(None, loss)``: the loss then comes from
    ``head_loss``, which returns no logits. Eager, it runs the same operations as the logits path, so the
    loss and gradients are bitwise those of ``return_logits=True``; compiled (``compile_head``, which
    training does where it compiles the blocks), it never stores the float32 logits either (at 32K
    tokens and vocabulary 32000 they are 4 GB).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False
        # _head_loss compiled by compile_head; None: head_loss runs eager.
        self._compiled_head_loss = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(
                    module.weight, mean=0.0, std=residual_std if last in ("o_proj", "down_proj") else std
                )
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, KeyConv):
                module.reset_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each block in place (``nn.Module.compile``: parameter names and checkpoints
        unchanged), ``options`` passed on. Blocks rather than the whole model: the graphs are one layer's,
        so there are two to compile (a sliding-window block and a global one), and a graph break inside
        the loss or the embedding stays outside them. The attention kernels enter the graphs as custom
        ops (flashmoba's ``torch.library`` ops, PyTorch's flash attention)."""
        for block in self.blocks:
            block.compile(**options)

    def compile_head(self, **options) -> None:
        """``torch.compile`` ``head_loss`` (final norm, head, float32 upcast, cross-entropy) as one graph,
        ``options`` passed on; parameters and checkpoints unchanged. Compiled, the float32 logits are
        never stored: Inductor fuses the upcast into the log-softmax reductions and the loss's backward
        into one pass that writes the logits' gradient in the head's dtype, where eager PyTorch makes
        several passes over a float32 ``[tokens, vocab_size]`` tensor each way. Only the
        ``return_logits=False`` path of ``forward`` takes it (a caller that wants the logits gets them
        eagerly)."""
        self._compiled_head_loss = torch.compile(_head_loss, **options)

    def head_loss(
        self, x: torch.Tensor, targets: torch.Tensor, loss_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss (``cross_entropy_loss``) of the last block's output ``x [..., hidden_size]`` at
        ``targets`` (``x``'s shape without its last axis), through the final norm and the head; compiled
        after ``compile_head``."""
        head_loss = _head_loss if self._compiled_head_loss is None else self._compiled_head_loss
        return head_loss(self, x, targets, loss_weights)

    def moba_layers(self) -> list[tuple[int, MoBAAttention]]:
        """(layer index, attention module) of every MoBA layer."""
        return [(i, block.attn) for i, block in enumerate(self.blocks) if block.attn.attention == "moba"]

    def set_kernel_config(self, config: KernelConfig | None) -> None:
        """Launch every MoBA layer's Triton kernels with ``config`` (a ``flashmoba.ops.KernelConfig``; None:
        the measured defaults). A launch setting, not part of the model: ``ModelConfig`` and checkpoints
        do not hold it. Compiled blocks (``compile_blocks``) recompile when it changes: set it before the
        first step."""
        _check_kernel_config(config)
        for _, attention in self.moba_layers():
            attention.kernel_config = config

    def forward_with_cache(
        self, input_ids: torch.Tensor, cache, *, last_position_only: bool = False
    ) -> torch.Tensor:
        """Logits ``[batch, T, vocab_size]`` of ``input_ids`` ``[batch, T]``, the tokens that follow those in
        ``cache`` (a ``flashmoba.models.generation.HybridCache``, one layer cache per block), which it
        appends to. Prefill is one call with the prompt; decode one call per token.

        ``last_position_only``: logits ``[batch, 1, vocab_size]`` of the last token only (a prefill needs
        no more): the final norm and the head then run on one position per row instead of T, which at a
        long prompt saves their ``[batch, T, ...]`` float32 and logits buffers (the norm and the head act
        on each position alone, so the last row is the one the full call computes)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an int64 or int32 torch.Tensor")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seqlen] with a cache, got {tuple(input_ids.shape)}")
        if len(cache) != len(self.blocks):
            raise ValueError(
                f"cache must hold one layer cache per block ({len(self.blocks)}), got {len(cache)}"
            )
        x = self.embed(input_ids)
        for block, layer_cache in zip(self.blocks, cache):
            x = block.forward_with_cache(x, layer_cache)
        if last_position_only:
            x = x[:, -1:]
        return self.lm_head(self.final_norm(x))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        decode_mode: str = "auto",
        prompt_lengths: torch.Tensor | list[int] | None = None,
    ) -> torch.Tensor:
        """Generate with a KV cache: the new ids ``[batch, <= max_new_tokens]`` after the prompts
        ``input_ids [batch, prompt_len]`` (right-padded to unequal lengths with ``prompt_lengths``
        ``[batch]``). ``temperature`` 0 is greedy; ``decode_mode`` "auto" replays each step as a CUDA graph
        on CUDA; see ``flashmoba.models.generation.generate``."""
        from flashmoba.models.generation import generate

        return generate(
            self,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=eos_token_id,
            generator=generator,
            decode_mode=decode_mode,
            prompt_lengths=prompt_lengths,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        loss_weights: torch.Tensor | None = None,
        context_parallel=None,
        *,
        return_logits: bool = True,
    ):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an int64 or int32 torch.Tensor")
        check_bool("return_logits", return_logits)
        if not return_logits and targets is None:
            raise ValueError("return_logits=False needs targets: without them there is nothing to return")
        if context_parallel is not None and (cu_seqlens is not None or input_ids.ndim != 2):
            raise ValueError(
                "context_parallel takes padded input_ids [batch, seqlen_local], without cu_seqlens"
            )
        if cu_seqlens is not None:
            if input_ids.ndim != 1:
                raise ValueError(
                    f"with cu_seqlens, input_ids must be packed [total], got shape {tuple(input_ids.shape)}"
                )
            packed = PackedSequences(cu_seqlens, max_seqlen, device=input_ids.device)
            if packed.total != input_ids.shape[0]:
                raise ValueError(
                    f"cu_seqlens must end at the packed length {input_ids.shape[0]}, got {packed.total}"
                )
        else:
            if input_ids.ndim != 2:
                raise ValueError(
                    "input_ids must be [batch, seqlen], or [total] with cu_seqlens, got "
                    f"{tuple(input_ids.shape)}"
                )
            packed = None
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(
                f"targets must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(targets.shape)}"
            )
        if loss_weights is not None:
            if targets is None:
                raise ValueError("loss_weights needs targets")
            if loss_weights.shape != targets.shape or not loss_weights.is_floating_point():
                raise ValueError(
                    f"loss_weights must be a float tensor of targets' shape {tuple(targets.shape)}, got "
                    f"{loss_weights.dtype} {tuple(loss_weights.shape)}"
                )

        x = self.embed(input_ids)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, packed, context_parallel, use_reentrant=False)
            else:
                x = block(x, packed, context_parallel)
        if not return_logits:
            return None, self.head_loss(x, targets, loss_weights)
        logits = self.lm_head(self.final_norm(x))
        if targets is None:
            return logits, None
        logits = logits.float()
        return logits, cross_entropy_loss(logits, targets, loss_weights)
