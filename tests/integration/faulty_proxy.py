"""A TCP proxy on 127.0.0.1 in front of a real service, which a test can take down and up:
fault injection without mocking the service."""

import socket
import threading


class FaultyProxy:
    """Forwards 127.0.0.1:<port> to ``target``; while ``down``, drops every connection.

    ``go_down_after(marker)`` arms a trip wire: once a request containing ``marker`` has been
    answered, the next request on any connection takes the proxy down. That pulls the plug
    at an exact point of a run, whatever the thread scheduling.
    """

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.down = False
        self._marker: bytes | None = None
        self._armed_on: socket.socket | None = None
        self._answered = False
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
        self.down = True
        with self._lock:
            for sock in list(self._open):
                _close(sock)
            self._open.clear()

    def bring_up(self) -> None:
        self.down = False
        self._marker, self._armed_on, self._answered = None, None, False

    def go_down_after(self, marker: bytes) -> None:
        self._marker = marker

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
                if from_client and self._answered:
                    self.take_down()
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
