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
# variable below, in one pass (a value holding `${...}` is kept as written); a template naming
# any other variable is an error, not an empty string. Names, numbers and node labels must have
# their Kubernetes form; free text (IMAGE, GCP_SERVICE_ACCOUNT, the train arguments) is written
# as YAML double-quoted strings and reaches the pods byte for byte (in the arguments `$` is
# written `$$`, so Kubernetes' own $(VAR) expansion gives them back unchanged). A value that
# cannot be written (not UTF-8) is refused with its name.
#
# Environment variables read:
#   IMAGE                container image with this package and jax[cuda12,k8s] / jax[tpu]
#                        (required)
#   NAME                 JobSet name, a DNS label (default: siglip); NAMESPACE (default: default)
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
q() { printf '%q' "$1"; }  # a value inside a message, on one line

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
    *) die "unknown argument $(q "$1") (train arguments go after --; see --help)" ;;
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

# Values the templates write bare (unquoted, in names and comments): their Kubernetes syntax
# leaves nothing for YAML to read specially. Numbers without a leading 0 (YAML 1.1: octal).
for var in MAX_RESTARTS NUM_NODES GPUS_PER_NODE COORDINATOR_PORT NUM_HOSTS CHIPS_PER_HOST; do
  [[ "${!var}" =~ ^(0|[1-9][0-9]*)$ ]] || die "$var must be a whole number (got $(q "${!var}"))"
done
for var in NAME NAMESPACE; do
  value="${!var}"
  [[ "$value" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ && ${#value} -le 63 ]] ||
    die "$var must be a DNS label: lowercase letters, digits, hyphens (got $(q "$value"))"
done
for var in TPU_ACCELERATOR TPU_TOPOLOGY; do  # node label values
  value="${!var}"
  [[ "$value" =~ ^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$ && ${#value} -le 63 ]] ||
    die "$var must be a node label value: letters, digits, - _ . (got $(q "$value"))"
done

# Prints $1 as the inside of a YAML double-quoted string (also a JSON string): \ and " escaped,
# and as \u escapes every character YAML would refuse or read as a line break (C0 and C1
# controls, DEL, U+2028, U+2029, U+FEFF, U+FFFE, U+FFFF), so the value stays on one line and
# reads back unchanged. With $2 = args, `$` is doubled: Kubernetes expands $(VAR) in a
# container's args and turns $$ into $.
yaml_escape() {
  local LC_ALL=C  # walks bytes; the characters above are found by their UTF-8 bytes
  local s="$1" out="" c i n b1 b2 cp len
  for ((i = 0; i < ${#s}; i++)); do
    c="${s:i:1}"
    printf -v n '%d' "'$c"
    if ((n < 0x20 || n == 0x7F)); then
      printf -v c '\\u%04X' "$n"
    elif [[ "$c" == [\\\"] ]]; then
      c="\\$c"
    elif [[ "$c" == '$' && "${2:-}" == args ]]; then
      c='$$'
    elif ((n == 0xC2 || n == 0xE2 || n == 0xEF)); then  # the lead bytes of those characters
      printf -v b1 '%d' "'${s:i+1:1}"
      printf -v b2 '%d' "'${s:i+2:1}"
      if ((n == 0xC2)); then
        cp=$(((n & 0x1F) << 6 | (b1 & 0x3F))) len=2
      else
        cp=$(((n & 0x0F) << 12 | (b1 & 0x3F) << 6 | (b2 & 0x3F))) len=3
      fi
      if (((b1 & 0xC0) == 0x80 && (len == 2 || (b2 & 0xC0) == 0x80))) &&
         ((cp <= 0x9F || cp == 0x2028 || cp == 0x2029 || cp == 0xFEFF || cp >= 0xFFFE)); then
        printf -v c '\\u%04X' "$cp"
        i=$((i + len - 1))
      fi
    fi
    out+="$c"
  done
  printf '%s' "$out"
}

# Kubernetes takes UTF-8 strings only (iconv checks; without it, kubectl refuses such a value).
need_utf8() {  # $1: what the value is, for the error; $2: the value
  if command -v iconv >/dev/null && ! printf '%s' "$2" | iconv -f UTF-8 -t UTF-8 >/dev/null 2>&1
  then
    die "$1 is not valid UTF-8, which Kubernetes needs (got $(q "$2"))"
  fi
}

# Free text, written inside the templates' double quotes.
need_utf8 IMAGE "$IMAGE"
need_utf8 GCP_SERVICE_ACCOUNT "$GCP_SERVICE_ACCOUNT"
IMAGE="$(yaml_escape "$IMAGE")"
GCP_SERVICE_ACCOUNT="$(yaml_escape "$GCP_SERVICE_ACCOUNT")"
# The train arguments as a YAML flow sequence of double-quoted strings.
TRAIN_ARGS="["
for ((i = 0; i < ${#train_args[@]}; i++)); do
  need_utf8 "train argument $((i + 1))" "${train_args[i]}"
  TRAIN_ARGS+="\"$(yaml_escape "${train_args[i]}" args)\", "
done
TRAIN_ARGS="${TRAIN_ARGS%, }]"
VARS=(NAME NAMESPACE MAX_RESTARTS GCP_SERVICE_ACCOUNT NUM_NODES GPUS_PER_NODE COORDINATOR_PORT
      TPU_ACCELERATOR TPU_TOPOLOGY NUM_HOSTS CHIPS_PER_HOST REPLICATED_JOB TRAIN_ARGS IMAGE)

is_template_var() {
  local var
  for var in "${VARS[@]}"; do [[ "$1" == "$var" ]] && return 0; done
  return 1
}

# Prints template $1 with each ${VAR} replaced, in one pass over the template: an inserted value
# is never scanned again.
render() {
  local rest out="" name open="\${" close="}"
  rest="$(<"$1")"
  while [[ "$rest" == *"$open"* ]]; do
    out+="${rest%%"$open"*}"
    rest="${rest#*"$open"}"
    name="${rest%%"$close"*}"
    [[ "$rest" == *"$close"* ]] || die "$1 has a \${ without its }"
    is_template_var "$name" || die "$1 names \${$(q "$name")}, which render.sh does not set"
    out+="${!name}"
    rest="${rest#*"$close"}"
  done
  printf '%s\n' "$out$rest"
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
