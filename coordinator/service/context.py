"""What services need from the coordinator (`ServiceContext`) and what it tells about map changes
(`StreamNotifier`): narrow interfaces, so services and the coordinator do not import each other.

`coordinator.service.core.Coordinator` provides `ServiceContext`; `coordinator.hub.StreamHub` provides
`StreamNotifier` (attached by `build_coordinator`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig
    from coordinator.engine.meshview import MeshView
    from coordinator.identity import Identity
    from coordinator.metrics import Metrics
    from coordinator.service.tx import Tx
    from coordinator.signing import TokenSigner
    from coordinator.store import Store

T = TypeVar("T")


class StreamNotifier(Protocol):
    """Who is told that maps changed (coordinator.hub.StreamHub, attached by build_coordinator)."""

    def notify(self, peer_ids: set[str]) -> None: ...

    def notify_all(self) -> None: ...

    def connected_ids(self) -> set[str]: ...

    def is_connected(self, peer_id: str) -> bool: ...

    def connected_peers(self) -> int: ...


class NoStreams:
    """Before streams are attached (and in tools that serve none): nobody to notify."""

    def notify(self, peer_ids: set[str]) -> None:
        pass

    def notify_all(self) -> None:
        pass

    def connected_ids(self) -> set[str]:
        return set()

    def is_connected(self, peer_id: str) -> bool:
        return False

    def connected_peers(self) -> int:
        return 0


class ServiceContext(Protocol):
    config: CoordinatorConfig
    store: Store
    view: MeshView
    hub: StreamNotifier
    metrics: Metrics
    identity: Identity
    signer: TokenSigner
    admin_token_hash: str

    def write(self, actor: str, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in one transaction (audit and graph operations included); nothing changes on error."""
        ...
