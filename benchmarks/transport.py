"""Transport benchmark: how close do downpour's Pull and Push get to the machine?

    .venv/bin/python benchmarks/transport.py            # 256 MB, 1/2/4 shards (~1-2 min)
    .venv/bin/python benchmarks/transport.py --quick    # 64 MB, 1/2 shards

Measures, in one run, each server in its own process on 127.0.0.1:

* raw TCP loopback throughput between two processes (sendall / recv_into of a
  preallocated buffer): the physical-limit proxy on this machine;
* the peer: a plain grpcio service moving the same bytes as 1 MB protobuf
  ``bytes`` messages (client-streaming upload, server-streaming download, no
  apply, stock protobuf (de)serialisers);
* the ceiling of grpcio itself: the same streams with raw ``bytes`` messages
  (no protobuf, no copy on either side, nothing done with the data);
* downpour: pull and push (Adagrad applied) of a parameter set over 1, 2 and
  4 shard processes, through ParamClient;
* Adagrad apply throughput against a memcpy of the same size.

Every transfer is also charged the CPU time of both processes (client and
server), as CPU-seconds per GB: on a shared or small machine that is the
steadier number, since wall-clock throughput moves with whatever else runs.
Prints a table; the last line is JSON with the ratios to raw TCP and to the
peer (best wall-clock of --repeats; lowest CPU cost of --repeats).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from downpour import optim
from downpour.paramserver.client import ParamClient
from downpour.rpc.channel import ChannelConfig
from downpour.v1 import common_pb2

MB = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def proc_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by running processes (Linux /proc)."""
    total = 0.0
    for pid in pids:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(f[11]) + int(f[12])) / _TICK
    return total


class Best:
    """Best wall-clock rate and lowest CPU cost over repeats."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.rate, self.cpu = nbytes, 0.0, float("inf")

    def add(self, seconds: float, cpu_seconds: float) -> None:
        self.rate = max(self.rate, self.nbytes / seconds)
        self.cpu = min(self.cpu, cpu_seconds / (self.nbytes / 1e9))


# -- raw TCP --------------------------------------------------------------------
def _tcp_sender(port: int, total: int, piece: int) -> None:
    buf = memoryview(np.ones(piece, np.uint8))
    with socket.create_connection(("127.0.0.1", port)) as s:
        sent = 0
        while sent < total:
            n = min(piece, total - sent)
            s.sendall(buf[:n])
            sent += n


def raw_tcp(total: int, repeats: int, piece: int = 4 * MB) -> Best:
    """Bytes/s from first to last byte received, between two processes."""
    best = Best(total)
    for _ in range(repeats):
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            c0, s0 = children_cpu(), self_cpu()
            p = mp.get_context("fork").Process(target=_tcp_sender, args=(srv.getsockname()[1], total, piece))
            p.start()
            conn, _ = srv.accept()
            buf = memoryview(bytearray(piece))
            got = conn.recv_into(buf)
            t0 = time.perf_counter()
            while got < total:
                n = conn.recv_into(buf)
                if not n:
                    break
                got += n
            dt = time.perf_counter() - t0
            conn.close()
            p.join()
            best.add(dt, children_cpu() - c0 + self_cpu() - s0)
    return best


# -- the plain grpcio peer --------------------------------------------------------
PEER = "/bench.Peer/"
_OPTS = [("grpc.max_receive_message_length", 64 * MB), ("grpc.max_send_message_length", 64 * MB)]


def _peer_server(port_q, total: int, msg_bytes: int) -> None:
    data = np.ones(total // 4, np.float32).view(np.uint8)

    def upload(it, ctx):
        n = 0
        for m in it:
            n += len(m.data)
        return common_pb2.Tensor(shape=[n])

    def download(req, ctx):
        for a in range(0, data.size, msg_bytes):
            yield common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, data=data[a : a + msg_bytes].tobytes())

    def upload_raw(it, ctx):
        n = 0
        for m in it:
            n += len(m)
        return b""

    def download_raw(req, ctx):
        msg = data[:msg_bytes].tobytes()  # the same object every time: no work on our side
        for _ in range(0, data.size, msg_bytes):
            yield msg

    server = grpc.server(futures.ThreadPoolExecutor(4), options=_OPTS)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Peer",
                {
                    "Upload": grpc.stream_unary_rpc_method_handler(
                        upload, common_pb2.Tensor.FromString, common_pb2.Tensor.SerializeToString
                    ),
                    "Download": grpc.unary_stream_rpc_method_handler(
                        download, common_pb2.Tensor.FromString, common_pb2.Tensor.SerializeToString
                    ),
                    "UploadRaw": grpc.stream_unary_rpc_method_handler(upload_raw),
                    "DownloadRaw": grpc.unary_stream_rpc_method_handler(download_raw),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_q.put(port)
    server.wait_for_termination()


def peer(total: int, repeats: int, msg_bytes: int = MB) -> dict[str, Best]:
    """The plain grpcio service (download, upload) and grpcio's no-work ceiling."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_peer_server, args=(q, total, msg_bytes), daemon=True)
    p.start()
    port = q.get(timeout=30)
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=_OPTS)
    down = ch.unary_stream(PEER + "Download", common_pb2.Tensor.SerializeToString, common_pb2.Tensor.FromString)
    up = ch.stream_unary(PEER + "Upload", common_pb2.Tensor.SerializeToString, common_pb2.Tensor.FromString)
    down_raw, up_raw = ch.unary_stream(PEER + "DownloadRaw"), ch.stream_unary(PEER + "UploadRaw")
    data = np.ones(total // 4, np.float32).view(np.uint8)
    raw_msg = data[:msg_bytes].tobytes()
    out = np.empty(total, np.uint8)

    def do_down():
        off = 0
        for m in down(common_pb2.Tensor()):
            out[off : off + len(m.data)] = np.frombuffer(m.data, np.uint8)
            off += len(m.data)

    def do_up():
        up(
            common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, data=data[a : a + msg_bytes].tobytes())
            for a in range(0, total, msg_bytes)
        )

    def do_down_raw():
        for _m in down_raw(b""):
            pass

    def do_up_raw():
        up_raw(raw_msg for _ in range(0, total, msg_bytes))

    runs = {"pull": do_down, "push": do_up, "ceiling_pull": do_down_raw, "ceiling_push": do_up_raw}
    best = {k: Best(total) for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            c0, s0, t0 = self_cpu(), proc_cpu([p.pid]), time.perf_counter()
            fn()
            best[k].add(time.perf_counter() - t0, self_cpu() - c0 + proc_cpu([p.pid]) - s0)
    ch.close()
    p.terminate()
    p.join()
    return best


# -- downpour ----------------------------------------------------------------------
def _start_shard(i: int, logdir: Path, max_msg: int) -> tuple[subprocess.Popen, str]:
    log = logdir / f"shard-{i}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "downpour.cli",
                "serve",
                "paramserver",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--shard-index",
                str(i),
                "--lr",
                "0.01",
                "--log-level",
                "WARNING",
                "--max-message-bytes",
                str(max_msg),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"listening on port (\d+)", log.read_text())
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.05)
    raise TimeoutError(f"shard {i} did not start")


