"""The command-line layer shared by train.py, test.py and test_one_example.py (and export.py).

Flag definitions, their checks, and how a CLI reports a user error (one ``error: ...`` line, exit
status 2). Free of torch, so the deployment path of ``test_one_example.py --runtime`` runs where
only numpy, Pillow and an inference runtime are installed.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from AnomalyCLIP_lib.errors import AnomalyCLIPError, FlagError, PeerFailed, one_line, user_error_line
from AnomalyCLIP_lib.pretrained import available_models, backbone_sha256, sha256_of
from deploy.manifest import RUNTIMES
from pipeline.config import DEFAULT_BACKBONE, LoaderSpec, ModelSpec, RunRecord, ScoringSpec, replaced as replace


T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose mistakes (unknown flag, bad value) are one ``error:`` line; the usage is behind --help."""

    def error(self, message: str) -> NoReturn:
        if prints_errors():
            print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def prints_errors() -> bool:
    """Whether this process prints errors every process finds alike: rank 0 under torchrun, else always."""
    return os.environ.get("RANK", "0") == "0"


def cli_parser(description: str) -> argparse.ArgumentParser:
    """The argument parser of every command-line tool: ``--help`` shows each flag's default."""
    return OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags that describe the backbone and the prompt design (the original's names)."""
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE,
                        help=f"registry name ({', '.join(available_models())}) or a CLIP checkpoint file")
    parser.add_argument("--trust_backbone", action="store_true",
                        help="load a TorchScript --backbone whose SHA-256 is not a registered one (it runs code)")
    parser.add_argument("--depth", type=int, default=9, help="deep text-token depth")
    parser.add_argument("--n_ctx", type=int, default=12, help="learnable prompt length")
    parser.add_argument("--t_n_ctx", type=int, default=4, help="deep text-token length")
    parser.add_argument("--features_list", type=int, nargs="+", default=[24],
                        help="vision layers whose patch tokens make the maps (released: 24; paper: 6 12 18 24)")
    parser.add_argument("--feature_map_layer", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="only the first value is used: index of the first features_list layer summed")
    parser.add_argument("--image_size", type=int, default=518, help="input side in pixels")
    parser.add_argument("--seed", type=int, default=111, help="random seed")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each forward pass (default: PyTorch's, within the CPUs this process "
                             "may use; OMP_NUM_THREADS when set)")
    parser.add_argument("--reference_arithmetic", action="store_true",
                        help="compute DPAM attention with the released code's arithmetic: bit-identical to the "
                             "original on the same CPU kernels, slower (default: fused attention, equal to ~1e-6)")


_NOT_GIVEN = object()  # parse_flags: a flag still holding it after parsing was not given


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> RunRecord:
    """Parse ``argv`` once: the flags' values (defaults included) and which ones the command line gave.

    A flag given with its default value counts as given: the check of an export's settings
    (:func:`with_export_settings`) must not take an explicit ``--image_size 518`` for a default.
    """
    values = vars(parser.parse_args(argv))
    # argparse fills in a default only where the namespace lacks the attribute: what stays a sentinel was not given.
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(values, _NOT_GIVEN)))
    return RunRecord(values, frozenset(dest for dest, value in vars(probe).items() if value is not _NOT_GIVEN))


def model_spec(flags: RunRecord) -> ModelSpec:
    """The :class:`ModelSpec` of :func:`add_model_args`' flags (``--feature_map_layer``: its first value)."""
    values = flags.values
    return ModelSpec(backbone=values["backbone"], trust_backbone=values["trust_backbone"], n_ctx=values["n_ctx"],
                     depth=values["depth"], t_n_ctx=values["t_n_ctx"], features_list=tuple(values["features_list"]),
                     feature_map_layer=values["feature_map_layer"][0], image_size=values["image_size"],
                     reference_arithmetic=values["reference_arithmetic"], seed=values["seed"],
                     device=values["device"], threads=values.get("threads"))


def loader_spec(flags: RunRecord) -> LoaderSpec:
    """The :class:`LoaderSpec` of ``--batch_size`` and ``--num_workers`` (where the CLI has them)."""
    return LoaderSpec(batch_size=flags.values["batch_size"], num_workers=flags.values.get("num_workers"))


def scoring_spec(flags: RunRecord) -> ScoringSpec:
    """The :class:`ScoringSpec` of ``--checkpoint_path``, ``--sigma``, ``--precision``, ``--runtime``, ``--model``."""
    values = flags.values
    return ScoringSpec(checkpoint_path=values.get("checkpoint_path"), sigma=float(values.get("sigma", 4.0)),
                       precision=values.get("precision", "fp32"), runtime=values.get("runtime", "torch"),
                       model_dir=values.get("model"))


