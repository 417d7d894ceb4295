# ruff: noqa: F811 - the fixtures of tests/test_user_errors.py are imported, then requested by name
"""Silent wrong results (issue 22, item 1, and the hunt beyond it): inputs that used to give a confident wrong
answer are refused in one line, through the real command-line tools.

Each CLI runs through :func:`pipeline.cli.run_cli` in this process, on the tiny backbone and the synthetic datasets
of ``tests/conftest.py``, with the shared inputs of ``tests/test_user_errors.py``; the indexer runs as a
subprocess. Expected values (SHA-256s, provenance) are computed here with :mod:`hashlib`, not with the code under
test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dataset import AnomalyDataset
from deploy import export
from tests.conftest import E2E_IMAGE_SIZE, REPO_ROOT
from tests.test_user_errors import base_argv, error_line, paths, refused, run  # noqa: F401


@pytest.fixture(scope="module")
def onnx_export(paths, design_args, tmp_path_factory) -> Path:
    """An ONNX export of the shared checkpoint (56 px, layers 6 24, sigma 4), without thresholds."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from pipeline.cli import run_cli

    out = tmp_path_factory.mktemp("export") / "onnx"
    assert run_cli(export.main, ["--checkpoint_path", str(paths["checkpoint"]), "--out", str(out), "--format", "onnx",
                                 *design_args]) == 0
    return out


def runtime_argv(cli: str, paths: dict[str, Path], model: Path, out: Path) -> list:
    """A valid ``--runtime onnxruntime`` command line of test.py or test_one_example.py, without model flags."""
    source = ["--data_path", paths["target"], "--num_workers", 0] if cli == "test" else ["--image_path", paths["image"]]
    return [*source, "--save_path", out, "--runtime", "onnxruntime", "--model", model]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_byte(path: Path, where: float = 0.75) -> None:
    """Change one byte deep inside ``path`` (weights of a graph: it still loads, and scores otherwise)."""
    data = bytearray(path.read_bytes())
    index = int(len(data) * where)
    data[index] ^= 0x40
    path.write_bytes(bytes(data))


def _edit_manifest(model: Path, edit) -> None:
    manifest = json.loads((model / "anomalyclip.json").read_text())
    edit(manifest)
    (model / "anomalyclip.json").write_text(json.dumps(manifest))


# --- 1. the export's graph files ----------------------------------------------------------------


