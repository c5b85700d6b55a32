"""DeepSeek-MoE: Llama/Mistral attention, and in every layer routed experts plus a shared expert that every
token passes through, ungated. Written by MoE Merge Studio next to the weights of a merge; needs transformers 5.

Tensor names are deepseek-moe-16b's: `mlp.experts.J.{gate,up,down}_proj`, `mlp.shared_experts.*` and the router
`mlp.gate`. Attention, norms and the forward passes are Mixtral's; the router works as Mixtral's
(sparse_moe.py), and `output_router_logits=True` reports every layer's router logits.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mixtral import modeling_mixtral as mixtral
from transformers.utils.output_capturing import OutputRecorder

from .configuration_deepseek import DeepseekConfig
from .sparse_moe import RoutedExperts, Router


class DeepseekMLP(nn.Module):
    """A SwiGLU MLP of the given width (an expert, or the shared experts)."""

    def __init__(self, config: DeepseekConfig, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekMoE(RoutedExperts):
    """Routed experts, plus the shared experts' output added for every token."""

    def __init__(self, config: DeepseekConfig):
        width = config.moe_intermediate_size
        super().__init__(config, [DeepseekMLP(config, width) for _ in range(config.n_routed_experts)])
        shared = config.n_shared_experts
        self.shared_experts = DeepseekMLP(config, width * shared) if shared else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routed = super().forward(hidden_states)
        return routed if self.shared_experts is None else routed + self.shared_experts(hidden_states)


class DeepseekDecoderLayer(mixtral.MixtralDecoderLayer):
    def __init__(self, config: DeepseekConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = mixtral.MixtralAttention(config, layer_idx)
        self.mlp = DeepseekMoE(config)
        self.input_layernorm = mixtral.MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = mixtral.MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DeepseekPreTrainedModel(mixtral.MixtralPreTrainedModel):
    config_class = DeepseekConfig
    config: DeepseekConfig
    _no_split_modules = ["DeepseekDecoderLayer"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(Router, index=0),
        "hidden_states": DeepseekDecoderLayer,
        "attentions": mixtral.MixtralAttention,
    }


class DeepseekModel(DeepseekPreTrainedModel, mixtral.MixtralModel):
    """Mixtral's model (its forward) with DeepSeek decoder layers."""

    def __init__(self, config: DeepseekConfig):
        mixtral.MixtralPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = mixtral.MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = mixtral.MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DeepseekForCausalLM(DeepseekPreTrainedModel, mixtral.MixtralForCausalLM):
    """Mixtral's causal LM (its forward: logits, load-balancing loss, router logits) over the DeepSeek model."""

    def __init__(self, config: DeepseekConfig):
        mixtral.MixtralPreTrainedModel.__init__(self, config)
        self.model = DeepseekModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.n_routed_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()
