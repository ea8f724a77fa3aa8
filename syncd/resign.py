"""Signed URLs that never go stale: re-sign a recorded result's URL before it expires.

A URL is renewed once less than `resign_fraction` of its lifetime is left, for as long as the
result's metadata exists (also where a record stays under an earlier prefix, its tree deleted);
the metadata is rewritten atomically with only `signed_url` changed. Each result's metadata is
read once per URL lifetime, not at every scan. The daemon runs `renew_every` beside its
workers; a rewrite begun ends before syncd does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import PurePosixPath

from loguru import logger

from syncd import metadata
from syncd.config import DaemonSettings, Settings
from syncd.errors import SyncdError, classify
from syncd.journal import Journal
from syncd.layout import Layout, Result
from syncd.metrics import Metrics
from syncd.policy import expiry, resource
from syncd.signing import UrlSigner


class Resigner:
    def __init__(self, settings: Settings, signer: UrlSigner) -> None:
        self.settings = settings
        self.signer = signer  # replaced on a reload
        self.next_look: dict[str, float] = {}  # rel -> when its URL needs a look again
        # rel -> the remote_path it stays recorded at, for one recorded under an earlier prefix
        self.stays_at: dict[str, str] = {}

    @property
    def lifetime(self) -> int:
        return self.settings.object_storage.signed_url_expires_in

    @property
    def margin(self) -> float:
        """Seconds before expiry that a URL is renewed."""
        return self.settings.syncd.resign_fraction * self.lifetime

    def track(self, rel: str, remote_path: str | None = None) -> None:
        """A recorded result: its URL is looked at on the next pass, then when it needs to.
        `remote_path`: where its record stays, when not at the result's own (an earlier
        prefix's)."""
        if remote_path is None:
            self.stays_at.pop(rel, None)
        else:
            self.stays_at[rel] = remote_path
        self.next_look.setdefault(rel, 0.0)

    def due(self, now: float) -> list[str]:
        """The recorded results whose URLs need a look now."""
        return [rel for rel, when in self.next_look.items() if when <= now]

    def later(self, rel: str, now: float) -> None:
        """After a failed renewal: look again within the margin, not at every pass."""
        self.next_look[rel] = now + max(self.margin / 4, 1.0)

    def forget(self, rel: str) -> None:
        self.next_look.pop(rel, None)
        self.stays_at.pop(rel, None)

    def refresh(self, result: Result, now: float) -> metadata.Stamp | None:
        """Re-sign `result` if its URL is close to expiry; remember when to look again.
        Returns the metadata's new stamp when it was rewritten."""
        rel = result.rel.as_posix()
        remote_path = self.stays_at.get(rel, result.remote_path)
        document = metadata.read(result)
        if document is None or not metadata.records(document, remote_path):
            # Gone, or written again without the record: the daemon restores that one.
            self.forget(rel)
            return None
        url = document.get("signed_url")
        if isinstance(url, str) and resource(url) == self.signer.resource(remote_path):
            expires = expiry(url)
            if expires is not None and expires - now > self.margin:
                self.next_look[rel] = expires - self.margin
                return None
        # Close to expiry, or not a URL syncd signed for this result (written over): signed anew.
        document["signed_url"] = self.signer.sign(remote_path, self.lifetime, now=now)
        written = metadata.write_atomic(result, document)
        self.next_look[rel] = now + self.lifetime - self.margin
        logger.info(
            "{}: signed URL renewed until {}",
            result.name,
            time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now + self.lifetime)),
        )
        return written


async def renew_every(
    resigner: Resigner,
    config: DaemonSettings,
    layout: Layout,
    journal: Journal,
    metrics: Metrics,
) -> None:
    """Renew each recorded result's signed URL when it is due, for as long as syncd runs."""
    while True:
        # Often enough to renew a URL inside its margin, at most once a rescan.
        await asyncio.sleep(min(config.rescan_interval, max(resigner.margin / 2, 0.5)))
        now = time.time()
        for rel in resigner.due(now):
            result = layout.result(PurePosixPath(rel))
            renewal = asyncio.ensure_future(asyncio.to_thread(resigner.refresh, result, now))
            try:
                stamp = await asyncio.shield(renewal)
            except asyncio.CancelledError:  # stopping: a rewrite begun ends before syncd does
                await asyncio.wait([renewal])
                raise
            except Exception as exc:  # one bad metadata file never stops the others
                logger.warning("{}: cannot renew its signed URL: {}", result.name, classify(exc))
                resigner.later(rel, now)
                continue
            if stamp is not None:
                metrics.renewed.inc()
                with contextlib.suppress(SyncdError):  # a rescan sees it as changed then
                    await journal.restamp(rel, stamp)