@pytest.fixture(scope="module")
def openvino_export(onnx_export, tmp_path_factory) -> Path:
    """The ONNX export converted to OpenVINO IR, with a manifest whose SHA-256s are computed here."""
    out = tmp_path_factory.mktemp("openvino") / "model"
    out.mkdir()
    export.onnx_to_openvino(onnx_export / "anomalyclip.onnx", out / "anomalyclip.xml")
    files = ["anomalyclip.xml", "anomalyclip.bin"]
    manifest = json.loads((onnx_export / "anomalyclip.json").read_text())
    manifest.update(format="openvino", graph=files[0], files=files,
                    files_sha256={name: _sha(out / name) for name in files})
    (out / "anomalyclip.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.deploy
@pytest.mark.deploy
def test_export_records_the_sha256_of_its_graph(onnx_export):
    manifest = json.loads((onnx_export / "anomalyclip.json").read_text())
    assert manifest["files_sha256"] == {"anomalyclip.onnx": _sha(onnx_export / "anomalyclip.onnx")}


@pytest.mark.deploy
@pytest.mark.parametrize("runtime, graph_file", [("onnxruntime", "anomalyclip.onnx"), ("openvino", "anomalyclip.bin"),
                                                 ("openvino", "anomalyclip.xml")])
@pytest.mark.deploy
def test_replaced_graph_file_is_refused(runtime, graph_file, paths, onnx_export, openvino_export,
                                       tmp_path, capsys):
    """A graph file replaced after the export was scored under the manifest's name; now refused at load."""
    source = onnx_export if graph_file.endswith(".onnx") else openvino_export
    model = shutil.copytree(source, tmp_path / "model")
    if graph_file.endswith(".xml"):  # another valid IR: the output names swapped
        xml = (model / graph_file).read_text()
        (model / graph_file).write_text(xml.replace('names="scores"', 'names="tmp"').replace(
            'names="maps"', 'names="scores"').replace('names="tmp"', 'names="maps"') + "\n")
    else:
        _flip_byte(model / graph_file)
    out = tmp_path / "out"
    argv = [*runtime_argv("one", paths, model, out)]
    argv[argv.index("--runtime") + 1] = runtime
    line = refused("one", argv, capsys)
    assert line == (f"error: {model / graph_file} is not the file export.py wrote (its SHA-256 differs from the one "
                    f"recorded in {model / 'anomalyclip.json'}): it was replaced or damaged; re-run export.py")
    assert not out.exists()


@pytest.mark.deploy
@pytest.mark.deploy
def test_manifest_without_hashes_is_accepted_with_a_warning(paths, onnx_export, tmp_path, capsys,
                                                             caplog):
    """An export written before the hashes were recorded still runs (refusing would break every earlier export),
    and says its files are not checked."""
    model = shutil.copytree(onnx_export, tmp_path / "model")
    _edit_manifest(model, lambda manifest: manifest.pop("files_sha256"))
    with caplog.at_level(logging.WARNING):
        status, stderr = run("one", runtime_argv("one", paths, model, tmp_path / "out"), capsys)
    assert status == 0, stderr[-3000:]
    assert "records no SHA-256 of its graph files" in caplog.text + stderr
    assert (tmp_path / "out" / "predictions.csv").is_file()


@pytest.mark.deploy
@pytest.mark.deploy
def test_manifest_hash_field_without_the_graph_is_refused(paths, onnx_export, tmp_path, capsys):
    model = shutil.copytree(onnx_export, tmp_path / "model")
    _edit_manifest(model, lambda manifest: manifest.update(files_sha256={"other.onnx": "0" * 64}))
    line = refused("one", runtime_argv("one", paths, model, tmp_path / "out"), capsys)
    assert line == (f"error: {model / 'anomalyclip.json'}: 'files_sha256' does not give a SHA-256 for each of "
                    "anomalyclip.onnx; it is damaged: re-run export.py")


# --- 4. threshold values ------------------------------------------------------------------------


def _run_provenance(paths, tiny_clip_files, **changes) -> dict:
    """The provenance of the shared runs (layers 6 24, 56 px, sigma 4), hashed here."""
    record = {"checkpoint_sha256": _sha(paths["checkpoint"]), "backbone_sha256": _sha(tiny_clip_files[0]),
              "image_size": E2E_IMAGE_SIZE, "sigma": 4.0, "features_list": [6, 24], "feature_map_layer": 0}
    return {**record, **changes}


THRESHOLD_VALUES = [
    ("image a bool", {"image_threshold": True}, "has an invalid image_threshold True (a number is needed"),
    ("image a string", {"image_threshold": "0.5"}, "has an invalid image_threshold '0.5'"),
    ("image NaN", {"image_threshold": float("nan")}, "has an invalid image_threshold nan"),
    ("pixel Infinity", {"pixel_threshold": float("inf")}, "has an invalid pixel_threshold inf"),
    ("pixel a bool", {"pixel_threshold": False}, "has an invalid pixel_threshold False"),
    ("image negative", {"image_threshold": -0.1}, "has image_threshold -0.1, outside [0, 1] where image scores are "
                                                  "probabilities, so it would flag everything or nothing"),
    ("image above 1", {"image_threshold": 1.5}, "has image_threshold 1.5, outside [0, 1]"),
    ("pixel above 2 layers", {"pixel_threshold": 2.5}, "has pixel_threshold 2.5, outside [0, 2] where pixel maps sum "
                                                       "one value in [0, 1] per layer used"),
    ("pixel above 1 layer", {"pixel_threshold": 1.5, "provenance": {"feature_map_layer": 1}},
     "has pixel_threshold 1.5, outside [0, 1]"),
    ("pixel negative", {"pixel_threshold": -0.5}, "has pixel_threshold -0.5, outside [0, 2]"),
]


@pytest.mark.parametrize("case, change, expected", THRESHOLD_VALUES,
                         ids=[case.replace(" ", "_") for case, _, _ in THRESHOLD_VALUES])
def test_threshold_values_the_method_cannot_produce_are_refused(case, change, expected, paths, design_args,
                                                                tiny_clip_files, tmp_path, capsys):
    """Before: True was taken as 1.0, a value above 1 flagged no image, a negative one every image, silently."""
    change = dict(change)
    entry = {"image_threshold": 0.5, "pixel_threshold": 1.0, "method": "f1",
             "provenance": _run_provenance(paths, tiny_clip_files, **change.pop("provenance", {})), **change}
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"version": 1, "classes": {"blobs": entry}}))
    for cli in ("one", "export"):
        out = tmp_path / f"out_{cli}"
        line = refused(cli, [*base_argv(cli, paths, design_args, out), "--thresholds", thresholds], capsys)
        assert line.startswith(f"error: thresholds file {thresholds}: class 'blobs' ") and expected in line, line
        assert "write it again with test.py or test_one_example.py --calibrate" in line
        assert not out.exists()


