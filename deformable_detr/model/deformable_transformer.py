"""The deformable transformer: encoder and decoder layers, reference points, two-stage proposals.

Shapes: B batch, S = sum_l H_l * W_l encoder positions, Q queries, C = d_model, L levels.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .ms_deform_attn import MultiScaleDeformableAttention
from .position_encoding import sine_features


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) elementwise, any shape, with x clamped to [0, 1] and both terms to at least eps."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(reference: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A box head's output as offsets in logit space: reference (..., 4) boxes or (..., 2) points (then the
    size is the delta's alone) in [0, 1], delta (..., 4) -> boxes (..., 4) as (cx, cy, w, h) in [0, 1]."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


def in_full_precision(fn, dtype: torch.dtype, *tensors: torch.Tensor):
    """fn(*tensors); under autocast, with autocast off and the floating-point tensors in `dtype` (the weights')."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return fn(*tensors)
    with torch.autocast(device, enabled=False):
        return fn(*(t.to(dtype) if t.is_floating_point() else t for t in tensors))


class HeadLinear(nn.Linear):
    """A linear layer of a prediction head, which runs in its weights' type even under autocast.

    Class scores rank the queries and the two-stage proposals (top-k), and box deltas add up over the decoder's
    refinements: rounded to bf16 (8 significant bits) many scores would tie and boxes would move by up to 0.4 %.
    The heads see a few rows (Q queries, or the S positions in two-stage), so full precision costs next to nothing.
    """

    def forward(self, x):
        return in_full_precision(super().forward, self.weight.dtype, x)


class MLP(nn.Module):
    """The box head: linear layers (`HeadLinear`) with ReLU between them (3 layers, C -> C -> C -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(HeadLinear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class FeedForward(nn.Module):
    """linear1 -> activation -> dropout -> linear2 -> dropout."""

    def __init__(self, d_model, ffn_dim, activation, dropout, activation_dropout):
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.activation = ACT2FN[activation]
        # a dropout of p=0 still copies its input in training: leave it out
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.activation_dropout = nn.Dropout(activation_dropout) if activation_dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.dropout(self.linear2(self.activation_dropout(self.activation(self.linear1(x)))))


def _feed_forward(config, ffn_dim):
    return FeedForward(config.d_model, ffn_dim, config.activation_function, config.dropout, config.activation_dropout)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention written out, so that the weights can be returned: query, key, value (B, M, Q, D),
    attention_mask (B, 1, 1, Q) or (B, 1, Q, Q) added to the scores, or None -> output (B, Q, M, D), weights
    (B, M, Q, Q).
    The signature of transformers' attention functions (ALL_ATTENTION_FUNCTIONS), which "sdpa" also has."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(F.dropout(weights, p=dropout, training=module.training), value)
    return output.transpose(1, 2).contiguous(), weights


class DecoderSelfAttention(nn.Module):
    """Multi-head self-attention among the queries, position embeddings added to the queries and keys only.

    The parameters are those of `nn.MultiheadAttention` (in_proj_weight (3C, C) = [W_q; W_k; W_v], in_proj_bias,
    out_proj), so that every checkpoint and conversion loads; the attention itself runs through transformers'
    attention functions, chosen by `config._attn_implementation`: "eager" returns the weights, "sdpa" runs
    F.scaled_dot_product_attention; asked for the weights (`need_weights`), it runs "eager"."""

    is_causal = False  # read by transformers' sdpa function

    def __init__(self, config):
        super().__init__()
        C, M = config.d_model, config.decoder_attention_heads
        self.config = config
        self.num_heads, self.head_dim = M, C // M
        self.scaling = self.head_dim**-0.5
        self.in_proj_weight = nn.Parameter(torch.empty(3 * C, C))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * C))
        self.out_proj = nn.Linear(C, C)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, need_weights=False):
        """hidden_states, position_embeddings (B, Q, C); attention_mask (B, Q), nonzero (or True) on the queries
        that may be attended to, or (B, Q, Q), nonzero where query i may attend to query j (a block mask keeps
        groups of queries apart), or None -> output (B, Q, C), weights (B, M, Q, Q) (None under "sdpa" unless
        need_weights)."""
        B, Q, C = hidden_states.shape
        heads = (B, Q, self.num_heads, self.head_dim)
        query, key = F.linear(
            hidden_states + position_embeddings, self.in_proj_weight[: 2 * C], self.in_proj_bias[: 2 * C]
        ).chunk(2, -1)
        value = F.linear(hidden_states, self.in_proj_weight[2 * C :], self.in_proj_bias[2 * C :])
        query, key, value = (t.reshape(heads).transpose(1, 2) for t in (query, key, value))
        if attention_mask is not None:  # additive: 0 where attended, the type's minimum where masked
            blocked = ~attention_mask.bool()
            blocked = blocked[:, None, None, :] if blocked.ndim == 2 else blocked[:, None]
            attention_mask = torch.zeros(blocked.shape, dtype=query.dtype, device=query.device).masked_fill(
                blocked, torch.finfo(query.dtype).min
            )
        attention = eager_attention
        if not need_weights:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        dropout = self.config.attention_dropout if self.training else 0.0
        output, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling, dropout=dropout)
        return self.out_proj(output.reshape(B, Q, C)), weights


class DeformableEncoderLayer(GradientCheckpointingLayer):
    """Deformable self-attention over all levels -> add & norm -> FFN -> add & norm."""

    def __init__(self, config):
        super().__init__()
        C = config.d_model
        self.self_attn = MultiScaleDeformableAttention(
            C, config.num_feature_levels, config.encoder_attention_heads, config.encoder_n_points
        )
        self.self_attn_norm = nn.LayerNorm(C)
        self.dropout = nn.Dropout(config.dropout)
        self.ffn = _feed_forward(config, config.encoder_ffn_dim)
        self.ffn_norm = nn.LayerNorm(C)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask, output_attentions=False):
        """src, pos (B, S, C); reference_points (B, S, L, 2); padding_mask (B, S) True on padding, or None
        -> (B, S, C), and the attention weights (B, S, M, L, K) with output_attentions (else None)."""
        attended, weights = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        # residuals added in place into fresh outputs: no extra (B, S, C) allocations
        src = self.self_attn_norm(self.dropout(attended).add_(src))
        return self.ffn_norm(self.ffn(src).add_(src)), weights if output_attentions else None


class DeformableEncoder(nn.Module):
    """The encoder: deformable self-attention over the flattened maps of every level, each position attending
    around its own pixel centre (`reference_points`)."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(config) for _ in range(config.encoder_layers))

    @staticmethod
    def reference_points(spatial_shapes, valid_ratios):
        """Pixel centres of every level, (B, S, L, 2) as (x, y) in [0, 1] of each level's padded map.

        A centre is first normalised by the valid (unpadded) extent of its own level, then scaled into the
        padded frame of every level; valid_ratios (B, L, 2) as (w, h) fractions of real pixels.
        """
        points = []
        for level, (height, width) in enumerate(spatial_shapes):
            # arange, not linspace: the same values, and sizes stay symbolic under torch.export
            ref_y, ref_x = torch.meshgrid(
                torch.arange(height, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                torch.arange(width, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, spatial_shapes, valid_ratios, padding_mask, output_attentions=False):
        """src, pos (B, S, C); spatial_shapes [(H_l, W_l)] -> memory (B, S, C), the hidden states after each layer,
        and with output_attentions each layer's attention weights (B, S, M, L, K) (else an empty tuple)."""
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        hidden_states, attentions = [], []
        for layer in self.layers:
            src, weights = layer(
                src, pos, reference_points, spatial_shapes, padding_mask, output_attentions=output_attentions
            )
            hidden_states.append(src)
            if output_attentions:
                attentions.append(weights)
        return src, tuple(hidden_states), tuple(attentions)


class DeformableDecoderLayer(GradientCheckpointingLayer):
    """Self-attention among queries -> add & norm -> deformable cross-attention -> add & norm -> FFN -> add & norm."""

    def __init__(self, config):
        super().__init__()
        C = config.d_model
        self.self_attn = DecoderSelfAttention(config)
        self.self_attn_norm = nn.LayerNorm(C)
        self.cross_attn = MultiScaleDeformableAttention(
            C, config.num_feature_levels, config.decoder_attention_heads, config.decoder_n_points
        )
        self.cross_attn_norm = nn.LayerNorm(C)
        self.dropout = nn.Dropout(config.dropout)
        self.ffn = _feed_forward(config, config.decoder_ffn_dim)
        self.ffn_norm = nn.LayerNorm(C)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        padding_mask,
        attention_mask=None,
        output_attentions=False,
    ):
        """tgt, query_pos (B, Q, C); reference_points (B, Q, L, 2 or 4); memory (B, S, C); attention_mask (B, Q)
        or (B, Q, Q) as in `DecoderSelfAttention`, or None -> (B, Q, C), and with output_attentions the
        self-attention weights (B, M, Q, Q) and the cross-attention weights (B, Q, M, L, K) (else two Nones).

        Under autocast only the values (S rows) are projected in its type: the rest sees the Q queries (300), so
        it runs in full precision at next to no cost, and the class scores take less of bf16's rounding. The values
        are then cast to full precision too (a copy of S rows per layer), for the sampling and its sums."""
        value = self.cross_attn.project_values(memory, padding_mask)
        dtype = self.ffn_norm.weight.dtype

        def queries_side(tgt, query_pos, reference_points, value):
            attended, self_weights = self.self_attn(tgt, query_pos, attention_mask, output_attentions)
            tgt = self.self_attn_norm(tgt + self.dropout(attended))
            attended, cross_weights = self.cross_attn.attend(tgt + query_pos, reference_points, value, spatial_shapes)
            tgt = self.cross_attn_norm(tgt + self.dropout(attended))
            if not output_attentions:
                self_weights = cross_weights = None
            return self.ffn_norm(tgt + self.ffn(tgt)), self_weights, cross_weights

        return in_full_precision(queries_side, dtype, tgt, query_pos, reference_points, value)


class DeformableDecoder(nn.Module):
    """The decoder; with `bbox_embed` (one box head per layer) each layer refines the reference boxes."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(config) for _ in range(config.decoder_layers))
        self.bbox_embed = None
        if config.with_box_refine:
            self.bbox_embed = nn.ModuleList(
                MLP(config.d_model, config.d_model, 4, 3) for _ in range(config.decoder_layers)
            )

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        valid_ratios,
        padding_mask,
        attention_mask=None,
        output_attentions=False,
    ):
        """
        Args:
            tgt, query_pos: (B, Q, C) content and position of the queries.
            reference_points: (B, Q, 2) points or (B, Q, 4) boxes, in [0, 1] of the real (unpadded) image.
            memory: (B, S, C), the encoder's output; spatial_shapes [(H_l, W_l)].
            valid_ratios: (B, L, 2) the (w, h) fractions of real pixels per level.
            padding_mask: (B, S) True on padding, or None where nothing is padded.
            attention_mask: (B, Q), nonzero on the queries the self-attention may attend to, or (B, Q, Q), nonzero
                where query i may attend to query j; None: all of them.
        Returns:
            hidden states (B, n_layers, Q, C), the reference points after each layer (B, n_layers, Q, 2 or 4), and
            with output_attentions each layer's self-attention (B, M, Q, Q) and cross-attention (B, Q, M, L, K)
            weights (else two empty tuples).
        """
        hidden_states, references, self_attentions, cross_attentions = [], [], [], []
        for index, layer in enumerate(self.layers):
            scale = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            tgt, self_weights, cross_weights = layer(
                tgt,
                query_pos,
                reference_points[:, :, None] * scale[:, None],
                memory,
                spatial_shapes,
                padding_mask,
                attention_mask=attention_mask,
                output_attentions=output_attentions,
            )
            if self.bbox_embed is not None:
                reference_points = refine_boxes(reference_points, self.bbox_embed[index](tgt)).detach()
            hidden_states.append(tgt)
            references.append(reference_points)
            if output_attentions:
                self_attentions.append(self_weights)
                cross_attentions.append(cross_weights)
        return (
            torch.stack(hidden_states, 1),
            torch.stack(references, 1),
            tuple(self_attentions),
            tuple(cross_attentions),
        )


def encoder_proposals(memory, padding_mask, spatial_shapes):
    """Two-stage: one proposal per encoder position, a box of side 0.05 * 2^l centred on its pixel; memory (B, S, C),
    padding_mask (B, S) True on padding, spatial_shapes [(H_l, W_l)].

    Returns proposals (B, S, 4) as inverse_sigmoid(cx, cy, w, h), +inf where invalid (padding or too close to
    the border), and the memory (B, S, C) zeroed at those positions.
    """
    B = memory.shape[0]
    proposals, start = [], 0
    for level, (height, width) in enumerate(spatial_shapes):
        mask = padding_mask[:, start : start + height * width].view(B, height, width)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, dtype=memory.dtype, device=memory.device),
            torch.arange(width, dtype=memory.dtype, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)
        scale = torch.stack([valid_w, valid_h], 1).view(B, 1, 1, 2)
        centre = (grid[None].expand(B, -1, -1, -1) + 0.5) / scale
        size = torch.full_like(centre, 0.05 * 2.0**level)
        proposals.append(torch.cat((centre, size), -1).view(B, -1, 4))
        start += height * width
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = padding_mask[..., None] | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    return proposals, memory.masked_fill(invalid, 0.0)


def proposal_position_embedding(proposals, d_model, temperature=10000.0):
    """Sine embedding of boxes: (B, Q, 4) logits -> (B, Q, 2C), each coordinate on C/2 features (in fp32)."""
    angles = proposals.sigmoid().float() * (2 * math.pi)
    return sine_features(angles, d_model // 2, temperature).flatten(2).to(proposals.dtype)
