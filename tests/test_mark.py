"""`syncd mark` and `syncd.mark_finished`: a workflow says its result is finished, and the
daemon publishes it; a path that is no result is refused with nothing created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SYNCD
from tests.servers import wait_until
from tests.test_client import WITHOUT_DAEMON


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_syncd_mark_finishes_results_the_daemon_then_publishes(moto_workspace):
    ws = moto_workspace
    ws.result("exec_1_abcdef01", {"a": b"a"})
    ws.result("wf/exec_2_abcdef02", {"b": b"b"})
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")

    done = ws.syncd(
        "mark",
        "--config",
        str(ws.config),
        "outputs/exec_1_abcdef01",
        str(ws.outputs / "wf/exec_2_abcdef02"),
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        str(ws.outputs / "exec_1_abcdef01.done"),
        str(ws.outputs / "wf/exec_2_abcdef02.done"),
    ]
    wait_until(
        lambda: ws.recorded("exec_1_abcdef01") and ws.recorded("wf/exec_2_abcdef02"),
        what="both marked results published",
    )
    assert ws.objects() == {"outputs/exec_1_abcdef01/a": b"a", "outputs/wf/exec_2_abcdef02/b": b"b"}
    assert not [p for p in ws.outputs.rglob(".*") if p.name != ".syncd-claims"]  # no temp file
    assert daemon.terminate() == 0


def test_a_path_that_is_no_result_is_refused_and_nothing_is_marked(moto_workspace, tmp_path):
    ws = moto_workspace
    ws.result("exec_1_abcdef01", {"a": b"a"})
    (ws.outputs / "exec_9_file").write_text("")
    (ws.outputs / "exec_8_link").symlink_to(ws.outputs / "exec_1_abcdef01")
    (ws.outputs / "wf" / "deeper" / "exec_7_abcdef07").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere" / "exec_6_abcdef06"
    elsewhere.mkdir(parents=True)
    config = str(ws.config)
    before = listing(ws.root)

    for path, error in (
        ("outputs/exec_5_missing", "outputs/exec_5_missing does not exist"),
        ("outputs/exec_9_file", "outputs/exec_9_file is not a folder"),
        ("outputs/exec_8_link", f"{ws.outputs}/exec_8_link is a symlink: syncd publishes only"),
        ("outputs/wf", "outputs/wf is not a result folder: expected"),
        ("outputs/wf/deeper/exec_7_abcdef07", "outputs/wf/deeper/exec_7_abcdef07 is not a result"),
        (str(elsewhere), f"{elsewhere} is not under outputs_dir {ws.outputs}"),
    ):
        done = ws.syncd("mark", "--config", config, "outputs/exec_1_abcdef01", path)
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"syncd: error: {error}"), line
        assert listing(ws.root) == before  # not even the good one's marker


def test_with_completion_metadata_syncd_mark_says_what_finishes_a_result(moto_workspace):
    ws = moto_workspace
    ws.settings["syncd"]["completion"] = "metadata"
    ws.result("exec_1_abcdef01", {"a": b"a"})

    done = ws.syncd("mark", "--config", str(ws.config), "outputs/exec_1_abcdef01")

    assert done.returncode == 2
    assert done.stderr == (
        "syncd: error: completion is metadata: a result is finished when its metadata file says "
        '"status": "completed" (the Earth2Studio server writes it), and syncd reads no marker; '
        "set syncd.completion: marker to publish results by their markers\n"
    )
    assert not (ws.outputs / "exec_1_abcdef01.done").exists()


def test_a_marker_that_cannot_be_written_is_one_line_and_exit_1(moto_workspace, tmpfs):
    ws = moto_workspace
    outputs = tmpfs.mount(ws.outputs)
    ws.result("exec_1_abcdef01", {"a": b"a"})
    tmpfs.read_only(outputs)

    done = ws.syncd("mark", "--config", str(ws.config), "outputs/exec_1_abcdef01")

    assert done.returncode == 1
    assert done.stderr == (
        f"syncd: error: cannot write {ws.outputs}/exec_1_abcdef01.done (Read-only file system): "
        "run syncd mark as the user that writes the results, where their folder is writable "
        "and has space\n"
    )
    assert listing(outputs) == ["exec_1_abcdef01", "exec_1_abcdef01.json", "exec_1_abcdef01/a"]


def test_mark_finished_works_with_the_client_alone_and_the_daemon_publishes(moto_workspace):
    """A workflow with `syncd[client]` (none of the daemon's packages) marks its result as
    root would: the marker belongs to the folder's owner, as the rest of the result."""
    ws = moto_workspace
    tree = ws.result("wf/exec_3_abcdef03", {"c": b"c"})
    os.chown(ws.outputs / "wf", 65534, 65534)
    daemon = ws.daemon()
    daemon.wait_log("syncd watching")
    mark = WITHOUT_DAEMON + (
        "import syncd\nprint(syncd.mark_finished(sys.argv[1]))\n"
        "try:\n    syncd.mark_finished(sys.argv[1] + '/nothing')\n"
        "except ValueError as exc:\n    print(exc)\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", mark, str(tree)], capture_output=True, text=True, check=True
    )

    marker = ws.outputs / "wf/exec_3_abcdef03.done"
    assert done.stdout.splitlines() == [
        str(marker),
        f"{tree}/nothing is not a result folder: its name must start with exec_",
    ]
    assert (marker.stat().st_uid, marker.stat().st_gid) == (65534, 65534)
    wait_until(lambda: ws.recorded("wf/exec_3_abcdef03"), what="published")
    assert ws.objects() == {"outputs/wf/exec_3_abcdef03/c": b"c"}
    assert daemon.terminate() == 0


