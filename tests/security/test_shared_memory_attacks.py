"""A hostile co-located client against a shard's shared-memory regions, on real processes.

A region a shard maps must never shrink under it: touching a mapped page past
the end of a file kills the process with SIGBUS. The client used to create
the file itself and could truncate it after AttachShared; now the shard makes
a sealed memfd and only hands the client a descriptor. Memory the shard
cannot get is refused at attach (RESOURCE_EXHAUSTED), before anything is
mapped, not with a crash later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import resource
import socket

import grpc
import numpy as np
import pytest

from downpour.paramserver import shared as shm
from downpour.paramserver.client import ParamClient
from downpour.rpc.channel import open_channel
from downpour.v1 import paramserver_pb2 as pb

pytestmark = pytest.mark.skipif(not shm.usable(), reason="no memfd_create or no writable /dev/shm here")

PLACE = {"a": 0, "b": 0}
N = 3003  # values of a and b together


def _blocks():
    return {"a": np.linspace(-1, 1, 3000, dtype=np.float32), "b": np.array([1.0, 2.0, 3.0], np.float32)}


def _rpc(ch, name, req, resp):
    return ch.unary_unary(
        f"/downpour.v1.ParameterServer/{name}",
        request_serializer=req.SerializeToString,
        response_deserializer=resp.FromString,
    )


def _attach_for_fd(ch, worker: str, names: list[str]) -> int:
    """AttachShared by hand, keeping the raw descriptor the shard sends (as a hostile client would)."""
    listener, path = shm.listen()
    token = os.urandom(shm.TOKEN_BYTES)
    try:
        _rpc(ch, "AttachShared", pb.AttachSharedRequest, pb.AttachSharedResponse)(
            pb.AttachSharedRequest(worker_id=worker, path=path, token=token, names=names), timeout=10
        )
        conn, _ = listener.accept()
        with conn:
            msg, fds, _, _ = socket.recv_fds(conn, 64, 1)
        assert msg[: shm.TOKEN_BYTES] == token and len(fds) == 1
        return fds[0]
    finally:
        listener.close()
        os.unlink(path)


def test_client_cannot_shrink_the_region_the_shard_maps(procs):
    s = procs.serve("paramserver", "--lr", "0.1")
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init(_blocks())
    ch = open_channel(s.address)
    pp = _rpc(ch, "PushPullShared", pb.PushPullSharedRequest, pb.PushPullSharedResponse)
    fd = _attach_for_fd(ch, "hostile", ["a", "b"])
    size = shm.region_bytes(N)
    try:
        # Every way to shrink it is refused by the seals: through the descriptor, through /proc, growing it.
        for attempt in (
            lambda: os.ftruncate(fd, 0),
            lambda: os.ftruncate(fd, shm.HEADER),
            lambda: os.truncate(f"/proc/self/fd/{fd}", 0),
            lambda: os.ftruncate(fd, 2 * size),
        ):
            with pytest.raises(PermissionError):
                attempt()
        assert os.fstat(fd).st_size == size
        # Punching holes is not a seal's business: the pages come back as zeros, never as SIGBUS.
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        punch_keep_size = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        assert libc.fallocate(fd, punch_keep_size, ctypes.c_long(0), ctypes.c_long(size)) == 0
        mm = mmap.mmap(fd, size)
        grads = np.frombuffer(mm, dtype="<f4", count=N, offset=shm.HEADER + 4 * N)
        grads[:] = 1.0
        r = pp(pb.PushPullSharedRequest(worker_id="hostile", seq=1, push=True, pull=True), timeout=10)
        assert list(r.versions) == [1, 1]
        weights = np.frombuffer(mm, dtype="<f4", count=N, offset=shm.HEADER).copy()
        del grads
        mm.close()
    finally:
        os.close(fd)
        ch.close()
    assert s.alive()
    with ParamClient([s.address], worker_id="reader", placement=PLACE) as ps:
        got = ps.pull(["a", "b"])
    np.testing.assert_array_equal(np.concatenate([got["a"], got["b"]]), weights)
    assert weights[3000] < 1.0  # the push was applied


def test_region_over_the_shared_quota_is_refused_before_anything_is_allocated(procs):
    region = shm.region_bytes(N)
    s = procs.serve("paramserver", "--max-shared-bytes", str(region + region // 2))
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init(_blocks())
    ch = open_channel(s.address)
    try:
        os.close(_attach_for_fd(ch, "first", ["a", "b"]))
        listener, path = shm.listen()
        try:
            with pytest.raises(grpc.RpcError) as e:
                _rpc(ch, "AttachShared", pb.AttachSharedRequest, pb.AttachSharedResponse)(
                    pb.AttachSharedRequest(worker_id="second", path=path, token=b"t" * 16, names=["a", "b"]),
                    timeout=10,
                )
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-shared-bytes" in e.value.details() and str(region) in e.value.details()
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):  # the shard did not even connect
                listener.accept()
        finally:
            listener.close()
            os.unlink(path)
        # The same worker attaching again replaces its region: that fits.
        os.close(_attach_for_fd(ch, "first", ["a", "b"]))
    finally:
        ch.close()


def test_memory_the_shard_cannot_allocate_is_refused_at_attach(procs):
    """posix_fallocate failing, provoked for real: the shard may not make files over 64 KiB (RLIMIT_FSIZE).

    A ParamClient then keeps to gRPC, and the shard keeps serving."""
    s = procs.serve("paramserver", "--lr", "0.1")
    w0 = {"a": np.ones(100_000, np.float32), "b": np.zeros(3, np.float32)}
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init(w0)
    resource.prlimit(s.pid, resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    ch = open_channel(s.address)
    listener, path = shm.listen()
    try:
        with pytest.raises(grpc.RpcError) as e:
            _rpc(ch, "AttachShared", pb.AttachSharedRequest, pb.AttachSharedResponse)(
                pb.AttachSharedRequest(worker_id="w", path=path, token=b"t" * 16, names=["a", "b"]), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        need = shm.region_bytes(100_003)
        assert f"cannot allocate {need} bytes of shared memory" in e.value.details()
        assert os.strerror(errno.EFBIG) in e.value.details()
    finally:
        listener.close()
        os.unlink(path)
        ch.close()
    with ParamClient([s.address], worker_id="w", shared=True, placement=PLACE) as ps:
        ps.pull(["a", "b"])
        got = ps.push_pull({"a": np.ones(100_000, np.float32), "b": np.ones(3, np.float32)})
        assert ps.links.links == {0: False}  # refused: gRPC for good
    assert s.alive()
    assert got["a"][0] < 1.0
