#!/usr/bin/env bash
# Builds packaging/docker/Dockerfile exactly as a user does (BuildKit, from source, on
# this machine's platform) and checks the result: /ping, a websocket subscription and an
# event through the published port, `docker stop` with exit code 0, size <= 15 MB.
#
#   packaging/test-dockerfile.sh
#
# No registry is reachable in CI, so the Dockerfile's base image (DEBIAN_IMAGE, normally
# debian:bookworm-slim) is made here: a minimal Debian 12 from the Debian mirror
# (debootstrap --variant=minbase), imported with `docker import`, and removed at the end.
# Inside, the build stage itself reaches the Debian mirror and crates.io, as it does for
# users. Needs root, debootstrap, docker.io (its CLI has BuildKit built in), python3.
# BuildKit keeps the build stage's layers as cache (about 1.7 GB): on a machine that
# keeps its engine, `docker builder prune` reclaims them (not done here: it would drop
# every other build's cache too).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=notification-server-ci/debian:bookworm
TAG=notification-server:dockerfile-test
NAME=ns-dockerfile-test-$$
KEY='EXAMPLE-ONLY-dockerfile-test-key'
MAX_BYTES=$((15 * 1000 * 1000))
# Debian's docker CLI: it builds with BuildKit without the buildx plugin.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=docker

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}

# shellcheck source=packaging/docker/engine.sh
. packaging/docker/engine.sh
work=$(mktemp -d)
cleanup() {
  local rc=$?
  set +e
  $DOCKER rm -f "$NAME" >/dev/null 2>&1
  $DOCKER rmi "$TAG" "$BASE" >/dev/null 2>&1
  engine_down
  rm -rf "$work"
  if [ "$rc" -eq 0 ]; then echo; echo "PASS: the Dockerfile"; else echo "FAILED (exit $rc); cleaned up" >&2; fi
  exit "$rc"
}
trap cleanup EXIT

step "engine"
engine_up "$work"

step "base image $BASE (debootstrap minbase bookworm, docker import)"
start=$(date +%s)
command -v debootstrap >/dev/null || fail "debootstrap is not installed (.ci/deps-ship)"
debootstrap --variant=minbase bookworm "$work/root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
  { tail -n 20 "$work/debootstrap.log"; fail "debootstrap"; }
# What debian:bookworm-slim has and debootstrap does not set up: the updates and security
# suites (Debian's Rust 1.96 comes from bookworm-security; bookworm itself has 1.85).
cat >"$work/root/etc/apt/sources.list" <<'SOURCES'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
# This machine's own extra certificate authorities (a TLS-inspecting proxy in front of
# crates.io, say), which the build's ca-certificates then trusts as this machine does.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$work/root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$work/root/usr/local/share/ca-certificates/"
fi
tar -C "$work/root" -c . | $DOCKER import - "$BASE" >/dev/null
rm -rf "$work/root"
ok "$BASE in $(($(date +%s) - start)) s"

step "docker build -f packaging/docker/Dockerfile (BuildKit, from source)"
start=$(date +%s)
DOCKER_BUILDKIT=1 $DOCKER build --progress=plain --build-arg DEBIAN_IMAGE="$BASE" \
  -f packaging/docker/Dockerfile -t "$TAG" . >"$work/build.log" 2>&1 ||
  { tail -n 40 "$work/build.log"; fail "docker build"; }
grep -E 'built target/dist|rootfs for' "$work/build.log" | sed 's/^#[0-9]* [0-9.]* //' || true
size=$($DOCKER image inspect -f '{{.Size}}' "$TAG")
[ "$size" -le "$MAX_BYTES" ] || fail "image is $size bytes, over $MAX_BYTES"
ok "built in $(($(date +%s) - start)) s, $size bytes"

step "run: /ping, websocket, event; docker stop"
$DOCKER run -d --name "$NAME" -p 127.0.0.1::8083 -e JWT_PRIVATE_KEY="$KEY" \
  -e SEAFILE_LOG_TO_STDOUT=true "$TAG" >/dev/null
port=$($DOCKER port "$NAME" 8083/tcp | head -n 1 | sed 's/.*://')
for _ in $(seq 1 100); do
  $DOCKER logs "$NAME" 2>&1 | grep -q "notification server started" && break
  sleep 0.1
done
$DOCKER logs "$NAME" 2>&1 | grep -q "notification server started" || fail "no start line: $($DOCKER logs "$NAME" 2>&1)"
python3 packaging/smoke.py --addr "127.0.0.1:$port" --key "$KEY"
$DOCKER stop "$NAME" >/dev/null
code=$($DOCKER inspect -f '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || fail "exit code $code after docker stop"
ok "served, stopped with exit code 0"
