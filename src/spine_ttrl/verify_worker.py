"""The math-verify worker: one persistent child process running symbolic comparisons under a hard time limit.

:func:`spine_ttrl.answers.is_equivalent` sends every symbolic comparison here (through
:func:`_call_in_worker`) after its cheap fast paths and cache. The comparison the worker runs by
default, :func:`_verify_pair` (math-verify in both directions; any error means "not equivalent"),
lives here too, so the worker never needs :mod:`spine_ttrl.answers`.

Why a process: math-verify's own timeout uses ``SIGALRM``, which only works on the main thread and
cannot stop a computation stuck in C code; killing a process always works. Measured: the round trip
to the worker costs ~0.04 ms against ~10-20 ms for a symbolic comparison.

Lifecycle: the worker is a plain ``python -c`` child (see :data:`_BOOTSTRAP`), started lazily by the
first request, killed and forgotten when a request overruns its limit or the pipe breaks (the next
request starts a fresh one), stopped by :func:`shutdown_worker` and at interpreter exit. A forked child
forgets its parent's worker and starts its own. One lock serialises requests, so a time limit counts
only the caller's own work.

Protocol: the parent sends its ``sys.path``; the child imports math-verify, warms it up and replies
``"ready"``; then each request is ``(fn, args)`` with ``fn`` pickled by reference (so it must be
importable by name) and each reply is ``("ok", result)`` or ``("error", repr)``.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
from typing import Any, Callable

__all__ = ["shutdown_worker"]

_WORKER_START_TIMEOUT = 120.0  # seconds to start and import math-verify (not part of the limit)
_worker_lock = threading.Lock()
# (process, request connection, reply connection, pid of the process that started it)
_worker: tuple[Any, Any, Any, int] | None = None

# The worker is a plain `python -c` child, not a multiprocessing 'spawn' Process: spawn re-runs
# the user's main script in the child (and fails outright in a script without an
# `if __name__ == "__main__":` guard), and 'fork' is unsafe once torch threads or CUDA exist.
# The parent's sys.path is sent first so the child imports what the parent imports.
_BOOTSTRAP = """\
import sys
from multiprocessing.connection import Connection
requests = Connection(int(sys.argv[1]), writable=False)
replies = Connection(int(sys.argv[2]), readable=False)
sys.path[:] = requests.recv()
from spine_ttrl.verify_worker import _worker_main
_worker_main(requests, replies)
"""


def _verify_pair(x: str, y: str, seconds: int | None = None) -> bool:
    """math-verify in both directions on two normalised answers; any error counts as False.

    Runs inside the worker with math-verify's own ``SIGALRM`` timeouts disabled (``seconds``
    None: the caller enforces the limit), or inline with ``seconds`` on the main thread.
    """
    try:
        from math_verify import parse, verify

        # Wrapped in $...$ so parse reads the answer as LaTeX ("\frac12", "1/2", "0.5").
        px = parse(f"${x}$", parsing_timeout=seconds)
        py = parse(f"${y}$", parsing_timeout=seconds)
        if not px or not py:
            return False
        # verify(gold, pred) is not symmetric (sets vs elements, strictness); either way counts.
        return bool(verify(px, py, timeout_seconds=seconds) or verify(py, px, timeout_seconds=seconds))
    except Exception:  # noqa: BLE001 -- a grader must never crash the training loop
        return False
    except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
        if type(exc).__name__ == "TimeoutException":
            return False
        raise


def _worker_main(requests, replies) -> None:
    """Worker loop: import math-verify once, then answer ``(fn, args)`` requests until EOF."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; it closes our pipe
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warnings
    try:
        _verify_pair("1/2", "0.5")  # import math-verify and warm its parser before 'ready'
    finally:
        replies.send(("ready", None))
    while True:
        try:
            fn, args = requests.recv()
        except (EOFError, OSError):  # parent closed the pipe or died: exit quietly
            return
        except BaseException as exc:  # noqa: BLE001 -- e.g. the target could not be imported
            replies.send(("error", repr(exc)))
            continue
        try:
            reply = ("ok", fn(*args))
        except BaseException as exc:  # noqa: BLE001
            reply = ("error", repr(exc))
        replies.send(reply)


def _start_worker() -> tuple[Any, Any, Any, int]:
    from multiprocessing.connection import Connection

    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(request_r), str(reply_w)],
            pass_fds=(request_r, reply_w),
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        for fd in (request_w, reply_r):
            os.close(fd)
        raise
    finally:
        os.close(request_r)  # the child's ends: with only the child holding them, either side
        os.close(reply_w)  # sees EOF when the other exits
    requests = Connection(request_w, readable=False)
    replies = Connection(reply_r, writable=False)
    try:
        requests.send(list(sys.path))
        if not replies.poll(_WORKER_START_TIMEOUT):
            raise RuntimeError("equivalence worker did not start in time")
        replies.recv()  # "ready"
    except BaseException:
        requests.close()
        replies.close()
        proc.kill()
        proc.wait(5)
        raise
    return proc, requests, replies, os.getpid()


def _discard_worker() -> None:
    """Kill and forget the worker (caller holds the lock). The next request starts a new one."""
    global _worker
    worker, _worker = _worker, None
    if worker is None:
        return
    proc, requests, replies, owner = worker
    if owner != os.getpid():  # inherited through fork: the parent's worker, not ours to kill
        return
    requests.close()
    replies.close()
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def shutdown_worker() -> None:
    """Stop the equivalence worker process, if any (also run at interpreter exit)."""
    with _worker_lock:
        _discard_worker()


def _forget_worker_after_fork() -> None:
    # A forked child inherits the handle of the parent's worker and maybe a held lock. It drops
    # its copies of the pipe ends (so the worker still sees EOF when the parent dies) and
    # starts its own worker if it needs one; the parent's worker is not its to kill.
    global _worker, _worker_lock
    worker, _worker = _worker, None
    _worker_lock = threading.Lock()
    if worker is not None:
        for conn in worker[1:3]:
            try:
                conn.close()
            except OSError:
                pass


atexit.register(shutdown_worker)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_after_fork)


def _call_in_worker(fn: Callable, args: tuple, timeout: float) -> tuple[str, Any]:
    """Run ``fn(*args)`` in the worker: ``("ok", result)``, ``("error", msg)`` or ``("timeout", None)``.

    ``fn`` must be importable by name (it is pickled by reference). The lock gives each caller
    the worker to itself, so the limit counts only its own work, not time spent queueing
    behind another thread or starting the worker. Raises if the worker cannot start.
    """
    global _worker
    with _worker_lock:
        if _worker is not None and _worker[3] != os.getpid():
            _worker = None
        if _worker is None:
            _worker = _start_worker()
        _, requests, replies, _ = _worker
        try:
            requests.send((fn, args))
            if replies.poll(timeout):
                return replies.recv()
        except (EOFError, OSError) as exc:  # the worker died (e.g. out of memory)
            _discard_worker()
            return ("error", repr(exc))
        _discard_worker()  # stuck: killing it is the only reliable way to stop sympy
        return ("timeout", None)
