"""Load benchmark of the scoring service: closed-loop async gRPC callers on loopback.

1. Throughput: starts `fedrec serve` and a server of canned replies (no model: the
   transport's ceiling) on free ports, then for each concurrency runs that many callers,
   each sending its next Recommend (k=10, a real test user's history) as soon as the last
   one returns, against each server in alternating 3 s slices (so that both meet the same
   load), and reports QPS and p50/p99 latency, and fedrec's QPS as a share of the canned
   server's (target >= 60%).
2. AddItems: a fresh `fedrec serve`, one AddItems of --add-items items of --add-words
   words while --add-callers callers keep sending Recommend: the longest Recommend meanwhile
   (target <= 100 ms) and the server's RSS growth (peak and after) against 2x the size of
   the new items' vectors and token rows (what the server must keep for them).

The callers share the machine's cores with the server.

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

FEDREC, CANNED = "fedrec serve", "canned replies (transport ceiling)"
QPS_TARGET = 0.60  # fedrec's QPS as a share of the canned server's
STALL_TARGET_MS = 100.0  # the longest Recommend during AddItems
RSS_FACTOR = 2.0  # RSS growth allowed, in multiples of the new items' vectors and token rows
SLICE_SECONDS = 3.0  # the two servers are measured in alternating slices of this length


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


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


async def closed_loop(address: str, requests: list, callers: int, seconds: float,
                      until: asyncio.Future | None = None) -> list[tuple[float, float]]:
    """(start time, latency) of every Recommend, for `seconds` or until `until` is done."""
    calls: list[tuple[float, float]] = []
    stop_at = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderStub(channel)

        async def caller(offset: int) -> None:
            i = offset
            while time.perf_counter() < stop_at and not (until is not None and until.done()):
                start = time.perf_counter()
                await stub.Recommend(requests[i % len(requests)])
                calls.append((start, time.perf_counter() - start))
                i += callers

        await asyncio.gather(*(caller(c) for c in range(callers)))
    return calls


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def new_items(args: argparse.Namespace, catalog_texts: list[str]) -> dict[int, str]:
    """--add-items texts of --add-words words each, drawn (seeded) from the catalog's words."""
    words = sorted({w for text in catalog_texts for w in re.findall(r"[A-Za-z]+", text)})
    rng = np.random.default_rng(0)
    return {10_000_000 + i: " ".join(rng.choice(words, size=args.add_words)) for i in range(args.add_items)}


def kept_bytes(texts: list[str], checkpoint: str) -> int:
    """What the server must keep for new items: their vectors (fp32) and their encoder
    token rows (fp16 projection inputs and fp32 frozen sums per token read, and each text's
    offset and length), as the catalog cache stores them."""
    from shared_model.encoder import MAX_TOKENS, default_encoder_path, load_encoder
    from shared_model.recommender import RecommenderConfig
    from shared_model.state import load_state

    config = RecommenderConfig.from_dict(load_state(checkpoint)[1]["model_config"])
    tokenizer, encoder = load_encoder(config.encoder_path or default_encoder_path())
    tokens = sum(min(len(ids), MAX_TOKENS) for ids in tokenizer(texts)["input_ids"])
    hidden, inner = encoder.config.hidden_size, encoder.config.intermediate_size
    rows = tokens * (2 * inner + 4 * hidden) + 16 * len(texts) if config.lora_layers else 4 * hidden * len(texts)
    return rows + 4 * config.dim * len(texts)


