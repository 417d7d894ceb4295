"""User mistakes through the real command-line tools (issue 11): one ``error:`` line, exit status 2, nothing lost.

Each test runs a CLI's ``main(argv)`` through :func:`cli.run_cli` in this process, as the
scripts' ``__main__`` blocks do, on the tiny backbone and the synthetic datasets of
``tests/conftest.py``; the indexer runs as a subprocess. :func:`error_line` is the check every
case shares: no traceback, and stderr holds exactly one line besides progress bars, starting
with ``error:``. ``docs/user-errors.md`` maps every case of the issue to the test that checks it
(here or in the other test files).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from deploy import export
from pipeline import evaluation
from pipeline import prediction as test_one_example
from pipeline import training as train
from pipeline.cli import run_cli
from tests.conftest import REPO_ROOT, one_thread_env

CLIS = {"train": train, "test": evaluation, "one": test_one_example, "export": export}
# A tqdm bar as it lands on a non-terminal stderr: "desc:  33%|###3      | 2/6 [00:00<00:01,  2.96batch/s]".
_PROGRESS = re.compile(r"\[\d+:\d+(:\d+)?[<,][^\]]*\]\s*$")


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a run's stderr; fails on a traceback or on any other line but progress bars."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not _PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def run(cli: str, argv: list, capsys) -> tuple[int, str]:
    """``run_cli(CLI.main, argv)``: its exit status and its stderr."""
    capsys.readouterr()
    status = run_cli(CLIS[cli].main, [str(arg) for arg in argv])
    return status, capsys.readouterr().err


def refused(cli: str, argv: list, capsys) -> str:
    """Run a CLI that must refuse: exit status 2 and one error line, which is returned."""
    status, stderr = run(cli, argv, capsys)
    assert status == 2, stderr[-3000:]
    return error_line(stderr)


def slug(text: str) -> str:
    """A test id without spaces or punctuation: ``"thresholds: a list"`` -> ``"thresholds_a_list"``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def with_backbone(design_args: list[str], backbone) -> list[str]:
    flags = list(design_args)
    flags[flags.index("--backbone") + 1] = str(backbone)
    return flags


def base_argv(cli: str, paths: dict[str, Path], design_args: list[str], out: Path) -> list:
    """A complete, valid command line of ``cli`` writing to ``out``; a case appends the flags it changes."""
    if cli == "train":
        return ["--train_data_path", paths["auxiliary"], "--save_path", out, "--epoch", 1, "--batch_size", 4,
                "--num_workers", 0, *design_args]
    if cli == "test":
        return ["--data_path", paths["target"], "--save_path", out, "--checkpoint_path", paths["checkpoint"],
                "--batch_size", 4, "--num_workers", 0, *design_args]
    if cli == "one":
        return ["--image_path", paths["image"], "--save_path", out, "--checkpoint_path", paths["checkpoint"],
                *design_args]
    return ["--checkpoint_path", paths["checkpoint"], "--out", out, *design_args]


@pytest.fixture(scope="module")
def paths(synthetic_datasets, trained_checkpoint, tiny_clip_files, tmp_path_factory) -> dict[str, Path]:
    """The shared inputs, and a few broken files, read-only for the tests (they copy what they change)."""
    return make_paths(synthetic_datasets, trained_checkpoint, tiny_clip_files, tmp_path_factory.mktemp("user_errors"))


