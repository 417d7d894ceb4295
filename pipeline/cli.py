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
from typing import NoReturn

from AnomalyCLIP_lib.errors import AnomalyCLIPError, FlagError, PeerFailed, one_line, user_error_line
from AnomalyCLIP_lib.pretrained import available_models, backbone_sha256, sha256_of

DEFAULT_BACKBONE = "ViT-L/14@336px"


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
    parser.add_argument("--reference_arithmetic", action="store_true",
                        help="compute DPAM attention with the released code's arithmetic: bit-identical to the "
                             "original on the same CPU kernels, slower (default: fused attention, equal to ~1e-6)")


def check_args(args: argparse.Namespace, at_least_one: Sequence[str] = (),
               more: Callable[[argparse.Namespace], None] | None = None) -> None:
    """:func:`_check_flags`, then the calling CLI's own checks ``more``; errors as :class:`FlagError`
    (printed once under torchrun)."""
    try:
        _check_flags(args, at_least_one)
        if more is not None:
            more(args)
    except FlagError:
        raise
    except AnomalyCLIPError as error:
        raise FlagError(str(error)) from None


def _check_flags(args: argparse.Namespace, at_least_one: Sequence[str] = ()) -> None:
    """The checks of the flags that every CLI shares, before anything heavy runs; one-line errors.

    With ``--runtime``, the export's design then replaces the model flags (:func:`use_export_settings`).

    Args:
        args: Parsed flags of ``train.py``, ``test.py`` or ``test_one_example.py``; checks apply to
            the flags the namespace has.
        at_least_one: Further integer flags of the calling CLI that must be >= 1.
    """
    for name in ("batch_size", "image_size", "n_ctx", "depth", "t_n_ctx", *at_least_one):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise AnomalyCLIPError(f"--{name} {value} must be at least 1")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:
        raise AnomalyCLIPError(f"--seed {seed} must be in 0..{2**32 - 1} (numpy's seed range)")
    workers = getattr(args, "num_workers", None)
    if workers is not None and workers < 0:
        raise AnomalyCLIPError(f"--num_workers {workers} must be >= 0 (0 decodes images in the main process)")
    sigma = getattr(args, "sigma", None)
    if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
        raise AnomalyCLIPError(f"--sigma {sigma} must be a finite number >= 0 (0 turns the smoothing off; "
                               "the original uses 4)")
    image_size = getattr(args, "image_size", None)
    if sigma is not None and image_size is not None and sigma > image_size:
        raise AnomalyCLIPError(f"--sigma {sigma} is wider than the image (--image_size {image_size}): the filter "
                               f"would only flatten the map; use at most {image_size} (the original uses 4)")
    if hasattr(args, "features_list"):
        if len(set(args.features_list)) != len(args.features_list):
            raise AnomalyCLIPError(f"--features_list {' '.join(map(str, args.features_list))} repeats a layer")
        first = args.feature_map_layer[0]
        if not 0 <= first < len(args.features_list):
            raise AnomalyCLIPError(
                f"--feature_map_layer {first} must index --features_list ({len(args.features_list)} layer(s)): "
                f"use 0..{len(args.features_list) - 1} (0 sums the maps of every layer)")
    for flag in ("save_path", "out"):
        if getattr(args, flag, None):
            check_output_folder(getattr(args, flag), f"--{flag}")
    if hasattr(args, "runtime"):
        _check_runtime_flags(args)
        if args.runtime != "torch":
            use_export_settings(args)


def check_output_folder(folder: str | os.PathLike, flag: str) -> None:
    """Refuse an output folder that is a file or lies under one, before any work (nothing is created here)."""
    path = Path(folder)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == path else f"lies under {part}, which is a file"
                raise AnomalyCLIPError(f"{flag} {folder} {where}; give a folder")
            return


def _check_runtime_flags(args: argparse.Namespace) -> None:
    """``--runtime`` scores with an exported graph, which needs ``--model``; the torch path needs a checkpoint."""
    if args.runtime == "torch":
        if args.model is not None:
            raise AnomalyCLIPError("--model is an export folder for --runtime onnxruntime|openvino; add --runtime")
        if not args.checkpoint_path:
            raise AnomalyCLIPError("--checkpoint_path is required (or --runtime onnxruntime|openvino --model DIR)")
    elif not args.model:
        raise AnomalyCLIPError(f"--runtime {args.runtime} needs --model DIR, a folder written by export.py")


