"""``flashmoba generate``: text from a checkpoint, decoded with a KV cache.

    flashmoba generate --checkpoint runs/tiny --prompt "def main():" --max-new-tokens 200
    flashmoba generate --checkpoint runs/tiny --prompt "Once" --temperature 0.8 --top-p 0.95

The prompt is encoded with the byte tokenizer (``flashmoba.data.ByteTokenizer``) behind a BOS token, as
training stores documents, so the run's vocabulary must be the byte tokenizer's; a generated BOS (the
start of another document) ends the text. Prints the prompt and its continuation, then the prefill and
decode speeds in tokens per second. Temperature 0 (the default) is greedy decoding. The model runs in
float32; its MoBA layers decode through ``flashmoba.moba_attn_with_kvcache`` (Triton on CUDA), and on
CUDA each new token is one CUDA-graph replay (``--decode-mode``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from flashmoba.cli._flags import int_at_least, real
from flashmoba.data import ByteTokenizer
from flashmoba.models.checkpoint import find_checkpoint, load_model
from flashmoba.models.generation import DECODE_MODES, generate
from flashmoba.training.runtime import check_device_name, resolve_device


def device_name(text: str) -> str:
    """An argparse ``type``: auto, cpu, cuda or cuda:N."""
    try:
        return check_device_name("", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashmoba generate", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--checkpoint", required=True, help="a checkpoint file or a run directory (its latest checkpoint)")
    add("--prompt", required=True, help="the text to continue")
    add("--max-new-tokens", type=int_at_least(1), default=128, help="tokens to generate at most")
    add("--temperature", type=real(minimum=0.0), default=0.0, help="sampling temperature (0: greedy)")
    add("--top-p", type=real(exclusive_minimum=0.0, maximum=1.0), default=1.0, help="nucleus sampling mass")
    add("--seed", type=int_at_least(0), default=0, help="seed of the sampling")
    add("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    add(
        "--decode-mode",
        choices=DECODE_MODES,
        default="auto",
        help="how each new token runs: auto (a CUDA-graph replay on CUDA, eager elsewhere), eager, static, "
        "cuda_graph",
    )
    return parser


def speed(tokens: int, seconds: float) -> str:
    return f"{tokens} tokens in {seconds:.3f} s ({tokens / seconds:.1f} tokens/s)" if seconds > 0 else "-"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint_path = find_checkpoint(args.checkpoint)
    device = resolve_device(args.device, 0, setting="--device")
    model, _ = load_model(checkpoint_path, device)
    tokenizer = ByteTokenizer()
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"flashmoba generate encodes text with the byte tokenizer (vocabulary {tokenizer.vocab_size}), "
            f"but {checkpoint_path} has a vocabulary of {model.config.vocab_size}: it was trained on "
            "another tokenizer's shards"
        )
    input_ids = torch.tensor([tokenizer.encode(args.prompt, bos=True)], dtype=torch.int64, device=device)
    stats: dict = {}
    generated = generate(
        model,
        input_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_token_id=tokenizer.bos_id,
        generator=torch.Generator(device=device).manual_seed(args.seed),
        stats=stats,
        decode_mode=args.decode_mode,
    )
    new_ids = generated[0].tolist()
    if tokenizer.bos_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.bos_id)]
    print(args.prompt + tokenizer.decode(new_ids), flush=True)
    prefill = speed(stats["prefill_tokens"], stats["prefill_seconds"])
    decode = speed(stats["decode_tokens"], stats["decode_seconds"])
    print(f"flashmoba generate: {checkpoint_path}: prefill {prefill}, decode {decode}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
