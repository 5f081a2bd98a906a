#!/usr/bin/env bash
# Wheels of downpour's dependencies (and the build backend) for an image built
# without a package index: deploy/docker/wheelhouse/, which the Dockerfile
# installs from. Built with the host's Python, so the image's Python must be the
# same version (scripts/build_base_image.sh makes such an image from the host's
# Debian release). PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=deploy/docker/wheelhouse
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip wheel -q --disable-pip-version-check -w "$tmp" . "setuptools>=68" wheel
rm -f "$tmp"/downpour-*.whl            # the project itself is built from source in the image
find "$out" -name '*.whl' -delete
mv "$tmp"/*.whl "$out"/
echo "$(ls "$out"/*.whl | wc -l) wheels in $out"
