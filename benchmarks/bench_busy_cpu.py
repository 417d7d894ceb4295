"""Benchmark: the torch scoring path on a busy CPU, for a few thread settings, side by side.

Runs ``test_one_example.py``'s scoring loop (:func:`pipeline.engine.file_batches` through
:func:`pipeline.engine.score_batches` with the torch :class:`TorchScorer`) on the demo's model: the
tiny random CLIP stand-in (:mod:`pipeline.random_weights`), freshly initialised prompts, and
synthetic images (:mod:`pipeline.synthetic`), all made in a temporary folder. Each thread setting
runs in its own worker process (OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads), which
times the scoring per image twice: as the machine is, then beside a CPU-bound load (one spinning
process per core, started and killed by the worker, and ending by itself after ``--seconds`` x 4
at the latest). Every phase stops after ``--seconds`` (at least one batch), every worker after
``--timeout`` (60 s; what it measured by then is kept), the whole run within ``--budget`` (150 s; settings
left when it runs out are skipped). On 2 cores that other processes kept at a load average of 7 it
took 69 s (164 s at 10.7, most of it starting workers).

Settings: PyTorch's default (a thread per core, OpenMP's default wait policy), 1 thread,
cores - 1 (where that differs), PyTorch's default threads with ``OMP_WAIT_POLICY=PASSIVE``, and
this project's default (``PASSIVE``, set by the entry scripts, plus
:func:`pipeline.loading.configure_threads`: PyTorch's threads within the CPUs this process may use).

Absolute times depend on what else runs on the machine (the load average is printed): compare
the settings within one run. Prints a table on stderr and ONE JSON line on stdout.

Usage::

    python benchmarks/bench_busy_cpu.py
    python benchmarks/bench_busy_cpu.py --seconds 8 --images 16
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

IMAGE_SIZE = 112  # the demo's
FEATURES = (6, 12, 18, 24)

_SPIN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def make_inputs(folder: Path, images: int) -> dict[str, str]:
    """The tiny random CLIP, fresh prompts and ``images`` synthetic images under ``folder``."""
    import torch

    from AnomalyCLIP_lib.model import build_model
    from pipeline.random_weights import random_state_dict
    from pipeline.synthetic import make_mvtec_like
    from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details

    state = random_state_dict(0, torch.float32)
    torch.save(state, folder / "tiny_random_clip.pt")
    prompts = AnomalyCLIP_PromptLearner(build_model(state), design_details())
    torch.save({"prompt_learner": prompts.state_dict()}, folder / "prompts.pth")
    good = max(1, images // 3)
    make_mvtec_like(folder / "data", class_names=("stripes",), seed=0, n_train=1, n_test_good=good,
                    n_test_defect=max(0, images - good), image_size=(128, 128))
    return {"backbone": str(folder / "tiny_random_clip.pt"), "checkpoint": str(folder / "prompts.pth"),
            "images": str(folder / "data" / "stripes" / "test")}


def settings(cores: int, torch_default: int) -> list[dict[str, object]]:
    """The thread settings compared: label, thread choice (``None``: torch's, a count, ``"new"``) and wait policy."""
    chosen = [{"label": "new default", "choice": "new", "wait": "PASSIVE"},  # first: the reference of the ratios
              {"label": "torch default", "choice": None, "wait": None},
              {"label": "1 thread", "choice": 1, "wait": None}]
    if cores - 1 not in (1, torch_default) and cores > 1:
        chosen.append({"label": "cores - 1", "choice": cores - 1, "wait": None})
    return [*chosen, {"label": "torch default, PASSIVE", "choice": None, "wait": "PASSIVE"}]


# --- the worker: one thread setting ----------------------------------------------------------------


def _time_phase(scorer, files: list[Path], batch_size: int, seconds: float) -> dict[str, float]:
    """Score ``files`` round and round until ``seconds`` passed (at least one batch): seconds per image."""
    from pipeline.engine import file_batches, score_batches

    scored, started = 0, time.perf_counter()
    while True:
        for batch in score_batches(scorer, file_batches(files, scorer, batch_size, progress=False)):
            scored += len(batch)
            if time.perf_counter() - started >= seconds:
                elapsed = time.perf_counter() - started
                return {"s_per_image": elapsed / scored, "images": scored}


def _start_load(cores: int, seconds: float) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", _SPIN, str(seconds)]) for _ in range(cores)]


def _report(**values: object) -> None:
    print(json.dumps(values), flush=True)  # line by line: a worker killed at --timeout still tells what it measured


def worker(spec: dict[str, object]) -> None:
    """Load the scorer with the setting in ``spec``, time it as the machine is and beside the load."""
    import torch

    from pipeline.config import ModelSpec, ScoringSpec
    from pipeline.loading import available_cores, configure_threads, open_scorer

    if spec["choice"] == "new":
        configure_threads(None)
    elif spec["choice"] is not None:
        torch.set_num_threads(int(spec["choice"]))
    model = ModelSpec(backbone=spec["backbone"], image_size=IMAGE_SIZE, features_list=FEATURES, device="cpu")
    scorer = open_scorer(model, ScoringSpec(checkpoint_path=spec["checkpoint"]), torch.device("cpu"))
    files = sorted(Path(spec["images"]).rglob("*.png"))
    _report(threads=torch.get_num_threads(), ready_s=round(time.time() - float(spec["started"]), 2))
    batch_size, seconds = int(spec["batch_size"]), float(spec["seconds"])
    _time_phase(scorer, files[:batch_size], batch_size, 0.0)  # warm-up: one batch
    _report(idle=_time_phase(scorer, files, batch_size, seconds))
    load = _start_load(available_cores(), 4 * seconds)
    try:
        _report(busy=_time_phase(scorer, files, batch_size, seconds))
    finally:
        for process in load:
            process.kill()
            process.wait()


# --- the parent: every setting, one after another -----------------------------------------------


def run_setting(setting: dict[str, object], inputs: dict[str, str], args: argparse.Namespace,
                timeout: float) -> dict[str, object]:
    """One setting in its own process (its own OpenMP environment); a worker past ``timeout`` is killed."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if setting["wait"]:
        env["OMP_WAIT_POLICY"] = str(setting["wait"])
    spec = {**inputs, "choice": setting["choice"], "started": time.time(), "batch_size": args.batch_size,
            "seconds": args.seconds}
    process = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    result: dict[str, object] = dict(setting)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the worker and its load processes
        out, _ = process.communicate()
        result["error"] = f"stopped at {timeout:.0f} s"
    else:
        if process.returncode != 0:
            result["error"] = f"exit status {process.returncode}"
    for line in out.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    return result


def table(results: list[dict[str, object]]) -> str:
    """The results as text: seconds from the worker's start to a loaded scorer (imports included), ms per image
    as the machine is and beside the load, each also over the new default's."""
    new = next((r for r in results if r["label"] == "new default"), {})
    lines = [f"{'setting':<24} {'threads':>7} {'wait':>8} {'ready s':>8} {'ms/img':>8} {'x new':>6} "
             f"{'ms/img busy':>12} {'x new':>6}"]
    for r in results:
        cells = []
        for phase, width in (("idle", 8), ("busy", 12)):
            if phase not in r:
                cells.append(f"{r.get('error', '-'):>{width + 7}}")
                continue
            value = r[phase]["s_per_image"]
            ratio = f"{value / new[phase]['s_per_image']:.1f}" if phase in new else "-"
            cells.append(f"{1000 * value:>{width}.0f} {ratio:>6}")
        lines.append(f"{r['label']:<24} {r.get('threads', '?')!s:>7} {r['wait'] or 'default':>8} "
                     f"{r.get('ready_s', '-')!s:>8} {' '.join(cells)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="synthetic images scored round and round")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each timed phase")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds after which a worker is killed")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the whole run, setup included")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0

    import torch

    from pipeline.loading import TORCH_DEFAULT_THREADS, available_cores

    cores, load_before = available_cores(), os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-busy-cpu-") as folder:
        inputs = make_inputs(Path(folder), args.images)
        results = []
        for setting in settings(cores, TORCH_DEFAULT_THREADS):
            print(f"[busy-cpu] {setting['label']} ...", file=sys.stderr, flush=True)
            left = args.budget - (time.perf_counter() - started)
            if left < 10:
                results.append({**setting, "error": f"skipped (--budget {args.budget:.0f} s)"})
                continue
            results.append(run_setting(setting, inputs, args, min(args.timeout, left)))
    print(f"{cores} core(s), load average before {load_before[0]:.1f}; tiny random CLIP at {IMAGE_SIZE} px, "
          f"batch {args.batch_size}; 'busy' = beside {cores} spinning process(es)", file=sys.stderr)
    print(table(results), file=sys.stderr)
    print(json.dumps({"cores": cores, "load_average_before": round(load_before[0], 2), "torch": torch.__version__,
                      "image_size": IMAGE_SIZE, "batch_size": args.batch_size, "results": results,
                      "wall_s": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
