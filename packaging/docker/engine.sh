# Sourced by the image tests: makes sure a docker engine answers, starting dockerd by
# hand when none does (CI machines have the docker CLI and Debian's docker.io, but no
# running engine), and stops only the dockerd it started.
#   engine_up LOGDIR    engine_down
engine_pid=""

engine_up() {
  if docker info >/dev/null 2>&1; then
    return 0
  fi
  command -v dockerd >/dev/null || { echo "FAIL: no docker engine answers and dockerd is not installed (.ci/deps-ship)" >&2; return 1; }
  dockerd >"$1/dockerd.log" 2>&1 &
  engine_pid=$!
  local _
  for _ in $(seq 1 300); do
    docker info >/dev/null 2>&1 && break
    if ! kill -0 "$engine_pid" 2>/dev/null; then
      cat "$1/dockerd.log" >&2
      echo "FAIL: dockerd exited" >&2
      engine_pid=""
      return 1
    fi
    sleep 0.2
  done
  if ! docker info >/dev/null 2>&1; then
    tail -n 30 "$1/dockerd.log" >&2
    echo "FAIL: dockerd did not answer within 60 s" >&2
    return 1
  fi
  echo "ok: started dockerd (pid $engine_pid)"
}

engine_down() {
  if [ -n "$engine_pid" ]; then
    kill -TERM "$engine_pid" 2>/dev/null
    wait "$engine_pid" 2>/dev/null
    engine_pid=""
  fi
}
