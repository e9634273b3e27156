"""The Flower ServerApp: FedAdam over the adapters (wrapped by DP-FedAvg under server DP)
runs the rounds with its `start`; after each round its `evaluate_fn` (`RoundRecord`)
evaluates on the server where that is allowed and writes the run folder: per-round
metrics, the privacy ledger and the checkpoint a resumed run starts from; at the end,
adapters, plots and a summary.

Under a private mode (client DP-SGD or server DP-FedAvg) clients never evaluate: their
ranking sums would be releases no epsilon covers. A simulation then evaluates on the
server, over the held-out split (the experimenter's view, not a release of the
federation), and the final model is the one kept: no round is picked on those numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from server.adaptive_clip import AdaptiveClip
from server.plots import plot_rounds
from server.public_pretraining import pretrain_on_public_users
from server.run_folder import Checkpoint, RunFolder
from server.secure_aggregation import SecureAggregation
from server.simulation_speedup import speed_up_in_memory_link_state
from server.dp_ftrl import DPFTRL
from server.dp_strategy import DPFedAvg
from server.strategy import STAGES, RoundStats, SeededFedAdam
from shared_model.fresh_randomness import fresh_numpy_generator
from shared_model.ledger import LedgerEntry, accountant_delta, events_of, read_ledger
from shared_model.metrics import item_counts, metrics_from_sums, ranking_sums
from shared_model.privacy import RELATION, epsilon, server_epsilon, tree_steps
from shared_model.recommender import Recommender, build_recommender, score_catalog
from shared_model.settings import RunSettings, SettingsError
from shared_model.splits import LeaveOneOut, leave_one_out
from shared_model.training import TrainConfig

app = ServerApp()


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


QUERY_BATCH = 1000  # nodes asked at once by the start-up query


def sampling_keys(grid: Grid, timeout: float, retry_every: float = 10.0, batch: int = QUERY_BATCH) -> dict[int, int]:
    """Ask every connected node for its stable sampling key, `batch` nodes at a time (each
    batch waits up to `timeout`). A node that answers with an error (still cleaning up after
    a stopped run, briefly offline) is asked again while the SuperLink still lists it online,
    until `timeout` after the first pass; every error is logged. Why batches: each 0.1 s poll
    of Flower's in-memory link state (1.41, 1.42) re-validates every awaited message under
    the state's lock, so 100,000 queries in flight at once had not all been answered after 8
    minutes of a simulation's start (2 busy cores); a batch bounds that work."""
    deadline: float | None = None
    node_ids = list(grid.get_node_ids())
    while not node_ids:
        log(INFO, "fedrec: waiting for SuperNodes to connect")
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    keys: dict[int, int] = {}
    asked = set(node_ids)
    while True:
        waiting = [n for n in node_ids if n not in keys]
        for start in range(0, len(waiting), batch):
            messages = [Message(RecordDict({"query": ConfigRecord({"ask": "sampling-key"})}), dst_node_id=n,
                                message_type=MessageType.QUERY) for n in waiting[start : start + batch]]
            wait = timeout if deadline is None else max(1.0, deadline - time.time())
            for reply in grid.send_and_receive(messages, timeout=wait):
                if reply.has_error():
                    log(WARNING, "fedrec: start-up query: error %s (%s)", reply.error.code, reply.error.reason)
                else:
                    keys[reply.metadata.src_node_id] = int(reply.content["info"]["sampling-key"])
            if len(waiting) > batch:
                log(INFO, "fedrec: start-up query: %d of %d nodes answered", len(keys), len(asked))
        deadline = deadline or time.time() + timeout
        online = set(grid.get_node_ids())
        node_ids = [n for n in node_ids if n in online]  # nodes gone offline are not asked again
        if all(n in keys for n in node_ids) or time.time() + retry_every >= deadline:
            break
        time.sleep(retry_every)
    if len(keys) < len(asked):
        log(WARNING, "fedrec: %d of %d nodes did not answer and are left out", len(asked) - len(keys), len(asked))
    if not keys:
        raise RuntimeError("no SuperNode answered the start-up query")
    return keys


