"""The DiNa-LRM reward head: FiLM adapters per tap, gated query cross-attention, FFN, linear score.

Parameter names match the released SD3.5-M ``rm_head.pt`` exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dina_lrm.config import RewardHeadConfig


class FiLMAdapter(nn.Module):
    """``x * (1 + gamma(temb)) + beta(temb) + layer_embed``, then a linear map to ``out_dim``."""

    def __init__(self, in_dim: int, temb_dim: int, width: int, out_dim: int, use_proj_in: bool):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, width) if (use_proj_in or in_dim != width) else nn.Identity()
        self.layer_embed = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.cond_mlp = nn.Sequential(nn.Linear(temb_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.proj = nn.Linear(width, out_dim)
        nn.init.zeros_(self.cond_mlp[-1].weight)  # starts as no modulation
        nn.init.zeros_(self.cond_mlp[-1].bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.cond_mlp(temb).unsqueeze(1).chunk(2, dim=-1)
        x = self.proj_in(x) * (1 + gamma) + beta + self.layer_embed
        return self.proj(x)


def _token_gate(dim: int) -> nn.Sequential:
    gate = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
    nn.init.zeros_(gate[-1].weight)
    nn.init.zeros_(gate[-1].bias)
    return gate


class QueryCrossAttention(nn.Module):
    """Queries attend to visual tokens and, separately, to text tokens; the two results are summed.

    RMSNorm on the queries and each context. With ``gated``, each context token's value is scaled
    by ``sigmoid(MLP(token))``. Residual around the whole block.
    """

    def __init__(self, dim: int, num_heads: int, use_text: bool, gated: bool, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"reward head width {dim} is not divisible by num_attn_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.RMSNorm(dim)
        self.norm_v = nn.RMSNorm(dim)
        self.norm_t = nn.RMSNorm(dim) if use_text else None
        self.to_q = nn.Linear(dim, dim)
        self.to_k_vis = nn.Linear(dim, dim)
        self.to_v_vis = nn.Linear(dim, dim)
        self.to_k_text = nn.Linear(dim, dim) if use_text else None
        self.to_v_text = nn.Linear(dim, dim) if use_text else None
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.gate_vis = _token_gate(dim) if gated else None
        self.gate_text = _token_gate(dim) if (gated and use_text) else None

    def _attend(self, q, context, to_k, to_v, gate, mask=None) -> torch.Tensor:
        value = to_v(context)
        if gate is not None:
            value = value * torch.sigmoid(gate(context))
        heads = [t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, to_k(context), value)]
        mask = None if mask is None else mask[:, None, None, :]
        return F.scaled_dot_product_attention(*heads, attn_mask=mask).transpose(1, 2).flatten(2)

    def forward(self, queries: torch.Tensor, visual: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``text_mask`` (B, N_text) bool: False marks padding that only fills out a batch."""
        q = self.to_q(self.norm_q(queries))
        out = self._attend(q, self.norm_v(visual), self.to_k_vis, self.to_v_vis, self.gate_vis)
        if text is not None and self.to_k_text is not None:
            out = out + self._attend(q, self.norm_t(text), self.to_k_text, self.to_v_text, self.gate_text, text_mask)
        return queries + self.to_out(out)


class RewardHead(nn.Module):
    def __init__(self, config: RewardHeadConfig, token_dim: int, num_visual_taps: int, num_text_taps: int,
                 temb_dim: int | None = None):
        """``temb_dim``: width of the backbone's time embedding (``token_dim`` unless given; Z-Image: 256)."""
        super().__init__()
        temb_dim = token_dim if temb_dim is None else temb_dim
        width = token_dim if config.width == -1 else config.width
        if width % 4:
            raise ValueError(f"reward head width must be divisible by 4, got {width}")
        adapter_dim = width // 4

        def adapters(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                FiLMAdapter(token_dim, temb_dim, width, adapter_dim, config.use_proj_in) for _ in range(n)
            )

        self.layer_adapters_visual = adapters(num_visual_taps)
        self.layer_adapters_text = adapters(num_text_taps)
        self.agg_visual = nn.Linear(num_visual_taps * adapter_dim, width)
        self.agg_text = nn.Linear(num_text_taps * adapter_dim, width) if num_text_taps else None
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_queries, width) * 0.02)
        heads, dropout = config.num_attn_heads, config.dropout
        self.attn1 = QueryCrossAttention(width, heads, use_text=num_text_taps > 0, gated=True, dropout=dropout)
        self.attn2 = QueryCrossAttention(width, heads, use_text=False, gated=False, dropout=dropout)
        self.norm_ff = nn.RMSNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout))
        self.head = nn.Linear(width, config.out_dim)

    def tokens(
        self, visual: list[torch.Tensor], text: list[torch.Tensor], temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adapter tokens of one noise level: (B, N_image, width) and (B, N_text, width) or None."""
        if len(visual) != len(self.layer_adapters_visual) or len(text) != len(self.layer_adapters_text):
            raise ValueError(
                f"the head has {len(self.layer_adapters_visual)} visual / {len(self.layer_adapters_text)} text adapters, "
                f"but got {len(visual)} visual / {len(text)} text feature maps"
            )
        vis = self.agg_visual(torch.cat([a(x, temb) for a, x in zip(self.layer_adapters_visual, visual)], dim=-1))
        if self.agg_text is None:
            return vis, None
        txt = self.agg_text(torch.cat([a(x, temb) for a, x in zip(self.layer_adapters_text, text)], dim=-1))
        return vis, txt

    def score_tokens(self, visual: torch.Tensor, text: torch.Tensor | None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        queries = self.query_tokens.expand(visual.shape[0], -1, -1)
        queries = self.attn1(queries, visual, text, text_mask)
        queries = self.attn2(queries, visual)
        queries = queries + self.ff(self.norm_ff(queries))
        return self.head(queries).mean(dim=1)

    def forward(self, visual: list[torch.Tensor], text: list[torch.Tensor], temb: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.score_tokens(*self.tokens(visual, text, temb), text_mask)

    def forward_ensemble(self, levels: list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]],
                         text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Multi-noise-level ensemble: each level's tokens (built with its own temb) are concatenated
        along the sequence, and the queries read them all in one pass. ``text_mask`` is the (B, N_text)
        mask of one level (every level reads the same prompts)."""
        return self.score_levels([self.tokens(visual, text, temb) for visual, text, temb in levels], text_mask)

    def score_levels(self, per_level: list[tuple[torch.Tensor, torch.Tensor | None]], text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The ensemble score from each level's adapter tokens (:meth:`tokens`)."""
        visual = torch.cat([v for v, _ in per_level], dim=1)
        text = None if per_level[0][1] is None else torch.cat([t for _, t in per_level], dim=1)
        text_mask = None if text_mask is None else text_mask.repeat(1, len(per_level))
        return self.score_tokens(visual, text, text_mask)
