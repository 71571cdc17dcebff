#!/usr/bin/env bash
# Build a minimal Debian base image with Python 3.11 from Debian's own packages, with debootstrap: for sites that
# mirror Debian but cannot pull python:3.11-slim from a registry. Both Dockerfiles accept it as BASE_IMAGE.
#
#   sudo docker/make-base.sh [IMAGE]        default IMAGE: endoflow/debian-py311:12
#   make images BUILD_ARGS='--build-arg BASE_IMAGE=endoflow/debian-py311:12 --build-arg PIP_INDEX_URL=...'
#
# Environment: MIRROR (default http://deb.debian.org/debian, or your mirror), SUITE (default bookworm: Debian 12,
# whose python3 is 3.11, the version the project requires). Needs root (debootstrap chroots) and debootstrap;
# imports with `docker import` when an engine answers, else buildah, else leaves the root filesystem tarball.
set -euo pipefail

image=${1:-endoflow/debian-py311:12}
mirror=${MIRROR:-http://deb.debian.org/debian}
suite=${SUITE:-bookworm}
out=${OUT:-$PWD}

command -v debootstrap >/dev/null || { echo "make-base.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "make-base.sh: run as root: debootstrap creates device nodes and chroots" >&2; exit 2; }

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/endoflow-base.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT

# minbase: essential packages plus apt. Python then comes through apt inside the root, which resolves every
# dependency (debootstrap's --include does not: python3.11-venv's distutils is left out). The Dockerfiles' own
# apt step then finds python3.11 already there.
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"
mount -t proc proc "$rootfs/proc"
trap 'umount "$rootfs/proc" 2>/dev/null || true; rm -rf "$rootfs"' EXIT
chroot "$rootfs" apt-get update
DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get install -y --no-install-recommends \
    python3.11 python3.11-venv ca-certificates wget
python_version=$(chroot "$rootfs" python3.11 --version)
umount "$rootfs/proc"

# Trim what an image never uses: package caches and lists, docs, man pages, locales other than C.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true

tarball="$out/$(tr '/:' '__' <<<"$image").tar"
tar --numeric-owner -C "$rootfs" -cf "$tarball" .

if docker info >/dev/null 2>&1; then
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$tarball" "$image"
    rm -f "$tarball"
elif command -v buildah >/dev/null 2>&1; then
    container=$(buildah from scratch)
    buildah add "$container" "$tarball" /          # a tar archive is unpacked at /
    buildah config --env LANG=C.UTF-8 --cmd /bin/bash "$container"
    buildah commit --rm "$container" "$image"
    rm -f "$tarball"
else
    echo "No Docker engine and no buildah: root filesystem left in $tarball" >&2
    echo "Import it elsewhere: docker import --change 'CMD [\"/bin/bash\"]' $tarball $image" >&2
    exit 0
fi
echo "base image: $image (Debian $suite, $python_version)"
