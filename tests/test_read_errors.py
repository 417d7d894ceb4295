"""Each error line names the real cause: permissions, a full disk, a read-only disk, a file in the way.

Real conditions only: a file with mode 000 read by a process the permissions apply to (the tests
run as root, which reads any file, so the reader is a subprocess that first gives up root's
right to ignore file permissions, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; as any other user it
runs as it is),
a small tmpfs filled up or mounted read-only (``tests/pipeline/test_full_disk.py``'s fixture),
and a file where the backbone cache folder should be. The lines are built in one place,
:mod:`AnomalyCLIP_lib.errors`; these tests compare them with the wording written out here.
"""

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from AnomalyCLIP_lib import pretrained
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from deploy.manifest import MANIFEST_NAME
from generate_dataset_json.indexer import write_meta
from tests.pipeline.test_full_disk import fill, mount_disk  # noqa: F401 (the fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
READ_FIX = "fix its permissions (chmod/chown) or run as a user who may read it"

# One subprocess, without root's permission override, reads every file (one case per line of output).
CASES = {  # (import, call)
    "meta.json": ("import dataset", "dataset.read_meta({root!r})"),
    "checkpoint": ("from AnomalyCLIP_lib.safe_load import load_tensors", "load_tensors({file!r}, 'checkpoint')"),
    "backbone": ("from AnomalyCLIP_lib.factory import read_state_dict", "read_state_dict({file!r})"),
    "thresholds.json": ("from pipeline.thresholds import load_thresholds", "load_thresholds({file!r})"),
    "export --thresholds": ("from deploy.export import read_thresholds", "read_thresholds({file!r})"),
    "export manifest": ("from deploy.manifest import read_manifest", "read_manifest({root!r})"),
    "image": ("from AnomalyCLIP_lib.images import read_image", "read_image({file!r})"),
}
EXPECTED = {
    "meta.json": "permission denied reading {file}: " + READ_FIX,
    "checkpoint": "permission denied reading checkpoint {file}: " + READ_FIX,
    "backbone": "permission denied reading backbone checkpoint {file}: " + READ_FIX,
    "thresholds.json": "permission denied reading thresholds file {file}: " + READ_FIX,
    "export --thresholds": "permission denied reading --thresholds {file}: " + READ_FIX,
    "export manifest": "permission denied reading {file}: " + READ_FIX,
    "image": "permission denied reading image file {file}: " + READ_FIX,
}


PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _without_permission_override() -> None:
    """In the child before exec: root keeps its uid but loses the capabilities that bypass file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_unprivileged(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python args`` in the repository where file permissions hold; skip where that cannot be arranged."""
    if not sys.platform.startswith("linux"):
        pytest.skip("file permissions are arranged with Linux capabilities here")
    root = os.geteuid() == 0
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO_ROOT)}
    try:
        return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, preexec_fn=_without_permission_override if root else None)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"cannot drop root's permission override (CAP_DAC_OVERRIDE) here: {exc}")


def _files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """``case -> (root passed, file made unreadable)``, each file valid of its kind."""
    made = {}
    for case in CASES:
        root = folder / case.replace(" ", "_").replace(".", "_")
        root.mkdir()
        if case == "meta.json":
            file = root / "meta.json"
            file.write_text(json.dumps({"test": {}}))
        elif case in ("checkpoint", "backbone"):
            file = root / "model.pth"
            torch.save({"w": torch.zeros(1)}, file)
        elif case in ("thresholds.json", "export --thresholds"):
            file = root / "thresholds.json"
            file.write_text(json.dumps({"classes": {"a": {"image_threshold": 0.5}}}))
        elif case == "export manifest":
            file = root / MANIFEST_NAME
            file.write_text("{}")
        else:
            file = root / "a.png"
            Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(file)
        file.chmod(0o000)
        made[case] = (root, file)
    return made


