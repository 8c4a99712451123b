#!/usr/bin/env bash
# `make demo`: the whole mesh on this machine, in podman containers, deployed by playbooks/site.yml.
#
#   1. what it needs, each step skipped when up to date: .venv (scripts/setup-venv.sh), the image
#      localhost/starling-debian:12 (scripts/build-image.sh, built meanwhile), the wheelhouse the roles install
#      from (scripts/build-wheelhouse.sh), the collection path .state/collections -> this repository
#      (`make demo` runs `make system` first: apt packages, podman among them);
#   2. the lab (scripts/lab.sh up stldemo): coordinator + signal, coturn, OpenBao, two NAT routers
#      (endpoint-independent and symmetric), three agent hosts, a clinic LAN behind agent3 with a host that runs no
#      agent, on --internal podman networks in 198.18.0.0/15;
#   3. ansible-playbook playbooks/site.yml -i examples/lab/inventory (Vault, coordinator, signal, relay,
#      settings, agents, policy and the clinic route from examples/lab/policies);
#   4. the result: the peers as the starling.mesh.coordinator inventory plugin lists them, each agent's
#      `starling status`, who reaches whom over the mesh (ping) on which path, and who reaches the clinic host
#      through the route (ping, tcp/8080). The exit code is the matrix's: 1 when a measurement contradicts the policy.
#
# Idempotent: a second run reuses the lab and the playbook changes nothing. `scripts/demo.sh down`
# (`make demo-down`) removes the containers, networks, host firewall table and .state/lab/stldemo.
# Env: STARLING_DEMO_PREFIX (default stldemo), ANSIBLE_ARGS (extra ansible-playbook arguments).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
BIN=$ROOT/.venv/bin
PREFIX=${STARLING_DEMO_PREFIX:-stldemo}
LAB_DIR=$ROOT/.state/lab/$PREFIX
START=$(date +%s)

BOLD='' PLAIN=''
if [[ -t 1 ]]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; fi
step() { printf '\n%s==> [%3ds] %s%s\n' "$BOLD" "$(($(date +%s) - START))" "$*" "$PLAIN"; }
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

mkdir -p "$ROOT/.state"
exec 9>"$ROOT/.state/.demo.lock"
flock 9

case ${1:-up} in
    up) ;;
    down)
        bash scripts/lab.sh down "$PREFIX"
        # The coordinator-only demo of earlier versions kept its state here.
        rm -rf "$ROOT/.state/demo"
        exit 0
        ;;
    *) die "usage: $0 [up|down]" ;;
esac

[[ $(id -u) -eq 0 ]] || die "the lab needs root (podman, nftables, nsenter)"
command -v podman >/dev/null 2>&1 || die "podman missing: run 'make system' (make demo does)"

# The image (debootstrap, a minute or two) builds while .venv and the wheelhouse are made.
step ".venv, image, wheelhouse, collection path (each skipped when up to date)"
bash scripts/build-image.sh &
image_pid=$!
if ! bash scripts/setup-venv.sh || ! bash scripts/build-wheelhouse.sh; then
    wait "$image_pid" || true
    die ".venv or the wheelhouse could not be made (see above)"
fi
wait "$image_pid" || die "the image build failed (scripts/build-image.sh)"
[[ -x $BIN/ansible-playbook ]] || die "$BIN/ansible-playbook missing: run 'make venv'"
link=.state/collections/ansible_collections/starling/mesh
mkdir -p "$(dirname "$link")"
[[ "$(readlink "$link" 2>/dev/null)" == "$ROOT" ]] || ln -sfn "$ROOT" "$link"

step "lab: scripts/lab.sh up $PREFIX"
if ! bash scripts/lab.sh up "$PREFIX"; then
    die "the lab did not come up; 'make demo-down' removes what was made"
fi

export STARLING_LAB_DIR=$LAB_DIR
export PATH=$BIN:$PATH
export ANSIBLE_COLLECTIONS_PATH=$ROOT/.state/collections
export ANSIBLE_ROLES_PATH=$ROOT/roles
export ANSIBLE_FORKS=${ANSIBLE_FORKS:-10}
export ANSIBLE_CALLBACK_RESULT_FORMAT=yaml
export ANSIBLE_DISPLAY_SKIPPED_HOSTS=false
export ANSIBLE_HOST_KEY_CHECKING=false
unset STARLING_URL STARLING_TOKEN VAULT_ADDR VAULT_TOKEN BAO_ADDR BAO_TOKEN

step "ansible-playbook playbooks/site.yml -i examples/lab/inventory"
log=$LAB_DIR/site.log
# shellcheck disable=SC2086  # ANSIBLE_ARGS is a list of words
if ! ansible-playbook playbooks/site.yml -i examples/lab/inventory ${ANSIBLE_ARGS:-} 2>&1 | tee "$log"; then
    die "site.yml failed (log: ${log#"$ROOT"/}); fix and run 'make demo' again, or 'make demo-down'"
fi
recap=$(sed -n '/^PLAY RECAP/,$p' "$log" | grep -E 'ok=' || true)
changed=$(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^changed=/) { split($i, a, "="); s += a[2] } } END { print s + 0 }' <<<"$recap")

step "waiting for the tunnels (direct first; ICE and the TURN relay after 2 s without a handshake)"
bash scripts/lab.sh wait "$PREFIX" --timeout 90 || true

step "peers: ansible-inventory -i examples/lab/mesh.coordinator.yml --list (the starling.mesh.coordinator plugin)"
bash scripts/lab.sh peers "$PREFIX"

step "starling status on each agent"
for agent in agent1 agent2 agent3; do
    printf '\n[%s] starling status\n' "$agent"
    bash scripts/lab.sh exec -p "$PREFIX" "$agent" starling status 2>&1 | sed 's/^/  /' || true
done

step "reachability over the mesh: ping from each row to each column (the clinic: ping and tcp/8080), path from the row's starling status"
matrix_rc=0
bash scripts/lab.sh matrix "$PREFIX" --wait 60 || matrix_rc=$?

elapsed=$(($(date +%s) - START))
clinic_ip=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["hosts"]["clinic"]["ip"])' \
    "$LAB_DIR/lab.json" 2>/dev/null || echo CLINIC-IP)
if [[ $changed -eq 0 ]]; then
    rerun_note="measured: nothing needed changing, everything was already in place"
else
    rerun_note="'make demo' again measures a re-run's changes"
fi
cat <<EOF

Starling demo: ${elapsed} s; site.yml: ${changed} change(s) this run (${rerun_note}).
  direct   WireGuard straight between the two hosts (through agent1's endpoint-independent NAT)
  relayed  through coturn on 'relay' (agent2's symmetric NAT gives every destination a new port)
  blocked  no policy allows the pair (examples/lab/policies): no tunnel, and both agents drop the traffic
  routed   to the clinic host (no agent) through the route 'clinic': agent3 forwards and masquerades, for ops only

Try:
  scripts/lab.sh exec agent1 starling status -d      # per peer: path, endpoint, candidates, relay
  scripts/lab.sh exec agent2 starling explain agent1 # why that pair is relayed
  scripts/lab.sh exec agent1 starling explain ${clinic_ip}  # the clinic host: which route, router, policy
  eval "\$(scripts/lab.sh env)"; ansible-inventory -i examples/lab/mesh.coordinator.yml --graph
  STARLING_LAB_DIR=$LAB_DIR ansible-playbook playbooks/site.yml -i examples/lab/inventory --check --diff
  scripts/lab.sh check                               # the lab's NAT and isolation checks
  make demo-down                                     # remove everything
EOF
exit "$matrix_rc"
