"""The decisions of one attempt (`Attempts.attempt`) and of the scheduler, in process: the real
settings, layout, journal, publisher and signer over an in-memory store (tests/fakestore.py)
that can be told to fail as the real adapters fail. Each test asserts what a user would see:
the outcome, the error's kind, the journal, the queue, the bytes the bucket holds, the metadata
JSON. No server, no log text."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pytest

from syncd import budget, claims, publish
from syncd.attempt import (
    Attempts,
    Elsewhere,
    Failed,
    Held,
    Outcome,
    Postponed,
    Recorded,
    Unfinished,
)
from syncd.chores import Chores
from syncd.config import Settings, load_settings
from syncd.errors import BeingWritten, Kind, Throttled
from syncd.journal import Entry, Journal, State, clock
from syncd.layout import Layout, Result
from syncd.metadata import READ_AGAIN
from syncd.publish import Publisher
from syncd.schedule import Scheduler
from syncd.signing import UrlSigner
from tests.conftest import KEY_PAIR_ID
from tests.fakestore import FakeStore, access_denied, slow_down, unreachable

T = TypeVar("T")
MakeWorld = Callable[..., "World"]  # (store=None, **syncd settings) -> World
DOMAIN = "https://d111111abcdef8.cloudfront.net"
RETRY_MIN, RETRY_MAX, RETRY_PERMANENT = 10.0, 30.0, 900.0
AN_HOUR_AGO = time.time() - 3600


def tree_files() -> dict[str, bytes]:
    """A small Zarr store: two chunks, and the documents uploaded after them."""
    return {
        "results.zarr/.zgroup": b'{"zarr_format": 2}',
        "results.zarr/t2m/.zarray": b'{"chunks": [1, 4]}',
        "results.zarr/t2m/0.0": os.urandom(70_000),
        "results.zarr/t2m/0.1": os.urandom(3_000),
    }


def server_metadata(name: str) -> dict[str, Any]:
    """The metadata as the Earth2Studio server leaves a finished result."""
    return {"request_id": name, "status": "completed", "storage_type": "server", "device": "cpu"}


def backdate(path: Path) -> None:
    os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO), follow_symlinks=False)


class World:
    """The objects `syncd run` builds (cli.run_daemon), over a FakeStore, on one event loop."""

    def __init__(self, root: Path, key_path: Path, store: FakeStore, **daemon: Any) -> None:
        self.outputs = root / "outputs"
        self.outputs.mkdir(parents=True)
        flags: dict[str, dict[str, Any]] = {
            "object_storage": {
                "enabled": True,
                "bucket": "results",
                "endpoint_url": "http://127.0.0.1:9",
                "access_key_id": "key",
                "secret_access_key": "secret",
                "use_transfer_acceleration": False,
                "cloudfront_domain": DOMAIN,
                "cloudfront_key_pair_id": KEY_PAIR_ID,
                "cloudfront_private_key_path": str(key_path),
            },
            "syncd": {
                "outputs_dir": str(self.outputs),
                "state_dir": str(root / "state"),
                "retry_min_delay": RETRY_MIN,
                "retry_max_delay": RETRY_MAX,
                "retry_permanent_delay": RETRY_PERMANENT,
                **daemon,
            },
        }
        self.settings: Settings = load_settings(flags=flags, environ={})[0]
        self.layout = Layout(self.settings)
        self.journal = Journal(self.settings.syncd.state_dir)
        self.store = store
        self.loop = asyncio.new_event_loop()
        self.run(store.connect())
        signer = UrlSigner.from_settings(self.settings.object_storage)
        self.publisher = Publisher(self.settings, store, signer)
        self.attempts = Attempts(self.settings, self.publisher, self.journal)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        self.journal.close()

    def result(
        self,
        name: str = "exec_1",
        files: dict[str, bytes] | None = None,
        metadata: dict[str, Any] | str | None = None,
        marked: bool = True,
    ) -> Result:
        """A result tree written an hour ago with its metadata (the server's, unless given as
        a dict, or as text written just now), and its marker dropped now (`marked`)."""
        result = self.layout.result(PurePosixPath(name))
        files = tree_files() if files is None else files
        result.tree.mkdir(parents=True)
        for rel, data in files.items():
            path = result.tree / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for folder, dirs, names in os.walk(result.tree, topdown=False):
            for entry in [*dirs, *names]:
                backdate(Path(folder) / entry)
        backdate(result.tree)
        document = server_metadata(name) if metadata is None else metadata
        text = document if isinstance(document, str) else json.dumps(document)
        result.metadata.write_text(text)
        if not isinstance(document, str):
            backdate(result.metadata)
        if marked:
            result.marker.write_text("")
        return result

    def attempt(self, result: Result, **options: bool) -> Outcome:
        return self.run(self.attempts.attempt(result, **options))

    def metadata(self, result: Result) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(result.metadata.read_text())
        return document

    def entry(self, result: Result) -> Entry | None:
        return self.run(self.journal.get(result.rel.as_posix()))

    def record(self, result: Result) -> Entry:
        record = self.entry(result)
        assert record is not None, "the journal holds nothing for the result"
        return record


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def make_world(tmp_path: Path, signing_key: tuple[Path, Any]) -> Iterator[MakeWorld]:
    worlds: list[World] = []

    def make(store: FakeStore | None = None, **daemon: Any) -> World:
        world = World(tmp_path / f"w{len(worlds)}", signing_key[0], store or FakeStore(), **daemon)
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        world.close()


@pytest.fixture
def world(make_world: MakeWorld, store: FakeStore) -> World:
    return make_world(store)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def assert_published(world: World, result: Result, files: dict[str, bytes]) -> None:
    """The bucket holds exactly the tree under remote_path, and the metadata records it."""
    prefix = f"{result.remote_path}/"
    held = {k.removeprefix(prefix): v for k, v in world.store.objects.items()}
    assert held == files
    document = world.metadata(result)
    assert document["storage_type"] == "s3"
    assert document["remote_path"] == result.remote_path == f"outputs/{result.name}"
    assert document["signed_url"].startswith(f"{DOMAIN}/{result.remote_path}/*?Policy=")
    assert document["signed_url"].endswith(f"&Key-Pair-Id={KEY_PAIR_ID}")
    entries = {e["path"]: (e["size"], e["md5"]) for e in document["output_files"]}
    assert entries == {f"{result.name}/{k}": (len(v), md5(v)) for k, v in files.items()}


def local_files(result: Result) -> dict[str, bytes]:
    """The files of the result's local tree, by their path in it."""
    tree = result.tree
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*") if p.is_file()}


