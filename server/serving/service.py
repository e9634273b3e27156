"""The gRPC scoring service: Recommend, Score and AddItems, health checking, reflection
(v1 and v1alpha), and hot reload of the checkpoint.

Requests are checked one by one (a bad one gets INVALID_ARGUMENT naming its field and
never affects the others, even one whose bytes do not parse), then concurrent Recommend
requests are answered together in one batched forward pass: on 2 cores that is what lets
one Python process serve thousands of requests a second.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as reflection_pb
from safetensors import SafetensorError

from server.serving import recommender_pb2 as pb
from server.serving.scoring import (
    Added, CatalogFull, InvalidInput, Query, Ranked, ScoringModel, UserInput, max_request_bytes,
)
from shared_model.data import Catalog

log = logging.getLogger("fedrec.serve")
SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"]
SERVICE_NAME = SERVICE.full_name
# The v1 reflection protocol is v1alpha's under a new package name, byte for byte; the
# grpcio-reflection package serves only v1alpha, and current tools (grpcurl, Postman) ask v1.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
MAX_BATCH = 64
# The batch runs on the event loop's thread (in a worker thread, each of its ~80 torch calls
# gave up the GIL and waited for the busy loop to hand it back), so calls that arrive
# meanwhile wait in gRPC, which hands them to the loop a few per turn: the batcher waits in
# steps of GATHER_SECONDS (epoll's 1 ms granularity) while the queue grows. A/B in
# alternating slices on this shared 2-core machine: +50% calls/s at 16 and 64 callers;
# only after a batch of several, so that a lone caller waits for nothing.
GATHER_SECONDS = 0.001
RELOAD_EVERY_SECONDS = 1.0
GIL_SWITCH_SECONDS = 0.0005


class StartupError(Exception):
    """The server cannot start; the message names the flag to change."""


class Unreadable:
    """A request whose bytes do not parse; the handler answers INVALID_ARGUMENT with `detail`."""

    def __init__(self, detail: str):
        self.detail = detail


def _lenient_messages() -> dict[str, type[Message]]:
    """Our messages with every string field read as bytes (the same wire format), to name
    the field of a request that is not valid UTF-8 (the strict parse only fails)."""
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = "fedrec_lenient.proto", "fedrec.lenient"
    del proto.service[:]
    for message in proto.message_type:
        for field in message.field:
            if field.type == field.TYPE_STRING:
                field.type = field.TYPE_BYTES
            if field.type_name:
                field.type_name = field.type_name.replace(".fedrec.v1.", ".fedrec.lenient.")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"fedrec.lenient.{m.name}"))
            for m in proto.message_type}


LENIENT = _lenient_messages()


def not_utf8(message: Message, prefix: str = "") -> str | None:
    """The path (e.g. `user.profile`, `items[3].text`) of the first bytes field that is not UTF-8."""
    for field, value in message.ListFields():
        repeated = field.is_repeated
        for index, item in enumerate(value if repeated else [value]):
            path = f"{prefix}{field.name}[{index}]" if repeated else f"{prefix}{field.name}"
            if field.type == field.TYPE_MESSAGE:
                found = not_utf8(item, path + ".")
                if found:
                    return found
            elif field.type == field.TYPE_BYTES:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    return path
    return None


def reader(message: type[Message]) -> Callable[[bytes], Message | Unreadable]:
    """A request deserializer that turns bytes that do not parse into an `Unreadable` (gRPC
    would answer UNKNOWN) naming the field."""
    name = message.DESCRIPTOR.name

    def read(data: bytes) -> Message | Unreadable:
        try:
            return message.FromString(data)
        except DecodeError as error:
            try:
                field = not_utf8(LENIENT[name].FromString(data))
            except DecodeError:
                field = None
            if field:
                return Unreadable(f"{field}: not valid UTF-8")
            return Unreadable(f"request: not a valid {message.DESCRIPTOR.full_name} ({error})")

    return read


def user_of(message: pb.UserInput) -> UserInput:
    return UserInput(list(message.history), message.profile)


def reply_of(ranked: Ranked, version: str) -> pb.RecommendResponse:
    return pb.RecommendResponse(
        items=[pb.Recommendation(item_id=i, score=s, text=t, because=b) for i, s, t, b in zip(*ranked)],
        model_version=version,
    )


class Batcher:
    """Collects Recommend queries that arrive together and answers them in one pass. It waits
    for more (in GATHER_SECONDS steps) only after a batch of several: a lone caller pays no wait."""

    def __init__(self, model: ScoringModel):
        self.model = model
        self.queue: asyncio.Queue = asyncio.Queue()

    async def submit(self, query: Query) -> tuple[Ranked, str]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((query, future))
        return await future

    async def run(self) -> None:
        previous = 1  # the last batch's size: calls came together, so more are likely on their way
        while True:
            batch = [await self.queue.get()]
            while previous > 1 and self.queue.qsize() + 1 < MAX_BATCH:  # gather while calls keep arriving
                waiting = self.queue.qsize()
                await asyncio.sleep(GATHER_SECONDS)
                if self.queue.qsize() == waiting:
                    break
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            previous = len(batch)
            try:
                results, version = self.model.recommend([q for q, _ in batch])
            except Exception as error:  # never leave a caller hanging
                log.exception("batch failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result((result, version))


class RecommenderService:
    """The three RPCs; each first answers a request that did not parse."""

    def __init__(self, model: ScoringModel, batcher: Batcher):
        self.model = model
        self.batcher = batcher
        # AddItems calls encode one at a time on a thread of their own: in the shared pool,
        # a few long ones would hold every thread that Recommend batches run on.
        self.encoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="add-items")

    async def Recommend(self, request: pb.RecommendRequest | Unreadable, context: grpc.aio.ServicerContext):
        if isinstance(request, Unreadable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)
        try:
            query = self.model.prepare(user_of(request.user), request.k, list(request.exclude))
        except InvalidInput as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return reply_of(*await self.batcher.submit(query))

    async def Score(self, request: pb.ScoreRequest | Unreadable, context: grpc.aio.ServicerContext):
        if isinstance(request, Unreadable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)
        try:
            scores, version = await asyncio.get_running_loop().run_in_executor(
                None, self.model.score, user_of(request.user), list(request.item_ids))
        except InvalidInput as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.ScoreResponse(scores=scores, model_version=version)

    async def AddItems(self, request: pb.AddItemsRequest | Unreadable, context: grpc.aio.ServicerContext):
        if isinstance(request, Unreadable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)
        items = [(item.item_id if item.HasField("item_id") else None, item.text) for item in request.items]
        try:
            added: Added = await asyncio.get_running_loop().run_in_executor(self.encoding, self.model.add_items,
                                                                            items)
        except InvalidInput as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except CatalogFull as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        return pb.AddItemsResponse(added=len(items), catalog_size=added.catalog_size, truncated=added.truncated)


def add_recommender(service: RecommenderService, server: grpc.aio.Server) -> None:
    """Register the RPCs with our own request readers (see `reader`)."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(service, method.name),
            request_deserializer=reader(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def add_reflection(server: grpc.aio.Server) -> None:
    """Reflection under both the v1alpha and the v1 service names."""
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(names)
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb.ServerReflectionResponse.SerializeToString,
        )}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)


