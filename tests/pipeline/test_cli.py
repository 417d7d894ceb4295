"""pipeline.loading.py: the DataLoader worker default."""

import pytest
import torch

from pipeline import evaluation as test_cli
from pipeline import training as train_cli
from pipeline.loading import resolve_num_workers


@pytest.mark.parametrize(("cpu_count", "threads", "expected"), [(2, 2, 0), (5, 4, 1), (16, 8, 2), (1, 4, 0)])
def test_cpu_default_uses_only_cores_left_by_torch_threads(monkeypatch, cpu_count, threads, expected):
    monkeypatch.setattr("pipeline.loading.os.cpu_count", lambda: cpu_count)
    monkeypatch.setattr("pipeline.loading.torch.get_num_threads", lambda: threads)
    monkeypatch.setattr("pipeline.loading.load_average", lambda: 0.0)  # an idle machine
    assert resolve_num_workers(None, torch.device("cpu")) == expected


def test_gpu_default_and_explicit_value(monkeypatch):
    monkeypatch.setattr("pipeline.loading.os.cpu_count", lambda: 2)
    monkeypatch.setattr("pipeline.loading.torch.get_num_threads", lambda: 2)
    assert resolve_num_workers(None, torch.device("cuda")) == 2
    assert resolve_num_workers(3, torch.device("cpu")) == 3
    assert resolve_num_workers(0, torch.device("cuda")) == 0


@pytest.mark.parametrize("cli", [test_cli, train_cli])
def test_clis_leave_the_worker_count_to_the_device_and_reject_negative(cli, capsys):
    required = ["--checkpoint_path", "x.pth"] if cli is test_cli else []
    assert cli.parse_args(required).loader.num_workers is None
    assert cli.parse_args([*required, "--num_workers", "3"]).loader.num_workers == 3
    from pipeline.cli import run_cli

    assert run_cli(cli.main, [*required, "--num_workers", "-1"]) == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and "--num_workers" in error and ">= 0" in error


def test_full_disk_and_read_only_folders_are_one_plain_line(capsys):
    import errno

    from pipeline.cli import run_cli

    def write_to_full_disk(argv):
        with open("/dev/full", "w") as handle:  # the kernel's always-full device: a real ENOSPC
            handle.write("x")
        return 0

    assert run_cli(write_to_full_disk, []) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "disk is full" in error and "\n" not in error

    def read_only(argv):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/results.json")

    assert run_cli(read_only, []) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("error: cannot write /mnt/ro/results.json: the folder is on a read-only file system: "
                     "choose a writable folder")


def test_other_os_errors_keep_their_traceback():
    import errno

    from pipeline.cli import run_cli

    def broken_pipe(argv):
        raise OSError(errno.EPIPE, "Broken pipe")

    with pytest.raises(OSError):
        run_cli(broken_pipe, [])


