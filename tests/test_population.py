"""The in-process population driver (simulations/population.py) computes what a Flower run
computes: its vectorised clients train as `train_local` does; a round equals the real
ClientApp's replies aggregated by the real DPFedAvg (same sample and noise, replayed from
one seeded generator); a whole `flwr run` and an in-process run end with the same model;
the noise on the mean has std z S / (q N). Without server DP: a round equals the
ClientApp's replies aggregated by SeededFedAdam, and the evaluation equals the clients'.

Tolerances: float32 training, whose sums run in another order when vectorised (and with
more padding), agrees to about 1e-4 of the size of an update; compared configurations
have dropout 0 (a vectorised client draws its own dropout masks, not its ClientApp's).
"""

import json

import argparse
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType
from flwr.supercore.task_identity import TaskIdentity

from conftest import counted_generators
from server.server_app import array_record, make_strategy, server_evaluation, starting_model
from shared_model.fresh_randomness import fresh_numpy_generator
from shared_model.settings import RunSettings, SettingsError
from shared_model.state import load_state
from shared_model.training import train_local
from shared_model.vectorised_training import client_batches, train_clients, vectorised_attention
from simulations.client_harness import client_context, deliver
from simulations.flower_runner import app_run_config, run_flower
from simulations.population import Population, checked_device, held_out_evaluation, run

USERS = 30
CONFIG = {"synthetic-users": USERS, "partitioning": "per-user", "dp": "none", "server-dp": True,
          "id-embeddings": False, "dropout": 0.0, "eval-every": 100}
SEVERAL_STEPS = {"batch-size": 1, "local-epochs": 2, "local-steps": 5}  # 2 or 3 steps a user, reshuffled
EARLY_PASSES = {"batch-size": 1, "early-rounds": 1, "early-local-epochs": 2, "local-steps": 5}  # round 1: as above


def settings_of(**overrides) -> RunSettings:
    return RunSettings.from_run_config(app_run_config(**{**CONFIG, **overrides}))


def seeded(seed: int):
    """A generator factory that replays: every call gives the same stream."""
    return lambda: np.random.default_rng(seed)


def assert_close(got: dict, want: dict, start: dict, rel: float = 1e-4) -> None:
    """got == want up to `rel` of the largest change from `start`, name by name (clients'
    models and sums of updates)."""
    for name in want:
        change = np.abs(np.asarray(want[name], dtype=np.float64) - start[name]).max()
        error = np.abs(np.asarray(got[name], dtype=np.float64) - np.asarray(want[name], dtype=np.float64)).max()
        assert error <= rel * change + 1e-7, f"{name}: differs by {error:.3g}, changes by {change:.3g}"


def assert_same_step(got: dict, want: dict, start: dict, share: float) -> None:
    """Models after FedAdam: ||got - want|| <= share * ||want - start||, over all arrays.
    Not coordinate by coordinate: FedAdam moves a coordinate by about eta d / (|d| + 1e-7)
    for an averaged update d, and d carries float32 rounding (a client's model near 1 has
    a resolution of 1.2e-7), so where d is near 1e-7 one last bit in one client moves that
    coordinate by up to eta / 2 (measured: 3 of 17,904 coordinates beyond 1e-4 between a
    `flwr run` and the driver, the median 7e-9)."""
    as64 = {k: np.asarray(v, dtype=np.float64) for k, v in got.items()}
    error = np.sqrt(sum(np.sum((as64[k] - np.asarray(want[k], dtype=np.float64)) ** 2) for k in want))
    change = np.sqrt(sum(np.sum((np.asarray(want[k], dtype=np.float64) - start[k]) ** 2) for k in want))
    assert error <= share * change, f"differs by {error:.3g}, changes by {change:.3g}"


@pytest.fixture(scope="module")
def population() -> Population:
    return Population(settings_of(**{"server-dp-sample-rate": 0.5}))


@pytest.fixture(scope="module")
def hiding_seen() -> Population:
    return Population(settings_of(**{"hide-seen": True}))


