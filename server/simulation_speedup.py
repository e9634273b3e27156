"""A fast path for the simulation dispatcher's polling of Flower's in-memory link state.

Why: Flower's simulation dispatcher (`vce_api.add_messages_to_queue`) asks
`state.get_message_ins(node_id, limit=1)` for *every* simulated node every 0.1 s, and
`InMemoryLinkState.get_message_ins` walks the stored messages in insertion order, re-validating
each one (`_check_stored_messages`: expiry, federation membership) until it finds one for that
node: a node with nothing pending walks them all, O(nodes x messages in flight) a pass. With 943
nodes and 94 messages in flight a pass took 284 ms of CPU on Flower 1.42 and 0.7 ms with this fast
path (`python -m simulations.bench_link_state`; on 1.41 a round went from 21.7 s to 10.1 s).

What changes: the state keeps a set of the nodes that have an undelivered message, rebuilt by
one scan (no validation) whenever a message is stored or deleted. A node outside it is answered
`[]` at once; a node in it goes through Flower's own method, so what is delivered, and that an
expired message is never delivered, are Flower's decisions.

What it skips: the answer `[]` for an idle node comes without Flower's sweep, which on the
unpatched path deletes every expired (or out-of-federation) message within one dispatcher pass.
Expiry still happens (checked in Flower 1.41 and 1.42's `in_memory_linkstate.py`):
- `get_message_ins` for a node in the set runs Flower's walk; the first time a node's messages
  are all delivered, that call finds none and walks (and sweeps) every stored message, so each
  push of messages is followed by a full sweep within two passes;
- `get_message_res`, which the ServerApp's `send_and_receive` calls every 0.1 s for the ids it
  still waits for, sweeps exactly those ids and answers an expired one with an error reply;
- `store_message_res` checks the message being replied to.
So a message that expires while nothing new is pushed and nobody waits for it (a round that
timed out) stays in memory until the next push, instead of going at its TTL (server/server_app.py
keeps Flower's default, 12 h); nothing expired is delivered and the ServerApp sees the same
replies. (Out-of-federation: a simulation's NoOpFederationManager keeps every node in.)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from logging import WARNING

import flwr
from flwr.app import Message
from flwr.common import log
from flwr.server.superlink.linkstate import InMemoryLinkState

# Flower versions (major.minor) whose InMemoryLinkState.get_message_ins, _check_stored_messages and
# vce_api.add_messages_to_queue were read against this module; add one only after reading them
# again and running tests/test_simulation_speedup.py and simulations/bench_link_state.py on it.
CHECKED_FLOWER = ("1.41", "1.42")
_MARK = "_fedrec_fast_path"  # set on the installed method: installing twice is a no-op
_CACHE = "_fedrec_pending"  # per state: ((len(store), last message id), nodes with an undelivered message)
_STATE_ATTRIBUTES = ("lock", "message_ins_store")  # set in InMemoryLinkState.__init__, read here
_SIGNATURE = ["self", "node_id", "limit", "run_id"]

GetMessageIns = Callable[..., list[Message]]


def speed_up_in_memory_link_state(cls: type[InMemoryLinkState] = InMemoryLinkState) -> bool:
    """Install the fast path on `cls` (default: for the whole process); False, with a warning, if
    this Flower was not checked or its link state no longer looks like the one checked."""
    version = ".".join(flwr.__version__.split(".")[:2])
    if version not in CHECKED_FLOWER:
        return _not_installed(f"Flower {flwr.__version__} is not one of the versions it was checked "
                              f"against ({', '.join(CHECKED_FLOWER)})")
    original = cls.get_message_ins
    if getattr(original, _MARK, False):
        return True
    if list(inspect.signature(original).parameters) != _SIGNATURE:
        return _not_installed(f"{cls.__name__}.get_message_ins{inspect.signature(original)} changed")
    if missing := [name for name in _STATE_ATTRIBUTES if name not in _init_attributes(cls)]:
        return _not_installed(f"{cls.__name__} no longer sets {', '.join(missing)}")
    cls.get_message_ins = _fast(original)
    return True


def _init_attributes(cls: type) -> set[str]:
    """Names the `__init__` methods along `cls`'s MRO refer to (its `self.x = ...` among them)."""
    return {name for klass in cls.__mro__ if (init := vars(klass).get("__init__")) is not None
            and hasattr(init, "__code__") for name in init.__code__.co_names}


def _not_installed(reason: str) -> bool:
    log(WARNING, "fedrec: simulation fast path for the in-memory link state NOT installed: %s; "
        "the dispatcher's polling costs O(nodes x messages) a pass (slower simulations, same results)",
        reason)
    return False


def _fast(original: GetMessageIns) -> GetMessageIns:
    """`original`, skipped for nodes with no undelivered message."""

    @functools.wraps(original)  # keeps `original` as __wrapped__
    def get_message_ins(self: InMemoryLinkState, node_id: int, limit: int | None, *,
                        run_id: int | None = None) -> list[Message]:
        # Holds the (reentrant) lock around Flower's method too, so no message can be stored
        # between its answer and the set's update.
        with self.lock:
            store = self.message_ins_store
            # A store appends a new, unique id (InMemoryGrid: a uuid4) to the dict and a delete
            # shrinks it, so this pair changes whenever the stored messages do. Deliveries only shrink the real set:
            # the cached one stays a superset of the nodes with an undelivered message.
            version = (len(store), next(reversed(store), None))
            cached: tuple[tuple[int, str | None], set[int]] | None = getattr(self, _CACHE, None)
            if cached is None or cached[0] != version:
                cached = (version, {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""})
                setattr(self, _CACHE, cached)
            if node_id not in cached[1] and (limit is None or limit >= 1):  # Flower rejects limit < 1
                return []
            delivered = original(self, node_id, limit, run_id=run_id)
            if not delivered and run_id is None:  # none left for this node (in any run)
                cached[1].discard(node_id)
            return delivered

    setattr(get_message_ins, _MARK, True)
    return get_message_ins
