#!/usr/bin/env bash
# Installs what packaging/build.sh needs to build for the given architectures, all from
# Debian 12's own archive (no rustup, no registry):
#
#   packaging/build-deps.sh amd64 arm64 armhf
#
# - Debian's Rust 1.96 (rustc-web, cargo-web: /usr/bin/rustc and /usr/bin/cargo);
# - for the machine's own architecture: gcc and libc6-dev (the bundled SQLite is C);
# - for each foreign one: its Rust standard library (libstd-rust-web-dev:<arch>), the GNU
#   cross compiler and its libc (gcc-<triplet>, libc6-dev-<arch>-cross); dpkg learns the
#   architecture first (dpkg --add-architecture).
# Used by .ci/deps-ship and by the build stage of packaging/docker/Dockerfile. Safe to
# run again: no apt at all when everything is there.
#
# armhf is dropped, loudly, when apt-get update fails with it (a mirror once served a
# stale armhf index, which breaks the update for every architecture); the script then
# exits 3 after installing the rest, so callers can go on with arm64 and amd64.
set -euo pipefail

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
apt_get() { DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=900 "$@"; }

host=$(dpkg --print-architecture)
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=("$host")

pkgs_for() {
  case "$1" in
  "$host") echo gcc libc6-dev ;;
  amd64) echo libstd-rust-web-dev:amd64 gcc-x86-64-linux-gnu libc6-dev-amd64-cross ;;
  arm64) echo libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross ;;
  armhf) echo libstd-rust-web-dev:armhf gcc-arm-linux-gnueabihf libc6-dev-armhf-cross ;;
  *) echo "build-deps.sh: unknown architecture $1 (amd64, arm64, armhf)" >&2; exit 2 ;;
  esac
}

installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }
missing() {
  local p out=()
  for p in "$@"; do installed "$p" || out+=("$p"); done
  echo "${out[@]}"
}

want=(rustc-web cargo-web python3 binutils dpkg-dev ca-certificates)
for arch in "${archs[@]}"; do
  # shellcheck disable=SC2207 # package names have no spaces
  want+=($(pkgs_for "$arch"))
done
[ -n "$(missing "${want[@]}")" ] || exit 0

for arch in "${archs[@]}"; do
  if [ "$arch" != "$host" ] && ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
    $sudo dpkg --add-architecture "$arch"
  fi
done

dropped=""
if ! apt_get update -qq; then
  if dpkg --print-foreign-architectures | grep -qx armhf; then
    echo "WARNING: apt-get update failed with armhf enabled: retrying without armhf." >&2
    echo "WARNING: NO armhf PACKAGE CAN BE BUILT ON THIS MACHINE NOW." >&2
    $sudo dpkg --remove-architecture armhf || true
    dropped=armhf
    apt_get update -qq
  else
    exit 1
  fi
fi

keep=()
for p in "${want[@]}"; do
  case "$p" in *armhf*) [ -n "$dropped" ] && continue ;; esac
  keep+=("$p")
done
need=$(missing "${keep[@]}")
if [ -n "$need" ]; then
  echo "installing: $need"
  # shellcheck disable=SC2086 # a list of package names
  apt_get install -y -qq --no-install-recommends $need >/dev/null
fi
if [ -n "$dropped" ]; then
  exit 3
fi
