#!/usr/bin/env bash
# Build the steerserve image with buildah (no Docker engine, no registry) and check that
# it serves: /health turns 200 and one real /v1/generate answers the France question.
#
#   sudo deploy/test-image.sh            # build, start, ask, clean up
#   KEEP=1 deploy/test-image.sh          # keep the image, containers and storage
#
# Steps: a bookworm minbase root with python3 is made offline-capable with debootstrap
# (cached as a tar, so re-runs skip it) and imported as a local base image; the
# Dockerfile is built on it with `--build-arg BASE=<that image>`; the server is started
# inside the image with `buildah run --isolation chroot`, which shares the host network,
# so it is bound to 127.0.0.1 on a free port (the image's own default is 0.0.0.0).
#
# Environment:
#   CACHE_DIR       base rootfs tar, torch wheel, buildah storage
#                   (default ${XDG_CACHE_HOME:-~/.cache}/steerserve-image-test)
#   KEEP=1          keep images, containers and the wheel link afterwards
#   STORAGE_DRIVER  overlay (default; falls back to vfs when overlay does not work) | vfs
#   DEBIAN_MIRROR   debootstrap mirror (default: the one apt on this machine uses, read
#                   by deploy/apt-mirror.sh from /etc/apt/sources.list.d/*.sources or
#                   /etc/apt/sources.list; the script names no package host itself)
#   TORCH_WHEEL     path to the torch CPU wheel (default: found with `pip download`)
#   TAG             image name (default localhost/steerserve:test)
#   HEALTH_TIMEOUT  seconds to wait for /health (default 180)
#
# Needs root (debootstrap, buildah mounts). Prints a timing table at the end.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/steerserve-image-test}
KEEP=${KEEP:-0}
STORAGE_DRIVER=${STORAGE_DRIVER:-overlay}
SUITE=bookworm
TAG=${TAG:-localhost/steerserve:test}
BASE_TAG=localhost/steerserve-base:${SUITE}-python3
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-180}
TORCH_SPEC="torch==2.13.0+cpu"
ROOTFS_TAR=$CACHE_DIR/${SUITE}-minbase-python3.tar
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

