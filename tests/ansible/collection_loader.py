"""Make `ansible_collections.starling.mesh` importable in this process (unit tests), the way ansible does it."""

from __future__ import annotations

import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder

    root = Path(tempfile.mkdtemp(prefix="starling-collections-"))
    (root / "ansible_collections" / "starling").mkdir(parents=True)
    (root / "ansible_collections" / "starling" / "mesh").symlink_to(REPO)
    _AnsibleCollectionFinder(paths=[str(root)])._install()
    _installed = True
