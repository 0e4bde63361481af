#!/usr/bin/env bash
# Installs the Debian package on this machine, checks what landed, runs the installed
# server as its service user, then removes and purges the package.
#
#   packaging/test-deb.sh [path/to/notification-server_*.deb]
#
# Without an argument it builds the package for this machine's architecture first
# (packaging/build.sh, which needs Debian's Rust: .ci/deps-ship or
# packaging/build-deps.sh). CI (.ci/ship) runs it on the amd64 package. Needs root and dpkg; works where systemd is not PID 1
# (containers): the server is started directly, as systemd would, not via systemctl.
# Refuses to run where the package or /etc/seafile-notification already exists.
# Exits non-zero on the first failed check; always cleans up after itself (the server,
# the package, the service user if this script created it, temporary files).
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=notification-server
SVC_USER=seafile-notification
CONF=/etc/seafile-notification
BIN=/usr/bin/notification-server
UNIT=/lib/systemd/system/notification-server.service
DOC=/usr/share/doc/notification-server
KEY='EXAMPLE-ONLY-deb-test-key'

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}

pkg_status() { dpkg-query -W -f='${db:Status-Abbrev}' "$PKG" 2>/dev/null || true; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs a package and creates a system user)"
command -v dpkg >/dev/null 2>&1 || fail "dpkg not found: this test is for Debian-like systems"
case "$(pkg_status)" in
  "" | un*) ;;
  *) fail "$PKG is already known to dpkg ($(pkg_status)): refusing to touch a real install" ;;
esac
[ ! -e "$CONF" ] || fail "$CONF exists: refusing to touch a real configuration"

deb=${1:-}
if [ -z "$deb" ]; then
  arch=$(dpkg --print-architecture)
  step "build: packaging/build.sh $arch"
  packaging/build.sh "$arch"
  deb=$(ls -t target/dist/"${PKG}"_*_"$arch".deb | head -n 1)
fi
[ -f "$deb" ] || fail "no package at $deb"

user_existed=no
getent passwd "$SVC_USER" >/dev/null && user_existed=yes
work=$(mktemp -d)
chmod 0755 "$work"
runner_pid=""
server_pid=""

cleanup() {
  local rc=$?
  set +e
  [ -n "$server_pid" ] && kill -KILL "$server_pid" 2>/dev/null
  [ -n "$runner_pid" ] && wait "$runner_pid" 2>/dev/null
  case "$(pkg_status)" in
    "" | un*) ;;
    *) dpkg --purge "$PKG" >/dev/null 2>&1 ;;
  esac
  if [ "$user_existed" = no ] && getent passwd "$SVC_USER" >/dev/null; then
    userdel "$SVC_USER" 2>/dev/null
    getent group "$SVC_USER" >/dev/null && groupdel "$SVC_USER" 2>/dev/null
  fi
  rm -rf "$work"
  if [ "$rc" -eq 0 ]; then
    printf '\nPASS: %s installs, runs as %s and removes cleanly\n' "$(basename "$deb")" "$SVC_USER"
  else
    printf '\nFAILED (exit %s); cleaned up\n' "$rc" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT

step "install: dpkg -i $deb"
dpkg -i "$deb"
[ "$(pkg_status)" = "ii " ] || fail "dpkg status after install: $(pkg_status)"
ok "installed ($(dpkg-query -W -f='${Version} ${Architecture}' "$PKG"))"

step "files"
for f in "$BIN" "$UNIT" "$CONF/seafile.conf" "$DOC/README.md" "$DOC/deployment.md" \
  "$DOC/systemd.md" "$DOC/packaging.md" "$DOC/notification-server.env.example"; do
  [ -f "$f" ] || fail "missing $f"
  ok "$f"
done
[ -x "$BIN" ] || fail "$BIN is not executable"
"$BIN" --version
dpkg-query -W -f='${Conffiles}\n' "$PKG" | grep -q "$CONF/seafile.conf" ||
  fail "$CONF/seafile.conf is not a conffile"