START=$SECONDS
TIMINGS=()
LAST=$SECONDS
log() { printf '\n== [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
lap() { TIMINGS+=("$(printf '%-28s %5ds' "$1" "$((SECONDS - LAST))")"); LAST=$SECONDS; }
die() { printf 'test-image: FAIL: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (debootstrap and buildah mounts need it)"
mkdir -p "$CACHE_DIR"
rm -f "$CACHE_DIR/server.log"

# ---------------------------------------------------------------- tools
log "tools"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        buildah debootstrap
fi
buildah --version

# Own storage under CACHE_DIR: independent of any other buildah/podman state here.
BUILDAH=(buildah --root "$CACHE_DIR/storage-$STORAGE_DRIVER"
         --runroot "$CACHE_DIR/run-$STORAGE_DRIVER" --storage-driver "$STORAGE_DRIVER")
if ! probe=$("${BUILDAH[@]}" from scratch 2>/dev/null); then
    [[ $STORAGE_DRIVER == vfs ]] && die "buildah cannot create a container with vfs"
    echo "storage driver $STORAGE_DRIVER does not work here; falling back to vfs"
    STORAGE_DRIVER=vfs
    BUILDAH=(buildah --root "$CACHE_DIR/storage-vfs" --runroot "$CACHE_DIR/run-vfs"
             --storage-driver vfs)
    probe=$("${BUILDAH[@]}" from scratch)
fi
"${BUILDAH[@]}" rm "$probe" >/dev/null
echo "storage driver: $STORAGE_DRIVER"
lap "tools"

# ---------------------------------------------------------------- cleanup
SERVER_PID=""
SERVER_LOG=$CACHE_DIR/server.log
PORT=""
CONTAINERS=()
WHEEL_LINK=""
listener_pids() {  # processes listening on our loopback port (the server itself)
    [[ -n $PORT ]] || return 0
    ss -ltnpH "sport = :$PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u || true
}
server_alive() { [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; }
stop_server() {
    # SIGTERM to the server process itself (what `docker stop` does): `buildah run`
    # answers a SIGTERM of its own with SIGKILL to the child, which skips the graceful
    # shutdown. Wait up to 30 s, then escalate.
    local pids=()
    mapfile -t pids < <(listener_pids)
    ((${#pids[@]})) && kill -TERM "${pids[@]}" 2>/dev/null
    for _ in $(seq 60); do
        server_alive || [[ -n $(listener_pids) ]] || return 0
        server_alive || break
        sleep 0.5
    done
    server_alive && kill -TERM "$SERVER_PID" 2>/dev/null
    sleep 2
    mapfile -t pids < <(listener_pids)
    ((${#pids[@]})) && kill -KILL "${pids[@]}" 2>/dev/null
    return 0
}
cleanup() {
    local rc=$?
    set +e  # clean up as much as possible, whatever fails
    if ((rc != 0)) && [[ -s $SERVER_LOG ]]; then
        echo "---- server log (last 40 lines) ----"
        tail -n 40 "$SERVER_LOG"
    fi
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        stop_server
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ $KEEP != 1 ]]; then
        for c in "${CONTAINERS[@]}"; do "${BUILDAH[@]}" rm "$c" >/dev/null 2>&1 || true; done
        "${BUILDAH[@]}" rmi -f "$TAG" "$BASE_TAG" >/dev/null 2>&1 || true
        "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
        [[ -n $WHEEL_LINK ]] && rm -f "$WHEEL_LINK"
    else
        echo "KEEP=1: kept $TAG, $BASE_TAG, containers ${CONTAINERS[*]:-none}" \
             "(${BUILDAH[*]})"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- base image
log "base image $BASE_TAG"
if "${BUILDAH[@]}" inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
    echo "base image present"
else
    if [[ ! -s $ROOTFS_TAR ]]; then
        DEBIAN_MIRROR=$("$REPO/deploy/apt-mirror.sh" "$SUITE") || exit 1
        echo "debootstrap mirror: $DEBIAN_MIRROR"
        root=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
            "$SUITE" "$root" "$DEBIAN_MIRROR"
        chroot "$root" apt-get clean
        rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
        tar -C "$root" --numeric-owner -cf "$ROOTFS_TAR.tmp" .
        mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
        rm -rf "$root"
    else
        echo "rootfs tar cached: $ROOTFS_TAR"
    fi
    # buildah 1.28 has no `import`: fill an empty container and commit it.
    ctr=$("${BUILDAH[@]}" from scratch)
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    tar -C "$mnt" --numeric-owner -xf "$ROOTFS_TAR"
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    "${BUILDAH[@]}" config --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
    "${BUILDAH[@]}" commit --format docker --quiet "$ctr" "$BASE_TAG" >/dev/null
    "${BUILDAH[@]}" rm "$ctr" >/dev/null
fi
lap "base image"

# ---------------------------------------------------------------- torch wheel
log "torch CPU wheel"
if [[ -z ${TORCH_WHEEL:-} ]]; then
    # Served from local disk where pip is configured with find-links; the +cpu label
    # means only a CPU build can match.
    mkdir -p "$CACHE_DIR/wheels"
    TORCH_WHEEL=$(find "$CACHE_DIR/wheels" -name 'torch-2.13.0+cpu-cp311-*.whl' | head -n1)
    if [[ -z $TORCH_WHEEL ]]; then
        python3 -m pip download --quiet --no-deps --only-binary=:all: \
            --python-version 3.11 --platform manylinux_2_28_x86_64 \
            -d "$CACHE_DIR/wheels" "$TORCH_SPEC"
        TORCH_WHEEL=$(find "$CACHE_DIR/wheels" -name 'torch-2.13.0+cpu-cp311-*.whl' | head -n1)
    fi
fi
[[ -f $TORCH_WHEEL ]] || die "no torch CPU wheel found (set TORCH_WHEEL)"
WHEEL_LINK=$REPO/deploy/wheels/$(basename "$TORCH_WHEEL")
if [[ ! -e $WHEEL_LINK ]]; then
    ln "$TORCH_WHEEL" "$WHEEL_LINK" 2>/dev/null || cp "$TORCH_WHEEL" "$WHEEL_LINK"
else
    WHEEL_LINK=""  # the user's own file: leave it alone
fi
echo "$TORCH_WHEEL"
lap "torch wheel"

# ---------------------------------------------------------------- pip settings
# The build does not see the host's pip configuration: pass index/find-links settings
# as build arguments, bind-mounting local (file://) indexes read-only at the same path.
BUILD_ARGS=(--build-arg "BASE=$BASE_TAG" --build-arg "TORCH_INDEX_URL="
            --build-arg "PIP_CERT=$CA_BUNDLE")
VOLUMES=(-v "$CA_BUNDLE:$CA_BUNDLE:ro")
pip_conf() {  # last value wins (env overrides files), as pip itself reads them
    python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'$/\1/p" | tail -n1
}
declare -A MOUNTED=()
mount_local() {  # $1: a local directory that the build must see
    local dir=$1
    [[ -d $dir && -z ${MOUNTED[$dir]:-} ]] || return 0
    MOUNTED[$dir]=1
    VOLUMES+=(-v "$dir:$dir:ro")
}
for key in index-url extra-index-url find-links; do
    value=$(pip_conf "$key")
    [[ -n $value ]] || continue
    kept=()
    for url in $value; do
        path=${url#file://}
        if [[ $path == /* ]]; then
            [[ -e $path ]] || continue
            # Index pages link to ../../files/...: mount the parent of a simple/ dir.
            if [[ $key == find-links ]]; then mount_local "$path"; else mount_local "$(dirname "$path")"; fi
        fi
        kept+=("$url")
    done
    ((${#kept[@]})) || continue
    name=PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")
    BUILD_ARGS+=(--build-arg "$name=${kept[*]}")
done
printf '  %s\n' "${BUILD_ARGS[@]}" "${VOLUMES[@]}"

# ---------------------------------------------------------------- build
log "build $TAG"
"${BUILDAH[@]}" bud --format docker --isolation chroot --pull=never \
    "${BUILD_ARGS[@]}" "${VOLUMES[@]}" -f "$REPO/Dockerfile" -t "$TAG" "$REPO"
lap "image build"
"${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$TAG"
healthcheck=$("${BUILDAH[@]}" inspect --type image --format '{{.Docker.Config.Healthcheck}}' "$TAG")
user=$("${BUILDAH[@]}" inspect --type image --format '{{.Docker.Config.User}}' "$TAG")
echo "healthcheck: $healthcheck"
echo "user: $user"
[[ $healthcheck == *healthcheck.py* ]] || die "HEALTHCHECK missing from the image config"
[[ $user != "" && $user != root && $user != 0* ]] || die "image runs as root ($user)"

# ---------------------------------------------------------------- run
log "start the server in the image"
ctr=$("${BUILDAH[@]}" from --pull=never "$TAG")
CONTAINERS+=("$ctr")
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
port=$PORT
uid=$("${BUILDAH[@]}" run --isolation chroot "$ctr" -- id -u)
[[ $uid != 0 ]] || die "server would run as root"
echo "server uid: $uid, port: $port"
"${BUILDAH[@]}" run --isolation chroot \
    --env STEER_HOST=127.0.0.1 --env "STEER_PORT=$port" "$ctr" -- steerserve \
    >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
echo "server log: $SERVER_LOG"
base=http://127.0.0.1:$port
deadline=$((SECONDS + HEALTH_TIMEOUT))
status=000
while ((SECONDS < deadline)); do
    kill -0 "$SERVER_PID" 2>/dev/null || die "server exited before becoming healthy"
    status=$(python3 - "$base/health" <<'EOF'
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print("000")
EOF
)
    [[ $status == 200 ]] && break
    sleep 0.5
done
[[ $status == 200 ]] || die "/health did not turn 200 within ${HEALTH_TIMEOUT}s (last: $status)"
lap "start -> /health 200"

# The image's own HEALTHCHECK command, run inside the image against the live server.
"${BUILDAH[@]}" run --isolation chroot --env "STEER_PORT=$port" "$ctr" -- \
    python /opt/steerserve/healthcheck.py || die "the image's HEALTHCHECK command failed"
echo "HEALTHCHECK command: ok"

log "POST /v1/generate"
python3 - "$base/v1/generate" <<'EOF' || die "generate check failed"
import json, sys, urllib.request
body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0}
req = urllib.request.Request(sys.argv[1], data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=120))
print(json.dumps(out, indent=1)[:800])
assert "Paris" in out["text"], f"expected 'Paris' in {out['text']!r}"
print("answer contains 'Paris': ok")
EOF
lap "generate"

log "stop (SIGTERM)"
stop_server
stop_rc=0
wait "$SERVER_PID" || stop_rc=$?
SERVER_PID=""
# uvicorn re-raises SIGTERM after its graceful shutdown, so the process ends "by signal"
# and `buildah run` reports status 1 ("exited on terminated"); a SIGKILL reads
# "exited on killed". The server's own last line tells the graceful case apart.
tail -n 6 "$SERVER_LOG"
echo "buildah run exit status after SIGTERM: $stop_rc"
grep -q "Finished server process" "$SERVER_LOG" || die "no graceful shutdown on SIGTERM"
! grep -q "exited on killed" "$SERVER_LOG" || die "the server had to be killed"
[[ -z $(listener_pids) ]] || die "the server still listens on port $PORT"
lap "graceful stop"

TIMINGS+=("$(printf '%-28s %5ds' total "$((SECONDS - START))")")
log "timings"
printf '  %s\n' "${TIMINGS[@]}"
echo "test-image: OK"