class ServerSideEvaluation:
    """Simulation only: the same metrics over the whole held-out split, on the server, in
    slices of users (a 100,000-user split scored at once would hold 4 GB of scores a stage
    for a 10,000-item catalog, and several masks as large); popularity: the split's
    training interactions."""

    SLICE = 4096  # users scored at once

    def __init__(self, split: LeaveOneOut, model: Recommender, prefix: str):
        self.model, self.prefix = model, prefix
        users = np.arange(split.n_users)
        self.cases = {stage: [split.cases(stage, users[start : start + self.SLICE])
                              for start in range(0, split.n_users, self.SLICE)] for stage in STAGES}
        self.popularity = item_counts(split.train, split.n_items)

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        self.model.load_trainable_state({k: torch.from_numpy(v) for k, v in arrays.items()})
        self.model.eval()
        with torch.no_grad():
            catalog = self.model.catalog_vectors()
        out = {}
        for stage, slices in self.cases.items():
            sums = [ranking_sums(score_catalog(self.model, cases.histories, catalog=catalog), cases) for cases in slices]
            metrics = metrics_from_sums(functools.reduce(operator.add, sums), self.popularity)
            out.update({f"{self.prefix}{stage} {k}": v for k, v in metrics.items()})
        return out


def evaluation_rounds(settings: RunSettings) -> set[int]:
    """The rounds whose model is evaluated: the start, every eval-every rounds and the last."""
    last = settings.num_server_rounds
    return {0, last, *range(settings.eval_every, last + 1, settings.eval_every)}


def make_strategy(settings: RunSettings, keys: dict[int, int],
                  randomness: Callable[[], np.random.Generator] = fresh_numpy_generator
                  ) -> tuple[SeededFedAdam, SeededFedAdam | DPFedAvg]:
    """(the server optimiser, the strategy that runs the rounds: it, or DP-FedAvg around it).
    Clients evaluate only in a non-private run. randomness: DP-FedAvg's sampling and noise
    (OS entropy; a test may pass a seeded generator to replay a round)."""
    optimizer = SeededFedAdam(keys, settings.clients_per_round, settings.seed, settings.server_learning_rate,
                              settings.server_lr_half_life,
                              eval_rounds=() if is_private(settings) else evaluation_rounds(settings),
                              fraction_evaluate=settings.fraction_evaluate, accounted_only=settings.dp != "none")
    if settings.server_dp:
        adaptive = AdaptiveClip(settings.server_dp_target_quantile, settings.server_dp_clip_learning_rate,
                                settings.server_dp_count_noise) if settings.server_dp_adaptive_clip else None
        if settings.server_dp_mechanism == "dp-ftrl":
            return optimizer, DPFTRL(optimizer, settings.server_dp_noise, settings.server_dp_clip,
                                     settings.clients_per_round, settings.dp_ftrl_learning_rate,
                                     settings.dp_ftrl_momentum, settings.dp_ftrl_step, settings.dp_ftrl_noise,
                                     randomness)
        return optimizer, DPFedAvg(optimizer, settings.server_dp_noise, settings.server_dp_clip,
                                   settings.server_dp_sample_rate, adaptive, randomness)
    return optimizer, optimizer


def resume(checkpoint: Checkpoint, optimizer: SeededFedAdam, strategy: SeededFedAdam | DPFedAvg) -> None:
    """Restore what the rounds carry over: FedAdam's state and DP-FedAvg's (adaptive) clip."""
    optimizer.load_optimizer_state(checkpoint.optimizer)
    if isinstance(strategy, DPFedAvg) and checkpoint.dp_clip is not None:
        strategy.clip = checkpoint.dp_clip


def is_private(settings: RunSettings) -> bool:
    return settings.dp != "none" or settings.server_dp


