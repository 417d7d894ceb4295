"""The prompt learner: state-dict layout of the original, checkpoint round trips, clear errors."""

import pytest
import torch

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from prompt_ensemble import AnomalyCLIP_PromptLearner, checkpoint_design, design_details, load_prompt_state


@pytest.fixture()
def learner(tiny_model):
    torch.manual_seed(0)
    return AnomalyCLIP_PromptLearner(tiny_model, design_details(n_ctx=12, depth=9, t_n_ctx=4))


def test_state_dict_keys_shapes_and_dtypes(learner):
    state = learner.state_dict()
    expected = {
        "ctx_pos": (1, 1, 12, 64), "ctx_neg": (1, 1, 12, 64),
        "token_prefix_pos": (1, 1, 1, 64), "token_prefix_neg": (1, 1, 1, 64),
        "token_suffix_pos": (1, 1, 64, 64), "token_suffix_neg": (1, 1, 64, 64),
        "tokenized_prompts_pos": (1, 1, 77), "tokenized_prompts_neg": (1, 1, 77),
    }
    for i in range(8):
        expected[f"compound_prompts_text.{i}"] = (4, 64)
        expected[f"compound_prompt_projections.{i}.weight"] = (896, 64)
        expected[f"compound_prompt_projections.{i}.bias"] = (896,)
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    assert len(state) == 32 and len(list(learner.parameters())) == 26
    assert state["tokenized_prompts_pos"].dtype == torch.int32
    normal = state["tokenized_prompts_pos"][0, 0, :16].tolist()
    abnormal = state["tokenized_prompts_neg"][0, 0, :17].tolist()
    assert normal == [49406] + [343] * 12 + [14115, 269, 49407]
    assert abnormal == [49406] + [343] * 12 + [13568, 14115, 269, 49407]


def test_projections_are_copies_of_one_linear(learner):
    first = learner.compound_prompt_projections[0]
    for layer in learner.compound_prompt_projections[1:]:
        assert torch.equal(layer.weight, first.weight) and torch.equal(layer.bias, first.bias)


def test_forward_assembles_prompts(learner, tiny_model):
    prompts, ids, deep = learner()
    assert prompts.shape == (2, 77, 64) and ids.shape == (2, 77) and len(deep) == 8
    assert torch.equal(prompts[0, 1:13], learner.ctx_pos[0, 0])
    assert torch.equal(prompts[1, 1:13], learner.ctx_neg[0, 0])
    with torch.no_grad():
        embedded = tiny_model.token_embedding(ids.long())
    assert torch.equal(prompts[:, 0], embedded[:, 0])
    assert torch.equal(prompts[:, 13:], embedded[:, 13:])


def test_checkpoint_round_trip(learner, tiny_model, tmp_path):
    path = tmp_path / "prompts.pth"
    torch.save({"prompt_learner": learner.state_dict()}, path)
    torch.manual_seed(123)
    other = AnomalyCLIP_PromptLearner(tiny_model, design_details())
    assert not torch.equal(other.ctx_pos, learner.ctx_pos)
    load_prompt_state(other, path)
    for (key, a), (_, b) in zip(learner.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), key


def test_projection_values_are_carried_through(learner, tiny_model, tmp_path):
    state = learner.state_dict()
    state["compound_prompt_projections.3.weight"] = torch.full((896, 64), 0.25)
    path = tmp_path / "original_format.pth"
    torch.save({"prompt_learner": state}, path)
    other = AnomalyCLIP_PromptLearner(tiny_model, design_details())
    load_prompt_state(other, path)
    assert torch.equal(other.state_dict()["compound_prompt_projections.3.weight"], torch.full((896, 64), 0.25))


def test_checkpoint_without_projections_still_loads(learner, tiny_model, tmp_path):
    state = {k: v for k, v in learner.state_dict().items() if not k.startswith("compound_prompt_projections")}
    path = tmp_path / "slim.pth"
    torch.save({"prompt_learner": state}, path)
    other = AnomalyCLIP_PromptLearner(tiny_model, design_details())
    load_prompt_state(other, path)
    assert torch.equal(other.ctx_neg, learner.ctx_neg)


@pytest.mark.parametrize("n_ctx, depth, t_n_ctx", [(8, 9, 4), (12, 5, 4), (12, 9, 2)])
def test_checkpoint_of_other_design_is_a_clear_error(tiny_model, tmp_path, n_ctx, depth, t_n_ctx):
    other = AnomalyCLIP_PromptLearner(tiny_model, design_details(n_ctx, depth, t_n_ctx))
    path = tmp_path / "other.pth"
    torch.save({"prompt_learner": other.state_dict()}, path)
    learner = AnomalyCLIP_PromptLearner(tiny_model, design_details())
    with pytest.raises(AnomalyCLIPError) as info:
        load_prompt_state(learner, path)
    message = str(info.value)
    assert f"--n_ctx {n_ctx} --depth {depth} --t_n_ctx {t_n_ctx}" in message and str(path) in message
    assert checkpoint_design(other.state_dict()) == {"n_ctx": n_ctx, "depth": depth, "t_n_ctx": t_n_ctx, "width": 64}


def test_missing_and_foreign_files_are_clear_errors(learner, tmp_path, tiny_clip_files):
    with pytest.raises(AnomalyCLIPError, match="does not exist"):
        load_prompt_state(learner, tmp_path / "absent.pth")
    with pytest.raises(AnomalyCLIPError, match="not a prompt checkpoint"):
        load_prompt_state(learner, tiny_clip_files[0])


def test_depth_beyond_text_layers_is_refused(tiny_model):
    with pytest.raises(AnomalyCLIPError, match="--depth 13"):
        AnomalyCLIP_PromptLearner(tiny_model, design_details(depth=13))


def test_longest_prompt_fills_the_text_context_exactly(tiny_model):
    # "X" * n_ctx + "damaged object." is n_ctx + 3 tokens, plus start and end: 72 fills the 77 tokens.
    learner = AnomalyCLIP_PromptLearner(tiny_model, design_details(n_ctx=72, depth=9, t_n_ctx=4))
    assert int((learner.tokenized_prompts_neg != 0).sum()) == 77
    with pytest.raises(AnomalyCLIPError, match=r"--n_ctx 73 makes the prompt longer than the text encoder's 77 "
                                               r"tokens: use at most 72"):
        AnomalyCLIP_PromptLearner(tiny_model, design_details(n_ctx=73, depth=9, t_n_ctx=4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_non_finite_values_is_refused(learner, tiny_model, tmp_path, bad):
    state = learner.state_dict()
    state["compound_prompts_text.3"][1, 7] = bad
    path = tmp_path / "diverged.pth"
    torch.save({"prompt_learner": state}, path)
    other = AnomalyCLIP_PromptLearner(tiny_model, design_details())
    before = other.compound_prompts_text[3].detach().clone()
    with pytest.raises(AnomalyCLIPError, match=r"diverged.pth holds NaN or infinite values in compound_prompts_text.3"):
        load_prompt_state(other, path)
    assert torch.equal(other.compound_prompts_text[3], before)  # nothing loaded
