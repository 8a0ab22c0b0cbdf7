#!/usr/bin/env bash
# Installs the Debian packages the local HPC site needs. Idempotent: a second run only checks.
# Runs as root (the local stack is a dev/CI machine, like the Astro/Slurm docker images).
set -euo pipefail
PKGS=(
  slurm-wlm slurmdbd munge mariadb-server     # the cluster and its accounting
  openssh-server                              # the login node
  docker.io docker-registry apache2-utils     # image build + registry (htpasswd from apache2-utils)
  podman charliecloud-runtime charliecloud-builders  # unprivileged container runtimes in jobs
  fuse-overlayfs fuse3 squashfuse squashfs-tools inotify-tools  # podman-hpc (scripts/install_podman_hpc.sh)
  gcc make libc6-dev zlib1g-dev liblz4-dev dpkg-dev  # ... and its static mksquashfs, built from source
  debootstrap                                 # a local base image: no image hub is reachable
  supervisor                                  # the process supervisor of the stack
  postgresql                                  # Airflow + MLflow metadata
  redis-server                                # the Celery broker of `make up EXECUTOR=celery`
  chromium chromium-driver                    # headless browser for the UI tests (no browser download)
  jq curl netcat-openbsd procps psmisc uidmap
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $EUID -ne 0 ]]; then
    echo "install_system: need root to install: ${missing[*]}" >&2; exit 1
  fi
  echo "install_system: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d stops Debian's maintainer scripts from starting daemons: our supervisor owns them.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install_system: all ${#PKGS[@]} Debian packages present"