def downpour(total: int, n_shards: int, repeats: int, chunk: int, block_bytes: int) -> dict[str, Best]:
    """Pull and push (Adagrad applied) through ParamClient against n_shards shard processes."""
    max_msg = max(64 * MB, 2 * chunk)
    best = {"pull": Best(total), "push": Best(total)}
    with tempfile.TemporaryDirectory() as d:
        procs = [_start_shard(i, Path(d), max_msg) for i in range(n_shards)]
        pids = [p.pid for p, _ in procs]
        try:
            nb = max(1, total // block_bytes)
            blocks = {f"layer{i}.W": np.full(total // nb // 4, 0.5, np.float32) for i in range(nb)}
            grads = {n: np.full_like(v, 1e-3) for n, v in blocks.items()}
            out = {n: np.empty_like(v) for n, v in blocks.items()}
            with ParamClient(
                [a for _, a in procs],
                worker_id="bench",
                chunk_bytes=chunk,
                channel_config=ChannelConfig(max_message_bytes=max_msg),
            ) as ps:
                ps.wait_ready(60)
                ps.init(blocks)
                for _ in range(repeats):
                    for k in ("pull", "push"):
                        c0, s0, t0 = self_cpu(), proc_cpu(pids), time.perf_counter()
                        if k == "pull":
                            ps.pull(out=out)
                        else:
                            ps.wait(ps.push(grads))
                        best[k].add(time.perf_counter() - t0, self_cpu() - c0 + proc_cpu(pids) - s0)
        finally:
            for p, _ in procs:
                p.terminate()
                p.wait()
    return best


def apply_vs_memcpy(total: int, repeats: int) -> tuple[float, float]:
    n = total // 4
    w, acc, g = np.full(n, 0.5, np.float32), np.zeros(n, np.float32), np.full(n, 1e-3, np.float32)
    dst = np.empty_like(g)
    s = optim.Scratch()
    best_a = best_m = 0.0
    for _ in range(repeats + 1):  # the first round pays the page faults
        t0 = time.perf_counter()
        optim.adagrad_(w, acc, g, 0.01, 1e-8, s)
        best_a = max(best_a, total / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        np.copyto(dst, g)
        best_m = max(best_m, total / (time.perf_counter() - t0))
    return best_a, best_m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 MB, 1 and 2 shards")
    ap.add_argument("--mb", type=int, default=0, help="parameter set size in MB (default 256, 64 with --quick)")
    ap.add_argument("--shards", default="", help="comma-separated shard counts (default 1,2,4)")
    ap.add_argument("--repeats", type=int, default=0, help="default 5 (3 with --quick)")
    ap.add_argument("--chunk-mb", type=float, default=1.0, help="payload per downpour message")
    ap.add_argument("--block-mb", type=float, default=8.0, help="size of each parameter block")
    args = ap.parse_args(argv)
    total = (args.mb or (64 if args.quick else 256)) * MB
    shard_counts = [int(s) for s in (args.shards or ("1,2" if args.quick else "1,2,4")).split(",")]
    repeats = args.repeats or (3 if args.quick else 5)
    chunk, block = int(args.chunk_mb * MB), int(args.block_mb * MB)

    gb = lambda x: x / 1e9
    tcp = raw_tcp(total, repeats)
    pr = peer(total, repeats)
    rows = [("raw TCP loopback", tcp, "")]
    rows += [
        ("peer grpcio, server-stream 1 MB", pr["pull"], ""),
        ("peer grpcio, client-stream 1 MB", pr["push"], ""),
        ("grpcio no-work ceiling, server-stream", pr["ceiling_pull"], ""),
        ("grpcio no-work ceiling, client-stream", pr["ceiling_push"], ""),
    ]
    result: dict = {
        "cpus": os.cpu_count(),
        "param_mb": total // MB,
        "chunk_mb": args.chunk_mb,
        "repeats": repeats,
        "raw_tcp_gbps": round(gb(tcp.rate), 3),
        "raw_tcp_cpu_s_per_gb": round(tcp.cpu, 3),
        **{f"peer_{k}_gbps": round(gb(b.rate), 3) for k, b in pr.items()},
        **{f"peer_{k}_cpu_s_per_gb": round(b.cpu, 3) for k, b in pr.items()},
        "shards": {},
    }
    for n in shard_counts:
        dp = downpour(total, n, repeats, chunk, block)
        pull, push = dp["pull"], dp["push"]
        rows.append((f"downpour pull, {n} shard(s)", pull, f"{pull.rate / pr['pull'].rate:.2f}x peer"))
        rows.append((f"downpour push+Adagrad, {n} shard(s)", push, f"{push.rate / pr['push'].rate:.2f}x peer"))
        result["shards"][str(n)] = {
            "pull_gbps": round(gb(pull.rate), 3),
            "push_gbps": round(gb(push.rate), 3),
            "pull_vs_tcp": round(pull.rate / tcp.rate, 3),
            "push_vs_tcp": round(push.rate / tcp.rate, 3),
            "pull_vs_peer": round(pull.rate / pr["pull"].rate, 3),
            "push_vs_peer": round(push.rate / pr["push"].rate, 3),
            "pull_cpu_s_per_gb": round(pull.cpu, 3),
            "push_cpu_s_per_gb": round(push.cpu, 3),
            # the same ratios on CPU cost (peer CPU / ours): >1 means cheaper per byte than the peer
            "pull_cpu_efficiency_vs_peer": round(pr["pull"].cpu / pull.cpu, 3),
            "push_cpu_efficiency_vs_peer": round(pr["push"].cpu / push.cpu, 3),
        }
    ada, mem = apply_vs_memcpy(total, repeats)
    result.update(adagrad_gbps=round(gb(ada), 3), memcpy_gbps=round(gb(mem), 3), adagrad_vs_memcpy=round(ada / mem, 3))

    print(f"{'':40s} {'GB/s':>6s} {'vs TCP':>6s} {'CPU-s/GB':>8s}")
    for name, b, extra in rows:
        print(f"{name:40s} {gb(b.rate):6.2f} {b.rate / tcp.rate:6.0%} {b.cpu:8.2f}  {extra}")
    print(
        f"{'Adagrad apply (one thread, in process)':40s} {gb(ada):6.2f} {ada / tcp.rate:6.0%} {'':8s}  {ada / mem:.2f}x memcpy"
    )
    print(f"{'memcpy (np.copyto)':40s} {gb(mem):6.2f} {mem / tcp.rate:6.0%}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
