"""A TCP proxy for tests: a slow or broken link between two real processes, on command.

    p = Proxy("127.0.0.1:7100")     # listen on p.address, forward to the shard
    p.latency = 0.05                 # every chunk, each way, arrives 50 ms after it was sent
    p.cut()                          # reset every open connection (both ends see a reset)
    p.silent = True                  # drop every byte both ways; connections stay open (half-open)
    p.close()

Loss inside a TCP stream never reaches the application (TCP retransmits); what
loss looks like above TCP is a link that goes silent for a while, so ``silent``
is how this proxy drops bytes: they are read and thrown away, the connection
stays up, and only a deadline or a keepalive can tell.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time


class Proxy:
    def __init__(self, target: str, host: str = "127.0.0.1"):
        th, tp = target.rsplit(":", 1)
        self.target = (th, int(tp))
        self.latency = 0.0
        self.silent = False
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listen = socket.create_server((host, 0))
        self.address = f"{host}:{self._listen.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self._listen.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            with self._lock:
                self._open |= {down, up}
                self.connections += 1
            for a, b in ((down, up), (up, down)):
                q: queue.Queue = queue.Queue()
                threading.Thread(target=self._read, args=(a, q), daemon=True).start()
                threading.Thread(target=self._write, args=(b, q), daemon=True).start()

    def _read(self, src: socket.socket, q: queue.Queue) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                q.put(None)
                return
            if not self.silent:
                q.put((time.monotonic() + self.latency, data))

    def _write(self, dst: socket.socket, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is None:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                return

    def cut(self) -> int:
        """Reset every open connection; returns how many sockets were reset."""
        with self._lock:
            socks, self._open = self._open, set()
            self.cuts += 1
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                s.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading it (close alone would not)
            except OSError:
                pass
            s.close()
        return len(socks)

    def close(self) -> None:
        self._closed = True
        self._listen.close()
        self.cut()
