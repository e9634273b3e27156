"""One DP-FedAvg round through Flower's SecAgg+ (`secure-aggregation = true`).

Flower 1.42 ships SecAgg+ for its legacy strategy API only: `SecAggPlusWorkflow` runs the
protocol's four stages over a `LegacyContext` and hands a legacy `Strategy` the weighted
mean of the survivors' vectors. This module drives it once per round from our own loop:
`_Cohort` is the smallest legacy strategy that offers the workflow our Poisson sample and
keeps what it aggregates; nothing else of the legacy API is used.

What the server holds: the sum, over the n clients that survive the protocol, of each one's
clipped update plus its noise share (client/secure_update.py), never one client's vector.
The sum carries the accounted noise when n >= m (`secagg-min-clients`): with fewer than m
masked vectors the round halts before unmasking and releases nothing. The server tops the
noise up to that of a cohort cap n_max and runs no round whose sample exceeds it, so the
released noise does not reveal n (shared_model/dp_aggregation.py's cohort_cap). Parameters: SecAgg+
neighbourhoods of 2 ceil(log2 n) + 1 clients with a threshold of a third, weight 1
(max_weight 1: no precision lost to weights), clipping range S + 8 sigma per coordinate
(beyond it the quantiser would clip), quantisation range T with N T < 2^32 for a population
of N (no cohort can wrap the modulus).

Security: Flower's SecAgg+ has no consistency check: it protects against an
honest-but-curious server (docs/privacy.md). Its masks come from 32-bit seeds, which such a
server can search: both sides use masks from the whole key instead, and send masked vectors
in 4 bytes a coordinate where Flower uses 8 (shared_model/secagg_patches.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from shared_model import secagg_patches
from shared_model.dp_aggregation import (MODULUS, NAMES_KEY, clipping_range, cohort_cap, flat_vector,
                                         reconstruction_threshold, top_up_std, unflattened)
from shared_model.settings import RunSettings


def quantization_range(population: int) -> int:
    """T = 2^32 / 2^ceil(log2(N + 1)): the sum of any cohort's quantised values (each at
    most T) stays below the modulus."""
    return MODULUS >> max(1, math.ceil(math.log2(population + 1)))


def neighbourhood(cohort: int) -> int:
    """SecAgg+'s neighbourhood k: each client with the 2 ceil(log2 n) clients around it on a
    shuffled ring (the whole cohort when smaller).
    A full graph costs each client n Shamir shares and the server n reconstructions from
    n / 2 shares each: 31 s a round at 50 clients on 2 cores, against 1.1 s unsecured."""
    return min(cohort, 2 * math.ceil(math.log2(max(cohort, 2))) + 1)


class _Cohort(Strategy):
    """The legacy strategy SecAggPlusWorkflow calls: the round's sample in, the sum out."""

    def __init__(self, nodes: list[int], grid: Grid, config: dict):
        self.nodes, self.grid, self.config = nodes, grid, config
        self.mean: list[np.ndarray] | None = None
        self.survivors = 0

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        run_id = self.grid.run.run_id
        return [(GridClientProxy(node, self.grid, run_id), FitIns(parameters, dict(self.config)))
                for node in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
                      ) -> tuple[Parameters | None, dict]:
        if results:  # every result holds the same aggregate: the survivors' mean
            self.mean, self.survivors = parameters_to_ndarrays(results[0][1].parameters), len(results)
        return None, {}  # the workflow writes nothing back: our loop steps the model

    def initialize_parameters(self, client_manager) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


def connected(nodes: set[int], neighbours: dict[int, set[int]]) -> bool:
    """Whether the nodes' neighbour graph, restricted to them, is one piece. Unmasking
    reveals the sum of each piece (no pairwise mask joins it to the rest), so two pieces
    would give the server two partial sums."""
    seen, todo = set(), [next(iter(nodes))] if nodes else []
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(neighbours[node] & nodes - seen)
    return seen == set(nodes)


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, except that
    - it halts before unmasking unless at least `min_survivors` sent a masked vector and
      their neighbour graph is connected (the reconstruction threshold bounds each
      neighbourhood, not the round; after dropouts that cut the ring, unmasking would
      reveal the sum of each arc: an attacker's review of this code rebuilt two 10-client
      arc sums of a 20-survivor round with m = 20);
    - a client lost before it handed out its key shares (stages 0 and 1) leaves the round
      instead of breaking it. Flower 1.42 keeps such a node among the sampled ones and, at
      unmasking, asks every survivor for its share of a key the node never shared: each
      survivor fails and the round halts (tests/test_secure_aggregation.py measures it). No
      client derived a mask with such a node (masks are made with the nodes whose shares
      arrived), so the round goes on with the others;
    - it reconstructs each secret from the threshold's number of shares, not all it holds
      (shared_model/secagg_patches.py)."""

    def __init__(self, min_survivors: int, **kwargs):
        super().__init__(**kwargs)
        self.min_survivors = min_survivors

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state) -> bool:
        return (super().collect_masked_vectors_stage(grid, context, state)
                and len(state.active_node_ids) >= self.min_survivors
                and connected(state.active_node_ids, state.nid_to_neighbours))

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state) -> bool:
        if not super().share_keys_stage(grid, context, state):
            return False
        alive = set(state.active_node_ids)
        state.sampled_node_ids = alive
        state.nid_to_neighbours = {nid: nbrs & alive for nid, nbrs in state.nid_to_neighbours.items() if nid in alive}
        log(INFO, "SecAgg+: %d clients handed out their key shares; they train and send masked vectors", len(alive))
        return True

    def unmask_stage(self, grid: Grid, context: LegacyContext, state) -> bool:
        with secagg_patches.threshold_of_the_round(state.threshold):  # each secret from that many shares
            return super().unmask_stage(grid, context, state)


class _RecordingGrid:
    """The grid, with each stage's replies kept (the round's statistics read stage 2's)."""

    def __init__(self, grid: Grid):
        self.grid, self.replies = grid, []

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.append(replies)
        return replies