def make_paths(synthetic_datasets, trained_checkpoint, tiny_clip_files, folder: Path) -> dict[str, Path]:
    """:func:`paths` with its files in ``folder``."""
    auxiliary, target = synthetic_datasets
    files = {"auxiliary": auxiliary, "target": target, "checkpoint": trained_checkpoint,
             "torchscript": tiny_clip_files[1],
             "image": sorted((target / "blobs" / "Data" / "Images" / "Anomaly").iterdir())[0]}
    (folder / "empty").mkdir()
    (folder / "no_images").mkdir()
    (folder / "no_images" / "notes.txt").write_text("not an image")
    (folder / "export_without_manifest").mkdir()
    thresholds = {"list": [0.5], "no_classes": {"image_threshold": 0.5},
                  "entry_not_a_dict": {"classes": {"a": 0.5}},
                  "threshold_a_string": {"classes": {"a": {"image_threshold": "high", "pixel_threshold": 0.5}}}}
    for name, content in thresholds.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    files.update({name: folder / name for name in ("empty", "no_images", "export_without_manifest")})
    files.update({f"thresholds_{name}": folder / f"{name}.json" for name in thresholds})
    files["nowhere"] = folder / "nowhere"
    files["bomb"] = folder / "bomb.png"
    files["bomb"].write_bytes(png_header_only(100_000, 100_000))
    return files


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels and holds none (what a decompression bomb looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def copy_dataset(source: Path, target: Path) -> tuple[Path, dict, list[dict]]:
    """A writable copy of a dataset: ``(root, meta, test items in dataset order)``."""
    shutil.copytree(source, target)
    meta = json.loads((target / "meta.json").read_text())
    return target, meta, [item for items in meta["test"].values() for item in items]


def cut(path: Path) -> None:
    """Cut an image halfway through its pixel data: the header stays valid, decoding fails."""
    data = path.read_bytes()
    start = data.index(b"IDAT" if path.suffix.lower() == ".png" else b"\xff\xda")
    path.write_bytes(data[: start + (len(data) - start) // 2])


# --- DataLoader workers -------------------------------------------------------------------------


@dataclass
class WorkerRuns:
    """One cut file read with ``--num_workers 0`` and ``2``: the error lines and what the run left."""

    broken: Path
    status: dict[int, int]
    lines: dict[int, str]
    earlier: dict[str, str]  # files of an earlier run in --save_path, and their content
    after: dict[str, str]  # their content after both runs
    workers_left: list[str]  # worker processes still alive when the run with workers has returned


# (CLI, file cut) pairs.
WORKER_CASES = [("test", "image"), ("train", "mask")]


@pytest.fixture(scope="module")
def worker_runs(paths, design_args, tmp_path_factory):
    """``get(cli, fault)``: the :class:`WorkerRuns` of that case, run once per module."""
    done: dict[tuple[str, str], WorkerRuns] = {}

    def get(cli: str, fault: str) -> WorkerRuns:
        if (cli, fault) not in done:
            done[cli, fault] = _run_with_and_without_workers(cli, fault, paths, design_args,
                                                             tmp_path_factory.mktemp(f"workers_{cli}_{fault}"))
        return done[cli, fault]

    return get


def _run_with_and_without_workers(cli, fault, paths, design_args, folder: Path) -> WorkerRuns:
    root, _, items = copy_dataset(paths["target"] if cli == "test" else paths["auxiliary"], folder / "data")
    broken = root / next(item for item in items if item["anomaly"])["mask_path" if fault == "mask" else "img_path"]
    cut(broken)
    out = folder / "out"
    out.mkdir()
    earlier = {"results.json": "{}\n", "scores.csv": "img_path\n"} if cli == "test" else {"epoch_1.pth": "prompts"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    data_flag = "--data_path" if cli == "test" else "--train_data_path"
    status, lines, workers_left = {}, {}, []
    for workers in (0, 2):
        argv = [*base_argv(cli, paths, design_args, out), data_flag, root, "--num_workers", workers, "--batch_size", 2]
        argv += ["--overwrite"] if cli == "train" else []  # the earlier run's epoch_1.pth may be replaced, not lost
        gc.collect()  # garbage of earlier tests is not this run's
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status[workers] = run_cli(CLIS[cli].main, [str(arg) for arg in argv])
        if workers:
            workers_left = [child.name for child in multiprocessing.active_children()]
        lines[workers] = error_line(stderr.getvalue())
    after = {name: (out / name).read_text() for name in earlier}
    return WorkerRuns(broken, status, lines, earlier, after, workers_left)


@pytest.mark.parametrize("cli, fault", WORKER_CASES)
def test_cut_file_read_in_a_worker_is_the_same_line_as_without_workers(cli, fault, worker_runs):
    """--num_workers 2 and 0: exit status 2 and the same one line naming the file; an earlier run's outputs stay."""
    runs = worker_runs(cli, fault)
    assert runs.status == {0: 2, 2: 2}
    assert runs.lines[0] == runs.lines[2]
    assert runs.lines[0].startswith(f"error: cannot read {fault} file {runs.broken} (image file is truncated")
    assert "DataLoader worker" not in runs.lines[0]
    assert runs.after == runs.earlier


@pytest.mark.parametrize("cli, fault", WORKER_CASES)
def test_error_in_a_worker_stops_the_workers_at_once(cli, fault, worker_runs):
    """The workers are stopped when the loop fails, not left to the garbage collector: at interpreter exit torch
    waits 5 s for each of them (the CLI exited ~10 s after its error line)."""
    assert worker_runs(cli, fault).workers_left == []



@pytest.mark.parametrize("workers", [0, 2])
def test_mask_of_another_size_than_its_image_is_one_line(workers, paths, design_args, tmp_path, capsys):
    """A meta.json of another indexer may pair a mask of another size; the original resized it onto the image."""
    root, _, items = copy_dataset(paths["target"], tmp_path / "data")
    item = next(item for item in items if item["anomaly"] and item["mask_path"])
    mask, image = root / item["mask_path"], root / item["img_path"]
    with Image.open(mask) as loaded:
        width, height = loaded.size
        loaded.resize((width + 3, height)).save(mask)
    argv = [*base_argv("test", paths, design_args, tmp_path / "out"), "--data_path", root, "--num_workers", workers]
    line = refused("test", argv, capsys)
    assert line == (f"error: mask {mask} is {width + 3}x{height} but its image {image} is {width}x{height}: a mask "
                    "marks its own image's pixels; re-make it at the image's size (or re-download the dataset) and "
                    "re-run its indexer")

# --- files gone after indexing ------------------------------------------------------------------


@pytest.mark.parametrize("cli, n_removed", [("test", 3), ("train", 3), ("test", 7)])
def test_files_removed_after_indexing_are_listed_before_the_model_loads(cli, n_removed, paths, design_args, tmp_path,
                                                                        capsys):
    """All removed files in one line (the first five, then a count), with --num_workers 2 as without; the backbone
    is never opened."""
    source = paths["target"] if cli == "test" else paths["auxiliary"]
    root, _, items = copy_dataset(source, tmp_path / "data")
    anomalous = [item for item in items if item["anomaly"]]
    removed = [items[0]["img_path"], anomalous[0]["mask_path"], anomalous[-1]["img_path"]]
    removed += [item["img_path"] for item in items[1:] if item["img_path"] not in removed][: n_removed - 3]
    for name in removed:
        (root / name).unlink()
    data_flag = "--data_path" if cli == "test" else "--train_data_path"
    # A backbone that does not exist: had the model been loaded first, the error would name it.
    flags = with_backbone(design_args, tmp_path / "absent_backbone.pt")
    argv = [*base_argv(cli, paths, flags, tmp_path / "out"), data_flag, root, "--num_workers", 2]
    line = refused(cli, argv, capsys)
    in_order = [path for item in items for path in (item["img_path"], item["mask_path"]) if path in removed]
    assert f"{root / 'meta.json'} lists {n_removed} file(s) that do not exist: {', '.join(in_order[:5])}" in line
    assert (f" and {n_removed - 5} more;" in line) == (n_removed > 5)
    assert "absent_backbone" not in line


@pytest.mark.parametrize("cli", ["test", "train"])
def test_files_emptied_after_indexing_are_listed_before_the_model_loads(cli, paths, design_args, tmp_path, capsys):
    """A listed file cut to 0 bytes is found by the same up-front check (a file cut elsewhere, when decoded)."""
    source = paths["target"] if cli == "test" else paths["auxiliary"]
    root, _, items = copy_dataset(source, tmp_path / "data")
    emptied = [items[0]["img_path"], next(item for item in items if item["anomaly"])["mask_path"]]
    for name in emptied:
        (root / name).write_bytes(b"")
    data_flag = "--data_path" if cli == "test" else "--train_data_path"
    flags = with_backbone(design_args, tmp_path / "absent_backbone.pt")
    line = refused(cli, [*base_argv(cli, paths, flags, tmp_path / "out"), data_flag, root], capsys)
    in_order = [path for item in items for path in (item["img_path"], item["mask_path"]) if path in emptied]
    assert f"{root / 'meta.json'} lists 2 empty file(s): {', '.join(in_order)}; replace them" in line


def test_image_folder_with_non_images_is_listed_before_the_model_loads(paths, design_args, tmp_path, capsys):
    """test_one_example.py: every file of an image's name that is not an image, in one line, before the backbone
    is opened and before anything is written (a folder of images used to stop at the first one, after the overlays
    of the images before it)."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(paths["image"], folder / "a.JPG")
    shutil.copy(paths["image"], folder / "sub" / "d.JPG")
    (folder / "b.png").write_text("<html>not found</html>")
    (folder / "sub" / "c.jpg").write_bytes(b"")
    (folder / "e.png").write_bytes(paths["image"].read_bytes()[:300])  # a JPEG cut inside its header
    flags = with_backbone(design_args, tmp_path / "absent_backbone.pt")
    out = tmp_path / "out"
    argv = [*base_argv("one", paths, flags, out), "--image_path", folder, "--batch_size", 1]
    line = refused("one", argv, capsys)
    head = "error: 3 of 5 image file(s) cannot be read: "
    assert line.startswith(head)
    named = [part.split(" (")[0] for part in line.removeprefix(head).split("; ")]
    assert named[:3] == [str(folder / "b.png"), str(folder / "e.png"), str(folder / "sub" / "c.jpg")]
    assert "absent_backbone" not in line
    assert not out.exists()
    single = refused("one", [*base_argv("one", paths, flags, out), "--image_path", folder / "b.png"], capsys)
    assert single.startswith(f"error: cannot read image file {folder / 'b.png'} (cannot identify image file")


# --- flags --------------------------------------------------------------------------------------

# (case, CLI, extra flags with {placeholders} from the ``paths`` fixture, words the line must hold)
FLAG_CASES = [
    ("feature_map_layer 9", "test", ["--feature_map_layer", "9"], "--feature_map_layer 9 must index --features_list"),
    ("feature_map_layer 9", "one", ["--feature_map_layer", "9"], "--feature_map_layer 9 must index --features_list"),
    ("feature_map_layer 9", "export", ["--feature_map_layer", "9"], "--feature_map_layer 9 must index"),
    ("feature_map_layer 1, one layer", "test", ["--features_list", "24", "--feature_map_layer", "1"],
     "--feature_map_layer 1 must index --features_list (1 layer(s)): use 0..0"),
    ("feature_map_layer 1, one layer", "one", ["--features_list", "24", "--feature_map_layer", "1"],
     "--feature_map_layer 1 must index --features_list (1 layer(s)): use 0..0"),
    ("feature_map_layer -1", "one", ["--feature_map_layer", "-1"], "--feature_map_layer -1 must index"),
    ("epoch 0", "train", ["--epoch", "0"], "--epoch 0 must be at least 1"),
    ("save_freq 0", "train", ["--save_freq", "0"], "--save_freq 0 must be at least 1"),
    ("batch_size 0", "train", ["--batch_size", "0"], "--batch_size 0 must be at least 1"),
    ("n_ctx 0", "train", ["--n_ctx", "0"], "--n_ctx 0 must be at least 1"),
    ("depth 0", "test", ["--depth", "0"], "--depth 0 must be at least 1"),
    ("depth 13", "one", ["--depth", "13"], "--depth 13 exceeds the backbone's 12 text layers"),
    ("depth 13", "train", ["--depth", "13"], "--depth 13 exceeds the backbone's 12 text layers"),
    ("t_n_ctx 80", "train", ["--t_n_ctx", "80"], "--t_n_ctx 80 is longer than the prompt it overwrites"),
    ("unknown registry name", "one", ["--backbone", "ViT-X/99"],
     "backbone file ViT-X/99 does not exist; pass a registry name (ViT-L/14@336px) or a checkpoint file"),
    ("unknown registry name", "train", ["--backbone", "ViT-X/99"], "backbone file ViT-X/99 does not exist"),
    ("data_path absent", "test", ["--data_path", "{nowhere}"], "dataset root {nowhere} does not exist: check the path"),
    ("train_data_path absent", "train", ["--train_data_path", "{nowhere}"], "dataset root {nowhere} does not exist"),
    ("data_path without meta.json", "test", ["--data_path", "{empty}"], "{empty}/meta.json does not exist; index the "
     "dataset first: python generate_dataset_json/<dataset>.py --root {empty}"),
    ("data_path its meta.json", "test", ["--data_path", "{target}/meta.json"],
     "dataset root {target}/meta.json is a file, not a folder: give the folder that holds it, {target}"),
    ("train_data_path its meta.json", "train", ["--train_data_path", "{auxiliary}/meta.json"],
     "dataset root {auxiliary}/meta.json is a file, not a folder: give the folder that holds it, {auxiliary}"),
    ("data_path an image", "test", ["--data_path", "{image}"],
     "dataset root {image} is a file, not a folder: give the dataset's root folder (where its meta.json is)"),
    ("image_path absent", "one", ["--image_path", "{nowhere}"], "--image_path {nowhere} does not exist"),
    ("empty folder", "one", ["--image_path", "{empty}"], "{empty} holds no images (.bmp, .jpeg"),
    ("folder without images", "one", ["--image_path", "{no_images}"], "{no_images} holds no images"),
    ("thresholds: a list", "one", ["--thresholds", "{thresholds_list}"],
     "thresholds file {thresholds_list} has no 'classes' mapping"),
    ("thresholds: no classes", "one", ["--thresholds", "{thresholds_no_classes}"], "has no 'classes' mapping"),
    ("thresholds: entry not a dict", "one", ["--thresholds", "{thresholds_entry_not_a_dict}"],
     "class 'a' has no image_threshold"),
    ("thresholds: threshold a string", "one", ["--thresholds", "{thresholds_threshold_a_string}"],
     "class 'a' has an invalid image_threshold 'high'"),
    ("runtime without model", "test", ["--runtime", "onnxruntime"], "--runtime onnxruntime needs --model DIR"),
    ("runtime without model", "one", ["--runtime", "openvino"], "--runtime openvino needs --model DIR"),
    ("model without anomalyclip.json", "test", ["--runtime", "onnxruntime", "--model", "{export_without_manifest}"],
     "{export_without_manifest} holds no anomalyclip.json; pass a folder written by export.py"),
    ("model without anomalyclip.json", "one", ["--runtime", "openvino", "--model", "{export_without_manifest}"],
     "{export_without_manifest} holds no anomalyclip.json"),
    ("model without runtime", "one", ["--model", "{export_without_manifest}"], "add --runtime"),
    ("thresholds not a thresholds.json", "export", ["--thresholds", "{thresholds_list}"],
     "thresholds file {thresholds_list} has no 'classes' mapping: it is not a thresholds.json"),
    ("image_path inside save_path", "one", ["--save_path", "{empty}/..", "--image_path", "{empty}"],
     "lies inside --save_path {empty}/.., whose files are outputs and never read as images"),
    ("seed -1", "train", ["--seed", "-1"], "--seed -1 must be in 0..4294967295"),
    ("sigma wider than the image", "one", ["--sigma", "1e6"],
     "--sigma 1000000.0 is wider than the image (--image_size 56): the filter would only flatten the map"),
    ("seed 2**32", "test", ["--seed", str(2**32)], "--seed 4294967296 must be in 0..4294967295"),
    ("device meta", "test", ["--device", "meta"], "unknown device 'meta'; use cpu, cuda or cuda:N"),
    ("device mps", "one", ["--device", "mps"], "unknown device 'mps'; use cpu, cuda or cuda:N"),
    ("dump a folder", "test", ["--dump", "{empty}"],
     "--dump {empty} is a folder; give a file name, e.g. {empty}/dump.npz"),
    ("decompression bomb", "one", ["--image_path", "{bomb}"],
     "cannot read image file {bomb}: its header claims more pixels than Pillow decodes safely"),
]


@pytest.mark.parametrize("case, cli, flags, expected", FLAG_CASES,
                         ids=[f"{cli}-{slug(case)}" for case, cli, _, _ in FLAG_CASES])
def test_bad_flags_are_one_line(case, cli, flags, expected, paths, design_args, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused(cli, [*base_argv(cli, paths, design_args, out), *(flag.format(**paths) for flag in flags)], capsys)
    assert expected.format(**paths) in line
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("cli", ["train", "test", "one"])
def test_n_ctx_longer_than_the_text_context_is_one_line(cli, paths, design_args, tmp_path, capsys):
    line = refused(cli, [*base_argv(cli, paths, design_args, tmp_path / "out"), "--n_ctx", "80"], capsys)
    assert "--n_ctx 80 makes the prompt longer than the text encoder's 77 tokens: use at most 72" in line


# --- model files --------------------------------------------------------------------------------


class _RunsCode:
    """A pickle that runs a shell command when it is loaded without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_file(kind: str, folder: Path) -> tuple[Path, Path]:
    """``(the bad file, the marker the malicious pickle would create)``."""
    path, marker = folder / ("anomalyclip.onnx" if kind == "onnx graph" else f"{slug(kind)}.pth"), folder / "pickle_ran"
    if kind == "text":
        path.write_text("epoch 15, loss 0.1\n")
    elif kind == "folder":
        path.mkdir()
    elif kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "plain pickle":  # pickle.dump, not torch.save: no zip archive around it
        path.write_bytes(pickle.dumps({"prompt_learner": {"ctx_pos": _RunsCode(marker)}}))
    elif kind == "onnx graph":
        onnx = pytest.importorskip("onnx")
        value = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["image"], ["score"])], "export", [value],
                                       [onnx.helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [1])])
        onnx.save(onnx.helper.make_model(graph), path)
    else:
        torch.save({"prompt_learner": {"ctx_pos": _RunsCode(marker)}}, path)
    return path, marker


