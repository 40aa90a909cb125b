"""Per-node state of the compressed tier, kept as two attributes on SGLang's ``TreeNode``.

A node of the radix tree is in one of these states (``NodeState``); the table says where its bytes are:

    state        node.value (hot slots)   blob (node.kvtc_ref)            notes
    HOT          slots                    none                            as RadixCache
    ENCODING     slots                    pool slots, being written       locked (inc_lock_ref) until the encode ack
    HOT_BLOB     slots                    pool slots                      evicting it frees the hot slots only
    COMPRESSED   None                     pool slots                      in the tree and matchable
    LOADING      new slots                pool slots, being read          locked until the decode ack
    HOST         None                     pinned host memory              restored by a host->device copy + decode

``node.kvtc_state`` holds the state (absent = HOT, so nodes made by SGLang's own code are hot) and
``node.kvtc_ref`` a ``BlobRef`` (absent = None): the node's token range inside a blob. The two halves of a split
compressed node reference the same blob with different ranges.

Hot-closure: a node with hot slots (HOT, ENCODING, HOT_BLOB, LOADING) has a parent with hot slots (or the root), so
on every root path the nodes holding slots come first. COMPRESSED and HOST nodes have only COMPRESSED/HOST
descendants.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class NodeState(enum.Enum):
    HOT = "hot"
    ENCODING = "encoding"
    HOT_BLOB = "hot_blob"
    COMPRESSED = "compressed"
    LOADING = "loading"
    HOST = "host"

    @property
    def has_slots(self) -> bool:
        """The node holds hot KV slots (``node.value`` is set)."""
        return self in _WITH_SLOTS

    @property
    def has_blob(self) -> bool:
        return self is not NodeState.HOT


_WITH_SLOTS = frozenset({NodeState.HOT, NodeState.ENCODING, NodeState.HOT_BLOB, NodeState.LOADING})
# Matchable without a load-back (hot slots whose content is, or will be before any reader runs, the node's KV).
HOT_STATES = _WITH_SLOTS
# Restorable by init_load_back.
COLD_STATES = frozenset({NodeState.COMPRESSED, NodeState.HOST})


class Tier(enum.Enum):
    """Where a blob's bytes live."""

    DEVICE = "device"  # KV-pool slots
    HOST = "host"      # pinned host memory


@dataclass(frozen=True)
class BlobRef:
    """A node's tokens inside a blob.

    Attributes:
        blob: the blob (shared by the halves of a split node).
        offset: index of the node's first token inside the blob.
        count: the node's tokens (== len(node.key)).
    """

    blob: Any  # blob_store.Blob
    offset: int
    count: int

    @property
    def start(self) -> int:
        """Absolute position of the node's first token."""
        return self.blob.start_pos + self.offset

    @property
    def end(self) -> int:
        return self.offset + self.count


def state_of(node: Any) -> NodeState:
    return getattr(node, "kvtc_state", NodeState.HOT)


def ref_of(node: Any) -> BlobRef | None:
    return getattr(node, "kvtc_ref", None)


def set_state(node: Any, state: NodeState, ref: BlobRef | None = None) -> None:
    """Set a node's state and blob reference together (the reference must be None exactly in HOT)."""
    if (ref is None) != (state is NodeState.HOT):
        raise RuntimeError(f"node {getattr(node, 'id', '?')}: state {state.value} with blob reference {ref}")
    node.kvtc_state = state
    node.kvtc_ref = ref
