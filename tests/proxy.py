"""A TCP proxy that a test can cut and restore, to take a real service "down" without stopping it."""

from __future__ import annotations

import contextlib
import socket
import threading

from services import free_port


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and refuses new ones."""

    def __init__(self, target_host: str, target_port: int, *, capture: bool = False) -> None:
        self.target = (target_host, target_port)
        #: With ``capture``, every byte that crossed the proxy, both ways (what a sniffer on the wire sees).
        self.captured = bytearray()
        self._capture = capture
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._up = False
        self._swallow = False
        self._thread: threading.Thread | None = None

    def start(self) -> TcpProxy:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        with self._lock:
            self._up = True
        self._thread = threading.Thread(target=self._accept, args=(ls,), daemon=True)
        self._thread.start()
        return self

    def cut(self) -> None:
        """Close the listener and every open connection: the service looks down."""
        with self._lock:
            self._up = False
        if self._listener is not None:
            # shutdown() wakes a thread blocked in accept(); close() alone does not on Linux.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self._conns.clear()

    def swallow_answers(self, on: bool = True) -> None:
        """From now on what a client sends still reaches the service, but no answer comes back and the
        client's connection closes right after: a connection lost with the command on it (it ran)."""
        self._swallow = on

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self._up:  # cut while this connection was arriving
                    client.close()
                    upstream.close()
                    continue
                self._conns += [client, upstream]
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool = True) -> None:
        try:
            while data := src.recv(65536):
                if self._capture:
                    with self._lock:
                        self.captured += data
                if self._swallow and not up:
                    continue  # the answer is lost
                dst.sendall(data)
                if self._swallow and up:
                    src.shutdown(socket.SHUT_RDWR)  # the client's connection drops with its command sent
                    break
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