_OBJECTS = "holds Python objects besides tensors; they are not loaded because a pickle can run code"
MODEL_FILE_WORDS = {"text": "is not a PyTorch checkpoint", "folder": "is a folder, not a file", "pickle": _OBJECTS,
                    "plain pickle": _OBJECTS, "random bytes": "is not a PyTorch checkpoint (it cannot be unpickled)",
                    "onnx graph": "is an exported graph (export.py), not a PyTorch checkpoint: give a .pth file here; "
                                  "an export is scored by test.py and test_one_example.py with --runtime "
                                  "onnxruntime|openvino --model "}
MODEL_FILE_FLAGS = [("test", "--checkpoint_path"), ("one", "--checkpoint_path"), ("export", "--checkpoint_path"),
                    ("train", "--resume"), ("one", "--backbone"), ("train", "--backbone")]


@pytest.mark.parametrize("kind", list(MODEL_FILE_WORDS), ids=slug)
@pytest.mark.parametrize("cli, flag", MODEL_FILE_FLAGS, ids=[f"{cli}{flag}" for cli, flag in MODEL_FILE_FLAGS])
def test_wrong_model_files_are_one_line(cli, flag, kind, paths, design_args, tmp_path, capsys):
    """A text file, a folder or a malicious pickle as a checkpoint or backbone: named, never run."""
    bad, marker = _bad_file(kind, tmp_path)
    argv = base_argv(cli, paths, design_args, tmp_path / "out")
    if flag == "--backbone":
        argv = base_argv(cli, paths, with_backbone(design_args, bad), tmp_path / "out")
    else:
        argv += [flag, bad]
    line = refused(cli, argv, capsys)
    what = "backbone" if flag == "--backbone" else "prompt checkpoint"
    assert f"{what} " in line and str(bad) in line and MODEL_FILE_WORDS[kind] in line
    assert "weights_only" not in line and "WeightsUnpickler" not in line
    assert not marker.exists()