@pytest.mark.parametrize("flags, expected", [
    (["--feature_map_layer", "2"], "--feature_map_layer 2 must index --features_list (2 layer(s)): use 0..1"),
    (["--feature_map_layer", "-1"], "--feature_map_layer -1 must index"),
    (["--sigma", "-1"], "--sigma -1.0 must be a finite number >= 0"),
    (["--sigma", "nan"], "--sigma nan must be"),
    (["--batch_size", "0"], "--batch_size 0 must be at least 1"),
    (["--image_size", "0"], "--image_size 0 must be at least 1"),
    (["--features_list", "24", "24"], "repeats a layer"),
])
def test_shared_flag_checks_in_every_cli(flags, expected, capsys, tmp_path):
    from pipeline import prediction as test_one_example
    from pipeline.cli import run_cli

    base = ["--features_list", "6", "24", "--save_path", str(tmp_path / "out")]
    commands = {
        test_cli: ["--checkpoint_path", "absent.pth", "--data_path", str(tmp_path)],
        train_cli: ["--train_data_path", str(tmp_path)],
        test_one_example: ["--checkpoint_path", "absent.pth", "--image_path", str(tmp_path)],
    }
    for cli, required in commands.items():
        if flags[0] == "--sigma" and cli is train_cli:
            continue  # training has no smoothing
        assert run_cli(cli.main, [*required, *base, *flags]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and "\n" not in error and expected in error, (cli.__name__, error)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_image_size_must_fit_the_backbone_patches(tiny_clip_files, synthetic_datasets, tmp_path, capsys):
    from pipeline.cli import run_cli

    assert run_cli(train_cli.main, ["--train_data_path", str(synthetic_datasets[0]), "--save_path",
                                    str(tmp_path / "s"), "--backbone", str(tiny_clip_files[0]), "--image_size", "50",
                                    "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "--image_size 50 is not a multiple of the backbone's patch size 14: use 42 or 56" in error


@pytest.mark.parametrize("script", ["train.py", "test.py", "test_one_example.py"])
def test_help_shows_defaults(script, capsys, monkeypatch):
    """``python SCRIPT --help`` (``run_cli(main)``, as the script's ``__main__``), run in this process: argparse
    prints the help and exits 0."""
    import sys

    from pipeline import prediction
    from pipeline.cli import run_cli

    main = {"train.py": train_cli.main, "test.py": test_cli.main, "test_one_example.py": prediction.main}[script]
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(SystemExit) as exited:
        run_cli(main, ["--help"])
    assert exited.value.code == 0
    captured = capsys.readouterr()
    help_text = " ".join(captured.out.split())
    assert help_text.startswith(f"usage: {script} ") and captured.err == ""
    assert "input side in pixels (default: 518)" in help_text
    assert "(default: ViT-L/14@336px)" in help_text


@pytest.mark.parametrize("command", ["test", "one"])
def test_half_precision_on_a_cpu_is_refused_before_any_data_or_model_loads(command, tmp_path, capsys):
    """--precision fp16/bf16 needs CUDA: refused with the flags, not after the dataset and the model loaded."""
    from pipeline import prediction
    from pipeline.cli import run_cli

    missing = tmp_path / "absent"  # neither a dataset, nor images, nor a checkpoint: none may be looked at first
    argv = {"test": (test_cli.main, ["--data_path", str(missing), "--checkpoint_path", str(missing / "c.pth"),
                                     "--save_path", str(tmp_path / "out"), "--device", "cpu", "--precision", "fp16"]),
            "one": (prediction.main, ["--image_path", str(missing), "--checkpoint_path", str(missing / "c.pth"),
                                      "--save_path", str(tmp_path / "out"), "--precision", "fp16"])}
    main, flags = argv[command]
    assert run_cli(main, flags) == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and "needs a CUDA device and this run is on cpu" in error, error
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_device_it_would_ignore(tmp_path, capsys):
    from deploy import export
    from pipeline.cli import run_cli

    assert run_cli(export.main, ["--checkpoint_path", str(tmp_path / "c.pth"), "--out", str(tmp_path / "out"),
                                 "--device", "cuda"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --device cuda: export.py traces the graph on the CPU") and error.count("\n") == 1


@pytest.mark.parametrize("command", ["test", "one"])
def test_int8_on_the_torch_path_is_refused_before_any_data_or_model_loads(command, tmp_path, capsys):
    """int8 exists only as a quantised export: the torch path refuses it with the flags, naming the way there."""
    from pipeline import prediction
    from pipeline.cli import run_cli

    missing = tmp_path / "absent"
    source = ["--data_path", str(missing)] if command == "test" else ["--image_path", str(missing)]
    main = test_cli.main if command == "test" else prediction.main
    assert run_cli(main, [*source, "--checkpoint_path", str(missing / "c.pth"), "--save_path", str(tmp_path / "out"),
                          "--device", "cpu", "--precision", "int8"]) == 2
    assert capsys.readouterr().err == ("error: --precision int8 runs an int8-quantised export, not the torch path: "
                                       "export.py --format onnx --quantize int8 --out DIR, then --runtime "
                                       "onnxruntime|openvino --model DIR\n")
    assert not (tmp_path / "out").exists()
