#!/usr/bin/env bash
# Build the local podman image localhost/starling-debian:12 for the role scenarios (molecule).
#
# No image registry is reachable, so the image is a Debian 12 root file system made by debootstrap
# (minbase) from the Debian mirror this machine's apt uses, imported with `podman import`. It holds
# systemd (PID 1 in the containers) and everything the roles install or run, so that the hosts
# need no network access: the roles install Starling from a wheelhouse copied from the controller
# and coturn is already unpacked.
#
# Rebuilt only when the image is missing or its recipe (package list, mirror, this script's
# build steps) changed: the image carries the recipe's hash in the label starling.image.recipe.
#
# Usage: scripts/build-image.sh [--force]
# Env:   STARLING_IMAGE (default localhost/starling-debian:12), DEBIAN_MIRROR (default: from
#        /etc/apt/sources.list*), DEBIAN_SUITE (default bookworm).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh

IMAGE=${STARLING_IMAGE:-localhost/starling-debian:12}
SUITE=${DEBIAN_SUITE:-bookworm}
FORCE=false
[[ ${1:-} == --force ]] && FORCE=true

# What the hosts of the role scenarios need (keep sorted; a change triggers a rebuild).
PACKAGES=(
    ca-certificates
    coturn
    dbus
    iproute2
    iputils-ping
    nftables
    procps
    python3
    python3-apt
    python3-venv
    systemd
    systemd-sysv
    wireguard-go
    wireguard-tools
)
# Bump when the steps below change in a way that changes the image.
RECIPE_VERSION=1

START=$(date +%s)
log() { printf 'build-image: [%3ds] %s\n' "$(($(date +%s) - START))" "$*"; }
die() { printf 'build-image: ERROR: %s\n' "$*" >&2; exit 1; }

for tool in podman debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run 'make system' (scripts/setup-system.sh installs it)"
done
[[ $(id -u) -eq 0 ]] || die "debootstrap and podman import need root"

# The first Debian mirror apt is configured with (one-line or deb822 format), unless given.
apt_mirror() {
    local f uri
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; exit } }' "$f" |
            grep -v -e security -e '^cdrom:' | head -n1 || true)
        if [[ -n $uri ]] && grep -qE "^deb .*${uri//./\\.}[ /]+.*${SUITE}[ ]" "$f"; then
            echo "$uri"
            return
        fi
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        # One stanza per paragraph: the first with Types: deb, Suites: <suite>, not a security archive.
        uri=$(awk -v suite="$SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^Types:/) types = $i
                    else if ($i ~ /^URIs:/) uris = $i
                    else if ($i ~ /^Suites:/) suites = $i
                }
                if (types ~ /[ :]deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris !~ /security/) {
                    sub(/^URIs:[ \t]*/, "", uris); split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' "$f")
        if [[ -n $uri ]]; then
            echo "$uri"
            return
        fi
    done
}

MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
[[ -n $MIRROR ]] || die "no Debian mirror for $SUITE found in /etc/apt/sources.list*; set DEBIAN_MIRROR"

PKG_LIST=$(IFS=,; echo "${PACKAGES[*]}")
RECIPE="v$RECIPE_VERSION suite=$SUITE mirror=$MIRROR packages=$PKG_LIST"
HASH=$(printf '%s' "$RECIPE" | sha256sum | cut -c1-16)

current=$(podman image inspect --format '{{ index .Labels "starling.image.recipe" }}' "$IMAGE" 2>/dev/null || true)
if [[ $current == "$HASH" ]] && ! $FORCE; then
    log "$IMAGE is up to date (recipe $HASH)"
    exit 0
fi
if [[ -n $current ]]; then
    log "$IMAGE has recipe ${current:-?}, want $HASH: rebuilding"
else
    log "$IMAGE is missing: building (recipe $HASH)"
fi
log "mirror $MIRROR, suite $SUITE, packages: ${PACKAGES[*]}"

WORK=$ROOT/.state/image-build
mkdir -p "$WORK"
ROOTFS=$(mktemp -d "$WORK/rootfs.XXXXXX")
cleanup() {
    # debootstrap may leave /proc or /sys mounted in the target after a failure.
    local m
    for m in proc sys dev/pts dev; do
        if mountpoint -q "$ROOTFS/$m" 2>/dev/null; then umount -l "$ROOTFS/$m" || true; fi
    done
    rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT

t0=$(date +%s)
log "debootstrap --variant=minbase (a minute or two)"
if ! debootstrap --variant=minbase --components=main --include="$PKG_LIST" \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    die "debootstrap failed (full log: $WORK/debootstrap.log)"
fi
log "debootstrap done in $(($(date +%s) - t0)) s"

# Container tweaks: no machine id (systemd makes one per container), the mirror for apt (not
# needed by the roles), no package caches, no services the package scripts enabled that fight
# with what the roles manage (coturn is configured and enabled by the relay role).
: >"$ROOTFS/etc/machine-id"
rm -f "$ROOTFS/var/lib/dbus/machine-id"
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$ROOTFS/etc/apt/sources.list"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log
chroot "$ROOTFS" systemctl disable coturn.service >/dev/null 2>&1 || true
# Units that only slow down or fail in a container.
for unit in systemd-remount-fs.service getty.target console-getty.service \
    sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount; do
    ln -sf /dev/null "$ROOTFS/etc/systemd/system/$unit"
done

t0=$(date +%s)
log "podman import -> $IMAGE"
tar -C "$ROOTFS" --numeric-owner -c . | podman import --quiet \
    --change 'CMD ["/sbin/init"]' \
    --change 'STOPSIGNAL SIGRTMIN+3' \
    --change "LABEL starling.image.recipe=$HASH" \
    --message "starling: debootstrap $SUITE ($PKG_LIST)" \
    - "$IMAGE" >/dev/null
log "import done in $(($(date +%s) - t0)) s"

# Drop the previous, now untagged, build (only images that carry our label and no tag).
for id in $(podman images --filter dangling=true --filter label=starling.image.recipe --format '{{.ID}}'); do
    podman rmi "$id" >/dev/null 2>&1 || true
done

log "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }'))," \
    "total $(($(date +%s) - START)) s"