def test_unregistered_torchscript_backbone_needs_trust(paths, design_args, tmp_path, capsys):
    """Refused with the reason; with --trust_backbone it loads and scores as the same weights saved plainly do."""
    scripted = with_backbone(design_args, paths["torchscript"])
    line = refused("one", base_argv("one", paths, scripted, tmp_path / "refused"), capsys)
    assert f"backbone {paths['torchscript']} is a TorchScript archive that is not a registered OpenAI file" in line
    assert "runs code stored in the file; pass --trust_backbone" in line
    assert not (tmp_path / "refused").exists()
    scores = {}
    for name, flags in (("trusted", [*scripted, "--trust_backbone"]), ("plain", design_args)):
        status, stderr = run("one", base_argv("one", paths, flags, tmp_path / name), capsys)
        assert status == 0, stderr[-3000:]
        with open(tmp_path / name / "predictions.csv", newline="") as handle:
            [row] = list(csv.DictReader(handle))
        scores[name] = float(row["score"])
    assert scores["trusted"] == scores["plain"]


DESIGN_CASES = [("test", ["--n_ctx", "8"]), ("one", ["--depth", "5"]), ("export", ["--t_n_ctx", "2"]),
                ("train", ["--depth", "5"])]


@pytest.mark.parametrize("cli, flags", DESIGN_CASES, ids=[f"{cli}{flags[0]}" for cli, flags in DESIGN_CASES])
def test_checkpoint_of_another_design_is_one_line(cli, flags, paths, design_args, tmp_path, capsys):
    argv = [*base_argv(cli, paths, design_args, tmp_path / "out"), *flags]
    if cli == "train":
        argv += ["--resume", paths["checkpoint"]]
    line = refused(cli, argv, capsys)
    assert f"{paths['checkpoint']} was trained with --n_ctx 12 --depth 9 --t_n_ctx 4, not " in line
    assert f"{flags[0]} {flags[1]}" in line