def test_pixel_threshold_within_the_layers_summed_is_taken(paths, design_args, tiny_clip_files, tmp_path, capsys):
    """1.9 is a valid pixel threshold for maps summing two layers (6 and 24): not refused as "above 1"."""
    thresholds = tmp_path / "thresholds.json"
    entry = {"image_threshold": 0.0, "pixel_threshold": 1.9, "method": "f1",
             "provenance": _run_provenance(paths, tiny_clip_files)}
    thresholds.write_text(json.dumps({"version": 1, "classes": {"blobs": entry}}))
    out = tmp_path / "out"
    status, stderr = run("one", [*base_argv("one", paths, design_args, out), "--thresholds", thresholds], capsys)
    assert status == 0, stderr[-3000:]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 1 and rows[0]["verdict"] == "anomalous"  # score >= 0.0 always


@pytest.mark.deploy
@pytest.mark.parametrize("entry, expected", [
    ({"image_threshold": True, "pixel_threshold": 0.5}, "class 'blobs' has an invalid image_threshold True"),
    ({"image_threshold": 0.5, "pixel_threshold": 2.5}, "class 'blobs' has pixel_threshold 2.5, outside [0, 2]"),
], ids=["bool", "pixel_above_the_exports_layers"])
@pytest.mark.deploy
def test_thresholds_in_an_export_manifest_are_checked(entry, expected, paths, onnx_export, tmp_path,
                                                      capsys):
    """Thresholds stored by export.py are checked at load too; without provenance the export's own layers (6 24)
    bound the pixel threshold."""
    model = shutil.copytree(onnx_export, tmp_path / "model")
    _edit_manifest(model, lambda manifest: manifest.update(thresholds={"version": 1, "classes": {"blobs": entry}}))
    line = refused("one", runtime_argv("one", paths, model, tmp_path / "out"), capsys)
    assert line.startswith(f"error: the thresholds in {model / 'anomalyclip.json'}: {expected}"), line


# --- 2. meta.json integrity -----------------------------------------------------------------------


def _dataset_copy(paths, tmp_path) -> tuple[Path, dict]:
    root = shutil.copytree(paths["target"], tmp_path / "data")
    return root, json.loads((root / "meta.json").read_text())


def _refused_by_test(paths, design_args, root: Path, meta: dict, tmp_path, capsys) -> str:
    (root / "meta.json").write_text(json.dumps(meta))
    before = (root / "meta.json").read_bytes()
    out = tmp_path / "out"
    line = refused("test", [*base_argv("test", paths, design_args, out), "--data_path", root], capsys)
    assert line.startswith(f"error: {root / 'meta.json'} would give wrong results: "), line
    assert (root / "meta.json").read_bytes() == before and not out.exists()
    return line


def test_meta_json_listing_an_image_twice_is_refused(paths, design_args, tmp_path, capsys):
    """Counted twice, the image changed every metric of its class (a duplicated normal image: image AUROC)."""
    root, meta = _dataset_copy(paths, tmp_path)
    blobs = meta["test"]["blobs"]
    blobs.append(dict(blobs[0]))
    blobs.append(dict(blobs[0], img_path="./" + blobs[0]["img_path"]))  # the same file, written otherwise
    line = _refused_by_test(paths, design_args, root, meta, tmp_path, capsys)
    assert f"image listed twice (1): {blobs[0]['img_path']} (blobs) (3 times)." in line
    assert "An image listed twice counts twice in every metric: list each image once" in line


