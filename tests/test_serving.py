"""The real scoring server on a free loopback port: every RPC, health, reflection (v1 and
v1alpha), bad inputs (down to bytes that do not parse), AddItems racing Recommend and
itself, hot reload (good, bad, deleted and re-typed files) and start-up errors."""

import json
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
from safetensors import safe_open
from safetensors.torch import save_file

from client.on_device import OnDeviceRanker
from server.serving import recommender_pb2 as pb
from server.serving.client import RecommenderClient
from server.serving.scoring import MAX_NEW_ITEMS, MAX_TEXT_CHARS, CatalogFull, ScoringModel
from shared_model.datasets import load_catalog
from shared_model.recommender import RecommenderConfig, build_recommender
from shared_model.state import load_state, save_state

CATALOG = load_catalog("synthetic")
LONG_TEXT = " ".join(["a slow epic about sailors crossing a frozen sea"] * 12)  # ~100 words, > 48 tokens


def adapters(seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(seed)
    model = build_recommender(CATALOG.texts, RecommenderConfig(), progress=False)
    with torch.no_grad():
        model.item_ids.weight.normal_(0, 0.5)
    return model.trainable_state(), {"model_config": model.config.to_dict()}


def write_adapters(path, seed: int) -> None:
    save_state(path, *adapters(seed))


def serve_command(checkpoint, port: int | str = 0) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--checkpoint", str(checkpoint),
            "--dataset", "synthetic", "--port", str(port)]


class Server:
    """A `fedrec serve` process and every line it has printed so far."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.proc = subprocess.Popen(serve_command(checkpoint), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: [self.lines.append(line) for line in self.proc.stdout], daemon=True).start()
        self.address = self.wait_for(r"listening on (\S+:\d+)", timeout=120).group(1)
        self.client = RecommenderClient(self.address)

    def wait_for(self, pattern: str, timeout: float = 30, after: int = 0) -> re.Match:
        """The first printed line from index `after` on that matches `pattern`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.lines[after:]:
                match = re.search(pattern, line)
                if match:
                    return match
            assert self.proc.poll() is None, "".join(self.lines)
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.lines)}")

    def count(self, pattern: str, after: int = 0) -> int:
        return sum(bool(re.search(pattern, line)) for line in self.lines[after:])

    def version(self) -> str:
        request = pb.ScoreRequest(user=pb.UserInput(history=[raw(1)]), item_ids=[raw(2)])
        return self.client.stub.Score(request).model_version


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("serve") / "adapters.safetensors"
    write_adapters(checkpoint, seed=1)
    server = Server(checkpoint)
    yield server
    server.client.close()
    server.proc.terminate()
    server.proc.wait(timeout=30)


@pytest.fixture
def server(served):
    return served.address, served.client, served.checkpoint


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


def test_added_items_rank_at_once_and_long_texts_are_counted(server):
    _, client, _ = server
    before = client.stub.AddItems(pb.AddItemsRequest(items=[pb.NewItem(item_id=900000, text="A short film.")]))
    reply = client.stub.AddItems(pb.AddItemsRequest(items=[
        pb.NewItem(item_id=900001, text="An epic film about astronauts, a rocket launch and alien worlds."),
        pb.NewItem(item_id=900002, text=LONG_TEXT)]))
    assert (reply.added, reply.catalog_size, reply.truncated) == (2, before.catalog_size + 2, 1)
    assert np.isfinite(client.score([900001, 900002], history=[raw(1)])).all()
    everything = client.recommend(history=[raw(1)], k=reply.catalog_size - 1)
    assert {900001, 900002} <= {i.item_id for i in everything}


