"""Build progress (exporter/progress.py): stage lines, the SIGALRM heartbeat while a stage runs,
phases, and that the heartbeat leaves the process's signal state as it found it. (A real Ctrl-C
during a build: tests/test_bad_inputs.py::test_sigint_during_build_exits_130_and_leaves_nothing.)"""
import io
import re
import signal
import subprocess
import sys
import time

import pytest

from effexport.exporter import progress as progress_mod
from effexport.exporter.progress import Progress

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no setitimer on this platform")


def _busy(seconds: float) -> None:
    """Python-level work (the handler runs between bytecodes), like a torch.export trace."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))


def test_heartbeat_lines_while_a_stage_runs_then_none():
    stream = io.StringIO()
    progress = Progress(2, stream, heartbeat=0.05)
    t0 = progress.stage("capture (torch.export)")
    _busy(0.3)
    progress_mod.phase("capture: torch.export")
    _busy(0.3)
    progress.done(t0, "12 nodes")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[1/2] capture (torch.export) ..." and lines[-1].endswith("s: 12 nodes"), lines
    beats = [line for line in lines if "still running" in line]
    assert len(beats) >= 6 and all(line.endswith("GiB") for line in beats), lines
    assert any(line.startswith("      capture: still running") for line in beats)
    assert any(line.startswith("      capture: torch.export: still running") for line in beats)
    after = len(stream.getvalue().splitlines())
    _busy(0.3)
    assert len(stream.getvalue().splitlines()) == after  # done() stopped it
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_close_after_a_failed_stage_restores_signal_state():
    stream = io.StringIO()
    progress = Progress(3, stream, heartbeat=0.05)
    progress.stage("lower")
    _busy(0.2)
    progress.close()  # a build that raised: its stage never reached done()
    n = len(stream.getvalue().splitlines())
    _busy(0.2)
    assert len(stream.getvalue().splitlines()) == n >= 3
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    progress_mod.phase("lower: nothing runs")  # no running stage: a no-op
    assert len(stream.getvalue().splitlines()) == n


def test_an_existing_sigalrm_handler_is_never_replaced():
    calls = []
    old = signal.signal(signal.SIGALRM, lambda *a: calls.append(1))
    try:
        stream = io.StringIO()
        progress = Progress(1, stream, heartbeat=0.05)
        t0 = progress.stage("capture")
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        _busy(0.3)
        progress.done(t0)
        assert calls == [1]  # the owner's handler still got its alarm
        assert "still running" not in stream.getvalue()
    finally:
        signal.signal(signal.SIGALRM, old)


def test_heartbeat_goes_to_the_file_descriptor_between_prints(tmp_path):
    """A real process printing to a pipe while the heartbeat runs: every heartbeat arrives whole
    (one ``os.write``) and ends its line, the stage lines are whole, and nothing is lost. A heartbeat
    can start right after a ``print``'s text and before its newline (CPython runs signal handlers
    between the writes of one print), so it may share a line with such text: documented."""
    code = (
        "import time, sys\n"
        "from effexport.exporter.progress import Progress\n"
        "p = Progress(1, heartbeat=0.05)\n"
        "t0 = p.stage('capture (x)')\n"
        "end = time.monotonic() + 0.5\n"
        "while time.monotonic() < end:\n"
        "    print('noise', file=sys.stderr, flush=True); sum(range(20000))\n"
        "p.done(t0, 'ok')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
    lines = err.splitlines()
    assert lines[0] == "[1/1] capture (x) ..." and lines[-1].endswith("s: ok"), err[-2000:]
    beat = re.compile(r"      capture: still running, \d+s, peak memory \d+\.\d\d GiB$")
    beats = [line for line in lines if "still running" in line]
    assert beats and all(beat.search(line) and line[:beat.search(line).start()] in ("", "noise")
                         for line in beats), beats
    rest = [beat.sub("", line) for line in lines[1:-1]]
    assert set(rest) <= {"noise", ""} and rest.count("noise") > 10


def test_no_heartbeat_off_the_main_thread():
    import threading

    stream = io.StringIO()
    seen = {}

    def run():
        progress = Progress(1, stream, heartbeat=0.05)
        t0 = progress.stage("capture")
        seen["handler"] = signal.getsignal(signal.SIGALRM)
        progress.done(t0)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen["handler"] == signal.SIG_DFL
    assert stream.getvalue().splitlines()[0] == "[1/1] capture ..."

