#!/usr/bin/env bash
# Run fusejax on every worker of a Cloud TPU VM pod slice; recreate the slice and resume after preemption.
#
# Usage (from the root of your fusejax checkout, with the gcloud CLI logged in: `gcloud auth login`):
#
#   export TPU_NAME=fusejax-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 RUNTIME_VERSION=v2-alpha-tpuv5-lite
#   export BUCKET=gs://my-bucket/fusejax           # shared, preemption-proof storage (see below)
#   launch/tpu_pod.sh up                            # create the slice (or reuse it) and install fusejax everywhere
#   launch/tpu_pod.sh run represent configs/my-run.yaml
#   launch/tpu_pod.sh run train configs/my-run.yaml train.lr=2e-5
#   launch/tpu_pod.sh ssh 'ls /mnt/fusejax'         # any shell command on every worker
#   launch/tpu_pod.sh down                          # delete the slice
#
# `run STAGE CONFIG [key=value ...]` copies configs/ and CONFIG (a path relative to this checkout) to every
# worker, runs the same `fusejax STAGE CONFIG ...` on all of them (`--worker=all`; each process joins the
# others through fusejax.distributed.initialize) and streams their output, also appended to
# logs/tpu_pod-$TPU_NAME.log. When the command fails because the slice was preempted, it recreates the
# slice, reinstalls, and runs the command again: fusejax stages resume from their latest checkpoint.
#
# Variables:
#   TPU_NAME, ZONE          required
#   ACCELERATOR_TYPE        required to create: v4-8, v4-32, v5litepod-16, v5p-64, v6e-16, ...
#   RUNTIME_VERSION         required to create: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
#                           v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
#   PROJECT                 GCP project (default: gcloud's configured project)
#   SPOT=1                  create a Spot (preemptible) slice
#   FUSEJAX_SOURCE          what pip installs on the workers. Default: git+<this checkout's origin>@<HEAD
#                           commit> (push it first). Or a local wheel file (`pip wheel --no-deps -w dist .`),
#                           which is copied to every worker.
#   BUCKET                  gs:// bucket (optionally with a folder) mounted with gcsfuse at /mnt/fusejax on every
#                           worker. Put run.output_dir, corpus.inputs and model folders there: every worker sees
#                           the same files, and they survive preemption (a worker's own disk does not).
#   MAX_RESTARTS            how many times `run` recreates a preempted slice (default 20)
#   REMOTE_DIR              working directory on the workers (default fusejax-run, in the home folder)

set -euo pipefail

case ${1:-} in
    up | run | ssh | down) ;;
    *)
        sed -n '4,34p' "$0" >&2  # the usage block above
        exit 2
        ;;
esac
: "${TPU_NAME:?set TPU_NAME (the TPU VM name)}"
: "${ZONE:?set ZONE (e.g. us-west4-a)}"
REMOTE_DIR=${REMOTE_DIR:-fusejax-run}
MAX_RESTARTS=${MAX_RESTARTS:-20}
VENV='$HOME/fusejax-venv'  # expanded on the workers
MOUNT=/mnt/fusejax
LOG="logs/tpu_pod-$TPU_NAME.log"

tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... for this slice's zone and project
    local sub=$1
    shift
    gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

on_all() {  # run a shell command on every worker; output streams back interleaved
    tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

state() {  # READY, CREATING, PREEMPTED, TERMINATED, ... or MISSING
    tpu describe "$TPU_NAME" --format='value(state)' 2>/dev/null || echo MISSING
}

create() {
    local st
    st=$(state)
    if [[ $st == READY ]]; then
        echo "reusing TPU $TPU_NAME (READY)"
        return
    fi
    if [[ $st != MISSING ]]; then
        echo "TPU $TPU_NAME is $st: deleting it to create it again"
        tpu delete "$TPU_NAME" --quiet
    fi
    : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE (e.g. v5litepod-16) to create the TPU}"
    : "${RUNTIME_VERSION:?set RUNTIME_VERSION (e.g. v2-alpha-tpuv5-lite) to create the TPU}"
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${SPOT:+--spot}
}

