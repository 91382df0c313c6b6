"""Two versions of flashmoba side by side on one card, in one call: `flashmoba bench` run on each source
tree in turn (alternating, `--rounds` times, so that drift of the card's clocks falls on both), then one
table of medians and ratios (new / old; below 1 is faster).

    python benchmarks/compare_versions.py --old .old/src --new src --out $OUT/compare.json -- \
        --seqlens 8192,65536 --block-sizes 128,64,32 --topks 8,16,32 --impls flashmoba

Everything after ``--`` goes to `flashmoba bench` unchanged. Each run is a fresh process with
``PYTHONPATH`` set to that tree, so the two versions never share a Python module; Triton's compile
cache is keyed by each kernel's source, and `flashmoba bench` times after warm-up either way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TIMES = ("route_ms", "fwd_ms", "fwd_bwd_ms")
KEY_FIELDS = ("impl", "seqlen", "head_dim", "block_size", "topk")


def run_bench(source: Path, bench_args: list[str], out: Path) -> list[dict]:
    environment = dict(os.environ, PYTHONPATH=str(source.resolve()), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "flashmoba", "bench", "--out", str(out), *bench_args]
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def row_key(row: dict) -> tuple:
    return tuple(row.get(name) for name in KEY_FIELDS)


def medians(runs: list[list[dict]]) -> dict[tuple, dict]:
    """Per configuration, the median of each time over the rounds (rows that failed are left out)."""
    grouped: dict[tuple, dict[str, list[float]]] = {}
    for rows in runs:
        for row in rows:
            times = grouped.setdefault(row_key(row), {name: [] for name in TIMES})
            for name in TIMES:
                if row.get(name) is not None:
                    times[name].append(row[name])
    return {
        key: {name: statistics.median(values) if values else None for name, values in times.items()}
        for key, times in grouped.items()
    }


def ratio(new: float | None, old: float | None) -> str:
    return f"{new / old:.3f}" if new is not None and old else "-"


def cell(value: float | None) -> str:
    return f"{value:.3g}" if value is not None else "-"


def print_table(card: str, old: dict[tuple, dict], new: dict[tuple, dict], rounds: int) -> None:
    print(f"\n{card}: medians of {rounds} alternating rounds, ms; ratio = new / old")
    header = "| impl | N | d | B / k | " + " | ".join(f"{t} old / new / ratio" for t in TIMES) + " |"
    print(header)
    print("|" + "---|" * (4 + len(TIMES)))
    for key in sorted(set(old) | set(new), key=lambda k: tuple(str(part) for part in k)):
        impl, seqlen, head_dim, block_size, topk = key
        cells = []
        for name in TIMES:
            before, after = old.get(key, {}).get(name), new.get(key, {}).get(name)
            cells.append(f"{cell(before)} / {cell(after)} / {ratio(after, before)}")
        print(f"| {impl} | {seqlen} | {head_dim} | {block_size} / {topk} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own_args = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="source tree of the old version (its src/)")
    parser.add_argument("--new", type=Path, required=True, help="source tree of the new version (its src/)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each version")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for every round's rows")
    args = parser.parse_args(own_args)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")

    runs: dict[str, list[list[dict]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for version in ("old", "new"):
                out = Path(scratch) / f"{version}_{round_index}.json"
                runs[version].append(run_bench(getattr(args, version), bench_args, out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=1) + "\n")
    card = next((row["card"] for rows in runs["new"] for row in rows if "card" in row), "unknown card")
    print_table(card, medians(runs["old"]), medians(runs["new"]), args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
