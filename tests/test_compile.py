"""compile: true is regional compilation (each transformer block) and equals eager; bf16 autocast on the CPU runs and
stays close to fp32 with ITC in fp32."""
import copy

import pytest
import torch

from engine.trainer import autocast_context, compile_regions
from models.albef import ALBEF, ALBEFConfig
from models.bert import BertConfig
from models.vit import VisionConfig


def _model():
    torch.manual_seed(0)
    cfg = ALBEFConfig(image_res=32, vision_width=64, embed_dim=32, queue_size=32, momentum=0.9,
                      vit=VisionConfig(patch_size=8, embed_dim=64, depth=2, num_heads=4),
                      bert=BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=128, fusion_layer=2, encoder_width=64,
                                      max_position_embeddings=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0),
                      pad_token_id=0, cls_token_id=2, mask_token_id=4)
    return ALBEF(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (4, 10), generator=g)
    ids[:, 0] = 2
    return torch.randn(4, 3, 32, 32, generator=g), ids, torch.ones_like(ids)


def _losses_and_grads(model, precision="fp32"):
    image, ids, mask = _inputs()
    with autocast_context(precision, torch.device("cpu")):
        out = model(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(3))
    sum(out.values()).backward()
    return {k: v.detach().float() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()
                                                              if p.grad is not None}


@pytest.mark.slow
def test_regional_compile_equals_eager():
    eager = _model()
    compiled = copy.deepcopy(eager)
    n = compile_regions(compiled)
    assert n == 2 * (2 + 4)  # ViT blocks and BERT layers, online and momentum
    assert torch._dynamo.config.recompile_limit >= 64  # one budget for every BertLayer variant: not the default 8
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoint keys unchanged
    le, ge = _losses_and_grads(eager)
    lc, gc = _losses_and_grads(compiled)
    for k in le:
        torch.testing.assert_close(lc[k], le[k], rtol=1e-4, atol=1e-5)
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-3, atol=1e-5)


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    l32, _ = _losses_and_grads(_model())
    l16, g16 = _losses_and_grads(_model(), "bf16")
    for k in l32:
        assert torch.isfinite(l16[k]) and abs(l16[k] - l32[k]) < 0.05 * abs(l32[k]) + 0.02, (k, l16[k], l32[k])
    assert all(torch.isfinite(g).all() for g in g16.values())
