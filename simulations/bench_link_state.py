"""What the simulation dispatcher's polling costs on the installed Flower, with and without
`server.simulation_speedup`: a real in-memory link state built the way `flwr run` builds a
simulation's (nodes registered as `vce_api._register_nodes` does, the run as
`run_simulation._main_loop` does, messages pushed through an `InMemoryGrid`), then one
dispatcher pass (`get_message_ins(node, limit=1)` for every node) timed on each, interleaved.
The dispatcher waits 0.1 s after each pass, so a pass of P s keeps P / (P + 0.1) of a core busy
(and holds the GIL that long, in the process that also runs the ServerApp).

    python -m simulations.bench_link_state --nodes 943 --messages 94
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import flwr
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

DISPATCH_INTERVAL_S = 0.1  # vce_api.add_messages_to_queue waits this long between passes


class FastLinkState(InMemoryLinkState):
    """The patched state for this comparison only; `InMemoryLinkState` itself stays Flower's."""


def build(nodes: int, messages: int, fast: bool) -> tuple[InMemoryLinkState, list[int]]:
    """A link state holding `messages` pushed messages for the first `messages` of `nodes` nodes."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    if fast:  # what factory.state() would build, of the patched subclass
        factory.state_instance = FastLinkState(factory.federation_manager, factory.objectstore_factory.store())
    state = factory.state()
    node_ids = list(_register_nodes(nodes, factory))
    run = Run.create_empty(run_id=1)
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID  # as run_simulation
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    pushed = grid.push_messages(Message(RecordDict(), node, MessageType.TRAIN) for node in node_ids[:messages])
    assert len(list(pushed)) == messages
    return state, node_ids


def one_pass(state: InMemoryLinkState, node_ids: list[int]) -> tuple[float, float, int]:
    """CPU and wall seconds of one dispatcher pass (CPU: the cores here are shared), and the
    messages it delivered."""
    cpu, wall = time.thread_time(), time.perf_counter()
    delivered = sum(len(state.get_message_ins(node_id=node, limit=1)) for node in node_ids)
    return time.thread_time() - cpu, time.perf_counter() - wall, delivered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=943, help="simulated SuperNodes (ml-100k per-user: 943)")
    parser.add_argument("--messages", type=int, default=94, help="messages in flight, one per node")
    parser.add_argument("--passes", type=int, default=15, help="timed steady-state passes of each")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    assert speed_up_in_memory_link_state(FastLinkState), "fast path not installed on this Flower"
    states = {name: build(args.nodes, args.messages, name == "fast path") for name in ("flower", "fast path")}
    first = {}
    for name, (state, node_ids) in states.items():  # the pass that delivers every message
        *first[name], delivered = one_pass(state, node_ids)
        assert delivered == args.messages, (name, delivered)
    steady: dict[str, list[tuple[float, float]]] = {name: [] for name in states}
    for _ in range(args.passes):  # then, as while clients train: all delivered, none answered yet
        for name, (state, node_ids) in states.items():
            *seconds, delivered = one_pass(state, node_ids)
            assert delivered == 0, (name, delivered)
            steady[name].append(tuple(seconds))
    result = {"flower version": flwr.__version__, "nodes": args.nodes, "messages in flight": args.messages,
              "passes": args.passes}
    for name in states:
        cpu_ms, wall_ms = (1000 * statistics.median(t[i] for t in steady[name]) for i in (0, 1))
        result[name] = {"delivering pass CPU ms": round(1000 * first[name][0], 2),
                        "median pass CPU ms": round(cpu_ms, 3), "median pass wall ms": round(wall_ms, 3),
                        "share of a core": round(cpu_ms / (cpu_ms + 1000 * DISPATCH_INTERVAL_S), 4)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
