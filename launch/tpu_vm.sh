#!/usr/bin/env bash
# Trains on a Cloud TPU slice: creates it as a queued resource, ships this code to every worker,
# runs the same training command on all of them (JAX joins them through the TPU metadata), and
# starts over after a preemption until training completes.
#
#   TPU_NAME=my-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-64 SPOT=1 \
#     launch/tpu_vm.sh [--dry-run] -- --config=configs/siglip_b16_224.py \
#         --workdir=gs://BUCKET/runs/b16 [--config.KEY=VALUE ...]
#
# Each attempt:
#   1. waits until the queued resource QR_NAME is ACTIVE: creates it when missing, deletes and
#      recreates it when SUSPENDED or FAILED (what a preempted spot slice turns into);
#   2. ships the code to all workers (SHIP=copy: a tarball of the git-tracked and untracked,
#      non-ignored files of this checkout; SHIP=git: `git clone REPO_URL` at GIT_REF);
#   3. runs SETUP_CMD on all workers (a Python >= 3.11 venv with jax[tpu] and this package);
#   4. kills stale processes holding the TPU (`sudo lsof -w /dev/accel* /dev/vfio/*`) and removes
#      /tmp/libtpu_lockfile, which a killed run leaves behind and which blocks the next one;
#   5. runs `python -m siglip_jax.train <args>` on all workers (--worker=all), one log per worker
#      in LOG_DIR/attempt_<n>/<worker>.log on this machine (kept when the slice is gone).
# Training that exits 0 (and did not stop for a preemption) ends the loop. A failure while the
# slice is still ACTIVE is a real error: the script stops with it. Anything else (slice
# preempted, ssh cut) starts the next attempt, which resumes from the workdir's latest checkpoint;
# the workdir must therefore outlive the VMs: a gs:// path (Orbax writes it through tensorstore).
# gcloud's multi-worker ssh needs your key in an agent: `ssh-add ~/.ssh/google_compute_engine`.
# --dry-run prints every command of the first attempt and runs nothing.
#
# Environment variables read:
#   TPU_NAME            node id of the slice (required)
#   ZONE                e.g. us-west4-a (required)
#   ACCELERATOR_TYPE    e.g. v4-32, v5litepod-64, v5p-128, v6e-256 (required)
#   PROJECT             GCP project (default: gcloud's configured one)
#   QR_NAME             queued resource id (default: TPU_NAME)
#   RUNTIME_VERSION     TPU VM image (default from the accelerator: tpu-ubuntu2204-base for v4,
#                       v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e)
#   SPOT=1 | RESERVED=1 request a spot slice / use a reservation (default: on-demand)
#   SHIP                copy (default) or git
#   REPO_URL, GIT_REF   for SHIP=git (GIT_REF default: this checkout's HEAD commit)
#   REMOTE_DIR          code folder on the workers, relative to the home folder
#                       (default: siglip_jax)
#   SETUP_CMD           run in REMOTE_DIR on every worker before training (default: uv builds
#                       .venv with Python 3.11, `pip install -e .[gcs] jax[tpu]`: gs:// clients)
#   REMOTE_PYTHON       interpreter on the workers (default: .venv/bin/python)
#   REMOTE_ENV          extra VAR=value words for the training processes (e.g. XLA flags)
#   LOG_DIR             local log folder (default: logs/tpu/TPU_NAME)
#   MAX_RESTARTS        attempts before giving up (default 20)
#   POLL_SECONDS        wait between state checks (default 60)
#   DELETE_WHEN_DONE=1  delete the queued resource after training completes
#   ALLOW_LOCAL_WORKDIR=1  accept a --workdir that is not gs:// (lost with the VMs)
#   GCLOUD              the gcloud command (default: gcloud)
set -euo pipefail

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}
say() { echo "tpu_vm.sh: $*" >&2; }

dry_run=0
train_args=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    --) shift; train_args+=("$@"); break ;;
    *) train_args+=("$1"); shift ;;
  esac