def record_privacy(folder: RunFolder, settings: RunSettings, server_round: int, received: list[LedgerEntry],
                   server_entries: list[LedgerEntry], release: Mapping[str, float]) -> dict:
    """Write the clients' ledger entries and the round's DP-FedAvg entry (its epsilon
    computed here, over every aggregation so far: `server_entries`, extended in place; its
    clip and, with adaptive clipping, the noise split, or under secure aggregation the cohort
    cap, from `release`: the round's metrics line, which holds DPFedAvg's release figures)
    to the server's ledger; return the round's privacy figures for the metrics line."""
    out: dict = {}
    entries = [dataclasses.replace(entry, run=folder.path.name) for entry in received]
    if entries:
        out["client epsilon max"] = max(e.epsilon for e in entries)
    if settings.server_dp:
        adaptive = {"update_noise_multiplier": release["update noise multiplier"],
                    "count_noise": release["count noise"]} if "count noise" in release else {}
        if "tree round" in release:  # DP-FTRL: no sampling, the steps its tree's depth grew by (or the factorization's)
            tree = int(release["tree round"])
            spend = {"sample_rate": 1.0, "steps": tree_steps(tree), "tree_round": tree,
                     "population": int(release["population"]), "cohort": int(release["cohort"])}
            if settings.dp_ftrl_noise == "square-root":  # one step of noise z / f_{t-1} (LedgerEntry.step)
                spend.update(steps=1, ftrl_noise="square-root")
        else:
            spend = {"sample_rate": settings.server_dp_sample_rate, "steps": 1}
        entry = LedgerEntry(client="server", round=server_round, status="aggregated", unit="user",
                            noise_multiplier=settings.server_dp_noise, **spend, delta=settings.dp_delta,
                            accountant=settings.dp_accountant, epsilon=0.0, run=folder.path.name, clip=release["clip"],
                            **adaptive, **secure_fields(settings, release))
        server_entries.append(entry)
        eps = epsilon(events_of(server_entries), accountant_delta(server_entries), settings.dp_accountant)
        server_entries[-1] = entry = dataclasses.replace(entry, epsilon=eps)
        entries.append(entry)
        out["user epsilon"] = eps
    folder.append_ledger(entries)
    return out


def secure_fields(settings: RunSettings, release: Mapping[str, float]) -> dict:
    """A secure round's ledger fields: m, the cohort cap, its tail and the population."""
    if not settings.secure_aggregation:
        return {}
    return {"min_survivors": settings.secagg_min_clients,
            "cohort_cap": int(release["cohort cap"]), "cap_tail": float(release["cap tail"]),
            "population": int(release["population"])}


AGAINST = {"dp-sgd": "the server, other clients and anyone who sees the model",
           "dp-fedavg": "other clients and anyone who sees the model (not the server: it sees each update)",
           "dp-ftrl": "other clients and anyone who sees the model, with no sampling assumed (each client in at most "
                      "one round of a tree); not the server: it sees each update",
           "dp-fedavg+secagg": "other clients and anyone who sees the model (the server tops the noise up to a cohort "
                               "cap's, so it does not reveal how many took part); the server knows whom it sampled: "
                               "see 'against the server'"}


def privacy_summary(folder: RunFolder) -> dict:
    """Per guarantee: the largest epsilon spent, with its unit, delta, accountant, relation
    and adversary (from the ledger). Keyed by unit; DP-FedAvg's user-level guarantee is
    "user" unless local DP-SGD already gives one at that unit."""
    entries = read_ledger(folder.ledger_path)
    out: dict = {}
    for mechanism, mine in (("dp-sgd", [e for e in entries if e.client != "server"]),
                            ("dp-fedavg", [e for e in entries if e.client == "server"])):
        for unit in sorted({e.unit for e in mine}):
            of_unit = [e for e in mine if e.unit == unit]
            worst = max(of_unit, key=lambda e: e.epsilon)
            key = unit if unit not in out else f"{unit} (dp-fedavg)"
            secure = [e.min_survivors for e in of_unit if e.min_survivors is not None]
            shown = "dp-fedavg+secagg" if secure and len(secure) == len(of_unit) else mechanism  # every release
            if mechanism == "dp-fedavg" and all(e.tree_round is not None for e in of_unit):
                shown = "dp-ftrl"
            out[key] = {"epsilon": worst.epsilon, "delta": worst.delta, "accountant": worst.accountant,
                        "relation": RELATION, "mechanism": shown, "against": AGAINST[shown]}
            if shown == "dp-fedavg+secagg":
                out[key]["against the server"] = against_the_server(of_unit, min(secure))
            if mechanism == "dp-sgd":
                out[key].update(clients=len({e.client for e in of_unit}),
                                declined=sum(1 for e in of_unit if e.status == "declined"))
            if worst.interaction_epsilon is not None:
                out[key]["per interaction"] = {"epsilon": worst.interaction_epsilon, "delta": worst.delta,
                                               "window": worst.window}
    return out


