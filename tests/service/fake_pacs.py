"""A STOW-RS target that misbehaves on purpose, on a loopback port, run in threads by the test.

Modes, as unlucky hospitals have them:

* ``ok``: answers 200 with an empty DICOM JSON dataset;
* ``error500``: answers 500;
* ``trickle``: answers 200 and promises a body, then sends one byte every `trickle_s` seconds
  (each read succeeds, so a per-read timeout never fires);
* ``hang``: reads the request, then never answers;
* ``reset``: reads the request, then resets the connection (RST, not FIN);
* ``slow_accept``: takes `accept_delay_s` to accept each connection (the kernel completes the
  handshake, nothing reads), then answers as ``ok``.

It counts what it saw (`requests`), and how many connections are open right now (`open`), so a
test can see a delivery's connection closed when its sender hangs up.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from types import TracebackType

MODES = ("ok", "error500", "trickle", "hang", "reset", "slow_accept")


class FakePacs:
    def __init__(self, mode: str, *, trickle_s: float = 0.5, accept_delay_s: float = 3.0) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.trickle_s = trickle_s
        self.accept_delay_s = accept_delay_s
        self.requests = 0
        self.open = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/dicom-web/studies"
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    def __enter__(self) -> FakePacs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stopped.set()
        self._accepter.join(5)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            if self.mode == "slow_accept" and self._stopped.wait(self.accept_delay_s):
                return
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _count(self, attribute: str, delta: int) -> None:
        with self._lock:
            setattr(self, attribute, getattr(self, attribute) + delta)

    def _serve(self, conn: socket.socket) -> None:
        self._count("open", 1)
        try:
            conn.settimeout(0.2)
            while not self._stopped.is_set():
                if not self._read_request(conn):
                    return
                self._count("requests", 1)
                if not self._answer(conn):
                    return
        except OSError:
            return
        finally:
            self._count("open", -1)
            conn.close()

    def _read_request(self, conn: socket.socket) -> bool:
        """Reads one request (headers and Content-Length body); False when the peer left."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self._recv(conn)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = self._recv(conn)
            if not chunk:
                return False
            body += chunk
        return True

    def _recv(self, conn: socket.socket) -> bytes:
        while not self._stopped.is_set():
            try:
                return conn.recv(65536)
            except TimeoutError:
                continue
        return b""

    def _answer(self, conn: socket.socket) -> bool:
        """Answers as the mode says; False when the connection is done with."""
        if self.mode in ("ok", "slow_accept", "error500"):
            status = b"200 OK" if self.mode != "error500" else b"500 Internal Server Error"
            conn.sendall(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: application/dicom+json\r\n"
                b"Content-Length: 2\r\n\r\n{}"
            )
            return True
        if self.mode == "reset":
            # SO_LINGER 0: close() sends RST, as a crashed proxy or a firewall does.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if self.mode == "hang":
            while not self._stopped.wait(0.1):
                if self._peer_left(conn):
                    return False
            return False
        # trickle: a 200 with a long body, one byte at a time
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n")
        conn.sendall(b"Content-Length: 100000\r\n\r\n")
        while not self._stopped.wait(self.trickle_s):
            if self._peer_left(conn):
                return False
            try:
                conn.sendall(b" ")
            except OSError:
                return False
        return False

    @staticmethod
    def _peer_left(conn: socket.socket) -> bool:
        conn.setblocking(False)
        try:
            return conn.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            conn.settimeout(0.2)


def wait_until(predicate, timeout_s: float = 5.0) -> bool:  # noqa: ANN001 (any callable)
    """Polls `predicate` until it is true or `timeout_s` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
