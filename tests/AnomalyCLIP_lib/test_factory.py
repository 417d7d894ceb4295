"""Loading backbones from files: TorchScript archives and plain state dicts, safely, with clear errors."""


import pytest
import torch

import AnomalyCLIP_lib
from AnomalyCLIP_lib.errors import AnomalyCLIPError


def test_plain_and_torchscript_files_load_the_same_model(tiny_clip_files, tiny_clip_state):
    plain, scripted = tiny_clip_files
    model_plain, preprocess = AnomalyCLIP_lib.load(plain)
    model_script, _ = AnomalyCLIP_lib.load(scripted, trust_backbone=True)
    for (key, a), (_, b) in zip(model_plain.state_dict().items(), model_script.state_dict().items()):
        assert torch.equal(a, b), key
        assert torch.equal(a, tiny_clip_state[key]), key
    assert not model_plain.training
    assert all(not p.requires_grad for p in model_plain.parameters())
    assert model_plain.dtype == torch.float32
    from PIL import Image

    assert preprocess(Image.new("RGB", (80, 60))).shape == (3, 56, 56)


def test_fp16_checkpoint_loads_as_fp32(tmp_path):
    from tests.tiny_clip import tiny_clip_state_dict

    state = tiny_clip_state_dict(seed=3, vision_layers=2, text_layers=2, dtype=torch.float16)
    path = tmp_path / "half.pt"
    torch.save(state, path)
    model, _ = AnomalyCLIP_lib.load(path)
    assert model.dtype == torch.float32
    assert torch.equal(model.visual.proj, state["visual.proj"].float())


def test_wrapped_state_dict_loads(tmp_path, tiny_clip_state):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": tiny_clip_state}, path)
    model, _ = AnomalyCLIP_lib.load(path)
    assert torch.equal(model.visual.proj, tiny_clip_state["visual.proj"])


class _Exploit:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": _Exploit()}, path)
    with pytest.raises(AnomalyCLIPError, match="backbone checkpoint .* holds Python objects besides tensors"):
        AnomalyCLIP_lib.load(path)
    assert "this must not run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        ({"prompt_learner": {"ctx_pos": torch.zeros(1)}}, "prompt checkpoint, not a CLIP backbone"),
        ({"weight": torch.zeros(1)}, "no CLIP state dict"),
    ],
)
def test_wrong_checkpoint_kind_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "wrong.pt"
    torch.save(content, path)
    with pytest.raises(AnomalyCLIPError, match=message):
        AnomalyCLIP_lib.load(path)


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(AnomalyCLIPError, match="does not exist"):
        AnomalyCLIP_lib.load(tmp_path / "absent.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(AnomalyCLIPError, match=str(corrupt)):
        AnomalyCLIP_lib.load(corrupt)


def test_mis_shaped_checkpoint_is_a_clear_error(tmp_path, tiny_clip_state):
    broken = dict(tiny_clip_state)
    broken["visual.ln_post.weight"] = torch.ones(3)
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.raises(AnomalyCLIPError, match="does not fit"):
        AnomalyCLIP_lib.load(path)


def test_unregistered_torchscript_needs_trust(tiny_clip_files, tiny_clip_state, tmp_path, capsys):
    import hashlib

    from pipeline import training as train
    from pipeline.cli import run_cli

    scripted = tiny_clip_files[1]
    digest = hashlib.sha256(scripted.read_bytes()).hexdigest()
    with pytest.raises(AnomalyCLIPError, match="--trust_backbone") as refused:
        AnomalyCLIP_lib.load(scripted)
    assert digest[:12] in str(refused.value) and "\n" not in str(refused.value)
    # Through a CLI: one line, before anything else runs.
    assert run_cli(train.main, ["--train_data_path", str(tmp_path), "--save_path", str(tmp_path / "s"),
                                "--backbone", str(scripted), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.count("error:") == 1


def test_registered_torchscript_needs_no_trust(tiny_clip_files, monkeypatch):
    import hashlib

    from AnomalyCLIP_lib import factory, pretrained

    scripted = tiny_clip_files[1]
    registered = pretrained.PretrainedWeights(url="file:///unused",
                                              sha256=hashlib.sha256(scripted.read_bytes()).hexdigest(),
                                              filename=scripted.name)
    monkeypatch.setitem(factory.PRETRAINED, "tiny-registered", registered)
    model, _ = AnomalyCLIP_lib.load(scripted)
    assert model.visual.num_layers == 24


class _RunsCode:
    """A pickle that would run a command when loaded without weights_only."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/anomalyclip_pickle_ran",))


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_text("hello"), "is not a PyTorch checkpoint"),
    (lambda p: p.mkdir(), "is a folder, not a file"),
    (lambda p: torch.save({"x": _RunsCode()}, p), "holds Python objects besides tensors"),
])
def test_unreadable_files_get_our_own_words(make, expected, tmp_path, tiny_clip_files):
    import os

    from prompt_ensemble import read_prompt_checkpoint

    path = tmp_path / "file.pth"
    make(path)
    for read, what in ((AnomalyCLIP_lib.load, "backbone"), (read_prompt_checkpoint, "prompt checkpoint")):
        with pytest.raises(AnomalyCLIPError) as error:
            read(path)
        message = str(error.value)
        assert expected in message and str(path) in message and what in message, message
        assert "weights_only" not in message.replace("(weights_only)", "") and "\n" not in message
    assert not os.path.exists("/tmp/anomalyclip_pickle_ran")


def test_truncated_checkpoint_is_named_as_such(tmp_path, tiny_clip_files):
    path = tmp_path / "cut.pt"
    path.write_bytes(tiny_clip_files[0].read_bytes()[:5000])
    with pytest.raises(AnomalyCLIPError, match="is truncated or damaged"):
        AnomalyCLIP_lib.load(path)
