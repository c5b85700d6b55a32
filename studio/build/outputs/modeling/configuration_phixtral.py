"""Phixtral: Phi-2 with a Mixture of Experts in place of each MLP. Written by MoE Merge Studio next to the
weights of a Phi-2 merge; needs transformers 5."""

from transformers import PhiConfig


class PhixtralConfig(PhiConfig):
    """Phi-2's config, plus the experts: how many, how many each token uses, and the router loss."""

    model_type = "phixtral"

    def __init__(self, num_local_experts: int = 4, num_experts_per_tok: int = 2, output_router_logits: bool = False,
                 router_aux_loss_coef: float = 0.001, **kwargs):
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        super().__init__(**kwargs)
