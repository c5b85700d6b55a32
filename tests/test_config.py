from pathlib import Path

import pytest

from studio.config import ONE_EXPERT_PER_TOKEN_NOTE, MoEConfig, check_rules, dump_yaml, load_config, load_yaml
from studio.errors import StudioError

EXAMPLES = sorted((Path(__file__).parent.parent / "assets" / "examples").glob("*.yml"))
GUIDE_WITH_TYPO = """
base_model:  Mistralai/Mistral-7B-Instruct-v0.2
dtype:  float16
gateway_mode:  cheap_embed
experts:
  - source_model:  HuggingFaceH4/zephyr-7b-beta
    positive_prompts: [ "a" ]
  - source_model: mistralai/Mistral-7B-Instruct-v0.2
    positive_prompts: [ "b" ]
"""


def error_of(text: str) -> str:
    with pytest.raises(StudioError) as info:
        load_yaml(text)
    return str(info.value)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load_and_round_trip(path):
    config = load_config(path)
    assert load_yaml(dump_yaml(config)) == config
    errors, _ = check_rules(config)
    assert errors == []


def test_round_trip_keeps_every_field():
    config = MoEConfig(base_model="org/base@v2", gate_mode="cheap_embed", dtype="float16", experts_per_token=1,
                       architecture="mixtral", experts=[
                           {"source_model": "org/a", "positive_prompts": ["x\ny", "z: 'q'"], "negative_prompts": ["n"],
                            "noise_scale": 0.01, "residual_scale": 0.5},
                           {"source_model": "./local/b", "positive_prompts": ["w"]}],
                       shared_experts=[{"source_model": "org/s", "positive_prompts": ["s"]}])
    assert load_yaml(dump_yaml(config)) == config


def test_guide_typo_gateway_mode_suggests_gate_mode():
    message = error_of(GUIDE_WITH_TYPO)
    assert "`gateway_mode`: unknown key (did you mean `gate_mode`?)" in message


def test_unknown_expert_key_suggests_the_expert_field():
    message = error_of("base_model: a/b\nexperts:\n  - source_model: a/c\n    positive_prompt: [x]\n")
    assert "`experts[0].positive_prompt`: unknown key (did you mean `positive_prompts`?)" in message


def test_unknown_gate_mode_is_refused_with_a_suggestion():
    message = error_of("base_model: a/b\ngate_mode: hiden\nexperts:\n  - source_model: a/c\n")
    assert "unknown gate mode 'hiden' (did you mean `hidden`?)" in message


def test_mergekit_yaml_config_is_recognised():
    message = error_of("merge_method: slerp\nbase_model: a/b\nexperts: [{source_model: a/c}]\n")
    assert "mergekit-yaml config" in message


def test_missing_fields_and_bad_yaml_are_named():
    assert "`experts`: required field is missing" in error_of("base_model: a/b\n")
    assert "not valid YAML" in error_of("base_model: [a\n")
    assert "expected a mapping" in error_of("- a\n- b\n")


def test_dtype_and_gate_mode_aliases_are_normalised():
    config = load_yaml("base_model: a/b\ndtype: torch.float16\ngate_mode: hidden_last\nexperts: [{source_model: c}]")
    assert (config.dtype, config.gate_mode) == ("float16", "hidden")
    assert "unknown dtype 'int8'" in error_of("base_model: a/b\ndtype: int8\nexperts: [{source_model: c}]")


def test_single_prompt_string_becomes_a_list():
    config = load_yaml("base_model: a\nexperts: [{source_model: c, positive_prompts: hello}]")
    assert config.experts[0].positive_prompts == ["hello"]


def rules(text: str, **kwargs) -> tuple[list[str], list[str]]:
    return check_rules(load_yaml(text), **kwargs)


def test_rule_experts_per_token_needs_enough_experts():
    errors, _ = rules("base_model: a\nexperts_per_token: 3\nexperts:\n"
                      "  - {source_model: b, positive_prompts: [x]}\n  - {source_model: c, positive_prompts: [y]}")
    assert any("`experts_per_token` is 3 but there are only 2 experts" in e for e in errors)
    assert "experts_per_token" in error_of("base_model: a\nexperts_per_token: 0\nexperts: [{source_model: b}]")


def test_rule_prompts_required_except_random_modes():
    text = "base_model: a\ngate_mode: {}\nexperts:\n  - {{source_model: b, positive_prompts: [x]}}\n  - {{source_model: c}}"
    errors, _ = rules(text.format("hidden"))
    assert any("`experts[1]` (c) has no `positive_prompts`" in e for e in errors)
    assert rules(text.format("random")) == ([], [])
    assert rules(text.format("uniform_random")) == ([], [])


def test_rule_identical_prompts_and_identical_models():
    same_prompts = "base_model: a\nexperts:\n  - {source_model: b, positive_prompts: [x]}\n  - {source_model: c, positive_prompts: [x]}"
    assert any("same prompts" in e for e in rules(same_prompts)[0])
    same_models = "base_model: a\nexperts:\n  - {source_model: b, positive_prompts: [x]}\n  - {source_model: b, positive_prompts: [y]}"
    assert any("--i-understand-this-is-not-useful-without-training" in e for e in rules(same_models)[0])
    assert rules(same_models, allow_identical_experts=True)[0] == []


def test_rule_shared_experts_and_power_of_two_warning():
    text = ("base_model: a\nexperts:\n  - {source_model: b, positive_prompts: [x]}\n  - {source_model: c, positive_prompts: [y]}\n"
            "  - {source_model: d, positive_prompts: [z]}\nshared_experts:\n  - {source_model: e}\n  - {source_model: f}")
    errors, warnings = rules(text)
    assert any("at most one shared expert" in e for e in errors)
    assert any("3 experts is not a power of two" in w for w in warnings)


def test_one_expert_per_token_is_warned_about_with_what_it_costs():
    two = "base_model: a\nexperts:\n  - {source_model: b, positive_prompts: [x]}\n  - {source_model: c, positive_prompts: [y]}"
    assert rules(two) == ([], [])
    assert rules(two + "\nexperts_per_token: 1") == ([], [ONE_EXPERT_PER_TOKEN_NOTE])


# As public guides write it (mergekit-moe reads no merge method, so it merges this config as it is).
GUIDE_WITH_MERGE_METHOD = """
base_model: mistralai/Mistral-7B-Instruct-v0.2
merge_method: moe
gate_mode: hidden
dtype: bfloat16
experts:
  - source_model: HuggingFaceH4/zephyr-7b-beta
    positive_prompts: ["chat"]
  - source_model: teknium/OpenHermes-2.5-Mistral-7B
    positive_prompts: ["code"]
"""


def test_merge_method_moe_is_accepted_with_a_note():
    config = load_yaml(GUIDE_WITH_MERGE_METHOD)
    errors, warnings = check_rules(config)
    assert errors == []
    assert warnings == ["`merge_method: moe` is ignored, as mergekit-moe ignores it: an MoE config always makes an "
                        "MoE merge (the line can go)."]
    assert load_yaml(dump_yaml(config)) == config and "merge_method: moe" in dump_yaml(config)


def test_another_merge_method_is_still_a_mergekit_yaml_config():
    message = error_of(GUIDE_WITH_MERGE_METHOD.replace("merge_method: moe", "merge_method: ties"))
    assert "`merge_method`: this looks like a mergekit-yaml config (merge method 'ties')" in message
