"""benchmarks/bench_serve.py runs (a few requests, one mode) and what it reports adds up."""

import json

import pytest

from tests.benchmarks.test_bench_smoke import _load

pytestmark = pytest.mark.slow


def test_bench_serve_runs_and_its_counts_add_up(capsys):
    bench = _load("bench_serve")
    assert bench.main(["--requests", "12", "--clients", "3", "--modes", "batched", "--threads", "1",
                       "--max-seconds", "120"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = summary["results"][0]
    assert result["mode"] == "batched" and result["requests"] == result["ok"] == 12 and result["errors"] == 0
    assert result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert abs(result["throughput_rps"] - 12 / result["seconds"]) <= 0.02 + 1e-3 * result["throughput_rps"]
    assert [done for done, _ in result["rss_mb"]] == list(range(1, 13))  # one sample per tenth (here: per request)
    assert 1 <= result["mean_batch"] <= 3  # at most one request per client in flight
    assert result["exit_status"] == 0  # stopped with SIGTERM, drained, exit 0