def checked(build: Callable[[], T]) -> T:
    """``build()`` (a config made from flags and checked); its :class:`AnomalyCLIPError` becomes a
    :class:`FlagError`, which only rank 0 prints under torchrun (every rank finds it alike)."""
    try:
        return build()
    except FlagError:
        raise
    except AnomalyCLIPError as error:
        raise FlagError(str(error)) from None


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None, build: Callable[[RunRecord], T]) -> T:
    """A CLI's command line parsed once (:func:`parse_flags`) and turned into its checked, frozen config."""
    flags = parse_flags(parser, argv)
    return checked(lambda: build(flags))


def scored_run_specs(flags: RunRecord) -> tuple[ModelSpec, ScoringSpec, RunRecord]:
    """The model and scoring settings of a run that scores images (test.py, test_one_example.py), checked.

    With ``--runtime``, the export's design replaces the model flags (:func:`with_export_settings`,
    which also returns the run's record with the export's values); else the device and precision are
    checked against this machine.
    """
    model, scoring = model_spec(flags), scoring_spec(flags)
    check_model_spec(model)
    check_sigma(scoring.sigma, model.image_size)
    if "save_path" in flags.values:  # serve.py writes no outputs
        check_output_folder(flags.values["save_path"], "--save_path")
    check_scoring_spec(scoring)
    if scoring.exported:
        return with_export_settings(model, scoring, flags)
    check_device_and_precision(model.device, scoring.precision)
    return model, scoring, flags


