#!/usr/bin/env bash
# Runs of the protocol on one GPU machine, in one command: one queue per card, runs one after the other.
#   bash experiments/gpu_runs.sh [RUN ...]   # default: every run of `python -m experiments.run --list`
#                                            # (more than one call holds: name the runs, see
#                                            # experiments/REPORT.md, Commands)
# DEADLINE_MINUTES (default 9.2): every run stops by then (training at its last checkpoint, evaluation only
# with --eval-reserve minutes left), so that the outputs are packed before a 10-minute command ends. Outputs
# without checkpoints go to $OUT/runs.tar.gz (unpack: tar -xzf runs.tar.gz); the script's own output, a
# line per run and a summary, is the log (tee it into $OUT). A run that did not finish is reported, and
# calling the script again on the same machine resumes it. PILOT=1 makes the shrunk CPU pipeline check
# instead (--pilot --device cpu, experiments/pilot/runs), to try this script without a GPU: give it a
# stand-in `nvidia-smi` on PATH.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deadline_minutes=${DEADLINE_MINUTES:-9.2}
start=$(date +%s)
if [ "${PILOT:-0}" = 1 ]; then
  protocol_flags=(--pilot) device=cpu runs_dir=experiments/pilot/runs
else
  protocol_flags=() device=cuda runs_dir=experiments/runs
fi

if [ $# -gt 0 ]; then
  runs=("$@")
else
  mapfile -t runs < <(python3 -m experiments.run --list "${protocol_flags[@]}" | tail -n +2 | awk '{print $1}')
fi
gpus=$(nvidia-smi -L | wc -l)
[ "$gpus" -ge 1 ] || { echo "no GPU found" >&2; exit 1; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
echo "${#runs[@]} runs on $gpus GPUs, deadline ${deadline_minutes} min"

minutes_left() {
  python3 -c "import sys; print(f'{float(sys.argv[1]) - ($(date +%s) - $start) / 60:.2f}')" "$deadline_minutes"
}

# Card g takes runs g, g + gpus, g + 2 gpus, ...: every card gets first seeds before second seeds.
for ((gpu = 0; gpu < gpus; gpu++)); do
  (
    for ((index = gpu; index < ${#runs[@]}; index += gpus)); do
      name=${runs[index]}
      left=$(minutes_left)
      if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 0.5 else 1)" "$left"; then
        echo "[gpu $gpu] $name: not started, $left min left"
        continue
      fi
      echo "[gpu $gpu] $name: start with $left min left"
      # The hard stop (timeout) only acts if a run overruns its own --max-minutes (e.g. a slow evaluation).
      CUDA_VISIBLE_DEVICES=$gpu timeout "$(python3 -c "print(int(float('$left') * 60))")" \
        python3 -m experiments.run "$name" "${protocol_flags[@]}" --device "$device" --max-minutes "$left" --eval-reserve 0.75 \
        > "$OUT/$name.out" 2>&1
      echo "[gpu $gpu] $name: exit $?, $(tail -n 1 "$OUT/$name.out")"
    done
  ) &
done
wait

tar -czf "$OUT/runs.tar.gz" --exclude=checkpoints "$runs_dir"
# The per-run console output is in each run's train.log / eval.log; keep only the packed copy.
rm -f "$OUT"/*.out
python3 - "$runs_dir" <<'EOF'
import json, pathlib, sys
for directory in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    rows = [json.loads(l) for l in (directory / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (directory / "metrics.jsonl").exists() else []
    results = directory / "eval" / "results.json"
    summary = json.loads(results.read_text()) if results.exists() else {}
    niah = [r["accuracy"] for r in summary.get("retrieval", []) if r.get("accuracy") is not None]
    tok_s = [r["tokens_per_s"] for r in rows[2:] if "tokens_per_s" in r]
    print(f"{directory.name:<24} step {rows[-1]['step'] if rows else 0:>5} "
          f"loss {rows[-1]['loss'] if rows else float('nan'):.3f} "
          f"tok/s {sum(tok_s) / max(1, len(tok_s)):>9.0f} "
          f"heldout {summary.get('heldout', {}).get('loss', float('nan')):.4f} "
          f"niah mean {100 * sum(niah) / max(1, len(niah)):.1f}% ({len(niah)} cells)")
EOF
echo "total $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
