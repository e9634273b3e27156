"""Load benchmark of the scoring service: closed-loop async gRPC callers on loopback.

Starts `fedrec serve` on a free port, then for each concurrency runs that many callers,
each sending its next Recommend (k=10, a real test user's history) as soon as the last
one returns, and reports QPS and p50/p99 latency. The callers share the machine's 2 cores
with the server.

    python -m simulations.bench_serving --checkpoint runs/<run>/best_adapters.safetensors --dataset ml-100k
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from server.serving import recommender_pb2 as pb  # noqa: E402
from server.serving import recommender_pb2_grpc as pb_grpc  # noqa: E402
from shared_model.cli_options import add_dataset_options  # noqa: E402
from shared_model.datasets import load_dataset  # noqa: E402
from shared_model.splits import leave_one_out  # noqa: E402


class CannedRecommender(pb_grpc.RecommenderServicer):
    """The transport's ceiling: a reply of the same size as the real one, no model at all."""

    async def Recommend(self, request, context):
        return pb.RecommendResponse(items=[pb.Recommendation(item_id=i, score=1.0, text="Toy Story (1995). Genres: "
                                                             "Animation, Children's, Comedy", because=[1, 2, 3])
                                           for i in range(request.k)], model_version="canned")


async def serve_canned() -> None:
    server = grpc.aio.server()
    pb_grpc.add_RecommenderServicer_to_server(CannedRecommender(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def start_server(args: argparse.Namespace, canned: bool = False) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "server.cli", "serve", "--checkpoint", args.checkpoint,
               "--dataset", args.dataset, "--port", "0"] + (["--data-dir", args.data_dir] if args.data_dir else [])
    if canned:
        command = [sys.executable, "-m", "simulations.bench_serving", "--canned-server"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        match = re.search(r"listening on (\S+:\d+)", line)
        if match:
            return proc, match.group(1)
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


async def closed_loop(address: str, requests: list, callers: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderStub(channel)

        async def caller(offset: int) -> None:
            i = offset
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                await stub.Recommend(requests[i % len(requests)])
                latencies.append(time.perf_counter() - start)
                i += callers

        await asyncio.gather(*(caller(c) for c in range(callers)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="adapters file to serve")
    parser.add_argument("--canned-server", action="store_true", help=argparse.SUPPRESS)
    add_dataset_options(parser, default="ml-100k")
    parser.add_argument("--concurrency", default="1,16,64", help="callers per step (default 1,16,64)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per step (default 15)")
    parser.add_argument("--out", default="runs", help="where the JSON and the figure go")
    args = parser.parse_args()
    if args.canned_server:
        asyncio.run(serve_canned())
        return
    if not args.checkpoint:
        parser.error("--checkpoint is required")

    dataset = load_dataset(args.dataset, args.data_dir)
    raw_ids = dataset.catalog.raw_ids
    cases = leave_one_out(dataset).cases("test")
    requests = [pb.RecommendRequest(user=pb.UserInput(history=[int(raw_ids[i]) for i in h[-50:]]), k=10)
                for h in cases.histories]
    gc.collect()
    gc.freeze()  # the callers' own full collections would show up as server latency
    results = []
    for server in ("fedrec serve", "canned replies (transport ceiling)"):
        proc, address = start_server(args, canned=server != "fedrec serve")
        try:
            for callers in (int(c) for c in args.concurrency.split(",")):
                asyncio.run(closed_loop(address, requests, callers, 2.0))  # warm-up
                latencies = np.array(asyncio.run(closed_loop(address, requests, callers, args.seconds)))
                results.append({"server": server, "callers": callers, "qps": len(latencies) / args.seconds,
                                "p50_ms": 1000 * float(np.percentile(latencies, 50)),
                                "p99_ms": 1000 * float(np.percentile(latencies, 99))})
                print(json.dumps(results[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serving.json").write_text(json.dumps(results, indent=2))
    fig, (qps, lat) = plt.subplots(1, 2, figsize=(9, 3.5))
    for server, style in (("fedrec serve", "-o"), ("canned replies (transport ceiling)", "--s")):
        mine = [r for r in results if r["server"] == server]
        callers = [r["callers"] for r in mine]
        qps.plot(callers, [r["qps"] for r in mine], style, label=server)
        lat.plot(callers, [r["p99_ms"] for r in mine], style, label=f"p99, {server}")
        lat.plot(callers, [r["p50_ms"] for r in mine], ":", label=f"p50, {server}")
    qps.legend(fontsize=7)
    qps.set_xscale("log", base=2)
    qps.set_xlabel("concurrent callers")
    qps.set_ylabel("Recommend calls / s")
    lat.set_xscale("log", base=2)
    lat.set_xlabel("concurrent callers")
    lat.set_ylabel("latency (ms)")
    lat.legend(fontsize=7)
    for ax in (qps, lat):
        ax.grid(alpha=0.3)
    fig.suptitle(f"fedrec serve, {args.dataset}, k=10, loopback, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(out / "bench_serving.png", dpi=110)


if __name__ == "__main__":
    main()
