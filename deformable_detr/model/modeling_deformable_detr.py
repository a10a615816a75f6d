"""Deformable DETR as transformers models: the encoder-decoder (`DeformableDetrModel`) and the detector with
its class and box heads (`DeformableDetrForObjectDetection`).

Shapes: B batch, C = d_model, L levels, S = sum_l H_l * W_l encoder positions, Q queries, N classes.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, TransformersKwargs, logging

from .backbone import Backbone, FrozenBatchNorm2d, ResNet, downsample_mask
from .configuration_deformable_detr import DeformableDetrConfig
from .deformable_transformer import (
    MLP,
    DecoderSelfAttention,
    DeformableDecoder,
    DeformableEncoder,
    HeadLinear,
    encoder_proposals,
    proposal_position_embedding,
    refine_boxes,
)
from .loss_deformable_detr import DeformableDetrLoss
from .ms_deform_attn import MultiScaleDeformableAttention
from .position_encoding import PositionEmbeddingLearned, build_position_encoding
from .transformers_mapping import from_pretrained_kwargs, is_transformers_config

logger = logging.get_logger(__name__)

PRIOR_PROBABILITY = 0.01  # initial foreground probability of every class (focal-loss init)


@dataclass
class DeformableDetrModelOutput(ModelOutput):
    """
    last_hidden_state: (B, Q, C) output of the last decoder layer.
    intermediate_hidden_states: (B, decoder_layers, Q, C) output of every decoder layer.
    intermediate_reference_points: (B, decoder_layers, Q, 2 or 4) reference points after every layer.
    init_reference_points: (B, Q, 2 or 4) reference points the decoder starts from, in [0, 1].
    encoder_last_hidden_state: (B, S, C).
    enc_outputs_class: (B, S, N) two-stage proposal logits; enc_outputs_coord_logits: (B, S, 4) their boxes
        before the sigmoid.
    encoder_hidden_states, decoder_hidden_states: with output_hidden_states, as transformers gives them: the
        encoder's input (B, S, C) and every encoder layer's output; the decoder's input queries (B, Q, C) and every
        decoder layer's output.
    decoder_attentions, cross_attentions, encoder_attentions: with output_attentions, per layer, as transformers
        gives them: the decoder's self-attention weights (B, M, Q, Q), its deformable cross-attention weights
        (B, Q, M, L, K) and the encoder's deformable self-attention weights (B, S, M, L, K) (M heads, K points), each
        summing to 1 over the keys (L * K sampled points for the deformable ones).
    """

    last_hidden_state: torch.Tensor | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    intermediate_reference_points: torch.Tensor | None = None
    init_reference_points: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    enc_outputs_class: torch.Tensor | None = None
    enc_outputs_coord_logits: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class _DetectionHeadOutput(ModelOutput):
    """
    logits: (B, Q, N) class logits (sigmoid, no background class).
    pred_boxes: (B, Q, 4) boxes as (cx, cy, w, h) in [0, 1] of each image's real (unpadded) extent.
    auxiliary_outputs: with labels (or output_auxiliary) and config.auxiliary_loss, per decoder layer but the last,
        {"logits", "pred_boxes"}.
    loss, loss_dict: the training loss and its terms, when labels are given.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict] | None = None


@dataclass
class DeformableDetrObjectDetectionOutput(DeformableDetrModelOutput, _DetectionHeadOutput):
    """The detector's output: the fields of `_DetectionHeadOutput`, then those of `DeformableDetrModelOutput`
    (a dataclass collects its bases' fields from the last base to the first), which is the order of `to_tuple()`."""


def _class_bias(linear: nn.Linear) -> torch.Tensor:
    return torch.full_like(linear.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))


