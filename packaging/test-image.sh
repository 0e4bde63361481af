#!/usr/bin/env bash
# Builds the container image from a binary built here and checks it with a real engine,
# as Seafile 12/13's compose setup would run it:
#
#   packaging/test-image.sh target/dist/notification-server-<version>-amd64
#
# The image is the final stage of packaging/docker/Dockerfile, taken as it is, fed with
# packaging/docker/rootfs.sh's file system for BINARY (no base image: nothing is pulled,
# no registry is needed). Checks: size <= 15 MB; it runs as uid 8000, not root; the
# health check turns healthy (and `--ping` fails on a wrong port); /ping, a websocket
# subscription and an event through the published port (packaging/smoke.py); the
# environment of the official image is read (JWT_PRIVATE_KEY, SEAFILE_MYSQL_DB_*,
# NOTIFICATION_SERVER_LOG_LEVEL); the log is in the mounted /shared/seafile/logs;
# `--self-test` runs inside it (no shell, no CA files) and its end-to-end checks pass;
# `docker stop` drains and the exit code is 0; with SEAFILE_LOG_TO_STDOUT=true the log is
# in `docker logs` and no file is written. Then the same through docker-compose with
# examples/docker/notification-server.yml.
#
# Needs root (or the docker group), docker, python3. Starts dockerd by hand when no engine
# answers (and stops it at the end); removes its containers and image.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:?usage: test-image.sh BINARY}
[ -f "$bin" ] || { echo "test-image.sh: no binary at $bin" >&2; exit 1; }
TAG=notification-server:ci-test
NAME=ns-image-test-$$
KEY='EXAMPLE-ONLY-image-test-key'
MAX_BYTES=$((15 * 1000 * 1000))

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
  for c in "$NAME" "$NAME-stdout"; do
    docker rm -f "$c" >/dev/null 2>&1
  done
  if [ -f "$work/compose.env" ]; then
    docker-compose --env-file "$work/compose.env" -p "ns-image-test-$$" \
      -f examples/docker/notification-server.yml down -v >/dev/null 2>&1
  fi
  docker rmi "$TAG" >/dev/null 2>&1
  engine_down
  rm -rf "$work"
  if [ "$rc" -eq 0 ]; then echo; echo "PASS: the image"; else echo "FAILED (exit $rc); cleaned up" >&2; fi
  exit "$rc"
}
trap cleanup EXIT

step "engine"
engine_up "$work"
docker version --format 'client {{.Client.Version}}, engine {{.Server.Version}}'

step "build the image (final stage of packaging/docker/Dockerfile, on this binary)"
packaging/docker/rootfs.sh "$bin" "$work/context/rootfs"
sed -n '/^FROM scratch$/,$p' packaging/docker/Dockerfile | sed -e 's#--from=build ##' -e 's# /rootfs/# rootfs/#' >"$work/context/Dockerfile"
[ "$(grep -c '^COPY .*rootfs/' "$work/context/Dockerfile")" -eq 2 ] || fail "the final stage of packaging/docker/Dockerfile changed shape"
! grep -q -- '--from=' "$work/context/Dockerfile" || fail "the final stage copies from a stage this test does not build"
DOCKER_BUILDKIT=0 docker build -q -t "$TAG" "$work/context" >/dev/null 2>"$work/build.err" || { cat "$work/build.err"; fail "docker build"; }
size=$(docker image inspect -f '{{.Size}}' "$TAG")
echo "image size: $size bytes"
[ "$size" -le "$MAX_BYTES" ] || fail "image is $size bytes, over $MAX_BYTES"
ok "$TAG is $((size / 1000)) kB"

step "run it as Seafile's compose file does (log volume, environment)"
mkdir -p "$work/logs"
chown 8000:8000 "$work/logs"
docker run -d --name "$NAME" -p 127.0.0.1::8083 \
  --health-interval 1s --health-start-period 1s \
  --add-host db.example.test:127.0.0.1 \
  -v "$work/logs:/shared/seafile/logs" \
  -e JWT_PRIVATE_KEY="$KEY" \
  -e SEAFILE_MYSQL_DB_HOST=db.example.test -e SEAFILE_MYSQL_DB_PORT=1 \
  -e SEAFILE_MYSQL_DB_USER=seafile -e SEAFILE_MYSQL_DB_PASSWORD=example-only \
  -e SEAFILE_MYSQL_DB_CCNET_DB_NAME=ccnet_test -e SEAFILE_MYSQL_DB_SEAFILE_DB_NAME=seafile_test \
  -e SEAFILE_LOG_TO_STDOUT=false -e NOTIFICATION_SERVER_LOG_LEVEL=debug \
  "$TAG" >/dev/null
port=$(docker port "$NAME" 8083/tcp | head -n 1 | sed 's/.*://')
[ -n "$port" ] || fail "port 8083 is not published"
log="$work/logs/notification-server.log"
for _ in $(seq 1 100); do
  grep -qs "notification server started, listening on 0.0.0.0:8083" "$log" && break
  [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
  sleep 0.1
done
grep -qs "notification server started, listening on 0.0.0.0:8083" "$log" ||
  { docker logs "$NAME"; cat "$log" 2>/dev/null; fail "no start line in the mounted log file $log"; }
ok "log file in the volume: $(head -n 1 "$log")"
[ "$(stat -c %u "$log")" = 8000 ] || fail "the log file belongs to uid $(stat -c %u "$log"), not 8000"
pid=$(docker inspect -f '{{.State.Pid}}' "$NAME")
uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
[ "$uid" = 8000 ] || fail "the server runs as uid $uid"
ok "runs as uid 8000 (not root)"
[ -z "$(docker logs "$NAME" 2>&1)" ] || fail "output on docker logs while logging to the file: $(docker logs "$NAME" 2>&1)"

step "health check"
for _ in $(seq 1 150); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ] && break
  sleep 0.2