def test_meta_json_listing_many_images_twice_names_a_few_then_a_count(paths, design_args, tmp_path, capsys):
    root, meta = _dataset_copy(paths, tmp_path)
    meta["test"]["blobs"] = meta["test"]["blobs"] * 2
    line = _refused_by_test(paths, design_args, root, meta, tmp_path, capsys)
    shown = [f"{item['img_path']} (blobs) (2 times)" for item in meta["test"]["blobs"][:5]]
    assert f"image listed twice (6): {', '.join(shown)} and 1 more." in line


def test_meta_json_listing_an_image_as_normal_and_anomalous_is_refused(paths, design_args, tmp_path, capsys):
    root, meta = _dataset_copy(paths, tmp_path)
    blobs = meta["test"]["blobs"]
    anomalous = next(item for item in blobs if item["anomaly"])
    blobs.append(dict(anomalous, anomaly=0, mask_path=""))
    line = _refused_by_test(paths, design_args, root, meta, tmp_path, capsys)
    assert f"image listed both as normal and anomalous (1): {anomalous['img_path']} (blobs)." in line


@pytest.mark.parametrize("where", ["dotdot", "absolute", "mask_dotdot"])
def test_meta_json_path_outside_the_root_is_refused(where, paths, design_args, tmp_path, capsys):
    """``../x.JPG`` or an absolute path elsewhere that does not re-root inside the dataset: read from outside the
    dataset (another copy, another dataset), silently."""
    root, meta = _dataset_copy(paths, tmp_path)
    outside = tmp_path / "elsewhere" / "x.JPG"
    outside.parent.mkdir()
    blobs = meta["test"]["blobs"]
    normal = next(item for item in blobs if not item["anomaly"])
    anomalous = next(item for item in blobs if item["anomaly"])
    shutil.copy(root / normal["img_path"], outside)
    shutil.copy(root / anomalous["mask_path"], tmp_path / "elsewhere" / "x.png")
    if where == "dotdot":
        blobs.append(dict(normal, img_path="../elsewhere/x.JPG"))
    elif where == "absolute":
        blobs.append(dict(normal, img_path=str(outside)))
    else:
        anomalous["mask_path"] = "../elsewhere/x.png"
    line = _refused_by_test(paths, design_args, root, meta, tmp_path, capsys)
    shown = str(tmp_path / "elsewhere" / ("x.png" if where == "mask_dotdot" else "x.JPG"))
    assert f"path outside the dataset root (1): {shown}." in line
    assert "Paths are relative to the dataset root and stay inside it" in line


def test_absolute_path_of_another_copy_reroots_inside_the_root(paths, tmp_path):
    """An absolute path that exists outside the root (the original copy of the dataset) but also re-roots inside
    it is read inside: before, the other copy's file was read."""
    root, meta = _dataset_copy(paths, tmp_path)
    original = paths["target"]
    for items in meta["test"].values():
        for item in items:
            item["img_path"] = str(original / item["img_path"])
    (root / "meta.json").write_text(json.dumps(meta))
    data = AnomalyDataset(str(root), image_size=E2E_IMAGE_SIZE)
    files = [data.image_file(i) for i in range(len(data))]
    assert all(Path(file).is_relative_to(root) for file in files), files


def test_meta_json_with_a_class_listed_twice_is_refused(paths, design_args, tmp_path, capsys):
    """Hunt: JSON keeps the last of two equal keys, so the first list of the class was dropped silently."""
    root, meta = _dataset_copy(paths, tmp_path)
    blobs, first_two = json.dumps(meta["test"]["blobs"]), json.dumps(meta["test"]["blobs"][:2])
    text = json.dumps(meta).replace('"blobs": ' + blobs, f'"blobs": {blobs}, "blobs": {first_two}')
    assert text.count('"blobs": ') == 3  # the train split's, and twice in test
    (root / "meta.json").write_text(text)
    line = refused("test", [*base_argv("test", paths, design_args, tmp_path / "out"), "--data_path", root], capsys)
    assert line.startswith(f"error: {root / 'meta.json'} lists 'blobs' twice in one object, and only the last would "
                           "be read (the first silently dropped): merge them")


