"""``serve.py``'s command line, parsed once into a frozen :class:`ServeConfig`.

The model, scoring and thresholds flags are ``test_one_example.py``'s (the same definitions and
checks, :mod:`pipeline.cli` and :mod:`pipeline.prediction`), so an image posted to the service is
scored and judged exactly as ``test_one_example.py`` scores and judges the same file.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from pipeline.cli import (add_checkpoint_arg, add_memory_args, add_model_args, add_scoring_args, add_sigma_arg,
                          check_positive, cli_parser, parse_config, scored_run_specs)
from pipeline.config import LoaderSpec, RunRecord
from pipeline.prediction import PredictionConfig, add_threshold_args, checked_memory_spec

logger = logging.getLogger(__name__)

TOKEN_ENV = "ANOMALYCLIP_TOKEN"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
BATCH_FORWARDS = ("one_pass", "per_image")


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``serve.py`` was asked to do (frozen; see :func:`parse_args`).

    Attributes:
        prediction: How each image is scored and judged: the model, scoring and thresholds flags, as
            ``test_one_example.py`` holds them (its ``image_path``/``save_path`` are unused: ``""``).
        host: Address to listen on.
        port: TCP port.
        max_batch: Most images one forward pass takes.
        max_wait_ms: Longest a first image waits for others to fill its batch.
        max_queue: Most images waiting for the model; beyond it requests get 503 with Retry-After.
        max_request_mb: Largest request body (MiB); larger ones get 413.
        max_pixels: Largest image (width x height) decoded; larger ones get 413 before decoding.
        max_connections: Most open connections (uvicorn's ``limit_concurrency``; beyond it 503).
        grace_s: On SIGTERM, how long in-flight requests may take to finish.
        token: Bearer token the API requires (``None``: none).
        insecure: Listen on a non-loopback address without a token.
        thresholds_file_writable: ``PUT /thresholds`` also rewrites ``--thresholds`` FILE.
        batch_forward: ``one_pass``: a batch goes through the vision tower in one pass (several times the
            throughput on a CPU; scores within ~1e-7 of an image scored alone); ``per_image``: image by image
            on a CPU, exactly test_one_example.py's arithmetic. No difference on a GPU or with ``--runtime``.
    """

    prediction: PredictionConfig
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_request_mb: float = 32.0
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    max_connections: int = 100
    grace_s: float = 30.0
    token: str | None = None
    insecure: bool = False
    thresholds_file_writable: bool = False
    batch_forward: str = "one_pass"

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)


def build_parser():
    parser = cli_parser("AnomalyCLIP as an HTTP service: POST /predict, a web page at /, Prometheus /metrics.")
    add_checkpoint_arg(parser)
    add_model_args(parser)
    add_sigma_arg(parser)
    add_threshold_args(parser)
    add_scoring_args(parser, "run an exported graph (export.py) with ONNX Runtime or OpenVINO, without torch",
                     "with --runtime: the folder export.py wrote (its design replaces the model flags)")
    add_memory_args(parser, dataset=False)  # test_one_example.py's --memory FILE / --reference_path DIR
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on; a non-loopback one needs --token (or --insecure)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port")
    parser.add_argument("--max_batch", type=int, default=8, help="most images in one forward pass")
    parser.add_argument("--batch_forward", choices=BATCH_FORWARDS, default="one_pass",
                        help="one_pass: a batch goes through the tower in one pass (default; several times the "
                             "CPU throughput, scores within 1e-6 of an image alone); per_image: image by image on a "
                             "CPU, test_one_example.py's exact arithmetic")
    parser.add_argument("--max_wait_ms", type=float, default=5.0,
                        help="longest the first image of a batch waits for more images")
    parser.add_argument("--max_queue", type=int, default=64,
                        help="most images waiting for the model; beyond it: 503 with Retry-After")
    parser.add_argument("--max_request_mb", type=float, default=32.0, help="largest request body in MiB (else 413)")
    parser.add_argument("--max_pixels", type=int, default=ServeConfig.max_pixels,
                        help="largest image (width x height) decoded (else 413; Pillow's decompression-bomb limit)")
    parser.add_argument("--max_connections", type=int, default=100, help="most open connections (else 503)")
    parser.add_argument("--grace_s", type=float, default=30.0,
                        help="on SIGTERM: how long the requests in flight may take to finish")
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV} when set; the "
                             "environment keeps it out of the process list)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without a token (a trusted network only)")
    parser.add_argument("--thresholds_file_writable", action="store_true",
                        help="PUT /thresholds also rewrites the --thresholds file (atomically); else in memory only")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> ServeConfig:
    """The command line, parsed once into a :class:`ServeConfig` (shared flag checks included)."""
    return parse_config(build_parser(), argv, _config)