def check_positive(**values: int | None) -> None:
    """Integer flags that must be at least 1 (``None``: not given)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise AnomalyCLIPError(f"--{name} {value} must be at least 1")


def check_model_spec(model: ModelSpec) -> None:
    """The checks of the model flags every CLI shares, before anything heavy runs; one-line errors."""
    check_positive(image_size=model.image_size, n_ctx=model.n_ctx, depth=model.depth, t_n_ctx=model.t_n_ctx)
    if model.threads is not None and model.threads < 1:
        raise AnomalyCLIPError(f"--threads {model.threads} must be at least 1; leave it out for PyTorch's default")
    if not 0 <= model.seed < 2**32:
        raise AnomalyCLIPError(f"--seed {model.seed} must be in 0..{2**32 - 1} (numpy's seed range)")
    if len(set(model.features_list)) != len(model.features_list):
        raise AnomalyCLIPError(f"--features_list {' '.join(map(str, model.features_list))} repeats a layer")
    if not 0 <= model.feature_map_layer < len(model.features_list):
        count = len(model.features_list)
        raise AnomalyCLIPError(
            f"--feature_map_layer {model.feature_map_layer} must index --features_list ({count} layer(s)): "
            f"use 0..{count - 1} (0 sums the maps of every layer)")


def check_loader_spec(loader: LoaderSpec) -> None:
    """``--batch_size`` at least 1, ``--num_workers`` not negative."""
    check_positive(batch_size=loader.batch_size)
    if loader.num_workers is not None and loader.num_workers < 0:
        raise AnomalyCLIPError(f"--num_workers {loader.num_workers} must be >= 0 (0 decodes images in the main "
                               "process)")


def check_sigma(sigma: float, image_size: int) -> None:
    """``--sigma``: finite, not negative, not wider than the image."""
    if not (math.isfinite(sigma) and sigma >= 0):
        raise AnomalyCLIPError(f"--sigma {sigma} must be a finite number >= 0 (0 turns the smoothing off; "
                               "the original uses 4)")
    if sigma > image_size:
        raise AnomalyCLIPError(f"--sigma {sigma} is wider than the image (--image_size {image_size}): the filter "
                               f"would only flatten the map; use at most {image_size} (the original uses 4)")


def check_scoring_spec(scoring: ScoringSpec) -> None:
    """``--runtime`` scores with an exported graph, which needs ``--model``; the torch path needs a checkpoint."""
    if scoring.runtime == "torch":
        if scoring.model_dir is not None:
            raise AnomalyCLIPError("--model is an export folder for --runtime onnxruntime|openvino; add --runtime")
        if not scoring.checkpoint_path:
            raise AnomalyCLIPError("--checkpoint_path is required (or --runtime onnxruntime|openvino --model DIR)")
    elif not scoring.model_dir:
        raise AnomalyCLIPError(f"--runtime {scoring.runtime} needs --model DIR, a folder written by export.py")


def check_device_and_precision(device: str | None, precision: str = "fp32", where: str = "") -> None:
    """``--device`` names a device this machine has, and ``--precision`` runs on it through torch.

    fp16/bf16 autocast on CUDA; bf16 autocast on a CPU with bfloat16 instructions; int8 only
    through a quantised export. Checked before any data or model loads (torch is imported here
    only for the torch path).
    """
    from AnomalyCLIP_lib.precision import check_cpu_bf16
    from pipeline.loading import resolve_device  # torch: the torch path only

    resolved = resolve_device(device)
    if precision == "int8":
        raise AnomalyCLIPError("--precision int8 runs an int8-quantised export, not the torch path: export.py "
                               "--format onnx --quantize int8 --out DIR, then --runtime onnxruntime|openvino "
                               "--model DIR")
    if precision == "fp32" or resolved.type == "cuda":
        return
    if resolved.type == "cpu" and precision == "bf16":
        check_cpu_bf16()
        return
    raise AnomalyCLIPError(f"--precision {precision} needs a CUDA device and this run is on {resolved}{where}; "
                           "use --precision fp32 (the default)" +
                           (", or bf16 on a CPU with bfloat16 instructions, or fp16 through an export "
                            "(--runtime openvino)" if resolved.type == "cpu" else ""))


def check_output_folder(folder: str | os.PathLike, flag: str) -> None:
    """Refuse an output folder that is a file or lies under one, before any work (nothing is created here)."""
    path = Path(folder)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == path else f"lies under {part}, which is a file"
                raise AnomalyCLIPError(f"{flag} {folder} {where}; give a folder")
            return


def add_sigma_arg(parser: argparse.ArgumentParser) -> None:
    """``--sigma``, the Gaussian filter of the maps (test.py, test_one_example.py, export.py)."""
    parser.add_argument("--sigma", type=float, default=4, help="Gaussian filter sigma for the maps")


def add_scoring_args(parser: argparse.ArgumentParser, runtime_help: str, model_help: str) -> None:
    """``--precision``, ``--runtime`` and ``--model`` (test.py, test_one_example.py)."""
    from AnomalyCLIP_lib.precision import RUN_PRECISIONS

    parser.add_argument("--precision", choices=RUN_PRECISIONS, default="fp32",
                        help="torch: fp16/bf16 autocast on CUDA, bf16 on a CPU with bfloat16 instructions; "
                             "--runtime openvino: fp16/bf16 inference precision; int8: an export made with "
                             "export.py --quantize int8 (default fp32, the reference)")
    parser.add_argument("--runtime", choices=("torch", *RUNTIMES), default="torch", help=runtime_help)
    parser.add_argument("--model", default=None, help=model_help)


def add_memory_args(parser: argparse.ArgumentParser, dataset: bool) -> None:
    """The few-shot memory's flags (:mod:`pipeline.memory`): test.py (``dataset``) or test_one_example.py."""
    from AnomalyCLIP_lib.memory_config import DEFAULT_MEMORY_LAYERS, DEFAULT_MEMORY_WEIGHT, MEMORY_STREAMS

    group = parser.add_argument_group("few-shot reference images (a memory of normal patches; no training)")
    if dataset:
        group.add_argument("--k_shot", type=int, default=0,
                           help="normal reference images per class, drawn with --seed from the train split "
                                "(or from --reference_path); 0: zero-shot (default)")
        group.add_argument("--reference_path", default=None, metavar="DIR",
                           help="normal reference images in DIR/<class>/ (all of them, or --k_shot drawn)")
        group.add_argument("--references_from_test", action="store_true",
                           help="draw the --k_shot references from the test normals and leave them out of the "
                                "evaluation (datasets without train normals)")
    else:
        group.add_argument("--reference_path", default=None, metavar="DIR",
                           help="a folder of normal images of the part: builds the memory")
        group.add_argument("--memory", default=None, metavar="FILE", help="a memory written by --save_memory")
        group.add_argument("--save_memory", default=None, metavar="FILE",
                           help="write the memory built from --reference_path (.npz, no pickle)")
    group.add_argument("--memory_layers", type=int, nargs="+", default=list(DEFAULT_MEMORY_LAYERS),
                       help="vision layers whose patch tokens the memory holds (default 6 12 18 24)")
    group.add_argument("--memory_stream", choices=MEMORY_STREAMS, default="dpam",
                       help="dpam: the tokens the zero-shot maps use (default); plain: the original CLIP stream's")
    group.add_argument("--memory_weight", type=float, default=DEFAULT_MEMORY_WEIGHT,
                       help="w in map = (1-w) zero-shot + w memory, score = (1-w) zero-shot + w max(memory map) "
                            f"(default {DEFAULT_MEMORY_WEIGHT})")


