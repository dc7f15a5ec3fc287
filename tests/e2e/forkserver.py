"""A fork server for crash tests: imports the service once, then forks a fresh server process
per request, so a test can SIGKILL a real server and start a new one many times a second.

Protocol (one JSON object per line on stdin, one answer per line on stdout)::

    {"data_dir": "...", "args": {...Settings fields...}}   ->   {"pid": 123, "port": 45678}

Each child is a complete service process: it builds the app from ``Settings`` (so its
lifespan restores the data directory like ``adamscope serve`` does) and runs uvicorn on a
loopback socket the fork server bound for it. The fork server never runs a torch operation
or a thread pool before forking, and reaps its children automatically (SIGCHLD ignored).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def serve_child(sock: socket.socket, data_dir: str, args: dict[str, object]) -> None:
    import uvicorn

    from adamscope.service.app import create_app
    from adamscope.service.settings import Settings

    settings = Settings(data_dir=data_dir, **args)  # type: ignore[arg-type]
    config = uvicorn.Config(
        create_app(settings), log_level="warning", lifespan="on", timeout_graceful_shutdown=5
    )
    uvicorn.Server(config).run(sockets=[sock])


def main() -> int:
    # Everything a child needs, imported before any fork (torch._dynamo is what an
    # optimizer's first step imports: ~1 s that every restart would pay again). Importing
    # runs no torch operation and starts no thread pool, so forking stays safe.
    import torch._dynamo  # noqa: F401
    import uvicorn  # noqa: F401

    import adamscope.service.app  # noqa: F401
    import adamscope.service.settings  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                serve_child(sock, request["data_dir"], request.get("args", {}))
            except BaseException:  # noqa: BLE001 - report and leave without cleanup
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        sock.close()
        print(json.dumps({"pid": pid, "port": port}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
