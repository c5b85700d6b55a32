"""Router refinement: the written routers trained end to end towards each expert's predictions."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.build import refine
from studio.build.expert_text import load_writer
from studio.build.merge import MergeOptions, merge
from studio.build.refine import lessons, patch_tensors, refine_routers, why_not_refined
from studio.config import parse_config
from studio.inspect.routing import find_routers, load_moe
from studio.sources import open_model

from conftest import moe_yaml
from helpers import ALPHABETS, domain_text


def test_patch_tensors_rewrites_only_the_named_tensors_in_place(tmp_path):
    single = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.ones(4)}
    save_file(single, tmp_path / "model.safetensors")
    patch_tensors(tmp_path, {"a": torch.full((2, 3), 2.5)})
    back = load_file(tmp_path / "model.safetensors")
    assert back["a"].dtype == torch.bfloat16 and torch.equal(back["a"], torch.full((2, 3), 2.5, dtype=torch.bfloat16))
    assert torch.equal(back["b"], single["b"])


def test_patch_tensors_finds_each_tensor_in_its_shard(tmp_path):
    shards = {"model-00001-of-00002.safetensors": {"x": torch.zeros(3)},
              "model-00002-of-00002.safetensors": {"y": torch.zeros(2, 2), "z": torch.ones(1)}}
    for name, tensors in shards.items():
        save_file(tensors, tmp_path / name)
    weight_map = {t: name for name, tensors in shards.items() for t in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    patch_tensors(tmp_path, {"x": torch.tensor([1.0, 2.0, 3.0]), "y": torch.eye(2)})
    assert torch.equal(load_file(tmp_path / "model-00001-of-00002.safetensors")["x"], torch.tensor([1.0, 2.0, 3.0]))
    second = load_file(tmp_path / "model-00002-of-00002.safetensors")
    assert torch.equal(second["y"], torch.eye(2)) and torch.equal(second["z"], torch.ones(1))


def test_patch_tensors_refuses_another_shape(tmp_path):
    save_file({"a": torch.zeros(2, 3)}, tmp_path / "model.safetensors")
    with pytest.raises(AssertionError, match="a: new shape"):
        patch_tensors(tmp_path, {"a": torch.zeros(3, 2)})


def test_large_models_are_refined_on_a_gpu_only():
    assert why_not_refined(refine.CPU_PARAMETERS, "cpu") is None
    assert "--device cuda" in why_not_refined(refine.CPU_PARAMETERS + 1, "cpu")


def test_an_experts_share_lost_is_a_ratio_of_means_as_in_the_quality_measure():
    """Two pieces of expert 0: on one it is barely better than the base (gap 0.01) and the MoE matches the base
    there (divergence 0.01); on the other (gap 1.0) the MoE matches the expert. The MoE loses 0.01 of the 1.01
    the expert wins over the base: about 1%, not the 50% a mean of per-piece ratios would say."""
    lessons_ = [_lesson(expert, gaps) for expert, gaps in ((0, [0.0, 0.02]), (0, [1.5, 0.5]), (1, [0.5, 0.5]))]
    gaps = refine._gaps(lessons_)
    assert gaps == pytest.approx({0: 0.505, 1: 0.5})
    lost = refine._per_expert(torch.tensor([0.01, 0.0, 0.25]), lessons_, gaps)
    assert float(lost[0]) == pytest.approx(0.01 / 1.01) and float(lost[1]) == pytest.approx(0.5)


def test_a_fall_one_held_out_piece_of_several_makes_is_not_told_apart_from_chance():
    """Change in each held-out piece's share lost (positive: worse) for expert 0's three pieces and expert 1's two.
    Expert 0's share falls 8 points in all; where one piece of three makes the fall, that is within two standard
    errors of chance, and the step may be kept; where every piece falls alike, it is refused."""
    lessons_ = [_lesson(expert, [0.5, 0.5]) for expert in (0, 0, 0, 1, 1)]
    one_piece = torch.tensor([0.24, 0.0, 0.0, -0.10, -0.12])
    every_piece = torch.tensor([0.08, 0.08, 0.08, -0.10, -0.12])
    assert refine._none_worse(one_piece, lessons_)
    assert not refine._none_worse(every_piece, lessons_)
    assert refine._none_worse(torch.tensor([0.005, 0.01, 0.0, 0.01, 0.0]), lessons_)  # within TOLERANCE
    assert not refine._none_worse(torch.tensor([0.0, 0.0, 0.0, 0.02, 0.02]), lessons_)  # expert 1 alike, and worse


def test_position_weights_are_half_even_half_the_experts_gain_there_on_its_own_scale():
    """A position's weight is 0.5 + 0.5 * gain / the expert's mean gain over all its positions (expert 0: 0.505,
    expert 1: 0.55); a truncated KL below 0 (the base surer of the expert's top tokens than the expert) counts as
    no gain, and an expert that gains nowhere has even weights."""
    lessons_ = [_lesson(0, [0.0, 0.02]), _lesson(0, [1.5, 0.5]), _lesson(1, [-0.1, 1.1]), _lesson(2, [-0.1, 0.0])]
    weights = refine.position_weights(lessons_)
    expected = [[0.5, 0.5 + 0.5 * 0.02 / 0.505], [0.5 + 0.5 * 1.5 / 0.505, 0.5 + 0.5 * 0.5 / 0.505], [0.5, 1.5],
                [1.0, 1.0]]
    assert [w.tolist() for w in weights] == [pytest.approx(row) for row in expected]
    assert float(torch.cat(weights[:2]).mean()) == pytest.approx(1.0)


def test_the_fits_loss_in_refinement_weighs_positions_as_the_fit_does():
    """Two pieces of different lengths, right-padded, read by one router: the loss is the cross-entropy of each
    position against its piece's expert, averaged with the position weights, padding left out."""
    router = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    chosen = [_lesson(0, [0.0, 0.02]), refine.Lesson(1, [1, 2, 3], torch.zeros(3, 1, dtype=torch.long),
                                                     torch.zeros(3, 1), torch.tensor([1.1, -0.1, 0.55]))]
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    scales = {0: 0.505, 1: 0.55}
    loss = refine._label_loss([(router, x)], chosen, scales, mask)
    ce = torch.nn.functional.cross_entropy(x.reshape(-1, 2), torch.tensor([0, 0, 0, 1, 1, 1]), reduction="none")
    weights = torch.tensor([0.5, 0.5 + 0.5 * 0.02 / 0.505, 0.0, 1.5, 0.5, 1.0])
    assert float(loss) == pytest.approx(float((ce * weights).sum() / weights.sum()))


def _lesson(expert: int, gaps: list[float]) -> refine.Lesson:
    """A lesson of two positions whose only use here is its gaps over the base."""
    return refine.Lesson(expert, [1, 2], torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1), torch.tensor(gaps))


