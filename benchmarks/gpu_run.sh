#!/usr/bin/env bash
# One GPU slot, everything in one go: installs what the GPU machine lacks, checks that the step
# runs, then times siglip_jax's B/16 training step next to open_clip's on the same card, most
# important first, so a slot cut short still answers the main question. Four files land in $OUT
# (the device tool brings back at most 8): results.jsonl (one JSON line per measurement, with its
# name and exact argv), env.txt (card, driver, versions), run.log (this script's progress) and
# bench.log (every measurement's stderr, one after the other).
#
#   bash benchmarks/gpu_run.sh            # from the repo root, with .whl/ beside it
#   (device tool: run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600))
#
# Order (each step is skipped when less than its estimate is left of BUDGET_S):
#   1. siglip_jax B/16, batch 256, --xla_flags_preset=gpu_fast (cuDNN attention, bf16)
#   2. open_clip ViT-B-16-SigLIP, batch 256, torch.compile  (the anchor, same run, same card)
#   3. siglip_jax B/16, batch 256, no XLA flags             (what the flags buy)
#   4. siglip_jax B/16, batch 512, gpu_fast
#   5. siglip_jax B/16, batch 256, gpu_fast, XLA attention  (what cuDNN attention buys)
#   6. siglip_jax L/16 and So400m/14, batch 256, gpu_fast (remat on)
#
# Environment variables read:
#   OUT        output folder (default: /tmp/gpu_run)
#   PYTHON     interpreter with JAX and PyTorch (default: python3)
#   BUDGET_S   seconds this script may take in all (default: 540)
#   STEPS      timed steps per measurement (default: 20)
set -uo pipefail  # no -e: one failed measurement must not stop the others

out="${OUT:-/tmp/gpu_run}"
py="${PYTHON:-python3}"
budget="${BUDGET_S:-540}"
steps="${STEPS:-20}"
mkdir -p "$out"
results="$out/results.jsonl"
start=$SECONDS
export PYTHONUNBUFFERED=1

log() { echo "[gpu_run $((SECONDS - start))s] $*" | tee -a "$out/run.log" >&2; }
left() { echo $((budget - (SECONDS - start))); }

# --- 1. what the machine lacks, from the wheels in .whl/ (only modules that do not import, so
# the image's own versions of everything else stay in charge)
site=/tmp/site
need=()
for pair in ml_collections:ml_collections absl:absl_py sentencepiece:sentencepiece \
            open_clip:open_clip_torch ftfy:ftfy wcwidth:wcwidth; do
  module="${pair%%:*}" wheel="${pair#*:}"
  if ! "$py" -c "import $module" 2>/dev/null; then
    found=(.whl/"$wheel"-*.whl)
    if [[ -e "${found[0]}" ]]; then need+=("${found[@]}"); else log "missing $module and no .whl/$wheel-*.whl"; fi
  fi
done
if ((${#need[@]})); then
  log "installing ${need[*]}"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${need[@]}" >>"$out/run.log" 2>&1 || log "pip install failed"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u '+%Y-%m-%dT%H:%M:%SZ'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" -c 'import jax, jaxlib, flax, optax, torch; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__); print(jax.devices())'
} >"$out/env.txt" 2>&1
cat "$out/env.txt" >&2

# --- 2. measurements
# bench NAME ESTIMATE_S ARGS...: runs siglip_jax.bench if ESTIMATE_S fits in what is left.
bench() {
  local name="$1" estimate="$2"
  shift 2
  if (($(left) < estimate)); then log "skip $name: $(left)s left, needs ~${estimate}s"; return; fi
  log "start $name"
  local rc=0 json="/tmp/gpu_run_$name.json"
  echo "===== $name: siglip_jax.bench --steps=$steps $*" >>"$out/bench.log"
  timeout "$(left)" "$py" -m siglip_jax.bench --steps="$steps" "$@" \
    >"$json" 2>>"$out/bench.log" || rc=$?
  if ((rc == 0)); then
    sed "s/^{/{\"name\": \"$name\", /" "$json" | tee -a "$results"
  else
    log "$name failed ($rc): $(tail -n 3 "$out/bench.log" | tr '\n' ' ' | cut -c1-400)"
    echo "{\"name\": \"$name\", \"error\": $rc}" >>"$results"
  fi
}

anchor() {
  local name="$1" estimate="$2" configs="$3"
  if (($(left) < estimate)); then log "skip $name: $(left)s left"; return; fi
  log "start $name"
  echo "===== $name: CONFIGS=$configs benchmarks/anchor_openclip.py" >>"$out/bench.log"
  CONFIGS="$configs" STEPS="$steps" timeout "$(left)" "$py" benchmarks/anchor_openclip.py \
    2>>"$out/bench.log" | sed "s/^{/{\"name\": \"$name\", /" | tee -a "$results" ||
    log "$name failed"
}

b16=(--config=configs/siglip_b16_224.py)
bench b16_256_fast 120 "${b16[@]}" --batch=256 --xla_flags_preset=gpu_fast
anchor openclip_256_compiled 150 256:1
bench b16_256_noflags 100 "${b16[@]}" --batch=256 --xla_flags_preset=none
bench b16_512_fast 110 "${b16[@]}" --batch=512 --xla_flags_preset=gpu_fast
bench b16_256_xla_attn 100 "${b16[@]}" --batch=256 --xla_flags_preset=gpu_fast \
  --config.model.attention_impl=
bench l16_256_fast 150 --config=configs/siglip_b16_224.py:L/16 --batch=256 \
  --xla_flags_preset=gpu_fast
bench so400m_256_fast 170 --config=configs/siglip_b16_224.py:So400m/14 --batch=256 \
  --xla_flags_preset=gpu_fast
log "done in $((SECONDS - start))s; results in $results"
