"""The `syncd` command: `run` (the daemon), `sync` (publish results now), `mark` (say results
are finished), `status` (each result's state), `check` (settings, key, bucket).

Exit codes: 0 success, 1 a result could not be published or the bucket not reached,
2 bad configuration or usage, 128 + n a `syncd sync` ended by signal n (130 for Ctrl-C).
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from loguru import logger

from syncd import __version__, logs, status
from syncd.attempt import Attempts, Held, Recorded
from syncd.budget import raise_open_files
from syncd.config import (
    LONGEST_SIGNED_URL,
    ConfigError,
    Settings,
    load_settings,
    log_format_asked,
    rate_text,
    redacted,
)
from syncd.daemon import Daemon
from syncd.errors import OperatorError, SyncdError, TransientError, printable
from syncd.journal import Journal, Multiparts, unusable
from syncd.layout import Layout, LayoutError
from syncd.marker import NotAResult, mark_finished, result_folder
from syncd.metrics import Metrics
from syncd.notify import Notifier
from syncd.publish import Publisher
from syncd.resign import Resigner
from syncd.signals import STOP_SIGNALS, Interrupted, hung_up_while_starting, interrupt
from syncd.signing import UrlSigner
from syncd.storage import connected_store, open_store
from syncd.storage.relay import require_no_proxy

# Seconds `syncd check` waits for the bucket to answer one listing.
CHECK_TIMEOUT = 20.0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT; another signal: 128 + its number


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML config (default: $SYNCD_CONFIG, else /etc/syncd/config.yaml if it exists)",
    )
    common.add_argument(
        "--outputs-dir", type=Path, metavar="DIR", help="overrides syncd.outputs_dir"
    )
    common.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR")
    common.add_argument("--log-format", choices=["text", "json"], help="overrides syncd.log_format")

    top = argparse.ArgumentParser(
        prog="syncd", description="Upload finished Earth2Studio results to S3 and sign their URLs."
    )
    top.add_argument("--version", action="version", version=f"syncd {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "run", parents=[common], help="watch outputs_dir and publish marked results (foreground)"
    )
    sync = commands.add_parser(
        "sync", parents=[common], help="publish the given results now, then exit"
    )
    sync.add_argument("exec_dirs", nargs="+", type=Path, metavar="EXEC_DIR")
    sync.add_argument(
        "--force",
        action="store_true",
        help="send a result published here already again, even if its tree has not changed",
    )
    mark = commands.add_parser(
        "mark", parents=[common], help="mark results finished, for the daemon to publish"
    )
    mark.add_argument("exec_dirs", nargs="+", type=Path, metavar="EXEC_DIR")
    sign = commands.add_parser(
        "sign", parents=[common], help="print a fresh signed URL for a result"
    )
    sign.add_argument("target", metavar="EXEC_DIR|REMOTE_PATH")
    sign.add_argument(
        "--expires-in", type=lifetime, metavar="S", help="seconds (signed_url_expires_in)"
    )
    status_parser = commands.add_parser(
        "status",
        parents=[common],
        help="each result's state: pending, uploading, retrying, done, elsewhere, forgotten",
    )
    status_parser.add_argument("--json", action="store_true", help="one JSON list instead")
    commands.add_parser(
        "check",
        parents=[common],
        help="validate the settings, load the signing key, reach the bucket",
    )
    return top


def lifetime(text: str) -> int:
    """`--expires-in`: seconds, within what signed_url_expires_in accepts."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= LONGEST_SIGNED_URL:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of seconds from 1 to {LONGEST_SIGNED_URL} (10 years), "
            f"got {text!r}"
        )
    return value


