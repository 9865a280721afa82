#!/usr/bin/env bash
# Make a Debian bookworm base image with Python 3.11 without pulling from a registry.
#
#   deploy/docker/local-base.sh          # prints the image's name, e.g. convserve-base:bookworm-1a2b3c4d5e6f
#
# Where Docker Hub cannot be reached, the images are built on this base instead of
# python:3.11-slim-bookworm (pass it as --build-arg BASE_IMAGE=...). It is the same
# Debian release with Debian's Python 3.11, python3-venv and python3-pip, made with
# debootstrap and `docker import`, not that image. The machine's CA bundle is copied
# in, so that TLS to the package registries works wherever the machine's own trusted
# CAs are needed for it. The tag is a hash of this script and of that bundle: an
# existing image of the same tag is reused, so a machine builds it once.
#
# Needs root, debootstrap and a Docker engine. MIRROR (default http://deb.debian.org/debian)
# chooses the Debian mirror.
set -euo pipefail

SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
REPOSITORY=convserve-base

here=$(cd "$(dirname "$0")" && pwd)
digest=$(cat "$here/local-base.sh" "$CA_BUNDLE" | sha256sum | cut -c1-12)
image="$REPOSITORY:$SUITE-$digest"

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image"
    exit 0
fi

root=$(mktemp -d /var/tmp/convserve-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap $SUITE ($PACKAGES) from $MIRROR into $root" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >&2
cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
# Nothing the images need: package lists and caches, documentation.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*
# Debian's Python refuses pip outside a venv (PEP 668); the images install into one.
tar -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    --message "Debian $SUITE with Python 3 (debootstrap), for convserve's images" \
    - "$image" >&2
echo "$image"
