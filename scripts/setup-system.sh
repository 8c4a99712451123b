#!/usr/bin/env bash
# Install the Debian packages Starling's tests, demo and lab need -- only the missing ones.
#
# Safe to run repeatedly: when everything is present it only queries dpkg and exits 0.
# `apt-get update` runs only when something has to be installed. As non-root it warns and
# exits 0 (a developer box may already have everything, or install it by other means).
set -euo pipefail

PACKAGES="postgresql wireguard-go wireguard-tools nftables iproute2 coturn conntrack iperf3 procps iputils-ping chromium podman runc debootstrap"

log() { printf 'setup-system: %s\n' "$*"; }
warn() { printf 'setup-system: WARNING: %s\n' "$*" >&2; }

if ! command -v dpkg-query >/dev/null 2>&1; then
    warn "dpkg-query not found (not a Debian system?); install these yourself: $PACKAGES"
    exit 0
fi

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for pkg in $PACKAGES; do
    is_installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    log "all required packages present"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    warn "not root: cannot install missing packages: ${missing[*]}"
    warn "run 'sudo $0' (or install them yourself); continuing without them"
    exit 0
fi

# Something that starts the coturn package's own turnserver would clash with the tests' servers.
systemd_running() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; }
coturn_active() {
    if systemd_running; then
        systemctl is-active --quiet coturn.service 2>/dev/null
    else
        # No systemd (container): a sysvinit start leaves a turnserver process behind.
        pgrep -x turnserver >/dev/null 2>&1
    fi
}
installing_coturn=false
coturn_was_active=false
for pkg in "${missing[@]}"; do
    [[ "$pkg" == coturn ]] && installing_coturn=true
done
if $installing_coturn && coturn_active; then
    coturn_was_active=true
fi

log "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-q -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
apt-get "${apt_opts[@]}" update -qq
apt-get "${apt_opts[@]}" install -y --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}"

still_missing=()
for pkg in "${missing[@]}"; do
    is_installed "$pkg" || still_missing+=("$pkg")
done
if ((${#still_missing[@]} > 0)); then
    warn "still not installed after apt-get: ${still_missing[*]}"
    exit 1
fi

if $installing_coturn; then
    # The package's service is not ours: tests start their own turnserver on their own ports.
    if ! $coturn_was_active && coturn_active; then
        log "stopping the coturn service the package started"
        if systemd_running; then
            systemctl stop coturn.service || warn "could not stop coturn.service"
        elif command -v invoke-rc.d >/dev/null 2>&1; then
            invoke-rc.d coturn stop || warn "could not stop coturn"
        fi
    fi
    if command -v systemctl >/dev/null 2>&1; then
        # Works offline too (only symlinks), so a later boot with systemd will not start it.
        systemctl disable --quiet coturn.service 2>/dev/null || true
    fi
    if command -v update-rc.d >/dev/null 2>&1 && [[ -e /etc/init.d/coturn ]]; then
        update-rc.d coturn disable >/dev/null 2>&1 || true
    fi
fi

log "done"
