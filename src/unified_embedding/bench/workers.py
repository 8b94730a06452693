"""Runs of a sweep trained in worker processes, at most `jobs` at a time.

Each run gets a fresh process, which sends back the run's outcome through a pipe. The
processes fork from a forkserver that imported the task's module once, so no torch state is
shared with the parent and no run pays the 3-5 s of importing torch, scikit-learn and the
package again; it also means every run of a sweep runs the code the sweep started with.
The parent alone writes the results database, so SQLite sees one writer however many
workers train. A worker that dies without an answer (killed, out of memory, a crash in native
code) becomes a failed run, not a failed sweep. Each worker holds the reading end of a pipe
whose only writer is the parent, and exits when that pipe closes, so a killed sweep leaves no
runs training on behind the one that resumes it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch

#: Imported once in the forkserver besides the task's module: a process's first torch
#: optimizer imports torch._dynamo, which takes 1.7 s (and starts no thread, so forking after it is safe).
PRELOAD = ("torch._dynamo",)


def run_in_workers(
    function: Callable[..., Any],
    tasks: Sequence[tuple[Any, tuple]],
    *,
    jobs: int,
    threads: int,
    start: Callable[[Any], None],
    finish: Callable[[Any, Any], None],
    died: Callable[[Any, str, float], None],
) -> None:
    """Call `function(*args)` for each `(key, args)` task in a worker, `jobs` at a time.

    `start(key)` runs here as a task's worker starts and `finish(key, value)` when it answers;
    `died(key, message, seconds)` when it exits without answering. A task that raises in its
    worker is re-raised here as `WorkerError` with the worker's traceback, after the other
    workers are stopped. Workers use `threads` torch threads each.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, function.__module__])  # only before the server starts; else a no-op
    queue = list(tasks)[::-1]
    running: dict[Connection, tuple[Any, BaseProcess, float, Connection]] = {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                key, args = queue.pop()
                receiver, sender = context.Pipe(duplex=False)
                parent_alive, alive = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(sender, parent_alive, function, args, threads))
                start(key)
                process.start()
                sender.close()  # the worker now holds the only sending end: its death closes the pipe
                parent_alive.close()  # and the only reading end of `alive`, which closes when this process dies
                running[receiver] = (key, process, time.perf_counter(), alive)
            for receiver in wait(list(running)):
                key, process, started, alive = running.pop(receiver)
                try:
                    ok, value = receiver.recv()
                except EOFError:
                    ok, value = None, None
                finally:
                    receiver.close()
                    process.join()
                    alive.close()
                if ok is None:
                    seconds = time.perf_counter() - started
                    died(key, f"the worker training it exited with code {process.exitcode}", seconds)
                elif not ok:
                    raise WorkerError(value)
                else:
                    finish(key, value)
    finally:
        for receiver, (_, process, _, alive) in running.items():
            process.terminate()
            process.join()
            receiver.close()
            alive.close()


class WorkerError(RuntimeError):
    """A task raised in its worker; the message is the worker's traceback."""


def _worker(
    sender: Connection, parent_alive: Connection, function: Callable[..., Any], args: tuple, threads: int
) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent_alive,), daemon=True).start()
    torch.set_num_threads(threads)
    try:
        answer = (True, function(*args))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent, which decides
        answer = (False, traceback.format_exc())
    sender.send(answer)
    sender.close()


def _exit_with_parent(parent_alive: Connection) -> None:
    """Block until the parent's end of the pipe closes (the parent never writes), then exit."""
    with contextlib.suppress(EOFError):
        parent_alive.recv()
    os._exit(1)