ok "$CONF/seafile.conf is a conffile"
[ -L /etc/systemd/system/multi-user.target.wants/notification-server.service ] ||
  fail "unit not enabled (no multi-user.target.wants link)"
ok "unit enabled"

step "service user"
entry=$(getent passwd "$SVC_USER") || fail "user $SVC_USER was not created"
echo "$entry"
getent group "$SVC_USER" >/dev/null || fail "group $SVC_USER was not created"
uid=$(echo "$entry" | cut -d: -f3)
[ "$uid" -lt 1000 ] || fail "$SVC_USER is not a system user (uid $uid)"
case "$(echo "$entry" | cut -d: -f7)" in
  */nologin | */false) ok "system user, uid $uid, no login shell" ;;
  *) fail "$SVC_USER has a login shell" ;;
esac

if command -v systemd-analyze >/dev/null 2>&1; then
  step "systemd-analyze verify $UNIT"
  out=$(systemd-analyze verify --man=no "$UNIT" 2>&1) || fail "verify failed: $out"
  if echo "$out" | grep -q notification-server; then
    fail "verify complained: $out"
  fi
  ok "verify: no complaint about the installed unit"
else
  echo "(systemd-analyze not installed: unit verification skipped)"
fi

step "without a key the server refuses to start"
set +e
out=$(runuser -u "$SVC_USER" -- env -u JWT_PRIVATE_KEY "$BIN" -c "$CONF" --check-config 2>&1)
rc=$?
set -e
echo "$out"
[ "$rc" -eq 1 ] || fail "--check-config without a key exited $rc, expected 1"
echo "$out" | grep -q "jwt_private_key: missing" || fail "no 'jwt_private_key: missing' message"
ok "refused, exit 1"

step "key in $CONF/env (0600 root), as the admin is told to"
install -m 0600 -o root -g root "$DOC/notification-server.env.example" "$CONF/env"
printf "JWT_PRIVATE_KEY='%s'\n" "$KEY" >>"$CONF/env"
if runuser -u "$SVC_USER" -- cat "$CONF/env" >/dev/null 2>&1; then
  fail "the service user can read $CONF/env"
fi
ok "the service user cannot read the key file (systemd reads it as root)"
# What systemd's EnvironmentFile= would hand the service: the last assignment, with
# single quotes removed (enough for this test's key; systemd's parser does the rest).
key=$(sed -n "s/^JWT_PRIVATE_KEY='\(.*\)'\$/\1/p" "$CONF/env" | tail -n 1)
[ "$key" = "$KEY" ] || fail "could not read the key back from $CONF/env"

step "runuser -u $SVC_USER -- $BIN -c $CONF --check-config (key from the env file)"
out=$(runuser -u "$SVC_USER" -- env JWT_PRIVATE_KEY="$key" "$BIN" -c "$CONF" --check-config 2>&1) ||
  fail "check-config failed: $out"
echo "$out"
[ "$out" = "configuration OK: would listen on 127.0.0.1:8083" ] || fail "unexpected: $out"

step "SQLite group database readable by $SVC_USER (root-owned, 0644, read-only)"
mkdir -p "$work/ccnet/GroupMgr"
db="$work/ccnet/GroupMgr/groupmgr.db"
schema='CREATE TABLE GroupUser (group_id INTEGER, user_name VARCHAR(255), is_staff tinyint);'
if command -v sqlite3 >/dev/null 2>&1; then
  sqlite3 "$db" "$schema"
elif command -v python3 >/dev/null 2>&1; then
  python3 -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()' "$db" "$schema"
else
  db=""
  echo "(neither sqlite3 nor python3: SQLite check skipped)"
fi
if [ -n "$db" ]; then
  chmod 0755 "$work/ccnet" "$work/ccnet/GroupMgr"
  chmod 0644 "$db"
  ok "created $db"
fi

