"""agent.netlink.AddressWatch in a namespace of its own: quiet while nothing changes (so the watchdog
reads no addresses), "changed" after an address comes or goes, quiet again once looked at."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.netns import have_netns

pytestmark = pytest.mark.skipif(not have_netns(), reason="needs root and network namespaces")

PROBE = """
import subprocess, sys, time
from agent.netlink import AddressWatch

def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)

watch = AddressWatch()
looks = [watch.changed()]                       # nothing happened yet
sh("ip link add w0 type veth peer name w1 && ip link set w0 up")
time.sleep(0.1)
looks += [watch.changed(), watch.changed()]     # the new links, then quiet
sh("ip addr add 198.18.251.1/24 dev w0")
time.sleep(0.1)
looks += [watch.changed(), watch.changed()]     # an address came
sh("ip addr del 198.18.251.1/24 dev w0")
time.sleep(0.1)
looks += [watch.changed(), watch.changed()]     # and went
watch.close()
print(looks)
"""


def test_address_watch_sees_links_and_addresses_come_and_go() -> None:
    ns = "st" + secrets.token_hex(2) + "-aw"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        result = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", PROBE],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=Path(__file__).resolve().parents[2],
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[False, True, False, True, False, True, False]"
