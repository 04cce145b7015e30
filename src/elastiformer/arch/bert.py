"""BERT family (BertModel as AutoModel loads it, e.g. all-MiniLM-L6-v2; task models keep it under `bert`).

Post-LN: `BertAttention` = self-attention (`self.query / key / value`) then `BertSelfOutput` =
LayerNorm(dense(heads) + input); the MLP is split over two modules, `BertIntermediate` = act(dense(x)) and
`BertOutput(h, x)` = LayerNorm(dense(h) + x), joined by `BertLayer.feed_forward_chunk`. A token that skips a
sub-layer must skip that LayerNorm too (pass through unchanged), so the wrappers own whole post-LN sub-layers: the
attention wrapper replaces `attention`, and the MLP wrapper replaces `intermediate` and owns a `PostNormFeedForward`
(intermediate + output as one module, `x -> LayerNorm(x + dense(act(dense(x))))`), while `output` becomes a
pass-through of the wrapper's result.
"""

import torch
from torch import nn

from ..layers.lora import linear_weight, low_rank
from .registry import register_architecture
from .spec import ArchSpec, AttentionWeights, MLPWeights


class PostNormFeedForward(nn.Module):
    """BERT's MLP as one module: `BertOutput(BertIntermediate(x), x)` (both unmodified)."""

    def __init__(self, intermediate: nn.Module, output: nn.Module):
        super().__init__()
        self.intermediate = intermediate
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)


class TakeResult(nn.Module):
    """Stands in for `BertOutput` while the MLP wrapper (in `intermediate`) returns the finished post-LN output:
    `output(h, x)` returns `h`."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return hidden_states


def _take_mlp(block: nn.Module) -> nn.Module:
    if isinstance(block.output, TakeResult):  # already wrapped: the wrapper sits in `intermediate`
        return block.intermediate
    return PostNormFeedForward(block.intermediate, block.output)


def _put_mlp(block: nn.Module, module: nn.Module) -> None:
    if isinstance(module, PostNormFeedForward):  # unwrapping: the original two modules go back
        block.intermediate, block.output = module.intermediate, module.output
    else:
        block.intermediate, block.output = module, TakeResult()


def _attention_weights(attn: nn.Module) -> AttentionWeights:
    s = attn.self
    return AttentionWeights(
        q_w=linear_weight(s.query), q_b=s.query.bias,
        k_w=linear_weight(s.key), k_b=s.key.bias,
        v_w=linear_weight(s.value), v_b=s.value.bias,
        o_w=linear_weight(attn.output.dense), o_b=attn.output.dense.bias,
        norm=attn.output.LayerNorm,
        q_lora=low_rank(s.query), k_lora=low_rank(s.key), v_lora=low_rank(s.value), o_lora=low_rank(attn.output.dense),
    )


def _mlp_weights(mlp: nn.Module) -> MLPWeights:
    up, down = mlp.intermediate.dense, mlp.output.dense
    return MLPWeights(
        up_w=up.weight, up_b=up.bias, gate_w=None, gate_b=None, down_w=down.weight, down_b=down.bias,
        act=mlp.intermediate.intermediate_act_fn, norm=mlp.output.LayerNorm,
    )


BERT = register_architecture(
    ArchSpec(
        name="bert",
        model_types=("bert",),
        layers_path="encoder.layer",
        alt_layers_paths=("bert.encoder.layer",),
        layers_in_backbone="encoder.layer",
        attn_name="attention",
        mlp_name="intermediate",
        o_proj_name="output.dense",
        lora_targets=(("self.query", False), ("self.key", False), ("self.value", False), ("output.dense", False)),
        rotary=False,
        attention_weights=_attention_weights,
        mlp_weights=_mlp_weights,
        causal=False,
        auto_class="AutoModel",
        model_classes=("BertModel",),
        post_norm=True,
        default_pooling="mean",
        take_mlp=_take_mlp,
        put_mlp=_put_mlp,
    )
)
