"""GPT-2 family: `transformer.h[i].attn` with a fused `c_attn` and `c_proj` (Conv1D: `y = x @ W + b`, so the
Linear-convention weight is `W.T`), absolute position embeddings (no rotary), `mlp` = c_proj(act(c_fc(x)))."""

from torch import nn

from ..layers.lora import linear_weight, low_rank, out_rows
from .registry import register_architecture
from .spec import ArchSpec, AttentionWeights, MLPWeights


def _attention_weights(attn: nn.Module) -> AttentionWeights:
    C = attn.embed_dim
    w, b = linear_weight(attn.c_attn, conv1d=True), attn.c_attn.bias  # (3C, C), (3C,)
    qkv = low_rank(attn.c_attn)  # one update of the fused projection: one A, B split like the weight
    return AttentionWeights(
        q_w=w[:C], q_b=b[:C],
        k_w=w[C:2 * C], k_b=b[C:2 * C],
        v_w=w[2 * C:], v_b=b[2 * C:],
        o_w=linear_weight(attn.c_proj, conv1d=True), o_b=attn.c_proj.bias,
        q_lora=out_rows(qkv, slice(0, C)), k_lora=out_rows(qkv, slice(C, 2 * C)),
        v_lora=out_rows(qkv, slice(2 * C, 3 * C)), o_lora=low_rank(attn.c_proj),
    )


def _mlp_weights(mlp: nn.Module) -> MLPWeights:
    return MLPWeights(
        up_w=mlp.c_fc.weight.T, up_b=mlp.c_fc.bias,
        gate_w=None, gate_b=None,
        down_w=mlp.c_proj.weight.T, down_b=mlp.c_proj.bias,
        act=mlp.act,
    )


GPT2 = register_architecture(
    ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        layers_path="transformer.h",
        attn_name="attn",
        mlp_name="mlp",
        o_proj_name="c_proj",
        lora_targets=(("c_attn", True), ("c_proj", True)),
        rotary=False,
        attention_weights=_attention_weights,
        mlp_weights=_mlp_weights,
    )
)
