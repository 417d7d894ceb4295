"""The benchmarks run (tiny configurations), and what they compute is right."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from AnomalyCLIP_lib.model import build_model
from pipeline.random_weights import TINY, VIT_L14_336, random_state_dict

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _counted_flops(model, size: int, features_list=(24,), dpam_layer=20) -> int:
    """Matmul FLOPs of one image's forward as PyTorch counts them (math SDPA, so attention counts)."""
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        model.encode_image(images, list(features_list), dpam_layer)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def bench_inference():
    return _load("bench_inference")


@pytest.fixture(scope="module")
def tiny(tiny_clip_state):
    return build_model(tiny_clip_state)


def test_bench_inference_tiny_runs_and_matches_the_original(bench_inference, tiny, capsys):
    assert bench_inference.main(["--preset", "tiny", "--image-size", "56", "--repeats", "1", "--batch-sizes", "1",
                                 "2"]) == 0
    result = _json_line(capsys)
    assert result["parity_ok"] and result["max_abs_diff"] <= 1e-5
    assert result["batch_vs_single_max_abs_diff"] == 0.0  # a CPU batch runs image by image
    for key in ("latency_s_batch1", "latency_s_batch2_per_image", "images_per_s", "gflop_s", "peak_rss_mb",
                "original_latency_s_batch1", "speedup", "torch", "threads", "device", "precision"):
        assert result[key] is not None, key
    assert result["gflops_per_image"] == round(_counted_flops(tiny, 56) / 1e9, 2)  # counted, not its formula


@pytest.mark.parametrize("features_list", [[24], [6, 12, 18, 24], [12], [3]])
@pytest.mark.parametrize("dpam_layer", [20, None, 2])
def test_flop_formula_equals_counted_matmuls(bench_inference, tiny, features_list, dpam_layer):
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    counts = []
    for forward in (tiny.encode_image, lambda *a: bench_inference.original_structure_encode(tiny, *a)):
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:  # math SDPA: matmuls it can count
            forward(images, features_list, dpam_layer)
        counts.append(counter.get_total_flops())
    assert counts[0] == bench_inference.forward_flops(TINY, 56, features_list, dpam_layer, original=False)
    assert counts[1] == bench_inference.forward_flops(TINY, 56, features_list, dpam_layer, original=True)


def test_flop_counts_of_vit_l14_at_518(bench_inference):
    assert round(bench_inference.forward_flops(VIT_L14_336, 518, [24], 20, original=True) / 1e9, 1) == 1216.4
    assert round(bench_inference.forward_flops(VIT_L14_336, 518, [24], 20, original=False) / 1e9, 1) == 1182.9


def test_original_structure_is_the_reference_arithmetic_bit_for_bit(bench_inference, tiny_clip_state):
    model = build_model(tiny_clip_state)
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = model.encode_image(images, [6, 12, 18, 24], 20, reference_arithmetic=True)
        original = bench_inference.original_structure_encode(model, images, [6, 12, 18, 24], 20)
    assert torch.equal(ours[0], original[0])
    assert all(torch.equal(a, b) for a, b in zip(ours[1], original[1], strict=True))


BATCH_TOL = 1e-5  # float32 rounding of batched kernels; an image mixed with another differs by ~1e-1


def _max_diff_to_single_images(encode, images) -> float:
    """Max |batched - single| over every image's embedding and patch tokens, ``encode`` run on the whole batch."""
    embedding, tokens = encode(images)
    diffs = []
    for i in range(len(images)):
        single_embedding, single_tokens = encode(images[i : i + 1])
        diffs.append((embedding[i : i + 1] - single_embedding).abs().max().item())
        diffs += [(layer[i : i + 1] - single).abs().max().item() for layer, single in zip(tokens, single_tokens,
                                                                                          strict=True)]
    return max(diffs)


@pytest.mark.parametrize("dpam_layer", [20, None])
def test_real_batch_equals_single_images(bench_inference, tiny, dpam_layer):
    """Both forwards the benchmark times, run on a real batch of 3 in one pass (ours through ``_encode``,
    which ``encode`` splits on a CPU; the released structure always batches), against each image alone."""
    images = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    features = [6, 12, 18, 24]
    visual = tiny.visual
    seen = []
    handle = visual.transformer.resblocks[0].register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    try:
        with torch.inference_mode():
            ours = _max_diff_to_single_images(
                lambda x: visual._encode(x, features, visual._first_dpam_layer(dpam_layer)), images)
    finally:
        handle.remove()
    assert seen == [3, 1, 1, 1]  # the batch ran in one pass
    with torch.inference_mode():
        original = _max_diff_to_single_images(
            lambda x: bench_inference.original_structure_encode(tiny, x, features, dpam_layer), images)
        spread = (visual._encode(images[:1], features, 2)[1][0] - visual._encode(images[1:2], features, 2)[1][0])
    assert ours <= BATCH_TOL and original <= BATCH_TOL, (ours, original)
    assert spread.abs().max().item() > 100 * BATCH_TOL  # the images differ: mixing them would show