def against_the_server(server: list[LedgerEntry], min_survivors: int) -> dict:
    """Secure aggregation's guarantee against an honest-but-curious server: it sees only
    SecAgg+ sums of at least m clients' noised updates, but it drew the sample, so no
    amplification (privacy.server_epsilon, from the server's entries: rounds, q, z)."""
    last = server[-1]
    eps, rounds = server_epsilon(last.noise_multiplier, last.sample_rate, len(server), last.delta, last.accountant)
    return {"epsilon": eps, "delta": last.delta, "rounds a user takes part in, at most": rounds,
            "adversary": f"an honest-but-curious server (it sees only SecAgg+ sums of at least {min_survivors} "
                         "clients' clipped, noised updates, and knows whom it sampled)"}


def privacy_line(settings: RunSettings, privacy: dict) -> str:
    if not is_private(settings):
        return ("fedrec: NOT PRIVATE (dp = \"none\", server-dp = false): the server saw every client's exact update, "
                "from which it can read which items each client's users touched")
    if not privacy:
        return "fedrec: privacy: nothing was spent (no client trained)"
    parts = [f"{unit}-level epsilon {p['epsilon']:.3g} at delta {p['delta']:g} ({p['accountant']}, {p['relation']}, "
             f"{p['mechanism']}, against {p['against']})" + (
                 f"; against {p['against the server']['adversary']}: epsilon {p['against the server']['epsilon']:.3g} "
                 f"at delta {p['delta']:g} ({p['accountant']}, {p['relation']}, no amplification)"
                 if "against the server" in p else "") for unit, p in privacy.items()]
    return "fedrec: privacy: " + "; ".join(parts)


def loss_text(loss: float) -> str:
    """The round's mean training loss, where clients report one (private clients do not: it
    would be an unaccounted release; the in-process driver does not compute it)."""
    return "train loss not reported" if math.isnan(loss) else f"train loss {loss:.4f}"


def progress_line(settings: RunSettings, line: dict, best: dict) -> str:
    text = (f"[round {line['round']}/{settings.num_server_rounds}] {line['clients'] - line['left out']}/"
            f"{line['clients']} clients ({line['left out']} left out: {line['errors']} errors, "
            f"{line['timeouts']} timeouts, {line['declined']} declined), {loss_text(line['train loss'])}, "
            f"upload {line['upload bytes per client'] / 1024:.1f} KB/client, {line['seconds']:.1f} s")
    for key in ("client epsilon max", "user epsilon"):
        if key in line:
            text += f", {key} {line[key]:.3f}"
    if "clip" in line:
        text += f", clip {line['clip']:.4g}"
    if "valid NDCG@10" in line:
        text += f" | valid NDCG@10 {line['valid NDCG@10']:.4f}, test NDCG@10 {line['test NDCG@10']:.4f}"
        if not is_private(settings):
            text += f" (best valid {best['valid NDCG@10']:.4f} at round {best['round']})"
    return text


def server_evaluation(settings: RunSettings, model: Recommender,
                      simulation: bool) -> Callable[[dict[str, np.ndarray]], dict] | None:
    """What the server itself evaluates on evaluation rounds: the held-out split in a
    private simulation (clients do not evaluate) or with server-eval, else nothing (a
    private deployment: the server holds no held-out data)."""
    if is_private(settings):
        if not simulation:
            log(INFO, "fedrec: private run: clients do not evaluate and the server has no held-out data")
            return None
        on_server = ServerSideEvaluation(leave_one_out(settings.load_dataset()), model, prefix="")
        return lambda arrays: {"evaluated on": "server (held-out split)", **on_server(arrays)}
    if not settings.server_eval:
        return None
    return ServerSideEvaluation(leave_one_out(settings.load_dataset()), model, prefix="server ")


