"""The simulation fast path answers exactly what Flower's in-memory link state answers, only
without walking every stored message for nodes that have none, and stays off on an unchecked
Flower. Subclasses are patched, never `InMemoryLinkState` itself."""

from __future__ import annotations

import inspect
import logging

import flwr
import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from server.simulation_speedup import speed_up_in_memory_link_state

RUN_ID = 7


class Plain(InMemoryLinkState):
    """Flower's method, even if a simulation in this process installed the fast path on the base."""

    get_message_ins = inspect.unwrap(InMemoryLinkState.get_message_ins)


class Fast(Plain):
    """Patched by the fixture."""


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages take their run and source from the task identity, as in the ServerApp's thread."""
    for name, value in (("_task_id", 1), ("_run_id", RUN_ID), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def fast() -> type[Plain]:
    base = InMemoryLinkState.get_message_ins
    assert speed_up_in_memory_link_state(Fast)
    assert speed_up_in_memory_link_state(Fast)  # a second install is a no-op
    assert InMemoryLinkState.get_message_ins is base and Plain.get_message_ins is inspect.unwrap(base)
    assert inspect.unwrap(Fast.get_message_ins) is Plain.get_message_ins
    return Fast


def federation(cls: type[Plain], nodes: int) -> tuple[InMemoryLinkState, InMemoryGrid, list[int]]:
    """A state of class `cls` set up as a simulation's: nodes, run, and a grid to push with."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    factory.state_instance = cls(factory.federation_manager, factory.objectstore_factory.store())
    state = factory.state()
    node_ids = list(_register_nodes(nodes, factory))
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=RUN_ID)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, node_ids


def scenario(cls: type[Plain]) -> list[object]:
    """What a sequence of dispatcher polls gets, as the tags (group ids) of the messages."""
    state, grid, n = federation(cls, 5)
    seen: list[object] = []

    def push(*tagged: tuple[str, int]) -> list[Message]:
        messages = [Message(RecordDict(), node, MessageType.TRAIN, group_id=tag) for tag, node in tagged]
        assert len(list(grid.push_messages(messages))) == len(messages)
        return messages

    def poll(*nodes: int, limit: int | None = 1, run_id: int | None = None) -> None:
        for node in nodes:
            got = state.get_message_ins(node_id=node, limit=limit, run_id=run_id)
            seen.append([m.metadata.group_id for m in got])

    poll(*n)  # nothing stored
    a, _ = push(("a", n[0]), ("b", n[1]))
    poll(*n)  # delivered once
    poll(*n)  # and then never again
    push(("c", n[2]))  # for a node polled empty: the cache must notice
    poll(*n)
    push(("d", n[3]), ("e", n[3]))
    poll(n[3], n[3], n[3])  # one at a time, in order
    push(("f", n[4]))
    poll(n[4], run_id=RUN_ID + 1)  # another run's poll does not hide it
    poll(n[4])
    state.delete_messages({a.metadata.message_id})  # a reply came in ...
    push(("k", n[0]))  # ... and a new message went out: as many stored as before
    poll(n[0])
    (expired,) = push(("g", n[0]))
    expired.metadata.created_at -= expired.metadata.ttl  # the stored message, now past its TTL
    poll(n[0])  # never delivered, and deleted by Flower's sweep
    seen.append(sorted(m.metadata.group_id for m in state.message_ins_store.values()))
    state.delete_messages(set(state.message_ins_store))  # as the ServerApp's pull does after replies
    push(("h", n[1]), ("i", n[2]), ("j", n[2]))
    poll(n[1])
    poll(n[2], limit=None)
    poll(*n)
    with pytest.raises(AssertionError):
        state.get_message_ins(node_id=n[0], limit=0)
    return seen


def test_fast_path_answers_as_flower_does(fast: type[Plain]) -> None:
    expected = [[]] * 5 + [["a"], ["b"], [], [], []] + [[]] * 5 + [[], [], ["c"], [], []] \
        + [["d"], ["e"], []] + [[], ["f"]] + [["k"]] + [[], ["b", "c", "d", "e", "f", "k"]] \
        + [["h"], ["i", "j"]] + [[]] * 5
    assert scenario(Plain) == expected
    assert scenario(fast) == expected


def test_idle_nodes_skip_the_walk(fast: type[Plain], monkeypatch: pytest.MonkeyPatch) -> None:
    """With messages in flight, Flower re-validates each of them for every idle node; the fast
    path answers idle nodes without looking at any (else it buys nothing)."""
    checks: dict[type, int] = {}
    for cls in (Plain, fast):
        state, grid, n = federation(cls, 6)
        ids = list(grid.push_messages([Message(RecordDict(), node, MessageType.TRAIN) for node in n[:3]]))
        for _ in range(2):  # deliver, then notice there is nothing left
            for node in n:
                state.get_message_ins(node_id=node, limit=1)
        state.delete_messages({ids[0]})  # one reply came in: the two delivered ones still stored
        original = state._check_stored_messages
        checks[cls] = 0

        def counted(*args: object, **kwargs: object) -> None:
            checks[cls] += 1
            original(*args, **kwargs)

        monkeypatch.setattr(state, "_check_stored_messages", counted)
        assert all(state.get_message_ins(node_id=node, limit=1) == [] for node in n)
    assert checks == {Plain: 6 * 2, fast: 0}


def test_refuses_and_warns_on_unchecked_flower(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    class Later(Plain):
        pass

    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert not speed_up_in_memory_link_state(Later)
    assert Later.get_message_ins is Plain.get_message_ins
    assert "NOT installed: Flower 1.43.0 is not one of the versions it was checked against" in caplog.text


def test_refuses_a_changed_link_state(caplog: pytest.LogCaptureFixture) -> None:
    class Changed(Plain):
        def get_message_ins(self, node_id: int, limit: int | None) -> list[Message]:
            return []

    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert not speed_up_in_memory_link_state(Changed)
    assert "NOT installed: Changed.get_message_ins(self, node_id" in caplog.text