def test_benchmark_weights_keep_clip_scale(bench_inference):
    state = bench_inference.benchmark_state_dict(0, {**TINY, "vision_width": 256})
    raw = random_state_dict(0, **{**TINY, "vision_width": 256})
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.allclose(state[key], raw[key] * 0.5 ** 0.5)
    assert torch.equal(state["visual.proj"], raw["visual.proj"])


def test_bench_eval_memory_tiny_runs(capsys):
    bench = _load("bench_eval_memory")
    assert bench.main(["--no-model", "--size", "48", "--max-per-class", "4", "--max-classes", "3"]) == 0
    result = _json_line(capsys)
    assert result["images"] == 12 and result["classes"] == 3 and result["within_limit"]
    assert result["max_maps_alive"] <= 5  # one class (4) and the result being handed over
    assert set(result["mean_metrics"]) == {"pixel_auroc", "pixel_aupro", "image_auroc", "image_ap"}
    assert result["outside_model_s"] >= 0 and result["peak_rss_mb"] > 0


def test_bench_eval_memory_fails_over_the_limit(capsys):
    bench = _load("bench_eval_memory")
    assert bench.main(["--no-model", "--size", "48", "--max-per-class", "2", "--max-classes", "2", "--limit-mb",
                       "1"]) == 1
    assert not _json_line(capsys)["within_limit"]


def test_mvtec_sizes(capsys):
    bench = _load("bench_eval_memory")
    sizes = bench.class_sizes(None, None)
    assert len(sizes) == 15 and sum(n for n, _ in sizes.values()) == 1725 and sum(g for _, g in sizes.values()) == 467


def test_bench_train_tiny_counts_one_forward_per_image(capsys):
    bench_train = _load("bench_train")
    assert bench_train.main(["--preset", "tiny", "--image-size", "56", "--n-images", "4", "--epochs", "2"]) == 0
    result = _json_line(capsys)
    assert result["forwards_cached_1_epoch"] == 4 and result["forwards_cached_2_epochs"] == 4
    assert result["forwards_uncached_2_epochs"] == 8
    assert result["max_abs_diff_cached_vs_uncached"] <= 1e-6


def test_bench_synthetic_dataset_tiny_runs(capsys):
    bench = _load("bench_synthetic_dataset")
    assert bench.main(["--size", "24", "--n-train", "1", "--n-test-good", "1", "--n-test-defect", "2",
                       "--repeats", "2"]) == 0
    result = _json_line(capsys)
    # 6 classes x (1 train + 1 good + 2 defect) images; files: those 24 images, a mask per defect image
    # (12), both meta.json and VisA's split_csv/1cls.csv.
    assert result["images"] == 24 and result["files"] == 24 + 12 + 3
    assert result["repeats"] == 2 and result["within_limit"]
    assert 0 < result["best_s"] <= result["median_s"]
    best = result["best_s"]  # rounded to 1 ms, images_per_s to 0.1 from the unrounded time
    assert 24 / (best + 5e-4) - 0.05 <= result["images_per_s"] <= 24 / (best - 5e-4) + 0.05


def test_bench_synthetic_dataset_fails_over_the_limit(capsys):
    bench = _load("bench_synthetic_dataset")
    assert bench.main(["--size", "16", "--n-train", "1", "--n-test-good", "1", "--n-test-defect", "1",
                       "--repeats", "1", "--limit-s", "0"]) == 1
    assert not _json_line(capsys)["within_limit"]


def test_bench_memory_quick_runs_and_sizes_the_banks(capsys):
    """K references of P patches at 4 layers of width D: K * P * D * 4 float32 values per memory."""
    bench = _load("bench_memory")
    assert bench.main(["--quick", "--shots", "1", "2", "--repeats", "1", "--threads", "1"]) == 0
    result = _json_line(capsys)
    patches, width, layers = (56 // 14) ** 2, TINY["embed_dim"], 4
    for k in (1, 2):
        assert result["per_k"][str(k)]["memory_mb"] == round(k * patches * width * layers * 4 / 2**20, 4)
        assert result["per_k"][str(k)]["latency_s"] > 0
    assert result["zero_shot"]["latency_s"] > 0