def assert_unrecorded(world: World, result: Result) -> None:
    document = world.metadata(result)
    assert document["storage_type"] == "server"
    assert "remote_path" not in document and "signed_url" not in document


def test_a_marked_result_is_uploaded_recorded_and_journalled_done(world: World) -> None:
    files = tree_files()
    result = world.result(files=files)

    outcome = world.attempt(result)

    assert isinstance(outcome, Recorded)
    assert outcome.uploaded is not None and outcome.uploaded.sent
    assert not outcome.restored
    assert_published(world, result, files)
    assert world.metadata(result)["device"] == "cpu"  # the server's fields are kept
    record = world.record(result)
    assert (record.state, record.files, record.bytes) == (
        State.DONE,
        len(files),
        sum(map(len, files.values())),
    )
    # Zarr documents only once every chunk is stored; chunks immutable, documents revalidated.
    documents = [k for k in world.store.puts if k.endswith((".zgroup", ".zarray"))]
    assert world.store.puts[-len(documents) :] == documents
    assert world.store.headers[f"{result.remote_path}/results.zarr/.zgroup"].cache_control == (
        "no-cache"
    )
    chunk = world.store.headers[f"{result.remote_path}/results.zarr/t2m/0.0"]
    assert chunk.cache_control == "public, max-age=31536000, immutable"


def test_a_result_without_its_marker_is_unfinished_and_nothing_is_sent(world: World) -> None:
    result = world.result(marked=False)

    outcome = world.attempt(result)

    assert isinstance(outcome, Unfinished)
    assert "marker" in outcome.why
    assert world.store.puts == []
    assert world.entry(result) is None
    assert_unrecorded(world, result)


