"""Rotary position embedding with 2D positions (HunyuanImage-3.0's build_2d_rope).

Each token has a position pair (y, x); text tokens have y = x = index, which is plain 1D RoPE.
Frequency k uses y when k is even and x when k is odd; the angles are laid out twice over the
head dim for the NeoX rotate-half convention. Tables are fp32.
"""

import torch


def rope_2d(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [..., 2] (y, x) -> cos, sin [..., head_dim] in fp32."""
    # 1 / theta^(2k/d), written as the reference writes it: theta^(-2k/d) rounds differently.
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    axis = positions[..., torch.arange(head_dim // 2, device=positions.device) % 2].float()  # y, x, y, x, ...
    angles = axis * freqs
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos, sin [B or 1, S, D] (fp32). Computed in fp32, returned in x's dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