step "start the installed server as $SVC_USER (port 0: any free port), then /ping"
log="$work/server.log"
runuser -u "$SVC_USER" -- env JWT_PRIVATE_KEY="$key" NOTIFICATION_SERVER_PORT=0 \
  ${db:+NOTIFICATION_SERVER_GROUPMGR_DB="$db"} \
  "$BIN" -c "$CONF" -l - 2>"$log" &
runner_pid=$!
addr=""
for _ in $(seq 1 100); do
  addr=$(sed -n 's/.*notification server started, listening on \([0-9.:]*\).*/\1/p' "$log" | head -n 1)
  [ -n "$addr" ] && break
  kill -0 "$runner_pid" 2>/dev/null || break
  sleep 0.1
done
cat "$log"
[ -n "$addr" ] || fail "the server did not start"
server_pid=$(ps -o pid= --ppid "$runner_pid" | tr -d ' ' | head -n 1)
[ -n "$server_pid" ] || fail "cannot find the server process under runuser ($runner_pid)"
owner=$(ps -o user= -p "$server_pid" | tr -d ' ')
[ "$owner" = "$SVC_USER" ] || fail "server runs as $owner"
ok "server pid $server_pid runs as $owner, listening on $addr"

if command -v curl >/dev/null 2>&1; then
  body=$(curl -fsS --max-time 5 "http://$addr/ping")
else
  exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}"
  printf 'GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
  body=$(tail -n 1 <&3)
  exec 3<&-
fi
echo "GET /ping -> $body"
[ "$body" = '{"ret": "pong"}' ] || fail "unexpected /ping answer: $body"
ok "/ping answers"

if [ -n "$db" ]; then
  for _ in $(seq 1 50); do
    grep -q "group lookups use the SQLite database $db" "$log" && break
    sleep 0.1
  done
  grep -q "group lookups use the SQLite database $db" "$log" ||
    fail "the service user could not open the SQLite group database"
  ok "SQLite group database opened read-only as $SVC_USER"
fi

step "SIGHUP reloads, SIGTERM drains and exits 0"
kill -HUP "$server_pid"
for _ in $(seq 1 50); do
  grep -q "configuration reloaded" "$log" && break
  sleep 0.1
done
grep -q "configuration reloaded" "$log" || fail "no 'configuration reloaded' after SIGHUP"
ok "reloaded"
kill -TERM "$server_pid"
set +e
wait "$runner_pid"
rc=$?
set -e
runner_pid=""
server_pid=""
grep -q "shutdown complete" "$log" || fail "no 'shutdown complete' in the log"
[ "$rc" -eq 0 ] || fail "server exited $rc after SIGTERM"
ok "stopped cleanly, exit 0"
echo "--- server log"
cat "$log"

step "remove: dpkg -r $PKG"
dpkg -r "$PKG"
[ "$(pkg_status)" = "rc " ] || fail "dpkg status after remove: $(pkg_status)"
for f in "$BIN" "$UNIT" "$DOC/README.md"; do
  [ ! -e "$f" ] || fail "$f left after remove"
done
[ -f "$CONF/seafile.conf" ] || fail "conffile removed by dpkg -r (only purge should)"
[ -f "$CONF/env" ] || fail "$CONF/env removed by dpkg -r (only purge should)"
ok "binary, unit and docs gone; configuration kept"

step "purge: dpkg --purge $PKG"
dpkg --purge "$PKG"
case "$(pkg_status)" in
  "" | un*) ;;
  *) fail "dpkg status after purge: $(pkg_status)" ;;
esac
[ ! -e "$CONF" ] || fail "$CONF left after purge: $(ls -A "$CONF")"
for f in /etc/systemd/system/multi-user.target.wants/notification-server.service \
  /etc/systemd/system/notification-server.service; do
  [ ! -e "$f" ] && [ ! -L "$f" ] || fail "$f left after purge"
done
ok "configuration, key, enable link and mask gone"
if getent passwd "$SVC_USER" >/dev/null; then
  echo "(user $SVC_USER kept after purge, as Debian does for system users)"
fi
