#!/usr/bin/env bash
# Lays out the whole file system of the container image in OUTDIR: the binary, the ELF
# interpreter and the few shared libraries it needs (nothing else: no shell, no package
# manager), an /etc/passwd naming the service user, the config directory and the log
# directory of Seafile's manual.
#
#   packaging/docker/rootfs.sh BINARY OUTDIR
#
# BINARY may be built for another architecture: libraries are found from its ELF headers
# (readelf), in the cross libc (/usr/<triplet>/lib) or the machine's own
# (/lib/<triplet>). Used by the build stage of packaging/docker/Dockerfile and by
# packaging/test-image.sh, so the image users build and the one CI tests hold the same.
set -euo pipefail

bin=${1:?usage: rootfs.sh BINARY OUTDIR}
out=${2:?usage: rootfs.sh BINARY OUTDIR}
[ -f "$bin" ] || { echo "rootfs.sh: no binary at $bin" >&2; exit 1; }

machine=$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')
case "$machine" in
"Advanced Micro Devices X86-64") triplet=x86_64-linux-gnu ;;
AArch64) triplet=aarch64-linux-gnu ;;
ARM) triplet=arm-linux-gnueabihf ;;
*) echo "rootfs.sh: unsupported machine $machine" >&2; exit 1 ;;
esac

find_lib() {
  local dir
  for dir in "/usr/$triplet/lib" "/lib/$triplet" "/usr/lib/$triplet"; do
    if [ -e "$dir/$1" ]; then
      echo "$dir/$1"
      return 0
    fi
  done
  echo "rootfs.sh: $1 for $triplet not found (install libc6-dev for it)" >&2
  return 1
}

rm -rf "$out"
mkdir -p "$out/usr/bin" "$out/lib/$triplet" "$out/etc/seafile-notification" "$out/shared/seafile/logs" "$out/tmp"
chmod 1777 "$out/tmp"
install -m 0755 "$bin" "$out/usr/bin/notification-server"

interp=$(readelf -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]$/\1/p')
[ -n "$interp" ] || { echo "rootfs.sh: $bin has no ELF interpreter (static?)" >&2; exit 1; }
mkdir -p "$out$(dirname "$interp")"
cp -L "$(find_lib "$(basename "$interp")")" "$out$interp"
for lib in $(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
  if [ "$lib" = "$(basename "$interp")" ]; then
    ln -sf "../..$interp" "$out/lib/$triplet/$lib" # the interpreter, once
  else
    cp -L "$(find_lib "$lib")" "$out/lib/$triplet/$lib"
  fi
done

# uid 8000: the uid of the "seafile" user in Seafile's own images (NON_ROOT=true), so a
# log directory prepared for one fits the other.
printf 'root:x:0:0:root:/nonexistent:/nonexistent\nseafile:x:8000:8000:Seafile notification server:/nonexistent:/nonexistent\n' >"$out/etc/passwd"
printf 'root:x:0:\nseafile:x:8000:\n' >"$out/etc/group"
# The default hosts lookup order when there is no nsswitch.conf is dns first: state
# files first, so docker's /etc/hosts (and container names in it) win, as in Debian.
printf 'hosts: files dns\n' >"$out/etc/nsswitch.conf"

echo "rootfs for $triplet in $out: $(du -sk "$out" | cut -f1) KiB"
