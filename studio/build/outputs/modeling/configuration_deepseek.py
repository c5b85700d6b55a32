"""DeepSeek-MoE config, in the keys of deepseek-moe-16b: routed experts plus ungated shared experts in every
layer. Written by MoE Merge Studio next to the weights of a merge; needs transformers 5."""

from transformers import MixtralConfig


class DeepseekConfig(MixtralConfig):
    """Mixtral's config (attention, norms, rotary embedding), with DeepSeek-MoE's expert keys. The studio's
    model code covers what its merges write: every layer an MoE layer, softmax routing, the top-k weights
    renormalised to sum to 1 or not (`norm_topk_prob`)."""

    model_type = "deepseek"

    def __init__(self, n_routed_experts: int = 8, n_shared_experts: int | None = None,
                 moe_intermediate_size: int | None = None, first_k_dense_replace: int = 0, moe_layer_freq: int = 1,
                 scoring_func: str = "softmax", norm_topk_prob: bool = True, **kwargs):
        if first_k_dense_replace != 0 or moe_layer_freq != 1 or scoring_func != "softmax":
            raise ValueError("This DeepSeek-MoE code covers first_k_dense_replace 0, moe_layer_freq 1 and softmax "
                             "scoring only.")
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        self.scoring_func = scoring_func
        self.norm_topk_prob = norm_topk_prob
        kwargs["num_local_experts"] = n_routed_experts
        super().__init__(**kwargs)
        self.moe_intermediate_size = moe_intermediate_size or self.intermediate_size
