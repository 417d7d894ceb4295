"""serve.py under load: N concurrent clients on loopback, batching against one image at a time.

Starts ``serve.py`` (tiny random CLIP stand-in, random prompts: the numbers are about the service, not
about anomaly detection) as a child process on a free loopback port, once per mode:

* ``single``: ``--max_batch 1`` (one image per forward pass, one request at a time through the model);
* ``batched``: ``--max_batch B --max_wait_ms W`` (concurrent requests grouped into batches).

Each mode sends ``--requests`` one-image ``POST /predict`` requests from ``--clients`` threads (keep-alive
connections), stopping early at ``--max-seconds``, and prints throughput, p50/p95/p99 latency, errors,
the batch sizes the service reports in ``/metrics``, and the server's RSS after every tenth of the
requests (growth = RSS at the end minus RSS after the first tenth). Last line: the results as JSON.

    python benchmarks/bench_serve.py                      # 1000 requests, 8 clients, 56 px, 2 threads
    python benchmarks/bench_serve.py --requests 200 --image-size 56 --modes batched
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.service.client import ServiceProcess  # noqa: E402 - after the path above


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def make_files(folder: Path, image_size: int, n_images: int) -> tuple[list[str], list[tuple[str, bytes]]]:
    """The tiny backbone, random-initialised prompts (the design flags) and ``n_images`` synthetic PNG parts."""
    import torch
    from PIL import Image

    from AnomalyCLIP_lib.model import build_model
    from pipeline.random_weights import random_state_dict
    from pipeline.synthetic import add_defect, class_style, render_normal
    from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details

    state = random_state_dict(0)
    torch.save(state, folder / "backbone.pt")
    torch.manual_seed(0)
    learner = AnomalyCLIP_PromptLearner(build_model(state), design_details(n_ctx=12, depth=9, t_n_ctx=4))
    torch.save({"prompt_learner": learner.state_dict()}, folder / "prompts.pth")
    rng = np.random.default_rng(0)
    images = []
    for index in range(n_images):
        size = (256, 256)
        picture = render_normal(class_style("weave", rng, size), rng, size)
        if index % 2:
            picture, _ = add_defect(picture, "scratch", rng)
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        images.append((f"part_{index:02d}.png", buffer.getvalue()))
    design = ["--checkpoint_path", str(folder / "prompts.pth"), "--backbone", str(folder / "backbone.pt"),
              "--image_size", str(image_size), "--features_list", "6", "12", "18", "24", "--device", "cpu",
              "--threshold", "0.5"]
    return design, images


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def _scored(service: ServiceProcess) -> tuple[float, float]:
    """``(images scored, forward passes)`` from the service's /metrics."""
    _, _, body = service.client().request("GET", "/metrics")
    values = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if line and not line.startswith("#"))
    return float(values["anomalyclip_images_scored_total"]), float(values["anomalyclip_batch_size_count"])


def run_mode(name: str, args: list[str], images: list[tuple[str, bytes]], options: argparse.Namespace,
             log: Path) -> dict:
    """One service, warmed up, then ``options.requests`` requests from ``options.clients`` threads."""
    env = {"OMP_NUM_THREADS": str(options.threads)}
    with ServiceProcess(args, log, env=env) as service:
        warm = service.client()
        for file in images[:4]:
            warm.predict([file])
        scored_before, passes_before = _scored(service)
        latencies: list[float] = []
        errors: list[str] = []
        rss: list[tuple[int, float | None]] = []
        lock = threading.Lock()
        issued = 0
        step = max(1, options.requests // 10)
        deadline = time.monotonic() + options.max_seconds

        def client_loop() -> None:
            nonlocal issued
            client = service.client(timeout=120)
            while True:
                with lock:
                    if issued >= options.requests or time.monotonic() > deadline:
                        return
                    index = issued
                    issued += 1
                start = time.perf_counter()
                try:
                    status, body = client.predict([images[index % len(images)]])
                    problem = None if status == 200 else f"HTTP {status}: {body}"
                except Exception as error:  # noqa: BLE001 - counted, the benchmark goes on
                    problem = f"{type(error).__name__}: {error}"
                elapsed = time.perf_counter() - start
                with lock:
                    if problem:
                        errors.append(problem)
                    else:
                        latencies.append(elapsed)
                    done = len(latencies) + len(errors)
                    if done % step == 0:
                        rss.append((done, _rss_mb(service.process.pid)))

        threads = [threading.Thread(target=client_loop) for _ in range(options.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        scored_after, passes_after = _scored(service)
    images_scored, passes = scored_after - scored_before, passes_after - passes_before
    growth = round(rss[-1][1] - rss[0][1], 1) if len(rss) > 1 and rss[0][1] and rss[-1][1] else None
    return {"mode": name, "requests": len(latencies) + len(errors), "ok": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "seconds": round(wall, 4),
            "throughput_rps": round(len(latencies) / wall, 2) if wall else None,
            "p50_ms": _percentile(latencies, 50), "p95_ms": _percentile(latencies, 95),
            "p99_ms": _percentile(latencies, 99), "mean_batch": round(images_scored / passes, 2) if passes else None,
            "rss_mb": [(done, None if mb is None else round(mb, 1)) for done, mb in rss], "rss_growth_mb": growth,
            "exit_status": service.process.returncode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per mode")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--max-seconds", type=float, default=300, help="stop a mode after this long")
    parser.add_argument("--image-size", type=int, default=56, help="the model's input side (tiny backbone)")
    parser.add_argument("--threads", type=int, default=2, help="the service's torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--modes", nargs="+", choices=("single", "batched"), default=["single", "batched"])
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        folder = Path(tmp)
        design, images = make_files(folder, options.image_size, 16)
        settings = {"single": ["--max_batch", "1", "--max_wait_ms", "0"],
                    "batched": ["--max_batch", str(options.max_batch), "--max_wait_ms", str(options.max_wait_ms)]}
        results = [run_mode(mode, [*design, *settings[mode], "--max_queue", "256"], images, options,
                            folder / f"{mode}.log") for mode in options.modes]
    print(f"{options.requests} requests per mode, {options.clients} clients, tiny backbone at {options.image_size} px, "
          f"{options.threads} torch threads, one 256x256 PNG per request, loopback")
    print(f"{'mode':8} {'ok':>5} {'errors':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'batch':>6} {'RSS growth MB':>14}")
    for r in results:
        print(f"{r['mode']:8} {r['ok']:5d} {r['errors']:6d} {r['throughput_rps']:7.2f} {r['p50_ms']:8.1f} "
              f"{r['p95_ms']:8.1f} {r['p99_ms']:8.1f} {r['mean_batch']:6.2f} {str(r['rss_growth_mb']):>14}")
    summary = {"config": vars(options), "results": results}
    if len(results) == 2 and results[0]["throughput_rps"]:
        summary["batched_vs_single"] = round(results[1]["throughput_rps"] / results[0]["throughput_rps"], 2)
        print(f"batched / single throughput: {summary['batched_vs_single']}x")
    print(json.dumps(summary))
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
