"""MetricBuffer on a real SQLite MLflow store: a locked store fills a tiny buffer (drops counted and
reported), a batch whose response was lost is not sent again, and a run that refuses points for good
does not hold the end of training up. The real-server outage during Ray training is
tests/integration/test_mlflow_outage.py."""

from __future__ import annotations

import sqlite3
import time
import uuid

import pytest

from flows.train.metric_buffer import DROPPED_TAG, MetricBuffer

pytestmark = pytest.mark.slow  # creating the SQLite store's tables takes seconds on a busy machine

FAST_RETRY = (0.05, 0.2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, database path) of a SQLite store (MLflow's sessions wait 20 s for a lock, then fail)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    MlflowClient(uri).search_experiments(max_results=1)  # creates the tables
    return uri, db


def new_run(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.create_run(client.create_experiment(f"buffer-{uuid.uuid4().hex[:8]}")).info.run_id


def steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_a_full_buffer_drops_the_oldest_points_and_the_run_says_how_many(store, capsys):
    uri, db = store
    run_id = new_run(uri)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the store is locked past its busy timeout: nothing is sent, not even params
    buffer = MetricBuffer(uri, run_id, params={"world_size": "1"}, capacity=4, retry_s=FAST_RETRY)
    try:
        for step in range(1, 11):
            buffer.add({"train_loss": 1.0 / step}, step)
        deadline = time.monotonic() + 60
        while not buffer.failed_tries and time.monotonic() < deadline:  # until a try has failed on the lock
            time.sleep(0.05)
        assert buffer.failed_tries
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    assert buffer.close(timeout_s=60) == 6
    assert (buffer.overflow, buffer.rejected, buffer.left_at_close) == (6, 0, 0)
    assert steps(uri, run_id, "train_loss") == [7, 8, 9, 10]  # the newest four, once each
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags[DROPPED_TAG] == "6"
    assert run.data.params == {"world_size": "1"}
    err = capsys.readouterr().err
    assert f"6 metric point(s) of MLflow run {run_id} were not logged (6 dropped from the full buffer " \
           f"(4 points)); the run's tag {DROPPED_TAG} says so" in err
    assert "cannot log to" in err and "training goes on" in err


class Recording:
    """A real client that records every metric batch it is given; with lose_first, the first lands in
    the store, then fails as a reset connection would (the outcome the client cannot know)."""

    def __init__(self, client, lose_first: bool):
        self.client, self.sent, self.lost = client, [], not lose_first

    def __getattr__(self, name):
        return getattr(self.client, name)

    def log_batch(self, run_id, metrics=(), **kwargs):
        from mlflow.exceptions import MlflowException

        self.client.log_batch(run_id, metrics=metrics, **kwargs)
        if metrics:
            self.sent.append([(m.key, m.step) for m in metrics])
            if not self.lost:
                self.lost = True
                raise MlflowException("Connection reset by peer", error_code="TEMPORARILY_UNAVAILABLE")


def recording_buffer(clients: list, lose_first: bool = False) -> type[MetricBuffer]:
    class Buffer(MetricBuffer):
        def _connect(self):
            clients.append(Recording(super()._connect(), lose_first))
            return clients[-1]

    return Buffer


def test_a_batch_whose_response_was_lost_is_read_back_not_sent_again(store):
    uri, _ = store
    run_id = new_run(uri)
    clients: list[Recording] = []
    buffer = recording_buffer(clients, lose_first=True)(uri, run_id, retry_s=FAST_RETRY)
    for step in range(1, 6):
        buffer.add({"train_loss": 1.0 / step, "lr": 0.1}, step)
    assert buffer.close(timeout_s=60) == 0

    (client,) = clients
    assert client.lost
    sent = [point for batch in client.sent for point in batch]
    assert len(sent) == len(set(sent)) == 10, client.sent  # no point handed to the store twice
    assert steps(uri, run_id, "train_loss") == steps(uri, run_id, "lr") == [1, 2, 3, 4, 5]


def test_points_the_store_refuses_for_good_are_counted_without_waiting_for_the_flush_timeout(store, capsys):
    from mlflow.tracking import MlflowClient

    uri, _ = store
    run_id = new_run(uri)
    MlflowClient(uri).delete_run(run_id)  # the store refuses to log to a deleted run
    buffer = MetricBuffer(uri, run_id, retry_s=FAST_RETRY)
    buffer.add({"train_loss": 1.0, "lr": 0.1}, 1)
    # a refused batch is not retried: were it retried until the flush gave up, these would be unsent
    assert buffer.close(timeout_s=120) == 2
    assert (buffer.rejected, buffer.left_at_close) == (2, 0)
    assert "the tracking store refused metric points" in capsys.readouterr().err



def test_a_resumed_attempt_sends_what_its_checkpoint_carried_once_and_no_step_the_dead_attempt_logged(store):
    """The dead attempt logged steps 1, 2 and 4 and checkpointed at 3 with steps 2 and 3 unsent (2 then
    landed): the attempt resuming from 3 sends step 3 only, and step 4 (computed again, exactly) not again."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from flows.train.metric_buffer import Point

    uri, _ = store
    run_id = new_run(uri)
    p1, p2, p3, p4 = (Point("train_loss", 1.0 / step, 1000 * step, step) for step in range(1, 5))
    MlflowClient(uri).log_batch(run_id, metrics=[Metric(*p) for p in (p1, p2, p4)])
    clients: list[Recording] = []
    buffer = recording_buffer(clients)(uri, run_id, carried=[p2, p3], resumed_from=3, retry_s=FAST_RETRY)
    buffer.add({"train_loss": p4.value}, 4)
    buffer.add({"train_loss": 0.2}, 5)
    assert buffer.close(timeout_s=60) == 0

    (client,) = clients
    assert [point for batch in client.sent for point in batch] == [("train_loss", 3), ("train_loss", 5)]
    history = MlflowClient(uri).get_metric_history(run_id, "train_loss")
    assert [(m.step, m.timestamp) for m in history][:4] == [(1, 1000), (2, 2000), (3, 3000), (4, 4000)]
    assert [m.step for m in history] == [1, 2, 3, 4, 5]


def test_after_a_driver_loss_the_carried_points_the_dead_run_holds_are_not_sent_again(store):
    """The dead driver's run A checkpointed at 3 with steps 2 and 3 unsent, and its thread then sent 2
    before it died: the attempt resuming in the new run B sends step 3 only; each step in one run, once.
    Carried points meant for a run that no longer exists are all sent."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from flows.train.metric_buffer import Point

    uri, _ = store
    client = MlflowClient(uri)
    run_a = new_run(uri)
    p1, p2, p3 = (Point("train_loss", 1.0 / step, 1000 * step, step) for step in range(1, 4))
    client.log_batch(run_a, metrics=[Metric(*p) for p in (p1, p2)])
    run_b = new_run(uri)
    buffer = MetricBuffer(uri, run_b, carried=[p2, p3], carried_from=[run_a, run_a], resumed_from=3,
                          retry_s=FAST_RETRY)
    buffer.add({"train_loss": 0.25}, 4)
    assert buffer.close(timeout_s=60) == 0
    assert steps(uri, run_a, "train_loss") == [1, 2] and steps(uri, run_b, "train_loss") == [3, 4]

    # A checkpoint taken before the check carries each point with the run it is meant for: a retry of B
    # (the same run) checks A's points against A, its own against B.
    p4 = Point("train_loss", 0.25, 4000, 4)
    run_d = new_run(uri)
    client.log_batch(run_d, metrics=[Metric(*p4)])
    buffer = MetricBuffer(uri, run_d, carried=[p2, p3, p4], carried_from=[run_a, run_a, run_d], resumed_from=4,
                          retry_s=FAST_RETRY)
    assert buffer.close(timeout_s=60) == 0
    assert steps(uri, run_d, "train_loss") == [3, 4]

    run_c = new_run(uri)  # points meant for a run that no longer exists: all sent
    buffer = MetricBuffer(uri, run_c, carried=[p2, p3], carried_from=[uuid.uuid4().hex] * 2, resumed_from=3,
                          retry_s=FAST_RETRY)
    assert buffer.close(timeout_s=60) == 0
    assert steps(uri, run_c, "train_loss") == [2, 3]


def test_points_not_yet_checked_against_their_run_are_carried_with_it():
    """A store that does not answer: the next checkpoint carries every point with the run it is meant for."""
    from flows.train.metric_buffer import Point

    p1, p2 = Point("train_loss", 1.0, 1000, 1), Point("train_loss", 0.5, 2000, 2)
    buffer = MetricBuffer("http://127.0.0.1:9", "run-b", carried=[p1], carried_from=["run-a"], resumed_from=1,
                          retry_s=(5.0, 5.0))
    buffer.add({"train_loss": p2.value}, 2)
    points = buffer.unsent()
    assert [p.step for p in points] == [1, 2] and buffer.unsent_runs(points) == ["run-a", "run-b"]
    assert buffer.close(timeout_s=0.1) == 2


def test_the_end_of_training_waits_a_bounded_time_for_a_store_that_stays_locked(store, capsys):
    uri, db = store
    run_id = new_run(uri)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        buffer = MetricBuffer(uri, run_id, retry_s=FAST_RETRY)
        buffer.add({"train_loss": 1.0, "lr": 0.1}, 1)
        assert buffer.close(timeout_s=1) == 2
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert (buffer.overflow, buffer.rejected, buffer.left_at_close) == (0, 0, 2)
    assert ("2 not sent: the tracking store did not answer in the 1s the end of training waits); "
            f"the run's tag {DROPPED_TAG} could not be written") in capsys.readouterr().err