async def watch_checkpoint(model: ScoringModel) -> None:
    """Reload the adapters whenever their file is rewritten; a bad or deleted file keeps the
    old model serving and is logged once (until the file changes again)."""
    loop = asyncio.get_running_loop()
    missing = False
    while True:
        await asyncio.sleep(RELOAD_EVERY_SECONDS)
        try:
            reloaded = await loop.run_in_executor(None, model.reload_if_newer)
        except FileNotFoundError:
            if not missing:
                log.warning("%s is gone; still serving version %s", model.checkpoint, model.served.version)
            missing = True
            continue
        except Exception as error:  # a half-written or foreign file: keep serving
            log.warning("could not reload %s (%s); still serving version %s", model.checkpoint, error,
                        model.served.version)
        else:
            if reloaded:
                log.info("reloaded %s: model version %s", model.checkpoint, model.served.version)
        missing = False


async def serve(model: ScoringModel, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    # so_reuseport off: gRPC sets SO_REUSEPORT by default, which lets a second server bind
    # the same port and silently take half of the connections.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_request_bytes()),
                                      ("grpc.so_reuseport", 0)])
    batcher = Batcher(model)
    add_recommender(RecommenderService(model, batcher), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_reflection(server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc's own message only says to turn on its debug log
        bound = 0
    if not bound:
        raise StartupError(f"--host {host} --port {port}: cannot listen there (in use by another process, "
                           f"or not an address of this machine)")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(watch_checkpoint(model))]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %s (model version %s, %d items) on %s:%d", model.checkpoint, model.served.version,
             len(model.served.texts), host, bound)
    print(f"fedrec serve: listening on {host}:{bound}", flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=2.0)
    for task in tasks:
        task.cancel()


def load_model(checkpoint: Path, catalog: Catalog) -> ScoringModel:
    """The model to serve, or a StartupError naming --checkpoint."""
    if not checkpoint.is_file():
        raise StartupError(f"--checkpoint {checkpoint}: no such file")
    try:
        return ScoringModel(checkpoint, catalog)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise StartupError(f"--checkpoint {checkpoint}: cannot serve it ({error})") from None


def run_server(checkpoint: Path, catalog: Catalog, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM; a start-up problem exits with one line naming the flag."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if not 0 <= port <= 65535:  # gRPC would listen on port % 65536
            raise StartupError(f"--port {port}: must be between 0 and 65535 (0 picks a free port)")
        # One thread per op: the model's ops are small, and with two threads each op waits for
        # the other core, which under load is busy with gRPC (measured: 5 ms a call instead of 1).
        torch.set_num_threads(1)
        # Each torch call of a batch gives up the GIL; while AddItems encodes in its thread,
        # taking it back waited up to the switch interval (5 ms by default) every time.
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        # The tokenizer's own thread pool would take both cores during AddItems.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        model = load_model(checkpoint, catalog)
        # The imports and the model leave ~400k long-lived objects; a full collection walked
        # them all, stalling every request for ~200 ms every few seconds under load (p99 245 ms
        # at 64 callers). Frozen, they are skipped.
        gc.collect()
        gc.freeze()
        asyncio.run(serve(model, host, port))
    except StartupError as error:
        raise SystemExit(f"fedrec serve: error: {error}") from None
