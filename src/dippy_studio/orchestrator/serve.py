"""Running the orchestrator's HTTP server: one process, or several worker processes on one port.

Workers are replicas. Each is a whole orchestrator (public API, dispatch, callbacks, sweeper,
webhooks, scores) on the shared database, exactly as replicas behind a load balancer would be:
claims are `FOR UPDATE SKIP LOCKED` on PostgreSQL and serialised write transactions on SQLite,
every transition is a compare-and-set, nonces live in a shared store, and `Prefer: wait` polls the
database as well as listening for its own process's events. What the workers add is the port:
every worker listens on it with SO_REUSEPORT and the kernel spreads connections across them.

Why: one Python process does its Python work on about one core (the GIL). `--workers 2` lets the
orchestrator use two (bench/bench_throughput.py measures both).

Workers are started with `spawn`, after the first process has brought the schema up to date, and
are stopped with it: Ctrl-C reaches every process of the terminal's process group, and SIGTERM
to the first process stops the others.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import socket
from collections.abc import Callable, Iterator
from typing import Any

from dippy_studio.orchestrator import model_code
from dippy_studio.orchestrator.settings import OrchestratorSettings

log = logging.getLogger("dippy_studio.orchestrator.serve")


class ListenError(OSError):
    """The server cannot listen on its host and port."""


# Seconds the first process waits for each worker to build its app before it serves too.
WORKER_START_S = 120.0
# Seconds a worker gets to finish its open requests after the first process stopped.
WORKER_STOP_S = 10.0


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket; with `reuse_port`, other processes may bind the same port."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_server(
    app: Any,
    settings: OrchestratorSettings,
    sock: socket.socket | None = None,
    before_exit: Callable[[], None] | None = None,
) -> None:
    """Serve `app` with uvicorn until SIGINT or SIGTERM, on `sock` or on settings.host:port.

    `before_exit` runs once the server has stopped and before uvicorn re-raises the signal that
    stopped it (which ends this process at once, `finally` blocks included), after the LoRA
    checks' child process is stopped."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                model_code.shutdown()
                if before_exit is not None:
                    before_exit()

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = Server(config)
    server.run(sockets=[sock] if sock is not None else None)


def serve(settings: OrchestratorSettings, app: Any) -> None:
    """Serve an app built from `settings` (its schema is already up to date), with
    `settings.workers - 1` more worker processes on the same port."""
    if settings.workers == 1:
        run_server(app, settings)
        return
    try:
        sock = listening_socket(settings.host, settings.port, reuse_port=True)
    except OSError as exc:
        raise ListenError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc
    # Port 0 picked a free port: the workers must join that one.
    port = sock.getsockname()[1]
    worker_settings = settings.model_copy(update={"port": port, "workers": 1}).model_dump()
    context = multiprocessing.get_context("spawn")
    # Pipes, not Events: a process ended by its signal leaves semaphores for the tracker to warn about.
    pipes = [context.Pipe(duplex=False) for _ in range(1, settings.workers)]
    workers = [
        context.Process(target=_worker, args=(worker_settings, index, sender), name=f"orchestrator-worker-{index}")
        for index, (_, sender) in enumerate(pipes, start=1)
    ]
    for worker, (_, sender) in zip(workers, pipes, strict=True):
        worker.start()
        sender.close()  # the worker holds the only sending end: its death reads as end of file
    try:
        # So that a ready first process means every worker is up (connections wait meanwhile).
        for worker, (receiver, _) in zip(workers, pipes, strict=True):
            if not _started(receiver):
                worker.join(1)
                log.warning("%s did not start (exit code %s)", worker.name, worker.exitcode)
        run_server(app, settings, sock, before_exit=lambda: _stop_workers(workers))
    finally:
        # Also when the first process fails: no worker may outlive it.
        _stop_workers(workers)
        sock.close()


def _started(receiver: Any) -> bool:
    """Whether the worker at the other end of `receiver` reported that it serves, in time."""
    try:
        return bool(receiver.poll(WORKER_START_S) and receiver.recv())
    except EOFError:
        return False  # it died before it could say so


def _stop_workers(workers: list[Any]) -> None:
    for worker in workers:
        if worker.is_alive():
            worker.terminate()  # SIGTERM: uvicorn's graceful shutdown
    for worker in workers:
        worker.join(WORKER_STOP_S)
        if worker.is_alive():
            log.warning("worker %s did not stop in %.0f s; killing it", worker.name, WORKER_STOP_S)
            worker.kill()
            worker.join(5)


def _worker(settings_data: dict[str, Any], index: int, started: Any) -> None:
    """One more worker: its own orchestrator and socket on the shared port. It sends on `started`
    once it is about to serve."""
    from dippy_studio.logs import configure_logging
    from dippy_studio.orchestrator.app import create_app

    try:
        settings = OrchestratorSettings(**settings_data)
        app = create_app(settings)
        # After the app, as in the first process: building it logs the migrations check.
        configure_logging()
        with contextlib.closing(listening_socket(settings.host, settings.port, reuse_port=True)) as sock:
            log.info("worker %d serving on port %d", index, settings.port)
            started.send(True)
            run_server(app, settings, sock)
    except KeyboardInterrupt:
        pass  # Ctrl-C while starting: the first process is stopping everything anyway