def _init_box_head(head: MLP, size_bias: float):
    """The last layer starts at zero, so boxes start at the reference points; size logits at `size_bias`."""
    init.zeros_(head.layers[-1].weight)
    init.copy_(head.layers[-1].bias, torch.tensor([0.0, 0.0, size_bias, size_bias]))


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool mask of real pixels -> (B, 2): the fractions (w, h) of real columns and rows."""
    _, height, width = mask.shape
    return torch.stack([mask[:, 0, :].sum(1) / width, mask[:, :, 0].sum(1) / height], -1)


def _check_kwargs(kwargs: dict):
    """TypeError naming the keyword arguments that are none of transformers' common ones (TransformersKwargs).
    `decoder_input_ids`, which generic encoder-decoder code (the common model tests) gives every such model, is
    dropped with a warning: this decoder's inputs are learned queries, not tokens."""
    if kwargs.pop("decoder_input_ids", None) is not None:
        logger.warning_once("decoder_input_ids is ignored: Deformable DETR's decoder starts from its learned queries")
    unknown = sorted(set(kwargs) - set(TransformersKwargs.__annotations__))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}")


def _check_shape(name: str, tensor, expected, meaning: str):
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(expected):
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must have shape {tuple(expected)} {meaning} for these images, got {got}")


def _query_mask(decoder_attention_mask, tgt):
    """`decoder_attention_mask` where it is (B, Q) or (B, Q, Q), as the queries `tgt` (B, Q, C) are; else None,
    with a warning:
    generic encoder-decoder code sends a mask over its own idea of the decoder's tokens, and transformers' Deformable
    DETR ignores every decoder_attention_mask, so one that cannot be over the queries is ignored too."""
    B, Q = tgt.shape[:2]
    if decoder_attention_mask is not None and tuple(decoder_attention_mask.shape) not in ((B, Q), (B, Q, Q)):
        logger.warning_once(
            f"decoder_attention_mask of shape {tuple(decoder_attention_mask.shape)} is ignored: it must be "
            f"(batch, queries) = {(B, Q)} or (batch, queries, queries) = {(B, Q, Q)} to mask queries"
        )
        return None
    return decoder_attention_mask


class _Levels(NamedTuple):
    """The feature levels flattened into one sequence of S = sum_l H_l * W_l positions, as the encoder reads them."""

    features: torch.Tensor  # (B, S, C), projected backbone maps
    positions: torch.Tensor  # (B, S, C), position plus level embeddings
    padding_mask: torch.Tensor  # (B, S), True on padding
    spatial_shapes: list[tuple[int, int]]  # [(H_l, W_l)]
    valid_ratios: torch.Tensor  # (B, L, 2), the (w, h) fractions of real columns and rows
    value_mask: torch.Tensor | None  # padding_mask where any pixel is padding: the attentions zero those values


def _unpack_encoder_outputs(encoder_outputs):
    """(last_hidden_state, hidden_states, attentions) of a BaseModelOutput, a tuple in that order, or a tensor; the
    missing ones are None."""
    if isinstance(encoder_outputs, torch.Tensor):
        return encoder_outputs, None, None
    if isinstance(encoder_outputs, ModelOutput):
        fields = [encoder_outputs.get(key) for key in ("last_hidden_state", "hidden_states", "attentions")]
    else:
        fields = list(encoder_outputs)[:3]
    return tuple(fields + [None] * (3 - len(fields)))


def _stored_config(source, kwargs: dict) -> dict | None:
    """The config.json of a folder or Hub id (read with from_pretrained's Hub arguments), or None when there is none
    to read: transformers' own from_pretrained then says what is missing."""
    from transformers import PretrainedConfig

    hub = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
    if source is None:  # weights given as a state_dict
        return None
    try:
        return PretrainedConfig.get_config_dict(source, **{k: kwargs[k] for k in hub if k in kwargs})[0]
    except OSError:
        return None