@pytest.mark.parametrize("overrides", [{}, SEVERAL_STEPS, {**SEVERAL_STEPS, "hide-seen": True}],
                         ids=["one step", "several steps", "several steps hiding seen items"])
def test_vectorised_clients_train_as_train_local_does(request, overrides):
    settings = settings_of(**overrides)
    population = request.getfixturevalue("hiding_seen" if settings.model.hide_seen else "population")
    model, users = population.model, [0, 3, 7, 8, 9, 24]  # 1 to 3 chunks of W+1 items
    start = model.trainable_state()
    batches = [client_batches(model, [population.train[u]], 1000 + u, settings.local_epochs, settings.batch_size,
                              settings.local_steps) for u in users]
    assert {len(b) for b in batches} == ({2, 4, 5} if overrides else {1})  # steps per user: capped at 5
    trained = train_clients(model, start, batches, settings.learning_rate)
    for row, user in enumerate(users):
        model.load_trainable_state(start)
        train_local(model, [population.train[user]], settings.local_epochs, settings.batch_size,
                    settings.learning_rate, 1000 + user, settings.local_steps)
        assert_close({k: v[row] for k, v in trained.items()}, model.trainable_state(),
                     {k: v.numpy() for k, v in start.items()})
    model.load_trainable_state(start)


ADAPTIVE = {"server-dp-adaptive-clip": True, "server-dp-count-noise": 2.0}


@pytest.mark.parametrize("overrides, clip", [({}, 0.3), (SEVERAL_STEPS, 1.0), (EARLY_PASSES, 1.0), (ADAPTIVE, 0.3)],
                         ids=["one step", "several steps", "early rounds' passes", "adaptive clip"])
def test_a_round_equals_the_clientapp_replies_aggregated_by_dp_fedavg(overrides, clip):
    """Noise z = 1 and a clip that cuts some updates: both paths draw their Poisson sample
    and noise (and, adaptive, the count's noise) from one replayed generator, so they must
    agree to float tolerance, and move an adaptive clip alike."""
    config = {**CONFIG, **overrides, "server-dp-sample-rate": 0.5, "server-dp-clip": clip, "server-dp-noise": 1.0}
    settings = RunSettings.from_run_config(app_run_config(**config))
    in_process = Population(settings, chunk=7, randomness=seeded(5))  # chunks of 7: sums over chunks
    arrays = in_process.initial_arrays()
    total, norms, counts = in_process.clipped_total(1, arrays)
    stepped, _ = in_process.strategy.aggregate_clipped(1, total, norms)

    _, flower = make_strategy(settings, {100 + u: u for u in range(USERS)}, seeded(5))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    messages = list(flower.configure_train(1, array_record(arrays), ConfigRecord(), grid=None))
    assert 0 < len(messages) == counts["clients"] < USERS
    replies = []
    for message in messages:
        context = client_context(message.metadata.dst_node_id - 100, USERS, **config)
        replies.append(deliver(MessageType.TRAIN, context, message.content))
    updates = [np.concatenate([(r.content["arrays"][k].numpy() - arrays[k]).ravel() for k in arrays]) for r in replies]
    norms = np.linalg.norm(updates, axis=1)
    assert (norms > clip).any() and (norms < clip).any()  # the clip cuts some updates, not all
    want_total, want_norms = flower.clipped_sum(replies)
    assert_close(total, want_total, {k: np.zeros_like(v) for k, v in want_total.items()})
    assert np.allclose(np.sort(norms), np.sort(want_norms), rtol=1e-4)
    want, metrics = flower.aggregate_train(1, replies)
    assert in_process.strategy.clip == pytest.approx(flower.clip, rel=1e-12)
    assert (flower.clip != clip) == ("server-dp-adaptive-clip" in overrides)
    assert metrics["clip"] == clip
    assert_same_step({k: a.numpy() for k, a in stepped.items()}, {k: a.numpy() for k, a in want.items()}, arrays,
                     share=1e-3)