done
health=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
[ "$health" = healthy ] || fail "health is $health: $(docker inspect -f '{{json .State.Health}}' "$NAME")"
ok "healthy"
if docker exec -e NOTIFICATION_SERVER_PORT=1 "$NAME" /usr/bin/notification-server -c /etc/seafile-notification --ping >/dev/null 2>&1; then
  fail "--ping passed against a port where nothing listens"
fi
ok "the check fails where no server answers"

step "through the published port: /ping, websocket, event"
python3 packaging/smoke.py --addr "127.0.0.1:$port" --key "$KEY"
for _ in $(seq 1 50); do
  grep -q "subscribed to" "$log" && break
  sleep 0.1
done
grep -q "subscribed to" "$log" || fail "NOTIFICATION_SERVER_LOG_LEVEL=debug was not applied (no subscription line)"
ok "debug lines in the log (NOTIFICATION_SERVER_LOG_LEVEL read)"
for _ in $(seq 1 100); do
  grep -q "group lookups" "$log" && break
  sleep 0.1
done
line=$(grep "group lookups" "$log" || true)
echo "$line"
echo "$line" | grep -q "MySQL database ccnet_test as seafile at db.example.test:1" ||
  fail "SEAFILE_MYSQL_DB_* not read"
echo "$line" | grep -qi "refused" || fail "db.example.test did not resolve to a refused connection (name lookup in the image?)"
ok "SEAFILE_MYSQL_DB_* read; the host name resolved through /etc/hosts"

step "--self-test inside the image (no shell, no CA files: the binary alone)"
# Through the container's own port as the public URL: the configuration as the image
# reads it (JWT_PRIVATE_KEY), the local server, the public path, a signed event end to end.
selftest=$(docker exec "$NAME" /usr/bin/notification-server -c /etc/seafile-notification \
  --self-test --json http://127.0.0.1:8083 || true)
echo "$selftest" | python3 -c '
import json, sys
report = json.load(sys.stdin)
status = {c["name"]: c["status"] for c in report["checks"]}
for c in report["checks"]:
    print(c["status"], c["name"] + ":", c["seen"])
need = ["config", "local-ping", "local-events", "public-ping", "public-websocket", "public-events", "end-to-end", "stays-up"]
bad = [n for n in need if status.get(n) != "PASS"]
sys.exit("checks that did not pass: " + ", ".join(bad) if bad else 0)
' || fail "--self-test in the image"
ok "--self-test runs in the image and its local and end-to-end checks pass"

step "docker stop: drain, exit 0"
start=$(date +%s%N)
docker stop "$NAME" >/dev/null
ms=$((($(date +%s%N) - start) / 1000000))
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || { tail -n 5 "$log"; fail "exit code $code after docker stop"; }
grep -q "shutdown complete" "$log" || fail "no 'shutdown complete' in the log"
ok "stopped in $ms ms, exit code 0, drained"
docker rm "$NAME" >/dev/null

step "SEAFILE_LOG_TO_STDOUT=true: docker logs, no file"
rm -f "$log"
docker run -d --name "$NAME-stdout" -v "$work/logs:/shared/seafile/logs" \
  -e JWT_PRIVATE_KEY="$KEY" -e SEAFILE_LOG_TO_STDOUT=true "$TAG" >/dev/null
for _ in $(seq 1 100); do
  docker logs "$NAME-stdout" 2>&1 | grep -q "\[notification-server\] .*notification server started" && break
  sleep 0.1
done
docker logs "$NAME-stdout" 2>&1 | grep -q "\[notification-server\] .*notification server started" ||
  fail "no start line in docker logs: $(docker logs "$NAME-stdout" 2>&1)"
[ ! -e "$log" ] || fail "a log file was written while logging to stdout"
docker stop "$NAME-stdout" >/dev/null
[ "$(docker inspect -f '{{.State.ExitCode}}' "$NAME-stdout")" = 0 ] || fail "exit code after docker stop"
ok "logs on stdout with the [notification-server] prefix, no file, exit 0"

step "docker-compose with examples/docker/notification-server.yml (NOTIFICATION_SERVER_IMAGE=$TAG)"
# The file mounts $SEAFILE_VOLUME/seafile/logs, as the manual's does.
mkdir -p "$work/seafile/logs"
chown 8000:8000 "$work/seafile/logs"
log="$work/seafile/logs/notification-server.log"
cat >"$work/compose.env" <<ENV
NOTIFICATION_SERVER_IMAGE=$TAG
SEAFILE_VOLUME=$work
SEAFILE_MYSQL_DB_PASSWORD=example-only
JWT_PRIVATE_KEY=$KEY
SEAFILE_SERVER_HOSTNAME=seafile.example.test
ENV
compose() { docker-compose --env-file "$work/compose.env" -p "ns-image-test-$$" -f examples/docker/notification-server.yml "$@"; }
compose up -d 2>&1 | tail -n 3
cid=$(compose ps -q notification-server)
[ -n "$cid" ] || fail "compose started no notification-server"
# The file publishes no port, as the manual's: reach the container on its network.
ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$cid")
[ -n "$ip" ] || fail "the compose container has no address"
for _ in $(seq 1 100); do
  grep -qs "notification server started" "$log" && break
  sleep 0.1
done
grep -qs "notification server started" "$log" || { compose logs; fail "no start line in $log under compose"; }
python3 packaging/smoke.py --addr "$ip:8083" --key "$KEY"
compose stop -t 20 2>&1 | tail -n 1
[ "$(docker inspect -f '{{.State.ExitCode}}' "$cid")" = 0 ] || fail "exit code after compose stop"
ok "compose: up, /ping, websocket, event, stop with exit 0"