install() {  # Python 3.11 venv (via uv), jax[tpu] and fusejax on every worker; gcsfuse mount of BUCKET
    local source=${FUSEJAX_SOURCE:-}
    if [[ -z $source ]]; then
        local origin
        origin=$(git remote get-url origin 2>/dev/null) || {
            echo "no git remote 'origin': set FUSEJAX_SOURCE to a git URL or a wheel file" >&2
            exit 2
        }
        source="git+$origin@$(git rev-parse HEAD)"
    elif [[ -f $source ]]; then
        tpu scp "$source" "$TPU_NAME:" --worker=all
        source="\$HOME/$(basename "$source")"
    fi
    on_all "set -e
        command -v uv >/dev/null || [ -x \$HOME/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh
        export PATH=\$HOME/.local/bin:\$PATH
        [ -x $VENV/bin/python ] || uv venv --python 3.11 $VENV
        uv pip install --python $VENV/bin/python 'jax[tpu]>=0.10.2,<0.11' \"$source\""
    if [[ -n ${BUCKET:-} ]]; then
        local bucket=${BUCKET#gs://}
        local only_dir=""
        [[ $bucket == */* ]] && only_dir="--only-dir ${bucket#*/}"
        on_all "set -e
            if ! command -v gcsfuse >/dev/null; then
                key=/usr/share/keyrings/cloud.google.asc
                apt_repo=https://packages.cloud.google.com/apt
                curl -fsSL \$apt_repo/doc/apt-key.gpg | sudo tee \$key >/dev/null
                echo \"deb [signed-by=\$key] \$apt_repo gcsfuse-\$(lsb_release -cs) main\" |
                    sudo tee /etc/apt/sources.list.d/gcsfuse.list
                sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
            fi
            sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
            mountpoint -q $MOUNT || gcsfuse --implicit-dirs $only_dir ${bucket%%/*} $MOUNT"
    fi
}

sync_configs() {  # configs/ and CONFIG to the same relative paths under REMOTE_DIR on every worker
    local config=$1
    if [[ $config == /* || $config == ../* ]]; then
        echo "CONFIG must be a path inside this checkout (its base: files are copied alongside): $config" >&2
        exit 2
    fi
    on_all "mkdir -p $REMOTE_DIR/$(dirname "$config")"
    tpu scp --recurse configs "$TPU_NAME:$REMOTE_DIR/" --worker=all
    tpu scp "$config" "$TPU_NAME:$REMOTE_DIR/$config" --worker=all
}

run() {  # run STAGE CONFIG [key=value ...] on every worker, recreating the slice after preemption
    if [[ $# -lt 2 ]]; then
        echo "usage: launch/tpu_pod.sh run STAGE CONFIG [key=value ...]" >&2
        exit 2
    fi
    local restarts=0 command st
    command="cd $REMOTE_DIR && FUSEJAX_DISTRIBUTED=auto $VENV/bin/fusejax $(printf '%q ' "$@")"
    mkdir -p "$(dirname "$LOG")"
    while true; do
        if [[ $(state) != READY ]]; then
            create
            install
        fi
        sync_configs "$2"
        echo "=== $(date -u +%FT%TZ) run on all workers of $TPU_NAME: fusejax $*" | tee -a "$LOG"
        if on_all "$command" 2>&1 | tee -a "$LOG"; then
            return 0
        fi
        st=$(state)
        if [[ $st == READY ]]; then
            echo "the command failed while $TPU_NAME is READY (not a preemption): see $LOG" >&2
            return 1
        fi
        restarts=$((restarts + 1))
        if ((restarts > MAX_RESTARTS)); then
            echo "$TPU_NAME was lost $restarts times; giving up (MAX_RESTARTS=$MAX_RESTARTS)" >&2
            return 1
        fi
        echo "=== $TPU_NAME is $st: recreating it and resuming (restart $restarts of $MAX_RESTARTS)" | tee -a "$LOG"
    done
}

case ${1:-} in
    up) create && install ;;
    run) shift && run "$@" ;;
    ssh) shift && on_all "$*" ;;
    down) tpu delete "$TPU_NAME" --quiet ;;
esac
