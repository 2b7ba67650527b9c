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
#   REMOTE_DIR          code folder on the workers, relative to the home folder, without . or
#                       .. parts: it is deleted and rewritten on each attempt (default: siglip_jax)
#   SETUP_CMD           shell command run as written in REMOTE_DIR on every worker before
#                       training (default: uv builds .venv with Python 3.11,
#                       `pip install -e .[gcs] jax[tpu]`: gs:// clients)
#   REMOTE_PYTHON       interpreter on the workers (default: .venv/bin/python)
#   REMOTE_ENV          extra NAME=value words for the training processes, quoted as in a shell
#                       where a value has spaces; nothing in them is expanded, e.g.
#                       REMOTE_ENV="XLA_FLAGS='--xla_a=1 --xla_b=2' TPU_STDERR_LOG_LEVEL=0"
#   LOG_DIR             local log folder (default: logs/tpu/TPU_NAME)
#   MAX_RESTARTS        attempts before giving up (default 20)
#   POLL_SECONDS        wait between state checks (default 60)
#   DELETE_WHEN_DONE=1  delete the queued resource after training completes
#   ALLOW_LOCAL_WORKDIR=1  accept a --workdir that is not gs:// (lost with the VMs)
#   GCLOUD              the gcloud command (default: gcloud)
# Every value (the settings above and the train arguments) reaches the workers' shell quoted, so
# it arrives as written; one that cannot be passed safely is refused with its name.
set -euo pipefail

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}
say() { echo "tpu_vm.sh: $*" >&2; }
q() { printf '%q' "$1"; }  # a value inside a message, on one line

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
[[ "$ship" == copy || "$ship" == git ]] || die "SHIP must be copy or git (got $(q "$ship"))"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
remote_dir="${REMOTE_DIR:-siglip_jax}"
remote_python="${REMOTE_PYTHON:-.venv/bin/python}"
setup_cmd="${SETUP_CMD:-python3 -m pip install -q --user -U uv && python3 -m uv venv -q --allow-existing --python 3.11 .venv && python3 -m uv pip install -q -p .venv/bin/python -e '.[gcs]' 'jax[tpu]'}"
logdir="${LOG_DIR:-logs/tpu/$tpu}"
max_restarts="${MAX_RESTARTS:-20}"
poll="${POLL_SECONDS:-60}"
read -r -a gcloud <<<"${GCLOUD:-gcloud}"