def memory_spec(flags: RunRecord):
    """The run's :class:`pipeline.memory.MemorySpec`, checked (``None`` for commands without the flags)."""
    from AnomalyCLIP_lib.memory_config import MemorySettings
    from pipeline.memory import MemorySpec, check_memory_spec

    values = flags.values
    if "memory_layers" not in values:
        return None
    if not math.isfinite(values["memory_weight"]):
        raise AnomalyCLIPError(f"--memory_weight {values['memory_weight']} is not a finite number")
    settings = MemorySettings(layers=tuple(values["memory_layers"]), stream=values["memory_stream"],
                              weight=values["memory_weight"])
    given = frozenset(name for name, flag in (("layers", "memory_layers"), ("stream", "memory_stream"),
                                               ("weight", "memory_weight")) if flag in flags.given)
    spec = MemorySpec(k_shot=values.get("k_shot", 0), reference_path=values.get("reference_path"),
                      references_from_test=values.get("references_from_test", False),
                      memory_file=values.get("memory"), save_memory=values.get("save_memory"),
                      settings=settings, given=given)
    check_memory_spec(spec)
    return spec


def with_export_settings(model: ModelSpec, scoring: ScoringSpec, flags: RunRecord
                         ) -> tuple[ModelSpec, ScoringSpec, RunRecord]:
    """The settings of a run on the exported graph of ``--model``: its design replaces the model flags.

    Reads only the export's manifest: call it before the graph loads. Returns new configs (and the
    record of the run with the export's values); the given ones are left as they are.

    Raises:
        AnomalyCLIPError: A design flag the command line gave differs from the export's (the graph cannot
            honour it), or ``--checkpoint_path``/``--backbone`` name other files than the export was made from.
    """
    from deploy.manifest import MANIFEST_NAME, RECORD_FIELDS, check_fields, read_manifest, run_precision  # --runtime

    manifest = read_manifest(scoring.model_dir)
    check_fields(manifest, RECORD_FIELDS, Path(scoring.model_dir) / MANIFEST_NAME)
    settings = manifest["scoring"]
    fixed = {"image_size": manifest["image_size"], "sigma": float(settings["sigma"]),
             "features_list": list(settings["features_list"]), "feature_map_layer": [settings["feature_map_layer"]],
             "reference_arithmetic": settings["reference_arithmetic"],
             **{name: manifest["design"][name] for name in ("n_ctx", "depth", "t_n_ctx")}}
    differing = _export_mismatches(flags, manifest, fixed)
    if differing:
        raise AnomalyCLIPError(f"{'; '.join(differing)}: {scoring.model_dir} was exported otherwise and an exported "
                               "graph's design is fixed; drop the flag(s), or run export.py again with them")
    precision = run_precision(manifest, scoring.model_dir, scoring.runtime, scoring.precision,
                              "precision" in flags.given)
    checkpoint = scoring.checkpoint_path or manifest["checkpoint"]["path"]
    backbone = manifest["backbone"]["name"]
    new_model = replace(model, backbone=backbone, image_size=fixed["image_size"],
                        features_list=tuple(fixed["features_list"]), feature_map_layer=settings["feature_map_layer"],
                        reference_arithmetic=fixed["reference_arithmetic"],
                        n_ctx=fixed["n_ctx"], depth=fixed["depth"], t_n_ctx=fixed["t_n_ctx"])
    new_scoring = replace(scoring, checkpoint_path=checkpoint, sigma=fixed["sigma"], precision=precision)
    return new_model, new_scoring, flags.with_values(**fixed, precision=precision, checkpoint_path=checkpoint,
                                                     backbone=backbone)


