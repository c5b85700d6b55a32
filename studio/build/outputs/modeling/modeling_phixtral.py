"""Phixtral: Phi-2 with a Mixture of Experts in place of each MLP. Written by MoE Merge Studio next to the
weights of a Phi-2 merge; needs transformers 5.

Attention, embeddings, norms and the output head are Phi-2's own modules. Each layer's MLP becomes
`mlp.experts.J` (Phi-2 MLPs: fc1 and fc2 with biases, GELU) and a router `mlp.gate` that works as Mixtral's
(sparse_moe.py). `output_router_logits=True` reports every layer's router logits, as Mixtral does.
"""

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.phi import modeling_phi as phi
from transformers.utils.output_capturing import OutputRecorder

from .configuration_phixtral import PhixtralConfig
from .sparse_moe import RoutedExperts, Router


class PhixtralDecoderLayer(phi.PhiDecoderLayer):
    """Phi-2's parallel block (attention and MLP read the same normed input), with the MoE as its MLP."""

    def __init__(self, config: PhixtralConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.self_attn = phi.PhiAttention(config, layer_idx=layer_idx)
        self.mlp = RoutedExperts(config, [phi.PhiMLP(config) for _ in range(config.num_local_experts)])
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)


class PhixtralPreTrainedModel(phi.PhiPreTrainedModel):
    config_class = PhixtralConfig
    config: PhixtralConfig
    _no_split_modules = ["PhixtralDecoderLayer"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(Router, index=0),
        "hidden_states": PhixtralDecoderLayer,
        "attentions": phi.PhiAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Router):
            module.weight.normal_(mean=0.0, std=self.config.initializer_range)


class PhixtralModel(PhixtralPreTrainedModel, phi.PhiModel):
    """Phi-2's model (its forward) with Phixtral decoder layers."""

    def __init__(self, config: PhixtralConfig):
        phi.PhiPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(PhixtralDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.rotary_emb = phi.PhiRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()


class PhixtralForCausalLM(PhixtralPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PhixtralConfig):
        super().__init__(config)
        self.model = PhixtralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)  # Phi-2's head has a bias
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_router_logits=None,
                logits_to_keep=0, **kwargs) -> MoeCausalLMOutputWithPast:
        """As Mixtral's: logits, the loss with the routers' load-balancing term, and the router logits."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_router_logits=output_router_logits, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = aux_loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if output_router_logits:
            aux_loss = load_balancing_loss_func(outputs.router_logits, self.config.num_local_experts,
                                                self.config.num_experts_per_tok, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         past_key_values=outputs.past_key_values,
                                         hidden_states=outputs.get("hidden_states"),
                                         attentions=outputs.get("attentions"),
                                         router_logits=outputs.get("router_logits"))
