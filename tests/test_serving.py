"""The real scoring server on a free loopback port: every RPC, health, reflection, bad
inputs and hot reload."""

import re
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.on_device import OnDeviceRanker
from server.serving import recommender_pb2 as pb
from server.serving.client import RecommenderClient
from shared_model.datasets import load_catalog
from shared_model.recommender import RecommenderConfig, build_recommender
from shared_model.state import save_state

CATALOG = load_catalog("synthetic")


def write_adapters(path, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_recommender(CATALOG.texts, RecommenderConfig(), progress=False)
    with torch.no_grad():
        model.item_ids.weight.normal_(0, 0.5)
    save_state(path, model.trainable_state(), {"model_config": model.config.to_dict()})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("serve") / "adapters.safetensors"
    write_adapters(checkpoint, seed=1)
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--checkpoint", str(checkpoint),
                             "--dataset", "synthetic", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    address, lines = None, []
    deadline = time.time() + 120
    while address is None and time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        match = re.search(r"listening on (\S+:\d+)", line)
        address = match.group(1) if match else None
        if proc.poll() is not None:
            break
    assert address, "".join(lines)
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
    with RecommenderClient(address) as client:
        yield address, client, checkpoint
    proc.terminate()
    proc.wait(timeout=30)


def raw(item_index: int) -> int:
    return int(CATALOG.raw_ids[item_index])


def test_recommend_excludes_seen_and_explains_with_history(server):
    _, client, _ = server
    history, exclude = [raw(3), raw(10), raw(42)], [raw(7)]
    items = client.recommend(history=history, k=10, exclude=exclude)
    assert len(items) == 10
    ids = [i.item_id for i in items]
    assert not set(ids) & set(history + exclude)
    assert [i.score for i in items] == sorted((i.score for i in items), reverse=True)
    assert all(i.because and set(i.because) <= set(history) for i in items)
    assert items[0].text == CATALOG.texts[list(CATALOG.raw_ids).index(ids[0])]


def test_score_agrees_with_recommend_and_on_device_ranking(server):
    _, client, checkpoint = server
    history = [raw(3), raw(10), raw(42)]
    top = client.recommend(history=history, k=5)
    scores = client.score([i.item_id for i in top], history=history)
    assert np.allclose(scores, [i.score for i in top], atol=1e-4)
    local = OnDeviceRanker(checkpoint, CATALOG.texts).top_k(np.array([3, 10, 42]), k=5)
    assert [raw(i) for i, _, _ in local] == [i.item_id for i in top]


def test_profile_only_user_gets_recommendations(server):
    _, client, _ = server
    items = client.recommend(profile="I like astronauts and a distant galaxy", k=5)
    assert len(items) == 5 and all(not i.because for i in items)


def test_added_items_rank_at_once(server):
    _, client, _ = server
    size = client.add_items({900001: "An epic film about astronauts, a rocket launch and alien worlds."})
    assert size == len(CATALOG) + 1
    assert np.isfinite(client.score([900001], history=[raw(1)])[0])
    everything = client.recommend(history=[raw(1)], k=size - 1)
    assert 900001 in {i.item_id for i in everything}


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda c: c.recommend(history=[raw(1), 123456789], k=5), "user.history[1]: unknown item id 123456789"),
        (lambda c: c.recommend(history=[raw(1)], k=0), "k: 0 is out of range"),
        (lambda c: c.recommend(history=[raw(1)], k=100000), "k: 100000 is out of range"),
        (lambda c: c.recommend(k=5), "user: give a history or a profile"),
        (lambda c: c.recommend(history=[raw(1)] * 10001, k=5), "user.history: 10001 items, at most 10000"),
        (lambda c: c.recommend(profile="x" * 2001, k=5), "user.profile: 2001 characters"),
        (lambda c: c.recommend(history=[raw(1)], k=5, exclude=[-4]), "exclude[0]: unknown item id -4"),
        (lambda c: c.score([], history=[raw(1)]), "item_ids: empty"),
        (lambda c: c.score([raw(2), 77777777], history=[raw(1)]), "item_ids[1]: unknown item id"),
        (lambda c: c.add_items({raw(5): "a duplicate"}), "items[0].item_id"),
        (lambda c: c.add_items({900100: "   "}), "items[0].text"),
    ],
)
def test_bad_inputs_are_invalid_argument_and_service_keeps_serving(server, call, field):
    _, client, _ = server
    with pytest.raises(grpc.RpcError) as error:
        call(client)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    assert len(client.recommend(history=[raw(1)], k=3)) == 3


def test_health_and_reflection(server):
    address, _, _ = server
    with grpc.insecure_channel(address) as channel:
        for service in ("", "fedrec.v1.Recommender"):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"fedrec.v1.Recommender", "grpc.health.v1.Health"} <= names


def test_hot_reload_swaps_the_model_without_dropping_requests(server):
    address, client, checkpoint = server
    def stub_version() -> str:
        request = pb.ScoreRequest(user=pb.UserInput(history=[raw(1)]), item_ids=[raw(2)])
        return client.stub.Score(request).model_version

    before = stub_version()
    failures, done = [], threading.Event()

    def hammer():
        with RecommenderClient(address) as own:
            while not done.is_set():
                try:
                    own.recommend(history=[raw(1), raw(2)], k=5)
                except grpc.RpcError as error:
                    failures.append(error)

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        partial = checkpoint.with_name("next.safetensors")
        write_adapters(partial, seed=2)
        partial.replace(checkpoint)  # the way runs write: a complete file, renamed into place
        deadline = time.time() + 30
        while stub_version() == before and time.time() < deadline:
            time.sleep(0.2)
    finally:
        done.set()
        worker.join()
    assert stub_version() != before
    assert not failures