_NOT_GIVEN = object()
GIVEN_FLAGS = "_given_flags"  # attribute of parsed flags: the destinations the command line set (not defaults)


def parse_noting_given(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, noting in ``args._given_flags`` which flags the command line gave.

    A flag given with its default value counts as given: the check of an export's settings
    (:func:`use_export_settings`) must not take an explicit ``--image_size 518`` for a default.
    """
    args = parser.parse_args(argv)
    # argparse fills in a default only where the namespace lacks the attribute: what stays a sentinel was not given.
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), _NOT_GIVEN)))
    setattr(args, GIVEN_FLAGS, frozenset(dest for dest, value in vars(probe).items() if value is not _NOT_GIVEN))
    return args


def add_sigma_arg(parser: argparse.ArgumentParser) -> None:
    """``--sigma``, the Gaussian filter of the maps (test.py, test_one_example.py, export.py)."""
    parser.add_argument("--sigma", type=float, default=4, help="Gaussian filter sigma for the maps")


def use_export_settings(args: argparse.Namespace) -> None:
    """The exported graph of ``--model`` fixes the design: its settings replace the model flags (and are recorded
    so). Reads only the export's manifest: call it before the graph loads.

    Raises:
        AnomalyCLIPError: A design flag the command line gave differs from the export's (the graph cannot
            honour it), or ``--checkpoint_path``/``--backbone`` name other files than the export was made from.
    """
    from deploy.runtime import MANIFEST_NAME, RECORD_FIELDS, check_fields, read_manifest  # only --runtime

    manifest = read_manifest(args.model)
    check_fields(manifest, RECORD_FIELDS, Path(args.model) / MANIFEST_NAME)
    scoring = manifest["scoring"]
    fixed = {"image_size": manifest["image_size"], "sigma": float(scoring["sigma"]),
             "features_list": list(scoring["features_list"]), "feature_map_layer": [scoring["feature_map_layer"]],
             "reference_arithmetic": scoring["reference_arithmetic"], "precision": scoring["precision"],
             **{name: manifest["design"][name] for name in ("n_ctx", "depth", "t_n_ctx")}}
    differing = _export_mismatches(args, manifest, fixed)
    if differing:
        raise AnomalyCLIPError(f"{'; '.join(differing)}: {args.model} was exported otherwise and an exported "
                               "graph's design is fixed; drop the flag(s), or run export.py again with them")
    for name, value in fixed.items():
        setattr(args, name, value)
    args.checkpoint_path = args.checkpoint_path or manifest["checkpoint"]["path"]
    args.backbone = manifest["backbone"]["name"]


def _export_mismatches(args: argparse.Namespace, manifest: dict, fixed: dict[str, object]) -> list[str]:
    """The flags the command line gave that the export cannot honour, each as ``--flag value (the export's: …)``."""
    given = getattr(args, GIVEN_FLAGS, frozenset())
    differing = [f"--{name} {_shown(getattr(args, name))} (the export's: {_shown(value)})"
                 for name, value in fixed.items()
                 if name in given and not _same_setting(name, getattr(args, name), value)]
    files = (("checkpoint_path", manifest["checkpoint"]["path"], manifest["checkpoint"]["sha256"], sha256_of),
             ("backbone", manifest["backbone"]["name"], manifest["backbone"]["sha256"], backbone_sha256))
    for name, recorded, sha256, digest in files:
        if name in given and not _same_file(getattr(args, name), recorded, sha256, digest):
            differing.append(f"--{name} {getattr(args, name)} (not the file the export was made from)")
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


def add_loader_args(parser: argparse.ArgumentParser, batch_help: str) -> None:
    """``--batch_size`` and ``--num_workers`` (the latter resolved per device by :func:`resolve_num_workers`)."""
    parser.add_argument("--batch_size", type=int, default=8, help=batch_help)
    parser.add_argument("--num_workers", type=int, default=None,
                        help="DataLoader worker processes (default: 2 on a GPU; on a CPU, 2 at most and only "
                             "on cores that PyTorch's threads leave free)")


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
        print("terminated", file=sys.stderr)
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
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except AnomalyCLIPError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, MemoryError, RuntimeError) as exc:
        line = user_error_line(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
