"""The streamed, layer-at-a-time forward gives transformers' own hidden states."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from studio.build.gates import GateOptions
from studio.build.hidden_states import hidden_states_of_prompts, padded_batches
from studio.build.synthetic import save_tokenizer
from studio.families import family_of
from studio.sources import open_model

PROMPTS = ["def add(a, b):\n    return a + b", "12 + 7 =", "Once upon a time there was a small fox.", "Hi"]
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=384, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)


def build(folder, config, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases, so that every weight matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


@pytest.fixture(scope="module", params=["mistral", "llama3-rope", "qwen2-bias", "qwen3-head-norms"])
def model_folder(request, mistral, tmp_path_factory, tokenizer):
    if request.param == "mistral":
        return mistral[0]
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llama3-rope":
        rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return build(folder, LlamaConfig(**SHAPE, rope_parameters=rope, head_dim=24), tokenizer)
    rope = {"rope_type": "default", "rope_theta": 1e6}
    if request.param == "qwen3-head-norms":  # q_norm and k_norm on each head, and a head_dim of its own
        return build(folder, Qwen3Config(**SHAPE, rope_parameters=rope, head_dim=24), tokenizer)
    return build(folder, Qwen2Config(**SHAPE, rope_parameters=rope), tokenizer)


def reference_states(folder, tokenizer, prompt: str) -> torch.Tensor:
    """transformers, one unpadded prompt at a time, in float32: (layers, tokens, hidden)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return torch.stack([h[0] for h in out.hidden_states[:-1]])


@pytest.mark.parametrize("average", [False, True])
def test_streamed_states_equal_transformers(model_folder, tokenizer, average):
    source = open_model(str(model_folder))
    family = family_of(source.config["model_type"])
    logs = []
    states = hidden_states_of_prompts(source, family, tokenizer, PROMPTS, GateOptions(batch_size=3), average,
                                      log=logs.append)
    assert "one layer at a time" in logs[0]
    for prompt in PROMPTS:
        reference = reference_states(model_folder, tokenizer, prompt)
        expected = reference.mean(dim=1) if average else reference[:, -1]
        torch.testing.assert_close(states[prompt], expected, atol=1e-4, rtol=1e-4)


def test_transformers_path_is_used_for_8bit(mistral, tokenizer):
    source = open_model(str(mistral[0]))
    logs = []
    quantized = hidden_states_of_prompts(source, family_of("mistral"), tokenizer, PROMPTS,
                                         GateOptions(load_in_8bit=True), log=logs.append)
    exact = hidden_states_of_prompts(source, family_of("mistral"), tokenizer, PROMPTS, GateOptions(),
                                     log=lambda m: None)
    assert "via transformers (4/8-bit loading asked for)" in logs[0]
    for prompt in PROMPTS:
        cosine = torch.nn.functional.cosine_similarity(quantized[prompt], exact[prompt], dim=-1)
        assert cosine.min() > 0.98


def test_batches_are_left_padded_and_bounded():
    encoded = {"a": [5, 6, 7], "b": [8], "c": [9, 10]}
    batches = list(padded_batches(encoded, 2, pad=0))
    assert [b[0] for b in batches] == [["b", "c"], ["a"]]
    prompts, ids, mask = batches[0]
    assert ids.tolist() == [[0, 8], [9, 10]] and mask.tolist() == [[0, 1], [1, 1]]
