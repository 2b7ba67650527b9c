#!/usr/bin/env bash
# Renders the Kubernetes manifests for a training run and applies them (kubectl apply), or, with
# --dry-run, prints them with every value substituted.
#
#   IMAGE=REGISTRY/siglip_jax:TAG NUM_NODES=2 launch/k8s/render.sh gpu [--dry-run] -- \
#       --config=configs/siglip_b16_224.py --workdir=gs://BUCKET/runs/b16
#   IMAGE=... TPU_ACCELERATOR=tpu-v5-lite-podslice TPU_TOPOLOGY=4x4 NUM_HOSTS=4 \
#     launch/k8s/render.sh tpu [--dry-run] -- --config=... --workdir=gs://...
#
# Output: common.yaml (service account, read-only Role for JAX's Kubernetes auto-detection,
# headless service) followed by gpu-jobset.yaml or tpu-jobset.yaml. Needs the JobSet controller
# in the cluster (https://jobset.sigs.k8s.io). Each `${VAR}` in the templates is replaced by the
# variable below; a template naming any other variable is an error, not an empty string.
#
# Environment variables read:
#   IMAGE                container image with this package and jax[cuda12,k8s] / jax[tpu]
#                        (required)
#   NAME                 JobSet name (default: siglip); NAMESPACE (default: default)
#   MAX_RESTARTS         JobSet restarts after a failure or preemption (default: 20)
#   GCP_SERVICE_ACCOUNT  Workload Identity binding for gs:// access (default: none)
#   KUBECTL              the kubectl command (default: kubectl)
#   gpu: NUM_NODES (default 1), GPUS_PER_NODE (default 8), COORDINATOR_PORT (default 55527)
#   tpu: TPU_ACCELERATOR (default tpu-v5-lite-podslice), TPU_TOPOLOGY (default 4x4),
#        NUM_HOSTS (default 4), CHIPS_PER_HOST (default 4)
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true  # bash 5.2: '&' in a replacement is literal

die() {
  echo "render.sh: error: $*" >&2
  exit 2
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dry_run=0
kind=""
train_args=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    gpu | tpu) [[ -z "$kind" ]] || die "give gpu or tpu once"; kind="$1"; shift ;;
    --) shift; train_args+=("$@"); break ;;
    *) die "unknown argument '$1' (train arguments go after --; see --help)" ;;
  esac
done
[[ -n "$kind" ]] || die "say which: render.sh gpu|tpu [--dry-run] -- <train args>"
((${#train_args[@]})) || die "no train arguments after -- (e.g. --config=... --workdir=gs://...)"
[[ -n "${IMAGE:-}" ]] || die "set IMAGE (a container image with siglip_jax installed)"

# The values the templates may name.
NAME="${NAME:-siglip}"
NAMESPACE="${NAMESPACE:-default}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
GCP_SERVICE_ACCOUNT="${GCP_SERVICE_ACCOUNT:-}"
NUM_NODES="${NUM_NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
COORDINATOR_PORT="${COORDINATOR_PORT:-55527}"
TPU_ACCELERATOR="${TPU_ACCELERATOR:-tpu-v5-lite-podslice}"
TPU_TOPOLOGY="${TPU_TOPOLOGY:-4x4}"
NUM_HOSTS="${NUM_HOSTS:-4}"
CHIPS_PER_HOST="${CHIPS_PER_HOST:-4}"
# shellcheck disable=SC2034  # read through ${!var} in render()
if [[ "$kind" == gpu ]]; then REPLICATED_JOB=workers; else REPLICATED_JOB=slice; fi
for var in MAX_RESTARTS NUM_NODES GPUS_PER_NODE COORDINATOR_PORT NUM_HOSTS CHIPS_PER_HOST; do
  [[ "${!var}" =~ ^[0-9]+$ ]] || die "$var must be a whole number (got '${!var}')"
done
[[ "$NAME" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die "NAME must be a DNS label (got '$NAME')"

# The train arguments as a YAML flow sequence of JSON strings (JSON is valid YAML).
TRAIN_ARGS="["
for arg in "${train_args[@]}"; do
  arg="${arg//\\/\\\\}"
  arg="${arg//\"/\\\"}"
  TRAIN_ARGS+="\"$arg\", "
done
TRAIN_ARGS="${TRAIN_ARGS%, }]"
VARS=(NAME NAMESPACE MAX_RESTARTS GCP_SERVICE_ACCOUNT NUM_NODES GPUS_PER_NODE COORDINATOR_PORT
      TPU_ACCELERATOR TPU_TOPOLOGY NUM_HOSTS CHIPS_PER_HOST REPLICATED_JOB TRAIN_ARGS IMAGE)

render() {
  local text var
  text="$(<"$1")"
  for var in "${VARS[@]}"; do
    text="${text//"\${$var}"/${!var}}"
  done
  if [[ "$text" =~ \$\{[A-Za-z_]+\} ]]; then
    die "$1 names ${BASH_REMATCH[0]}, which render.sh does not set"
  fi
  printf '%s\n' "$text"
}

manifests="$(render "$here/common.yaml"; echo "---"; render "$here/$kind-jobset.yaml")"
if ((dry_run)); then
  printf '%s\n' "$manifests"
  exit 0
fi
read -r -a kubectl <<<"${KUBECTL:-kubectl}"
printf '%s\n' "$manifests" | "${kubectl[@]}" apply -f -
echo "render.sh: submitted JobSet $NAME; logs: ${kubectl[*]} logs -n $NAMESPACE" \
  "-l jobset.sigs.k8s.io/jobset-name=$NAME --prefix -f" >&2
