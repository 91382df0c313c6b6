#!/usr/bin/env bash
# Issue 19: the runs of a protocol on ONE GPU, PROCS processes at a time on the same card, in one command.
#   bash experiments/gpu_runs_concurrent.sh [RUN ...]   # default: every run of the design, in its order
# DESIGN (default issue19): the protocol (`python -m experiments.run --list --design DESIGN`).
# PROCS (default 8): runs at a time; a queue in the design's run order, the next run starting when one ends.
# DEADLINE_MINUTES (default 8.6): every run stops by then (training at its last checkpoint, evaluation and
# the router SNR only with the time they need), so that packing ends before a 9.5-minute command does. A run
# that did not finish is listed, and calling the script again on the same (warm) machine resumes it, with
# RUNS_HOME set (below). Outputs without checkpoints: $OUT/runs-issue19.tar.gz (unpack from the repository
# root: tar -xzf runs-issue19.tar.gz), a card sample every 20 s in the runs directory's
# gpu_samples_<UTC start>.csv (one file per call), each run's console output in
# console/NAME_<UTC start>.out, the script's own log on stdout (tee it into $OUT).
# RUNS_HOME (set it on the device, e.g. RUNS_HOME=$HOME/flashmoba-runs): the runs directory lives there,
# outside the working tree, and the tree's copy becomes a link to it. The device tool replaces a carried
# ignored path, and removes one not carried, on every call, checkpoints included; a directory outside the
# tree should survive while the machine stays warm (not yet tried), so that only with RUNS_HOME can a
# second call resume. PILOT=1: the shrunk CPU pipeline check (--pilot --device cpu,
# experiments/pilot/runs-issue19); give it a stand-in `nvidia-smi` on PATH.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
design=${DESIGN:-issue19}
procs=${PROCS:-8}
deadline_minutes=${DEADLINE_MINUTES:-8.6}
# 16 CPU cores for 8 processes: two threads each (a 6.6M model needs little CPU beyond kernel launches).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2}
start=$(date +%s)
call_stamp=$(date -u +%Y%m%dT%H%M%S)  # names this call's card samples and console copies
if [ "${PILOT:-0}" = 1 ]; then
  protocol_flags=(--pilot --design "$design") device=cpu
else
  protocol_flags=(--design "$design") device=cuda
fi
runs_dir=$(python3 -c "
import sys; sys.path.insert(0, '.')
from experiments.protocol import protocol_for
print(protocol_for(${PILOT:-0} == 1, '$design').runs_dir)")

if [ $# -gt 0 ]; then
  runs=("$@")
else
  mapfile -t runs < <(python3 -m experiments.run --list "${protocol_flags[@]}" | tail -n +2 | awk '{print $1}')
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || { echo "no GPU found" >&2; exit 1; }
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
echo "${#runs[@]} runs of $design, $procs at a time on one card ($CUDA_VISIBLE_DEVICES), deadline ${deadline_minutes} min"
mkdir -p "$runs_dir"
if [ -n "${RUNS_HOME:-}" ]; then
  store="$RUNS_HOME/$runs_dir"
  if [ ! -d "$store" ]; then  # first call on this machine: start from the runs the tree holds
    mkdir -p "$(dirname "$store")" && cp -a "$runs_dir" "$store"
  fi
  if [ ! -L "$runs_dir" ]; then
    mv "$runs_dir" "$runs_dir.carried.$(date +%s)" && ln -s "$store" "$runs_dir"
  fi
  echo "runs in $store (resumable while this machine is up)"
fi

minutes_left() {
  python3 -c "import sys; print(f'{float(sys.argv[1]) - ($(date +%s) - $start) / 60:.2f}')" "$deadline_minutes"
}

# What the card does while the runs share it (utilisation, memory): the concurrency check of the report.
(
  echo "seconds,utilization_gpu_percent,memory_used_mib"
  while true; do
    sample=$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1)
    echo "$(( $(date +%s) - start )),${sample// /}"
    sleep 20
  done
) > "$runs_dir/gpu_samples_$call_stamp.csv" &
sampler=$!

run_one() {
  local name=$1 slot=$2 left
  left=$(minutes_left)
  if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 1.0 else 1)" "$left"; then
    echo "[run $slot] $name: not started, $left min left"
    return 0
  fi
  echo "[run $slot] $name: start at $(( $(date +%s) - start )) s with $left min left"
  # The hard stop (timeout) only acts if a run overruns its own --max-minutes (e.g. a slow evaluation).
  timeout "$(python3 -c "print(int(float('$left') * 60) + 20)")" \
    python3 -m experiments.run "$name" "${protocol_flags[@]}" --device "$device" --max-minutes "$left" \
    --eval-reserve 1.2 > "$OUT/$name.out" 2>&1
  echo "[run $slot] $name: exit $? at $(( $(date +%s) - start )) s, $(tail -n 1 "$OUT/$name.out")"
}

# The queue: at most $procs runs at a time, in the design's order (the most decisive first).
slot=0
for name in "${runs[@]}"; do
  while [ "$(jobs -rp | wc -l)" -gt "$procs" ]; do  # the sampler is one of the jobs
    wait -n
  done
  run_one "$name" "$slot" &
  slot=$((slot + 1))
  sleep 2  # start-ups apart: each reads the corpus and builds its model
done
for pid in $(jobs -rp); do
  [ "$pid" = "$sampler" ] || wait "$pid"
done
kill "$sampler" 2>/dev/null

# Per-run console output: each run's train.log / eval.log / snr.log hold it; keep the copies for failures,
# one per run and call (a later call must not replace an earlier one's).
mkdir -p "$runs_dir/console"
for out_file in "$OUT"/*.out; do
  [ -e "$out_file" ] && mv "$out_file" "$runs_dir/console/$(basename "$out_file" .out)_$call_stamp.out"
done
# -h: through the RUNS_HOME link, so the archive holds the files under the tree's path.
tar -czhf "$OUT/runs-issue19.tar.gz" --exclude=checkpoints "$runs_dir"
ls -la "$OUT/runs-issue19.tar.gz"
python3 - "$runs_dir" <<'EOF'
import json, pathlib, sys
for directory in sorted(p for p in pathlib.Path(sys.argv[1]).iterdir() if (p / "train_config.json").exists()):
    rows = [json.loads(l) for l in (directory / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (directory / "metrics.jsonl").exists() else []
    results = directory / "eval" / "results.json"
    summary = json.loads(results.read_text()) if results.exists() else {}
    snr = directory / "eval" / "snr.json"
    layers = json.loads(snr.read_text())["layers"] if snr.exists() else []
    niah = [r["accuracy"] for r in summary.get("retrieval", []) if r.get("accuracy") is not None]
    tok_s = [r["tokens_per_s"] for r in rows[2:] if "tokens_per_s" in r]
    snr_text = " ".join(f"L{r['layer']}@{r['length']}:{r['snr']:.2f}/{r['measured_recall']:.2f}"
                        for r in layers if r.get("snr") is not None)
    print(f"{directory.name:<24} step {rows[-1]['step'] if rows else 0:>5} "
          f"loss {rows[-1]['loss'] if rows else float('nan'):.3f} "
          f"tok/s {sum(tok_s) / max(1, len(tok_s)):>9.0f} "
          f"heldout {summary.get('heldout', {}).get('loss', float('nan')):.4f} "
          f"niah mean {100 * sum(niah) / max(1, len(niah)):.1f}% ({len(niah)} cells) "
          f"snr {snr_text or '-'}")
EOF
echo "total $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s"
