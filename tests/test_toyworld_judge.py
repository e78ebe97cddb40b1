import numpy as np
import pytest

from dina_lrm_toyworld.corruptions import DEFECTS, SEMANTIC, add_defect, corrupt_scene
from dina_lrm_toyworld.judge import Judge
from dina_lrm_toyworld.scenes import (
    BACKGROUND,
    COLOURS,
    HELD_OUT_COMBINATIONS,
    IMAGE_SIZE,
    ObjectGroup,
    PromptSpec,
    Scene,
    SIZES,
    SceneObject,
    parse_prompt,
    render,
    sample_prompts,
    scene_for,
)


@pytest.fixture(scope="module")
def prompts():
    return sample_prompts(240, "train", seed=3) + sample_prompts(60, "test", seed=3)


def test_prompts_read_back_into_the_same_spec(prompts):
    for spec in prompts:
        assert parse_prompt(spec.text) == spec
    assert parse_prompt("a small red circle to the left of two blue squares").relation == "left of"
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        parse_prompt("a photo of a cat")
    with pytest.raises(ValueError, match="unknown colour"):
        parse_prompt("a pink circle")


def test_held_out_split_is_by_attribute_combination(prompts):
    for spec in prompts:
        combos = {(g.colour, g.shape) for g in spec.groups}
        assert bool(combos & HELD_OUT_COMBINATIONS) == (spec.split == "test")
    train = sample_prompts(500, "train", seed=0)
    assert not any((g.colour, g.shape) in HELD_OUT_COMBINATIONS for spec in train for g in spec.groups)


def test_render_draws_the_scene():
    scene = Scene((SceneObject("red", "square", "large", 20.0, 30.0),))
    image = render(scene)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    assert tuple(image[30, 20]) == COLOURS["red"]
    assert tuple(image[2, 60]) == BACKGROUND
    side = 2 * SIZES["large"]
    assert (image == COLOURS["red"]).all(-1).sum() == pytest.approx(side * side, abs=2 * side)


def test_judge_is_right_on_at_least_99_percent_of_clauses_of_clean_renders(prompts):
    judge, rng = Judge(), np.random.default_rng(0)
    results = [judge(render(scene_for(spec, rng)), spec.text) for spec in prompts]
    satisfied = sum(sum(r.clauses.values()) for r in results)
    total = sum(len(r.clauses) for r in results)
    assert satisfied / total >= 0.99
    assert np.mean([r.quality for r in results]) > 0.99


def test_judge_on_a_hand_made_scene():
    spec = parse_prompt("a large red circle to the left of a blue square")
    left, right = SceneObject("red", "circle", "large", 16.0, 32.0), SceneObject("blue", "square", "small", 48.0, 32.0)
    result = Judge()(render(Scene((left, right))), spec)
    assert result.clauses == {
        "red count": True, "red shape": True, "red size": True,
        "blue count": True, "blue shape": True, "no other objects": True, "relation": True,
    }
    assert result.alignment == 1.0 and result.score == pytest.approx(1.0)
    swapped = Scene((SceneObject("red", "circle", "large", 48.0, 32.0), SceneObject("blue", "square", "small", 16.0, 32.0)))
    assert Judge()(render(swapped), spec).clauses["relation"] is False
    small = Scene((SceneObject("red", "triangle", "small", 16.0, 32.0), right))
    clauses = Judge()(render(small), spec).clauses
    assert clauses["red shape"] is False and clauses["red size"] is False and clauses["relation"] is True


def test_judge_detects_every_semantic_corruption(prompts):
    judge, rng = Judge(), np.random.default_rng(1)
    for kind in SEMANTIC:
        checked = 0
        for spec in prompts[:120]:
            corrupted = corrupt_scene(spec, scene_for(spec, rng), kind, rng)
            if corrupted is None:
                continue
            checked += 1
            assert judge(render(corrupted), spec).alignment < 1.0, (kind, spec.text)
        assert checked >= 10, kind


def test_judge_detects_every_quality_defect(prompts):
    judge, rng = Judge(), np.random.default_rng(2)
    for kind in DEFECTS:
        severities = []
        for spec in prompts[:60]:
            clean = render(scene_for(spec, rng))
            assert judge(clean, spec).defects[kind] == 0.0
            severities.append(judge(add_defect(clean, kind, rng), spec).defects[kind])
        assert min(severities) > 0.3 and np.mean(severities) > 0.8, kind


def test_corruptions_that_do_not_apply_return_none():
    rng = np.random.default_rng(0)
    single = PromptSpec((ObjectGroup("red", "circle"),))
    assert corrupt_scene(single, scene_for(single, rng), "relation", rng) is None
    assert corrupt_scene(single, scene_for(single, rng), "size", rng) is None
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_scene(single, scene_for(single, rng), "rotation", rng)


def test_judge_rejects_non_images():
    with pytest.raises(ValueError, match="RGB"):
        Judge()(np.zeros((64, 64), dtype=np.uint8), "a red circle")
    with pytest.raises(ValueError, match="uint8"):
        Judge()(np.zeros((64, 64, 3), dtype=np.float32), "a red circle")
