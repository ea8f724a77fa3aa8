"""One attempt at one result, as the daemon and `syncd sync` both make it: claim the result,
publish it, keep its state, log the upload, and after a failure say when to try again.

Retries back off exponentially from retry_min_delay to retry_max_delay, with jitter so that
many results failing together do not retry together; a failure only a person can fix
waits retry_permanent_delay.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from loguru import logger

from syncd import claims
from syncd.config import Settings
from syncd.layout import Result
from syncd.publish import Publisher, PublishError
from syncd.state import Record, State, StateStore


@dataclass(frozen=True)
class Outcome:
    done: bool  # recorded now or before
    held_by: str | None = None  # another daemon is publishing it
    error: PublishError | None = None
    attempts: int = 0  # failed attempts so far, this one included
    retry_in: float = 0.0  # seconds until the next attempt, after a failure


class Attempts:
    def __init__(self, settings: Settings, publisher: Publisher, state: StateStore) -> None:
        self.config = settings.syncd
        self.publisher = publisher
        self.state = state

    async def attempt(self, result: Result, force: bool = False) -> Outcome:
        rel = result.rel.as_posix()
        try:
            # Cheap check first, so results recorded long ago cost no claim.
            if not force and await self.publisher.is_recorded(result):
                return Outcome(done=True)
        except PublishError as exc:
            return self.failed(result, exc)
        claim = await asyncio.to_thread(claims.try_claim, result, self.config.claim_timeout)
        if isinstance(claim, str):
            return Outcome(done=False, held_by=claim)
        previous = self.state.get(rel)
        self.state.set(Record(rel, State.UPLOADING, attempts=previous.attempts if previous else 0))
        # Only an attempt that failed or was killed can have left multipart uploads behind.
        interrupted = claim.took_over or (previous is not None and previous.state != State.DONE)
        heartbeat = asyncio.create_task(self.keep(claim))
        try:
            published = await self.publisher.publish(
                result, force=force, still_ours=claim.still_ours, clean_up=interrupted
            )
        except PublishError as exc:
            return self.failed(result, exc)
        except Exception as exc:
            logger.exception("{}: unexpected error", result.name)
            return self.failed(result, PublishError(f"{result.name}: unexpected error: {exc!r}"))
        finally:
            heartbeat.cancel()
            await asyncio.to_thread(claim.release)
        if published is None:
            self.state.set(Record(rel, State.DONE))
            return Outcome(done=True)
        self.state.set(Record(rel, State.DONE, files=published.files, bytes=published.bytes))
        logger.info(
            "{}: uploaded {} files, {} bytes in {:.2f} s ({:.1f} MB/s) to {}; recorded in {}",
            result.name,
            published.files,
            published.bytes,
            published.seconds,
            published.mb_per_s,
            result.remote_path,
            result.metadata,
        )
        return Outcome(done=True)

    async def keep(self, claim: claims.Claim) -> None:
        while True:
            await asyncio.sleep(self.config.claim_timeout / 4)
            await asyncio.to_thread(claim.refresh)

    def failed(self, result: Result, error: PublishError) -> Outcome:
        rel = result.rel.as_posix()
        previous = self.state.get(rel)
        attempts = (previous.attempts if previous else 0) + 1
        if error.permanent:
            delay = self.config.retry_permanent_delay
        else:
            ceiling = min(
                self.config.retry_max_delay, self.config.retry_min_delay * 2 ** (attempts - 1)
            )
            delay = random.uniform(ceiling / 2, ceiling)
        self.state.set(
            Record(rel, State.RETRYING, attempts, str(error), error.permanent, time.time() + delay)
        )
        return Outcome(done=False, error=error, attempts=attempts, retry_in=delay)
