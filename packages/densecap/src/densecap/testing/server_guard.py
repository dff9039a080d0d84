"""Run a server command so that it dies with the process that started it.

    PYTHON server_guard.py -- COMMAND ARGS...

Run by path with any interpreter (it imports only the standard library, so it runs in
``.venv-vllm`` without importing this package). The starter launches it in a new process
group with a pipe on its stdin and never writes to it. The guard starts COMMAND in the same
group and then:

- stdin reaches end of file (the starter exited, was SIGKILLed, or closed the pipe): it
  SIGKILLs the whole group, the server and every process the server started included;
- SIGTERM / SIGINT: it passes SIGTERM on to the server and returns as soon as the server has
  exited; a server still running 20 s later is SIGKILLed with the whole group;
- the server exits by itself: it SIGTERMs whatever the server left in the group and exits
  with the server's status.

The pipe is what ties the two together: the kernel closes the starter's end however the
starter ends, so no polling and no signal from the starter are needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

GRACE_S = 20.0  # how long a SIGTERMed server may take to shut down before the group is SIGKILLed


def _kill_group() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)  # ourselves included


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: server_guard.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    cmd = argv[argv.index("--") + 1 :]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def on_term(signum, frame) -> None:
        # No wait here: the handler runs inside the main thread's child.wait(), which holds Popen's
        # wait lock, so a wait(timeout) from here could not reap the server and slept its whole
        # timeout (a 20 s stop). The main thread's wait returns once the server is gone.
        try:
            child.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        timer = threading.Timer(GRACE_S, _kill_group)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    def watch_starter() -> None:
        try:
            while sys.stdin.buffer.read(65536):  # the starter never writes: returns b"" at EOF
                pass
        except OSError:
            pass
        _kill_group()

    threading.Thread(target=watch_starter, name="starter-watch", daemon=True).start()
    rc = child.wait()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)  # stragglers the server left behind
    except ProcessLookupError:
        pass
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