class RoundRecord:
    """The strategy's `evaluate_fn`: after each round (and for the starting model) the
    server's evaluation, then the round's record: its metrics line, the privacy ledger,
    the best model so far and the checkpoint that a resumed run starts from."""

    def __init__(self, folder: RunFolder, settings: RunSettings, optimizer: SeededFedAdam,
                 strategy: SeededFedAdam | DPFedAvg, on_server: Callable[[dict[str, np.ndarray]], dict] | None,
                 checkpoint: Checkpoint | None, initial: dict[str, np.ndarray]):
        self.folder, self.settings, self.optimizer, self.strategy = folder, settings, optimizer, strategy
        self.on_server, self.eval_rounds = on_server, evaluation_rounds(settings)
        self.best, self.best_arrays = {"round": 0, "valid NDCG@10": -1.0}, initial
        if checkpoint is not None:
            self.best, self.best_arrays = checkpoint.best, checkpoint.best_arrays
        # DP-FedAvg's aggregations so far (a resumed run's included), read once, then kept here
        self.server_entries = [e for e in read_ledger(folder.ledger_path) if e.client == "server"]

    def __call__(self, server_round: int, record: ArrayRecord) -> MetricRecord | None:
        outcome, arrays = self.strategy.outcome, numpy_arrays(record)
        line: dict = {"round": server_round}
        if outcome.stats is not None:
            line.update(training_line(outcome.stats, outcome.train_metrics, self.optimizer.eta))
            # the round's spend reaches the ledger before anything else runs: a crash during the
            # evaluation must not leave a release (which the server has seen) unaccounted
            line.update(record_privacy(self.folder, self.settings, server_round, list(outcome.stats.entries.values()),
                                       self.server_entries, line))
        line.update(dict(outcome.evaluate_metrics or {}))
        on_server = self.on_server(arrays) if self.on_server and server_round in self.eval_rounds else {}
        line.update(on_server)
        if server_round == 0:  # where training starts from, for the plot and the record
            self.folder.append_metrics(line)
            if "valid NDCG@10" in line:
                log(INFO, "[round 0] valid NDCG@10 %.4f, test NDCG@10 %.4f before training",
                    line["valid NDCG@10"], line["test NDCG@10"])
        else:
            self.record_round(line, arrays, outcome.started)
        numbers = {k: float(v) for k, v in on_server.items() if not isinstance(v, str)}
        return MetricRecord(numbers) if numbers else None  # the server's own evaluation, for Flower's Result

    def record_round(self, line: dict, arrays: dict[str, np.ndarray], started: float) -> None:
        settings, server_round = self.settings, line["round"]
        self.best, self.best_arrays = kept_best(settings, self.best, self.best_arrays, line, arrays)
        line["seconds"] = time.time() - started
        self.folder.append_metrics(line)
        dp_clip = self.strategy.clip if isinstance(self.strategy, DPFedAvg) else None  # next round's (adaptive)
        self.folder.save_checkpoint(Checkpoint(server_round, arrays, self.best_arrays, self.optimizer.optimizer_state(),
                                               self.best, dp_clip))
        log(INFO, "%s", progress_line(settings, line, self.best))


