"""The README, followed line by line: the demo runs syncd's main job end to end, the install
works as written on a copy of this machine, and the commands, flags, numbers and example lines
it shows are the code's."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from syncd import budget, cli, metadata, publish, tree
from syncd.config import DaemonSettings, ObjectStorage
from syncd.health import STALL
from syncd.report import REPORT_EVERY
from syncd.storage import obstore_client, timeouts
from tests import accelerate
from tests.cloudfront import file_url, verify
from tests.conftest import SYNCD, clean_env
from tests.machine import on_a_copy
from tests.readme import (
    PROSE,
    README,
    ROOT,
    as_quoted,
    block_with,
    code_blocks,
    log_example,
    readme_command,
    shell_lines,
)
from tests.servers import S3Server, wait_until

UNIT = (ROOT / "systemd" / "syncd.service").read_text()
EXAMPLE = yaml.safe_load((ROOT / "config.example.yaml").read_text())
MiB = 1024 * 1024


def install_steps(bucket: str, endpoint: str) -> str:
    """The README's install lines as they run on this machine: the repo is this checkout (no
    clone from the network) and config.yaml gets the edit the README asks for."""
    install, _ = block_with("# install").split("# enable, reload, read")
    steps = []
    for line in shell_lines(install):
        if "git clone <this repo> /opt/syncd" in line:
            line = line.replace(
                "sudo git clone <this repo> /opt/syncd",
                f"mkdir -p /opt/syncd && mount --bind {shlex.quote(str(ROOT))} /opt/syncd",
            )
        steps.append(line)
        if "/etc/syncd/config.yaml   # edit: bucket" in line:
            steps.append(
                f"sed -i -e 's/your-bucket-name/{bucket}/' -e "
                f"'s|# endpoint_url: http://localhost:9000|endpoint_url: {endpoint}|' "
                "/etc/syncd/config.yaml"
            )
    return "\n".join(steps)


def test_the_install_works_as_written_and_syncd_by_hand_too(
    tmp_path, moto: S3Server, signing_key: tuple[Path, rsa.RSAPrivateKey]
):
    """As root on a copy of this machine where the server's /outputs exists: every install line
    of the README, its /etc/syncd/env beside the server, then its sync, sign and status by hand
    on a result the server finished."""
    bucket = moto.new_bucket()
    exec_path = "deterministic/exec_1769560728_10ed9d3c"
    server_metadata = "/outputs/metadata_deterministic:exec_1769560728_10ed9d3c.json"
    env_file = block_with("# /etc/syncd/env")
    script = f"""
