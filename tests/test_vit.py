"""ViT image encoder (models/vit.py): shapes, the original's key layout, an independent reference forward, and
position-embedding interpolation. Tiny sizes, CPU, fp32."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.vit import VisionConfig, create_vit, interpolate_pos_embed

ATOL = 1e-5
TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Larger-than-default random values everywhere (LayerNorm scales around 1): every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)


def tiny_vit(image_res=32, seed=0, **kw):
    vit = create_vit(VisionConfig(**{**TINY, **kw}), image_res)
    randomize(vit, seed)
    return vit.eval()


def images(batch=2, res=32, seed=1):
    return torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(seed))


def reference_forward(sd: dict, x: torch.Tensor, patch: int, heads: int, depth: int, eps: float = 1e-6):
    """The original ALBEF/DeiT ViT forward, written out: patchify conv -> [CLS] -> + pos_embed -> pre-norm blocks
    (x + attn(LN1(x)); x + mlp(LN2(x))) with a fused qkv projection and exact GELU -> final LN."""
    B = x.shape[0]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)  # [B, D, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, N, D], row-major patches
    D = x.shape[-1]
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1)
    x = x + sd["pos_embed"][:, : x.shape[1]]
    hd = D // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        qkv = qkv.reshape(B, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) / math.sqrt(hd)).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(B, -1, D)
        x = x + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps)


def test_output_shape_and_cls_token():
    vit = tiny_vit(32)
    out = vit(images(2, 32))
    assert out.shape == (2, 1 + 16, 32)
    vit48 = tiny_vit(48, depth=1, embed_dim=64, num_heads=2)
    assert vit48(images(3, 48)).shape == (3, 1 + 36, 64)
    assert vit48.patch_embed.num_patches == 36


def test_rejects_resolution_not_multiple_of_patch():
    with pytest.raises(ValueError, match="patch_size"):
        create_vit(VisionConfig(**TINY), 30)
    with pytest.raises(ValueError, match="multiple"):
        VisionConfig(embed_dim=30, num_heads=4)


def test_key_names_match_original_layout():
    vit = create_vit(VisionConfig(**TINY), 32)
    sd = vit.state_dict()
    expected = {"cls_token": (1, 1, 32), "pos_embed": (1, 17, 32), "patch_embed.proj.weight": (32, 3, 8, 8),
                "patch_embed.proj.bias": (32,), "norm.weight": (32,), "norm.bias": (32,)}
    for i in range(2):
        p = f"blocks.{i}."
        expected.update({
            p + "norm1.weight": (32,), p + "norm1.bias": (32,),
            p + "attn.qkv.weight": (96, 32), p + "attn.qkv.bias": (96,),
            p + "attn.proj.weight": (32, 32), p + "attn.proj.bias": (32,),
            p + "norm2.weight": (32,), p + "norm2.bias": (32,),
            p + "mlp.fc1.weight": (128, 32), p + "mlp.fc1.bias": (128,),
            p + "mlp.fc2.weight": (32, 128), p + "mlp.fc2.bias": (32,),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected  # exactly these keys: no head, no fc_norm
    assert not any(k.startswith(("head", "fc_norm", "dist_token")) for k in sd)


def test_layernorm_eps_is_1e6():
    vit = create_vit(VisionConfig(**TINY), 32)
    norms = [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1  # norm1, norm2 per block + final norm
    assert all(m.eps == 1e-6 for m in norms)


def test_matches_independent_reference_forward():
    vit = tiny_vit(32, seed=3)
    x = images(2, 32, seed=4)
    with torch.no_grad():
        out = vit(x)
        ref = reference_forward(vit.state_dict(), x, patch=8, heads=4, depth=2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    # the comparison is discriminative: a forward without the final LN is far away
    with torch.no_grad():
        sd = dict(vit.state_dict())
        sd_no_final = {**sd, "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)}
        other = reference_forward(sd_no_final, x, patch=8, heads=4, depth=2)
    assert (other - out).abs().max() > 1e-2


def test_matches_reference_at_other_size():
    vit = tiny_vit(48, seed=5, depth=3, embed_dim=48, num_heads=3, mlp_ratio=2.0, patch_size=16)
    x = images(1, 48, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), reference_forward(vit.state_dict(), x, patch=16, heads=3, depth=3),
                                   atol=ATOL, rtol=1e-5)


def test_grad_checkpointing_same_output():
    a = tiny_vit(32, seed=7)
    b = tiny_vit(32, seed=7, grad_checkpointing=True)
    a.train()
    b.train()
    x = images(2, 32)
    oa, ob = a(x), b(x)
    torch.testing.assert_close(oa, ob, atol=ATOL, rtol=1e-5)
    oa.sum().backward()
    ob.sum().backward()
    torch.testing.assert_close(a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad,
                               atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# interpolate_pos_embed
# --------------------------------------------------------------------------------------------------------------

def _pos(n_grid: int, dim: int = 8, seed: int = 0):
    return torch.randn(1, 1 + n_grid * n_grid, dim, generator=torch.Generator().manual_seed(seed))


def test_interpolate_identity_when_sizes_match():
    pos = _pos(4)
    out = interpolate_pos_embed(pos, 16)
    assert torch.equal(out, pos)


def _bicubic_reference(pos, old, new, antialias=False):
    dim = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, dim)], dim=1)


def test_interpolate_upsample_2x2_to_4x4_is_bicubic_align_corners_false():
    pos = _pos(2, seed=1)
    out = interpolate_pos_embed(pos, 16)
    assert out.shape == (1, 17, 8)
    assert torch.equal(out[:, 0], pos[:, 0])  # cls token kept as is
    torch.testing.assert_close(out, _bicubic_reference(pos, 2, 4), atol=1e-6, rtol=1e-6)
    # not align_corners=True, not bilinear
    alt = F.interpolate(pos[:, 1:].reshape(1, 2, 2, 8).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                        align_corners=True).permute(0, 2, 3, 1).reshape(1, 16, 8)
    assert (alt - out[:, 1:]).abs().max() > 1e-3


def test_interpolate_downsample_has_no_antialias():
    pos = _pos(6, seed=2)
    out = interpolate_pos_embed(pos, 9)
    torch.testing.assert_close(out, _bicubic_reference(pos, 6, 3, antialias=False), atol=1e-6, rtol=1e-6)
    assert (out - _bicubic_reference(pos, 6, 3, antialias=True)).abs().max() > 1e-3


def test_interpolate_grid_orientation_row_major():
    """A position embedding that encodes (row, col) linearly is resized to one that still does (bicubic keeps
    linear functions away from borders): rows stay rows, columns stay columns."""
    old, new = 4, 8
    r, c = torch.meshgrid(torch.arange(old, dtype=torch.float), torch.arange(old, dtype=torch.float), indexing="ij")
    grid = torch.stack([r, c * 10], dim=-1).reshape(1, old * old, 2)
    pos = torch.cat([torch.full((1, 1, 2), -7.0), grid], dim=1)
    out = interpolate_pos_embed(pos, new * new)[0, 1:].reshape(new, new, 2)
    # channel 0 (row) is constant along a row, channel 1 (col) constant along a column
    torch.testing.assert_close(out[..., 0], out[..., 0][:, :1].expand(new, new))
    torch.testing.assert_close(out[..., 1], out[..., 1][:1, :].expand(new, new))
    assert out[-1, 0, 0] > out[0, 0, 0] and out[0, -1, 1] > out[0, 0, 1]


def test_interpolate_keeps_dtype_and_multiple_extra_tokens():
    pos = _pos(2, seed=3).half()
    out = interpolate_pos_embed(pos, 9)
    assert out.dtype == torch.float16 and out.shape == (1, 10, 8)
    pos2 = torch.randn(1, 2 + 4, 8)
    out2 = interpolate_pos_embed(pos2, 9, num_extra_tokens=2)
    assert out2.shape == (1, 11, 8)
    assert torch.equal(out2[:, :2], pos2[:, :2])


def test_interpolate_rejects_non_square_grids():
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 6, 8), 16)  # 6 patches: not square
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 4, 8), 12)  # target not square


# --------------------------------------------------------------------------------------------------------------
# deepcopy (momentum encoders are deep copies)
# --------------------------------------------------------------------------------------------------------------

def test_deepcopy_is_independent():
    vit = tiny_vit(32, seed=9)
    x = images(2, 32, seed=10)
    with torch.no_grad():
        before = vit(x)
        twin = copy.deepcopy(vit)
        torch.testing.assert_close(twin(x), before, atol=0, rtol=0)
        for (n, p), (n2, p2) in zip(vit.named_parameters(), twin.named_parameters()):
            assert n == n2 and p.data_ptr() != p2.data_ptr()
        # (a constant shift of every channel would be removed by the pre-norms / final LN: use random ones)
        g = torch.Generator().manual_seed(11)
        twin.pos_embed.add_(torch.randn(twin.pos_embed.shape, generator=g))
        twin.blocks[1].mlp.fc2.bias.add_(torch.randn(twin.blocks[1].mlp.fc2.bias.shape, generator=g))
        after_orig, after_twin = vit(x), twin(x)
    torch.testing.assert_close(after_orig, before, atol=0, rtol=0)
    assert (after_twin - before).abs().max() > 1e-2
    # and the other way round
    with torch.no_grad():
        vit.norm.bias.add_(torch.randn(vit.norm.bias.shape, generator=g))
        torch.testing.assert_close(twin(x), after_twin, atol=0, rtol=0)