def test_a_flower_run_and_an_in_process_run_end_with_the_same_model(tmp_path, capsys):
    """`flwr run` (12 SuperNodes, 2 rounds) against the driver with the same run config.
    A run config cannot ask for zero noise (nor replay the server's fresh randomness), so
    both add noise with z = 1e-12 (std 1e-13 on the mean) and sample at rate 1 (every
    client, every round). Same metrics, and models within 0.5% of their change (measured
    0.08%; see `assert_same_step`)."""
    users = 12
    config = {**CONFIG, "synthetic-users": users, "server-dp-noise": 1e-12, "server-dp-sample-rate": 1.0,
              "num-server-rounds": 2, "output-dir": str(tmp_path)}
    flower = run_flower({**config, "run-name": "flower"}, num_supernodes=users)
    assert flower.ok, flower.log[-3000:]
    folder = run(RunSettings.from_run_config(app_run_config(**config, **{"run-name": "in-process"})))
    assert "train loss not reported" in capsys.readouterr().out  # the driver computes no loss and says so
    got, _ = load_state(folder.path / "final_adapters.safetensors")
    want, _ = load_state(tmp_path / "flower" / "final_adapters.safetensors")
    start = {k: v.numpy() for k, v in starting_model(RunSettings.from_run_config(app_run_config(**config)))
             .trainable_state().items()}
    assert_same_step({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in want.items()}, start,
                     share=5e-3)
    flower_lines = [json.loads(line) for line in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    compared = ("round", "clients", "errors", "server lr", "user epsilon", "valid NDCG@10", "test NDCG@10",
                "valid HR@10", "test HR@10")
    ours = [{k: m[k] for k in compared if k in m} for m in folder.metrics()]
    theirs = [{k: m[k] for k in compared if k in m} for m in flower_lines]
    assert len(ours) == len(theirs)
    for mine, flowers in zip(ours, theirs):  # pytest 9.2's approx takes no list of dicts
        assert mine == pytest.approx(flowers)


NOT_PRIVATE = {"server-dp": False, "clients-per-round": 10}


def test_a_non_private_round_equals_the_clientapp_replies_aggregated_by_fedadam():
    """Without server DP: SeededFedAdam's sample, the real ClientApp's replies weighted by
    their example counts and FedAdam's step, against the driver's (chunks of 4: the weighted
    sum runs over chunks sorted by batch shape, not in the sample's order). The step is
    compared where the averaged update d exceeds 1e-5 (95% of the coordinates here): FedAdam
    steps by about eta d / (|d| + 1e-7), so a smaller d makes the step sensitive to rounding
    (Flower's FedAvg sums in float32, the driver in float64), and where there is no gradient
    (an attention key's bias, positions no history reaches) it steps +-eta on the rounding."""
    config = {**CONFIG, **NOT_PRIVATE}
    settings = RunSettings.from_run_config(app_run_config(**config))
    in_process = Population(settings, chunk=4)
    arrays = in_process.initial_arrays()
    average, counts = in_process.weighted_average(1, arrays)
    stepped, _ = in_process.fedadam_round(1, arrays)  # trains the same sample again: weighted_average keeps no state

    _, flower = make_strategy(settings, {100 + u: u for u in range(USERS)})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    messages = list(flower.configure_train(1, array_record(arrays), ConfigRecord(), grid=None))
    assert counts == {"clients": 10, "errors": 0} and len(messages) == 10
    replies = [deliver(MessageType.TRAIN, client_context(m.metadata.dst_node_id - 100, USERS, **config), m.content)
               for m in messages]
    weights = np.array([r.content["metrics"]["weight"] for r in replies])
    assert len(set(weights)) > 1  # unequal weights: the weighting is tested
    want_average = {k: sum(w * r.content["arrays"][k].numpy().astype(np.float64) for w, r in zip(weights, replies))
                    / weights.sum() for k in arrays}
    assert_close(average, want_average, arrays)
    want, _ = flower.aggregate_train(1, replies)
    moved = 0
    for k, start in arrays.items():
        signal = np.abs(want_average[k] - start) > 1e-5
        assert np.allclose(stepped[k][signal], want[k].numpy()[signal], rtol=0, atol=1e-5), k  # steps of ~0.015
        moved += signal.sum()
    assert moved > 0.9 * sum(v.size for v in arrays.values())


def test_a_non_private_run_is_evaluated_as_its_clients_evaluate_it(population):
    """The driver's held-out evaluation against every ClientApp's evaluation summed by the
    strategy (a non-private `flwr run` at fraction-evaluate 1): the same metrics."""
    config = {**CONFIG, **NOT_PRIVATE}
    settings = RunSettings.from_run_config(app_run_config(**config))
    driver = Population(settings)
    arrays = driver.initial_arrays()
    got = held_out_evaluation(settings, driver)(arrays)
    _, flower = make_strategy(settings, {100 + u: u for u in range(USERS)})
    messages = list(flower.configure_evaluate(0, array_record(arrays), ConfigRecord(), grid=None))
    assert len(messages) == USERS
    replies = [deliver(MessageType.EVALUATE, client_context(m.metadata.dst_node_id - 100, USERS, **config), m.content)
               for m in messages]
    want = dict(flower.aggregate_evaluate(0, replies))
    assert {k: got[k] for k in want if k in got} == pytest.approx({k: want[k] for k in want if k in got}, abs=1e-9)
    assert {"valid NDCG@10", "test NDCG@10", "test HR@10", "test coverage@10"} <= got.keys() & want.keys()


def test_a_non_private_run_keeps_its_best_round_by_validation(tmp_path):
    config = {**CONFIG, **NOT_PRIVATE, "num-server-rounds": 3, "eval-every": 1, "output-dir": str(tmp_path),
              "run-name": "not-private"}
    folder = run(RunSettings.from_run_config(app_run_config(**config)))
    lines = [m for m in folder.metrics() if m["round"] > 0]
    best = max(lines, key=lambda m: m["valid NDCG@10"])
    summary = json.loads((folder.path / "summary.json").read_text())
    assert summary["best"]["round"] == best["round"] and summary["best"]["test"]["NDCG@10"] == best["test NDCG@10"]
    assert summary["path"].endswith("not private") and not folder.ledger_path.exists()
    assert all(m["clients"] == 10 for m in lines)


def test_the_noise_on_the_mean_has_std_z_s_over_the_expected_cohort(population):
    z, clip, rate = 2.0, 0.3, 0.5
    settings = settings_of(**{"server-dp-noise": z, "server-dp-clip": clip, "server-dp-sample-rate": rate})
    driver = Population(settings, randomness=counted_generators())
    total, norms, counts = driver.clipped_total(1, driver.initial_arrays())  # fixed updates
    assert counts["clients"] > 0 and any(np.abs(t).max() > 0 for t in total.values())
    noise = np.concatenate([np.concatenate([(driver.strategy.noisy_average(total, norms)[k] - total[k] / (rate * USERS))
                                            .ravel() for k in total]) for _ in range(20)])
    assert noise.size > 300_000  # the std is measured to about 0.13%: 3% is over 20 standard errors
    assert np.std(noise) == pytest.approx(z * clip / (rate * USERS), rel=0.03)
    assert abs(np.mean(noise)) < 5 * np.std(noise) / np.sqrt(noise.size)


def test_a_run_draws_its_sample_and_noise_from_fresh_randomness(population):
    assert population.strategy.randomness is fresh_numpy_generator
    arrays = population.initial_arrays()
    first = population.strategy.begin_round(array_record(arrays))
    assert any(population.strategy.begin_round(array_record(arrays)) != first for _ in range(3))


@pytest.mark.parametrize("overrides, key", [({"dp": "example"}, "dp"), ({"secure-aggregation": True}, "secure-aggregation"),
                                           ({"upload-precision": "fp16"}, "upload-precision"),
                                           ({"server-dp": False, "fraction-evaluate": 0.5}, "fraction-evaluate")])
def test_the_driver_refuses_what_it_does_not_replicate_before_making_a_run_folder(overrides, key, tmp_path):
    settings = settings_of(**overrides, **{"output-dir": str(tmp_path)})
    with pytest.raises(SettingsError, match=f"'{key}'"):
        run(settings)
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the driver's --device cuda)")
def test_a_round_trained_on_the_gpu_equals_the_round_trained_on_the_cpu():
    """--device cuda: the same replayed sample and noise, the clients trained on the GPU:
    the same start, clipped sum, norms and step to float tolerance, and the server's
    evaluation of the result gives the same metrics."""
    settings = settings_of(**SEVERAL_STEPS, **{"server-dp-sample-rate": 0.5, "server-dp-clip": 0.3})
    cpu, gpu = (Population(settings, chunk=7, randomness=seeded(5), device=d) for d in ("cpu", "cuda"))
    arrays = cpu.initial_arrays()
    assert all(np.array_equal(gpu.initial_arrays()[k], v) for k, v in arrays.items())
    zeros = {k: np.zeros_like(v, dtype=np.float64) for k, v in arrays.items()}
    total, norms, counts = cpu.clipped_total(1, arrays)
    got_total, got_norms, got_counts = gpu.clipped_total(1, arrays)
    assert got_counts == counts and counts["clients"] > 0
    assert_close(got_total, total, zeros, rel=1e-3)
    assert np.allclose(got_norms, norms, rtol=1e-3)
    want = {k: a.numpy() for k, a in cpu.strategy.aggregate_clipped(1, total, norms)[0].items()}
    got = {k: a.numpy() for k, a in gpu.strategy.aggregate_clipped(1, got_total, got_norms)[0].items()}
    assert_same_step(got, want, arrays, share=1e-2)
    on_cpu, on_gpu = (server_evaluation(settings, p.model, simulation=True) for p in (cpu, gpu))
    want_metrics, got_metrics = on_cpu(want), on_gpu(want)
    for key, value in want_metrics.items():
        assert got_metrics[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_the_driver_names_the_devices_it_takes_when_a_machine_has_no_gpu():
    assert checked_device("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="'cuda'.*has none"):
        checked_device("cuda")


def test_a_noise_free_reference_of_a_run_without_noise_is_refused_before_making_a_run_folder(tmp_path):
    with pytest.raises(SettingsError, match="noise-free"):
        run(settings_of(**{"server-dp": False, "output-dir": str(tmp_path)}), noise_free=True)
    assert not any(tmp_path.iterdir())


def test_the_driver_refuses_lora_layers_off_the_cpu(tmp_path):
    settings = settings_of(**{"lora-layers": 1, "output-dir": str(tmp_path)})
    with pytest.raises(SettingsError, match="lora-layers > 0 on the CPU only"):
        Population(settings, device="cuda")
    with pytest.raises(SettingsError, match="lora-layers > 0 on the CPU only"):
        run(settings, device="cuda")
    assert not any(tmp_path.iterdir())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_vectorised_attention_steps_on_the_gradient_of_its_own_dropout(device):
    """Each client's gradient must be that of the dropout mask its forward drew. The loss
    L = sum(w * attention(q, k, v)) is linear in v, so <dL/dv, v> = L exactly when the
    backward replays the forward's mask (the fused CUDA kernels under vmap do not)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, w = (torch.randn(6, 3, 2, 7, 4, generator=generator).to(device) for _ in range(4))
    causal = torch.ones(7, 7, dtype=torch.bool, device=device).tril()

    def loss(v, q, k, w, dropout=0.5):
        return (torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=dropout)
                * w).sum()

    def dot_and_loss(v, q, k, w):
        gradient, value = torch.func.grad_and_value(loss)(v, q, k, w)
        return (gradient * v).sum(), value

    with warnings.catch_warnings(), vectorised_attention(torch.device(device)):
        warnings.simplefilter("ignore")  # "no batching rule": the per-client fallback is what is tested
        dot, value = torch.func.vmap(dot_and_loss, randomness="different")(v, q, k, w)
    assert torch.allclose(dot, value, rtol=1e-4, atol=1e-4)
    without = torch.stack([loss(*(t[i] for t in (v, q, k, w)), dropout=0.0) for i in range(len(v))])
    assert not torch.allclose(value, without)  # dropout did drop: the identity is not the no-dropout one