def _visa_copy(paths, tmp_path) -> tuple[Path, list[str]]:
    root = shutil.copytree(paths["target"], tmp_path / "visa")
    return root, (root / "split_csv" / "1cls.csv").read_text().splitlines()


def _run_visa_indexer(root: Path) -> tuple[int, str]:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "generate_dataset_json" / "visa.py"), "--root", str(root)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    return done.returncode, done.stderr


def test_indexer_refuses_a_split_file_listing_images_twice_or_outside_the_root(paths, tmp_path):
    """VisA's split file can list an image twice, with both labels, or outside the root: the indexer wrote all of it
    into meta.json. Now one line names them, and the old meta.json is kept."""
    root, rows = _visa_copy(paths, tmp_path)
    normal = next(row for row in rows if ",test,normal," in row)
    anomalous = next(row for row in rows if ",test,anomaly," in row)
    image = anomalous.split(",")[3]
    shutil.copy(root / image, tmp_path / "x.JPG")
    extra = [normal, anomalous.replace(",anomaly,", ",normal,").rsplit(",", 1)[0] + ",",
             "blobs,test,normal,../x.JPG,"]
    (root / "split_csv" / "1cls.csv").write_text("\n".join([*rows, *extra]) + "\n")
    old = (root / "meta.json").read_bytes()
    status, stderr = _run_visa_indexer(root)
    assert status == 2, stderr[-3000:]
    line = error_line("\n".join(line for line in stderr.splitlines() if not line.startswith("WARNING: ")))
    assert "path outside the dataset root (1): ../x.JPG" in line
    assert f"image listed twice (1): {normal.split(',')[3]} (test) (2 times)" in line
    assert f"image listed both as normal and anomalous (1): {image} (test)" in line
    assert (root / "meta.json").read_bytes() == old


# --- 3. folders of images -----------------------------------------------------------------------


def _scored(out: Path) -> list[str]:
    return [row["path"] for row in csv.DictReader((out / "predictions.csv").open())]


def test_symlinked_sub_folders_are_followed_once_without_looping(paths, design_args, tmp_path, capsys):
    """A linked sub-folder was skipped silently (2 of 3 images judged); a link back up must not loop, and a link to
    a folder already read adds nothing."""
    folder, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (folder / "real").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(paths["image"], folder / "real" / "a.JPG")
    shutil.copy(paths["image"], folder / "real" / "b.JPG")
    shutil.copy(paths["image"], elsewhere / "c.JPG")
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (folder / "real" / "up").symlink_to(folder, target_is_directory=True)  # a loop
    (folder / "again").symlink_to(folder / "real", target_is_directory=True)  # read already
    out = tmp_path / "out"
    status, stderr = run("one", [*base_argv("one", paths, design_args, out), "--image_path", folder], capsys)
    assert status == 0, stderr[-3000:]
    scored = sorted(Path(p).relative_to(folder).as_posix() for p in _scored(out))
    assert scored == ["linked/c.JPG", "real/a.JPG", "real/b.JPG"]


