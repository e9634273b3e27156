"""The gRPC scoring service: Recommend, Score and AddItems, health checking, reflection,
and hot reload of the checkpoint.

Requests are checked one by one (a bad one gets INVALID_ARGUMENT naming its field and
never affects the others), then concurrent Recommend requests are answered together in
one batched forward pass: on 2 cores that is what lets one Python process serve
thousands of requests a second.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.serving import recommender_pb2 as pb
from server.serving import recommender_pb2_grpc as pb_grpc
from server.serving.scoring import InvalidInput, Query, ScoringModel, UserInput

log = logging.getLogger("fedrec.serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
MAX_BATCH = 64
RELOAD_EVERY_SECONDS = 1.0


def user_of(message: pb.UserInput) -> UserInput:
    return UserInput(list(message.history), message.profile)


class Batcher:
    """Collects Recommend queries that arrive together and answers them in one pass."""

    def __init__(self, model: ScoringModel):
        self.model = model
        self.queue: asyncio.Queue = asyncio.Queue()

    async def submit(self, query: Query):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((query, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                results = await loop.run_in_executor(None, self.model.recommend, [q for q, _ in batch])
            except Exception as error:  # never leave a caller hanging
                log.exception("batch failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


class RecommenderService(pb_grpc.RecommenderServicer):
    def __init__(self, model: ScoringModel, batcher: Batcher):
        self.model = model
        self.batcher = batcher

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext):
        try:
            query = self.model.prepare(user_of(request.user), request.k, list(request.exclude))
        except InvalidInput as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        results = await self.batcher.submit(query)
        return pb.RecommendResponse(
            items=[pb.Recommendation(item_id=r.item_id, score=r.score, text=r.text, because=r.because)
                   for r in results],
            model_version=self.model.version,
        )

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext):
        try:
            scores = await asyncio.get_running_loop().run_in_executor(
                None, self.model.score, user_of(request.user), list(request.item_ids))
        except InvalidInput as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.ScoreResponse(scores=scores, model_version=self.model.version)

    async def AddItems(self, request: pb.AddItemsRequest, context: grpc.aio.ServicerContext):
        items = [(item.item_id, item.text) for item in request.items]
        try:
            size = await asyncio.get_running_loop().run_in_executor(None, self.model.add_items, items)
        except InvalidInput as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.AddItemsResponse(added=len(items), catalog_size=size)


async def watch_checkpoint(model: ScoringModel) -> None:
    """Reload the adapters whenever their file is rewritten; a bad file keeps the old model."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(RELOAD_EVERY_SECONDS)
        try:
            if await loop.run_in_executor(None, model.reload_if_newer):
                log.info("reloaded %s: model version %s", model.checkpoint, model.version)
        except Exception as error:  # a half-written or foreign file: keep serving
            log.warning("could not reload %s (%s); still serving version %s", model.checkpoint, error,
                        model.version)


async def serve(model: ScoringModel, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    batcher = Batcher(model)
    pb_grpc.add_RecommenderServicer_to_server(RecommenderService(model, batcher), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"could not listen on {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(watch_checkpoint(model))]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %s (model version %s, %d items) on %s:%d", model.checkpoint, model.version,
             len(model.texts), host, bound)
    print(f"fedrec serve: listening on {host}:{bound}", flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=2.0)
    for task in tasks:
        task.cancel()


def run_server(checkpoint: Path, catalog, host: str, port: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # One thread per op: the model's ops are small, and with two threads each op waits for
    # the other core, which under load is busy with gRPC (measured: 5 ms a call instead of 1).
    torch.set_num_threads(1)
    model = ScoringModel(checkpoint, catalog)
    # The imports and the model leave ~400k long-lived objects; a full collection walked
    # them all, stalling every request for ~200 ms every few seconds under load (p99 245 ms
    # at 64 callers). Frozen, they are skipped.
    gc.collect()
    gc.freeze()
    asyncio.run(serve(model, host, port))
