"""benchmarks/bench_tiling.py runs (tiny, --quick) and reports what it claims."""

import json

import pytest

from tests.benchmarks.test_bench_smoke import _load

pytestmark = pytest.mark.slow  # a synthetic set, four scorings and two worker processes


def test_bench_tiling_quick(capsys):
    bench = _load("bench_tiling")
    assert bench.main(["--part", "gain", "--quick"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["modes"]) == {"whole", "tiled", "whole + references", "tiled + references"}
    for values in result["modes"].values():
        assert 0 <= values["pixel_auroc"] <= 1 and 0 <= values["defects_found"] <= 1
    assert bench.main(["--part", "cost", "--quick"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    whole, tiled = rows
    # 200 px in tiles of 112 at overlap 0.25: ceil(88 / 84) + 1 = 3 per side, 9 tiles and the global view.
    assert (whole["forwards"], tiled["forwards"]) == (1, 10)
    assert whole["map_shape"] == [56, 56] and tiled["map_shape"] == [200, 200]