def test_by_metadata_a_result_still_running_is_unfinished(make_world: MakeWorld) -> None:
    world = make_world(completion="metadata")
    result = world.result(metadata={"request_id": "exec_1", "status": "running"}, marked=False)

    outcome = world.attempt(result)

    assert isinstance(outcome, Unfinished)
    assert "'running'" in outcome.why
    assert world.store.puts == []
    assert "storage_type" not in world.metadata(result)


def test_an_unreachable_store_is_transient_and_backs_off_longer_each_time(
    world: World, store: FakeStore
) -> None:
    result = world.result()
    store.fail(unreachable, times=None)

    delays = []
    for attempt in (1, 2, 3):
        before = clock()
        outcome = world.attempt(result)
        assert isinstance(outcome, Failed)
        assert outcome.error.kind is Kind.TRANSIENT
        assert outcome.attempts == attempt and outcome.journaled
        ceiling = min(RETRY_MAX, RETRY_MIN * 2 ** (attempt - 1))
        assert ceiling / 2 <= outcome.retry_in <= ceiling
        record = world.record(result)
        assert (record.state, record.attempts, record.permanent) == (
            State.RETRYING,
            attempt,
            False,
        )
        assert record.next_try is not None
        assert before + ceiling / 2 <= record.next_try <= clock() + ceiling
        delays.append(outcome.retry_in)
    assert delays[0] <= delays[1] <= RETRY_MAX
    assert store.objects == {}
    assert_unrecorded(world, result)

    store.healed()  # the next attempt after the store is back publishes it
    assert isinstance(world.attempt(result), Recorded)
    assert world.record(result).state == State.DONE


def test_access_denied_is_the_operators_and_waits_retry_permanent_delay(
    world: World, store: FakeStore
) -> None:
    result = world.result()
    store.fail(access_denied, times=None)

    before = clock()
    outcome = world.attempt(result)

    assert isinstance(outcome, Failed)
    assert outcome.error.kind is Kind.OPERATOR and outcome.error.code == "AccessDenied"
    assert outcome.retry_in == RETRY_PERMANENT
    record = world.record(result)
    assert (record.state, record.permanent) == (State.RETRYING, True)
    assert record.next_try is not None
    assert before + RETRY_PERMANENT <= record.next_try <= clock() + RETRY_PERMANENT
    assert store.objects == {}
    assert_unrecorded(world, result)


def test_a_store_that_pushes_back_gets_the_file_again_within_the_attempt(
    world: World, store: FakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish, "PUSHED_BACK_PAUSE", 0.001)  # the pauses, not their number
    files = tree_files()
    result = world.result(files=files)
    store.fail(slow_down, times=2, key_suffix="/0.0")

    outcome = world.attempt(result)

    assert isinstance(outcome, Recorded)
    assert store.puts.count(f"{result.remote_path}/results.zarr/t2m/0.0") == 3
    assert_published(world, result, files)


def test_a_store_that_always_pushes_back_fails_the_attempt_as_throttled(
    world: World, store: FakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish, "PUSHED_BACK_PAUSE", 0.001)
    monkeypatch.setattr(publish, "PUSHED_BACK_MAX_PAUSE", 0.001)
    # At one file in flight the shared budget pauses between files too.
    monkeypatch.setattr(budget, "FLOOR_PAUSE", 0.001)
    monkeypatch.setattr(budget, "FLOOR_MAX_PAUSE", 0.001)
    result = world.result()
    store.fail(slow_down, times=None, key_suffix="/0.1")

    outcome = world.attempt(result)

    assert isinstance(outcome, Failed)
    assert isinstance(outcome.error, Throttled)
    key = f"{result.remote_path}/results.zarr/t2m/0.1"
    assert store.puts.count(key) == publish.PUSHED_BACK_TRIES + 1
    assert key not in store.objects
    assert world.record(result).state == State.RETRYING
    assert_unrecorded(world, result)


