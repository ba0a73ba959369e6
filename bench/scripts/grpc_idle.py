"""Probe: what a bare gRPC round trip costs after the process sat idle, apart from the catalog's work.

A receiver asks the catalog once per refit, after seconds of generation. This times an empty echo
RPC against a server in its own process, each call after an idle gap, three ways: a unary call to a
thread-pool server (the catalog's kind), the same to an asyncio server, and a message on a
bidirectional stream held open. Medians of `--calls` per gap, in microseconds, one JSON line per way.
A measurement to report, not a test. Usage:

    .venv/bin/python bench/scripts/grpc_idle.py [--gaps-ms 0,10,100] [--calls 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import queue
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc


def _same(x: bytes) -> bytes:
    return x


def _echo(request: bytes, context: Any) -> bytes:
    return request


def _chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    yield from requests


def _handlers(echo: Callable[..., Any]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "Probe",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, _same, _same),
            "Chat": grpc.stream_stream_rpc_method_handler(_chat, _same, _same),
        },
    )


def _serve_threads(ports: Any) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([_handlers(_echo)])
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def _serve_asyncio(ports: Any) -> None:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([_handlers(echo)])
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _timed(call: Callable[[], object], gaps_ms: list[float], calls: int) -> dict[str, float]:
    for _ in range(20):
        call()
    out = {}
    for gap in gaps_ms:
        times = []
        for _ in range(calls):
            time.sleep(gap / 1e3)
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        out[f"gap_{gap:g}ms_median_us"] = round(statistics.median(times) * 1e6, 1)
    return out


def _measure(address: str, stream: bool, gaps: list[float], calls: int) -> dict[str, float]:
    with grpc.insecure_channel(address) as channel:
        if not stream:
            echo = channel.unary_unary("/Probe/Echo")
            return _timed(lambda: echo(b"x"), gaps, calls)
        sent: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        replies = channel.stream_stream("/Probe/Chat")(iter(sent.get, b""))

        def call() -> object:
            sent.put(b"x")
            return next(replies)

        try:
            return _timed(call, gaps, calls)
        finally:
            sent.put(b"")  # ends the request stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaps-ms", default="0,10,100")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    gaps = [float(g) for g in args.gaps_ms.split(",")]
    ways = (("unary, thread-pool server", _serve_threads, False), ("unary, asyncio server", _serve_asyncio, False),
            ("open bidirectional stream, thread-pool server", _serve_threads, True))  # fmt: skip
    for way, target, stream in ways:
        ports: Any = mp.Queue()
        server = mp.Process(target=target, args=(ports,), daemon=True)
        server.start()
        try:
            row = _measure(f"127.0.0.1:{ports.get(timeout=30)}", stream, gaps, args.calls)
            print(json.dumps({"way": way, "calls": args.calls, **row}), flush=True)
        finally:
            server.kill()


if __name__ == "__main__":
    main()