# --- where the results go -----------------------------------------------------------------------

SAVE_PATH_CASES = [("train", "file"), ("test", "file"), ("one", "file"), ("train", "under_a_file"),
                   ("export", "under_a_file")]


def _save_path_case(cli: str, case: str, paths, design_args, tmp_path) -> tuple[list, Path]:
    users_file = tmp_path / "my_notes.txt"
    users_file.write_text("the user's own file\n")
    target = users_file if case == "file" else users_file / "results"
    return base_argv(cli, paths, design_args, target), users_file


@pytest.mark.parametrize("cli, case", SAVE_PATH_CASES, ids=[f"{cli}-{case}" for cli, case in SAVE_PATH_CASES])
def test_save_path_that_is_a_file_is_one_line(cli, case, paths, design_args, tmp_path, capsys):
    """Refused by the shared flag checks before any work; the user's file keeps its content."""
    argv, users_file = _save_path_case(cli, case, paths, design_args, tmp_path)
    line = refused(cli, argv, capsys)
    flag = "--out" if cli == "export" else "--save_path"
    where = "is a file" if case == "file" else f"lies under {users_file}, which is a file"
    assert line == f"error: {flag} {argv[argv.index(flag) + 1]} {where}; give a folder"
    assert users_file.read_text() == "the user's own file\n"


