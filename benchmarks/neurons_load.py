"""Load on the neurons service: concurrent clients calling GetActivations.

    python benchmarks/neurons_load.py [--clients 32] [--seconds 60] [--preset tiny] [--images 1] [--address H:P]

Starts ``downpour serve neurons`` (seeded random parameters of ``--preset``)
unless ``--address`` points at a running one, then runs ``--clients`` threads,
each with its own channel, calling GetActivations back to back with random
images for ``--seconds``. Prints requests/s, p50/p99/max latency and the error
count (which must be 0) as the last line, in JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

from downpour.nn import presets
from downpour.rpc.codec import tensor_to_proto
from downpour.up import free_port, wait_healthy
from downpour.v1 import neurons_pb2, neurons_pb2_grpc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument("--address", default="", help="a running neurons service (default: start one)")
    args = ap.parse_args()

    proc = None
    address = args.address
    if not address:
        port = free_port()
        log = tempfile.NamedTemporaryFile(prefix="neurons-load-", suffix=".log", delete=False)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "downpour.cli",
                "serve",
                "neurons",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--random-seed",
                "0",
                "--preset",
                args.preset,
                "--max-concurrent-rpcs",
                str(max(64, 2 * args.clients)),
                # every client waits its turn (this measures throughput, not the refusals past the queue)
                "--max-queued-queries",
                str(args.clients),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        address = f"127.0.0.1:{port}"
        wait_healthy(address, 120, proc)
    c, h, w = presets.get(args.preset).input
    with grpc.insecure_channel(address) as ch:
        layer = (
            neurons_pb2_grpc.NeuronsStub(ch)
            .DescribeModel(neurons_pb2.DescribeModelRequest(), timeout=30)
            .layers[-1]
            .name
        )

    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    errors: list[str] = []
    start = threading.Barrier(args.clients + 1)
    stop = threading.Event()

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        reqs = [
            neurons_pb2.GetActivationsRequest(
                images=tensor_to_proto(rng.random((args.images, h, w, c), dtype=np.float32)),
                layer=layer,
                neuron_ids=[0, 1, 2, 3],
            )
            for _ in range(8)
        ]
        with grpc.insecure_channel(address) as chan:
            stub = neurons_pb2_grpc.NeuronsStub(chan)
            stub.GetActivations(reqs[0], timeout=30)  # warm the connection up
            start.wait()
            k = 0
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    stub.GetActivations(reqs[k % len(reqs)], timeout=30)
                    latencies[i].append(time.perf_counter() - t)
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                k += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    try:
        start.wait()
        t0 = time.perf_counter()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join(60)
        elapsed = time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    lat = np.sort(np.concatenate([np.asarray(x) for x in latencies]))
    result = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "preset": args.preset,
        "images_per_request": args.images,
        "requests": int(lat.size),
        "requests_per_second": round(lat.size / elapsed, 1),
        "p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(lat, 99)), 2),
        "max_ms": round(1000 * float(lat[-1]), 2),
        "errors": len(errors),
        "cpus": os.cpu_count(),
    }
    if errors:
        print("first errors:", errors[:5], file=sys.stderr)
    print(json.dumps(result))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
