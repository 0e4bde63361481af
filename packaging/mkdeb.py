#!/usr/bin/env python3
"""Builds the Debian package with dpkg-deb from [package.metadata.deb] in Cargo.toml.

    python3 packaging/mkdeb.py --arch arm64 --binary target/dist/notification-server-0.1.0-arm64

Cargo.toml stays the one list of what the package holds (files, modes, conffiles,
maintainer scripts, description), so `cargo deb` and this script build the same package;
this one only needs python3 and dpkg-deb, not cargo-deb (minutes to compile), and packs a
binary built for any architecture. The asset whose source is target/release/<name> is
replaced by --binary. `$auto` in depends becomes what the binary needs, read from its ELF
dynamic section with readelf: libc6 (>= the newest GLIBC_ symbol version it uses) and
libgcc-s1 for libgcc_s; any other shared library is an error, so a new one is noticed.
"""

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared library -> the Debian package that provides it on every architecture.
LIBRARY_PACKAGES = {
    "libc.so.6": "libc6",
    "libm.so.6": "libc6",
    "ld-linux-x86-64.so.2": "libc6",
    "ld-linux-aarch64.so.1": "libc6",
    "ld-linux-armhf.so.3": "libc6",
    "libgcc_s.so.1": "libgcc-s1",
}


def fail(msg):
    sys.exit(f"mkdeb: {msg}")


def auto_depends(binary):
    dynamic = subprocess.run(["readelf", "-d", binary], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    versions = subprocess.run(["readelf", "-V", binary], capture_output=True, text=True, check=True).stdout
    glibc = max(
        (tuple(int(p) for p in v.split(".")) for v in re.findall(r"GLIBC_([0-9.]+)", versions)),
        default=None,
    )
    deps = []
    for lib in needed:
        pkg = LIBRARY_PACKAGES.get(lib)
        if pkg is None:
            fail(f"{binary} needs {lib}, which this script does not know: add it to LIBRARY_PACKAGES")
        if pkg == "libc6":
            dep = f"libc6 (>= {'.'.join(map(str, glibc))})" if glibc else "libc6"
        else:
            dep = "libgcc-s1 (>= 4.2)"
        if dep not in deps:
            deps.append(dep)
    return deps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True, help="Debian architecture: amd64, arm64, armhf")
    ap.add_argument("--binary", required=True, help="the stripped binary built for --arch")
    ap.add_argument("--out", default="target/dist", help="directory for the .deb")
    args = ap.parse_args()

    with open(os.path.join(ROOT, "Cargo.toml"), "rb") as f:
        cargo = tomllib.load(f)
    package = cargo["package"]
    meta = package["metadata"]["deb"]
    name = package["name"]
    version = f"{package['version']}-1"

    stage = tempfile.mkdtemp(prefix="mkdeb-")
    try:
        installed_bytes = 0
        for source, dest, mode in meta["assets"]:
            # cargo-deb's rule: a destination ending in / is a directory.
            target = os.path.join(stage, dest + os.path.basename(source) if dest.endswith("/") else dest)
            source = args.binary if source == f"target/release/{name}" else os.path.join(ROOT, source)
            if not os.path.isfile(source):
                fail(f"asset {source} not found")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)
            os.chmod(target, int(mode, 8))
            installed_bytes += os.path.getsize(target)

        doc = os.path.join(stage, "usr/share/doc", name)
        os.makedirs(doc, exist_ok=True)
        with open(os.path.join(doc, "copyright"), "w") as f:
            f.write(
                "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
                f"Upstream-Name: {name}\n\nFiles: *\nCopyright: {meta['copyright']}\n"
            )
        installed_bytes += os.path.getsize(os.path.join(doc, "copyright"))

        control_dir = os.path.join(stage, "DEBIAN")
        os.makedirs(control_dir)
        depends = []
        for dep in (d.strip() for d in meta["depends"].split(",")):
            depends.extend(auto_depends(args.binary) if dep == "$auto" else [dep])
        description = meta["extended-description"].strip()
        long_lines = "\n".join(" " + line for line in _wrap(description))
        control = (
            f"Package: {name}\n"
            f"Version: {version}\n"
            f"Architecture: {args.arch}\n"
            f"Maintainer: {meta['maintainer']}\n"
            f"Installed-Size: {(installed_bytes + 1023) // 1024}\n"
            f"Depends: {', '.join(depends)}\n"
            f"Section: {meta['section']}\n"
            f"Priority: {meta['priority']}\n"
            f"Description: {package['description']}\n{long_lines}\n"
        )
        with open(os.path.join(control_dir, "control"), "w") as f:
            f.write(control)
        with open(os.path.join(control_dir, "conffiles"), "w") as f:
            f.write("".join(c + "\n" for c in meta["conf-files"]))
        scripts = os.path.join(ROOT, meta["maintainer-scripts"])
        for script in ("preinst", "postinst", "prerm", "postrm"):
            path = os.path.join(scripts, script)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(control_dir, script))
                os.chmod(os.path.join(control_dir, script), 0o755)
        sums = []
        for dirpath, _, files in sorted(os.walk(stage)):
            if dirpath.startswith(control_dir):
                continue
            for fname in sorted(files):
                path = os.path.join(dirpath, fname)
                with open(path, "rb") as f:
                    sums.append(f"{hashlib.md5(f.read()).hexdigest()}  {os.path.relpath(path, stage)}\n")
        with open(os.path.join(control_dir, "md5sums"), "w") as f:
            f.write("".join(sums))
        for dirpath, dirnames, _ in os.walk(stage):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
        os.chmod(stage, 0o755)

        os.makedirs(args.out, exist_ok=True)
        deb = os.path.join(args.out, f"{name}_{version}_{args.arch}.deb")
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", stage, deb],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(f"built {deb} ({os.path.getsize(deb)} bytes), Depends: {', '.join(depends)}")
    finally:
        shutil.rmtree(stage)


def _wrap(text, width=79):
    """Folds the extended description into control-file lines."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
