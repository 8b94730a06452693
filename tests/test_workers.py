"""Worker processes of a parallel sweep: answers, errors, silent deaths and orphans."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from unified_embedding.bench.workers import WorkerError, run_in_workers


def _collect(function, tasks, jobs=2):
    """Run `function` over `(key, args)` tasks in workers; what each callback saw."""
    events = {"start": [], "finish": {}, "died": {}}
    run_in_workers(
        function, tasks, jobs=jobs, threads=1, start=events["start"].append, finish=events["finish"].__setitem__,
        died=lambda key, message, seconds: events["died"].__setitem__(key, (message, seconds)),
    )  # fmt: skip
    return events


def test_answers_come_back_to_finish_and_a_silent_death_to_died():
    events = _collect(math.factorial, [("a", (5,)), ("b", (6,)), ("c", (7,))])
    assert events["start"] == ["a", "b", "c"]
    assert events["finish"] == {"a": 120, "b": 720, "c": 5040} and events["died"] == {}
    events = _collect(os._exit, [("gone", (3,))], jobs=1)
    message, seconds = events["died"]["gone"]
    assert "exited with code 3" in message and seconds > 0 and events["finish"] == {}


def test_an_exception_in_a_worker_is_raised_here_with_its_traceback():
    with pytest.raises(WorkerError, match="math domain error"):
        _collect(math.sqrt, [("bad", (-1.0,))], jobs=1)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc (Linux)")
def test_a_worker_stops_within_seconds_of_its_parent_being_killed(tmp_path):
    script = textwrap.dedent(
        """
        import time
        from unified_embedding.bench.workers import run_in_workers
        run_in_workers(time.sleep, [("k", (120,))], jobs=1, threads=1, start=print, finish=print, died=print)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "k"  # the worker is starting
    deadline = time.time() + 60
    # The worker forks from a forkserver, so it is the parent's grandchild.
    while not any(_children(child) for child in _children(parent.pid)) and time.time() < deadline:
        time.sleep(0.2)
    workers = _descendants(parent.pid)
    assert len(workers) >= 2, "the forkserver and its worker did not appear"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 15
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _descendants(pid: int) -> list[int]:
    children = _children(pid)
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