@pytest.fixture(scope="module")
def alphabet_lessons(mistral, tokenizer):
    """What each expert of the synthetic family predicts on text of its own alphabet (16 pieces each)."""
    base, experts = mistral
    base_model = load_writer(open_model(str(base)), "cpu")
    found = []
    for k, path in enumerate(experts):
        ids = tokenizer(domain_text(ALPHABETS[k], seed=k, words=900), add_special_tokens=False)["input_ids"]
        pieces = [[tokenizer.bos_token_id] + ids[i:i + 48] for i in range(0, 16 * 48, 48)]
        found += lessons(load_writer(open_model(str(path)), "cpu"), base_model, pieces, k)
    return found


@pytest.fixture(scope="module")
def random_router_moe(mistral, tmp_path_factory):
    """The synthetic family merged with nn.Linear-like random routers: refinement has everything to win."""
    base, experts = mistral
    out = tmp_path_factory.mktemp("random-routers") / "moe"
    merge(parse_config(moe_yaml(base, experts, gate_mode="uniform_random")), out, MergeOptions(random_seed=3),
          log=lambda m: None)
    return out


def test_lessons_hold_each_experts_top_tokens_and_the_bases_distance(alphabet_lessons):
    assert [sum(lesson.expert == k for lesson in alphabet_lessons) for k in range(4)] == [16] * 4
    lesson = alphabet_lessons[0]
    assert lesson.top_ids.shape == lesson.top_logp.shape == (49, refine.TOP_K)
    assert bool((lesson.top_logp[:, :-1] >= lesson.top_logp[:, 1:]).all())  # most likely first
    assert lesson.gaps.shape == (49,) and lesson.base_gap == pytest.approx(float(lesson.gaps.mean()))
    assert all(lesson.base_gap > 0 for lesson in alphabet_lessons)  # each expert differs from the base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refinement_raises_every_experts_held_out_share(random_router_moe, alphabet_lessons, dtype):
    """From nn.Linear-like random routers, trained towards each expert on its own alphabet: each expert keeps
    more of its gain on held-out pieces, and the model's routers hold the kept rows. In bfloat16 (as on a GPU)
    the model's routers stay bfloat16 and hold the float32 rows rounded."""
    model, _ = load_moe(random_router_moe, dtype)
    routers = find_routers(model)
    log = []
    refined = refine_routers(model, routers, alphabet_lessons, 4, log.append)
    assert refined.step > 0, log
    assert all(after > before for before, after in zip(refined.before, refined.after)), log
    assert refined.rows.dtype == torch.float32
    assert all(routers[layer].weight.dtype == dtype and torch.equal(routers[layer].weight, rows.to(dtype))
               for layer, rows in zip(sorted(routers), refined.rows))
    assert f"Kept the routers of step {refined.step}" in log[-1]