def _export_mismatches(flags: RunRecord, manifest: dict, fixed: dict[str, object]) -> list[str]:
    """The flags the command line gave that the export cannot honour, each as ``--flag value (the export's: …)``."""
    values = flags.values
    differing = [f"--{name} {_shown(values[name])} (the export's: {_shown(value)})"
                 for name, value in fixed.items()
                 if name in flags.given and not _same_setting(name, values[name], value)]
    files = (("checkpoint_path", manifest["checkpoint"]["path"], manifest["checkpoint"]["sha256"], sha256_of),
             ("backbone", manifest["backbone"]["name"], manifest["backbone"]["sha256"], backbone_sha256))
    for name, recorded, sha256, digest in files:
        if name in flags.given and not _same_file(values[name], recorded, sha256, digest):
            differing.append(f"--{name} {values[name]} (not the file the export was made from)")
    return differing


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _same_setting(name: str, value: object, fixed: object) -> bool:
    if name == "feature_map_layer":  # only the first value is used
        return value[0] == fixed[0]
    return value == fixed


def _same_file(given: str, recorded: str, sha256: str, digest: Callable[[str], str]) -> bool:
    """Whether ``given`` is the recorded file: the same string, else the same SHA-256 (a registry name's is known)."""
    if str(given) == recorded:
        return True
    try:
        return digest(given) == sha256
    except OSError:
        return False


def add_checkpoint_arg(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--checkpoint_path``: the prompt checkpoint (with ``--runtime``, the export's is used when not given)."""
    parser.add_argument("--checkpoint_path", default=None, required=required,
                        help="prompt checkpoint (ours or the original's)" +
                             ("" if required else "; not needed with --runtime"))


def add_save_path_arg(parser: argparse.ArgumentParser, default: str, holds: str) -> None:
    """``--save_path``: the run's output folder (checked by :func:`check_output_folder`, locked while in use)."""
    parser.add_argument("--save_path", default=default, help=f"folder for {holds}")


def add_loader_args(parser: argparse.ArgumentParser, batch_help: str, workers: bool = True) -> None:
    """``--batch_size`` and (``workers``) ``--num_workers``, resolved per device by ``resolve_num_workers``."""
    parser.add_argument("--batch_size", type=int, default=8, help=batch_help)
    if not workers:
        return
    parser.add_argument("--num_workers", type=int, default=None,
                        help="DataLoader worker processes (default: 2 on a GPU; on a CPU, 2 at most and only "
                             "on cores that PyTorch's threads and other processes leave free)")


class _Terminated(BaseException):
    """SIGTERM (a scheduler, ``docker stop``, ``timeout``): unwinds like Ctrl-C, so the clean-up runs."""


def _on_sigterm(owner: int) -> Callable[[int, object], None]:
    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked DataLoader worker: die as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Terminated

    return handler


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point; user errors print one ``error: ...`` line and exit with status 2.

    SIGTERM ends the run as Ctrl-C does (temporary files and an unkept feature cache removed),
    with exit status 143.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid())) if in_main_thread else None
    try:
        return _run(main, argv)
    except _Terminated:
        _print_stop_line("terminated")
        return 143
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# torchrun stops every rank once one has exited: the rank that prints the line gets this long to print it.
QUIET_EXIT_DELAY_S = 1.0


def _quiet_exit() -> int:
    try:
        time.sleep(QUIET_EXIT_DELAY_S)
    except _Terminated:
        pass  # torchrun stopping this rank after the printing one exited: nothing to add
    return 2


def _run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    try:
        return main(argv)
    except PeerFailed:
        return _quiet_exit()  # the rank that failed prints the error line
    except FlagError as exc:
        if not prints_errors():
            return _quiet_exit()
        _print_line(f"error: {one_line(exc)}")
        return 2
    except AnomalyCLIPError as exc:
        _print_line(f"error: {one_line(exc)}")
        return 2
    except (OSError, MemoryError, RuntimeError) as exc:
        line = user_error_line(exc)
        if line is None:
            raise
        _print_line(f"error: {line}")
        return 2
    except KeyboardInterrupt:
        _print_stop_line("interrupted")
        return 130


def _print_stop_line(line: str) -> None:
    """``interrupted``/``terminated`` once: by rank 0 under torchrun, by nobody under launch.py (it prints it)."""
    if prints_errors() and not os.environ.get("ANOMALYCLIP_LAUNCHED"):
        _print_line(line)


def _print_line(line: str) -> None:
    """``line`` on stderr, on a line of its own: open progress bars are closed first (they end their line)."""
    _close_bars()
    print(line, file=sys.stderr)


def _close_bars() -> None:
    """Close every open tqdm bar: one left open by the error would hold the line, and redraw itself after it.

    tqdm is looked up, not imported: a run that never imported it has no bar open.
    """
    tqdm_class = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm_class, "_instances", None) or ()):
        bar.close()
