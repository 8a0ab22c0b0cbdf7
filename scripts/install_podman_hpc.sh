#!/usr/bin/env bash
# Installs NERSC's podman-hpc (PyPI) on the local cluster node, over the Debian podman, the way a
# site installs it: a venv in /opt/podman-hpc, the site config in /etc/podman_hpc and a
# `podman-hpc` on every job's PATH (/usr/local/bin). Idempotent: a second run only checks.
# Runs as root after scripts/install_system.sh (which installs podman, squashfs-tools, squashfuse,
# fuse-overlayfs, fuse3, inotify-tools and the build tools used below).
#
# What the local node needs beyond `pip install podman-hpc`, and why:
# * a *static* mksquashfs >= 4.6: podman-hpc's migrate runs it inside the image itself
#   (`--entrypoint /mksq`) with `-xattrs-exclude` (new in 4.6); Debian 12 ships a dynamic 4.5.1,
#   so it is built from Debian's own squashfs-tools 4.6.1 source (gzip + lz4: podman-hpc uses lz4).
# * podman settings of its own (CONTAINERS_STORAGE_CONF/CONTAINERS_CONF, set by the wrapper): the
#   overlay driver on fuse-overlayfs (the users' plain podman stays on vfs, its store untouched),
#   runc, cgroupfs, host network, the nofile limit this machine allows.
# * fuse-overlayfs with `-o noacl`: squashfuse answers POSIX-ACL lookups with EOPNOTSUPP, which
#   the kernel turns into a failed chdir/exec in the container (fuse-overlayfs-wrap runs
#   $FUSE_OVERLAYFS_BIN, pointed at include/podman-hpc/fuse-overlayfs-noacl).
# * /dev/fuse usable by users (rootless fuse-overlayfs and squashfuse); mode 666 as on Debian hosts.
set -euo pipefail
PODMAN_HPC_VERSION=1.2.2
SQUASHFS_SRC_VERSION=1:4.6.1-1      # Debian trixie's squashfs-tools source
PREFIX=/opt/podman-hpc
ETC=/etc/podman_hpc
HERE=$(cd "$(dirname "$0")/.." && pwd)
SRC=$HERE/include/podman-hpc

need_root() {
  if [[ $EUID -ne 0 ]]; then echo "install_podman_hpc: need root to $1" >&2; exit 1; fi
}

# podman-hpc in its own venv, with the system Python (jobs run it as the cluster user)
if ! "$PREFIX/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('podman-hpc') != '$PODMAN_HPC_VERSION')" 2>/dev/null; then
  need_root "install podman-hpc into $PREFIX"
  echo "install_podman_hpc: podman-hpc $PODMAN_HPC_VERSION into $PREFIX"
  /usr/bin/python3 -m venv "$PREFIX"
  "$PREFIX/bin/pip" install -q --disable-pip-version-check "podman-hpc==$PODMAN_HPC_VERSION"
fi

# a static mksquashfs 4.6 (see above)
if ! "$PREFIX/bin/mksquashfs.static" -version 2>/dev/null | grep -q "version 4\.6"; then
  need_root "build mksquashfs.static"
  echo "install_podman_hpc: building a static mksquashfs from Debian's squashfs-tools $SQUASHFS_SRC_VERSION"
  src_list=/etc/apt/sources.list.d/slurmflow-squashfs-src.sources
  if [[ ! -e $src_list ]]; then  # source packages only: no binary package comes from trixie
    printf '%s\n' "Types: deb-src" "URIs: http://deb.debian.org/debian" "Suites: trixie" \
      "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" > "$src_list"
    apt-get update -qq
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get source -qq --download-only "squashfs-tools=$SQUASHFS_SRC_VERSION" 2>/dev/null \
    && tar xzf squashfs-tools_*.orig.tar.gz)
  make -s -C "$work"/squashfs-tools-*/squashfs-tools -j"$(nproc)" mksquashfs \
    GZIP_SUPPORT=1 LZ4_SUPPORT=1 XZ_SUPPORT=0 LZO_SUPPORT=0 ZSTD_SUPPORT=0 XATTR_SUPPORT=1 \
    EXTRA_LDFLAGS=-static >/dev/null 2>&1
  install -m 755 -s "$work"/squashfs-tools-*/squashfs-tools/mksquashfs "$PREFIX/bin/mksquashfs.static"
fi

# the site configuration and the wrapper on PATH
install_file() {  # mode src dst
  if ! cmp -s "$2" "$3"; then
    need_root "install $3"
    install -D -m "$1" "$2" "$3"
  fi
}
for f in podman_hpc.yaml storage.conf containers.conf; do install_file 644 "$SRC/$f" "$ETC/$f"; done
install_file 755 "$SRC/fuse-overlayfs-noacl" "$PREFIX/bin/fuse-overlayfs-noacl"
install_file 755 "$SRC/podman-hpc" /usr/local/bin/podman-hpc
[[ -d $PREFIX/share/containers/oci/hooks.d ]] || { need_root "create the hooks dir"; mkdir -p "$PREFIX/share/containers/oci/hooks.d"; }
if [[ -e /dev/fuse && $(stat -c %a /dev/fuse) != 666 ]]; then
  need_root "chmod /dev/fuse"
  chmod 666 /dev/fuse
fi
"$PREFIX/bin/python" -c "import podman_hpc.siteconfig"
echo "install_podman_hpc: podman-hpc $PODMAN_HPC_VERSION, $("$PREFIX/bin/mksquashfs.static" -version | head -1), site config in $ETC"
