"""``downpour serve worker``: one model worker running Downpour SGD.

    downpour serve worker --coordinator H:P [--port P] [--metrics-port M] [--advertise H] [--device cpu|gpu]

The worker registers with the coordinator and gets an assignment: its replica
and partition, the parameter shards and which blocks live where, the feeder,
and the step its replica has reached. Without a free slot it waits as a spare
and heartbeats until one frees up (that life is ``worker.life``; this module
is the process around it). It then runs the Downpour loop
(``worker.loop``) from that step, reporting progress, and heartbeats in the
background: a coordinator that says STOP ends it (exit 0), one that gives it a
new slot restarts the loop there, one that does not know it (it restarted
without our membership) gets a fresh registration. A coordinator that is
down does not stop training: the loop carries on and heartbeats retry.

A parameter shard that is down or restarting makes pulls and pushes retry
with backoff (``PARAM_RETRY_SECONDS``); a feeder that is down makes the batch
stream reconnect. If either stays away past its deadline, the worker gives
its slot back and takes one again (a fresh start at its replica's step)
instead of exiting.

With ``--device gpu`` the network runs on CuPy (``downpour.kernels``): each
pull's parameters are copied to the GPU once, gradients accumulate there and
are copied back once per push. Without CuPy or a visible GPU the worker stops
at start with the reason (exit 2). Model-parallel partitions (grids other
than 1x1) compute on the CPU only: a GPU worker given such a slot stops with
that reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading

from downpour import device as devices
from downpour.rpc.server import Server, ServerConfig
from downpour.v1 import worker_pb2_grpc
from downpour.worker.life import Worker

log = logging.getLogger("downpour.worker")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="downpour serve worker", description=__doc__.splitlines()[0])
    ServerConfig.add_arguments(ap, port=0)
    ap.add_argument("--coordinator", required=True, help="the coordinator's address (host:port)")
    ap.add_argument("--advertise", default="", help="host name peers reach this worker at (default: this host)")
    ap.add_argument(
        "--device",
        default="cpu",
        choices=devices.DEVICES,
        help="compute device: cpu (NumPy) or gpu (CuPy, one CUDA GPU)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    try:
        xp = devices.array_module(args.device)
    except devices.DeviceError as e:
        print(f"downpour serve worker: {e}", file=sys.stderr, flush=True)
        return 2
    log.info("computing on %s", devices.describe(xp))
    scfg = ServerConfig.from_args(args)
    server = Server("worker", scfg)
    chcfg = scfg.channel_config()
    host = args.advertise or ("127.0.0.1" if args.host in ("127.0.0.1", "localhost") else socket.gethostname())
    worker = Worker(args.coordinator, "", chcfg, args.device, xp)
    server.add(lambda s: worker_pb2_grpc.add_ModelWorkerServicer_to_server(worker, s), "downpour.v1.ModelWorker")
    port = server.start()
    worker.address = f"{host}:{port}"
    server.set_serving()
    done = threading.Event()
    result = {"code": 0}

    def train() -> None:
        try:
            result["code"] = worker.run()
        except Exception:
            log.exception("training failed")
            result["code"] = 1
        finally:
            done.set()
            server.stop(grace=1.0)

    threading.Thread(target=train, name="train", daemon=True).start()
    server.wait()
    worker.shutdown()
    if not done.wait(10):
        log.warning("training did not stop within 10 s of shutdown")
    # I/O threads still retrying a pull or push against a dead peer would hold
    # the interpreter's exit (it joins every executor thread, daemon or not): a
    # stopped worker exits now, whatever they are waiting for. The last push
    # was flushed by the loop if it could be.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(result["code"])
