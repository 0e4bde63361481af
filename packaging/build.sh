#!/usr/bin/env bash
# Builds the release binary and the Debian package for one or more architectures:
#
#   packaging/build.sh                  # amd64 arm64 armhf
#   packaging/build.sh arm64            # just one
#
# Writes, per architecture, into target/dist/:
#   notification-server-<version>-<arch>      the stripped binary
#   notification-server_<version>-1_<arch>.deb the package (packaging/mkdeb.py)
#
# All three are built on an amd64 Debian 12 machine with Debian's own Rust (rustc-web,
# cargo-web: /usr/bin/cargo, not rustup's) and the GNU cross compilers, which also compile
# the bundled SQLite; `.ci/deps-ship` installs them. Each target triple gets its own
# CARGO_TARGET_DIR (target/ship/<arch>), so these builds never invalidate the developer's
# target/release or each other. The binaries link against Debian 12's glibc and need
# glibc >= 2.34 on the machine that runs them.
#
# Environment: CARGO (default /usr/bin/cargo), RUSTC (default /usr/bin/rustc),
# CARGO_BUILD_JOBS (default: cargo's, i.e. all cores; -j1 on a small box).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-/usr/bin/cargo}
export RUSTC=${RUSTC:-/usr/bin/rustc}
[ -x "$CARGO" ] || { echo "build.sh: $CARGO not found (apt-get install cargo-web, or .ci/deps-ship)" >&2; exit 1; }
[ -x "$RUSTC" ] || { echo "build.sh: $RUSTC not found (apt-get install rustc-web, or .ci/deps-ship)" >&2; exit 1; }

archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(amd64 arm64 armhf)

dist=target/dist
mkdir -p "$dist"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)

for arch in "${archs[@]}"; do
  case "$arch" in
  amd64) triple=x86_64-unknown-linux-gnu gnu=x86_64-linux-gnu ;;
  arm64) triple=aarch64-unknown-linux-gnu gnu=aarch64-linux-gnu ;;
  armhf) triple=armv7-unknown-linux-gnueabihf gnu=arm-linux-gnueabihf ;;
  *) echo "build.sh: unknown architecture $arch (amd64, arm64, armhf)" >&2; exit 2 ;;
  esac
  host=$(dpkg --print-architecture)
  if [ "$arch" = "$host" ]; then
    cc=gcc strip=strip
  else
    cc=$gnu-gcc strip=$gnu-strip
  fi
  command -v "$cc" >/dev/null || { echo "build.sh: $cc not found (.ci/deps-ship installs it)" >&2; exit 1; }
  [ -d "$("$RUSTC" --print sysroot)/lib/rustlib/$triple/lib" ] ||
    { echo "build.sh: no Rust standard library for $triple (apt-get install libstd-rust-web-dev:$arch)" >&2; exit 1; }

  echo "== build $arch ($triple) with $("$RUSTC" --version)"
  start=$(date +%s)
  triple_env=$(echo "$triple" | tr 'a-z-' 'A-Z_')
  env "CARGO_TARGET_${triple_env}_LINKER=$cc" \
    "CC_${triple//-/_}=$cc" "AR_${triple//-/_}=$gnu-ar" \
    CARGO_TARGET_DIR="target/ship/$arch" \
    "$CARGO" build --release --locked --target "$triple" --bin notification-server
  bin="$dist/notification-server-$version-$arch"
  "$strip" -o "$bin" "target/ship/$arch/$triple/release/notification-server"
  echo "built $bin ($(stat -c %s "$bin") bytes) in $(($(date +%s) - start)) s"

  python3 packaging/mkdeb.py --arch "$arch" --binary "$bin" --out "$dist"
done
