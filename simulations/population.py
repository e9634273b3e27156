"""A federation of one-user clients in one process: user-level DP-FedAvg, or (not private)
FedAdam over a sample of clients a round.

`flwr run` with one SuperNode per user costs tens of milliseconds per client and round on
2 cores (docs/benchmarks.md); a cohort of thousands a round takes minutes. This driver
runs the same computation without Flower's messages and processes:
- the server's own strategy objects (`make_strategy`): DPFedAvg's Poisson sampling and
  noise from fresh randomness, its clipped sum and noisy average (shared_model/dp_aggregation.py)
  and SeededFedAdam's step; the round's privacy ledger entry and epsilon (`record_privacy`);
  without server DP, SeededFedAdam's seeded sample of clients-per-round and the clients'
  models weighted by their training positions, as Flower's FedAvg weighs the replies;
- the evaluation on the held-out split (what a private run's server evaluates, and, with
  fraction-evaluate = 1, what a non-private run's clients evaluate and sum); the run folder,
  metrics, the best model by validation (a non-private run's) and the summary;
- each sampled client's `train_local`, vectorised over clients (shared_model.vectorised_training)
  with the seed its ClientApp would use, on the data its partition holds.
tests/test_population.py shows it computes what a `flwr run` computes. Its summary.json says
`"path": "in-process (simulations.population)"`.

    python -m simulations.population --run-config "partitioning=per-user dp=none server-dp=true \
        id-embeddings=false synthetic-users=100000 server-dp-sample-rate=0.01 num-server-rounds=50"
    python -m simulations.population --run-config "dataset=ml-100k partitioning=per-user dp=none \
        clients-per-round=94 local-steps=0 num-server-rounds=100 eval-every=10"    # NOT private

Only the configurations it replicates are accepted: dp = "none", partitioning = "per-user",
fp32 uploads, no secure aggregation, and without server-dp fraction-evaluate = 1 (the run
config's other keys mean what they mean for `flwr run`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import round_seed, simulated_failure
from shared_model.dp_aggregation import add_into, clipped_sum, stacked_updates
from server.run_folder import RunFolder
from server.server_app import (ServerSideEvaluation, array_record, evaluation_rounds, finish, is_private, kept_best,
                               make_strategy, progress_line, record_privacy, server_evaluation, starting_model)
from shared_model.cli_options import positive_int
from shared_model.fresh_randomness import fresh_numpy_generator
from shared_model.settings import RunSettings, SettingsError
from shared_model.splits import leave_one_out
from shared_model.training import training_positions
from shared_model.vectorised_training import client_batches, train_clients
from simulations.flower_runner import app_run_config, parse_overrides

PATH = "in-process (simulations.population)"
CLIENT_ITEMS = 256_000  # clients trained at once x catalog items: their logits bound the memory


def default_chunk(n_items: int) -> int:
    """Clients trained at once: 256 over 1,000 items, 25 over 10,000 (256 clients over
    10,000 items took 14.5 GB, 32 took 5 GB and ran faster)."""
    return max(1, min(256, CLIENT_ITEMS // n_items))


def check_replicable(settings: RunSettings) -> None:
    """The configuration this driver computes as `flwr run` does, or a SettingsError."""
    for key, value, wanted in (("dp", settings.dp, "none"),
                               ("partitioning", settings.partitioning, "per-user"),
                               ("secure-aggregation", settings.secure_aggregation, False),
                               ("upload-precision", settings.upload_precision, "fp32")):
        if value != wanted:
            raise SettingsError(f"run config '{key}' must be {json.dumps(wanted)} for the in-process population driver "
                                f"(one-user clients), not {json.dumps(value)}")
    if not settings.server_dp and settings.fraction_evaluate != 1.0:
        raise SettingsError("run config 'fraction-evaluate' must be 1 for the in-process population driver without "
                            f"server-dp (it evaluates every user's held-out items), not {settings.fraction_evaluate}")


def refuse_unsupported(settings: RunSettings, device: str) -> None:
    """SettingsError for what the in-process driver cannot run as `flwr run` would."""
    check_replicable(settings)
    if device != "cpu" and settings.model.lora_layers:
        raise SettingsError(f"device {device!r}: the in-process driver runs lora-layers > 0 on the CPU only")


class Population:
    """The federation's server strategy, its model and every client's training data."""

    def __init__(self, settings: RunSettings, chunk: int | None = None,
                 randomness: Callable[[], np.random.Generator] = fresh_numpy_generator, device: str = "cpu",
                 folder: RunFolder | None = None):
        """chunk: clients trained at once (None: `default_chunk` of the catalog);
        randomness: DPFedAvg's sampling and noise, OS entropy (a test may replay a round);
        device: where the clients' training and the server's evaluation run (a GPU: the
        strategy's aggregation and noise stay on the CPU, in numpy, as in `flwr run`);
        folder: the run's, where a public pretraining says what it did."""
        refuse_unsupported(settings, device)
        # the strategy hands FedAdam its step as a Flower Message, made inside a server task:
        # this process stands in for the ServerApp's runtime, which names the task
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        split = leave_one_out(settings.load_dataset())
        self.split, self.train = split, split.train  # client u's data: user u's train split
        self.settings, self.chunk = settings, chunk or default_chunk(split.n_items)
        self.model = starting_model(settings, folder=folder).to(device)  # initialised on the CPU: the same start anywhere
        keys = {u: u for u in range(len(self.train))}  # node id = sampling key = partition id = user
        self.optimizer, self.strategy = make_strategy(settings, keys, randomness)

    def initial_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in self.model.trainable_state().items()}

    def client_models(self, server_round: int, arrays: dict[str, np.ndarray],
                      users: list[int]) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
        """The sampled clients' models after their local training, a chunk of clients at a
        time: (the chunk's users, their models [K, ...] per name); clients with batches of
        like shape share a chunk (a chunk is padded to its largest: a few long histories
        would make every client's batch several chunks wide)."""
        s = self.settings
        params = self.model.trainable_parameters()  # a client copies the global arrays into these (fp32)
        start = {k: torch.from_numpy(v).to(params[k].device, params[k].dtype) for k, v in arrays.items()}
        epochs = s.local_epochs_in(server_round)
        work = [(u, client_batches(self.model, [self.train[u]], round_seed(s, server_round, u, 0), epochs,
                                   s.batch_size, s.local_steps)) for u in users]
        work.sort(key=lambda w: (len(w[1]), *(tuple(w[1][0][0].shape) if w[1] else ())))
        for first in range(0, len(work), self.chunk):
            chunk = work[first:first + self.chunk]
            trained = train_clients(self.model, start, [batches for _, batches in chunk], s.learning_rate)
            yield [u for u, _ in chunk], {k: v.cpu().numpy() for k, v in trained.items()}

    def clipped_total(self, server_round: int, arrays: dict[str, np.ndarray]
                      ) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
        """A round's Poisson sample trained: (the sum of its clipped updates, their norms
        before clipping, client counts)."""
        trained, counts = self.survivors(server_round, self.strategy.begin_round(array_record(arrays)))
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in arrays.items()}
        norms = [np.zeros(0)]
        for _, models in self.client_models(server_round, arrays, trained):
            part, chunk_norms = clipped_sum(stacked_updates(arrays, models), self.strategy.clip)
            add_into(total, part)
            norms.append(chunk_norms)
        return total, np.concatenate(norms), counts

    def survivors(self, server_round: int, sampled: list[int]) -> tuple[list[int], dict]:
        """(the sampled clients that do not fail this round on purpose, the round's client counts)."""
        trained = [u for u in sampled if not simulated_failure(self.settings, server_round, u)]
        return trained, {"clients": len(sampled), "errors": len(sampled) - len(trained)}

    def train_round(self, server_round: int, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
        """One round: (the new global arrays, the round's client counts and, under server DP,
        DPFedAvg's release figures: clip, noise split)."""
        if not self.settings.server_dp:
            return self.fedadam_round(server_round, arrays)
        total, norms, counts = self.clipped_total(server_round, arrays)
        stepped, release = self.strategy.aggregate_clipped(server_round, total, norms)
        return {k: a.numpy() for k, a in stepped.items()}, counts | release

    def fedadam_round(self, server_round: int, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
        """A non-private round: (FedAdam's step towards `weighted_average`, client counts)."""
        average, counts = self.weighted_average(server_round, arrays)
        if average is None:
            return arrays, counts
        self.strategy.set_current(array_record(arrays))
        return {k: a.numpy() for k, a in self.strategy.step_to(server_round, average).items()}, counts

    def weighted_average(self, server_round: int, arrays: dict[str, np.ndarray]
                         ) -> tuple[dict[str, np.ndarray] | None, dict]:
        """SeededFedAdam's sample trained: (the models' average weighted by each client's
        training positions, its ClientApp's "weight"; None if no client trained), client counts."""
        trained, counts = self.survivors(server_round,
                                         self.strategy.sample(server_round, self.strategy.clients_per_round))
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in arrays.items()}
        weight = 0.0
        for users, models in self.client_models(server_round, arrays, trained):
            weights = np.array([training_positions([self.train[u]]) for u in users], dtype=np.float64)
            add_into(total, {k: np.tensordot(weights, v, axes=1) for k, v in models.items()})
            weight += weights.sum()
        if not weight:
            return None, counts
        return {k: (t / weight).astype(arrays[k].dtype) for k, t in total.items()}, counts


def run(settings: RunSettings, chunk: int | None = None, noise_free: bool = False, device: str = "cpu") -> RunFolder:
    """The whole federation; writes the run folder as the ServerApp does (metrics, ledger,
    adapters, plot, summary), without checkpoints (an in-process run does not resume).
    noise_free: the same federation with the noise left out (sampling and clipping kept):
    a benchmark's reference for what the noise costs, NOT private: nothing is accounted,
    and its summary's path says so. No run config reaches it. device: see `Population`."""
    session_started = time.time()
    if noise_free and not settings.server_dp:
        raise SettingsError("noise-free: the reference of a server-dp run; this run adds no noise (server-dp = false)")
    refuse_unsupported(settings, device)  # before the run folder is made: a refused run leaves none
    folder = RunFolder.open(settings)
    if folder.metrics_path.exists():
        raise SettingsError(f"{folder.path} holds a run already: the in-process driver does not resume; "
                            "choose another run-name")
    population = Population(settings, chunk, device=device, folder=folder)
    if noise_free:
        population.strategy.update_noise = 0.0
    evaluate = held_out_evaluation(settings, population)
    eval_rounds = evaluation_rounds(settings)
    arrays = population.initial_arrays()
    folder.append_metrics({"round": 0, **evaluate(arrays)})
    upload = population.model.trainable_bytes()
    server_entries: list = []
    best, best_arrays = {"round": 0, "valid NDCG@10": -1.0}, arrays
    for server_round in range(1, settings.num_server_rounds + 1):
        started = time.time()
        arrays, counts = population.train_round(server_round, arrays)  # with DPFedAvg's RELEASE_KEYS
        line = {"round": server_round, **counts, "left out": counts["errors"], "timeouts": 0, "declined": 0,
                "train loss": float("nan"), "upload bytes per client": float(upload), "upload bytes max": upload,
                "server lr": population.optimizer.eta, "train seconds": time.time() - started}
        if server_round in eval_rounds:
            line.update(evaluate(arrays))
        if settings.server_dp and not noise_free:
            line.update(record_privacy(folder, settings, server_round, [], server_entries, line))
        line["seconds"] = time.time() - started
        folder.append_metrics(line)
        best, best_arrays = kept_best(settings, best, best_arrays, line, arrays)
        print(progress_line(settings, line, best), flush=True)
    finish(folder, settings, population.model, arrays, best_arrays, best, len(population.train), session_started,
           path=f"{PATH} on {machine(device)}" + (", noise-free reference: NOT private" if noise_free else "")
           + ("" if is_private(settings) else ", not private"))
    return folder


def held_out_evaluation(settings: RunSettings, population: Population) -> Callable[[dict[str, np.ndarray]], dict]:
    """The evaluation a `flwr run` of these settings records: the server's on the held-out
    split (private), or every client's on its own held-out items, summed (not private,
    fraction-evaluate = 1): the same metrics over the same users."""
    if is_private(settings):
        return server_evaluation(settings, population.model, simulation=True)
    return ServerSideEvaluation(population.split, population.model, prefix="")


def machine(device: str) -> str:
    """The hardware a run's figures come from (a summary's path, a benchmark's JSON)."""
    cores = f"{os.cpu_count()} CPU cores"
    if device == "cpu":
        return f"{cores}, {'GPU unused' if torch.cuda.is_available() else 'no GPU'}"
    return f"{torch.cuda.get_device_name(device)} GPU ({device}), {cores}"


def checked_device(text: str) -> str:
    """--device: 'cpu', or a CUDA device this machine has."""
    if text != "cpu" and not (text.split(":")[0] == "cuda" and torch.cuda.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: 'cpu', or 'cuda' / 'cuda:N' on a machine with a CUDA GPU "
                                         f"(this one has {'one' if torch.cuda.is_available() else 'none'})")
    return text


def add_driver_options(parser: argparse.ArgumentParser) -> None:
    """--chunk and --device, as every command that runs this driver takes them."""
    parser.add_argument("--device", type=checked_device, default="cpu",
                        help="where the clients' training and the evaluation run: 'cpu' (default) or 'cuda' (the "
                             "server's aggregation and noise stay in numpy on the CPU; lora-layers = 0 only)")
    parser.add_argument("--chunk", type=positive_int, default=None,
                        help="clients trained at once (default: 256,000 / catalog items, at most 256: 25 over the "
                             "100,000-user world's 10,000 items); memory grows with it and with the catalog: 256 "
                             "clients over 10,000 items took 14.5 GB, 32 took 5 GB and ran faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="", metavar="'KEY=VALUE ...'",
                        help="overrides of pyproject.toml's [tool.flwr.app.config], as `flwr run --run-config` "
                             "takes them")
    add_driver_options(parser)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--noise-free", action="store_true",
                        help="a benchmark's reference: the same federation with the noise left out (sampling and "
                             "clipping kept), NOT private: no ledger, and its summary says so")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        settings = RunSettings.from_run_config(app_run_config(**parse_overrides(shlex.split(args.run_config))))
        folder = run(settings, args.chunk, noise_free=args.noise_free, device=args.device)
    except (KeyError, SettingsError) as error:
        parser.error(f"--run-config: {error}")
    print(f"results in {folder.path}")


if __name__ == "__main__":
    main()