@pytest.mark.parametrize("postponed", [False, True])
def test_files_acknowledged_before_a_failure_are_not_sent_again(
    world: World, store: FakeStore, postponed: bool
) -> None:
    """Also when a file written late postpones the attempt after the failure."""
    files = tree_files()
    result = world.result(files=files)
    # The Zarr documents go last, after every chunk was acknowledged.
    store.fail(unreachable, times=1, key_suffix="/.zarray")

    assert isinstance(world.attempt(result), Failed)
    chunks = {f"{result.remote_path}/results.zarr/t2m/0.{i}" for i in (0, 1)}
    assert chunks <= set(store.objects)
    assert_unrecorded(world, result)
    if postponed:
        late = result.tree / "results.zarr" / "t2m" / "1.0"
        late.write_bytes(b"late")  # after the marker: its writer may still be at it
        assert isinstance(world.attempt(result), Postponed)
        backdate(late)  # left alone since
        files = {**files, "results.zarr/t2m/1.0": b"late"}

    assert isinstance(world.attempt(result), Recorded)
    assert all(store.stored[key] == 1 for key in chunks), store.stored
    assert_published(world, result, files)


def test_metadata_that_is_not_json_is_an_input_error_and_nothing_is_sent(
    world: World, store: FakeStore
) -> None:
    result = world.result(metadata='{"status": "completed",')
    backdate(result.metadata)  # broken for an hour: nobody is writing it

    outcome = world.attempt(result)

    assert isinstance(outcome, Failed)
    assert outcome.error.kind is Kind.INPUT
    assert outcome.retry_in == RETRY_PERMANENT
    record = world.record(result)
    assert (record.state, record.permanent) == (State.RETRYING, True)
    assert store.puts == []
    assert result.metadata.read_text() == '{"status": "completed",'  # never overwritten


def test_metadata_being_written_is_read_again_shortly_and_not_journalled(
    world: World, store: FakeStore
) -> None:
    result = world.result(metadata='{"status": "compl')  # written just now

    outcome = world.attempt(result)

    assert isinstance(outcome, Postponed) and isinstance(outcome.why, BeingWritten)
    assert outcome.retry_in == READ_AGAIN
    assert world.entry(result) is None
    assert store.puts == []


def test_a_file_changed_while_it_was_sent_is_not_recorded(world: World, store: FakeStore) -> None:
    result = world.result()
    chunk = result.tree / "results.zarr/t2m/0.0"

    def rewrite(key: str) -> None:
        if key.endswith("/0.0"):
            chunk.write_bytes(os.urandom(chunk.stat().st_size))  # same size, other bytes

    store.while_sending = rewrite

    outcome = world.attempt(result)

    assert isinstance(outcome, Failed)
    assert outcome.error.kind is Kind.TRANSIENT
    assert_unrecorded(world, result)
    assert world.record(result).state == State.RETRYING
    store.while_sending = None

    # Written after its marker: its writer may be at it, so the next look only waits.
    sent = len(store.puts)
    again = world.attempt(result)
    assert isinstance(again, Postponed)
    assert len(store.puts) == sent
    assert world.record(result).attempts == 1
    assert_unrecorded(world, result)


def test_a_recorded_result_is_not_sent_again(world: World, store: FakeStore) -> None:
    files = tree_files()
    result = world.result(files=files)
    assert isinstance(world.attempt(result), Recorded)
    puts, document = list(store.puts), world.metadata(result)

    again = world.attempt(result)

    assert isinstance(again, Recorded) and again.uploaded is None
    assert store.puts == puts
    assert world.metadata(result) == document
    assert world.record(result).state == State.DONE


def test_a_record_the_server_wrote_over_is_restored_without_uploading(
    world: World, store: FakeStore
) -> None:
    files = tree_files()
    result = world.result(files=files)
    assert isinstance(world.attempt(result), Recorded)
    puts = list(store.puts)
    # The server writes its own view of the metadata again, without syncd's record.
    result.metadata.write_text(json.dumps(server_metadata(result.name)))

    outcome = world.attempt(result)

    assert isinstance(outcome, Recorded) and outcome.restored and outcome.uploaded is None
    assert store.puts == puts
    assert_published(world, result, files)