class DeformableDetrPreTrainedModel(PreTrainedModel):
    config_class = DeformableDetrConfig
    config: DeformableDetrConfig
    base_model_prefix = "model"
    # transformers' switch (activation_checkpointing_enable) reaches the encoder and decoder layers
    # (GradientCheckpointingLayer) and the built-in ResNet's stages (backbone.run_layer)
    supports_gradient_checkpointing = True
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True  # the decoder's self-attention (DecoderSelfAttention); the deformable ones are our kernels
    # the units that device_map="auto" keeps on one device: each reads several of its own submodules' parameters
    # outside their forward (project_values, attend, the frozen batch norms' buffers)
    _no_split_modules = ["Backbone", "DeformableEncoderLayer", "DeformableDecoderLayer"]
    # no parameter is shared: without box refinement one class head and one box head serve every layer (the same
    # modules, called again); with it every layer has its own (the box heads live in model.decoder.bbox_embed only)
    _tied_weights_keys = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers', with two differences. A folder or Hub id of transformers' own Deformable DETR
        (model_type 'deformable_detr', v4 or v5 layout, e.g. SenseTime/deformable-detr) loads too, with the same
        outputs: its config.json becomes ours (kwargs naming our config's fields, such as `num_labels`, apply to it)
        and its weights are renamed by transformers' weight-conversion mapping (transformers_mapping.py). And every
        tensor left at an unaligned address (safetensors stores them 8-byte aligned) is copied to fresh memory: CPU
        BLAS kernels round differently on unaligned weights, and a reloaded model must give bit-identical outputs."""
        stored = _stored_config(pretrained_model_name_or_path, kwargs) if kwargs.get("config") is None else None
        if stored is not None and is_transformers_config(stored):
            kwargs = from_pretrained_kwargs(stored, kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone()
        # a save writes what one of a model built here would, transformers' layer names, whatever layout was loaded:
        # transformers keeps only the conversions that matched (none for a checkpoint in our names, some for a mix)
        # and a key_mapping cannot be reversed
        model._weight_conversions = None
        for module in model.modules():
            if isinstance(module, Backbone):
                module.freeze()
        return loaded

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers skips, in custom code, modules without parameters of their own (such as the detector,
        # which initialises its heads); our inits all respect loaded weights, so no module needs skipping
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module):
        """The paper's initialisation (children are visited before their parents)."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            for buffer, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                init.constant_(getattr(module, buffer), value)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight)
        elif isinstance(module, DecoderSelfAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, ResNet):
            for conv in module.modules():
                if isinstance(conv, nn.Conv2d):
                    init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, PositionEmbeddingLearned):
            init.uniform_(module.row_embed.weight)
            init.uniform_(module.col_embed.weight)
        elif isinstance(module, MultiScaleDeformableAttention):
            init.zeros_(module.sampling_offsets.weight)
            init.copy_(module.sampling_offsets.bias, module.initial_sampling_offsets())
            init.zeros_(module.attention_weights.weight)
            init.zeros_(module.attention_weights.bias)
        elif isinstance(module, DeformableDetrModel):
            init.normal_(module.level_embed)
            if module.config.two_stage:
                init.copy_(module.enc_class_embed.bias, _class_bias(module.enc_class_embed))
                _init_box_head(module.enc_bbox_embed, 0.0)
        elif isinstance(module, DeformableDetrForObjectDetection):
            for index in range(module.config.decoder_layers):
                class_head, box_head = module.class_head(index), module.box_head(index)
                init.copy_(class_head.bias, _class_bias(class_head))
                # the paper: size logits of the first (or the shared) box head start at -2, 0 in two-stage
                first = box_head is module.box_head(0)
                _init_box_head(box_head, -2.0 if first and not module.config.two_stage else 0.0)


