"""A small Python client of the scoring service (what `fedrec recommend` uses)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from server.serving import recommender_pb2 as pb
from server.serving import recommender_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Recommended:
    item_id: int
    score: float
    text: str
    because: list[int]


class RecommenderClient:
    """client = RecommenderClient("127.0.0.1:50051"); client.recommend(history=[50, 172], k=5)"""

    def __init__(self, address: str, timeout: float = 30.0):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.timeout = timeout

    def recommend(self, history=(), profile: str = "", k: int = 10, exclude=()) -> list[Recommended]:
        reply = self.stub.Recommend(
            pb.RecommendRequest(user=pb.UserInput(history=list(history), profile=profile), k=k,
                                exclude=list(exclude)),
            timeout=self.timeout,
        )
        return [Recommended(r.item_id, r.score, r.text, list(r.because)) for r in reply.items]

    def score(self, item_ids, history=(), profile: str = "") -> list[float]:
        reply = self.stub.Score(
            pb.ScoreRequest(user=pb.UserInput(history=list(history), profile=profile), item_ids=list(item_ids)),
            timeout=self.timeout,
        )
        return list(reply.scores)

    def add_items(self, items: dict[int, str]) -> int:
        """Add new items (id -> text); returns the catalog size."""
        reply = self.stub.AddItems(
            pb.AddItemsRequest(items=[pb.NewItem(item_id=i, text=t) for i, t in items.items()]),
            timeout=self.timeout,
        )
        return reply.catalog_size

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