@pytest.mark.parametrize("edit", ["emptied", "removed"])
def test_a_record_whose_output_files_were_edited_is_restored_without_uploading(
    world: World, store: FakeStore, edit: str
) -> None:
    files = tree_files()
    result = world.result(files=files)
    assert isinstance(world.attempt(result), Recorded)
    puts = list(store.puts)
    document = world.metadata(result)  # storage_type and remote_path stay
    if edit == "emptied":
        document["output_files"] = []
    else:
        del document["output_files"]
    result.metadata.write_text(json.dumps(document))

    outcome = world.attempt(result)

    assert isinstance(outcome, Recorded) and outcome.restored and outcome.uploaded is None
    assert store.puts == puts
    assert_published(world, result, files)


def test_metadata_recording_another_place_is_left_alone(world: World, store: FakeStore) -> None:
    theirs = {"request_id": "exec_1", "status": "completed", "storage_type": "s3"}
    theirs["remote_path"] = "elsewhere/exec_1"
    result = world.result(metadata=theirs)

    outcome = world.attempt(result)

    assert outcome == Elsewhere("elsewhere/exec_1")
    assert store.puts == []
    assert world.metadata(result) == theirs
    assert world.record(result).state == State.ELSEWHERE


def test_another_place_is_left_alone_without_a_remedy_when_the_tree_is_gone(
    world: World, store: FakeStore
) -> None:
    theirs = {"request_id": "exec_1", "status": "completed", "storage_type": "s3"}
    theirs["remote_path"] = "elsewhere/exec_1"
    result = world.result(metadata=theirs)
    shutil.rmtree(result.tree)  # the server deleted it after its own upload

    outcome = world.attempt(result)

    assert outcome == Elsewhere("elsewhere/exec_1")
    assert store.puts == []
    assert world.metadata(result) == theirs
    said = world.record(result).last_error  # what syncd status shows
    assert said is not None and "syncd sync" not in said
    assert said.endswith("left as it is: its local tree is gone, so it cannot be published here")


def test_a_result_another_daemon_claimed_is_held(world: World, store: FakeStore) -> None:
    result = world.result()
    claim = claims.try_claim(result, world.settings.syncd.claim_timeout)
    assert isinstance(claim, claims.Claim)
    try:
        outcome = world.attempt(result)
    finally:
        claim.release()

    assert isinstance(outcome, Held)
    assert store.puts == []
    assert_unrecorded(world, result)
    assert isinstance(world.attempt(result), Recorded)  # once the claim is released


def test_delete_local_after_upload_removes_the_tree_once_recorded(make_world: MakeWorld) -> None:
    world = make_world(delete_local_after_upload=True)
    files = tree_files()
    result = world.result(files=files)

    outcome = world.attempt(result)

    assert isinstance(outcome, Recorded)
    assert_published(world, result, files)
    assert not result.tree.exists()
    assert sorted(p.name for p in result.tree.parent.iterdir() if p.name != ".syncd-claims") == [
        "exec_1.done",
        "exec_1.json",
    ]


def test_a_store_that_loses_a_file_keeps_the_local_tree(make_world: MakeWorld) -> None:
    store = FakeStore()
    store.lose.add("/0.1")  # acknowledged, never kept
    world = make_world(store, delete_local_after_upload=True)
    files = tree_files()
    result = world.result(files=files)

    outcome = world.attempt(result)

    assert isinstance(outcome, Failed)
    assert outcome.error.kind is Kind.TRANSIENT
    assert local_files(result) == files
    assert_unrecorded(world, result)

    store.lose.clear()  # only the lost file goes again
    assert isinstance(world.attempt(result), Recorded)
    assert store.stored[f"{result.remote_path}/results.zarr/t2m/0.1"] == 2
    assert store.stored[f"{result.remote_path}/results.zarr/t2m/0.0"] == 1
    assert not result.tree.exists()


def test_bytes_damaged_on_the_way_are_caught_by_the_etag_and_sent_again(
    make_world: MakeWorld,
) -> None:
    store = FakeStore(check_etags=True)  # as the adapters check a custom endpoint's ETags
    store.flip.add("/0.0")
    world = make_world(store)
    files = tree_files()
    result = world.result(files=files)

    outcome = world.attempt(result)

    assert isinstance(outcome, Failed) and outcome.error.kind is Kind.TRANSIENT
    assert_unrecorded(world, result)

    store.flip.clear()
    assert isinstance(world.attempt(result), Recorded)
    assert_published(world, result, files)


