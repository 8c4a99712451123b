"""Choose the WireGuard backend: kernel when the module works, else userspace wireguard-go."""

from __future__ import annotations

from pathlib import Path

from agent.wg.backend import WireGuardBackend, WireGuardError


def make_backend(kind: str, interface: str, state_dir: Path) -> WireGuardBackend:
    """`kind` is auto, kernel or userspace."""
    from agent.wg.userspace import UserspaceBackend

    if kind not in ("auto", "kernel", "userspace"):
        raise WireGuardError(f"unknown WireGuard backend {kind!r} (auto, kernel, userspace)")
    if kind != "userspace":
        from agent.wg.kernel import KernelBackend, kernel_module_available  # pyroute2: only when needed

        if kind == "kernel" or kernel_module_available():
            return KernelBackend(interface)
    return UserspaceBackend(interface, log_dir=state_dir / "logs")