# The machine before the install: the server's outputs folder, in the server's group.
groupadd earth2studio
install -d -m 2775 -g earth2studio /outputs
install -d /srv/operator && cd /srv/operator
cat > cloudfront-private-key.pem <<'PEM'
{signing_key[0].read_text().strip()}
PEM
echo "== install"
{install_steps(bucket, moto.endpoint)}
echo "== installed"
cat > /etc/syncd/env <<'ENV'
{env_file}ENV
# A result the server finished: its tree, and its metadata saying so.
install -d -m 2775 -g earth2studio /outputs/deterministic
install -d -m 2775 -g earth2studio /outputs/{exec_path}/results.zarr
printf '{{"zarr_format": 2}}' > /outputs/{exec_path}/results.zarr/.zgroup
head -c 70000 /dev/urandom > /outputs/{exec_path}/results.zarr/0.0
chgrp -R earth2studio /outputs/{exec_path} && chmod -R g+w /outputs/{exec_path}
printf '{{"request_id": "exec_1769560728_10ed9d3c", "status": "completed"}}' > '{server_metadata}'
chgrp earth2studio '{server_metadata}' && chmod 664 '{server_metadata}'
# A root shell's own settings: syncd by hand must not take them, as the unit would not.
export OBJECT_STORAGE_PREFIX=admins SYNCD_COMPLETION=marker AWS_ACCESS_KEY_ID=ADMIN
echo "== sync"
{readme_command("sync")}
echo "== sign"
{readme_command("sign")}
echo "== status"
{readme_command("status")}
echo "== metadata"
cat '{server_metadata}'
"""
    scratch = tmp_path / "machine"
    scratch.mkdir()

    done = subprocess.run(
        on_a_copy(script, scratch),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )

    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    installed = out[out.index("== install") : out.index("== installed")]
    assert "# ok: settings valid, bucket reachable" in installed
    assert "# CloudFront: key /etc/syncd/credentials/cloudfront_private_key" in installed
    assert f"/outputs/{exec_path} -> s3://{bucket}/outputs/{exec_path}" in out
    assert set(moto.objects(bucket)) == {
        f"outputs/{exec_path}/results.zarr/.zgroup",
        f"outputs/{exec_path}/results.zarr/0.0",
    }
    url = out[out.index("== sign") :].splitlines()[1]
    public = {EXAMPLE["object_storage"]["cloudfront_key_pair_id"]: signing_key[1].public_key()}
    policy = verify(file_url(url, "results.zarr/.zgroup"), public)
    assert policy["Statement"][0]["Resource"] == (
        f"https://d30anq61ot046p.cloudfront.net/outputs/{exec_path}/*"
    )
    assert "\n1 results: 1 done\n== metadata\n" in out
    assert f"recorded in {server_metadata}" in done.stderr + out
    record = json.loads(out[out.index("== metadata") :].split("\n", 1)[1])
    assert record["storage_type"] == "s3" and record["remote_path"] == f"outputs/{exec_path}"
    assert "Traceback" not in done.stderr


def test_demo_uploads_records_and_signs(tmp_path):
    done = subprocess.run(
        [str(ROOT / "scripts" / "demo.sh")],
        env=clean_env(DEMO_DIR=str(tmp_path / "demo")),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "== syncd stopped on SIGTERM with exit code 0" in done.stdout
    assert "== bucket copy is byte-identical to the local tree" in done.stdout
    assert '"storage_type": "s3"' in done.stdout
    assert "\n1 results: 1 done\n" in done.stdout
    assert "== signed URL verified with the public key: covers https://" in done.stdout
    assert "exec_1769560728_10ed9d3c: uploaded 4 files, 524460 bytes" in done.stderr
    assert processes_mentioning(str(tmp_path / "demo")) == []  # servers and daemon stopped


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended while we looked
        if text in args:
            found.append(args)
    return found


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (choices,) = [
        action.choices
        for action in cli.parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    return dict(choices)


def test_the_commands_and_flags_shown_are_the_clis():
    shown = {
        match[1]: set(re.findall(r"--[a-z-]+", line))
        for line in block_with("syncd run ").splitlines()
        if (match := re.match(r"syncd (\w+) ", line))
    }
    (all_take,) = re.findall(r"All take (.*?)\. ", PROSE)
    common = set(re.findall(r"`(--[a-z-]+)[^`]*`", all_take)) | {"--config"}

    real = {
        name: {flag for action in sub._actions for flag in action.option_strings} - {"-h", "--help"}
        for name, sub in subcommands().items()
    }
    assert set(shown) == set(real)
    for name, flags in real.items():
        assert shown[name] | common == flags, name


def syncd_invocations() -> list[list[str]]:
    """Every `syncd COMMAND ...` the README shows (also by hand, `syncd-as-unit COMMAND ...`):
    each one in its code blocks, and those with arguments in its text, as argument lists."""
    commands = "|".join(subcommands())
    shown = rf"(?:^|[\s/])syncd(?:-as-unit)? ((?:{commands})\b.*)"
    lines = [line for block in code_blocks() for line in shell_lines(block)]
    inline = re.findall(rf"(?<!`)`([^`]*syncd (?:{commands})\b[^`]*)`(?!`)", PROSE)
    found = []
    for text, in_code in [(line, True) for line in lines] + [(text, False) for text in inline]:
        match = re.search(shown, text)
        if match is None or "[" in match[1]:
            continue  # not a command, or the synopsis
        words = shlex.split(re.split(r"\s(?:2>&1|\||#|>)", match[1] + " ")[0])
        if in_code or len(words) > 1:  # in the text, `syncd sync` alone names the command
            found.append(words)
    return found


def test_every_syncd_command_the_readme_shows_parses():
    invocations = syncd_invocations()
    assert {words[0] for words in invocations} == set(subcommands())
    for words in invocations:
        try:
            cli.parser().parse_args(words)
        except SystemExit:
            pytest.fail(f"the README shows `syncd {shlex.join(words)}`, which syncd refuses")


def unit_setting(name: str) -> str:
    (value,) = re.findall(rf"^{name}=(.*)$", UNIT, flags=re.MULTILINE)
    return value


def minutes(seconds: float) -> str:
    return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"


def test_the_numbers_the_readme_gives_are_the_codes():
    daemon, storage = DaemonSettings(), ObjectStorage()
    chunk = storage.multipart_chunksize
    seconds = unit_setting("TimeoutStopSec").removesuffix("s")
    assert daemon.stop_grace < float(seconds)
    assert metadata.READ_AGAIN == 1.0 and REPORT_EVERY == 1.0
    phrases = [
        f"no byte of an answer comes for {timeouts.READ_TIMEOUT:.0f} s "
        f"(connect timeouts: {timeouts.CONNECT_TIMEOUT:.0f} s)",
        f"a minute, plus the time its bytes take at {budget.SLOWEST_RATE // 1024} kB/s",
        f"(a 1 MiB file: {minutes(timeouts.request_timeout(MiB))}; an 8 MiB part: "
        f"{minutes(timeouts.request_timeout(chunk))})",
        f"no answer within {timeouts.request_timeout(budget.SLOWEST_RATE):.0f} s",
        f"once it has not pushed back for {budget.RECOVERED:.0f} s",
        f"doubles from up to {publish.PUSHED_BACK_PAUSE * 2:g} s to up to "
        f"{publish.PUSHED_BACK_MAX_PAUSE:.0f} s, {publish.PUSHED_BACK_TRIES} times",
        f"({cli.CHECK_TIMEOUT:.0f} s at most)",
        f"gives up after {cli.CHECK_TIMEOUT:.0f} s",
        f"a tree more than {tree.MAX_DEPTH} folders deep",
        f"a key above S3's {tree.MAX_KEY_BYTES:,} bytes",
        f"left alone for {tree.QUIET:.0f} s",
        f"looks at a published tree once more {tree.QUIET:.0f} s later",
        f"one that stays broken for {metadata.BEING_WRITTEN:.0f} s",
        "syncd reads it again a second later",
        "(at most once a second)",
        f"in the last {STALL / 60:.0f} minutes",
        f"`{budget.FILES_PER_TRANSFER} x max_concurrency` files in flight "
        f"({budget.FILES_PER_TRANSFER * storage.max_concurrency} at the default)",
        "two parts of a file at once (so up to "
        f"`{budget.FILES_PER_TRANSFER * 2} x max_concurrency`",
        f"more than {obstore_client.RESUMABLE_PARTS} parts, "
        f"{obstore_client.RESUMABLE_PARTS * chunk // MiB} MiB at the default part size",
        f"`retry_min_delay` ({daemon.retry_min_delay:g} s) to `retry_max_delay` "
        f"({daemon.retry_max_delay:g} s)",
        f"every `retry_permanent_delay` ({daemon.retry_permanent_delay:g} s)",
        f"`claim_timeout` ({daemon.claim_timeout:g} s)",
        f"`stop_grace` ({daemon.stop_grace:g} s, below the unit's `TimeoutStopSec={seconds}s`)",
        f"`WatchdogSec={unit_setting('WatchdogSec')}`",
        f"`resign_fraction` ({daemon.resign_fraction * 100:.0f} %)",
        f"`upload_buffer` ({daemon.upload_buffer // MiB} MiB",
        "multipart above `multipart_chunksize`",
        f"Exit codes: 0 success, {cli.EXIT_FAILED} a result failed or the bucket could not be "
        f"reached, {cli.EXIT_CONFIG} bad configuration",
        "exits 128 + the signal's number ("
        + ", ".join(str(128 + s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
        + f", {128 + signal.SIGQUIT})",
    ]
    assert cli.EXIT_INTERRUPTED == 128 + signal.SIGINT
    missing = [phrase for phrase in phrases if phrase not in PROSE]
    assert missing == []


def test_the_settings_table_and_the_example_config_give_the_defaults():
    table = README[README.index("| key | default | what |") :].split("\n\n")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `?([^`|]*?)`? \|", table, flags=re.MULTILINE))
    defaults = DaemonSettings().model_dump(mode="json")
    assert set(rows) == set(defaults)
    for key, default in defaults.items():
        shown = (
            "unset"
            if default is None
            else default
            if isinstance(default, str)
            else yaml.safe_dump(default).split("\n")[0]
        )
        assert rows[key] == shown.removesuffix(".0"), key
        assert EXAMPLE["syncd"][key] == default, key
    storage = ObjectStorage().model_dump(mode="json")
    for key in ("region", "prefix", "max_concurrency", "multipart_chunksize", "use_rust_client",
                "use_transfer_acceleration", "signed_url_expires_in"):  # fmt: skip
        assert EXAMPLE["object_storage"][key] == storage[key], key


def test_the_alert_table_is_the_rules_file():
    table = README[README.index("| alert | fires when |") :].split("\n\n")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", table, flags=re.MULTILINE))
    rules = yaml.safe_load((ROOT / "monitoring" / "syncd.rules.yml").read_text())
    waits = {r["alert"]: r["for"] for group in rules["groups"] for r in group["rules"]}
    assert set(rows) == set(waits)
    for alert, fires_when in rows.items():
        # "..., for 5 min" is the rule's `for:`; a row without it has a short one.
        shown = re.search(r"[, ]for (\d+) min$", fires_when)
        assert (f"{shown[1]}m" if shown else "1m") == waits[alert], alert
    assert "rule_files: [syncd.rules.yml]" in PROSE
    assert (ROOT / "monitoring" / "grafana-dashboard.json").is_file()


def test_the_config_error_example_is_what_syncd_says(tmp_path):
    (example,) = [line for line in block_with("syncd: error:").splitlines() if line]
    env = clean_env(OBJECT_STORAGE_ENABLED="true", OBJECT_STORAGE_BUCKET="results")
    env["OBJECT_STORAGE_MULTIPART_CHUNKSIZE"] = "1048576"

    done = subprocess.run(
        [*SYNCD, "check", "--outputs-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == cli.EXIT_CONFIG
    assert done.stderr.splitlines() == [example]


def test_the_start_line_example_is_what_syncd_says_at_its_defaults(tmp_path):
    """On AWS at the defaults: transfer acceleration on, obstore, us-east-1."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "object_storage": {"enabled": True, "bucket": "results"},
                "syncd": {"outputs_dir": str(outputs), "state_dir": str(tmp_path / "state")},
            }
        )
    )
    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen(
            [*SYNCD, "run", "--config", str(config)],
            env=clean_env(AWS_ACCESS_KEY_ID="AKIA0", AWS_SECRET_ACCESS_KEY="s"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "syncd watching" in log.read_text(), what="the start line")
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0

    assert log_example("syncd watching") in as_quoted(log.read_text(), outputs)


def test_the_warning_examples_are_what_syncd_says(moto_workspace):
    ws = moto_workspace
    ws.settings["object_storage"]["bucket"] = "no-such-bucket-syncd"
    ws.result("exec_1769560731_77ab01f3", {"results.zarr/.zgroup": b"{}"})
    ws.result("exec_1769560732_0c0ffee0", metadata="")
    ws.mark("exec_1769560731_77ab01f3")
    ws.mark("exec_1769560732_0c0ffee0")

    daemon = ws.daemon(journal=True)
    daemon.wait_log("exec_1769560731_77ab01f3: upload of")
    daemon.wait_log("exec_1769560732_0c0ffee0: metadata")
    assert daemon.terminate() == 0

    lines = as_quoted(daemon.log(), ws.outputs)
    assert log_example("exec_1769560731_77ab01f3: upload of") in lines
    assert log_example("exec_1769560732_0c0ffee0: metadata") in lines


def columns(line: str) -> list[int]:
    """Where the cells of a table line start (cells are apart by two spaces or more)."""
    return [0] + [match.end() for match in re.finditer(r" {2,}", line)]


def test_the_status_example_is_laid_out_as_syncd_lays_it_out(moto_workspace):
    ws = moto_workspace
    ws.result("deterministic/exec_1769560728_b")
    assert ws.sync("deterministic/exec_1769560728_b").returncode == 0
    real = ws.syncd("status", "--config", str(ws.config)).stdout.splitlines()
    example = block_with("RESULT ").splitlines()

    for table in (real, example):
        header, *rows, total = table
        assert re.split(r" {2,}", header) == [
            "RESULT",
            "STATE",
            "ATTEMPTS",
            "PROGRESS",
            "NEXT TRY",
            "LAST ERROR",
        ]
        for row in rows:
            assert columns(row)[:5] == columns(header)[:5], row
        assert re.fullmatch(r"\d+ results: \d+ \w+(, \d+ \w+)*", total)
    assert real[-1] == "1 results: 1 done"


@pytest.mark.parametrize("rust", [True, False], ids=["obstore", "s3fs"])
def test_a_bucket_without_acceleration_is_one_line_with_the_remedy(tmp_path, rust):
    """At the defaults, against AWS's accelerate endpoint for a bucket that has no acceleration
    (tests/accelerate.py): `syncd check` and `syncd sync` say what to do, in one line each."""
    result, config = accelerate.at_aws_defaults(tmp_path, rust)
    script = f"""
{shlex.join([*SYNCD, "check", "--config", str(config)])} > /dev/null; echo "check exit $?"
{shlex.join([*SYNCD, "sync", "--config", str(config), str(result)])}
echo "sync exit $?"
"""
    folder = tmp_path / "aws"
    folder.mkdir()

    done = subprocess.run(
        accelerate.reach("results", folder, script),
        env=clean_env(AWS_ACCESS_KEY_ID="AKIA0", AWS_SECRET_ACCESS_KEY="s"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["check exit 1", "sync exit 1"]
    client = "obstore" if rust else "s3fs"
    remedy = (
        f"{accelerate.MESSAGE}: enable Transfer Acceleration on the bucket (aws s3api "
        "put-bucket-accelerate-configuration --bucket BUCKET --accelerate-configuration "
        "Status=Enabled) or set object_storage.use_transfer_acceleration: false "
        "(OBJECT_STORAGE_TRANSFER_ACCELERATION=false)"
    )
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors[0] == (
        f"syncd: error: listing s3://results (s3-accelerate, us-east-1) via {client} failed: "
        f"InvalidRequest: {remedy}"
    )
    assert errors[1].endswith(
        f"exec_1_aaaaaaaa: upload of outputs/exec_1_aaaaaaaa/a.bin failed: InvalidRequest: {remedy}"
    )
    assert f"`InvalidRequest: {accelerate.MESSAGE}`" in PROSE


def test_the_layout_table_names_every_module():
    table = README[README.index("## Layout of the code") :]
    named = set(re.findall(r"`((?:syncd|tests|bench)/[\w/]*(?:\.py)?)`", table))
    modules = {
        str(path.relative_to(ROOT))
        for folder in ("syncd", "tests")
        for path in (ROOT / folder).glob("*.py")
        if path.name != "__init__.py" and not path.name.startswith(("test_", "conftest"))
    }
    assert modules - named == set()  # syncd/storage/ is named as a folder