class DeformableDetrModel(DeformableDetrPreTrainedModel):
    """Backbone, input projections, position and level embeddings, the deformable encoder and decoder."""

    def __init__(self, config: DeformableDetrConfig):
        super().__init__(config)
        C, L = config.d_model, config.num_feature_levels
        self.backbone = Backbone(config)
        self.position_embedding = build_position_encoding(config)
        projections = [
            nn.Sequential(nn.Conv2d(c, C, kernel_size=1), nn.GroupNorm(32, C)) for c in self.backbone.channels
        ]
        in_channels = self.backbone.channels[-1]
        for _ in range(L - len(self.backbone.channels)):
            projections.append(
                nn.Sequential(nn.Conv2d(in_channels, C, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, C))
            )
            in_channels = C
        self.input_proj = nn.ModuleList(projections)
        self.level_embed = nn.Parameter(torch.empty(L, C))
        self.encoder = DeformableEncoder(config)
        self.decoder = DeformableDecoder(config)
        if config.two_stage:
            self.enc_output = nn.Linear(C, C)
            self.enc_output_norm = nn.LayerNorm(C)
            self.enc_class_embed = HeadLinear(C, config.num_labels)
            self.enc_bbox_embed = MLP(C, C, 4, 3)
            self.pos_trans = nn.Linear(2 * C, 2 * C)
            self.pos_trans_norm = nn.LayerNorm(2 * C)
        else:
            self.query_embed = nn.Embedding(config.num_queries, 2 * C)  # (query position, query content)
            self.reference_points = nn.Linear(C, 2)
        self.post_init()

    @property
    def min_image_size(self) -> int | None:
        """Side in pixels below which the coarsest level would have no pixel: a thinner canvas is padded up to it."""
        stride = self.backbone.strides[-1]
        return None if stride is None else stride * 2 ** (self.config.num_feature_levels - len(self.backbone.channels))

    def _check_inputs(self, pixel_values, pixel_mask) -> bool:
        """ValueError naming what is wrong with the inputs; else whether pixel_mask marks any padding (always True
        under torch.compile, which cannot look at values). One device sync finds both."""
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor (images rescaled and normalised, as the image "
                f"processor gives them), got {pixel_values.dtype}"
            )
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
            )
        B, channels, H, W = pixel_values.shape
        if B == 0:
            raise ValueError("pixel_values holds no image (a batch of 0)")
        if pixel_values.dtype != self.dtype and not torch.is_autocast_enabled(pixel_values.device.type):
            raise ValueError(
                f"pixel_values is {pixel_values.dtype} but the model's weights are {self.dtype}: convert one to "
                "the other, or run under torch.autocast"
            )
        if channels != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels, "
                f"the model expects {self.config.num_channels} (config.num_channels)"
            )
        if pixel_mask is not None:
            if tuple(pixel_mask.shape) != (B, H, W):
                raise ValueError(
                    f"pixel_mask must have shape {(B, H, W)} (batch, height, width), got {tuple(pixel_mask.shape)}"
                )
            if torch.compiler.is_compiling():  # a data-dependent check: eager only
                return True
            real = (pixel_mask.flatten(1) != 0).sum(1).tolist()  # each image's real pixels
            empty = [i for i, count in enumerate(real) if count == 0]
            if empty:
                raise ValueError(f"pixel_mask marks no real pixel in image(s) {empty} of the batch")
            return min(real) < H * W
        return False

    def _padded_inputs(self, pixel_values, pixel_mask):
        """The checked inputs, pixel_values (B, num_channels, H, W) and pixel_mask (B, H, W) as bool (all True when
        omitted), padded (masked) up to min_image_size where thinner; and whether any pixel is padding."""
        padded = self._check_inputs(pixel_values, pixel_mask)
        B, _, H, W = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((B, H, W), dtype=torch.bool, device=pixel_values.device)
        pixel_mask = pixel_mask.bool()
        side = self.min_image_size
        if side is not None and min(H, W) < side:
            # a canvas thinner than the coarsest stride (a thin image alone in its batch) is padded, masked, up to
            # it: the outputs are relative to the real pixels, so the padding does not show in them
            padding = (0, max(0, side - W), 0, max(0, side - H))
            pixel_values, pixel_mask = nn.functional.pad(pixel_values, padding), nn.functional.pad(pixel_mask, padding)
            padded = True
        return pixel_values, pixel_mask, padded

    def _encoder_inputs(self, pixel_values, pixel_mask, padded: bool, with_features: bool = True) -> _Levels:
        """Backbone maps, projected to C channels, flattened over the levels (see `_Levels`): pixel_values
        (B, 3, H, W), pixel_mask (B, H, W) bool, `padded` whether it marks any padding. Without `with_features`
        (the caller replaces them) the features build no graph; the position embeddings still do."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and with_features):
            features = self.backbone(pixel_values, pixel_mask)
            sources = [proj(feature) for proj, (feature, _) in zip(self.input_proj, features)]
            masks = [mask for _, mask in features]
            for level in range(len(features), self.config.num_feature_levels):
                previous = features[-1][0] if level == len(features) else sources[-1]
                sources.append(self.input_proj[level](previous))
                masks.append(downsample_mask(pixel_mask, sources[-1].shape[-2:]))
        positions = [
            self.position_embedding(mask, pixel_values.dtype).to(src.dtype) for src, mask in zip(sources, masks)
        ]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in sources], 1)
        pos_flatten = torch.cat(
            [
                pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                for level, pos in enumerate(positions)
            ],
            1,
        )
        padding_mask = ~torch.cat([mask.flatten(1) for mask in masks], 1)
        return _Levels(
            features=src_flatten,
            positions=pos_flatten,
            padding_mask=padding_mask,
            spatial_shapes=[tuple(src.shape[-2:]) for src in sources],  # (H_l, W_l), plain ints
            valid_ratios=torch.stack([valid_ratio(mask).to(src_flatten.dtype) for mask in masks], 1),
            value_mask=padding_mask if padded else None,
        )

    def _encode(self, levels: _Levels, encoder_outputs, inputs_embeds, output_attentions: bool):
        """The encoder's output (B, S, C), hidden states (its input, then every layer's output) and attentions over
        the levels' features, or over `inputs_embeds` (B, S, C) in their place; `encoder_outputs` unpacked instead,
        when given."""
        if encoder_outputs is not None:
            memory, encoder_states, encoder_attentions = _unpack_encoder_outputs(encoder_outputs)
            _check_shape("encoder_outputs", memory, levels.features.shape, "(batch, encoder positions, d_model)")
            return memory, encoder_states, encoder_attentions
        features = levels.features
        if inputs_embeds is not None:
            _check_shape("inputs_embeds", inputs_embeds, features.shape, "(batch, encoder positions, d_model)")
            features = inputs_embeds
        memory, encoder_states, encoder_attentions = self.encoder(
            features, levels.positions, levels.spatial_shapes, levels.valid_ratios, levels.value_mask, output_attentions
        )
        return memory, (features, *encoder_states), encoder_attentions

    def _queries(self, memory, padding_mask, spatial_shapes, query_embeds=None, num_proposals=None):
        """The decoder's queries: position and content (B, Q, C), reference points (B, Q, 2) (points) or, in
        two-stage, (B, Q, 4) (the boxes of the Q = `num_proposals` top-scoring proposals, by default
        config.two_stage_num_proposals), and the two-stage proposal logits (B, S, N) and boxes (B, S, 4) before
        the sigmoid (else None). `query_embeds` (Q', 2C), when given, replaces the learned query embeddings
        (position, content), Q' of them."""
        B, C = memory.shape[0], self.config.d_model
        if query_embeds is not None and self.config.two_stage:
            raise ValueError("query_embeds replaces the learned queries, which two-stage has not: give it without")
        if num_proposals is not None and not self.config.two_stage:
            raise ValueError(
                f"num_proposals={num_proposals} selects two-stage proposals, which this model (config.two_stage "
                "false) has not: give query_embeds for more queries"
            )
        if not self.config.two_stage:
            weight = self.query_embed.weight if query_embeds is None else query_embeds
            if weight.ndim != 2 or weight.shape[1] != 2 * C:
                raise ValueError(f"query_embeds must be (queries, 2 * d_model = {2 * C}), got {tuple(weight.shape)}")
            query_pos, tgt = weight[None].expand(B, -1, -1).split(C, dim=2)
            return query_pos, tgt, self.reference_points(query_pos).sigmoid(), None, None
        proposals, object_query = encoder_proposals(memory, padding_mask, spatial_shapes)
        object_query = self.enc_output_norm(self.enc_output(object_query))
        enc_outputs_class = self.enc_class_embed(object_query)
        enc_outputs_coord_logits = self.enc_bbox_embed(object_query) + proposals
        k = self.config.two_stage_num_proposals if num_proposals is None else num_proposals
        name = "two_stage_num_proposals" if num_proposals is None else "num_proposals"
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_proposals must be a positive int, got {k!r}")
        if k > memory.shape[1]:
            raise ValueError(
                f"{name}={k} exceeds the {memory.shape[1]} encoder positions of the images; "
                "give larger images or fewer proposals"
            )
        # sorted, best first: the first Q of more proposals are the Q that Q alone would select
        topk = torch.topk(enc_outputs_class[..., 0], k, dim=1)[1]
        topk_coords = torch.gather(enc_outputs_coord_logits, 1, topk[..., None].expand(-1, -1, 4)).detach()
        embedded = self.pos_trans_norm(self.pos_trans(proposal_position_embedding(topk_coords, C)))
        query_pos, tgt = embedded.split(C, dim=2)
        return query_pos, tgt, topk_coords.sigmoid(), enc_outputs_class, enc_outputs_coord_logits

    def _decode(
        self,
        memory,
        levels: _Levels,
        decoder_inputs_embeds,
        decoder_attention_mask,
        output_attentions,
        output_hidden_states,
        query_embeds=None,
        num_proposals=None,
    ) -> dict:
        """The decoder's fields of DeformableDetrModelOutput, from the encoder's output `memory` (B, S, C): its
        queries (`_queries`; `decoder_inputs_embeds` (B, Q, C) in place of their content, when given), every
        layer's hidden states (B, decoder_layers, Q, C) and reference points, and (with the flags) its attentions."""
        query_pos, tgt, reference_points, enc_outputs_class, enc_outputs_coord_logits = self._queries(
            memory, levels.padding_mask, levels.spatial_shapes, query_embeds, num_proposals
        )
        if decoder_inputs_embeds is not None:
            _check_shape("decoder_inputs_embeds", decoder_inputs_embeds, tgt.shape, "(batch, queries, d_model)")
            tgt = decoder_inputs_embeds
        hidden_states, references, decoder_attentions, cross_attentions = self.decoder(
            tgt,
            query_pos,
            reference_points,
            memory,
            levels.spatial_shapes,
            levels.valid_ratios,
            levels.value_mask,
            _query_mask(decoder_attention_mask, tgt),
            output_attentions,
        )
        return dict(
            last_hidden_state=hidden_states[:, -1],
            intermediate_hidden_states=hidden_states,
            intermediate_reference_points=references,
            init_reference_points=reference_points,
            enc_outputs_class=enc_outputs_class,
            enc_outputs_coord_logits=enc_outputs_coord_logits,
            decoder_hidden_states=(tgt, *hidden_states.unbind(1)) if output_hidden_states else None,
            decoder_attentions=decoder_attentions if output_attentions else None,
            cross_attentions=cross_attentions if output_attentions else None,
        )

    def forward(
        self,
        pixel_values,
        pixel_mask=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        query_embeds=None,
        num_proposals=None,
        **kwargs,
    ):
        """
        Args:
            pixel_values: (B, num_channels, H, W), normalised images padded bottom-right to a common size.
            pixel_mask: (B, H, W), 1 on real pixels and 0 on padding; all ones when omitted.
            decoder_attention_mask: (B, Q), 1 (True) on the queries the decoder's self-attention may attend to,
                0 on those it must not, or (B, Q, Q), 1 where query i may attend to query j (a block mask keeps
                groups of queries apart); all of them when omitted.
            encoder_outputs: the encoder's output for these images, reused instead of running the encoder: a
                BaseModelOutput (last_hidden_state (B, S, C), hidden_states, attentions), a tuple in that order, or
                the (B, S, C) tensor alone. The backbone still runs, for the levels' shapes and masks.
            inputs_embeds: (B, S, C), the flattened multi-level features (backbone and input projections) to
                encode instead of those of pixel_values; pixel_values and pixel_mask still give the levels' shapes,
                masks and position embeddings.
            decoder_inputs_embeds: (B, Q, C), the decoder's input queries (their content) instead of the learned
                ones (or, in two-stage, those from the proposals); their positions and reference points stay.
            output_attentions, output_hidden_states, return_dict: None takes the config's.
            query_embeds: (Q, 2 * C), the decoder's query embeddings (position, content) instead of the learned
                `query_embed.weight`, any number Q of them (training with extra queries: hybrid matching, Group
                DETR); not in two-stage, whose queries come from the proposals.
            num_proposals: in two-stage, how many top-scoring proposals become the decoder's queries, instead of
                config.two_stage_num_proposals (training with extra queries: the first of them are the ones the
                model selects by itself).
            kwargs: transformers' common keyword arguments (such as num_items_in_batch, which the Trainer passes),
                accepted and unused; any other is a TypeError.
        """
        _check_kwargs(kwargs)
        if encoder_outputs is not None and inputs_embeds is not None:
            raise ValueError(
                "give encoder_outputs or inputs_embeds, not both: the encoder's input is unused with its output"
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        with_features = inputs_embeds is None and encoder_outputs is None  # the features are encoded
        levels = self._encoder_inputs(*self._padded_inputs(pixel_values, pixel_mask), with_features=with_features)
        memory, encoder_states, encoder_attentions = self._encode(levels, encoder_outputs, inputs_embeds, attentions)
        output = DeformableDetrModelOutput(
            encoder_last_hidden_state=memory,
            encoder_hidden_states=encoder_states if hidden else None,
            encoder_attentions=encoder_attentions if attentions else None,
            **self._decode(
                memory,
                levels,
                decoder_inputs_embeds,
                decoder_attention_mask,
                attentions,
                hidden,
                query_embeds,
                num_proposals,
            ),
        )
        return output if return_dict else output.to_tuple()


class DeformableDetrForObjectDetection(DeformableDetrPreTrainedModel):
    """Deformable DETR with a class head (sigmoid logits) and a box head on every decoder layer.

    Without box refinement all layers share one class head and one box head; with it, every layer has its
    own, and the box heads are the decoder's (`model.decoder.bbox_embed`), which refine the reference boxes.
    """

    def __init__(self, config: DeformableDetrConfig):
        super().__init__(config)
        self.model = DeformableDetrModel(config)
        C = config.d_model
        if config.with_box_refine:
            self.class_embed = nn.ModuleList(HeadLinear(C, config.num_labels) for _ in range(config.decoder_layers))
        else:
            self.class_embed = HeadLinear(C, config.num_labels)
            self.bbox_embed = MLP(C, C, 4, 3)
        self.post_init()

    def set_labels(self, class_names: list[str]):
        """A new label set: `config.id2label`/`label2id` follow `class_names`, and every class head (also the
        two-stage encoder's) is replaced by a freshly initialised one with `len(class_names)` outputs.
        Nothing changes when the names are already the model's. ValueError for an empty list, a string, a name
        that is no string, or a name given twice."""
        if isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names):
            raise ValueError(f"class_names must be a list of strings, got {class_names!r}")
        if not class_names:
            raise ValueError("class_names is empty: a detector needs at least one class")
        twice = sorted({name for name in class_names if list(class_names).count(name) > 1})
        if twice:
            raise ValueError(f"class_names has {', '.join(map(repr, twice))} more than once")
        if [self.config.id2label[i] for i in range(self.config.num_labels)] == list(class_names):
            return
        self.config.id2label = dict(enumerate(class_names))
        self.config.label2id = {name: i for i, name in self.config.id2label.items()}
        old = self.class_head(0).weight

        def new_head() -> HeadLinear:  # on the old heads' device, in their type
            head = HeadLinear(self.config.d_model, len(class_names), device=old.device, dtype=old.dtype)
            self._init_weights(head)
            init.copy_(head.bias, _class_bias(head))
            return head

        if self.config.with_box_refine:
            self.class_embed = nn.ModuleList(new_head() for _ in range(self.config.decoder_layers))
        else:
            self.class_embed = new_head()
        if self.config.two_stage:
            self.model.enc_class_embed = new_head()

    def class_head(self, layer: int) -> HeadLinear:
        return self.class_embed[layer] if self.config.with_box_refine else self.class_embed

    def box_head(self, layer: int) -> MLP:
        return self.model.decoder.bbox_embed[layer] if self.config.with_box_refine else self.bbox_embed

    def layer_predictions(self, outputs: DeformableDetrModelOutput):
        """Every decoder layer's class logits (B, Q, N) and boxes (B, Q, 4), from its hidden states and the reference
        it received: (B, Q, 2) points for the first, then the boxes the layer before gave."""
        hidden_states = outputs.intermediate_hidden_states
        references = [outputs.init_reference_points] + list(outputs.intermediate_reference_points[:, :-1].unbind(1))
        logits, boxes = [], []
        for layer in range(hidden_states.shape[1]):
            logits.append(self.class_head(layer)(hidden_states[:, layer]))
            boxes.append(refine_boxes(references[layer], self.box_head(layer)(hidden_states[:, layer])))
        return logits, boxes

    def forward(
        self,
        pixel_values,
        pixel_mask=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        query_embeds=None,
        num_proposals=None,
        output_auxiliary=False,
        **kwargs,
    ):
        """
        Args:
            pixel_values: (B, num_channels, H, W), normalised images padded bottom-right to a common size.
            pixel_mask: (B, H, W), 1 on real pixels and 0 on padding; all ones when omitted.
            output_auxiliary: the earlier layers' predictions in auxiliary_outputs (with config.auxiliary_loss)
                without labels too, for a loss computed outside (training with extra queries).
            labels: for the loss, per image {"class_labels": (T,) int64, "boxes": (T, 4) cx, cy, w, h in [0, 1]}.
            decoder_attention_mask, encoder_outputs, inputs_embeds, decoder_inputs_embeds, output_attentions,
            output_hidden_states, query_embeds, num_proposals, kwargs: as in `DeformableDetrModel.forward`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            pixel_values,
            pixel_mask,
            decoder_attention_mask,
            encoder_outputs,
            inputs_embeds,
            decoder_inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            query_embeds=query_embeds,
            num_proposals=num_proposals,
            **kwargs,
        )
        logits, boxes = self.layer_predictions(outputs)
        auxiliary = None
        if (labels is not None or output_auxiliary) and self.config.auxiliary_loss:
            auxiliary = [{"logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
        loss = loss_dict = None
        if labels is not None:
            enc_boxes = None if outputs.enc_outputs_coord_logits is None else outputs.enc_outputs_coord_logits.sigmoid()
            loss, loss_dict = DeformableDetrLoss(self.config)(
                logits[-1], boxes[-1], labels, auxiliary or (), outputs.enc_outputs_class, enc_boxes
            )
        output = DeformableDetrObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits[-1],
            pred_boxes=boxes[-1],
            auxiliary_outputs=auxiliary,
            **outputs,
        )
        return output if return_dict else output.to_tuple()