# Bare words on gcloud's command line (a leading '-' would be read as a flag) and numbers that
# bash arithmetic evaluates (which runs any $(...) inside an array index).
[[ "$tpu" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "TPU_NAME must be a TPU node id: lowercase letters, digits, hyphens (got $(q "$tpu"))"
[[ "$qr" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "QR_NAME must be a queued resource id: lowercase letters, digits, hyphens (got $(q "$qr"))"
[[ "$max_restarts" =~ ^[1-9][0-9]*$ ]] ||
  die "MAX_RESTARTS must be a positive whole number (got $(q "$max_restarts"))"
[[ "$poll" =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
  die "POLL_SECONDS must be a number of seconds (got $(q "$poll"))"
# `rm -rf` runs on REMOTE_DIR on every worker: it must name a folder inside the home folder.
case "/$remote_dir/" in
  //* | */./* | */../*)
    die "REMOTE_DIR must be a folder under the home folder, without . or .. parts" \
      "(got $(q "$remote_dir"))" ;;
esac
# `env` would read a '-' word as an option and a NAME=value word as a setting.
[[ -n "$remote_python" && "$remote_python" != -* && "$remote_python" != *=* ]] ||
  die "REMOTE_PYTHON must be an interpreter path without '=' or a leading '-'" \
    "(got $(q "$remote_python"))"
if [[ "$ship" == git ]]; then
  [[ -n "${REPO_URL:-}" ]] || die "SHIP=git needs REPO_URL"
  ref="${GIT_REF:-$(git -C "$repo" rev-parse HEAD)}"
  [[ "$ref" != -* ]] ||
    die "GIT_REF must name a commit, branch or tag, not an option (got $(q "$ref"))"
fi
# REMOTE_ENV's words, split and unquoted by xargs, which runs and expands nothing.
remote_env=()
if [[ -n "${REMOTE_ENV:-}" ]]; then
  printf '%s' "$REMOTE_ENV" | xargs -r printf '' 2>/dev/null ||
    die "REMOTE_ENV has an unmatched quote (got $(q "$REMOTE_ENV"))"
  while IFS= read -r -d '' word; do
    [[ "$word" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
      die "REMOTE_ENV must hold NAME=value words (got the word $(q "$word"))"
    remote_env+=("$word")
  done < <(printf '%s' "$REMOTE_ENV" | xargs -r printf '%s\0')
fi
where=("--zone=$zone")
[[ -n "${PROJECT:-}" ]] && where+=("--project=$PROJECT")

workdir=""
for arg in "${train_args[@]}"; do
  [[ "$arg" == --workdir=* ]] && workdir="${arg#--workdir=}"
done
[[ -n "$workdir" ]] || die "the train arguments need --workdir=gs://... (checkpoints must outlive the VMs)"
if [[ "$workdir" != gs://* && "${ALLOW_LOCAL_WORKDIR:-0}" != 1 ]]; then
  die "--workdir=$(q "$workdir") is not gs://: a preempted slice loses it (ALLOW_LOCAL_WORKDIR=1 to insist)"
fi

# Words -> one line of shell, single-quoting only the words that need it (readable, and valid
# to paste into a shell). Single quotes, unlike printf %q, mean the same in every POSIX shell,
# whichever login shell the workers run; a newline inside them is literal.
shquote() {
  local out=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
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

# Runs a command string on every worker. gcloud starts ssh without a local shell and ssh hands
# the string to the worker's login shell: one shell reads it, so each value in it is quoted once.
on_all() {
  run "${gcloud[@]}" compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command="$1"
}

rdir="$(shquote "$remote_dir")"

ship_code() {
  if [[ "$ship" == git ]]; then
    local clone
    clone="git clone -q -- $(shquote "$REPO_URL" "$remote_dir")"
    on_all "rm -rf -- $rdir && $clone && git -C $rdir checkout -q $(shquote "$ref")"
    return
  fi
  local tarball="${TMPDIR:-/tmp}/siglip_jax_code_$$.tgz"
  if ((dry_run)); then
    echo "# tar of this checkout's tracked + untracked non-ignored files:"
    echo "$(shquote git -C "$repo" ls-files -z --cached --others --exclude-standard) |" \
      "$(shquote tar -C "$repo" --null -T - -czf "$tarball")"
  else
    # Files deleted in the working tree but still tracked are left out (as they are here).
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do [[ -e "$repo/$f" ]] && printf '%s\0' "$f"; done |
      tar -C "$repo" --null -T - -czf "$tarball"
  fi
  run "${gcloud[@]}" compute tpus tpu-vm scp "$tarball" "$tpu:siglip_jax_code.tgz" "${where[@]}" \
    --worker=all
  on_all "rm -rf -- $rdir && mkdir -p -- $rdir && tar -xzf siglip_jax_code.tgz -C $rdir"
}

clear_stale="sudo lsof -t -w /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | xargs -r sudo kill -9; sudo rm -f /tmp/libtpu_lockfile; true"
train_cmd="cd -- $rdir && $(shquote env PYTHONUNBUFFERED=1 "${remote_env[@]}" "$remote_python" \
  -m siglip_jax.train "${train_args[@]}")"

attempt=0
while :; do
  attempt=$((attempt + 1))
  wait_active
  ship_code
  on_all "cd -- $rdir && $setup_cmd"
  on_all "$clear_stale"
  log="$logdir/attempt_$attempt"
  if ((dry_run)); then
    shquote mkdir -p "$log"
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
  say "the slice is still up; delete it with:" \
    "$(shquote "${gcloud[@]}" compute tpus queued-resources delete "$qr" "${where[@]}" --force --quiet)"
fi