def test_unwritable_save_path_is_one_line_in_every_cli(paths, design_args, capsys):
    """A folder the system refuses (under /sys): exactly one line naming it, in all four CLIs."""
    target = Path("/sys/anomalyclip_unwritable")
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys is writable here")
    for cli in ("train", "test", "one", "export"):
        line = refused(cli, base_argv(cli, paths, design_args, target), capsys)
        assert line.startswith(f"error: cannot write {target}") and "choose a" in line, (cli, line)



# A run that holds a folder, as train.py does: prints "held", then waits until it is killed.
_HOLDER = ("import sys\nfrom pipeline.atomic import locked_folder\nwith locked_folder(sys.argv[1], '--save_path'):\n"
           "    print('held', flush=True)\n    sys.stdin.read()\n")


@contextlib.contextmanager
def held_by_another_run(folder: Path):
    """Another process holds ``folder`` while the block runs; yields its process id; SIGKILLed at the end."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("cli", ["train", "test", "one", "export"])
def test_output_folder_in_use_by_another_run_is_one_line(cli, paths, design_args, tmp_path, capsys):
    """Two runs into one folder: the second stops at once and writes nothing there (no log.txt either)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "their_log.txt").write_text("the other run's file\n")
    flag = "--out" if cli == "export" else "--save_path"
    with held_by_another_run(out) as pid:
        line = refused(cli, base_argv(cli, paths, design_args, out), capsys)
        assert line == (f"error: {flag} {out} is in use by another run (process {pid}): wait for it to end, "
                        "or choose another folder")
        assert sorted(p.name for p in out.iterdir()) == [".anomalyclip.lock", "their_log.txt"]
    assert (out / "their_log.txt").read_text() == "the other run's file\n"


@pytest.mark.parametrize("cli", ["train", "test", "one", "export"])
def test_run_that_fails_early_leaves_no_new_folder(cli, paths, design_args, tmp_path, capsys):
    """A user error before the first log line (a dataset or backbone that does not exist) leaves no new output
    folder behind, nor the parents it made: it held an empty log.txt."""
    out = tmp_path / "new" / "out"
    if cli in ("train", "test"):
        argv = [*base_argv(cli, paths, design_args, out), "--data_path" if cli == "test" else "--train_data_path",
                paths["nowhere"]]
    else:
        argv = base_argv(cli, paths, with_backbone(design_args, paths["nowhere"]), out)
    line = refused(cli, argv, capsys)
    assert str(paths["nowhere"]) in line
    assert not (tmp_path / "new").exists()


def test_folder_of_a_killed_run_is_free_again(paths, design_args, tmp_path, capsys):
    """The kernel drops a killed holder's lock; its stale lock file does not block, and is removed afterwards."""
    out = tmp_path / "out"
    with held_by_another_run(out):
        pass
    assert (out / ".anomalyclip.lock").exists()  # SIGKILL left it
    status, stderr = run("one", base_argv("one", paths, design_args, out), capsys)
    assert status == 0, stderr
    assert (out / "predictions.csv").exists() and not (out / ".anomalyclip.lock").exists()