def kept_best(settings: RunSettings, best: dict, best_arrays: dict[str, np.ndarray], line: dict,
              arrays: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """The model a run keeps as its best after a round's metrics line, and its record: the
    best by validation NDCG@10; in a private run the latest (no round is picked on the
    clients' data)."""
    if is_private(settings):
        return {"round": line["round"], "valid NDCG@10": line.get("valid NDCG@10", best["valid NDCG@10"]),
                "test": stage_metrics(line, "test")}, arrays
    if line.get("valid NDCG@10", -1.0) > best["valid NDCG@10"]:
        return {"round": line["round"], "valid NDCG@10": line["valid NDCG@10"], "test": stage_metrics(line, "test")}, arrays
    return best, best_arrays


RELEASE_KEYS = ("aggregated", "clip", "update noise multiplier", "count noise", "unclipped fraction",
                "cohort cap", "cap tail", "tree round", "population",
                "cohort")  # DP-FedAvg's, DP-FTRL's


def stage_metrics(line: dict, stage: str) -> dict:
    """One stage's metrics of a metrics line ('test AUC' -> 'AUC'); HR@10 and NDCG@10 are
    None if the line has no evaluation."""
    prefix = f"{stage} "
    return {"HR@10": None, "NDCG@10": None, **{k[len(prefix):]: v for k, v in line.items() if k.startswith(prefix)}}


def training_line(stats: RoundStats, metrics: MetricRecord | None, server_lr: float) -> dict:
    """The training part of a round's metrics line."""
    return {
        "clients": stats.sent, "left out": stats.left_out, "errors": stats.errors,
        "timeouts": stats.timeouts, "declined": stats.declined,
        "train loss": float(metrics["train-loss"]) if metrics and "train-loss" in metrics
        else float("nan"),  # private clients send none
        "upload bytes per client": float(np.mean(stats.upload_bytes)) if stats.upload_bytes else 0.0,
        "upload bytes max": int(max(stats.upload_bytes, default=0)),
        "server lr": server_lr,
    } | {k: float(metrics[k]) for k in RELEASE_KEYS if metrics and k in metrics}


def starting_model(settings: RunSettings, simulation: bool = True, pretrain: bool = True,
                   folder: RunFolder | None = None) -> Recommender:
    """The server's model over the public catalog, initialised from the run seed, then (with
    public-users, unless `pretrain` is off: a resumed run starts from its checkpoint)
    pretrained on the consenting users' data, which only a simulation's server holds; what
    the pretraining did goes to `folder` (for the summary)."""
    torch.manual_seed(settings.seed)
    model = build_recommender(settings.load_catalog().texts, settings.model, progress=False)
    if settings.public_users and pretrain:
        if not simulation:
            raise SettingsError("run config 'public-users' needs the consenting users' data on the server, which "
                                "only a simulation has: set it to 0 in a deployment")
        done = pretrain_on_public_users(model, settings)
        log(WARNING, "fedrec: pretrained on the data of %d of %d users who consented to give it (public-users = "
            "%g; kept epoch %d of %d, validation NDCG@10 %.4f on their held-out items): they are treated as public, "
            "no privacy guarantee covers them", done["users"], done["of"], settings.public_users, done["best epoch"],
            done["epochs"], done["best validation NDCG@10"])
        if folder is not None:
            folder.save_pretraining(done)
        if (warning := undoing_rate(settings)) is not None:
            log(WARNING, "fedrec: %s", warning)
    return model


def undoing_rate(settings: RunSettings) -> str | None:
    """Why FedAdam's rate may undo a public pretraining, if it may: Adam's first step moves
    every weight by about the rate (its first m / sqrt(v) is the update's sign)."""
    pretraining_rate = TrainConfig().lr
    if settings.server_dp and settings.server_dp_mechanism == "dp-ftrl" and settings.dp_ftrl_step == "ftrl":
        return None  # the FTRL step has its own rate
    if settings.server_learning_rate <= 2 * pretraining_rate:
        return None
    return (f"server-learning-rate {settings.server_learning_rate:g} is {settings.server_learning_rate / pretraining_rate:.0f}"
            f" times the pretraining's Adam rate ({pretraining_rate:g}): FedAdam's first steps move every weight by about"
            " the rate and may undo the pretraining (at 100,000 users one round at 0.04 took the start's test NDCG@10"
            f" from 0.1037 to 0.0520); a fine-tuning rate near {pretraining_rate:g} keeps it")


@app.main()
def main(grid: Grid, context: Context) -> None:
    session_started = time.time()
    simulation = isinstance(grid, InMemoryGrid)
    if simulation:  # the link state is in this process
        speed_up_in_memory_link_state()
    settings = RunSettings.from_run_config(context.run_config)
    folder = RunFolder.open(settings)
    log(INFO, "fedrec: run folder %s", folder.path)
    checkpoint = folder.load_checkpoint()
    model = starting_model(settings, simulation, pretrain=checkpoint is None, folder=folder)
    arrays = {k: v.numpy() for k, v in model.trainable_state().items()}
    if checkpoint is not None and simulation and settings.dp != "none":
        raise SettingsError(f"{folder.path}: a DP simulation keeps its clients' privacy ledgers in the simulation's "
                            "node state, which ended with it: resuming would give every client a fresh budget. "
                            "Start a new run (another run-name)")
    keys = sampling_keys(grid, settings.round_timeout)
    optimizer, strategy = make_strategy(settings, keys)
    strategy.upload_precision = settings.upload_precision
    if settings.secure_aggregation:  # make_strategy's DPFedAvg: the validated settings say server-dp
        strategy.secure = SecureAggregation(context, settings, len(keys))
    if not is_private(settings):
        log(WARNING, "%s", privacy_line(settings, {}))
    log(INFO, "fedrec: %d clients, %s a round, %d rounds, adapters %.1f KB", len(keys),
        (f"DP-FTRL {strategy.cohort}, each once a tree" if isinstance(strategy, DPFTRL) else
         f"Poisson q={settings.server_dp_sample_rate}") if settings.server_dp else optimizer.clients_per_round,
        settings.num_server_rounds, model.trainable_bytes() / 1024)
    record = RoundRecord(folder, settings, optimizer, strategy, server_evaluation(settings, model, simulation),
                         checkpoint, arrays)
    first_round = 1
    if checkpoint is not None:
        arrays, first_round = checkpoint.arrays, checkpoint.server_round + 1
        resume(checkpoint, optimizer, strategy)
        log(INFO, "fedrec: resuming %s after round %d", folder.path.name, checkpoint.server_round)
    folder.keep_metrics_up_to(first_round - 1)  # lines written after the last checkpoint are redone
    result = strategy.start(grid, array_record(arrays), settings.num_server_rounds, settings.round_timeout,
                            evaluate_fn=record, first_round=first_round)
    finish(folder, settings, model, numpy_arrays(result.arrays), record.best_arrays, record.best, len(keys),
           session_started)


def finish(folder: RunFolder, settings: RunSettings, model: Recommender, arrays: dict, best_arrays: dict,
           best: dict, n_clients: int, session_started: float, path: str = "flwr run") -> None:
    """Final and best adapters, the plot and summary.json; path: what ran the federation
    (`flwr run`, or simulations.population in-process)."""
    metrics = folder.metrics()
    config = model.config.to_dict()
    folder.save_adapters("final_adapters.safetensors", arrays, config)
    folder.save_adapters("best_adapters.safetensors", best_arrays, config)
    plot = plot_rounds(metrics, folder.path / "metrics.png", f"{settings.dataset}, {n_clients} clients")
    evaluated = [m for m in metrics if "test NDCG@10" in m]
    final = evaluated[-1] if evaluated else {}
    trained = [m for m in metrics if m["round"] > 0]
    uploads = [m["upload bytes per client"] for m in trained if m["upload bytes per client"]]
    summary = {
        "config": settings.to_dict(),
        "path": path,
        "clients": n_clients,
        "rounds": trained[-1]["round"] if trained else 0,
        "start": {"valid NDCG@10": metrics[0].get("valid NDCG@10"), "test NDCG@10": metrics[0].get("test NDCG@10")}
        if metrics else {},
        "final": {"round": final.get("round"),
                  "valid": stage_metrics(final, "valid"), "test": stage_metrics(final, "test")},
        "best": best,
        "test": stage_metrics(final, "test"),
        "round_seconds_total": sum(m["seconds"] for m in trained),
        "wall_seconds_this_session": time.time() - session_started,
        "upload_bytes_per_client_per_round": float(np.mean(uploads)) if uploads else 0.0,
        "upload_bytes_total": float(sum(m["upload bytes per client"] * (m["clients"] - m["left out"]) for m in trained)),
        "trainable_bytes": model.trainable_bytes(),
        "plot": plot.name,
        "privacy": privacy_summary(folder),
        **({"public users": {"share": settings.public_users, "at most epochs": settings.public_epochs,
                             "patience": settings.public_patience, "pretraining": folder.pretraining(),
                             "note": "pretrained on with their consent; no privacy guarantee covers them"}}
           if settings.public_users else {}),
    }
    folder.write_summary(summary)
    log(INFO, "fedrec: final test NDCG@10 %.4f (AUC %.4f, top-10 coverage %.3f, long-tail share %.3f), best valid "
        "NDCG@10 %.4f at round %s; results in %s", *(final.get(f"test {k}", float("nan")) for k in
        ("NDCG@10", "AUC", "coverage@10", "long-tail@10")), best["valid NDCG@10"], best["round"], folder.path)
    log(INFO, "%s", privacy_line(settings, summary["privacy"]))