def test_a_gpu_refines_in_bfloat16_and_the_cpu_in_float32():
    assert refine.refine_dtype("cpu") == torch.float32
    assert refine.refine_dtype("cuda:0") == torch.bfloat16


def test_refinement_keeps_the_fitted_routers_when_no_step_helps(random_router_moe, alphabet_lessons, monkeypatch):
    model, _ = load_moe(random_router_moe)
    routers = find_routers(model)
    before = [routers[layer].weight.detach().clone() for layer in sorted(routers)]
    monkeypatch.setattr(refine, "TOLERANCE", -1.0)  # a step is kept only if every share rose by 100 points
    monkeypatch.setattr(refine, "NOISE", 0.0)
    refined = refine_routers(model, routers, alphabet_lessons, 4, lambda m: None)
    assert refined.step == 0 and refined.after == refined.before
    assert all(torch.equal(routers[layer].weight, rows) for layer, rows in zip(sorted(routers), before))


def test_a_budget_sets_the_steps_and_the_learning_rate(random_router_moe, alphabet_lessons):
    """Six steps at learning rate 0 (as a benchmark may ask): six steps are run and reported, and no router moves,
    so the fitted routers are kept."""
    model, _ = load_moe(random_router_moe)
    routers = find_routers(model)
    before = [routers[layer].weight.detach().clone() for layer in sorted(routers)]
    steps, log = [], []
    refined = refine_routers(model, routers, alphabet_lessons, 4, log.append,
                             on_step=lambda done, total: steps.append((done, total)),
                             budget=refine.Budget(steps=6, learning_rate=0.0, labels=0.0))
    assert steps == [(step, 6) for step in range(1, 7)]
    assert any(line.startswith("  step 6 of 6:") for line in log), log
    assert refined.step == 0
    assert all(torch.equal(routers[layer].weight, rows) for layer, rows in zip(sorted(routers), before))


def _alphabet_config(mistral, folder):
    base, experts = mistral
    data = moe_yaml(base, experts, gate_mode="expert_text")
    for k, expert in enumerate(data["experts"]):
        path = folder / f"domain-{k}.txt"
        path.write_text(domain_text(ALPHABETS[k], seed=k))
        expert["calibration_text"] = [str(path)]
    return parse_config(data)


def _routers_on_disk(folder):
    tensors = load_file(folder / "model.safetensors")
    return {name: tensor for name, tensor in tensors.items() if name.endswith(".gate.weight") and ".experts." not in name}


