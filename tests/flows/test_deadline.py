"""flows/deadline.py: a stage's time limit stops blocking code in the main thread (SIGALRM) and in other
threads (an asynchronous exception), never fires after its block ended, and names the stage and its key.
The real stage under a limit (a Ray Train run stopped with its workers) is tests/integration/test_stage_timeouts.py."""

from __future__ import annotations

import pickle
import signal
import threading
import time

import pytest

from flows.config import PipelineConfig, load_config
from flows.deadline import STAGES, StageTimeout, time_limit, time_limited
from flows.errors import is_user_error


def _spin() -> None:
    while True:  # pure bytecode, never returns
        pass


def _sleep() -> None:
    time.sleep(60)  # one blocking system call


@pytest.fixture
def alarm_free():
    """SIGALRM as in the CLI's process: pytest-timeout's handler (and its timer) set aside for the test."""
    handler = signal.signal(signal.SIGALRM, signal.SIG_DFL)
    timer = signal.setitimer(signal.ITIMER_REAL, 0)
    yield
    signal.signal(signal.SIGALRM, handler)
    if timer[0]:
        signal.setitimer(signal.ITIMER_REAL, *timer)


@pytest.mark.parametrize("block", [_spin, _sleep])
def test_main_thread_block_is_stopped_naming_stage_and_key(block, alarm_free):
    with pytest.raises(StageTimeout) as err:
        with time_limit("train_model", "train.timeout_s", 0.2):
            block()
    assert str(err.value).startswith("train_model: stopped after its time limit train.timeout_s=0.2 s")
    assert is_user_error(err.value)  # one line, exit code 2, never retried
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_another_alarm_handler_is_left_alone_and_the_watcher_stops_the_block():
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        with pytest.raises(StageTimeout, match="train.timeout_s=0.2 s"):
            with time_limit("train_model", "train.timeout_s", 0.2):
                _spin()
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        time.sleep(0.2)
        assert fired == [signal.SIGALRM]  # still the other handler's alarm
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_other_thread_is_stopped_too():
    caught: list[BaseException] = []

    def stage() -> None:
        try:
            with time_limit("evaluate_model", "eval.timeout_s", 0.2):
                while True:
                    time.sleep(0.01)
        except StageTimeout as exc:
            caught.append(exc)

    worker = threading.Thread(target=stage)
    worker.start()
    worker.join(30)
    assert not worker.is_alive() and len(caught) == 1
    assert isinstance(caught[0], StageTimeout) and "eval.timeout_s=0.2 s" in str(caught[0])


@pytest.mark.parametrize("in_thread", [False, True])
def test_a_block_that_ends_in_time_is_never_interrupted_later(in_thread):
    errors: list[BaseException] = []

    def stage() -> None:
        try:
            with time_limit("register_model", "registry.timeout_s", 0.1):
                pass
            end = time.monotonic() + 0.4  # well past the limit, outside the block
            while time.monotonic() < end:
                pass
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    if in_thread:
        worker = threading.Thread(target=stage)
        worker.start()
        worker.join(30)
    else:
        stage()
    assert errors == []


def test_timeout_survives_pickling_with_what_was_done():
    err = StageTimeout("train_model", "train.timeout_s", 5).with_detail(": the Ray Train run was aborted")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and "aborted" in str(back) and back.key == "train.timeout_s"


def test_every_stage_has_a_documented_limit_and_the_decorator_reads_it():
    cfg = PipelineConfig()
    for section in STAGES:
        field = type(getattr(cfg, section)).model_fields["timeout_s"]
        assert field.default > 0 and "Time limit" in field.description and "default" in field.description

    @time_limited("data")
    def prepare(cfg: PipelineConfig) -> str:
        while True:
            time.sleep(0.01)

    with pytest.raises(StageTimeout, match=r"^prepare_dataset: .*data\.timeout_s=0\.2 s"):
        prepare(load_config(overrides=["data.timeout_s=0.2"]))
