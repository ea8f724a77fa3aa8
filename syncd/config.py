"""Settings: one model, read from flags > environment > systemd credentials > YAML file >
defaults, validated once.

The `object_storage:` section and its environment variables are the seed contract
(`object-storage.md`), plus the names the Earth2Studio server itself reads, so its config file
and environment work as they are; the `syncd:` section holds the daemon's own settings, each
also read from `SYNCD_<NAME>`. Other sections of the file (the server's) are ignored. Every
problem becomes a `ConfigError` whose message is one line that names the setting or file and
says what to do.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import string
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from syncd.budget import MIN_BANDWIDTH
from syncd.errors import OperatorError
from syncd.marker import EXEC_PREFIX, MARKER_SUFFIX

MiB = 1024 * 1024
CONTROL = re.compile("[\x00-\x1f\x7f]")
# The longest prefix: S3 keys are at most 1,024 bytes, and the result's path and files follow.
MAX_PREFIX_BYTES = 512
DEFAULT_CONFIG_FILE = Path("/etc/syncd/config.yaml")
# The longest a signed URL may be valid, in seconds: ten years.
LONGEST_SIGNED_URL = 10 * 365 * 86400


class ConfigError(OperatorError):
    """A configuration problem, worded for the operator who has to fix it; found at start,
    before any result is touched (exit code 2)."""


class ObjectStorage(BaseModel):
    """The seed's `object_storage:` section: where results go and how URLs are signed. Two
    keys are the Earth2Studio server's own, so its config file works as it is: `storage_type`
    and `cloudfront_private_key` (the PEM text, where the seed names a file)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    enabled: bool = False
    storage_type: str = "s3"
    bucket: str | None = None
    region: str = "us-east-1"
    prefix: str = "outputs"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    endpoint_url: str | None = None
    use_transfer_acceleration: bool = True
    max_concurrency: int = Field(16, ge=1, le=1024)
    multipart_chunksize: int = 8 * MiB
    use_rust_client: bool = True
    cloudfront_domain: str | None = None
    cloudfront_key_pair_id: str | None = None
    cloudfront_private_key_path: Path | None = None
    cloudfront_private_key: SecretStr | None = None
    # At most ten years: renewed long before anyway, and a reader's URL should end some day.
    signed_url_expires_in: int = Field(3600, ge=1, le=LONGEST_SIGNED_URL)

    @field_validator(
        "max_concurrency", "multipart_chunksize", "signed_url_expires_in", mode="before"
    )
    @classmethod
    def _number(cls, value: object) -> object:
        return not_a_flag(value)

    @field_validator("cloudfront_key_pair_id")
    @classmethod
    def _key_pair_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9]+", value):
            raise ValueError(
                "must be the key's ID as CloudFront shows it (letters and digits, e.g. "
                "K2JCJMDEHXQW5F): it goes into every signed URL as it is"
            )
        return value

    @field_validator("storage_type")
    @classmethod
    def _s3_only(cls, value: str) -> str:
        if value.lower() != "s3":
            raise ValueError(
                "syncd uploads to S3 and S3-compatible stores only: set it to s3 or leave it "
                "unset (results for Azure Blob Storage stay with the server's own uploader)"
            )
        return "s3"

    @field_validator("prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        value = value.strip("/")
        if value and any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError(
                "must be names separated by single slashes, without '.' or '..' parts, "
                "e.g. outputs or team/results: keys made from it would not name one path"
            )
        if CONTROL.search(value):
            raise ValueError("must not hold control characters")
        if value != value.strip():
            raise ValueError("must not start or end with a blank: keys would too")
        if len(value.encode()) > MAX_PREFIX_BYTES:
            raise ValueError(
                f"must be at most {MAX_PREFIX_BYTES} bytes, to leave room under S3's 1,024 for "
                "the result's path and its files"
            )
        return value

    @field_validator("multipart_chunksize")
    @classmethod
    def _part_size(cls, value: int) -> int:
        if not 5 * MiB <= value <= 5 * 1024 * MiB:
            raise ValueError(
                "must be between 5242880 (5 MiB, the smallest part S3 accepts) and 5368709120 "
                "(5 GiB, the largest)"
            )
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.rstrip("/")
        parts = http_url(value, "http://minio.internal:9000")
        if "@" in parts.path:
            raise ValueError("must be an http:// or https:// URL with no @ after its host")
        if parts.path:
            raise ValueError(
                "must be the store's URL alone, e.g. http://minio.internal:9000 (no path: the "
                "bucket and keys follow the host)"
            )
        return value

    @field_validator("cloudfront_domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.rstrip("/")
        parts = http_url(value, "https://d111111abcdef8.cloudfront.net")
        if (
            parts.path
            or parts.username is not None
            or not re.fullmatch(r"[\w.-]+", parts.hostname or "")
        ):
            raise ValueError(
                "must be the distribution's domain alone, e.g. "
                "https://d111111abcdef8.cloudfront.net (no path, user or wildcard: the signed "
                "Resource is <domain>/<remote_path>/*)"
            )
        return value

    @field_validator("cloudfront_domain", mode="before")
    @classmethod
    def _default_https(cls, value: object) -> object:
        # The seed shows the domain with its scheme; a bare host name means https.
        if isinstance(value, str) and value and "://" not in value:
            return f"https://{value}"
        return value

    @model_validator(mode="after")
    def _complete(self) -> ObjectStorage:
        if self.enabled and not self.bucket:
            raise ValueError(
                "bucket is required when object storage is enabled: "
                "set object_storage.bucket or OBJECT_STORAGE_BUCKET"
            )
        if (self.access_key_id is None) != (self.secret_access_key is None):
            alone, absent = (
                ("access_key_id", "secret_access_key")
                if self.secret_access_key is None
                else ("secret_access_key", "access_key_id")
            )
            raise ValueError(
                f"{alone} is set but {absent} is not: set both (or, for the standard AWS "
                "chain such as an instance role, neither)"
            )
        if self.accelerated and self.bucket and "." in self.bucket:
            raise ValueError(
                f"bucket {self.bucket!r} has dots in its name, and S3 Transfer Acceleration "
                "(use_transfer_acceleration, on by default) does not serve such buckets: set "
                "object_storage.use_transfer_acceleration: false "
                "(OBJECT_STORAGE_TRANSFER_ACCELERATION=false)"
            )
        cloudfront = {
            "cloudfront_domain": self.cloudfront_domain,
            "cloudfront_key_pair_id": self.cloudfront_key_pair_id,
            "cloudfront_private_key_path (or the PEM text in cloudfront_private_key, or the "
            "credential cloudfront_private_key in $CREDENTIALS_DIRECTORY as the unit passes "
            "it)": (self.cloudfront_private_key_path or self.cloudfront_private_key),
        }
        missing = [name for name, value in cloudfront.items() if not value]
        if 0 < len(missing) < len(cloudfront):
            raise ValueError(
                f"CloudFront is half configured: {', '.join(missing)} missing; set all three "
                "cloudfront_* settings to sign URLs, or none to upload without signed URLs"
            )
        return self

    @property
    def signs_urls(self) -> bool:
        return self.cloudfront_domain is not None

    @property
    def accelerated(self) -> bool:
        """Transfer acceleration only exists on AWS itself, never on a custom endpoint."""
        return self.use_transfer_acceleration and self.endpoint_url is None


def not_a_flag(value: object) -> object:
    """A number setting given `true` or `false` is an error, not 1 or 0."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


# A rate as operators write it: bytes, or K, M, G (1024-based, as rclone's --bwlimit and the
# aws cli's max_bandwidth: 40M, 40MiB and 40MB/s are all 41943040 bytes a second). A lower-case
# b is bits (40Mb/s): refused, not taken for bytes.
RATE = re.compile(r"(\d{1,15}(?:\.\d{1,6})?) *(?:([KkMmGg])(?:i?B)?)?(?:/s)?")
RATE_UNITS = {None: 1, "K": 1024, "M": 1024**2, "G": 1024**3}
# The largest cap: above it a cap is no cap (and numbers stay within a float's reach).
MAX_BANDWIDTH = 1024**4


def bytes_per_second(value: object) -> object:
    """`40M`, `40MiB`, `1.5G/s` or `41943040` as bytes a second."""
    if isinstance(value, str):
        match = RATE.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                "must be bytes per second: a number, or one with K, M or G (1024-based), "
                "e.g. 41943040, 40M or 40MiB (not bits: 40Mbit/s is 5M)"
            )
        unit = match[2].upper() if match[2] else None
        return int(float(match[1]) * RATE_UNITS[unit])
    return not_a_flag(value)


def rate_text(rate: int) -> str:
    """A cap as operators write it: `40 MiB/s`, `1.5 GiB/s`, `512 KiB/s`."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if rate >= size:
            return f"{round(rate / size, 2):g} {unit}/s"
    return f"{rate} B/s"


def http_url(value: str, example: str) -> SplitResult:
    """`value` split, if it is an http:// or https:// URL of a host (and a port) with no query,
    fragment, blank or control character; ValueError with `example` otherwise."""
    problem = f"must be an http:// or https:// URL of a host, e.g. {example}"
    if re.search(r"[\s\x00-\x1f\x7f]", value):
        raise ValueError(f"{problem}, without blanks or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (a port that is no number raises ValueError here)
    except ValueError:
        raise ValueError(problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(problem)
    return parts


def redact_url(value: object) -> object:
    """A URL setting as an error may show it: its user and password cut out."""
    if isinstance(value, str) and "@" in value:
        return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://).*@", r"\1<redacted>@", value, flags=re.S)
    return value


def without_userinfo(url: str | None) -> str | None:
    """A valid endpoint_url without its user and password, for a client that refuses them
    (S3 requests are signed with the keys; the URL's credentials mean nothing to S3)."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/]*@", r"\1", url) if url else url


METADATA_FIELDS = {"exec", "exec_path", "workflow"}
# The folder of claims, a name on the disk the settings must leave alone (as result folders).
CLAIMS_FOLDER = ".syncd-claims"


def metadata_samples(template: str) -> list[tuple[str, str]]:
    """(result, metadata path) as `template` names them for a top-level result (its {workflow}
    empty) and for a result of a workflow: together they show every shape it can take."""
    samples = []
    for workflow in ("", "wf"):
        tree = f"{workflow}/exec_x".lstrip("/")
        samples.append((tree, template.format(exec="exec_x", exec_path=tree, workflow=workflow)))
    return samples


def in_a_tree(folder: tuple[str, ...]) -> bool:
    """Whether a folder (its names under outputs_dir) lies inside some result's tree."""
    if folder and folder[0].startswith(EXEC_PREFIX):
        return True
    return len(folder) > 1 and not folder[0].startswith(".") and folder[1].startswith(EXEC_PREFIX)


def placeholders(template: str) -> set[str]:
    """The `{names}` in a template; ValueError if it is not one, or formats or converts one
    (`{exec:>10}`, `{exec!r}`): a name is put in as it is."""
    names = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if spec or conversion:
            raise ValueError(f"{{{name}}} takes no format or conversion")
        names.add(name)
    return names


def listen_address(text: str) -> tuple[str, int]:
    """`host:port` (`[::1]:9464` for IPv6) as (host, port); ValueError if it is not one."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port, e.g. 127.0.0.1:9464 (or [::1]:9464)")
    return host, int(port)


def default_state_dir(environ: os._Environ[str] | dict[str, str]) -> Path:
    """systemd's StateDirectory= when run as a unit, else /var/lib/syncd."""
    return Path(environ.get("STATE_DIRECTORY", "/var/lib/syncd").split(":")[0])


class DaemonSettings(BaseModel):
    """The `syncd:` section: where results appear and how the daemon works through them."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    outputs_dir: Path = Path("/outputs")
    marker_suffix: str = Field(MARKER_SUFFIX, min_length=1)
    # Relative to outputs_dir. {exec_path} is the result's path under outputs_dir
    # (exec_X or <workflow>/exec_X), {exec} its folder name, {workflow} its workflow folder
    # ("" at the top level). Earth2Studio's own layout is "metadata_{workflow}:{exec}.json".
    metadata_file: str = "{exec_path}.json"
    parallel_results: int = Field(2, ge=1, le=256)
    # Bytes of file data the uploads in flight hold in memory, every result together (a file
    # that needs more goes alone). The process needs about 100 MB besides.
    upload_buffer: int = Field(64 * MiB, ge=5 * MiB)
    rescan_interval: float = Field(60.0, ge=0.1)
    # inotify sees nothing another host does on NFS/CIFS: "poll" compares listings instead.
    watch: Literal["inotify", "poll"] = "inotify"
    poll_interval: float = Field(5.0, ge=0.1)
    # Where each result's state (attempts, last error, next try) survives restarts.
    state_dir: Path = Field(default_factory=lambda: default_state_dir(os.environ))
    # After the first SIGTERM, in-flight uploads get this long to finish; keep it below the
    # unit's TimeoutStopSec.
    stop_grace: float = Field(30.0, ge=0)
    retry_min_delay: float = Field(1.0, gt=0)
    retry_max_delay: float = Field(300.0, gt=0)
    # Failures a retry cannot fix by itself (access denied, no such bucket, bad input) are
    # logged once and retried this often, in case someone fixed them.
    retry_permanent_delay: float = Field(900.0, gt=0)
    # Several daemons may share outputs_dir: a claim not refreshed for this long is a dead
    # daemon's and is taken over.
    claim_timeout: float = Field(120.0, ge=10)
    # A recorded result's signed URL is renewed once less than this part of its lifetime is left.
    resign_fraction: float = Field(0.2, gt=0, lt=1)
    # Once the bucket lists every file with its size, remove the local tree (the metadata
    # stays, pointing to S3).
    delete_local_after_upload: bool = False
    # What says a result is finished: its marker file (`marker`), or its metadata file holding
    # `"status": "completed"` (`metadata`: what the Earth2Studio server writes last).
    completion: Literal["marker", "metadata"] = "marker"
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Prometheus metrics over HTTP at host:port (e.g. 127.0.0.1:9464), and/or written to a
    # file for node_exporter's textfile collector (a *.prom file in its folder). Off if unset.
    metrics_address: str | None = None
    metrics_file: Path | None = None
    # Bytes a second every upload together may send (storage/relay.py); unset: no cap.
    max_bandwidth: int | None = None

    @field_validator("parallel_results", "upload_buffer", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        return not_a_flag(value)

    @field_validator("max_bandwidth", mode="before")
    @classmethod
    def _rate(cls, value: object) -> object:
        return bytes_per_second(value)

    @field_validator("max_bandwidth")
    @classmethod
    def _feeds_a_file(cls, value: int | None) -> int | None:
        if value is not None and not MIN_BANDWIDTH <= value <= MAX_BANDWIDTH:
            raise ValueError(
                f"must be at least {MIN_BANDWIDTH} ({MIN_BANDWIDTH // 1024}K: the parts of one "
                f"file at the slowest rate a request may go) and at most {MAX_BANDWIDTH} (1024G), "
                "or unset for no cap"
            )
        return value

    @field_validator("outputs_dir", "state_dir", "metrics_file")
    @classmethod
    def _plain_path(cls, value: Path | None) -> Path | None:
        if value is not None and CONTROL.search(str(value)):
            raise ValueError("must not hold control characters")
        return value

    @field_validator("metrics_address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            listen_address(value)
        return value

    @field_validator("metrics_file")
    @classmethod
    def _prom_file(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix != ".prom":
            raise ValueError(
                "must be a *.prom file (node_exporter's textfile collector reads only those), "
                "e.g. /var/lib/node_exporter/textfile/syncd.prom"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("marker_suffix")
    @classmethod
    def _plain_suffix(cls, value: str) -> str:
        if "/" in value or CONTROL.search(value):
            raise ValueError(
                "must be a file name suffix such as .done, without '/' or control characters"
            )
        return value

    @field_validator("metadata_file")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            fields = placeholders(value)
        except ValueError as exc:
            raise ValueError(f"is not a valid template ({exc})") from None
        unknown = fields - METADATA_FIELDS
        if unknown:
            raise ValueError(
                f"unknown placeholder {{{sorted(unknown)[0]}}}; use {{exec}}, {{exec_path}} "
                "or {workflow}"
            )
        if not fields & {"exec", "exec_path"}:
            raise ValueError("must contain {exec} or {exec_path} so each result has its own file")
        if CONTROL.search(value):
            raise ValueError("must not hold control characters")
        for tree, path in metadata_samples(value):
            if path.startswith("/") or ".." in path.split("/"):
                where = tree if "/" in tree else f"{tree} (at the top level: {{workflow}} empty)"
                raise ValueError(
                    f"for a result {where} it names {path}, which is not inside outputs_dir (it "
                    "starts with / or holds ..), and syncd writes nothing outside outputs_dir: "
                    "use e.g. {exec_path}.json or metadata_{workflow}:{exec}.json"
                )
            folder = PurePosixPath(path).parent.parts
            if CLAIMS_FOLDER in folder:
                raise ValueError(
                    f"puts the metadata into {CLAIMS_FOLDER}, where syncd keeps claims"
                )
            if PurePosixPath(path) == PurePosixPath(tree) or in_a_tree(folder):
                raise ValueError(
                    "puts the metadata inside the result tree, where it would be uploaded as "
                    "part of the result: put it beside the tree, e.g. {exec_path}.json"
                )
        return value

    @model_validator(mode="after")
    def _one_file_per_result(self) -> DaemonSettings:
        fields = placeholders(self.metadata_file)
        if "exec_path" not in fields and "workflow" not in fields:
            if self.completion == "metadata":
                raise ValueError(
                    f"completion: metadata finds each result's folder from its metadata file "
                    f"name, but metadata_file {self.metadata_file!r} does not say the workflow: "
                    "use {exec_path}, or {workflow} and {exec}, e.g. "
                    "metadata_{workflow}:{exec}.json"
                )
            raise ValueError(
                f"metadata_file {self.metadata_file!r} does not say the workflow, so results of "
                "two workflows with the same exec folder (wfa/exec_1 and wfb/exec_1) would share "
                "one metadata file: use {exec_path}, or {workflow} and {exec}, e.g. "
                "{exec_path}.json"
            )
        if self.completion == "marker":
            for tree, path in metadata_samples(self.metadata_file):
                if PurePosixPath(path) == PurePosixPath(f"{tree}{self.marker_suffix}"):
                    raise ValueError(
                        f"metadata_file {self.metadata_file!r} and marker_suffix "
                        f"{self.marker_suffix!r} name one file ({path}): the marker and the "
                        "metadata need names of their own; change one of them"
                    )
        if self.retry_min_delay > self.retry_max_delay:
            raise ValueError(
                f"retry_min_delay ({self.retry_min_delay:g} s) is above retry_max_delay "
                f"({self.retry_max_delay:g} s): the first retry cannot come after the longest "
                "wait; raise retry_max_delay or lower retry_min_delay"
            )
        return self


class Settings(BaseSettings):
    """Everything syncd reads; built by `load_settings` and passed down, never re-read."""

    model_config = SettingsConfigDict(extra="forbid")

    object_storage: ObjectStorage = Field(default_factory=ObjectStorage)
    syncd: DaemonSettings = Field(default_factory=DaemonSettings)
    _notices: list[str] = PrivateAttr(default_factory=list)

    @property
    def notices(self) -> list[str]:
        """What the operator should hear about the settings once logging is set up: which of
        two differing names won, sections of a shared config file that are not syncd's."""
        return self._notices


# The seed's environment table, then the standard AWS names and the Earth2Studio server's
# own names (lower priority: later wins less).
ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "enabled": ("OBJECT_STORAGE_ENABLED",),
    "storage_type": ("OBJECT_STORAGE_TYPE",),
    "bucket": ("OBJECT_STORAGE_BUCKET",),
    "region": ("OBJECT_STORAGE_REGION",),
    "prefix": ("OBJECT_STORAGE_PREFIX",),
    "access_key_id": ("OBJECT_STORAGE_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
    "secret_access_key": ("OBJECT_STORAGE_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    "session_token": ("OBJECT_STORAGE_SESSION_TOKEN", "AWS_SESSION_TOKEN"),
    "endpoint_url": ("OBJECT_STORAGE_ENDPOINT_URL",),
    "use_transfer_acceleration": ("OBJECT_STORAGE_TRANSFER_ACCELERATION",),
    "max_concurrency": ("OBJECT_STORAGE_MAX_CONCURRENCY",),
    "multipart_chunksize": ("OBJECT_STORAGE_MULTIPART_CHUNKSIZE",),
    "use_rust_client": ("OBJECT_STORAGE_USE_RUST_CLIENT",),
    "cloudfront_domain": ("CLOUDFRONT_DOMAIN",),
    "cloudfront_key_pair_id": ("CLOUDFRONT_KEY_PAIR_ID",),
    "cloudfront_private_key_path": ("CLOUDFRONT_PRIVATE_KEY_PATH",),
    "cloudfront_private_key": ("CLOUDFRONT_PRIVATE_KEY",),
    "signed_url_expires_in": ("OBJECT_STORAGE_SIGNED_URL_EXPIRES_IN", "SIGNED_URL_EXPIRES_IN"),
}
SECTIONS: dict[str, type[BaseModel]] = {"object_storage": ObjectStorage, "syncd": DaemonSettings}
SECRETS = ("secret_access_key", "session_token", "cloudfront_private_key")
URLS = ("endpoint_url", "cloudfront_domain")  # may hold a user and password


def env_name(section: str, key: str) -> str:
    """The environment variable an operator sets for `section.key`."""
    if section == "object_storage":
        return ENVIRONMENT[key][0]
    return f"SYNCD_{key.upper()}"


class Environment(PydanticBaseSettingsSource):
    """Reads the seed's variables and `SYNCD_<NAME>`; an empty variable counts as unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: dict[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ
        self.notices: list[str] = []

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # values come from __call__, section by section

    def __call__(self) -> dict[str, Any]:
        storage = {}
        for key, names in ENVIRONMENT.items():
            given = [n for n in names if self.environ.get(n)]
            if not given:
                continue
            storage[key] = self.environ[given[0]]
            differ = [n for n in given[1:] if self.environ[n] != storage[key]]
            if differ:  # names only: the values may be secrets
                self.notices.append(
                    f"${given[0]} and ${differ[0]} are both set and differ; using ${given[0]} "
                    f"for object_storage.{key}"
                )
        daemon = {
            key: self.environ[env_name("syncd", key)]
            for key in DaemonSettings.model_fields
            if self.environ.get(env_name("syncd", key))
        }
        self.notices.extend(unknown_variables(self.environ))
        self.notices.extend(empty_variables(self.environ))
        return {"object_storage": storage, "syncd": daemon}


# Variables in syncd's own namespaces that are no setting: the config file's.
OTHER_VARIABLES = ("SYNCD_CONFIG",)


def unknown_variables(environ: dict[str, str]) -> list[str]:
    """Notices for variables in syncd's namespaces that no setting reads: a misspelt one would
    otherwise be ignored without a word (in the YAML file the same typo is an error)."""
    known = {name for names in ENVIRONMENT.values() for name in names}
    known |= {env_name("syncd", key) for key in DaemonSettings.model_fields}
    known |= set(OTHER_VARIABLES)
    notices = []
    for name in sorted(environ):
        if name.startswith(("OBJECT_STORAGE_", "CLOUDFRONT_", "SYNCD_")) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
            hint = f"; did you mean ${close[0]}?" if close else ""
            notices.append(f"${name} is not a setting syncd reads and is ignored{hint}")
    return notices


def empty_variables(environ: dict[str, str]) -> list[str]:
    """Notices for settings' variables set to nothing: they count as unset (a `NAME=` line in
    an environment file), which an operator who meant an empty value must be told."""
    settings = {
        name: f"object_storage.{key}" for key, names in ENVIRONMENT.items() for name in names
    }
    settings |= {env_name("syncd", key): f"syncd.{key}" for key in DaemonSettings.model_fields}
    return [
        f"${name} is empty, which counts as unset: {settings[name]} comes from the config file "
        "or its default"
        for name in sorted(environ)
        if name in settings and environ[name] == ""
    ]


class Credentials(PydanticBaseSettingsSource):
    """systemd credentials (LoadCredential=) in $CREDENTIALS_DIRECTORY: files named
    access_key_id, secret_access_key and session_token hold those settings, and
    cloudfront_private_key is the CloudFront key file. The unit reads them as root; by hand,
    the install lets the syncd user read them."""

    VALUES = ("access_key_id", "secret_access_key", "session_token")
    KEY_FILE = "cloudfront_private_key"

    def __init__(self, settings_cls: type[BaseSettings], environ: dict[str, str]) -> None:
        super().__init__(settings_cls)
        directory = environ.get("CREDENTIALS_DIRECTORY")
        self.directory = Path(directory) if directory else None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.directory is None:
            return {}
        storage: dict[str, Any] = {}
        remedy = "let this user read it (the unit's LoadCredential= does), or unset it"
        for name in self.VALUES:
            path = self.directory / name
            if self.present(path):
                raw = read_file(path, "credential", remedy)
                try:
                    storage[name] = raw.decode().strip()
                except UnicodeDecodeError:
                    raise ConfigError(f"credential {path} is not UTF-8 text: {remedy}") from None
        if self.present(self.directory / self.KEY_FILE):
            storage["cloudfront_private_key_path"] = str(self.directory / self.KEY_FILE)
        return {"object_storage": storage} if storage else {}

    def present(self, path: Path) -> bool:
        """Whether the credential `path` is there; a folder this user may not look into is
        said in one line (the install's own check runs as the unit's user)."""
        try:
            return path.is_file()
        except PermissionError:
            raise ConfigError(
                f"$CREDENTIALS_DIRECTORY {self.directory} cannot be read by this user: run as "
                "the unit's user with its credentials, or let this user read the folder"
            ) from None


def config_file_from(flag: Path | None, environ: dict[str, str]) -> Path | None:
    """`--config`, else `$SYNCD_CONFIG`, else /etc/syncd/config.yaml if it exists."""
    if flag is not None:
        return flag
    if environ.get("SYNCD_CONFIG"):
        return Path(environ["SYNCD_CONFIG"])
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None


def read_file(path: Path, what: str, remedy: str) -> bytes:
    """The bytes of a file an operator named, or a ConfigError that names it. A FIFO or a
    device is refused, not waited on: syncd must never hang at start or on a reload."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"{what} {path} is not a regular file: {remedy}")
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist: {remedy}") from None
    except PermissionError:
        raise ConfigError(
            f"{what} {path} is not readable by this user: fix its permissions"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice in one mapping is an error: the first
    value would be dropped without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a name, not a list or a mapping", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    raw = read_file(path, "config file", "fix --config or SYNCD_CONFIG")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        document = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader
    except RecursionError:
        raise ConfigError(f"config file {path} nests deeper than a YAML reader follows") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(
            f"config file {path} must be a mapping with object_storage: and syncd: sections"
        )
    for section, body in document.items():
        if section in Settings.model_fields and body is not None and not isinstance(body, dict):
            raise ConfigError(f"config file {path}: section {section}: must be a mapping of keys")
    return {k: (v if v is not None else {}) for k, v in document.items()}


def foreign_sections(path: Path, document: dict[str, Any]) -> list[str]:
    """Notices for the sections of a config file that are not syncd's (the Earth2Studio
    server's `redis:`, `paths:`, ... are left to it): only a likely misspelling is named."""
    notices = []
    for section in document:
        if section in Settings.model_fields:
            continue
        close = difflib.get_close_matches(str(section), list(Settings.model_fields), n=1)
        if close:
            notices.append(
                f"config file {path}: section {section}: is not syncd's and is ignored; "
                f"did you mean {close[0]}:?"
            )
    return notices


def load_settings(
    config_file: Path | None = None,
    flags: dict[str, dict[str, Any]] | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[Settings, Path | None]:
    """Build the settings once; return them with the config file that was read, if any."""
    environ = dict(os.environ if environ is None else environ)
    flags = flags or {}
    path = config_file_from(config_file, environ)
    document = read_yaml(path) if path is not None else {}
    notices = foreign_sections(path, document) if path is not None else []
    ours = {k: v for k, v in document.items() if k in Settings.model_fields}
    environment = Environment(Settings, environ)
    sources = (
        InitSettingsSource(Settings, flags),
        environment,
        Credentials(Settings, environ),
        InitSettingsSource(Settings, ours),
    )
    try:
        settings = Settings(_build_sources=(sources, {}))
    except ValidationError as exc:
        origin = Origin(path, flags, environ)
        raise ConfigError(
            "; ".join(origin.describe(error) for error in exc.errors(include_url=False))
        ) from None
    settings.notices.extend(environment.notices + notices)
    return settings, path


def log_format_asked(
    config_file: Path | None, flags: dict[str, dict[str, Any]], environ: dict[str, str]
) -> str:
    """The log format asked for, read alone when the settings as a whole cannot be, so that
    the error saying why is said in it: the first valid value in the settings' own order
    (flag, environment, config file), else text."""
    try:
        path = config_file_from(config_file, environ)
        document = read_yaml(path) if path is not None else {}
    except ConfigError:
        document = {}
    given = (
        flags.get("syncd", {}).get("log_format"),
        environ.get(env_name("syncd", "log_format")),
        document.get("syncd", {}).get("log_format"),
    )
    return next((value for value in given if value in ("text", "json")), "text")


class Origin:
    """Says where a bad value came from, so the message points at what to edit."""

    def __init__(
        self, path: Path | None, flags: dict[str, dict[str, Any]], environ: dict[str, str]
    ) -> None:
        self.path, self.flags, self.environ = path, flags, environ

    def describe(self, error: Any) -> str:
        loc = [str(part) for part in error["loc"]]
        message = str(error["msg"]).removeprefix("Value error, ")
        if len(loc) < 2:
            section = loc[0] if loc else "config"
            return f"invalid {section} settings ({self.where(section)}): {message}"
        section, key = loc[0], loc[1]
        if error["type"] == "extra_forbidden":
            known = ", ".join(SECTIONS[section].model_fields)
            return f"{self.where()}: unknown key {section}.{key} (known keys: {known})"
        value = error.get("input")
        if key in SECRETS:
            value = "<redacted>"
        elif key in URLS:
            value = redact_url(value)
        return (
            f"invalid setting {section}.{key} ({self.source(section, key)}) = {value!r}: {message}"
        )

    def where(self, section: str | None = None) -> str:
        """Where the settings (of `section`: flags and environment too) came from."""
        places = [f"config file {self.path}"] if self.path else []
        if section in SECTIONS:
            for key in SECTIONS[section].model_fields:
                source = self.source(section, key)
                if source.startswith(("--", "from $")):
                    places.append(source.removeprefix("from "))
        return ", ".join(places) or "configuration"

    def source(self, section: str, key: str) -> str:
        if key in self.flags.get(section, {}):
            return f"--{key.replace('_', '-')}"
        names = (
            ENVIRONMENT.get(key, ()) if section == "object_storage" else (env_name(section, key),)
        )
        for name in names:
            if self.environ.get(name):
                return f"from ${name}"
        if self.path is not None:
            return f"in {self.path}"
        return "default"


# What a reload (SIGHUP, `systemctl reload syncd`) changes in the running daemon; every other
# setting keeps its value until a restart. CloudFront's settings change live while URLs are
# signed before and after (a key rotated); turning signing on or off takes a restart. So does
# turning the bandwidth cap on or off (the clients reach the store through its relay or not);
# its value changes live.
LIVE = {
    "syncd": {
        "log_level",
        "log_format",
        "rescan_interval",
        "stop_grace",
        "retry_min_delay",
        "retry_max_delay",
        "retry_permanent_delay",
        "claim_timeout",
        "resign_fraction",
        "delete_local_after_upload",
        "max_bandwidth",
    },
    "object_storage": {
        "signed_url_expires_in",
        "cloudfront_domain",
        "cloudfront_key_pair_id",
        "cloudfront_private_key_path",
        "cloudfront_private_key",
    },
}


def changes(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """The settings that differ, as `section.key`: those a reload changes live, and those that
    take a restart."""
    live: list[str] = []
    fixed: list[str] = []
    signing = old.object_storage.signs_urls == new.object_storage.signs_urls
    capped = (old.syncd.max_bandwidth is None) == (new.syncd.max_bandwidth is None)
    for section in SECTIONS:
        before, after = getattr(old, section), getattr(new, section)
        for key in type(before).model_fields:
            if getattr(before, key) == getattr(after, key):
                continue
            applies = (
                key in LIVE[section]
                and (signing or not key.startswith("cloudfront"))
                and (capped or key != "max_bandwidth")
            )
            (live if applies else fixed).append(f"{section}.{key}")
    return live, fixed


def apply(running: Settings, new: Settings, names: list[str]) -> None:
    """Give the running settings (which every part of the daemon reads) these new values."""
    for name in names:
        section, key = name.split(".")
        setattr(getattr(running, section), key, getattr(getattr(new, section), key))


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, secrets replaced, for `syncd check`."""
    data = settings.model_dump(mode="json")
    for key in SECRETS:
        if data["object_storage"][key] is not None:
            data["object_storage"][key] = "<redacted>"
    for key in URLS:
        data["object_storage"][key] = redact_url(data["object_storage"][key])
    return data