# The scheduler's decisions: when a result is queued for a worker, and when it is not.


def scheduler(world: World) -> Scheduler:
    return Scheduler(world.layout, world.journal, world.attempts, Chores(), asyncio.Event())


def test_a_result_is_queued_once_however_often_it_is_offered(world: World) -> None:
    result = world.result()
    schedule = scheduler(world)

    async def offers() -> None:
        await schedule.offer(result)
        await schedule.offer(result)
        await schedule.offer(result, fresh=True)
        assert schedule.waiting() == 1
        assert await schedule.next() == result
        await schedule.offer(result, fresh=True)  # being tried: not queued beside itself
        assert schedule.waiting() == 0
        schedule.ended(result)
        await schedule.offer(result)
        assert schedule.waiting() == 1

    world.run(offers())


def test_offers_made_while_the_journal_answers_queue_a_result_once(world: World) -> None:
    result = world.result()
    schedule = scheduler(world)

    async def offers() -> None:
        # A rescan, an event and a timer at once: each waits for the journal's answer.
        await asyncio.gather(*(schedule.offer(result, fresh=True) for _ in range(5)))

    world.run(offers())

    assert schedule.waiting() == 1


def test_a_recorded_result_is_not_queued_again(world: World) -> None:
    result = world.result()
    assert isinstance(world.attempt(result), Recorded)
    schedule = scheduler(world)

    world.run(schedule.offer(result))
    world.run(schedule.offer(result, fresh=True))

    assert schedule.waiting() == 0


def test_a_failed_result_waits_for_its_next_try_unless_an_event_comes(
    world: World, store: FakeStore
) -> None:
    result = world.result()
    store.fail(unreachable, times=None)
    assert isinstance(world.attempt(result), Failed)
    schedule = scheduler(world)

    world.run(schedule.offer(result))  # a rescan
    assert schedule.waiting() == 0
    world.run(schedule.offer(result, fresh=True))  # its marker dropped again
    assert schedule.waiting() == 1


def test_a_failed_result_is_queued_when_the_journal_says_it_is_due(
    make_world: MakeWorld,
) -> None:
    store = FakeStore()
    world = make_world(store, retry_min_delay=0.2, retry_max_delay=0.2)
    result = world.result()
    store.fail(unreachable, times=1)
    assert isinstance(world.attempt(result), Failed)
    due = world.record(result).next_try
    assert due is not None and due > clock()
    schedule = scheduler(world)

    async def retried() -> float:
        retries = asyncio.get_running_loop().create_task(schedule.retry_when_due())
        try:
            assert await asyncio.wait_for(schedule.next(), 10) == result
            return clock()
        finally:
            retries.cancel()

    assert world.run(retried()) >= due
    assert isinstance(world.attempt(result), Recorded)


def test_a_postponed_result_is_queued_by_its_timer_and_not_by_a_rescan(world: World) -> None:
    result = world.result(metadata='{"status": "compl')  # written just now
    outcome = world.attempt(result)
    assert isinstance(outcome, Postponed)
    schedule = scheduler(world)
    rel = result.rel.as_posix()

    async def postponed() -> None:
        schedule.offer_later(result, 0.1)
        assert await schedule.next_try(rel) == math.inf
        await schedule.offer(result)  # a rescan meanwhile
        assert not schedule.is_queued(rel) and schedule.in_hand(rel)
        assert await asyncio.wait_for(schedule.next(), 10) == result
        assert schedule.is_queued(rel) and await schedule.next_try(rel) is None

    world.run(postponed())


def test_nothing_is_queued_once_the_daemon_stops(world: World) -> None:
    result = world.result()
    stopping = asyncio.Event()
    schedule = Scheduler(world.layout, world.journal, world.attempts, Chores(), stopping)
    stopping.set()

    world.run(schedule.offer(result, fresh=True))

    assert schedule.waiting() == 0 and schedule.oldest() is None


def test_a_result_waits_since_its_marker_until_it_is_settled(world: World) -> None:
    result = world.result()
    schedule = scheduler(world)

    world.run(schedule.offer(result))

    assert schedule.oldest() == result.marker.stat().st_mtime
    schedule.settled(result.rel.as_posix())
    assert schedule.oldest() is None