def test_cache_dir_in_use_by_another_run_is_one_line(paths, design_args, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = [*base_argv("train", paths, design_args, tmp_path / "out"), "--cache_memory_gb", 0, "--cache_dir", cache]
    with held_by_another_run(cache) as pid:
        line = refused("train", argv, capsys)
    assert line == (f"error: --cache_dir {cache} is in use by another run (process {pid}): wait for it to end, "
                    "or choose another folder")
    assert not list((tmp_path / "out").glob("epoch_*.pth"))


def test_calibration_into_a_folder_in_use_is_one_line(paths, design_args, tmp_path, capsys):
    saved = tmp_path / "shared" / "thresholds.json"
    argv = ["--image_path", paths["image"], "--checkpoint_path", paths["checkpoint"], *design_args, "--calibrate",
            "--save_thresholds", saved]
    with held_by_another_run(saved.parent) as pid:
        line = refused("one", argv, capsys)
    assert line.startswith(f"error: --save_thresholds's folder {saved.parent} is in use by another run (process {pid})")
    assert not saved.exists()


def _address_space_limit(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def test_out_of_memory_is_one_line(paths, design_args, tmp_path):
    """--image_size 59990 asks for GiBs at once; under an address-space limit (so that this machine's memory is never
    touched) the allocation fails as it does on a device that is full."""
    argv = [*base_argv("one", paths, design_args, tmp_path / "out"), "--image_size", 59990]
    done = subprocess.run([sys.executable, str(REPO_ROOT / "test_one_example.py"), *map(str, argv)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=_address_space_limit(6 * 2**30),
                          env=one_thread_env())
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if not line.startswith("loaded backbone ")]  # its INFO log
    assert len(lines) == 1, done.stderr[-3000:]
    assert re.fullmatch(r"error: out of memory on the CPU( \(an allocation of \d+\.\d GiB\))?: lower --batch_size or "
                        r"--image_size, or free memory \(other processes on that device\)", lines[0]), lines[0]
    assert not (tmp_path / "out").exists()

# --- meta.json ----------------------------------------------------------------------------------

ITEM = {"img_path": "blobs/Data/Images/Normal/0000.JPG", "mask_path": "", "cls_name": "blobs", "specie_name": "",
        "anomaly": 0}


META_CASES = [
    pytest.param("not JSON", "{not json", "cannot read {meta} (Expecting property name", id="not-json"),
    pytest.param("a list", [ITEM], "{meta} is not a meta.json index (a JSON object of splits)", id="list"),
    pytest.param("no test split", {"train": {"blobs": [ITEM]}}, "{meta} has no 'test' split (it has: train)",
                 id="no-test-split"),
    pytest.param("entry without keys", {"test": {"blobs": [{"img_path": ITEM["img_path"]}]}},
                 "{meta} is malformed: it has an entry without the keys img_path, mask_path, cls_name, specie_name, "
                 "anomaly", id="entry-without-keys"),
    pytest.param("class not a list", {"test": {"blobs": 5}}, "{meta} is malformed: its class 'blobs' is not a list",
                 id="class-not-a-list"),
    pytest.param("anomaly not a number", {"test": {"blobs": [ITEM, dict(ITEM, anomaly="yes")]}},
                 "has anomaly 'yes' (0 = normal, 1 = anomalous)", id="anomaly-not-a-number"),
    pytest.param("img_path null", {"test": {"blobs": [dict(ITEM, img_path=None)]}},
                 "has no image path (img_path must be a file name)", id="img-path-null"),
    pytest.param("cls_name not its class", {"test": {"blobs": [ITEM, dict(ITEM, cls_name="Blobs", anomaly=1)]}},
                 "is listed under class 'blobs' but says cls_name 'Blobs'", id="cls-name-not-its-class"),
]


@pytest.mark.parametrize("case, content, expected", META_CASES)
def test_broken_meta_json_is_one_line(case, content, expected, paths, design_args, tmp_path, capsys):
    root = tmp_path / "data"
    for kind in ("Normal", "Anomaly"):
        shutil.copytree(paths["target"] / "blobs" / "Data" / "Images" / kind, root / "blobs" / "Data" / "Images" / kind)
    meta = root / "meta.json"
    meta.write_text(content if isinstance(content, str) else json.dumps(content))
    before = meta.read_bytes()
    line = refused("test", [*base_argv("test", paths, design_args, tmp_path / "out"), "--data_path", root], capsys)
    assert expected.format(meta=meta) in line
    assert meta.read_bytes() == before


# --- the indexer --------------------------------------------------------------------------------


def test_indexer_stops_on_a_png_cut_to_100_bytes_and_keeps_the_old_meta_json(tmp_path):
    from tests.generate_dataset_json.trees import Tree, mvtec_class

    mvtec_class(Tree(tmp_path), "bottle")
    cut_file = tmp_path / "bottle" / "test" / "good" / "001.png"
    cut_file.write_bytes(cut_file.read_bytes()[:100])
    with Image.open(cut_file) as image:
        assert image.size == (16, 16)  # the header survives: only decoding finds the cut
    old = '{"test": {"bottle": []}}\n'
    (tmp_path / "meta.json").write_text(old)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "generate_dataset_json" / "mvtec.py"), "--root",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    # Besides the error, only the warning that 14 of MVTec AD's 15 classes are absent from this tree.
    assert len(errors) == 1 and all(line.startswith("WARNING: ") for line in lines if line not in errors), lines
    assert "unreadable image (1): bottle/test/good/001.png" in errors[0]
    assert (tmp_path / "meta.json").read_text() == old


# --- signals ------------------------------------------------------------------------------------


def test_sigterm_stops_training_like_ctrl_c(paths, design_args, tmp_path):
    """SIGTERM (a scheduler, docker stop): exit 143 with one word, no temporary file, no on-disk cache left."""
    out = tmp_path / "run"
    argv = [*base_argv("train", paths, design_args, out), "--epoch", 10_000, "--cache_memory_gb", 0]
    process = subprocess.Popen([sys.executable, "train.py", *map(str, argv)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=one_thread_env())
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("epoch_2.pth")):  # training, with checkpoints being written
            assert process.poll() is None and time.monotonic() < deadline, "train.py did not get to epoch 2"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.replace("\r", "\n").strip().splitlines()[-1].endswith("terminated")
    assert not [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "feature_cache").exists()


@pytest.mark.parametrize("cli, flags, expected", [
    ("train", ["--epochs", "3"], "error: unrecognized arguments: --epochs 3; see train.py --help"),
    ("test", ["--batch_size", "abc"], "error: argument --batch_size: invalid int value: 'abc'; see test.py --help"),
    ("export", ["--opset", "10"], "error: --opset 10 must be >= 17; see export.py --help"),
])
def test_command_line_mistakes_are_one_line_without_the_usage(cli, flags, expected, paths, design_args, tmp_path,
                                                              capsys, monkeypatch):
    """What ``python SCRIPT ARGS`` prints, run in this process: argparse names the program after ``sys.argv[0]``, and
    the script's ``raise SystemExit(run_cli(main))`` passes on argparse's exit status."""
    script = {"train": "train.py", "test": "test.py", "export": "export.py"}[cli]
    monkeypatch.setattr(sys, "argv", [script])
    argv = [*map(str, base_argv(cli, paths, design_args, tmp_path / "out")), *flags]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_cli(CLIS[cli].main, argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [expected] and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_training_data_without_anomalous_images_is_refused(paths, design_args, tmp_path, capsys):
    root, meta, _ = copy_dataset(paths["auxiliary"], tmp_path / "data")
    meta["test"] = {name: [item for item in items if not item["anomaly"]] for name, items in meta["test"].items()}
    (root / "meta.json").write_text(json.dumps(meta))
    line = refused("train", [*base_argv("train", paths, design_args, tmp_path / "out"), "--train_data_path", root],
                   capsys)
    assert line == (f"error: {root} holds no anomalous images, and the prompts learn from normal and anomalous "
                    "ones: train on an auxiliary dataset with defects (MVTec AD, VisA)")


def test_cache_dir_holding_the_users_own_files_is_refused_and_kept(paths, design_args, tmp_path, capsys):
    folder = tmp_path / "my_arrays"
    folder.mkdir()
    for name in ("embeddings.npy", "labels.npy"):
        (folder / name).write_bytes(b"the user's data")
    argv = [*base_argv("train", paths, design_args, tmp_path / "out"), "--cache_memory_gb", 0, "--cache_dir", folder]
    line = refused("train", argv, capsys)
    assert line == (f"error: --cache_dir {folder} holds embeddings.npy, labels.npy that train.py did not write "
                    "(no .anomalyclip_cache there); choose an empty or new --cache_dir")
    assert sorted(p.read_bytes() for p in folder.iterdir()) == [b"the user's data"] * 2


def test_calibration_keeps_the_other_classes_of_an_existing_thresholds_file(paths, design_args, tmp_path, capsys):
    saved = tmp_path / "thresholds.json"
    saved.write_text(json.dumps({"version": 1, "classes": {"weave": {"image_threshold": 0.5, "pixel_threshold": 1.5,
                                                                     "method": "f1"}}}))
    argv = ["--image_path", paths["image"], "--checkpoint_path", paths["checkpoint"], *design_args, "--calibrate",
            "--save_thresholds", saved, "--class_name", "blobs"]
    status, stderr = run("one", argv, capsys)
    assert status == 0, stderr
    classes = json.loads(saved.read_text())["classes"]
    assert sorted(classes) == ["blobs", "weave"]
    assert classes["weave"] == {"image_threshold": 0.5, "pixel_threshold": 1.5, "method": "f1"}
    assert classes["blobs"]["method"] == "normal_fpr"


def test_calibration_refuses_to_replace_a_file_that_is_not_thresholds(paths, design_args, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    argv = ["--image_path", paths["image"], "--checkpoint_path", paths["checkpoint"], *design_args, "--calibrate",
            "--save_thresholds", notes]
    line = refused("one", argv, capsys)
    assert line.startswith(f"error: --save_thresholds {notes} exists and is not a thresholds.json (")
    assert line.endswith("give a new file name, so that the file is not replaced")
    assert notes.read_text() == "my notes\n"
