"""The federated run's settings, read once from the Flower run config (pyproject.toml's
[tool.flwr.app.config], overridable with `flwr run . --run-config 'key=value'`).

Both the ServerApp and the ClientApp read the same keys; a wrong type or value is an
error that names the key.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, fields
from typing import Any, Mapping

from shared_model.data import Catalog, Dataset
from shared_model.datasets import load_catalog, load_dataset
from shared_model.partitions import PARTITIONINGS
from shared_model.privacy import ACCOUNTANTS
from shared_model.recommender import ConfigError, RecommenderConfig
from shared_model.upload import PRECISIONS


TYPES = {"str": str, "int": int, "float": float, "bool": bool}
SERVER_MECHANISMS = ("dp-fedavg", "dp-ftrl")
FTRL_STEPS = ("fedadam", "ftrl")  # what DP-FTRL does with each release (server/dp_ftrl.py)
FTRL_NOISES = ("tree", "square-root")  # how DP-FTRL correlates its noise across an epoch's rounds


class SettingsError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunSettings:
    # data
    dataset: str
    data_dir: str
    synthetic_users: int  # size of the built-in synthetic dataset
    partitioning: str  # "per-user" (one client per user) or silos: "iid" / "dirichlet"
    dirichlet_alpha: float
    seed: int
    # rounds and sampling
    num_server_rounds: int
    clients_per_round: int  # 0: every client, every round
    round_timeout: float  # seconds to wait for a round's replies
    # local training (plain SGD on the client)
    local_epochs: int
    early_rounds: int  # rounds 1..N train early_local_epochs passes instead (dp = "none" only)
    early_local_epochs: int
    local_steps: int  # cap on steps per round (0: no cap)
    batch_size: int
    learning_rate: float
    # server optimiser (FedAdam)
    server_learning_rate: float
    server_lr_half_life: float  # rounds after which the server rate has halved
    # evaluation and outputs
    eval_every: int  # federated evaluation every N rounds (and after the last)
    fraction_evaluate: float
    server_eval: bool  # simulation only: also evaluate the whole split on the server
    output_dir: str
    run_name: str  # "" = a new folder; an existing run's name resumes it
    simulated_failure_rate: float  # simulation: share of client calls that fail on purpose
    # differential privacy
    dp: str  # local DP-SGD unit: "none", "example" or "user" (silos: one user's examples = one sample)
    dp_epsilon: float  # a client's whole budget (example- or user-level, see dp)
    dp_delta: float
    dp_expected_rounds: int  # rounds a client plans to take part in; noise is calibrated for them
    dp_sample_rate: float  # Poisson rate of a DP-SGD step (public: it must not depend on a client's size)
    dp_expected_batch: float  # what the noisy gradient sum is divided by (public, for the same reason)
    dp_max_grad_norm: float
    dp_negatives: int  # uniform catalog negatives per sample
    dp_accountant: str  # "rdp", "prv" or "pld"
    server_dp: bool  # user-level DP-FedAvg: Poisson sampling, clipping, Gaussian noise
    server_dp_mechanism: str  # "dp-fedavg" (Poisson sampling, amplified) or "dp-ftrl" (tree noise, no sampling)
    dp_ftrl_noise: str  # "square-root" (the square-root factorization: less noise) or "tree" (tree aggregation)
    dp_ftrl_step: str  # "fedadam" (the server's FedAdam on each release) or "ftrl" (the rate times a momentum velocity)
    dp_ftrl_learning_rate: float  # DP-FTRL's "ftrl" step: the model steps by this times the velocity of the releases
    dp_ftrl_momentum: float  # DP-FTRL's "ftrl" step: heavy-ball momentum on the releases (post-processing: no privacy cost)
    server_dp_noise: float  # noise multiplier z, accounted (std z * clip on the sum; more under adaptive clipping)
    server_dp_clip: float  # L2 bound S on a client's update
    server_dp_sample_rate: float  # Poisson rate q at which each client is sampled
    server_dp_adaptive_clip: bool  # the clip follows a quantile of update norms (server-dp-clip: the first clip)
    server_dp_target_quantile: float  # gamma: share of updates left unclipped
    server_dp_clip_learning_rate: float  # eta: geometric step of the clip
    server_dp_count_noise: float  # sigma_b: std of the noise on the count of unclipped updates
    upload_precision: str  # "fp32": the trained adapters; "fp16": the update, stochastically rounded
    secure_aggregation: bool  # DP-FedAvg through Flower's SecAgg+: the server holds only the sum
    secagg_min_clients: int  # m: each client adds noise std z S / sqrt(m); fewer survivors, no release
    public_users: float  # simulation: share of users who consent to give the server their data (no DP for them)
    public_epochs: int  # at most this many centralized epochs on the consenting users' data before round 1
    public_patience: int  # stop after this many epochs without a better validation NDCG@10 (their held-out items)
    # model: its keys are RecommenderConfig's fields, kebab-cased (dim, lora-rank, ...)
    model: RecommenderConfig
    low_memory: bool  # a ClientApp trades step time for memory (see TextTower.save_memory)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Typed settings from the run config; the defaults live in pyproject.toml only."""
        values = {f.name: read_key(run_config, f) for f in fields(cls) if f.name != "model"}
        model = {f.name: read_key(run_config, f) for f in fields(RecommenderConfig)}
        try:
            values["model"] = RecommenderConfig(**model)
        except ConfigError as error:
            key = run_config_key(error.name)
            raise SettingsError(f"run config '{key}' {error.message}, not {error.value!r}") from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"run config '{run_config_key(f.name)}' must be a finite number, not {value!r}")
        checks = [
            (self.dataset in ("synthetic", "ml-100k"), "dataset", "must be 'synthetic' or 'ml-100k'"),
            (self.synthetic_users >= 10, "synthetic-users", "must be at least 10"),
            (self.model.item_text, "item-text", "must be true in the Flower app (an id-only model cannot score new "
             "items or read text profiles: it is `fedrec centralized`'s SASRec-style baseline)"),
            (self.partitioning in PARTITIONINGS, "partitioning", f"must be one of {PARTITIONINGS}"),
            (self.num_server_rounds >= 1, "num-server-rounds", "must be at least 1"),
            (self.clients_per_round >= 0, "clients-per-round", "must be 0 (all) or more"),
            (self.local_epochs >= 1, "local-epochs", "must be at least 1"),
            (self.early_rounds >= 0, "early-rounds", "must be 0 (none) or more"),
            (self.early_local_epochs >= 1, "early-local-epochs", "must be at least 1"),
            (self.dp == "none" or self.early_rounds == 0, "early-rounds",
             "must be 0 under dp: a DP-SGD round's steps are planned and accounted alike in every round"),
            (self.local_steps >= 0, "local-steps", "must be 0 (no cap) or more"),
            (self.batch_size >= 1, "batch-size", "must be at least 1"),
            (self.learning_rate > 0, "learning-rate", "must be positive"),
            (self.server_learning_rate > 0, "server-learning-rate", "must be positive"),
            (self.server_lr_half_life > 0, "server-lr-half-life", "must be positive"),
            (self.eval_every >= 1, "eval-every", "must be at least 1"),
            (0 < self.fraction_evaluate <= 1, "fraction-evaluate", "must be in (0, 1]"),
            (0 <= self.simulated_failure_rate < 1, "simulated-failure-rate", "must be in [0, 1)"),
            (self.round_timeout > 0, "round-timeout", "must be positive"),
            (self.dp in ("none", "example", "user"), "dp", "must be 'none', 'example' or 'user'"),
            (self.dp_epsilon > 0, "dp-epsilon", "must be positive"),
            (0 < self.dp_delta < 1, "dp-delta", "must be in (0, 1)"),
            (self.dp_expected_rounds >= 1, "dp-expected-rounds", "must be at least 1"),
            (0 < self.dp_sample_rate <= 1, "dp-sample-rate", "must be in (0, 1]"),
            (self.dp_expected_batch > 0, "dp-expected-batch", "must be positive"),
            (self.dp == "none" or self.model.lora_layers <= 1, "lora-layers",
             "must be 0 or 1 under dp (Opacus's per-sample gradients are wrong for a second LoRA layer)"),
            (self.dp_max_grad_norm > 0, "dp-max-grad-norm", "must be positive"),
            (self.dp_negatives >= 1, "dp-negatives", "must be at least 1"),
            (self.upload_precision in PRECISIONS, "upload-precision", f"must be one of {PRECISIONS}"),
            (self.upload_precision == "fp32" or not self.secure_aggregation, "upload-precision",
             "must be 'fp32' with secure-aggregation (SecAgg+ sends its own quantised vector)"),
            (self.dp_accountant in ACCOUNTANTS, "dp-accountant", f"must be one of {ACCOUNTANTS}"),
            (self.server_dp_noise > 0, "server-dp-noise", "must be positive (zero noise is no DP; set server-dp = false)"),
            (not self.server_dp or self.partitioning == "per-user", "server-dp",
             "needs partitioning 'per-user' (one user a client): in a silo one user changes the silo's clipped update "
             "by up to twice the clip, so DP-FedAvg's epsilon would not be user-level"),
            (not (self.server_dp and self.dp == "none" and self.model.id_embeddings), "id-embeddings",
             "must be false with server-dp and dp = 'none': each client's exact update reaches the server, and an "
             "item-id table's rows reveal which items its users touched (or add dp = 'example' / 'user')"),
            (self.server_dp_mechanism in SERVER_MECHANISMS, "server-dp-mechanism", f"must be one of {SERVER_MECHANISMS}"),
            (self.server_dp_mechanism == "dp-fedavg" or not (self.secure_aggregation or self.server_dp_adaptive_clip),
             "server-dp-mechanism", "'dp-ftrl' adds its noise on the server (no secure-aggregation) with a "
             "fixed clip (no server-dp-adaptive-clip)"),
            (self.dp_ftrl_learning_rate > 0, "dp-ftrl-learning-rate", "must be positive"),
            (0 <= self.dp_ftrl_momentum < 1, "dp-ftrl-momentum", "must be in [0, 1)"),
            (self.dp_ftrl_step in FTRL_STEPS, "dp-ftrl-step", f"must be one of {FTRL_STEPS}"),
            (self.dp_ftrl_noise in FTRL_NOISES, "dp-ftrl-noise", f"must be one of {FTRL_NOISES}"),
            (self.server_dp_clip > 0, "server-dp-clip", "must be positive"),
            (0 < self.server_dp_sample_rate <= 1, "server-dp-sample-rate", "must be in (0, 1]"),
            (self.server_dp or not self.server_dp_adaptive_clip, "server-dp-adaptive-clip",
             "needs server-dp = true (it adapts DP-FedAvg's clip)"),
            (0 < self.server_dp_target_quantile < 1, "server-dp-target-quantile", "must be in (0, 1)"),
            (self.server_dp_clip_learning_rate > 0, "server-dp-clip-learning-rate", "must be positive"),
            (self.server_dp_count_noise > 0, "server-dp-count-noise", "must be positive (a count without noise is "
             "no DP)"),
            (not self.server_dp_adaptive_clip or 2 * self.server_dp_count_noise > self.server_dp_noise,
             "server-dp-count-noise", f"must exceed server-dp-noise / 2 = {self.server_dp_noise / 2:g} with "
             "server-dp-adaptive-clip: the update's noise multiplier is (z^-2 - (2 sigma_b)^-2)^-1/2, finite only then"),
            (0 <= self.public_users < 1, "public-users", "must be in [0, 1) (a share of the users)"),
            (self.public_epochs >= 1, "public-epochs", "must be at least 1"),
            (self.public_patience >= 1, "public-patience", "must be at least 1"),
            (self.server_dp or not self.secure_aggregation, "secure-aggregation",
             "needs server-dp = true (the clients add DP-FedAvg's noise to what SecAgg+ sums)"),
            (self.dp == "none" or not self.secure_aggregation, "secure-aggregation",
             "works with dp = 'none' only so far (a client's DP-SGD ledger would travel beside its masked update)"),
            (not (self.secure_aggregation and self.server_dp_adaptive_clip), "secure-aggregation",
             "does not adapt the clip yet (server-dp-adaptive-clip reads each update's norm)"),
            (self.secagg_min_clients >= 2, "secagg-min-clients", "must be at least 2"),
            (not (self.dp == "user" and self.partitioning == "per-user"), "dp",
             "'user' is for silos; with one client per user use dp='example' and server-dp"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise SettingsError(f"run config '{key}' {message}, not {self.to_dict()[key]!r}")

    def local_epochs_in(self, server_round: int) -> int:
        """A client's local passes in this round: more in the first rounds, while the model
        is far from trained, where a second pass over a user's data still points the right way."""
        return self.early_local_epochs if server_round <= self.early_rounds else self.local_epochs

    def load_dataset(self) -> Dataset:
        return load_dataset(self.dataset, self.data_dir or None, self.seed, self.synthetic_users)

    def load_catalog(self) -> Catalog:
        """The public catalog only (for the server)."""
        return load_catalog(self.dataset, self.data_dir or None, self.seed, self.synthetic_users)

    def to_dict(self) -> dict[str, Any]:
        """The run config these settings were read from, by key (flat, as in pyproject.toml)."""
        values = {run_config_key(f.name): getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return values | {run_config_key(k): v for k, v in self.model.to_dict().items()}


def run_config_key(name: str) -> str:
    """A field's run-config key: its name, kebab-cased."""
    return name.replace("_", "-")


def read_key(run_config: Mapping[str, Any], f: Field) -> Any:
    """The value of field `f`'s key, of the field's type (an int is taken for a float)."""
    key = run_config_key(f.name)
    if key not in run_config:
        raise SettingsError(f"run config '{key}' is missing (see [tool.flwr.app.config] in pyproject.toml)")
    value, expected = run_config[key], TYPES[f.type]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise SettingsError(f"run config '{key}': expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value
