#!/usr/bin/env bash
# Build a local Debian base image (python3 + venv) without an image registry:
# debootstrap the Debian release this machine runs, from the mirror its apt is
# configured with, then `docker import` the tree.
#
#   scripts/build_base_image.sh [TAG]      default TAG: downpour-base:<codename>
#
# The image is built only when TAG is missing (FORCE=1 rebuilds). SUITE and
# MIRROR override what is read from /etc/os-release and the apt configuration.
# Needs root (debootstrap) and a reachable Debian mirror.
set -euo pipefail

. /etc/os-release
SUITE=${SUITE:-${VERSION_CODENAME:-}}
TAG=${1:-downpour-base:${SUITE:-local}}

if [ -z "${FORCE:-}" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG already present"
    exit 0
fi
if [ -z "$SUITE" ]; then
    echo "cannot tell the Debian release: no VERSION_CODENAME in /etc/os-release (set SUITE)" >&2
    exit 2
fi
if ! command -v debootstrap >/dev/null; then
    echo "debootstrap is missing: apt-get install -y debootstrap" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "debootstrap needs root" >&2
    exit 2
fi

mirror_from_apt() {
    # The URI apt uses for the release itself (not -updates/-security), in
    # either sources format. `apt-get indextargets` knows both.
    apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(TARGET_OF)' 2>/dev/null \
        | awk -v s="$SUITE" '$2 == s && $3 == "deb" { print $1; exit }'
}
mirror_from_sources() {
    # Fallback when apt has no lists yet: the first URI of a source naming the suite.
    {
        [ -f /etc/apt/sources.list ] && awk -v s="$SUITE" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i+1) == s) print $i; break } }' /etc/apt/sources.list
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] || continue
            awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" } {
                uri = ""; ok = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
                    if ($i ~ /^Suites:/) { n = split($i, b, /[ \t]+/); for (j = 2; j <= n; j++) if (b[j] == s) ok = 1 }
                }
                if (ok && uri != "") print uri
            }' "$f"
        done
    } | head -n 1
}
MIRROR=${MIRROR:-$(mirror_from_apt)}
MIRROR=${MIRROR:-$(mirror_from_sources)}
if [ -z "$MIRROR" ]; then
    echo "no apt source for $SUITE found in /etc/apt/sources.list{,.d}; set MIRROR" >&2
    exit 2
fi

root=$(mktemp -d /tmp/downpour-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap $SUITE from the configured mirror into $root"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$root" "$MIRROR"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
tar --numeric-owner -C "$root" -c . \
    | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' \
        -m "debootstrap --variant=minbase $SUITE + python3, python3-venv" - "$TAG"
echo "built $TAG"
