"""Position encodings of the feature maps: (B, H, W) mask of real pixels -> (B, 2F, H, W), y half first; and the
sine features they are made of (`sine_features`), which also embed the two-stage proposals."""

import math

import torch
from torch import nn


def sine_features(angles: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """The Transformer's sine encoding: angles (...) -> (..., F), interleaved sin(a / T^(2i/F)), cos(a / T^(2i/F)),
    in the angles' type."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.int64, device=angles.device).to(angles.dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    features = angles[..., None] / dim_t
    return torch.stack((features[..., 0::2].sin(), features[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """The Transformer's sine encoding on 2D normalised coordinates (cumulative sums over real pixels).

    pos(y, 2i) = sin(y / T^(2i/F)), pos(y, 2i+1) = cos(y / T^(2i/F)), likewise for x; y, x in (0, 2*pi].
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats, self.temperature, self.scale = num_pos_feats, temperature, scale

    def forward(self, mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        eps = 1e-6
        mask = mask.to(dtype)
        y_embed, x_embed = mask.cumsum(1), mask.cumsum(2)
        # the sums are the cumulative sums' last entries (sums of 0s and 1s: exact), without slicing a symbolic size
        y_embed = (y_embed - 0.5) / (mask.sum(1, keepdim=True) + eps) * self.scale
        x_embed = (x_embed - 0.5) / (mask.sum(2, keepdim=True) + eps) * self.scale
        pos_y, pos_x = (sine_features(embed, self.num_pos_feats, self.temperature) for embed in (y_embed, x_embed))
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned row and column embeddings (maps up to 50 x 50), x half first as in DETR."""

    max_size = 50

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.row_embed = nn.Embedding(self.max_size, num_pos_feats)
        self.col_embed = nn.Embedding(self.max_size, num_pos_feats)

    def forward(self, mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        batch, height, width = mask.shape
        if height > self.max_size or width > self.max_size:
            raise ValueError(
                f"learned position embeddings cover feature maps up to {self.max_size}x{self.max_size}, got "
                f"{height}x{width}; use smaller images or position_embedding_type='sine'"
            )
        x_emb = self.col_embed(torch.arange(width, device=mask.device))
        y_emb = self.row_embed(torch.arange(height, device=mask.device))
        pos = torch.cat([x_emb[None].expand(height, -1, -1), y_emb[:, None].expand(-1, width, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1).to(dtype)


def build_position_encoding(config) -> nn.Module:
    if config.position_embedding_type == "sine":
        return PositionEmbeddingSine(config.d_model // 2)
    return PositionEmbeddingLearned(config.d_model // 2)
