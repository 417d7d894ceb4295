"""serve.py under load: N concurrent clients on loopback, batching against one image at a time.

Starts ``serve.py`` (tiny random CLIP stand-in, random prompts: the numbers are about the service, not
about anomaly detection) as a child process on a free loopback port, once per mode:

* ``single``: ``--max_batch 1`` (one image per forward pass, one request at a time through the model);
* ``batched``: ``--max_batch B --max_wait_ms W`` (concurrent requests grouped into batches, each batch one
  pass through the vision tower: ``--batch_forward one_pass``, the service's default);
* ``batched_per_image``: the same batches run image by image through the tower (``--batch_forward per_image``,
  what ``test_one_example.py`` does on a CPU).

Each mode sends ``--requests`` one-image ``POST /predict`` requests from ``--clients`` threads (keep-alive
connections), stopping early at ``--max-seconds``, and prints throughput, p50/p95/p99 latency, errors,
the batch sizes the service reports in ``/metrics``, and the server's RSS after every tenth of the
requests (growth = RSS at the end minus RSS after the first tenth), and the server's CPU time per request
(user + system, all its threads: what a request costs, whatever else the machine runs; the clients' own
CPU per request beside it, as they share the machine). The modes' services
run side by side and take turns in ``--rounds`` rounds. Last line: the results as JSON.

    python benchmarks/bench_serve.py                      # 1000 requests, 8 clients, 56 px, 2 threads
    python benchmarks/bench_serve.py --requests 200 --image-size 56 --modes batched
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.service.client import ServiceProcess  # noqa: E402 - after the path above


# The service flags of each mode (``None``: --max-batch and --max-wait-ms).
MODES = {"single": ["--max_batch", "1", "--max_wait_ms", "0"], "batched": None, "batched_per_image": None}


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


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class ModeRun:
    """One service (one mode), warmed up; :meth:`send` runs a round of requests from ``options.clients`` threads.

    The modes' services run side by side and take their rounds in turn (``--rounds``), so that a change in the
    machine's load (it is shared) falls on every mode alike; each mode's throughput is its requests over the
    seconds of its own rounds.
    """

    def __init__(self, name: str, args: list[str], images: list[tuple[str, bytes]], options: argparse.Namespace,
                 log: Path) -> None:
        self.name, self.images, self.options = name, images, options
        self.service = ServiceProcess(args, log, env={"OMP_NUM_THREADS": str(options.threads)}, wait=False)
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.rss: list[tuple[int, float | None]] = []
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.client_cpu_seconds = 0.0
        self.issued = 0

    def warm_up(self) -> None:
        self.service.wait_ready()
        warm = self.service.client()
        for file in self.images[:4]:
            warm.predict([file])
        self.scored_before, self.passes_before = _scored(self.service)

    def send(self, count: int, deadline: float) -> None:
        """``count`` more requests (fewer past ``deadline``), ``options.clients`` at a time."""
        lock = threading.Lock()
        target = min(self.issued + count, self.options.requests)
        step = max(1, self.options.requests // 10)
        pid = self.service.process.pid

        def client_loop() -> None:
            client = self.service.client(timeout=120)
            while True:
                with lock:
                    if self.issued >= target or time.monotonic() > deadline:
                        return
                    index = self.issued
                    self.issued += 1
                start = time.perf_counter()
                try:
                    status, body = client.predict([self.images[index % len(self.images)]])
                    problem = None if status == 200 else f"HTTP {status}: {body}"
                except Exception as error:  # noqa: BLE001 - counted, the benchmark goes on
                    problem = f"{type(error).__name__}: {error}"
                elapsed = time.perf_counter() - start
                with lock:
                    if problem:
                        self.errors.append(problem)
                    else:
                        self.latencies.append(elapsed)
                    done = len(self.latencies) + len(self.errors)
                    if done % step == 0:
                        self.rss.append((done, _rss_mb(pid)))

        threads = [threading.Thread(target=client_loop) for _ in range(self.options.clients)]
        cpu_before, client_before, started = _cpu_seconds(pid), time.process_time(), time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.seconds += time.perf_counter() - started
        self.client_cpu_seconds += time.process_time() - client_before
        cpu_after = _cpu_seconds(pid)
        if cpu_before is not None and cpu_after is not None:
            self.cpu_seconds += cpu_after - cpu_before

    def result(self) -> dict:
        scored_after, passes_after = _scored(self.service)
        self.service.stop()
        images_scored, passes = scored_after - self.scored_before, passes_after - self.passes_before
        rss, ok = self.rss, len(self.latencies)
        growth = round(rss[-1][1] - rss[0][1], 1) if len(rss) > 1 and rss[0][1] and rss[-1][1] else None
        wall = round(self.seconds, 4)
        return {"mode": self.name, "requests": ok + len(self.errors), "ok": ok, "errors": len(self.errors),
                "first_errors": self.errors[:3], "seconds": wall,
                "throughput_rps": round(ok / wall, 2) if wall else None,
                "p50_ms": _percentile(self.latencies, 50), "p95_ms": _percentile(self.latencies, 95),
                "p99_ms": _percentile(self.latencies, 99),
                "server_cpu_ms_per_request": round(1000 * self.cpu_seconds / ok, 2) if ok else None,
                "client_cpu_ms_per_request": round(1000 * self.client_cpu_seconds / ok, 2) if ok else None,
                "mean_batch": round(images_scored / passes, 2) if passes else None,
                "rss_mb": [(done, None if mb is None else round(mb, 1)) for done, mb in rss], "rss_growth_mb": growth,
                "exit_status": self.service.process.returncode}


def run_modes(modes: dict[str, list[str]], images: list[tuple[str, bytes]], options: argparse.Namespace,
              folder: Path) -> list[dict]:
    """Every mode's service started side by side, then ``options.rounds`` rounds taking the modes in turn."""
    runs = [ModeRun(name, args, images, options, folder / f"{name}.log") for name, args in modes.items()]
    try:
        for run in runs:
            run.warm_up()
        deadline = time.monotonic() + options.max_seconds * len(runs)
        per_round = -(-options.requests // options.rounds)
        for _ in range(options.rounds):
            for run in runs:
                run.send(per_round, deadline)
        return [run.result() for run in runs]
    finally:
        for run in runs:
            run.service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per mode")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--max-seconds", type=float, default=300, help="stop after this long per mode")
    parser.add_argument("--rounds", type=int, default=5,
                        help="the modes take turns in this many rounds (a shared machine's load falls on all alike)")
    parser.add_argument("--image-size", type=int, default=56, help="the model's input side (tiny backbone)")
    parser.add_argument("--threads", type=int, default=2, help="the service's torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["single", "batched"])
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        folder = Path(tmp)
        design, images = make_files(folder, options.image_size, 16)
        batching = ["--max_batch", str(options.max_batch), "--max_wait_ms", str(options.max_wait_ms)]
        modes = {mode: [*design, *(batching if MODES[mode] is None else MODES[mode]), "--max_queue", "256",
                        *(["--batch_forward", "per_image"] if mode == "batched_per_image" else [])]
                 for mode in options.modes}
        results = run_modes(modes, images, options, folder)
    print(f"{options.requests} requests per mode, {options.clients} clients, tiny backbone at {options.image_size} px, "
          f"{options.threads} torch threads, one 256x256 PNG per request, loopback")
    print(f"{'mode':17} {'ok':>5} {'errors':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'CPU ms/req':>10} {'client CPU':>10} {'batch':>6} {'RSS growth MB':>14}")
    for r in results:
        print(f"{r['mode']:17} {r['ok']:5d} {r['errors']:6d} {r['throughput_rps']:7.2f} {r['p50_ms']:8.1f} "
              f"{r['p95_ms']:8.1f} {r['p99_ms']:8.1f} {r['server_cpu_ms_per_request']:10.2f} "
              f"{r['client_cpu_ms_per_request']:10.2f} {r['mean_batch']:6.2f} "
              f"{str(r['rss_growth_mb']):>14}")
    print(f"load average (1, 5, 15 min) at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    summary = {"config": vars(options), "results": results}
    by_mode = {r["mode"]: r for r in results}
    single = by_mode.get("single", {}).get("throughput_rps")
    for mode in ("batched", "batched_per_image"):
        if single and by_mode.get(mode, {}).get("throughput_rps"):
            summary[f"{mode}_vs_single"] = round(by_mode[mode]["throughput_rps"] / single, 2)
            print(f"{mode} / single throughput: {summary[f'{mode}_vs_single']}x")
    print(json.dumps(summary))
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
