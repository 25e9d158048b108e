"""A TCP proxy on 127.0.0.1 in front of a real service, which a test can take down and up:
fault injection without mocking the service."""

import socket
import threading
import time


class FaultyProxy:
    """Forwards 127.0.0.1:<port> to ``target``; while ``down``, drops every connection.

    ``go_down_after(marker)`` arms a trip wire: once a request containing ``marker`` has been
    answered, the next request on any connection takes the proxy down. That pulls the plug
    at an exact point of a run, whatever the thread scheduling. With ``for_seconds`` the
    outage ends by itself. ``mode``: "refuse" resets every connection (a server that is
    down); "blackhole" accepts connections and swallows what they send, answering nothing (a
    network that drops packets: only the client's timeouts end a call). ``go_down_at(marker)``
    goes down before the request containing ``marker`` is forwarded.
    """

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.down = False
        self.mode = "refuse"
        #: (went down, came up) monotonic times of each outage; came up is None while down
        self.outages: list[list[float | None]] = []
        #: connections that arrived while down (refused or held) and requests swallowed
        self.turned_away = 0
        self._for_seconds: float | None = None
        self._held: list[socket.socket] = []
        self._marker: bytes | None = None
        self._armed_on: socket.socket | None = None
        self._answered = False
        self._down_at: bytes | None = None
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def take_down(self) -> None:
        if not self.down:
            self.outages.append([time.monotonic(), None])
        self.down = True
        with self._lock:
            if self.mode == "refuse":  # a blackhole leaves them open, answering nothing
                for sock in list(self._open):
                    _close(sock)
                self._open.clear()
        if self._for_seconds is not None:
            timer = threading.Timer(self._for_seconds, self.bring_up)
            timer.daemon = True
            timer.start()

    def bring_up(self) -> None:
        with self._lock:
            if self.down and self.outages:
                self.outages[-1][1] = time.monotonic()
            self.down = False
            # whatever a blackhole swallowed is lost: those connections end now
            for sock in [*self._held, *self._open] if self.mode == "blackhole" else self._held:
                _close(sock)
            self._held.clear()
            if self.mode == "blackhole":
                self._open.clear()
        self._marker, self._armed_on, self._answered = None, None, False

    def go_down_after(self, marker: bytes, for_seconds: float | None = None,
                      mode: str = "refuse") -> None:
        """Trip wire on ``marker`` (see the class); the outage lasts ``for_seconds`` (None:
        until ``bring_up``) in ``mode`` ("refuse" or "blackhole")."""
        if mode not in ("refuse", "blackhole"):
            raise ValueError(f"mode must be 'refuse' or 'blackhole', got {mode!r}")
        self.mode, self._for_seconds = mode, for_seconds
        self._marker = marker

    def go_down_at(self, marker: bytes) -> None:
        """Go down (refusing) when a request containing ``marker`` arrives, before it is
        forwarded: that request, and everything after it until ``bring_up``, fails."""
        self.mode, self._for_seconds, self._down_at = "refuse", None, marker

    def close(self) -> None:
        self._closed = True
        self.take_down()
        _close(self._server)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.down:
                self.turned_away += 1
                if self.mode == "blackhole":
                    with self._lock:
                        self._held.append(client)
                else:
                    _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, client),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, client),
                             daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, client: socket.socket) -> None:
        from_client = source is client
        try:
            while data := source.recv(65536):
                if self.down and self.mode == "blackhole":
                    if from_client:
                        self.turned_away += 1
                    continue  # swallowed
                if from_client and self._down_at is not None and self._down_at in data:
                    self._down_at = None
                    self.turned_away += 1
                    self.take_down()
                    return
                if from_client and self._answered:
                    self.take_down()
                    if self.mode == "blackhole":
                        continue
                    return
                if from_client and self._marker and self._armed_on is None \
                        and self._marker in data:
                    self._armed_on = client
                if not from_client and self._armed_on is client:
                    self._answered = True
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)
                with self._lock:
                    self._open.discard(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
