"""Build progress on stderr: one line per stage, and a heartbeat line while a long stage runs.

    [2/4] capture (torch.export, dynamic batch / tokens / cache length) ...
          capture: still running, 30s, peak memory 0.71 GiB
          done in 43.1s: 25981 nodes

A real-size capture or lowering is one library call of minutes (torch.export, torch.onnx); the
heartbeat says the build is alive. It is driven by ``SIGALRM`` (``setitimer``), not by a thread:
the handler runs in the main thread between two bytecodes, so Ctrl-C keeps its usual path (an
earlier heartbeat *thread* lost a SIGINT in full test-suite runs, cause not found). Consequences,
by design: no heartbeat while the main thread sits inside one long C call (ONNX Runtime's session
creation, ``onnx.save``); the heartbeat only runs when the build is on the main thread and no other
``SIGALRM`` handler is installed (it never replaces one); interrupted system calls restart
(``siginterrupt(SIGALRM, False)``). A heartbeat line is written with one ``os.write`` to the
stream's file descriptor when it has one, so it is never split; but CPython runs signal handlers
between the writes of one ``print`` (its text, then its newline), so a heartbeat can land right
after another writer's text and share that line (at most one line per heartbeat, every 15 s; the
build's own lines are single writes and are not printed while a stage runs).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

try:
    import resource  # imported here: never inside the signal handler
except ImportError:  # Windows
    resource = None

HEARTBEAT_S = 15.0
_running: "Progress | None" = None  # the Progress whose stage runs now (for :func:`phase`)


def phase(what: str) -> None:
    """Name the part of the running stage under way (``lower: torch.onnx translation``), for code
    that has no handle on the build's :class:`Progress`; a no-op outside a build."""
    if _running is not None:
        _running.phase(what)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss``), in bytes (0 where unknown)."""
    if resource is None:
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


class Progress:
    """One line per stage (``[2/5] capture ...`` then ``done in 12.3s: note``) and, while a stage
    runs, a heartbeat line every ``heartbeat`` seconds (0: none). :meth:`phase` names the part of
    the stage under way (``lower: torch.onnx translation``); :meth:`close` stops the heartbeat when
    a build ends, failed or not."""

    def __init__(self, total: int, stream=None, heartbeat: float = HEARTBEAT_S):
        self.total, self.n, self.stream = total, 0, stream or sys.stderr
        self.start = time.monotonic()
        self.heartbeat = heartbeat
        self._what = ""
        self._t0 = 0.0
        self._saved = None  # (previous handler, previous timer) while the heartbeat runs

    def stage(self, what: str) -> float:
        global _running
        self.close()
        self.n += 1
        self._write(f"[{self.n}/{self.total}] {what} ...")
        self._what, self._t0 = what.split(" (")[0], time.monotonic()
        _running = self
        self._arm()
        return self._t0

    def phase(self, what: str) -> None:
        """Name what the running stage does now; the next heartbeat line says it."""
        self._what = what

    def done(self, t0: float, note: str = "") -> None:
        self.close()
        self._write(f"      done in {time.monotonic() - t0:.1f}s{(': ' + note) if note else ''}")

    def close(self) -> None:
        """Stop the heartbeat and restore the previous ``SIGALRM`` handler and timer."""
        global _running
        if _running is self:
            _running = None
        if self._saved is None:
            return
        handler, (delay, interval) = self._saved
        self._saved = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
        if delay:
            signal.setitimer(signal.ITIMER_REAL, delay, interval)

    def _arm(self) -> None:
        if (self.heartbeat <= 0 or not hasattr(signal, "setitimer")
                or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None)):
            return
        self._saved = (signal.signal(signal.SIGALRM, self._beat), signal.getitimer(signal.ITIMER_REAL))
        signal.siginterrupt(signal.SIGALRM, False)
        signal.setitimer(signal.ITIMER_REAL, self.heartbeat, self.heartbeat)

    def _beat(self, signum, frame) -> None:  # noqa: ARG002  (signal handler signature)
        self._write(f"      {self._what}: still running, {time.monotonic() - self._t0:.0f}s, "
                    f"peak memory {peak_rss_bytes() / 2**30:.2f} GiB", in_handler=True)

    def _write(self, line: str, in_handler: bool = False) -> None:
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):  # StringIO and friends: no descriptor
            fd = None
        if fd is None:
            self.stream.write(line + "\n")
            self.stream.flush()
            return
        if not in_handler:  # the handler may have interrupted a write to this stream: no flush there
            self.stream.flush()  # anything printed before goes out first
        data = (line + "\n").encode()
        while data:
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:  # a non-blocking pipe that is full: drop the line, never hang
                return
