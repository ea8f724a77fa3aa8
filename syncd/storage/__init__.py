"""Object store clients behind one small async interface (`ObjectStore`), one adapter per
client: `obstore_client` (Rust, the default) and `s3fs_client`. Both take the same settings:
endpoint, region, credentials (or the standard AWS chain when none are set), transfer
acceleration (AWS only), `max_concurrency` and `multipart_chunksize`.

Every file is read once, by syncd, with its MD5 computed as it is read (`Body`), and every
request that carries its bytes carries a checksum the store can verify. Adapters translate
their client's exceptions with `errors.store_errors` and decide nothing else: what a failure
means is the taxonomy's.
"""

from __future__ import annotations

from loguru import logger

from syncd.config import ObjectStorage
from syncd.storage.base import Multiparts, ObjectStore
from syncd.storage.body import Body
from syncd.storage.obstore_client import ObstoreStore
from syncd.storage.s3fs_client import S3fsStore

__all__ = ["Body", "ObjectStore", "open_store"]


def open_store(storage: ObjectStorage, multiparts: Multiparts | None) -> ObjectStore:
    """`multiparts` journals unfinished multipart uploads so that they resume; None for a
    store that only probes the bucket."""
    if storage.use_transfer_acceleration and storage.endpoint_url is not None:
        logger.warning(
            "use_transfer_acceleration is ignored with endpoint_url {}: acceleration exists "
            "only on AWS S3 itself",
            storage.endpoint_url,
        )
    if not storage.use_rust_client:
        return S3fsStore(storage, multiparts)
    # obstore hides the ids of its multipart uploads: an s3fs client sends those (and cleans
    # up), built on first use: botocore's S3 model costs ~30 MB.
    return ObstoreStore(storage, multipart=S3fsStore(storage, multiparts))