def _config(flags: RunRecord) -> ServeConfig:
    values = flags.values
    model, scoring, flags = scored_run_specs(flags)
    prediction = PredictionConfig(
        image_path="", save_path="", model=model, loader=LoaderSpec(batch_size=values["max_batch"]),
        scoring=scoring, threshold=values["threshold"], pixel_threshold=values["pixel_threshold"],
        thresholds=values["thresholds"], class_name=values["class_name"], vis_scale=values["vis_scale"],
        accept_thresholds=values["accept_thresholds"], record=flags.with_values(token=None),
        memory=checked_memory_spec(flags, scoring))
    token = values["token"] if values["token"] is not None else os.environ.get(TOKEN_ENV) or None
    config = ServeConfig(
        prediction=prediction, host=values["host"], port=values["port"], max_batch=values["max_batch"],
        max_wait_ms=values["max_wait_ms"], max_queue=values["max_queue"], max_request_mb=values["max_request_mb"],
        max_pixels=values["max_pixels"], max_connections=values["max_connections"], grace_s=values["grace_s"],
        token=token, insecure=values["insecure"], thresholds_file_writable=values["thresholds_file_writable"],
        batch_forward=values["batch_forward"])
    check_serve_config(config)
    return config


def check_serve_config(config: ServeConfig) -> None:
    """The service's own flags; one-line errors (the model flags are checked by ``scored_run_specs``)."""
    check_positive(max_batch=config.max_batch, max_queue=config.max_queue, max_pixels=config.max_pixels,
                   max_connections=config.max_connections)
    if not 1 <= config.port <= 65535:
        raise AnomalyCLIPError(f"--port {config.port} must be in 1..65535")
    for flag, value in (("max_wait_ms", config.max_wait_ms), ("grace_s", config.grace_s)):
        if not (math.isfinite(value) and value >= 0):
            raise AnomalyCLIPError(f"--{flag} {value} must be a finite number >= 0")
    if not (math.isfinite(config.max_request_mb) and config.max_request_mb > 0):
        raise AnomalyCLIPError(f"--max_request_mb {config.max_request_mb} must be a positive number")
    if config.token is not None and not config.token.strip():
        raise AnomalyCLIPError("--token is empty: give a secret, or leave the flag out")
    if config.thresholds_file_writable and config.prediction.thresholds is None:
        raise AnomalyCLIPError("--thresholds_file_writable rewrites --thresholds FILE: add --thresholds, or drop it")
    if not is_loopback(config.host) and config.token is None and not config.insecure:
        raise AnomalyCLIPError(f"--host {config.host} is not a loopback address: anyone who reaches it could use the "
                               f"service; give --token (or ${TOKEN_ENV}; clients send 'Authorization: Bearer TOKEN'), "
                               "or add --insecure on a trusted network")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def security_warnings(config: ServeConfig) -> list[str]:
    """What the log warns about at start (a non-loopback address without a token)."""
    if not is_loopback(config.host) and config.token is None:
        return [f"warning: --insecure: serving on {config.host}:{config.port} without a token; anyone who reaches "
                "this address can score images and change the thresholds"]
    return []