def add_request(items: dict[int, str]) -> pb.AddItemsRequest:
    return pb.AddItemsRequest(items=[pb.NewItem(item_id=i, text=t) for i, t in items.items()])


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda c: c.recommend(history=[raw(1), 123456789], k=5), "user.history[1]: unknown item id 123456789"),
        (lambda c: c.recommend(history=[raw(1)], k=0), "k: 0 is out of range"),
        (lambda c: c.recommend(history=[raw(1)], k=100000), "k: 100000 is out of range"),
        (lambda c: c.recommend(k=5), "user: give a history or a profile"),
        (lambda c: c.recommend(history=[raw(1)] * 10001, k=5), "user.history: 10001 items, at most 10000"),
        (lambda c: c.recommend(profile="x" * 2001, k=5), "user.profile: 2001 characters"),
        (lambda c: c.recommend(profile=LONG_TEXT, k=5), "user.profile: 110 tokens, at most 48"),
        (lambda c: c.score([raw(3)], profile=LONG_TEXT), "user.profile: 110 tokens, at most 48"),
        (lambda c: c.recommend(history=[raw(1)], k=5, exclude=[-4]), "exclude[0]: unknown item id -4"),
        (lambda c: c.score([], history=[raw(1)]), "item_ids: empty"),
        (lambda c: c.score([raw(2), 77777777], history=[raw(1)]), "item_ids[1]: unknown item id"),
        (lambda c: c.add_items({raw(5): "a duplicate"}), "items[0].item_id: 6 is already in the catalog"),
        (lambda c: c.add_items({900100: "   "}), "items[0].text"),
        (lambda c: c.add_items({900100: "x" * (MAX_TEXT_CHARS + 1)}), "items[0].text: must be 1..1000"),
        (lambda c: c.stub.AddItems(pb.AddItemsRequest(items=[pb.NewItem(item_id=900100, text="ok"),
                                                             pb.NewItem(text="no id")])), "items[1].item_id: missing"),
    ],
)
def test_bad_inputs_are_invalid_argument_and_service_keeps_serving(server, call, field):
    _, client, _ = server
    with pytest.raises(grpc.RpcError) as error:
        call(client)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    assert len(client.recommend(history=[raw(1)], k=3)) == 3


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand (no message class would send it)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