done
((${#train_args[@]})) || die "no train arguments after -- (e.g. -- --config=... --workdir=gs://...)"

tpu="${TPU_NAME:-}"; zone="${ZONE:-}"; accel="${ACCELERATOR_TYPE:-}"
[[ -n "$tpu" ]] || die "set TPU_NAME"
[[ -n "$zone" ]] || die "set ZONE"
[[ -n "$accel" ]] || die "set ACCELERATOR_TYPE (e.g. v5litepod-64)"
qr="${QR_NAME:-$tpu}"
case "$accel" in
  v4-*) default_runtime="tpu-ubuntu2204-base" ;;
  v5litepod-* | v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  *) default_runtime="tpu-ubuntu2204-base" ;;
esac
runtime="${RUNTIME_VERSION:-$default_runtime}"
ship="${SHIP:-copy}"
[[ "$ship" == copy || "$ship" == git ]] || die "SHIP must be copy or git (got '$ship')"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
remote_dir="${REMOTE_DIR:-siglip_jax}"
remote_python="${REMOTE_PYTHON:-.venv/bin/python}"
setup_cmd="${SETUP_CMD:-python3 -m pip install -q --user -U uv && python3 -m uv venv -q --allow-existing --python 3.11 .venv && python3 -m uv pip install -q -p .venv/bin/python -e '.[gcs]' 'jax[tpu]'}"
logdir="${LOG_DIR:-logs/tpu/$tpu}"
max_restarts="${MAX_RESTARTS:-20}"
poll="${POLL_SECONDS:-60}"
read -r -a gcloud <<<"${GCLOUD:-gcloud}"
where=("--zone=$zone")
[[ -n "${PROJECT:-}" ]] && where+=("--project=$PROJECT")

workdir=""
for arg in "${train_args[@]}"; do
  [[ "$arg" == --workdir=* ]] && workdir="${arg#--workdir=}"
done
[[ -n "$workdir" ]] || die "the train arguments need --workdir=gs://... (checkpoints must outlive the VMs)"
if [[ "$workdir" != gs://* && "${ALLOW_LOCAL_WORKDIR:-0}" != 1 ]]; then
  die "--workdir=$workdir is not gs://: a preempted slice loses it (ALLOW_LOCAL_WORKDIR=1 to insist)"
fi

# Words -> one line of shell, single-quoting only the words that need it (readable, and valid
# to paste into a shell).
shquote() {
  local out=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Prints a command in a dry run, else runs it.
run() {
  if ((dry_run)); then
    shquote "$@"
  else
    "$@"
  fi
}

qr_state() {  # ACTIVE, SUSPENDED, ... or MISSING
  "${gcloud[@]}" compute tpus queued-resources describe "$qr" "${where[@]}" \
    --format='value(state.state)' 2>/dev/null || echo MISSING
}

create_qr() {
  local tier=()
  [[ "${SPOT:-0}" == 1 ]] && tier+=(--spot)
  [[ "${RESERVED:-0}" == 1 ]] && tier+=(--reserved)
  run "${gcloud[@]}" compute tpus queued-resources create "$qr" "--node-id=$tpu" \
    "--accelerator-type=$accel" "--runtime-version=$runtime" "${where[@]}" "${tier[@]}"
}

delete_qr() {
  run "${gcloud[@]}" compute tpus queued-resources delete "$qr" "${where[@]}" --force --quiet
}

wait_active() {
  if ((dry_run)); then
    echo "# if the queued resource is missing:"
    create_qr
    echo "# if it is SUSPENDED or FAILED (a preempted slice): delete, then create as above"
    delete_qr
    echo "# then poll every ${poll}s until its state is ACTIVE:"
    run "${gcloud[@]}" compute tpus queued-resources describe "$qr" "${where[@]}" \
      --format='value(state.state)'
    return
  fi
  local state
  while :; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE) return 0 ;;
      MISSING) say "creating queued resource $qr ($accel, $runtime)"; create_qr ;;
      SUSPENDED | FAILED) say "queued resource $qr is $state: deleting and recreating it"
        delete_qr; create_qr ;;
      *) say "queued resource $qr is $state; waiting" ;;
    esac
    sleep "$poll"
  done
}