def flags_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    daemon = {
        "outputs_dir": args.outputs_dir,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    return {"syncd": {key: value for key, value in daemon.items() if value is not None}}


def require_enabled(settings: Settings) -> None:
    if not settings.object_storage.enabled:
        raise ConfigError(
            "object storage is disabled, so syncd has nothing to do: set "
            "object_storage.enabled: true or OBJECT_STORAGE_ENABLED=true"
        )


def signer_for(settings: Settings) -> UrlSigner | None:
    signer = UrlSigner.from_settings(settings.object_storage)
    if signer is None:
        logger.warning(
            "CloudFront is not configured: results are uploaded with signed_url null; set "
            "cloudfront_domain, cloudfront_key_pair_id and cloudfront_private_key_path to sign"
        )
    return signer


def require_outputs_dir(layout: Layout) -> None:
    if not layout.outputs_dir.is_dir():
        raise ConfigError(
            f"outputs_dir {layout.outputs_dir} does not exist or is not a folder: create it or "
            "set syncd.outputs_dir (SYNCD_OUTPUTS_DIR)"
        )


async def run_daemon(
    settings: Settings, signer: UrlSigner | None, load: Callable[[], Settings]
) -> int:
    """The daemon; `load` reads the settings again for a reload."""
    layout = Layout(settings)
    require_outputs_dir(layout)
    journal = Journal(settings.syncd.state_dir)
    metrics = Metrics(settings.syncd)
    try:
        metrics.start()
        async with connected_store(settings, Multiparts(journal)) as store:
            publisher = Publisher(settings, store, signer)
            resigner = Resigner(settings, signer) if signer else None
            notifier = Notifier()
            daemon = Daemon(settings, layout, publisher, journal, notifier, resigner, metrics, load)
            await daemon.run()
    finally:
        metrics.stop()
        journal.close()
    return 0


async def run_sync(
    settings: Settings, signer: UrlSigner | None, exec_dirs: list[Path], again: bool
) -> int:
    layout = Layout(settings)
    results = [layout.for_tree(path) for path in exec_dirs]  # all usage errors before any upload
    stack = contextlib.AsyncExitStack()
    journal = Journal(settings.syncd.state_dir)
    failed = 0
    try:
        store = await stack.enter_async_context(connected_store(settings, Multiparts(journal)))
        # JSON logs are for collectors: keep stderr one JSON object per line.
        publisher = Publisher(
            settings, store, signer, show_progress=settings.syncd.log_format == "text"
        )
        attempts = Attempts(settings, publisher, journal, retries=False)
        for result in results:
            match await attempts.attempt(result, by_hand=True, again=again):
                case Recorded():
                    remote = f"s3://{settings.object_storage.bucket}/{result.remote_path}"
                    print(printable(f"{result.tree} -> {remote}"))
                    continue
                case Held(by):
                    logger.error(
                        "{}: being published by {} right now; try again when it is done",
                        result.name,
                        by,
                    )
                case _:  # the attempt has said why
                    pass
            failed += 1
    finally:
        await stack.aclose()
        journal.close()
    return EXIT_FAILED if failed else 0


def run_mark(settings: Settings, exec_dirs: list[Path]) -> int:
    if settings.syncd.completion == "metadata":
        raise ConfigError(
            "completion is metadata: a result is finished when its metadata file says "
            '"status": "completed" (the Earth2Studio server writes it), and syncd reads no '
            "marker; set syncd.completion: marker to publish results by their markers"
        )
    layout = Layout(settings)
    require_outputs_dir(layout)
    results = [layout.for_tree(path) for path in exec_dirs]  # all usage errors before a marker
    try:
        for result in results:
            result_folder(result.tree)
    except NotAResult as exc:
        raise LayoutError(str(exc)) from None
    for result in results:
        # A stop signal waits for the marker in the making: none is left half made.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            made = mark_finished(result.tree, layout.marker_suffix)
        except OSError as exc:
            remedy = (
                "a folder is in its place: remove it"
                if exc.errno == errno.EISDIR
                else "run syncd mark as the user that writes the results, where their folder "
                "is writable and has space"
            )
            raise OperatorError(
                f"cannot write {printable(str(result.marker))} ({exc.strerror or exc}): {remedy}"
            ) from None
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        print(made)
    return 0


def run_sign(settings: Settings, target: str, expires_in: int | None) -> int:
    signer = UrlSigner.from_settings(settings.object_storage)
    if signer is None:
        raise ConfigError(
            "CloudFront is not configured, so there is nothing to sign with: set "
            "cloudfront_domain, cloudfront_key_pair_id and cloudfront_private_key_path"
        )
    layout = Layout(settings)
    remote_path = layout.to_sign(target)
    lifetime = expires_in or settings.object_storage.signed_url_expires_in
    print(signer.sign(remote_path, lifetime))
    return 0


def run_status(settings: Settings, as_json: bool) -> int:
    records = status.entries(settings)
    if as_json:
        print(json.dumps([status.as_dict(r) for r in records], indent=2))
    else:
        print(status.table(records))
    return 0


async def run_check(settings: Settings, config_file: Path | None) -> int:
    print(f"# config file: {config_file or 'none (defaults and environment)'}")
    print(yaml.safe_dump(redacted(settings), sort_keys=False).rstrip())
    require_enabled(settings)
    signer = UrlSigner.from_settings(settings.object_storage)
    if signer is None:
        print("# CloudFront: not configured; signed_url will be null")
    else:
        storage = settings.object_storage
        source = storage.cloudfront_private_key_path or "from cloudfront_private_key (PEM text)"
        print(
            f"# CloudFront: key {source} (RSA {signer.private_key.key_size} bits), "
            f"key pair {signer.key_pair_id}"
        )
    if (cap := settings.syncd.max_bandwidth) is not None:
        require_no_proxy()
        print(f"# bandwidth: at most {rate_text(cap)} for every upload together")
    require_outputs_dir(Layout(settings))  # what `syncd run` would stop at, found here
    if (error := unusable(settings.syncd.state_dir)) is not None:
        raise error
    Metrics(settings.syncd).check()
    store = open_store(settings.object_storage, None)
    print(f"# bucket: reaching {store.description} (for {CHECK_TIMEOUT:.0f} s at most)...")
    sys.stdout.flush()
    reachable = "check endpoint_url and that the store is up and reachable from here"
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await store.probe()
    except TimeoutError:
        raise TransientError(
            f"{store.description} did not answer within {CHECK_TIMEOUT:.0f} s: {reachable}"
        ) from None
    except SyncdError as exc:
        if exc.permanent:  # it answered: the error names its remedy
            raise
        raise TransientError(f"{exc}: {reachable}") from None
    finally:
        await store.close()
    print(f"# bucket: {store.description} reachable")
    print("# ok: settings valid, bucket reachable")
    return 0


def log_format(args: argparse.Namespace, settings: Settings | None) -> str:
    """The log format of this command: its settings', or when they could not be read, the one
    asked for on its own."""
    if settings is not None:
        return settings.syncd.log_format
    return log_format_asked(args.config, flags_from(args), dict(os.environ))


def run_command(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings, config_file = load_settings(args.config, flags_from(args))
        logs.configure(settings.syncd)
        for notice in settings.notices:
            logger.warning(notice)
        if args.command == "check":
            return asyncio.run(run_check(settings, config_file))
        if args.command == "status":
            return run_status(settings, args.json)
        if args.command == "mark":
            return run_mark(settings, args.exec_dirs)
        if args.command == "sign":
            return run_sign(settings, args.target, args.expires_in)
        require_enabled(settings)
        raise_open_files()
        signer = signer_for(settings)
        if args.command == "sync":
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):  # ended like Ctrl-C
                signal.signal(sig, interrupt)
            if hung_up_while_starting():
                raise Interrupted(signal.SIGHUP)
            return asyncio.run(run_sync(settings, signer, args.exec_dirs, args.force))
        for sig in STOP_SIGNALS:  # until the daemon's own handlers take over
            signal.signal(sig, interrupt)
        flags = flags_from(args)

        def reload() -> Settings:
            """The settings a reload reads, refused where a start refuses them."""
            again = load_settings(args.config, flags)[0]
            require_enabled(again)
            return again

        return asyncio.run(run_daemon(settings, signer, reload))
    except SyncdError as exc:
        logs.plain("ERROR", f"syncd: error: {exc}", log_format(args, settings))
        return EXIT_CONFIG if isinstance(exc, (ConfigError, LayoutError)) else EXIT_FAILED
    except KeyboardInterrupt as exc:
        sig = exc.signal if isinstance(exc, Interrupted) else signal.SIGINT
        if args.command == "run":  # stopped while starting: nothing was taken on yet
            logs.plain("INFO", f"{sig.name} received: stopping", log_format(args, settings))
            return 0
        later = (
            "; results not yet recorded are published by the daemon if they are marked, or by "
            "syncd sync again"
        )
        logs.plain(
            "WARNING",
            f"syncd: interrupted by {sig.name}{later if args.command == 'sync' else ''}",
            log_format(args, settings),
        )
        return EXIT_INTERRUPTED + sig - signal.SIGINT


def main() -> None:
    try:
        code = run_command()
        logger.complete()
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `syncd status | head`: the reader has all it wanted
        code = 0
    # obstore's Rust runtime can abort the process while the interpreter tears down (see
    # field notes); everything is flushed and closed by now, so leave without teardown.
    os._exit(code)
