"""serve.py as a real process on a free loopback port (tiny backbone): the API, its numbers against
test_one_example.py's, batching, bad input, load limits, SIGTERM, the token, and the web page in headless chromium."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from pipeline import prediction
from pipeline.cli import run_cli
from pipeline.service import config as service_config
from pipeline.service.client import ServiceProcess, multipart
from pipeline.synthetic import add_defect, class_style, render_normal
from tests.pipeline.test_report import _chromium
from tests.conftest import E2E_IMAGE_SIZE
from tests.deploy_helpers import random_prompt_learner, save_prompt_checkpoint

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
ENV = {"OMP_NUM_THREADS": "1"}


# --- fixtures ---------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files(tiny_clip_state, tiny_model, tmp_path_factory):
    """Backbone, random prompts, 4 good and 4 defective synthetic parts of several sizes."""
    root = tmp_path_factory.mktemp("service")
    torch.save(tiny_clip_state, root / "backbone.pt")
    save_prompt_checkpoint(random_prompt_learner(tiny_model), root / "prompts.pth")
    design = ["--checkpoint_path", str(root / "prompts.pth"), "--backbone", str(root / "backbone.pt"),
              "--image_size", str(E2E_IMAGE_SIZE), "--features_list", "6", "24", "--device", "cpu"]
    rng = np.random.default_rng(0)
    good, parts = root / "good", root / "parts"
    good.mkdir()
    parts.mkdir()
    for index, size in enumerate([(64, 48), (48, 64), (80, 80), (60, 40)]):
        style = class_style("weave", rng, size)
        (good / f"good_{index}.png").write_bytes(_png(render_normal(style, rng, size)))
        kind = ("scratch", "blob", "hole", "color_spot")[index]
        defective, _ = add_defect(render_normal(style, rng, size), kind, rng)
        (parts / f"part_{index}.png").write_bytes(_png(defective))
    return {"root": root, "design": design, "parts": parts, "good": good, "memory": root / "memory.npz"}


def _calibrate(files, thresholds: Path) -> None:
    """Thresholds calibrated by test_one_example.py on the good parts (target FPR 0.3), with their provenance."""
    assert prediction.main(["--image_path", str(files["good"]), *files["design"], "--calibrate", "--target_fpr", "0.3",
                            "--save_thresholds", str(thresholds), "--class_name", "weave"]) == 0


@pytest.fixture(scope="module")
def launched(files):
    """Three services started side by side (each start imports torch and loads the model, ~10 s):

    * ``main``: as test_one_example.py would judge: --thresholds FILE (writable), 1 MiB request limit;
    * ``slow``: batches of 2 that wait 1 s for their second image, a queue of 2, a token, and the few-shot
      ``--memory`` of the 4 good parts (written first by test_one_example.py --save_memory);
    * ``sigterm``: batches of 2 waiting 1 s, for the SIGTERM test (which stops it).
    """
    root = files["root"]
    thresholds = root / "served_thresholds.json"
    settings = {
        "main": ["--thresholds", str(thresholds), "--thresholds_file_writable", "--max_request_mb", "1",
                 "--max_batch", "8", "--max_wait_ms", "30"],
        "slow": ["--max_batch", "2", "--max_wait_ms", "1000", "--max_queue", "2", "--token", TOKEN,
                 "--memory", str(files["memory"])],
        "sigterm": ["--max_batch", "2", "--max_wait_ms", "1000", "--grace_s", "20"]}
    def launch(name: str) -> ServiceProcess:
        return ServiceProcess([*files["design"], *settings[name]], root / f"{name}.log", env=ENV, wait=False)

    processes = {"sigterm": launch("sigterm")}
    try:
        assert prediction.main(["--image_path", str(files["good"] / "good_0.png"), *files["design"],
                                "--reference_path", str(files["good"]), "--save_memory", str(files["memory"]),
                                "--save_path", str(root / "memory_run")]) == 0  # while that one starts
        processes["slow"] = launch("slow")
        _calibrate(files, thresholds)  # while those two start
        processes["main"] = launch("main")
        for process in processes.values():
            process.wait_ready()
        processes["main"].thresholds = thresholds
        yield processes
    finally:
        for process in processes.values():  # SIGTERM to all first: they drain side by side
            if process.process.poll() is None:
                process.process.send_signal(signal.SIGTERM)
        for process in processes.values():
            process.stop()


@pytest.fixture(scope="module")
def service(launched):
    return launched["main"]


@pytest.fixture(scope="module")
def slow_service(launched):
    return launched["slow"]


def _part_files(files) -> list[tuple[str, bytes]]:
    return [(path.name, path.read_bytes()) for path in sorted(files["parts"].iterdir())]


def _metrics(client) -> dict[str, float]:
    status, _, body = client.request("GET", "/metrics")
    assert status == 200
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _one_line_error(status: int, body: object, expected_status: int, kind: str) -> str:
    assert status == expected_status, body
    assert isinstance(body, dict) and body["kind"] == kind, body
    assert "\n" not in body["error"] and body["error"]
    return body["error"]


# --- the numbers --------------------------------------------------------------------------------


def test_predict_equals_test_one_example(service, files, tmp_path):
    """POST /predict of 4 parts (one request, one batch) = test_one_example.py --thresholds on the same files:
    score to 1e-6, verdict, defect pixels, mask PNG byte for byte, overlay pixels."""
    status, body = service.client().predict(_part_files(files), mask=True, overlay=True)
    assert status == 200, body
    served = {p["file"]: p for p in body["predictions"]}
    out = tmp_path / "cli"
    assert prediction.main(["--image_path", str(files["parts"]), *files["design"], "--thresholds",
                            str(service.thresholds), "--save_path", str(out)]) == 0
    document = json.loads((out / "predictions.json").read_text())
    assert len(document["predictions"]) == len(served) == 4
    verdicts = set()
    for row in document["predictions"]:
        name = Path(row["path"]).name
        got = served[name]
        assert abs(got["score"] - row["score"]) <= 1e-6
        assert got["verdict"] == row["verdict"] and got["defect_pixels"] == row["defect_pixels"]
        threshold = document["thresholds"]["image_threshold"]
        assert got["verdict"] == ("anomalous" if got["score"] >= threshold else "normal")
        mask_png = base64.b64decode(got["mask_png"])
        assert mask_png == (out / row["mask"]).read_bytes()
        assert np.count_nonzero(np.asarray(Image.open(io.BytesIO(mask_png)))) == got["defect_pixels"]
        overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["overlay_png"]))), dtype=int)
        assert np.abs(overlay - np.asarray(Image.open(out / row["overlay"]), dtype=int)).max() <= 1
        assert got["thresholds"]["image_threshold"] == document["thresholds"]["image_threshold"]
        assert got["thresholds"]["provenance"]["image_size"] == E2E_IMAGE_SIZE
        assert set(got["timings_ms"]) == {"decode", "queue", "model", "batch_size", "total"}
        verdicts.add(got["verdict"])
    assert verdicts == {"anomalous", "normal"} or len(verdicts) == 1  # whatever the random model says, judged alike


def test_concurrent_requests_are_batched_and_keep_their_own_scores(service, files):
    """8 concurrent one-image requests: fewer forward passes than images, and every image gets its own score
    (as scored alone, to 1e-6): a batch never hands one image's result to another request."""
    parts = _part_files(files) * 2
    client = service.client()
    alone = {}
    for name, data in parts[:4]:
        status, body = client.predict([(name, data)])
        assert status == 200
        alone[name] = body["predictions"][0]["score"]
    before = _metrics(client)
    results: dict[int, tuple[str, dict]] = {}
    barrier = threading.Barrier(len(parts))

    def send(index: int, name: str, data: bytes) -> None:
        own = service.client()
        barrier.wait()
        results[index] = (name, own.predict([(name, data)]))

    threads = [threading.Thread(target=send, args=(i, *part)) for i, part in enumerate(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == len(parts)
    for name, (status, body) in results.values():
        assert status == 200, body
        assert abs(body["predictions"][0]["score"] - alone[name]) <= 1e-6
    after = _metrics(client)
    assert _delta(after, before, "anomalyclip_images_scored_total") == len(parts)
    assert _delta(after, before, "anomalyclip_batch_size_count") < len(parts)  # some batch held several images
    assert max(body["predictions"][0]["timings_ms"]["batch_size"] for _, (_, body) in results.values()) > 1


# --- the other endpoints ------------------------------------------------------------------------


def test_health_and_model_manifest(service, files):
    client = service.client()
    status, health = client.json("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model_loaded"] is True
    status, manifest = client.json("GET", "/model")
    assert status == 200
    sha = hashlib.sha256((files["root"] / "prompts.pth").read_bytes()).hexdigest()
    assert manifest["checkpoint"]["sha256"] == sha
    assert manifest["backbone"]["sha256"] == hashlib.sha256((files["root"] / "backbone.pt").read_bytes()).hexdigest()
    assert manifest["image_size"] == E2E_IMAGE_SIZE and manifest["design"]["features_list"] == [6, 24]
    assert manifest["thresholds"]["file"] == str(service.thresholds) and manifest["memory"] is None
    assert manifest["batching"] == {"max_batch": 8, "max_wait_ms": 30.0, "max_queue": 64, "forward": "one_pass"}
    assert manifest["model_id"] == health["model_id"] and re.fullmatch(r"[0-9a-f]{16}", manifest["model_id"])
    status, _, page = client.request("GET", "/openapi.json")
    paths = json.loads(page)["paths"]
    assert status == 200 and {"/predict", "/health", "/model", "/metrics", "/thresholds"} <= set(paths)


def test_metrics_count_requests_errors_and_batches(service, files):
    """Deltas of /metrics after 3 good images in 2 requests and 1 refused body, counted by hand."""
    client = service.client()
    before = _metrics(client)
    parts = _part_files(files)
    assert client.predict(parts[:2])[0] == 200
    assert client.predict(parts[2:3])[0] == 200
    assert client.predict([("notes.txt", b"not an image")])[0] == 400
    after = _metrics(client)
    assert _delta(after, before, 'anomalyclip_requests_total{path="/predict",code="200"}') == 2
    assert _delta(after, before, 'anomalyclip_requests_total{path="/predict",code="400"}') == 1
    assert _delta(after, before, 'anomalyclip_errors_total{kind="not_an_image"}') == 1
    assert _delta(after, before, "anomalyclip_images_scored_total") == 3
    assert _delta(after, before, "anomalyclip_batch_size_sum") == 3
    assert _delta(after, before, "anomalyclip_request_latency_seconds_count") == 2
    assert _delta(after, before, 'anomalyclip_request_latency_seconds_bucket{le="+Inf"}') == 2
    assert after["anomalyclip_queue_depth"] == 0


def test_thresholds_put_is_checked_swapped_and_persisted(service, files):
    client = service.client()
    status, current = client.json("GET", "/thresholds")
    assert status == 200 and current["persisted"] is True and current["class_name"] == "weave"
    assert current["provenance"]["features_list"] == [6, 24] and current["ranges"]["pixel_threshold"] == [0.0, 2.0]
    original = service.thresholds.read_text()
    # Out of range (image scores are probabilities): refused with the CLI's line, nothing changes.
    error = _one_line_error(*client.json("PUT", "/thresholds", {"image_threshold": 1.5}), 400, "bad_thresholds")
    assert "image_threshold 1.5" in error
    # A thresholds.json made for another sigma: refused as test_one_example.py refuses it, unless accepted.
    document = json.loads(original)
    document["classes"]["weave"]["provenance"]["sigma"] = 2.0
    error = _one_line_error(*client.json("PUT", "/thresholds", document), 400, "bad_thresholds")
    assert "--sigma 4 against the thresholds' 2" in error
    assert client.json("GET", "/thresholds")[1]["image_threshold"] == current["image_threshold"]
    assert service.thresholds.read_text() == original
    status, accepted = client.json("PUT", "/thresholds", {**document, "accept_thresholds": True})
    assert status == 200 and accepted["accepted_other_settings"] and accepted["source"] == "PUT /thresholds"
    # Values: swapped in for the next request and written to the file (atomically, re-read as a thresholds.json).
    status, changed = client.json("PUT", "/thresholds", {"image_threshold": 0.25, "pixel_threshold": 0.75})
    assert status == 200 and (changed["image_threshold"], changed["pixel_threshold"]) == (0.25, 0.75)
    saved = json.loads(service.thresholds.read_text())["classes"]["weave"]
    assert (saved["image_threshold"], saved["pixel_threshold"], saved["set_by"]) == (0.25, 0.75, "PUT /thresholds")
    status, body = client.predict(_part_files(files)[:1])
    one = body["predictions"][0]
    assert one["thresholds"]["image_threshold"] == 0.25
    assert one["verdict"] == ("anomalous" if one["score"] >= 0.25 else "normal")
    status, _ = client.json("PUT", "/thresholds", json.loads(original))  # back as the other tests expect
    assert status == 200


# --- the few-shot memory -----------------------------------------------------------------------


def test_memory_scores_equal_test_one_example_and_model_reports_it(slow_service, files, tmp_path):
    """--memory FILE (the ``slow`` service): the scores of test_one_example.py --memory FILE to 1e-6, and
    GET /model reports the memory: its record as predictions.json holds it, the file and its SHA-256."""
    client = slow_service.client(TOKEN)
    parts = _part_files(files)
    served = {}
    for pair in (parts[:2], parts[2:]):  # --max_queue 2: two images per request
        status, body = client.predict(pair)
        assert status == 200, body
        served.update({p["file"]: p for p in body["predictions"]})
    out = tmp_path / "cli"
    assert prediction.main(["--image_path", str(files["parts"]), *files["design"], "--memory", str(files["memory"]),
                            "--save_path", str(out)]) == 0
    document = json.loads((out / "predictions.json").read_text())
    assert len(document["predictions"]) == len(served) == 4
    for row in document["predictions"]:
        assert abs(served[Path(row["path"]).name]["score"] - row["score"]) <= 1e-6
    status, manifest = client.json("GET", "/model")
    assert status == 200
    memory = manifest["memory"]
    assert memory["file"] == str(files["memory"])
    assert memory["file_sha256"] == hashlib.sha256(files["memory"].read_bytes()).hexdigest()
    assert {key: memory[key] for key in document["memory"]} == document["memory"]
    assert (memory["k"], memory["layers"], memory["stream"]) == (4, [6, 12, 18, 24], "dpam")
    assert {"references_sha256", "weight"} <= set(memory)


def test_memory_refuses_thresholds_of_zero_shot_or_another_memory(slow_service, service, files, capsys):
    """Thresholds made zero-shot (the ``main`` service's) or with another memory: refused at start, as
    test_one_example.py refuses them, and by PUT /thresholds."""
    from pipeline.service import server

    zero_shot = json.loads(service.thresholds.read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [*files["design"], "--memory", str(files["memory"]), "--thresholds", str(service.thresholds),
            "--port", str(port)]
    assert run_cli(server.main, argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "a memory of 4 reference(s)" in line and "zero-shot (no memory)" in line
    client = slow_service.client(TOKEN)
    error = _one_line_error(*client.json("PUT", "/thresholds", zero_shot), 400, "bad_thresholds")
    assert "zero-shot (no memory)" in error
    status, manifest = client.json("GET", "/model")
    other = json.loads(json.dumps(zero_shot))
    other["classes"]["weave"]["provenance"]["memory"] = {**manifest["memory"], "references_sha256": "0" * 64}
    error = _one_line_error(*client.json("PUT", "/thresholds", other), 400, "bad_thresholds")
    assert "another few-shot memory" in error
    same = json.loads(json.dumps(zero_shot))
    same["classes"]["weave"]["provenance"]["memory"] = {key: manifest["memory"][key] for key in
                                                        ("references_sha256", "k", "layers", "stream", "weight")}
    assert client.json("PUT", "/thresholds", same)[0] == 200  # the same memory's record: taken


# --- bad input ----------------------------------------------------------------------------------


def _png_header_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` zeros: a few tens of kB on disk, ``side``² pixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(6)
    row = b"\x00" * (1 + (side + 7) // 8)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("case", ["not_an_image", "cut_short", "bomb_over_max_pixels", "bomb_over_pillows_limit"])
def test_bad_images_are_one_line_errors_and_the_next_request_is_served(service, files, case):
    client = service.client()
    good = _part_files(files)[0]
    expected = {"not_an_image": (400, "not_an_image"), "cut_short": (400, "corrupt_image"),
                "bomb_over_max_pixels": (413, "image_too_large"), "bomb_over_pillows_limit": (413, "image_too_large")}
    if case == "not_an_image":
        upload = ("report.png", b"%PDF-1.4 this is not a PNG at all")
    elif case == "cut_short":
        upload = ("cut.png", good[1][: len(good[1]) * 2 // 3])
    else:  # 12000² = 144 M pixels: over --max_pixels (Pillow's 89 M) only; 20000²: over Pillow's own 2x limit too
        upload = ("bomb.png", _png_header_bomb(12000 if case == "bomb_over_max_pixels" else 20000))
    rss_before = _rss_kb(service.process.pid)
    error = _one_line_error(*client.predict([good, upload]), *expected[case])
    assert upload[0] in error
    if case.startswith("bomb"):
        assert _rss_kb(service.process.pid) - rss_before < 100_000  # never decoded (that takes >= 144 MB)
    status, body = client.predict([good])
    assert status == 200 and body["predictions"][0]["file"] == good[0]


def test_request_larger_than_the_limit_is_413(service):
    """--max_request_mb 1: a body announced larger, and a chunked one that grows larger, are 413; then 200."""
    client = service.client()
    body, content_type = multipart([("big.png", b"\0" * (1024 * 1024 + 10))])
    status, _, data = client.request("POST", "/predict", body, {"Content-Type": content_type})
    _one_line_error(status, json.loads(data), 413, "request_too_large")

    def chunks():
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    chunked = service.client()
    # http.client sends an iterable without Content-Length chunked (Transfer-Encoding: chunked).
    status, _, data = chunked.request("POST", "/predict", chunks(), {"Content-Type": content_type})
    _one_line_error(status, json.loads(data), 413, "request_too_large")
    assert service.client().json("GET", "/health")[0] == 200


def test_client_gone_mid_upload_costs_nothing(service):
    """A client that sends half its body and hangs up: no image scored, nothing queued, the next request served."""
    client = service.client()
    before = _metrics(client)
    with socket.create_connection(("127.0.0.1", service.port)) as raw:
        raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    b"Content-Length: 200000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"files\"; "
                    b"filename=\"a.png\"\r\n\r\n" + b"\x89PNG" * 1000)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = _metrics(client)
        if _delta(after, before, 'anomalyclip_errors_total{kind="client_disconnected"}') == 1:
            break
        time.sleep(0.1)
    assert _delta(after, before, 'anomalyclip_errors_total{kind="client_disconnected"}') == 1
    assert _delta(after, before, "anomalyclip_images_scored_total") == 0 and after["anomalyclip_queue_depth"] == 0
    assert client.json("GET", "/health")[0] == 200


# --- load: queue, disconnect while queued, SIGTERM, token --------------------------------------


def test_token_is_required_and_compared(slow_service):
    anonymous, wrong, right = slow_service.client(), slow_service.client("wrong"), slow_service.client(TOKEN)
    status, headers, data = anonymous.request("GET", "/thresholds")
    _one_line_error(status, json.loads(data), 401, "unauthorized")
    assert headers["www-authenticate"] == "Bearer"
    assert wrong.json("GET", "/model")[0] == 401 and wrong.predict([("a.png", b"x")])[0] == 401
    assert right.json("GET", "/model")[0] == 200
    assert anonymous.json("GET", "/health")[0] == 200  # liveness stays open to probes
    assert anonymous.request("GET", "/")[0] == 200  # the page itself holds no data; it asks for the token


def test_full_queue_is_503_with_retry_after(slow_service, files):
    """--max_queue 2, batches of 2 waiting 1 s: one queued image plus a request of two is over the limit."""
    first, second = slow_service.client(TOKEN), slow_service.client(TOKEN)
    parts = _part_files(files)
    answer = {}
    waiting = threading.Thread(target=lambda: answer.setdefault("first", first.predict(parts[:1])))
    waiting.start()
    time.sleep(0.3)  # the first image waits in the queue for a second one
    body, content_type = multipart(parts[1:3])
    status, headers, data = second.request("POST", "/predict", body, {"Content-Type": content_type})
    _one_line_error(status, json.loads(data), 503, "queue_full")
    assert headers["retry-after"] == "1"
    waiting.join(30)
    assert answer["first"][0] == 200


def test_client_gone_while_queued_costs_no_forward_pass(slow_service, files):
    client = slow_service.client(TOKEN)
    before = _metrics(client)
    body, content_type = multipart(_part_files(files)[:1])
    with socket.create_connection(("127.0.0.1", slow_service.port)) as raw:
        raw.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: "
                    f"{content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)  # queued, waiting 1 s for a second image
    time.sleep(1.2)  # past the wait: the batch would have run
    after = _metrics(client)
    assert _delta(after, before, 'anomalyclip_errors_total{kind="client_disconnected"}') == 1
    assert _delta(after, before, "anomalyclip_images_scored_total") == 0
    assert _delta(after, before, "anomalyclip_batch_size_count") == 0
    status, body = client.predict(_part_files(files)[:1])
    assert status == 200


def test_sigterm_stops_taking_requests_finishes_in_flight_and_exits_0(launched, files):
    process = launched["sigterm"]
    answer = {}
    client = process.client()
    in_flight = threading.Thread(target=lambda: answer.setdefault("reply", client.predict(_part_files(files)[:1])))
    in_flight.start()
    time.sleep(0.3)  # the image waits 1 s in the batcher
    process.process.send_signal(signal.SIGTERM)
    refused = False
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline and not refused:
        try:
            socket.create_connection(("127.0.0.1", process.port), timeout=0.2).close()
            time.sleep(0.05)
        except OSError:
            refused = True
    assert refused and in_flight.is_alive()  # no longer listening while the request is still in flight
    in_flight.join(30)
    status, body = answer["reply"]
    assert status == 200 and body["predictions"][0]["score"] is not None
    assert process.process.wait(30) == 0
    assert "Traceback" not in process.output()


def test_non_loopback_host_needs_a_token_or_insecure(files, capsys, monkeypatch):
    monkeypatch.delenv(service_config.TOKEN_ENV, raising=False)
    argv = [*files["design"], "--host", "0.0.0.0"]
    with pytest.raises(AnomalyCLIPError, match="not a loopback address"):
        service_config.parse_args(argv)
    assert run_cli(service_config.parse_args, argv) == 2
    assert capsys.readouterr().err.strip().startswith("error: --host 0.0.0.0 is not a loopback address")
    insecure = service_config.parse_args([*argv, "--insecure"])
    assert service_config.security_warnings(insecure)[0].startswith("warning: --insecure")
    with_token = service_config.parse_args([*argv, "--token", TOKEN])
    assert with_token.token == TOKEN and not service_config.security_warnings(with_token)
    assert not service_config.security_warnings(service_config.parse_args(files["design"]))  # 127.0.0.1


# --- the web page -------------------------------------------------------------------------------




def test_web_page_scores_an_image_in_headless_chromium(service, tmp_path):
    """/?try=/sample.png feeds the demo image through the page's upload() (the drop/pick path):
    the verdict, score and overlay appear in the DOM."""
    command = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom",
               f"http://127.0.0.1:{service.port}/?try=/sample.png"]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    card = re.search(r'<article class="result" data-verdict="(anomalous|normal)">(.*?)</article>', dom, re.S)
    assert card, dom[-2000:]
    assert re.search(r'<span class="verdict (anomalous|normal)">(anomalous|normal)</span>', card.group(2))
    assert re.search(r'<span class="score">0\.\d{4}</span>', card.group(2))
    overlay = re.search(r'<img class="overlay" alt="overlay" src="data:image/png;base64,([^"]+)"', card.group(2))
    image = Image.open(io.BytesIO(base64.b64decode(overlay.group(1))))
    assert image.size == (E2E_IMAGE_SIZE, E2E_IMAGE_SIZE)
    assert '<div class="name">sample.png</div>' in card.group(2)
    assert "sample.png: " in re.search(r'<ol id="recent">(.*?)</ol>', dom, re.S).group(1)


def _local_references(html: str) -> list[str]:
    """Every ``src``/``href`` of a page; fails on one that leaves the server (a CDN, another host)."""
    references = re.findall(r'(?:src|href)="([^"]+)"', html)
    for reference in references:
        assert reference.startswith("/") and not reference.startswith("//"), reference
    assert "http://" not in html and "https://" not in html  # nor in its inline script
    return references


def test_api_docs_load_no_external_url_and_their_files_are_served(service):
    """/docs (Swagger UI) and /redoc reference only this server; every file they load is served, byte for byte
    the fastapi-offline package's; the OpenAPI document they read is there."""
    from importlib import resources

    client = service.client()
    static = resources.files("fastapi_offline") / "static"
    loaded = set()
    for page in ("/docs", "/redoc"):
        status, headers, body = client.request("GET", page)
        assert status == 200 and headers["content-type"].startswith("text/html")
        for reference in _local_references(body.decode()):
            status, headers, data = client.request("GET", reference)
            assert status == 200, reference
            assert data == (static / reference.rsplit("/", 1)[-1]).read_bytes()
            loaded.add(reference.rsplit("/", 1)[-1])
        assert "/openapi.json" in body.decode()
    assert loaded == {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"}
    assert client.request("GET", "/docs-assets/../../app.py")[0] == 404
    assert client.request("GET", "/docs-assets/index.html")[0] == 404


def test_api_docs_render_offline_in_headless_chromium(service, tmp_path):
    """Swagger UI at /docs with every host but the service's unresolvable: the operations appear (its script
    ran, read /openapi.json, an OpenAPI 3.1 document, and rendered it)."""
    command = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=15000", "--dump-dom", f"http://127.0.0.1:{service.port}/docs"]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {"/predict", "/health", "/model", "/metrics", "/thresholds"} <= paths, dom[-2000:]


@pytest.mark.parametrize("flags, line", [
    (["--thresholds_file_writable"], "error: --thresholds_file_writable rewrites --thresholds FILE: add --thresholds"),
    (["--max_batch", "0"], "error: --max_batch 0 must be at least 1"),
    (["--max_wait_ms", "-1"], "error: --max_wait_ms -1.0 must be a finite number >= 0"),
    (["--port", "0"], "error: --port 0 must be in 1..65535"),
    (["--token", " "], "error: --token is empty"),
])
def test_service_flag_errors_are_one_line(files, capsys, flags, line):
    assert run_cli(service_config.parse_args, [*files["design"], *flags]) == 2
    assert capsys.readouterr().err.strip().startswith(line)


def test_port_in_use_is_one_line_before_the_model_loads(files, capsys):
    from pipeline.service import server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_cli(server.main, [*files["design"], "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot listen on 127.0.0.1:{port} (Address already in use)")


def test_connections_have_nagle_off():
    """bind()'s socket, served by asyncio as uvicorn serves it: each connection has TCP_NODELAY (else a response's
    body waits behind its headers for the client's delayed ACK, ~40 ms a request on Linux)."""
    import asyncio

    from pipeline.service import server

    sock = server.bind("127.0.0.1", 0)
    seen = []

    async def main() -> None:
        def connected(reader, writer) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listening = await asyncio.start_server(connected, sock=sock)
        async with listening:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(main())
    assert seen and seen[0] != 0
