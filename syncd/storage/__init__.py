"""Object store clients behind one small async interface (`ObjectStore`), one adapter per
client: `obstore_client` (Rust, the default) and `s3fs_client`. Both take the same settings:
endpoint, region, credentials (or the standard AWS chain when none are set), transfer
acceleration (AWS only), `max_concurrency` and `multipart_chunksize`.

Every file is read once, by syncd, with its MD5 computed as it is read (`Body`), and every
request that carries its bytes carries a checksum the store can verify. Adapters find the S3
error in their client's exceptions by type (`failures`) and decide nothing else: what a failure
means is the taxonomy's (`errors.store_error`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from loguru import logger

from syncd.config import ObjectStorage, Settings
from syncd.storage.base import Multiparts, ObjectStore
from syncd.storage.body import Body
from syncd.storage.obstore_client import ObstoreStore
from syncd.storage.relay import Relay, RelayedStore
from syncd.storage.s3fs_client import S3fsStore

__all__ = ["Body", "ObjectStore", "connected_store", "open_store"]


@asynccontextmanager
async def connected_store(settings: Settings, multiparts: Multiparts) -> AsyncIterator[ObjectStore]:
    """The store uploads go to, through the bandwidth relay while syncd.max_bandwidth is set;
    closed (and the relay with it) on the way out."""
    relay = Relay(settings.object_storage, settings.syncd) if settings.syncd.max_bandwidth else None
    if relay is not None:
        await relay.start()
    store = open_store(settings.object_storage, multiparts, relay.url if relay else None)
    if relay is not None:
        store = RelayedStore(store, relay)
    try:
        await store.connect()
        yield store
    finally:
        await store.close()
        if relay is not None:
            await relay.close()


def open_store(
    storage: ObjectStorage, multiparts: Multiparts | None, proxy: str | None = None
) -> ObjectStore:
    """`multiparts` journals unfinished multipart uploads so that they resume; None for a
    store that only probes the bucket. `proxy`: the bandwidth relay's URL, if any."""
    if storage.use_transfer_acceleration and storage.endpoint_url is not None:
        logger.warning(
            "use_transfer_acceleration is ignored with endpoint_url {}: acceleration exists "
            "only on AWS S3 itself",
            storage.endpoint_url,
        )
    if not storage.use_rust_client:
        return S3fsStore(storage, multiparts, proxy)
    # obstore hides the ids of its multipart uploads: an s3fs client sends those (and cleans
    # up), built on first use: botocore's S3 model costs ~30 MB.
    return ObstoreStore(storage, S3fsStore(storage, multiparts, proxy), proxy)
