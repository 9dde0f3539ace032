#!/bin/sh
# Build the Debian base image for machines that cannot pull from a registry (no Docker Hub):
# debootstrap a minimal Debian 12 (bookworm) with Python 3.11 and Redis, and `docker import` it.
#
#   docker/local-base.sh [IMAGE]             # as root (or with sudo); default IMAGE: reidgen-base:bookworm
#
# The image has `python` and `pip` of a virtual environment at /opt/venv (on PATH, so the
# Dockerfile's `pip install` lands there, not in Debian's externally managed Python), the tools the
# Dockerfile uses (useradd), and Debian's redis-server for the redis service of
# docker-compose.cpu.yml. No PyTorch: the Dockerfile installs it from the package index.
# Needs root, debootstrap and docker (apt-get install docker.io debootstrap); about a minute with a
# nearby Debian mirror. MIRROR (default http://deb.debian.org/debian) picks another mirror.
set -eu

IMAGE="${1:-reidgen-base:bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd,redis-server,redis-tools

die() { echo "local-base.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root, e.g. 'sudo $0' (debootstrap makes a root file system)"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
command -v docker >/dev/null || die "docker is missing: apt-get install docker.io"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (is dockerd running?)"

ROOTFS="$(mktemp -d /tmp/reidgen-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT

start=$(date +%s)
echo "debootstrap $SUITE from $MIRROR into $ROOTFS ..."
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
    || { tail -20 "$ROOTFS.log" >&2; die "debootstrap failed (full log: $ROOTFS.log)"; }
rm -f "$ROOTFS.log"

# The virtual environment the image's `python`/`pip` come from; pip itself upgraded later, in the
# Dockerfile, where the CA bundle secret is available.
chroot "$ROOTFS" python3 -m venv /opt/venv
# An image, not a machine: no package lists or caches, and services are never started by dpkg.
printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb

tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV VIRTUAL_ENV=/opt/venv' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "reidgen local base: debootstrap $SUITE minbase + $PACKAGES" \
    - "$IMAGE" >/dev/null
echo "built $IMAGE in $(( $(date +%s) - start )) s: $(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