def test_unreadable_sub_folder_is_refused(paths, design_args, tmp_path, capsys, monkeypatch):
    """Hunt: rglob skipped a sub-folder it could not list (permission denied) without a word. The denial is
    simulated (tests may run as root, where chmod 000 does not deny)."""
    folder = tmp_path / "images"
    (folder / "locked").mkdir(parents=True)
    shutil.copy(paths["image"], folder / "a.JPG")
    shutil.copy(paths["image"], folder / "locked" / "b.JPG")
    real_iterdir = pathlib.Path.iterdir

    def iterdir(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    out = tmp_path / "out"
    line = refused("one", [*base_argv("one", paths, design_args, out), "--image_path", folder], capsys)
    assert line == (f"error: cannot read the folder {folder / 'locked'} under --image_path (Permission denied): its "
                    "images would be left out; make it readable, or pass a folder without it")
    assert not out.exists()


def test_image_link_pointing_to_nothing_is_refused(paths, design_args, tmp_path, capsys):
    """Hunt: a link named like an image whose target is gone was skipped silently."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(paths["image"], folder / "a.JPG")
    (folder / "b.JPG").symlink_to(tmp_path / "gone.JPG")
    out = tmp_path / "out"
    line = refused("one", [*base_argv("one", paths, design_args, out), "--image_path", folder], capsys)
    assert line == (f"error: 1 link(s) under {folder} with an image's name point to nothing: {folder / 'b.JPG'}; "
                    "fix or remove them, so that no image is left out")


# --- the hunt: JSON files a user may edit -------------------------------------------------------


def test_thresholds_file_listing_a_class_twice_is_refused(paths, design_args, tmp_path, capsys):
    """Hunt: the second entry of a class silently replaced the first."""
    thresholds = tmp_path / "thresholds.json"
    entry = '{"image_threshold": 0.5, "pixel_threshold": 1.0, "method": "f1"}'
    thresholds.write_text(f'{{"version": 1, "classes": {{"blobs": {entry}, "blobs": {entry}}}}}')
    line = refused("one", [*base_argv("one", paths, design_args, tmp_path / "out"), "--thresholds", thresholds],
                   capsys)
    assert line == (f"error: thresholds file {thresholds} lists 'blobs' twice in one object, and only the last would "
                    "be used: keep one")


def test_thresholds_file_of_another_version_is_refused(paths, design_args, tmp_path, capsys):
    """Hunt: a thresholds.json of another layout version was read as this one's."""
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"version": 2, "classes": {"blobs": {"image_threshold": 0.5}}}))
    line = refused("one", [*base_argv("one", paths, design_args, tmp_path / "out"), "--thresholds", thresholds],
                   capsys)
    assert line.startswith(f"error: thresholds file {thresholds} has version 2, this code reads 1")


@pytest.mark.deploy
@pytest.mark.deploy
def test_manifest_listing_a_key_twice_is_refused(paths, onnx_export, tmp_path, capsys):
    """Hunt: a hand-edited manifest with a field twice was read with the last one."""
    model = shutil.copytree(onnx_export, tmp_path / "model")
    text = (model / "anomalyclip.json").read_text()
    (model / "anomalyclip.json").write_text(text.replace('"image_size": 56,', '"image_size": 56, "image_size": 56,', 1))
    line = refused("one", runtime_argv("one", paths, model, tmp_path / "out"), capsys)
    assert line == (f"error: {model / 'anomalyclip.json'} lists 'image_size' twice in one object, and only the last "
                    "would be read: re-run export.py")


def test_overlays_of_an_earlier_run_in_the_image_folder_are_refused(paths, design_args, tmp_path, capsys):
    """Hunt: an earlier run's outputs left in the folder (its --save_path was inside it, the new one is not) were
    judged as parts: overlays scored as images."""
    folder = tmp_path / "images"
    (folder / "earlier").mkdir(parents=True)
    shutil.copy(paths["image"], folder / "a.JPG")
    shutil.copy(paths["image"], folder / "earlier" / "a.JPG.overlay.png")
    shutil.copy(paths["image"], folder / "earlier" / "a.JPG.mask.png")
    out = tmp_path / "out"
    line = refused("one", [*base_argv("one", paths, design_args, out), "--image_path", folder], capsys)
    assert line == (f"error: 2 file(s) under {folder} are overlays or masks an earlier run wrote "
                    f"({folder / 'earlier' / 'a.JPG.mask.png'}, {folder / 'earlier' / 'a.JPG.overlay.png'}), which "
                    "would be judged as parts; move them out of the folder, or pass the folder of the parts alone")
    assert not out.exists()


def test_meta_json_with_two_test_splits_is_refused(paths, design_args, tmp_path, capsys):
    """Hunt: ``test`` and ``Test`` (an original DAGM index merged with a new one): one was read, the other ignored."""
    root, meta = _dataset_copy(paths, tmp_path)
    meta["Test"] = {"weave": meta["test"].pop("weave")}
    (root / "meta.json").write_text(json.dumps(meta))
    line = refused("test", [*base_argv("test", paths, design_args, tmp_path / "out"), "--data_path", root], capsys)
    assert line.startswith(f"error: {root / 'meta.json'} has 2 'test' splits (test, Test), and only one would be "
                           "read: merge them")