CAP_TAIL_SHARE = 1e-3  # of delta, over the run's rounds: what the cohort caps' tails may spend


def tail_target(settings: RunSettings) -> float:
    """What each edge of a round's cohort cap may cost (dp_aggregation.cohort_cap): a
    thousandth of delta over the run's rounds."""
    return CAP_TAIL_SHARE * settings.dp_delta / settings.num_server_rounds


class SecureAggregation:
    """DP-FedAvg's sum through SecAgg+, one round at a time."""

    def __init__(self, context: Context, settings: RunSettings, population: int):
        self.context, self.min_clients, self.timeout = context, settings.secagg_min_clients, settings.round_timeout
        self.noise, self.clip = settings.server_dp_noise, settings.server_dp_clip
        self.cap, self.cap_tail = cohort_cap(population, settings.server_dp_sample_rate, self.min_clients,
                                             tail_target(settings))
        self.clipping_range = clipping_range(settings)
        self.quantization_range = quantization_range(population)
        secagg_patches.install()  # masks from the whole key, masked vectors as uint32: as the clients
        self.workflow: Callable[..., SecAggPlusWorkflow] = functools.partial(_SecAggPlus, self.min_clients)

    def runs(self, sampled: int) -> bool:
        """Whether a round with this sample runs: m could survive, and it is within the cap."""
        return self.min_clients <= sampled <= self.cap

    def top_up_std(self, survivors: int) -> float:
        """The server's noise on the survivors' sum: up to the cap's variance, cap / m (z S)^2."""
        return top_up_std(self.cap, survivors, self.noise, self.clip, self.min_clients)

    def summed(self, grid: Grid, server_round: int, nodes: list[int], arrays: dict[str, np.ndarray]
               ) -> tuple[dict[str, np.ndarray] | None, list[Message], dict[int, int]]:
        """(the sum of the survivors' vectors, None when fewer than m survived or the
        protocol halted; the replies of the stage that carried the masked vectors; the
        bytes each node sent over all the protocol's stages)."""
        names = list(arrays)
        cohort = _Cohort(nodes, grid, {"server-round": server_round, NAMES_KEY: ",".join(names)})
        legacy = LegacyContext(self.context, strategy=cohort, client_manager=SimpleClientManager())
        legacy.state.config_records["config"] = ConfigRecord({"current_round": server_round})
        legacy.state.array_records["parameters"] = ArrayRecord({"0": Array(flat_vector(arrays))})
        recording = _RecordingGrid(grid)
        shares = neighbourhood(len(nodes))
        protocol = {"num_shares": 1.0 if shares >= len(nodes) else shares,
                    "reconstruction_threshold": reconstruction_threshold(shares),
                    "max_weight": 1.0, "clipping_range": self.clipping_range,
                    "quantization_range": self.quantization_range, "modulus_range": MODULUS, "timeout": self.timeout}
        self.workflow(**protocol)(recording, legacy)
        masked = recording.replies[2] if len(recording.replies) > 2 else []
        sent: dict[int, int] = {}
        for reply in (r for stage in recording.replies for r in stage if not r.has_error()):
            sent[reply.metadata.src_node_id] = sent.get(reply.metadata.src_node_id, 0) + payload_bytes(reply)
        if cohort.mean is None or cohort.survivors < self.min_clients:
            return None, masked, sent
        mean = unflattened(cohort.mean[0].astype(np.float64), {k: v.shape for k, v in arrays.items()})
        total = {k: v * cohort.survivors for k, v in mean.items()}
        return total, masked, sent


def payload_bytes(reply: Message) -> int:
    """A protocol reply's payload (keys, encrypted shares, the masked vector, key shares),
    without the message's framing: bytes and strings by length, numbers 8 bytes each."""
    def size(value) -> int:
        if isinstance(value, (bytes, str)):
            return len(value)
        return sum(size(v) for v in value) if isinstance(value, list) else 8
    return sum(size(v) for record in reply.content.config_records.values() for v in record.values())