def test_only_a_folder_the_daemon_would_publish_is_marked(moto_workspace, tmp_path):
    """Inside another result, in a hidden folder, in a workflow folder that is a symlink, a
    name no key can hold: refused in one line, escaped, with nothing created anywhere."""
    ws = moto_workspace
    ws.result("exec_1_abcdef01", {"exec_2_abcdef02/a": b"a"})
    ws.result(".hidden/exec_3_abcdef03", {"a": b"a"}, metadata=None)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "exec_4_abcdef04").mkdir(parents=True)
    (ws.outputs / "wflink").symlink_to(elsewhere)
    (ws.outputs / "exec_5_\x1b[31mred\nline").mkdir()
    (ws.outputs / os.fsdecode(b"exec_6_\xff")).mkdir()
    config = str(ws.config)
    before = listing(ws.root), listing(elsewhere)

    for path, error in (
        ("exec_1_abcdef01/exec_2_abcdef02", "is not a result folder: expected"),
        (".hidden/exec_3_abcdef03", "is not a result folder: expected"),
        (
            "wflink/exec_4_abcdef04",
            f"workflow folder {ws.outputs}/wflink is a symlink; syncd never follows one",
        ),
        (
            "exec_5_\x1b[31mred\nline",
            f"result folder {ws.outputs}/exec_5_\\x1b[31mred\\nline cannot be uploaded: its name "
            "holds control characters: rename the folder",
        ),
        (
            os.fsdecode(b"exec_6_\xff"),
            f"result folder {ws.outputs}/exec_6_\\xff cannot be uploaded: its name is not valid "
            "UTF-8",
        ),
    ):
        done = ws.syncd("mark", "--config", config, str(ws.outputs / path))
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith("syncd: error: ") and error in line, line
        assert (listing(ws.root), listing(elsewhere)) == before


def test_a_relative_path_through_a_symlinked_outputs_dir_is_marked(moto_workspace, tmp_path):
    """The shell's working folder is the real one; outputs_dir may be set as a symlink."""
    ws = moto_workspace
    ws.result("wf/exec_1_abcdef01", {"a": b"a"})
    link = tmp_path / "outlink"
    link.symlink_to(ws.outputs)
    ws.settings["syncd"]["outputs_dir"] = str(link)

    done = subprocess.run(
        [*SYNCD, "mark", "--config", str(ws.config), "exec_1_abcdef01"],
        cwd=link / "wf",
        env=ws.env(),
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{link}/wf/exec_1_abcdef01.done\n"
    assert (ws.outputs / "wf/exec_1_abcdef01.done").is_file()


def test_a_marker_with_the_longest_name_or_a_folder_in_its_place(moto_workspace):
    ws = moto_workspace
    longest = "exec_1_" + "a" * (255 - len("exec_1_.done"))  # the marker's name is 255 bytes
    ws.result(longest, {"a": b"a"})
    ws.result("exec_2_abcdef02", {"a": b"a"})
    (ws.outputs / "exec_2_abcdef02.done").mkdir()

    made = ws.syncd("mark", "--config", str(ws.config), f"outputs/{longest}")
    folder = ws.syncd("mark", "--config", str(ws.config), "outputs/exec_2_abcdef02")

    assert made.returncode == 0, made.stderr
    assert (ws.outputs / f"{longest}.done").is_file()
    synced = ws.sync(longest)  # its metadata's name is 255 bytes too
    assert synced.returncode == 0, synced.stderr
    assert ws.recorded(longest)
    assert folder.returncode == 1
    assert folder.stderr == (
        f"syncd: error: cannot write {ws.outputs}/exec_2_abcdef02.done (Is a directory): a "
        "folder is in its place: remove it\n"
    )
    assert not [p for p in ws.outputs.iterdir() if p.name.endswith(".syncd.tmp")]
