"""The layout contract: which paths are markers, where metadata and objects go."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest

from syncd.config import load_settings
from syncd.layout import Layout, LayoutError
from syncd.tree import tree_files


@pytest.fixture
def layout(tmp_path) -> Layout:
    environ = {"SYNCD_OUTPUTS_DIR": str(tmp_path / "outputs")}
    return Layout(load_settings(environ=environ)[0])


@pytest.mark.parametrize(
    ("marker", "rel", "metadata", "remote_path"),
    [
        ("exec_1_a.done", "exec_1_a", "exec_1_a.json", "outputs/exec_1_a"),
        ("wf/exec_1_a.done", "wf/exec_1_a", "wf/exec_1_a.json", "outputs/wf/exec_1_a"),
    ],
)
def test_markers_map_to_their_result(layout, marker, rel, metadata, remote_path):
    result = layout.for_marker(layout.outputs_dir / marker)
    assert result is not None
    assert result.tree == layout.outputs_dir / rel
    assert result.metadata == layout.outputs_dir / metadata
    assert result.remote_path == remote_path
    assert result.key("results.zarr/.zgroup") == f"{remote_path}/results.zarr/.zgroup"


@pytest.mark.parametrize(
    "path",
    [
        "exec_1_a.json",  # metadata, not a marker
        "exec_.done",  # no exec id
        "other_1_a.done",  # not an exec result
        "a/b/exec_1_a.done",  # deeper than one workflow folder
        "../exec_1_a.done",  # outside outputs_dir
        "wf/../../exec_1_a.done",  # outside outputs_dir, by a detour
        "exec_1_a/.done",  # inside a tree
        "exec_1_a/exec_2_b.done",  # inside a tree, named like a marker
        ".syncd-claims/exec_1_a.done",  # a hidden folder is not a workflow folder
        ".done",  # the suffix alone
    ],
)
def test_other_paths_are_not_markers(layout, path):
    assert layout.for_marker(layout.outputs_dir / path) is None


def test_scan_finds_markers_at_both_levels_only(layout):
    out = layout.outputs_dir
    for path in ["exec_1_a.done", "wf/exec_2_b.done", "wf/deeper/exec_3_c.done", "exec_4_d/x.done"]:
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text("")
    assert [r.rel.as_posix() for r in layout.signalled()] == ["exec_1_a", "wf/exec_2_b"]


def test_command_line_folder_must_be_a_result_under_outputs_dir(layout, tmp_path):
    (layout.outputs_dir / "wf" / "exec_1_a").mkdir(parents=True)
    assert layout.for_tree(layout.outputs_dir / "wf" / "exec_1_a").remote_path == (
        "outputs/wf/exec_1_a"
    )
    with pytest.raises(LayoutError, match="is not a result folder"):
        layout.for_tree(layout.outputs_dir / "wf")
    with pytest.raises(LayoutError, match="is not under outputs_dir"):
        layout.for_tree(tmp_path / "exec_1_a")


def test_tree_files_lists_names_with_spaces_and_unicode(layout):
    result = layout.result(PurePosixPath("exec_1_a"))
    names = ["a b.bin", "é/ü #1.bin", "q?%+.bin"]
    for name in names:
        (result.tree / name).parent.mkdir(parents=True, exist_ok=True)
        (result.tree / name).write_bytes(name.encode())
    files = list(tree_files(result))
    assert [(f.rel, f.size) for f in files] == sorted((n, len(n.encode())) for n in names)


def test_names_with_special_characters_upload_and_record(workspace):
    ws = workspace
    files = {"a b.bin": b"1", "é/ü #1.bin": b"22", "q?%+.bin": b"333"}
    ws.result("exec_1_abcdef01", files)

    assert ws.sync("exec_1_abcdef01").returncode == 0

    assert ws.objects() == {f"outputs/exec_1_abcdef01/{k}": v for k, v in files.items()}
    recorded = json.loads(ws.metadata_path("exec_1_abcdef01").read_text())["output_files"]
    assert sorted(f["path"] for f in recorded) == sorted(f"exec_1_abcdef01/{k}" for k in files)


@pytest.mark.parametrize(
    ("template", "path", "rel"),
    [
        ("metadata_{workflow}:{exec}.json", "metadata_wf:exec_1_a.json", "wf/exec_1_a"),
        ("metadata_{workflow}:{exec}.json", "metadata_:exec_1_a.json", "exec_1_a"),
        ("metadata_{workflow}:{exec}.json", "metadata_a:b:exec_1_a.json", "a:b/exec_1_a"),
        ("metadata_{workflow}:{exec}.json", "metadata_..:exec_1_a.json", None),
        ("metadata_{workflow}:{exec}.json", "metadata_wf:exec_.json", None),
        ("metadata_{workflow}:{exec}.json", "metadata_wf:exec_1_a.json.tmp", None),
        ("metadata_{workflow}:{exec}.json", "wf/metadata_wf:exec_1_a.json", None),
        ("{exec_path}.json", "wf/exec_1_a.json", "wf/exec_1_a"),
        ("{exec_path}.json", "exec_1_a.json", "exec_1_a"),
        ("{exec_path}.json", "exec_1_a/exec_2_b.json", None),
        ("meta/{workflow}/{exec}.{workflow}.json", "meta/wf/exec_1_a.wf.json", "wf/exec_1_a"),
        ("meta/{workflow}/{exec}.{workflow}.json", "meta/wf/exec_1_a.other.json", None),
    ],
)
def test_a_metadata_file_names_its_result(tmp_path, template, path, rel):
    environ = {
        "SYNCD_OUTPUTS_DIR": str(tmp_path / "outputs"),
        "SYNCD_METADATA_FILE": template,
        "SYNCD_COMPLETION": "metadata",
    }
    layout = Layout(load_settings(environ=environ)[0])
    result = layout.for_metadata(layout.outputs_dir / path)
    assert (result.rel.as_posix() if result else None) == rel
    if result is not None:
        assert result.metadata == layout.outputs_dir / path
        assert result.signal == result.metadata