async def add_while_serving(address: str, pid: int, requests: list, items: dict[int, str],
                            callers: int) -> dict:
    """One AddItems while `callers` keep sending Recommend; RSS sampled every 0.1 s."""
    rss: list[int] = [rss_bytes(pid)]
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        # Serialised before the clock starts: in this process it would stall the callers.
        request = pb.AddItemsRequest(items=[pb.NewItem(item_id=i, text=t) for i, t in items.items()])
        add = channel.unary_unary("/fedrec.v1.Recommender/AddItems",
                                  response_deserializer=pb.AddItemsResponse.FromString)
        payload = request.SerializeToString()
        started = time.perf_counter()
        adding = asyncio.ensure_future(add(payload, timeout=1800))

        async def sample() -> None:
            while not adding.done():
                rss.append(rss_bytes(pid))
                await asyncio.sleep(0.1)

        calls, _ = await asyncio.gather(closed_loop(address, requests, callers, 1e9, until=adding), sample())
        reply = await adding
        seconds = time.perf_counter() - started
    await asyncio.sleep(1.0)
    return {"calls": calls, "started": started, "seconds": seconds, "reply": reply, "rss": rss,
            "rss_after": rss_bytes(pid)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="adapters file to serve")
    parser.add_argument("--canned-server", action="store_true", help=argparse.SUPPRESS)
    add_dataset_options(parser, default="ml-100k")
    parser.add_argument("--concurrency", default="1,16,64", help="callers per step (default 1,16,64)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per step (default 15)")
    parser.add_argument("--add-items", type=int, default=10_000, help="items in the one AddItems (default 10000)")
    parser.add_argument("--add-words", type=int, default=100, help="words per added item (default 100)")
    parser.add_argument("--add-callers", type=int, default=4,
                        help="callers sending Recommend during the AddItems (default 4)")
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
    items = new_items(args, dataset.catalog.texts)
    bound = RSS_FACTOR * kept_bytes(list(items.values()), args.checkpoint)
    gc.collect()
    gc.freeze()  # the callers' own full collections would show up as server latency
    results = []
    servers = {server: start_server(args, canned=server == CANNED) for server in (FEDREC, CANNED)}
    try:
        for callers in (int(c) for c in args.concurrency.split(",")):
            latencies: dict[str, list[float]] = {server: [] for server in servers}
            for server, (_, address) in servers.items():
                asyncio.run(closed_loop(address, requests, callers, 2.0))  # warm-up
            # Alternating slices: the other engineers' load on this shared machine changes by
            # the minute, and both servers should meet the same load.
            slices = max(1, round(args.seconds / SLICE_SECONDS))
            for _ in range(slices):
                for server, (_, address) in servers.items():
                    calls = asyncio.run(closed_loop(address, requests, callers, args.seconds / slices))
                    latencies[server] += [t for _, t in calls]
            for server, measured in latencies.items():
                results.append({"server": server, "callers": callers, "qps": len(measured) / args.seconds,
                                "p50_ms": 1000 * float(np.percentile(measured, 50)),
                                "p99_ms": 1000 * float(np.percentile(measured, 99))})
                print(json.dumps(results[-1]), flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    ratios = {r["callers"]: r["qps"] / c["qps"] for r in results for c in results
              if r["server"] == FEDREC and c["server"] == CANNED and c["callers"] == r["callers"]}
    for callers, ratio in ratios.items():
        print(f"QPS ratio fedrec / canned at {callers} callers: {ratio:.0%} (target >= {QPS_TARGET:.0%})", flush=True)

    proc, address = start_server(args)
    try:
        asyncio.run(closed_loop(address, requests, args.add_callers, 2.0))  # warm-up
        added = asyncio.run(add_while_serving(address, proc.pid, requests, items, args.add_callers))
    finally:
        stop_server(proc)
    latencies_ms = np.array([1000 * t for _, t in added["calls"]])
    adding = {
        "items": args.add_items, "words": args.add_words, "callers": args.add_callers,
        "add_seconds": added["seconds"], "truncated": added["reply"].truncated,
        "recommends_meanwhile": len(latencies_ms), "max_ms": float(latencies_ms.max()),
        "p99_ms": float(np.percentile(latencies_ms, 99)),
        "rss_before_mb": added["rss"][0] / 2**20, "rss_peak_growth_mb": (max(added["rss"]) - added["rss"][0]) / 2**20,
        "rss_growth_after_mb": (added["rss_after"] - added["rss"][0]) / 2**20, "rss_bound_mb": bound / 2**20,
    }
    print(json.dumps(adding), flush=True)
    print(f"AddItems of {args.add_items:,} items of {args.add_words} words took {added['seconds']:.1f} s; "
          f"the longest of {len(latencies_ms):,} Recommend calls meanwhile: {adding['max_ms']:.0f} ms "
          f"(target <= {STALL_TARGET_MS:.0f} ms); RSS growth {adding['rss_growth_after_mb']:.0f} MB after, "
          f"{adding['rss_peak_growth_mb']:.0f} MB at peak (bound {adding['rss_bound_mb']:.0f} MB)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serving.json").write_text(json.dumps(
        {"load": results, "qps_ratio": {str(k): v for k, v in ratios.items()}, "add_items": adding}, indent=2))
    fig, (qps, lat, stall) = plt.subplots(1, 3, figsize=(13, 3.5))
    for server, style in ((FEDREC, "-o"), (CANNED, "--s")):
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
    stall.plot([s - added["started"] for s, _ in added["calls"]], latencies_ms, ".", markersize=2)
    stall.axhline(STALL_TARGET_MS, color="red", linestyle="--", label=f"target {STALL_TARGET_MS:.0f} ms")
    stall.set_xlabel(f"seconds into AddItems of {args.add_items:,} items")
    stall.set_ylabel(f"Recommend latency (ms), {args.add_callers} callers")
    stall.legend(fontsize=7)
    for ax in (qps, lat, stall):
        ax.grid(alpha=0.3)
    ratio = ratios[max(ratios)] if ratios else float("nan")
    fig.suptitle(f"fedrec serve, {args.dataset}, k=10, loopback, 2 CPU cores: {ratio:.0%} of the canned QPS "
                 f"at {max(ratios) if ratios else '-'} callers")
    fig.tight_layout()
    fig.savefig(out / "bench_serving.png", dpi=110)


if __name__ == "__main__":
    main()
