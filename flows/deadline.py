"""Time limits of the pipeline's stages, enforced here rather than by Prefect.

A Prefect task's `timeout_seconds` cannot stop blocking synchronous code run elsewhere: a Ray Train
`fit` it interrupts keeps its workers running, and in a thread other than the main one Prefect only
raises at the next bytecode. `time_limit(stage, key, seconds)` raises `StageTimeout` in the thread that
runs the stage once `seconds` have passed: by SIGALRM in the main thread (it interrupts blocking system
calls too) when no other SIGALRM handler is installed, else from a watcher thread that raises it
asynchronously in the stage's thread (at its next bytecode). The stage's own code decides what "stop"
means: the Ray Train driver catches it, stops the run and its workers, and raises it again
(flows/train/supervise.py). `time_limited(section)` wraps a task whose first argument is the pipeline
config with the limit `<section>.timeout_s`. A time limit is the user's setting: `StageTimeout` is a
`UserError` (one line, exit code 2, never retried: a retry would take as long again).
"""

from __future__ import annotations

import ctypes
import functools
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from flows.errors import UserError

F = TypeVar("F", bound=Callable)

# The stage each config section limits, by its task name.
STAGES = {"data": "prepare_dataset", "train": "train_model", "eval": "evaluate_model", "registry": "register_model"}


class StageTimeout(UserError):
    """A stage ran past its time limit; the message names the stage and its `<section>.timeout_s`."""

    def __init__(self, stage: str, key: str, seconds: float, detail: str = ""):
        self.stage, self.key, self.seconds, self.detail = stage, key, seconds, detail
        super().__init__(f"{stage}: stopped after its time limit {key}={seconds:g} s{detail}; "
                         f"raise {key} if the stage needs longer")

    def with_detail(self, detail: str) -> "StageTimeout":
        """The same timeout, its message saying what was done about it."""
        return StageTimeout(self.stage, self.key, self.seconds, detail)

    def __reduce__(self):  # picklable (Prefect may persist a failed state's exception), subclasses included
        return StageTimeout, (self.stage, self.key, self.seconds, self.detail)


@contextmanager
def time_limit(stage: str, key: str, seconds: float) -> Iterator[None]:
    """Raise StageTimeout(stage, key, seconds) in this thread once `seconds` pass inside the block."""
    error = StageTimeout(stage, key, seconds)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        with _alarm(seconds, error):
            yield
    else:
        with _watcher(seconds, error):
            yield


def time_limited(section: str) -> Callable[[F], F]:
    """Decorate a stage function `f(cfg, ...)` so it runs under `cfg.<section>.timeout_s`."""
    stage, key = STAGES[section], f"{section}.timeout_s"

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def limited(cfg, *args, **kwargs):
            with time_limit(stage, key, getattr(cfg, section).timeout_s):
                return fn(cfg, *args, **kwargs)

        return limited  # type: ignore[return-value]

    return wrap


@contextmanager
def _alarm(seconds: float, error: StageTimeout) -> Iterator[None]:
    fired = False

    def on_alarm(signum, frame):
        nonlocal fired
        if not fired:  # once: the stage's own clean-up must not be interrupted again
            fired = True
            raise error

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _watcher(seconds: float, error: StageTimeout) -> Iterator[None]:
    target = threading.get_ident()
    done = threading.Event()
    lock = threading.Lock()  # the block's end and the raise never cross: one of them comes first
    raised = False

    def watch() -> None:
        nonlocal raised
        if done.wait(seconds):
            return
        with lock:
            if not done.is_set():
                raised = True
                _raise_in_thread(target, error)

    threading.Thread(target=watch, name=f"time-limit-{error.stage}", daemon=True).start()
    try:
        yield
    finally:
        with lock:
            done.set()
        if raised:  # not delivered yet if the block ended first: it must not surface at some later bytecode
            _raise_in_thread(target, None)


def _raise_in_thread(thread_id: int, error: StageTimeout | None) -> None:
    """Raise `error` in thread `thread_id` at its next bytecode (None: cancel a pending one). CPython
    raises a class there, instantiated without arguments: a subclass that rebuilds `error`."""
    exc = None
    if error is not None:
        args = (error.stage, error.key, error.seconds)
        exc = type("StageTimeout", (StageTimeout,), {"__init__": lambda self: StageTimeout.__init__(self, *args)})
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)