@pytest.fixture(scope="module")
def read_unprivileged(tmp_path_factory):
    """``case -> (error line, file)``: every case read once by one process that file modes apply to."""
    made = _files(tmp_path_factory.mktemp("unreadable"))
    lines = ["import sys", "from pipeline.cli import run_cli"]
    for case, (root, file) in made.items():
        imports, call = CASES[case]
        lines += [imports, f"print({case!r}, file=sys.stderr)",
                  f"run_cli(lambda _: ({call.format(root=str(root), file=str(file))}, 0)[1])"]
    completed = run_unprivileged(["-c", "\n".join(lines)])
    assert "Traceback" not in completed.stderr, completed.stderr
    got, case = {}, None
    for line in completed.stderr.splitlines():
        if line in CASES:
            case = line
        elif line.startswith("error: ") and case is not None:
            got[case] = line.removeprefix("error: ")
    return {case: (got.get(case), file) for case, (_, file) in made.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_permission_denied_on_read_names_permissions(read_unprivileged, case):
    line, file = read_unprivileged[case]
    assert line == EXPECTED[case].format(file=file)


def test_unreadable_image_in_test_one_example_is_one_permission_line(tmp_path):
    """The CLI itself, before any model loads: not "corrupt or not an image"."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(images / name)
    (images / "b.png").chmod(0o000)
    checkpoint = tmp_path / "prompts.pth"
    checkpoint.write_bytes(b"")
    completed = run_unprivileged(["test_one_example.py", "--image_path", str(images), "--checkpoint_path",
                                  str(checkpoint), "--save_path", str(tmp_path / "out")])
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: permission denied reading image file {images / 'b.png'}: {READ_FIX}"], \
        completed.stderr
    assert completed.returncode == 2


def test_unwritable_dataset_folder_names_the_folder_permissions(tmp_path):
    """The indexer writing meta.json into a folder no one may write."""
    root = tmp_path / "data"
    root.mkdir()
    root.chmod(0o555)
    code = ("from pathlib import Path; from pipeline.cli import run_cli; "
            "from generate_dataset_json.indexer import write_meta; "
            f"run_cli(lambda _: (write_meta(Path({str(root)!r}), {{'test': {{}}}}), 0)[1])")
    completed = run_unprivileged(["-c", code])
    assert completed.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {root / 'meta.json'}: permission denied: fix the folder's permissions (chmod/chown) "
        "or choose a folder you can write to"), completed.stderr


def test_full_disk_while_indexing_says_free_space(mount_disk):  # noqa: F811 (the fixture)
    disk = mount_disk(64 * 1024)
    fill(disk)
    with pytest.raises(AnomalyCLIPError) as raised:
        write_meta(disk, {"test": {"a": [{"img_path": "x" * 100}] * 200}})
    assert str(raised.value) == f"cannot write {disk / 'meta.json'}: the disk is full: free space there or choose " \
                                "another folder"
    assert not (disk / "meta.json").exists()


def test_read_only_disk_while_indexing_says_read_only(mount_disk):  # noqa: F811 (the fixture)
    disk = mount_disk(64 * 1024, read_only=True)
    with pytest.raises(AnomalyCLIPError) as raised:
        write_meta(disk, {"test": {}})
    assert str(raised.value) == (f"cannot write {disk / 'meta.json'}: the folder is on a read-only file system: "
                                 "choose a writable folder")


def test_backbone_cache_that_is_a_file_says_so(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv(pretrained.CACHE_ENV_VAR, str(cache))
    with pytest.raises(AnomalyCLIPError) as raised:
        pretrained.download("ViT-L/14@336px")
    assert str(raised.value) == (
        f"cannot create the backbone cache folder {cache} (--download_root, else ${pretrained.CACHE_ENV_VAR}, else "
        f"{pretrained.DEFAULT_CACHE_DIR}): a file of that name is in the way where a folder is needed: choose "
        "another path")


@pytest.mark.deploy
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_full_disk_during_export_says_free_space(mount_disk, tiny_clip_state, tiny_model, tmp_path, capsys,  # noqa: F811
                                                 fmt):
    pytest.importorskip("onnx")
    if fmt == "openvino":
        pytest.importorskip("openvino")
    from deploy import export
    from deploy.manifest import GRAPH_STEM
    from pipeline.cli import run_cli
    from tests.deploy_helpers import TINY_SIZE, random_prompt_learner, save_prompt_checkpoint

    torch.save(tiny_clip_state, tmp_path / "backbone.pt")
    save_prompt_checkpoint(random_prompt_learner(tiny_model), tmp_path / "prompts.pth")
    disk = mount_disk(256 * 1024)
    fill(disk)
    argv = ["--checkpoint_path", str(tmp_path / "prompts.pth"), "--backbone", str(tmp_path / "backbone.pt"),
            "--image_size", str(TINY_SIZE), "--features_list", "6", "24", "--format", fmt, "--out", str(disk / "out")]
    assert run_cli(export.main, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    graph = disk / "out" / (f"{GRAPH_STEM}.onnx" if fmt == "onnx" else f"{GRAPH_STEM}.xml")
    assert errors == [f"error: cannot write {graph}: the disk is full: free space there or choose another folder"]
    assert sorted(path.name for path in disk.rglob("*")) == ["filler"]