@pytest.mark.parametrize("method, request_bytes, field", [
    ("Recommend", field_bytes(1, field_bytes(2, b"caf\xe9 lover")) + b"\x10\x05", "user.profile"),
    ("AddItems", field_bytes(1, b"\x08\x91\xf7\x36" + field_bytes(2, b"ok")) + field_bytes(1, field_bytes(2, b"\xff")),
     "items[1].text"),
])
def test_request_that_is_not_utf8_is_invalid_argument_naming_the_field(server, method, request_bytes, field):
    address, client, _ = server
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/fedrec.v1.Recommender/{method}")  # raw bytes in and out
        with pytest.raises(grpc.RpcError) as error:
            call(request_bytes, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == f"{field}: not valid UTF-8"
    assert len(client.recommend(history=[raw(1)], k=3)) == 3


def test_add_items_at_the_documented_limits_is_received(server):
    """The largest request the limits allow (every character 4 UTF-8 bytes) gets through the
    receive cap; its last id repeats the first, so it is refused before any encoding."""
    _, client, _ = server
    items = {910000 + i: "\N{GRINNING FACE}" * MAX_TEXT_CHARS for i in range(MAX_NEW_ITEMS - 1)}
    request = add_request(items)
    request.items.add(item_id=910000, text="\N{GRINNING FACE}" * MAX_TEXT_CHARS)
    assert request.ByteSize() > 16 * 1024 * 1024  # the old cap
    with pytest.raises(grpc.RpcError) as error:
        client.stub.AddItems(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"items[{MAX_NEW_ITEMS - 1}].item_id: 910000 appears twice" in error.value.details()


def test_recommend_is_answered_while_add_items_encodes(server):
    """Recommend calls complete while a long AddItems is still encoding (before, they all
    waited for the model lock that AddItems held for its whole encoding)."""
    _, client, _ = server
    adding = threading.Thread(target=client.add_items, args=({920000 + i: f"{LONG_TEXT} {i}" for i in range(160)},))
    adding.start()
    time.sleep(0.5)  # let it reach the encoder
    answered = 0
    while adding.is_alive():
        client.recommend(history=[raw(1), raw(2)], k=5)
        answered += adding.is_alive()
    adding.join()
    assert answered >= 5
    assert 920159 in {i.item_id for i in client.recommend(history=[raw(1)], k=len(CATALOG))}


def test_concurrent_add_items_with_one_id_accept_exactly_one(server):
    _, client, _ = server
    start = threading.Barrier(2)
    outcomes: list = []

    def add(offset: int) -> None:
        items = {930000: f"the contested item {offset}"} | {930001 + offset + i: LONG_TEXT for i in range(40)}
        start.wait()
        try:
            outcomes.append(client.add_items(items))
        except grpc.RpcError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=add, args=(offset,)) for offset in (0, 1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(errors) == 1 and errors[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item_id: 930000 is" in errors[0].details()
    assert len([i for i in client.recommend(profile="sailors", k=len(CATALOG)) if i.item_id == 930000]) <= 1
    assert client.score([930000], history=[raw(1)])  # there, once


def test_health_and_reflection_v1_and_v1alpha(server):
    address, _, _ = server
    with grpc.insecure_channel(address) as channel:
        for service in ("", "fedrec.v1.Recommender"):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        alpha = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter(ask))
        # v1 has the same messages as v1alpha under another package: a v1 client sends these bytes
        v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                   request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                   response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)(iter(ask))
        for replies in (alpha, v1):
            names = {s.name for r in replies for s in r.list_services_response.service}
            assert {"fedrec.v1.Recommender", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names


def scores_now(client) -> list[float]:
    return client.score([raw(i) for i in range(20)], history=[raw(1), raw(2)])


def test_rejected_reload_changes_nothing_and_is_logged_once(served):
    before, scores = served.version(), scores_now(served.client)
    state, meta = adapters(seed=3)
    last = list(state)[-1]  # every tensor before it is valid, and different
    state[last] = torch.zeros(state[last].shape[0] + 1, *state[last].shape[1:])
    mark = len(served.lines)
    save_state(served.checkpoint, state, meta)
    served.wait_for(r"could not reload .*still serving version " + before, after=mark)
    time.sleep(3 * 1.0)  # three more polls of the file
    assert served.count("could not reload", after=mark) == 1
    assert served.version() == before
    assert scores_now(served.client) == scores


def test_deleted_checkpoint_is_logged_once_and_a_restored_one_served(served):
    before = served.version()
    mark = len(served.lines)
    served.checkpoint.unlink()
    served.wait_for(r"adapters.safetensors is gone; still serving version " + before, after=mark)
    time.sleep(3 * 1.0)
    assert served.count("is gone", after=mark) == 1
    write_adapters(served.checkpoint, seed=1)
    served.wait_for(r"reloaded .*model version", after=mark)
    assert served.count("could not reload", after=mark) == 0


def test_same_weights_keep_their_version_whatever_the_file_dtype(served, tmp_path):
    fp32 = served.version()
    state, meta = adapters(seed=1)
    fp64 = tmp_path / "fp64.safetensors"
    save_file({k: v.double() for k, v in state.items()}, fp64,
              metadata={"model_config": json.dumps(meta["model_config"])})
    mark = len(served.lines)
    fp64.replace(served.checkpoint)
    served.wait_for(r"reloaded .*model version", after=mark)
    assert served.version() == fp32


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


def test_a_second_server_on_the_same_port_fails_cleanly(served):
    """gRPC's default SO_REUSEPORT let two servers share one port (each got some callers)."""
    port = served.address.rsplit(":", 1)[1]
    second = subprocess.run(serve_command(served.checkpoint, port), capture_output=True, text=True, timeout=180)
    assert second.returncode != 0
    assert f"fedrec serve: error: --host 127.0.0.1 --port {port}: cannot listen there" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout


@pytest.mark.parametrize("port, checkpoint_bytes, message", [
    ("70000", None, "--port 70000: must be between 0 and 65535"),
    ("0", b"not a safetensors file", "cannot serve it"),
])
def test_bad_start_is_one_line_naming_the_flag(tmp_path, port, checkpoint_bytes, message):
    checkpoint = tmp_path / "adapters.safetensors"
    if checkpoint_bytes is None:
        write_adapters(checkpoint, seed=1)
    else:
        checkpoint.write_bytes(checkpoint_bytes)
    result = subprocess.run(serve_command(checkpoint, port), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if checkpoint_bytes is not None:
        assert f"--checkpoint {checkpoint}" in result.stderr


def test_adapters_files_are_fp32_and_a_bad_state_loads_nothing(tmp_path):
    state, meta = adapters(seed=1)
    path = tmp_path / "adapters.safetensors"
    save_state(path, {k: v.double() for k, v in state.items()}, meta)
    loaded, _ = load_state(path)
    assert {t.dtype for t in loaded.values()} == {torch.float32}
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    model = build_recommender(CATALOG.texts, RecommenderConfig(), progress=False)
    kept = model.trainable_state()
    bad = {k: v + 1 for k, v in state.items()}
    bad[list(bad)[-1]] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        model.load_trainable_state(bad)
    assert all(torch.equal(v, kept[k]) for k, v in model.trainable_state().items())
    with safe_open(path, framework="pt") as f:
        assert f.get_tensor(list(state)[0]).dtype == torch.float32


def test_catalog_growth_is_capped_and_racing_adds_of_one_id_accept_one(tmp_path):
    """The service runs AddItems one at a time; the model itself also refuses a second
    concurrent add of an id (its ids are reserved before the encoder runs)."""
    checkpoint = tmp_path / "adapters.safetensors"
    write_adapters(checkpoint, seed=1)
    model = ScoringModel(checkpoint, CATALOG, max_added=50)
    start, outcomes = threading.Barrier(2), []

    def add(offset: int) -> None:
        start.wait()
        try:
            outcomes.append(model.add_items([(950000, "contested")] + [(950001 + offset + i, LONG_TEXT)
                                                                        for i in range(20)]))
        except ValueError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=add, args=(offset,)) for offset in (0, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(type(o).__name__ for o in outcomes) == ["Added", "InvalidInput"]
    assert list(model.served.ids).count(950000) == 1
    assert len(model.served.texts) == len(CATALOG) + 21
    with pytest.raises(CatalogFull, match="items: 30 more would pass the cap of 50 items added"):
        model.add_items([(960000 + i, "one more") for i in range(30)])
    assert len(model.served.texts) == len(CATALOG) + 21


def test_items_with_non_finite_scores_are_never_recommended(tmp_path):
    """A broken model's NaN scores rank last (topk alone would rank them first) and are cut,
    like blocked items, when fewer than k items are left."""
    from dataclasses import replace

    from server.serving.scoring import UserInput

    checkpoint = tmp_path / "adapters.safetensors"
    write_adapters(checkpoint, seed=1)
    model = ScoringModel(checkpoint, CATALOG)
    catalog = model.served.catalog.clone()
    catalog[5] = float("nan")
    model.served = replace(model.served, catalog=catalog)
    queries = [model.prepare(UserInput([raw(1)]), 10, []),
               model.prepare(UserInput([raw(2)]), len(CATALOG) - 1, [])]
    (first, second), _ = model.recommend(queries)
    assert len(first.item_ids) == 10 and raw(5) not in first.item_ids
    assert len(second.item_ids) == len(CATALOG) - 2 and raw(5) not in second.item_ids
    assert all(np.isfinite(first.scores)) and all(np.isfinite(second.scores))
