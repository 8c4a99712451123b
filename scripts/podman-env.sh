#!/usr/bin/env bash
# Podman settings for Starling's images and role scenarios, kept out of the system's configuration.
#
# Writes .state/podman/containers.conf (only when its content changes) and exports CONTAINERS_CONF,
# which in podman 4.3 *replaces* /etc/containers/containers.conf, so the file carries everything:
#   - runtime runc (crun fails here: "cgroups in hybrid mode not supported"),
#   - default_ulimits = [] (otherwise setrlimit fails when a container starts),
#   - networks only from 198.18.0.0/15: the default network is 198.18.0.0/24 and new networks
#     (molecule's per-scenario ones) come from the pool 198.18.16.0/20, one /24 each,
#   - a private CNI configuration directory, so the host's default "podman" network (outside
#     198.18.0.0/15 in Debian's package) is never used by these containers.
# See the shared ENVIRONMENT.md, "Containers and molecule".
#
# Usage:  source scripts/podman-env.sh           exports CONTAINERS_CONF (and STARLING_PODMAN_STATE)
#         scripts/podman-env.sh CMD [ARGS...]    runs CMD with it
#         scripts/podman-env.sh                  prints the export line
_starling_podman_env() {
    local root state conf cni tmp
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    state=$root/.state/podman
    conf=$state/containers.conf
    cni=$state/cni
    mkdir -p "$state" "$cni" || return 1
    tmp=$(mktemp "$state/.containers.conf.XXXXXX") || return 1
    cat >"$tmp" <<EOF
# Written by scripts/podman-env.sh: do not edit (it is rewritten when the script changes).
[containers]
default_ulimits = []

[engine]
runtime = "runc"

[network]
network_backend = "cni"
network_config_dir = "$cni"
default_subnet = "198.18.0.0/24"
default_subnet_pools = [{"base" = "198.18.16.0/20", "size" = 24}]
EOF
    if cmp -s "$tmp" "$conf"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$conf"
    fi
    export CONTAINERS_CONF=$conf
    export STARLING_PODMAN_STATE=$state
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    _starling_podman_env
else
    set -euo pipefail
    _starling_podman_env
    if (($# > 0)); then
        exec "$@"
    fi
    printf 'export CONTAINERS_CONF=%q\n' "$CONTAINERS_CONF"
fi