def test_a_merge_writes_the_refined_routers_and_no_refine_the_fitted_ones(mistral, tmp_path):
    config = _alphabet_config(mistral, tmp_path)
    refined_log, fitted_log = [], []
    merge(config, tmp_path / "refined", MergeOptions(random_seed=0), log=refined_log.append)
    merge(config, tmp_path / "fitted", MergeOptions(random_seed=0, refine_routers=False), log=fitted_log.append)
    assert any(line.startswith("Refining the routers end to end") for line in refined_log)
    assert "Router refinement: off (--no-refine)" in fitted_log
    assert not any("Refining" in line for line in fitted_log)
    kept = [line for line in refined_log if line.startswith("Kept the")]
    assert len(kept) == 1
    refined, fitted = _routers_on_disk(tmp_path / "refined"), _routers_on_disk(tmp_path / "fitted")
    assert refined.keys() == fitted.keys() and len(refined) == 2
    same = all(torch.equal(refined[name], fitted[name]) for name in refined)
    assert same == kept[0].startswith("Kept the fitted routers"), kept


def test_a_model_too_large_to_refine_is_merged_with_its_fitted_routers(mistral, tmp_path, monkeypatch):
    monkeypatch.setattr(refine, "CPU_PARAMETERS", 1000)
    log = []
    merge(_alphabet_config(mistral, tmp_path), tmp_path / "moe", MergeOptions(random_seed=0), log=log.append)
    assert any(line.startswith("Router refinement: skipped, because the merged model has") for line in log)
    assert not any("Refining" in line for line in log)


def test_an_expert_with_one_piece_of_text_keeps_the_fitted_routers(random_router_moe, alphabet_lessons):
    model, _ = load_moe(random_router_moe)
    routers = find_routers(model)
    before = torch.stack([routers[layer].weight.detach().clone() for layer in sorted(routers)])
    one_for_expert_2 = [lesson for lesson in alphabet_lessons if lesson.expert != 2] + \
        [next(lesson for lesson in alphabet_lessons if lesson.expert == 2)]
    log = []
    refined = refine_routers(model, routers, one_for_expert_2, 4, log.append)
    assert refined.step == 0 and torch.equal(refined.rows, before)
    assert log == ["Router refinement: skipped, because an expert has fewer than 2 pieces of text (give it more "
                   "calibration text); the fitted routers are kept"]


def test_the_model_card_says_how_the_routers_were_made(mistral, tmp_path):
    merge(_alphabet_config(mistral, tmp_path), tmp_path / "moe", MergeOptions(random_seed=0, refine_routers=False),
          log=lambda m: None)
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "The routers were fitted on text the experts wrote from the prompts above" in card
    assert "The routers are not trained" not in card


def test_float32_masters_keep_steps_smaller_than_bfloat16_can_hold():
    """Adam's first steps move a weight by the learning rate: 1e-3 from 1.0 is below half of bfloat16's spacing
    there (2^-7), so a bfloat16 weight stepped alone would stay 1.0; its float32 master moves, and the weight
    follows it."""
    weight = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.bfloat16))
    master = weight.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([master], lr=1e-3)
    for _ in range(10):
        refine._step(optimizer, [weight], [master], lambda: weight.float().sum())
    assert torch.allclose(master, torch.full((2, 3), 0.99), atol=1e-4)
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, master.to(torch.bfloat16))
    assert bool((weight < 1).all())


def test_a_gpu_out_of_memory_keeps_the_fitted_routers(mistral, tmp_path, monkeypatch):
    """Refinement that runs out of GPU memory (raised here, as CUDA would) leaves the fitted routers on disk and
    says so; the merge finishes."""
    config = _alphabet_config(mistral, tmp_path)
    merge(config, tmp_path / "fitted", MergeOptions(random_seed=0, refine_routers=False), log=lambda m: None)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(refine, "refine_routers", out_of_memory)
    log = []
    merge(config, tmp_path / "moe", MergeOptions(random_seed=0), log=log.append)
    assert "Router refinement: stopped, because the GPU ran out of memory (cpu); the fitted routers are kept" in log
    fitted, kept = _routers_on_disk(tmp_path / "fitted"), _routers_on_disk(tmp_path / "moe")
    assert fitted.keys() == kept.keys() and all(torch.equal(fitted[name], kept[name]) for name in fitted)
