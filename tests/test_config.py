"""Settings: the seed's keys, defaults and environment variables; precedence; clear errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from syncd.config import ConfigError, load_settings
from tests.conftest import SYNCD, clean_env
from tests.servers import free_port

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "object-storage.md"

# The seed's table: key, environment variable, default, a non-default value.
SEED_TABLE = [
    ("enabled", "OBJECT_STORAGE_ENABLED", False, "true", True),
    ("bucket", "OBJECT_STORAGE_BUCKET", None, "my-bucket", "my-bucket"),
    ("region", "OBJECT_STORAGE_REGION", "us-east-1", "eu-west-1", "eu-west-1"),
    ("prefix", "OBJECT_STORAGE_PREFIX", "outputs", "results", "results"),
    ("access_key_id", "OBJECT_STORAGE_ACCESS_KEY_ID", None, "AKIAEXAMPLE", "AKIAEXAMPLE"),
    ("secret_access_key", "OBJECT_STORAGE_SECRET_ACCESS_KEY", None, "s3cr3t", "s3cr3t"),
    ("session_token", "OBJECT_STORAGE_SESSION_TOKEN", None, "tok3n", "tok3n"),
    (
        "endpoint_url",
        "OBJECT_STORAGE_ENDPOINT_URL",
        None,
        "http://localhost:9000",
        "http://localhost:9000",
    ),
    ("use_transfer_acceleration", "OBJECT_STORAGE_TRANSFER_ACCELERATION", True, "false", False),
    ("max_concurrency", "OBJECT_STORAGE_MAX_CONCURRENCY", 16, "32", 32),
    ("multipart_chunksize", "OBJECT_STORAGE_MULTIPART_CHUNKSIZE", 8388608, "16777216", 16777216),
    ("use_rust_client", "OBJECT_STORAGE_USE_RUST_CLIENT", True, "false", False),
    (
        "cloudfront_domain",
        "CLOUDFRONT_DOMAIN",
        None,
        "https://d1.cloudfront.net",
        "https://d1.cloudfront.net",
    ),
    ("cloudfront_key_pair_id", "CLOUDFRONT_KEY_PAIR_ID", None, "KUCQGLNFR6UH1", "KUCQGLNFR6UH1"),
    ("cloudfront_private_key_path", "CLOUDFRONT_PRIVATE_KEY_PATH", None, "/k.pem", Path("/k.pem")),
    ("signed_url_expires_in", "OBJECT_STORAGE_SIGNED_URL_EXPIRES_IN", 3600, "60", 60),
]


# Settings that must come together, so each key of the table can be set on its own.
BASE = {
    "bucket": "b",
    "cloudfront_domain": "https://base.cloudfront.net",
    "cloudfront_key_pair_id": "KBASE",
    "cloudfront_private_key_path": "/base.pem",
}
BASE_ENV = {
    "OBJECT_STORAGE_BUCKET": "b",
    "CLOUDFRONT_DOMAIN": "https://base.cloudfront.net",
    "CLOUDFRONT_KEY_PAIR_ID": "KBASE",
    "CLOUDFRONT_PRIVATE_KEY_PATH": "/base.pem",
}


def plain(value):
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def write(tmp_path: Path, document) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


def check(config: Path | None, **env: str) -> subprocess.CompletedProcess:
    args = [*SYNCD, "check"] + (["--config", str(config)] if config else [])
    return subprocess.run(args, env=clean_env(**env), capture_output=True, text=True, timeout=60)


def test_the_table_matches_the_seed_document():
    rows = [line for line in SEED.read_text().splitlines() if line.startswith("| `")]
    documented = {
        cells[0].strip("` "): (cells[1].strip("` "), cells[2].strip("` "))
        for cells in (row.strip("|").split("|") for row in rows)
        if cells[1].strip().startswith("`")
    }
    ours = {key: (env, default) for key, env, default, _, _ in SEED_TABLE}
    assert {k: v[0] for k, v in documented.items()} == {k: v[0] for k, v in ours.items()}
    assert {k: v[1] for k, v in documented.items()} == {
        k: "null" if v[1] is None else str(v[1]).lower() for k, v in ours.items()
    }


def test_defaults_are_the_seeds():
    settings, path = load_settings(environ={})
    storage = settings.object_storage.model_dump()
    assert path is None or path == Path("/etc/syncd/config.yaml")
    assert {key: storage[key] for key, *_ in SEED_TABLE} == {
        key: default for key, _, default, _, _ in SEED_TABLE
    }
    assert settings.syncd.outputs_dir == Path("/outputs")


# A key of the pair comes with the other: one alone is an error of its own.
PARTNER = {
    "access_key_id": ("secret_access_key", "OBJECT_STORAGE_SECRET_ACCESS_KEY", "s3cr3t"),
    "secret_access_key": ("access_key_id", "OBJECT_STORAGE_ACCESS_KEY_ID", "AKIA0"),
}


@pytest.mark.parametrize(("key", "env", "default", "raw", "value"), SEED_TABLE)
def test_each_environment_variable_sets_its_key(key, env, default, raw, value):
    partner = {PARTNER[key][1]: PARTNER[key][2]} if key in PARTNER else {}
    environ = {**BASE_ENV, env: raw, **partner}
    settings, _ = load_settings(environ=environ)
    assert plain(getattr(settings.object_storage, key)) == value


@pytest.mark.parametrize(("key", "env", "default", "raw", "value"), SEED_TABLE)
def test_each_yaml_key_sets_its_key(tmp_path, key, env, default, raw, value):
    partner = {PARTNER[key][0]: PARTNER[key][2]} if key in PARTNER else {}
    document = {"object_storage": {**BASE, key: yaml.safe_load(raw), **partner}}
    settings, _ = load_settings(write(tmp_path, document), environ={})
    assert plain(getattr(settings.object_storage, key)) == value


def test_standard_aws_variables_supply_credentials():
    environ = {
        "AWS_ACCESS_KEY_ID": "AKIAFROMAWS",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "AWS_SESSION_TOKEN": "aws-token",
    }
    storage = load_settings(environ=environ)[0].object_storage
    assert storage.access_key_id == "AKIAFROMAWS"
    assert plain(storage.secret_access_key) == "aws-secret"
    assert plain(storage.session_token) == "aws-token"
    environ["OBJECT_STORAGE_ACCESS_KEY_ID"] = "AKIAOWN"
    assert load_settings(environ=environ)[0].object_storage.access_key_id == "AKIAOWN"


def test_flags_beat_environment_beat_yaml_beat_defaults(tmp_path):
    config = write(
        tmp_path,
        {
            "object_storage": {"region": "eu-west-1", "prefix": "from-yaml"},
            "syncd": {"outputs_dir": "/from/yaml", "log_level": "DEBUG", "rescan_interval": 5},
        },
    )
    environ = {
        "OBJECT_STORAGE_PREFIX": "from-env",
        "SYNCD_OUTPUTS_DIR": "/from/env",
        "SYNCD_LOG_LEVEL": "warning",
    }
    settings, path = load_settings(config, {"syncd": {"outputs_dir": "/from/flag"}}, environ)

    assert path == config
    assert settings.object_storage.region == "eu-west-1"  # YAML over default
    assert settings.object_storage.prefix == "from-env"  # environment over YAML
    assert settings.syncd.log_level == "WARNING"
    assert settings.syncd.rescan_interval == 5
    assert settings.syncd.outputs_dir == Path("/from/flag")  # flag over environment
    assert settings.object_storage.max_concurrency == 16  # default


def test_config_file_comes_from_syncd_config_variable(tmp_path):
    config = write(tmp_path, {"syncd": {"outputs_dir": "/via/variable"}})
    settings, path = load_settings(environ={"SYNCD_CONFIG": str(config)})
    assert path == config
    assert settings.syncd.outputs_dir == Path("/via/variable")


def test_earth2studio_metadata_layout_is_configurable(tmp_path):
    from syncd.layout import Layout

    config = write(
        tmp_path,
        {"syncd": {"outputs_dir": "/outputs", "metadata_file": "metadata_{workflow}:{exec}.json"}},
    )
    layout = Layout(load_settings(config, environ={})[0])
    result = layout.for_marker(Path("/outputs/deterministic/exec_1769560728_10ed9d3c.done"))
    assert result is not None
    assert result.metadata == Path("/outputs/metadata_deterministic:exec_1769560728_10ed9d3c.json")
    assert result.tree == Path("/outputs/deterministic/exec_1769560728_10ed9d3c")
    assert result.remote_path == "outputs/deterministic/exec_1769560728_10ed9d3c"


BAD = [
    (
        {"object_storage": {"enabled": True}},
        {},
        "invalid object_storage settings (config file {path}): bucket is required when object "
        "storage is enabled: set object_storage.bucket or OBJECT_STORAGE_BUCKET",
    ),
    (
        {"object_storage": {"enabled": True, "bucket": "b", "access_key_id": "AKIA0"}},
        {},
        "invalid object_storage settings (config file {path}): access_key_id is set but "
        "secret_access_key is not: set both (or, for the standard AWS chain such as an instance "
        "role, neither)",
    ),
    (
        {"object_storage": {"enabled": True, "bucket": "my.results"}},
        {},
        "invalid object_storage settings (config file {path}): bucket 'my.results' has dots in "
        "its name, and S3 Transfer Acceleration (use_transfer_acceleration, on by default) does "
        "not serve such buckets: set object_storage.use_transfer_acceleration: false "
        "(OBJECT_STORAGE_TRANSFER_ACCELERATION=false)",
    ),
    (
        {"object_storage": {"enabled": True, "bucket": "b", "cloudfront_domain": "https://d.net"}},
        {},
        "invalid object_storage settings (config file {path}): CloudFront is half configured: "
        "cloudfront_key_pair_id, cloudfront_private_key_path (or the PEM text in "
        "cloudfront_private_key, or the credential cloudfront_private_key in "
        "$CREDENTIALS_DIRECTORY as the unit passes it) missing; set all three cloudfront_* "
        "settings to sign URLs, or none to upload without signed URLs",
    ),
    (
        {"object_storage": {"bucket": "b", "buckett": "typo"}},
        {},
        "config file {path}: unknown key object_storage.buckett (known keys: enabled, "
        "storage_type, bucket, region, prefix, access_key_id, secret_access_key, session_token, "
        "endpoint_url, use_transfer_acceleration, max_concurrency, multipart_chunksize, "
        "use_rust_client, cloudfront_domain, cloudfront_key_pair_id, "
        "cloudfront_private_key_path, cloudfront_private_key, signed_url_expires_in)",
    ),
    (
        {},
        {"OBJECT_STORAGE_TYPE": "azure"},
        "invalid setting object_storage.storage_type (from $OBJECT_STORAGE_TYPE) = 'azure': "
        "syncd uploads to S3 and S3-compatible stores only: set it to s3 or leave it unset "
        "(results for Azure Blob Storage stay with the server's own uploader)",
    ),
    (
        {"syncd": {"completion": "metadata", "metadata_file": "meta/{exec}.json"}},
        {},
        "invalid syncd settings (config file {path}): completion: metadata finds each result's "
        "folder from its metadata file name, but metadata_file 'meta/{{exec}}.json' does not say "
        "the workflow: use {{exec_path}}, or {{workflow}} and {{exec}}, e.g. "
        "metadata_{{workflow}}:{{exec}}.json",
    ),
    (
        {"syncd": {"completion": "flag"}},
        {},
        "invalid setting syncd.completion (in {path}) = 'flag': Input should be 'marker' or "
        "'metadata'",
    ),
    (
        {},
        {"OBJECT_STORAGE_MULTIPART_CHUNKSIZE": "1048576"},
        "invalid setting object_storage.multipart_chunksize (from "
        "$OBJECT_STORAGE_MULTIPART_CHUNKSIZE) = '1048576': must be between 5242880 (5 MiB, the "
        "smallest part S3 accepts) and 5368709120 (5 GiB, the largest)",
    ),
    (
        {"object_storage": {"max_concurrency": 0}},
        {},
        "invalid setting object_storage.max_concurrency (in {path}) = 0: Input should be greater "
        "than or equal to 1",
    ),
    (
        {},
        {"OBJECT_STORAGE_ENABLED": "maybe"},
        "invalid setting object_storage.enabled (from $OBJECT_STORAGE_ENABLED) = 'maybe': "
        "Input should be a valid boolean, unable to interpret input",
    ),
    (
        {"syncd": {"metadata_file": "{workflow}/meta_{exec}.json"}},
        {},
        "invalid setting syncd.metadata_file (in {path}) = '{{workflow}}/meta_{{exec}}.json': for "
        "a result exec_x (at the top level: {{workflow}} empty) it names /meta_exec_x.json, which "
        "is not inside outputs_dir (it starts with / or holds ..), and syncd writes nothing "
        "outside outputs_dir: use e.g. {{exec_path}}.json or metadata_{{workflow}}:{{exec}}.json",
    ),
    (
        {"syncd": {"metadata_file": ".{workflow}./meta_{exec}.json"}},
        {},
        "invalid setting syncd.metadata_file (in {path}) = '.{{workflow}}./meta_{{exec}}.json': "
        "for a result exec_x (at the top level: {{workflow}} empty) it names ../meta_exec_x.json, "
        "which is not inside outputs_dir (it starts with / or holds ..), and syncd writes nothing "
        "outside outputs_dir: use e.g. {{exec_path}}.json or metadata_{{workflow}}:{{exec}}.json",
    ),
    (
        {"syncd": {"metadata_file": "meta_{exec}.json"}},
        {},
        "invalid syncd settings (config file {path}): metadata_file 'meta_{{exec}}.json' does not "
        "say the workflow, so results of two workflows with the same exec folder (wfa/exec_1 and "
        "wfb/exec_1) would share one metadata file: use {{exec_path}}, or {{workflow}} and "
        "{{exec}}, e.g. {{exec_path}}.json",
    ),
    (
        {},
        {"SYNCD_METADATA_FILE": "{exec}.json"},
        "invalid syncd settings (config file {path}, $SYNCD_METADATA_FILE): metadata_file "
        "'{{exec}}.json' does not say the workflow, so results of two workflows with the same "
        "exec folder (wfa/exec_1 and wfb/exec_1) would share one metadata file: use "
        "{{exec_path}}, or {{workflow}} and {{exec}}, e.g. {{exec_path}}.json",
    ),
    (
        {"syncd": {"metadata_file": "{exec_path}.done"}},
        {},
        "invalid syncd settings (config file {path}): metadata_file '{{exec_path}}.done' and "
        "marker_suffix '.done' name one file (exec_x.done): the marker and the metadata need "
        "names of their own; change one of them",
    ),
    (
        {"object_storage": {"endpoint_url": "http://user:hunter2/x@127.0.0.1:15009"}},
        {},
        "invalid setting object_storage.endpoint_url (in {path}) = "
        "'http://<redacted>@127.0.0.1:15009': must be an http:// or https:// URL of a host, e.g. "
        "http://minio.internal:9000",
    ),
    (
        {"object_storage": {"endpoint_url": "http://127.0.0.1:15009/results"}},
        {},
        "invalid setting object_storage.endpoint_url (in {path}) = "
        "'http://127.0.0.1:15009/results': must be the store's URL alone, e.g. "
        "http://minio.internal:9000 (no path: the bucket and keys follow the host)",
    ),
    (
        {"object_storage": {"endpoint_url": "http://127.0.0.1:notaport"}},
        {},
        "invalid setting object_storage.endpoint_url (in {path}) = 'http://127.0.0.1:notaport': "
        "must be an http:// or https:// URL of a host, e.g. http://minio.internal:9000",
    ),
    (
        {"object_storage": {"cloudfront_domain": "https://*.cloudfront.net"}},
        {},
        "invalid setting object_storage.cloudfront_domain (in {path}) = "
        "'https://*.cloudfront.net': must be the distribution's domain alone, e.g. "
        "https://d111111abcdef8.cloudfront.net (no path, user or wildcard: the signed Resource "
        "is <domain>/<remote_path>/*)",
    ),
    (
        {"object_storage": {"cloudfront_domain": "https://d111111abcdef8.cloudfront.net?x=1"}},
        {},
        "invalid setting object_storage.cloudfront_domain (in {path}) = "
        "'https://d111111abcdef8.cloudfront.net?x=1': must be an http:// or https:// URL of a "
        "host, e.g. https://d111111abcdef8.cloudfront.net",
    ),
    (
        {"object_storage": {"prefix": " outputs"}},
        {},
        "invalid setting object_storage.prefix (in {path}) = ' outputs': must not start or end "
        "with a blank: keys would too",
    ),
    (
        {"syncd": {"metadata_file": "{exec_path!r}.json"}},
        {},
        "invalid setting syncd.metadata_file (in {path}) = '{{exec_path!r}}.json': is not a valid "
        "template ({{exec_path}} takes no format or conversion)",
    ),
    (
        {"syncd": {"outputs_dir": "/out\x00puts"}},
        {},
        "invalid setting syncd.outputs_dir (in {path}) = '/out\\x00puts': must not hold control "
        "characters",
    ),
    (
        {"object_storage": {"max_concurrency": True}},
        {},
        "invalid setting object_storage.max_concurrency (in {path}) = True: must be a number, "
        "not true or false",
    ),
    (
        {"object_storage": {"cloudfront_key_pair_id": "K1&Policy=x"}},
        {},
        "invalid setting object_storage.cloudfront_key_pair_id (in {path}) = 'K1&Policy=x': "
        "must be the key's ID as CloudFront shows it (letters and digits, e.g. K2JCJMDEHXQW5F): "
        "it goes into every signed URL as it is",
    ),
    (
        {"syncd": {"stop_grace": float("inf")}},
        {},
        "invalid setting syncd.stop_grace (in {path}) = inf: Input should be a finite number",
    ),
    (
        {"syncd": {"retry_min_delay": 100, "retry_max_delay": 1}},
        {},
        "invalid syncd settings (config file {path}): retry_min_delay (100 s) is above "
        "retry_max_delay (1 s): the first retry cannot come after the longest wait; raise "
        "retry_max_delay or lower retry_min_delay",
    ),
    (
        {"syncd": {"metadata_file": "exec_meta/{exec_path}.json"}},
        {},
        "invalid setting syncd.metadata_file (in {path}) = 'exec_meta/{{exec_path}}.json': "
        "puts the metadata inside the result tree, where it would be uploaded as part of the "
        "result: put it beside the tree, e.g. {{exec_path}}.json",
    ),
    (
        {"syncd": {"metadata_file": "{exec}.{nope}.json"}},
        {},
        "invalid setting syncd.metadata_file (in {path}) = '{{exec}}.{{nope}}.json': unknown "
        "placeholder {{nope}}; use {{exec}}, {{exec_path}} or {{workflow}}",
    ),
]


@pytest.mark.parametrize(("document", "env", "message"), BAD)
def test_bad_configuration_is_one_clear_line(tmp_path, document, env, message):
    config = write(tmp_path, document)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ=env)
    assert str(caught.value) == message.format(path=config)


def test_a_key_given_twice_is_an_error_and_a_misspelt_variable_a_notice(tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("object_storage:\n  bucket: a\n  bucket: b\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    assert str(caught.value) == (
        f"config file {config} is not valid YAML at line 3, column 3: the key 'bucket' is given "
        "twice"
    )

    settings, _ = load_settings(
        environ={"SYNCD_OUTPUT_DIR": "/x", "OBJECT_STORAGE_USE_TRANSFER_ACCELERATION": "false"}
    )
    assert settings.notices == [
        "$OBJECT_STORAGE_USE_TRANSFER_ACCELERATION is not a setting syncd reads and is ignored; "
        "did you mean $OBJECT_STORAGE_TRANSFER_ACCELERATION?",
        "$SYNCD_OUTPUT_DIR is not a setting syncd reads and is ignored; did you mean "
        "$SYNCD_OUTPUTS_DIR?",
    ]


def test_check_finds_what_would_stop_syncd_at_start(tmp_path):
    """`syncd check` says ok only where `syncd run` would start: an outputs_dir that is no
    folder, a state_dir that is a file, are the same one line and exit 2 as at start."""
    config = write(tmp_path, {"object_storage": {"enabled": True, "bucket": "b"}})
    (tmp_path / "file").write_text("")
    env = clean_env()
    cases = {
        ("--outputs-dir", str(tmp_path / "nowhere")): (
            f"syncd: error: outputs_dir {tmp_path / 'nowhere'} does not exist or is not a "
            "folder: create it or set syncd.outputs_dir (SYNCD_OUTPUTS_DIR)"
        ),
        ("--outputs-dir", str(tmp_path)): (
            f"syncd: error: state_dir {tmp_path / 'file'} is not a folder: set syncd.state_dir "
            "(SYNCD_STATE_DIR) to a folder this user may write, or remove what is in its place"
        ),
    }
    env["SYNCD_STATE_DIR"] = str(tmp_path / "file")
    for flags, line in cases.items():
        for command in ("check", "run"):
            done = subprocess.run(
                [*SYNCD, command, "--config", str(config), *flags],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert (done.returncode, done.stderr.splitlines()[-1:]) == (2, [line]), command


def test_check_refuses_a_state_dir_run_cannot_use_and_leaves_nothing(moto_workspace):
    ws = moto_workspace
    (ws.root / "a-file").write_text("")
    for state_dir in ("/proc/syncd-state", str(ws.root / "a-file" / "state")):
        ws.settings["syncd"]["state_dir"] = state_dir
        done = ws.syncd("check", "--config", str(ws.config))
        said = done.stderr.splitlines()[-1]
        assert done.returncode == 2, done.stderr
        assert said.startswith(f"syncd: error: state_dir {state_dir}: cannot make it or write in")
        assert said.endswith(
            "make it writable by this user or set syncd.state_dir (SYNCD_STATE_DIR)"
        )
    ws.settings["syncd"]["state_dir"] = str(ws.root / "new" / "state")
    done = ws.syncd("check", "--config", str(ws.config))
    assert done.returncode == 0, done.stderr
    assert not (ws.root / "new").exists()


def test_an_empty_variable_counts_as_unset_and_says_so(tmp_path):
    config = write(tmp_path, {"object_storage": {"prefix": "results"}})
    environ = {"OBJECT_STORAGE_PREFIX": "", "SYNCD_MARKER_SUFFIX": "", "SYNCD_CONFIG": ""}

    settings, _ = load_settings(config, environ=environ)

    assert settings.object_storage.prefix == "results"
    assert settings.syncd.marker_suffix == ".done"
    assert settings.notices == [
        "$OBJECT_STORAGE_PREFIX is empty, which counts as unset: object_storage.prefix comes "
        "from the config file or its default",
        "$SYNCD_MARKER_SUFFIX is empty, which counts as unset: syncd.marker_suffix comes from "
        "the config file or its default",
    ]


def test_bad_configuration_exits_2_with_one_line_and_no_traceback(tmp_path):
    config = write(tmp_path, {"object_storage": {"enabled": True}})
    done = check(config)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"syncd: error: invalid object_storage settings (config file {config}): bucket is "
        "required when object storage is enabled: set object_storage.bucket or "
        "OBJECT_STORAGE_BUCKET"
    ]


@pytest.mark.parametrize("asked_by", ["--log-format", "SYNCD_LOG_FORMAT", "config file"])
def test_a_bad_configuration_is_said_as_json_when_json_logs_are_asked(tmp_path, asked_by):
    document: dict = {"object_storage": {"enabled": True}, "syncd": {}}
    if asked_by == "config file":
        document["syncd"]["log_format"] = "json"
    config = write(tmp_path, document)
    flags = ["--log-format", "json"] if asked_by == "--log-format" else []
    env = {"SYNCD_LOG_FORMAT": "json"} if asked_by == "SYNCD_LOG_FORMAT" else {}
    done = subprocess.run(
        [*SYNCD, "run", "--config", str(config), *flags],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    record = json.loads(line)["record"]
    assert record["level"]["name"] == "ERROR"
    assert record["message"].startswith(
        "syncd: error: invalid object_storage settings (config file "
    )
    assert "bucket is required when object storage is enabled" in record["message"]


def test_yaml_that_does_not_parse_names_the_file(tmp_path):
    config = write(tmp_path, "object_storage:\n  enabled: true\n   bucket: [oops\n")
    done = check(config)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"syncd: error: config file {config} is not valid YAML at line 3, column 10: "
        "mapping values are not allowed here"
    ]


def test_missing_config_file_is_named(tmp_path):
    done = check(tmp_path / "nope.yaml")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"syncd: error: config file {tmp_path / 'nope.yaml'} does not exist: fix --config or "
        "SYNCD_CONFIG"
    ]


def cloudfront_config(tmp_path: Path, key_path: Path) -> Path:
    return write(
        tmp_path,
        {
            "object_storage": {
                "enabled": True,
                "bucket": "b",
                "endpoint_url": "http://127.0.0.1:9",
                "cloudfront_domain": "https://d1.cloudfront.net",
                "cloudfront_key_pair_id": "K1",
                "cloudfront_private_key_path": str(key_path),
            }
        },
    )


def test_private_key_missing_unreadable_or_not_rsa_names_the_path(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN NOTHING-----\n")
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    expected = {
        missing: f"CloudFront private key {missing} does not exist: fix "
        "object_storage.cloudfront_private_key_path (CLOUDFRONT_PRIVATE_KEY_PATH)",
        garbage: f"CloudFront private key {garbage} is not an unencrypted PEM private key: "
        "create one with `openssl genrsa -out cloudfront-private-key.pem 2048`",
        ec_key: f"CloudFront private key {ec_key} is not an RSA key: CloudFront signs with RSA; "
        "create one with `openssl genrsa -out cloudfront-private-key.pem 2048`",
    }
    for path, message in expected.items():
        done = check(cloudfront_config(tmp_path, path))
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [f"syncd: error: {message}"]


def test_unreadable_private_key_is_named(tmp_path, signing_key):
    import os

    if os.geteuid() == 0:
        # root reads any file, so make the path unreadable by making it a folder instead
        unreadable = tmp_path / "key-is-a-folder.pem"
        unreadable.mkdir()
    else:
        unreadable = tmp_path / "unreadable.pem"
        unreadable.write_bytes(signing_key[0].read_bytes())
        unreadable.chmod(0)
    done = check(cloudfront_config(tmp_path, unreadable))
    assert done.returncode == 2
    assert done.stderr.startswith(f"syncd: error: CloudFront private key {unreadable} ")
    assert len(done.stderr.splitlines()) == 1


def test_check_prints_settings_without_secrets_and_reaches_the_bucket(moto_workspace):
    ws = moto_workspace
    ws.settings["object_storage"]["session_token"] = "very-secret-token"
    done = ws.syncd("check", "--config", str(ws.config))

    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["object_storage"]["bucket"] == ws.bucket
    assert printed["object_storage"]["secret_access_key"] == "<redacted>"
    assert printed["object_storage"]["session_token"] == "<redacted>"
    assert printed["syncd"]["outputs_dir"] == str(ws.outputs)
    assert f"# bucket: s3://{ws.bucket}" in done.stdout
    assert done.stdout.rstrip().endswith("# ok: settings valid, bucket reachable")
    secret_material = ["syncdtestsecret", "very-secret-token", "PRIVATE KEY"]
    for text in secret_material:
        assert text not in done.stdout + done.stderr


def test_check_fails_when_the_bucket_cannot_be_reached(moto_workspace):
    ws = moto_workspace
    ws.settings["object_storage"]["bucket"] = "no-such-bucket-syncd"
    done = ws.syncd("check", "--config", str(ws.config))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith(
        "syncd: error: listing s3://no-such-bucket-syncd"
    )

    ws.settings["object_storage"]["endpoint_url"] = f"http://127.0.0.1:{free_port()}"  # nobody
    refused = ws.syncd("check", "--config", str(ws.config))
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1].endswith(
        ": check endpoint_url and that the store is up and reachable from here"
    )


def test_disabled_object_storage_is_an_error_for_run(tmp_path):
    config = write(tmp_path, {"syncd": {"outputs_dir": str(tmp_path)}})
    done = subprocess.run(
        [*SYNCD, "run", "--config", str(config)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "syncd: error: object storage is disabled, so syncd has nothing to do: set "
        "object_storage.enabled: true or OBJECT_STORAGE_ENABLED=true"
    ]


def test_example_config_is_valid_and_names_every_key(tmp_path, signing_key):
    """Valid as the install uses it: the CloudFront key comes as the unit's credential."""
    example = Path(__file__).resolve().parents[1] / "config.example.yaml"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "cloudfront_private_key").write_text(pem(signing_key[1]))
    settings, _ = load_settings(example, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    key_path = settings.object_storage.cloudfront_private_key_path
    assert key_path == credentials / "cloudfront_private_key"
    with pytest.raises(ConfigError, match="CloudFront is half configured"):
        load_settings(example, environ={})  # by hand without the credential: said, not signed
    document = yaml.safe_load(example.read_text())
    commented = example.read_text()
    for key, env, *_ in SEED_TABLE:
        assert f"{key}:" in commented and env in commented
    assert set(document["syncd"]) == set(type(settings.syncd).model_fields)


# The Earth2Studio server's own conf/config.yaml (serve/server/conf, earth2studio 0.19.0).
SERVER_CONFIG = Path(__file__).resolve().parent / "data" / "earth2studio-config.yaml"


def pem(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def test_the_servers_own_config_file_is_read_as_it_is():
    environ = {"OBJECT_STORAGE_ENABLED": "true", "OBJECT_STORAGE_BUCKET": "b"}
    settings, path = load_settings(SERVER_CONFIG, environ=environ)

    assert path == SERVER_CONFIG
    storage = settings.object_storage
    assert storage.enabled is True  # the server's file says false: syncd's environment wins
    assert storage.signed_url_expires_in == 86400  # the server's value, not the seed default
    assert storage.storage_type == "s3"
    assert storage.cloudfront_private_key is None
    assert settings.notices == []  # redis:, queue:, paths:, ... are the server's, quietly


def test_unknown_keys_in_our_sections_stay_errors_in_the_servers_file(tmp_path):
    document = yaml.safe_load(SERVER_CONFIG.read_text())
    document["object_storage"]["cloudfront_private_key_pth"] = "/k.pem"
    config = write(tmp_path, document)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    assert str(caught.value).startswith(
        f"config file {config}: unknown key object_storage.cloudfront_private_key_pth (known keys:"
    )


def test_a_misspelt_section_is_ignored_with_one_notice(tmp_path):
    config = write(tmp_path, {"objectstorage": {"bucket": "b"}, "redis": {"port": 6379}})
    settings, _ = load_settings(config, environ={})
    assert settings.object_storage.bucket is None
    assert settings.notices == [
        f"config file {config}: section objectstorage: is not syncd's and is ignored; did you "
        "mean object_storage:?"
    ]


def test_the_servers_environment_names_work_alone(signing_key):
    from syncd.signing import UrlSigner

    environ = {
        "OBJECT_STORAGE_ENABLED": "true",
        "OBJECT_STORAGE_TYPE": "S3",
        "OBJECT_STORAGE_BUCKET": "b",
        "CLOUDFRONT_DOMAIN": "https://d1.cloudfront.net",
        "CLOUDFRONT_KEY_PAIR_ID": "K1",
        "CLOUDFRONT_PRIVATE_KEY": pem(signing_key[1]),
        "SIGNED_URL_EXPIRES_IN": "7200",
    }
    settings, _ = load_settings(environ=environ)
    storage = settings.object_storage
    assert storage.storage_type == "s3"
    assert storage.signed_url_expires_in == 7200
    assert storage.cloudfront_private_key_path is None
    signer = UrlSigner.from_settings(storage)
    assert signer is not None
    assert signer.private_key.private_numbers() == signing_key[1].private_numbers()
    assert settings.notices == []


def test_a_pem_in_one_line_of_an_env_file_is_read(signing_key):
    from syncd.signing import UrlSigner

    one_line = pem(signing_key[1]).replace("\n", "\\n")
    environ = {**BASE_ENV, "CLOUDFRONT_PRIVATE_KEY": one_line}
    del environ["CLOUDFRONT_PRIVATE_KEY_PATH"]
    signer = UrlSigner.from_settings(load_settings(environ=environ)[0].object_storage)
    assert signer is not None
    assert signer.private_key.private_numbers() == signing_key[1].private_numbers()


def test_differing_names_say_which_wins_and_never_print_the_key(moto_workspace, signing_key):
    from cryptography.hazmat.primitives.asymmetric import rsa

    ws = moto_workspace
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    env = ws.env(
        OBJECT_STORAGE_SIGNED_URL_EXPIRES_IN="60",
        SIGNED_URL_EXPIRES_IN="120",
        CLOUDFRONT_PRIVATE_KEY=pem(other),
    )
    done = ws.syncd("check", "--config", str(ws.config), env=env)

    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["object_storage"]["signed_url_expires_in"] == 60
    assert yaml.safe_load(done.stdout)["object_storage"]["cloudfront_private_key"] == "<redacted>"
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, done.stderr
    assert warnings[0].endswith(
        "$OBJECT_STORAGE_SIGNED_URL_EXPIRES_IN and $SIGNED_URL_EXPIRES_IN are both set and "
        "differ; using $OBJECT_STORAGE_SIGNED_URL_EXPIRES_IN for "
        "object_storage.signed_url_expires_in"
    )
    assert warnings[1].endswith(
        "cloudfront_private_key_path and cloudfront_private_key hold different keys; signing "
        f"with the file {ws.key_path} (cloudfront_private_key_path)"
    )
    assert "PRIVATE KEY" not in done.stdout + done.stderr

    garbage = ws.syncd("check", "--config", str(ws.config), env=ws.env(CLOUDFRONT_PRIVATE_KEY="x"))
    assert garbage.returncode == 0, garbage.stderr  # the file wins: the text is not used
    assert garbage.stderr.splitlines()[-1].endswith(warnings[1].split(" ", 3)[3])


def test_a_bad_pem_text_is_named_by_its_setting_not_printed(tmp_path):
    environ = {**BASE_ENV, "CLOUDFRONT_PRIVATE_KEY": "-----BEGIN RSA PRIVATE KEY-----\nxyz\n"}
    del environ["CLOUDFRONT_PRIVATE_KEY_PATH"]
    done = check(None, **environ, OBJECT_STORAGE_ENABLED="true")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "syncd: error: the PEM text in object_storage.cloudfront_private_key "
        "(CLOUDFRONT_PRIVATE_KEY) is not an unencrypted PEM private key: create one with "
        "`openssl genrsa -out cloudfront-private-key.pem 2048`"
    ]


def test_a_config_or_key_that_is_a_fifo_is_refused_not_waited_on(tmp_path, signing_key):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    done = check(fifo)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"syncd: error: config file {fifo} is not a regular file: fix --config or SYNCD_CONFIG"
    ]
    listed = tmp_path / "listed.yaml"
    listed.write_text("object_storage:\n  ? [a, b]\n  : 1\n")
    done = check(listed)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"syncd: error: config file {listed} is not valid YAML at line 2, column 5: a key must "
        "be a name, not a list or a mapping"
    ]


def test_credentials_this_user_cannot_read_are_one_line(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "session_token").write_bytes(b"\xff\xfe not text")
    done = check(
        None,
        CREDENTIALS_DIRECTORY=str(credentials),
        OBJECT_STORAGE_ENABLED="true",
        OBJECT_STORAGE_BUCKET="b",
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"syncd: error: credential {credentials / 'session_token'} is not UTF-8 text: let this "
        "user read it (the unit's LoadCredential= does), or unset it"
    ]