on_all() {  # runs a command string on every worker
  run "${gcloud[@]}" compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command="$1"
}

ship_code() {
  if [[ "$ship" == git ]]; then
    [[ -n "${REPO_URL:-}" ]] || die "SHIP=git needs REPO_URL"
    local ref="${GIT_REF:-$(git -C "$repo" rev-parse HEAD)}"
    on_all "rm -rf $remote_dir && git clone -q $REPO_URL $remote_dir && git -C $remote_dir checkout -q $ref"
    return
  fi
  local tarball="${TMPDIR:-/tmp}/siglip_jax_code_$$.tgz"
  if ((dry_run)); then
    echo "# tar of this checkout's tracked + untracked non-ignored files:"
    echo "git -C $repo ls-files -z --cached --others --exclude-standard | tar -C $repo --null -T - -czf $tarball"
  else
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      tar -C "$repo" --null -T - -czf "$tarball"
  fi
  run "${gcloud[@]}" compute tpus tpu-vm scp "$tarball" "$tpu:siglip_jax_code.tgz" "${where[@]}" \
    --worker=all
  on_all "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf siglip_jax_code.tgz -C $remote_dir"
}

clear_stale="sudo lsof -t -w /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | xargs -r sudo kill -9; sudo rm -f /tmp/libtpu_lockfile; true"
train_cmd="cd $remote_dir && env PYTHONUNBUFFERED=1 ${REMOTE_ENV:+$REMOTE_ENV }$remote_python -m siglip_jax.train $(shquote "${train_args[@]}")"

attempt=0
while :; do
  attempt=$((attempt + 1))
  wait_active
  ship_code
  on_all "cd $remote_dir && $setup_cmd"
  on_all "$clear_stale"
  log="$logdir/attempt_$attempt"
  if ((dry_run)); then
    echo "mkdir -p $log"
    run "${gcloud[@]}" compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all \
      --command="$train_cmd" "--output-directory=$log"
    echo "# then: exit 0 without 'preempted:' in $log/0.log -> done; failed on an ACTIVE slice ->" \
      "stop; otherwise attempt 2 (up to $max_restarts)"
    exit 0
  fi
  mkdir -p "$log"
  say "attempt $attempt: training on $tpu, logs in $log/<worker>.log"
  rc=0
  "${gcloud[@]}" compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all \
    --command="$train_cmd" "--output-directory=$log" || rc=$?
  preempted=0
  grep -qs "^preempted: saved step" "$log/0.log" && preempted=1
  if ((rc == 0 && !preempted)); then
    say "training completed (attempt $attempt)"
    break
  fi
  sleep "$poll"  # a preempted slice takes a moment to leave ACTIVE
  state="$(qr_state)"
  if ((rc != 0 && rc != 255 && !preempted)) && [[ "$state" == ACTIVE ]]; then
    say "training failed (status $rc) on an ACTIVE slice: not a preemption; see $log/"
    tail -n 20 "$log/0.log" >&2 || true
    exit "$rc"
  fi
  if ((attempt >= max_restarts)); then
    die "$max_restarts attempts used (MAX_RESTARTS); the workdir keeps the latest checkpoint"
  fi
  say "attempt $attempt ended (status $rc, slice $state): starting over; training resumes from $workdir"
done

if [[ "${DELETE_WHEN_DONE:-0}" == 1 ]]; then
  delete_qr
else
  say "the slice is still up; delete it with: ${gcloud[*]} compute tpus queued-resources delete $qr ${where[*]} --force --quiet"
fi
