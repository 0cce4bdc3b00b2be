"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): ITM with ``itm_negatives: global``.

Every rank holds the same tiny ALBEF (no dropout) and its half of one fixed batch of 2 x B samples; rank 1's texts
are shorter (its trailing padding columns cut), so the padding to a common length is exercised. Each rank computes
its ITM loss with negatives drawn among both ranks' samples and back-propagates; gradients are then averaged over
the ranks (what DDP does). Rank 0 recomputes everything in one process from the whole batch (negatives drawn with
the same generators, gathered tensors replaced by slices of the whole batch) and checks the losses and the
averaged gradients. Also checks that some negatives come from the other rank. Prints "OK rank=R".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.albef import ALBEF, ALBEFConfig  # noqa: E402
from models.bert import BertConfig  # noqa: E402
from models.losses import sample_hard_negatives  # noqa: E402
from models.vit import VisionConfig  # noqa: E402
from utils import distributed as du  # noqa: E402

B, L, L1 = 4, 10, 7  # per-rank batch, text length of rank 0 (and of the whole batch), of rank 1


def make_model() -> ALBEF:
    torch.manual_seed(0)
    cfg = ALBEFConfig(image_res=16, vision_width=32, embed_dim=8, queue_size=8, momentum=0.9, itm_negatives="global",
                      vit=VisionConfig(patch_size=8, embed_dim=32, depth=1, num_heads=2),
                      bert=BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, fusion_layer=1, encoder_width=32,
                                      max_position_embeddings=16, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0),
                      pad_token_id=0, cls_token_id=2, mask_token_id=4)
    return ALBEF(cfg).train()


def make_batch():
    g = torch.Generator().manual_seed(7)
    image = torch.randn(2 * B, 3, 16, 16, generator=g)
    ids = torch.randint(5, 50, (2 * B, L), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[B:, L1:] = 0  # rank 1's texts end before column L1
    mask[B + 1, L1 - 2:] = 0
    mask[1, L - 3:] = 0
    ids[mask == 0] = 0
    return image, ids, mask


def itm_inputs(model, image, ids, mask):
    img = model.encode_image(image)
    txt = model.encode_text(ids, mask)
    return img, txt, (img.feat.detach() * 0.9, txt.feat.detach() * 0.9)  # stand-ins for the momentum features


def main():
    info = du.init_distributed("cpu")
    assert info.distributed and info.world_size == 2, info
    rank = info.rank
    model = make_model()
    image, ids, mask = make_batch()
    rows = slice(rank * B, (rank + 1) * B)
    length = L if rank == 0 else L1
    img, txt, feat_m = itm_inputs(model, image[rows], ids[rows, :length], mask[rows, :length])
    drawn = []
    orig = sample_hard_negatives

    def spy(*a, **k):
        out = orig(*a, **k)
        drawn.append(out)
        return out

    import models.albef as albef_module
    albef_module.sample_hard_negatives = spy
    gen = torch.Generator().manual_seed(100 + rank)
    loss = model._itm_loss(txt, img, mask[rows, :length], None, None, None, gen, feat_m=feat_m)
    albef_module.sample_hard_negatives = orig
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
        g /= 2
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    draws = [torch.zeros(2, B, dtype=torch.long) for _ in range(2)]
    dist.all_gather(draws, torch.stack(drawn))
    if rank == 0:
        check(grads, losses, draws)
    dist.barrier()
    print(f"OK rank={rank}", flush=True)
    du.cleanup()


def check(grads, losses, draws):
    """The same computation in one process over the whole batch."""
    model = make_model()
    image, ids, mask = make_batch()
    img, txt, (image_feat_m, text_feat_m) = itm_inputs(model, image, ids, mask)
    total = 0.0
    for r in range(2):
        rows = slice(r * B, (r + 1) * B)
        gen = torch.Generator().manual_seed(100 + r)
        with torch.no_grad():
            sim_t2i = txt.feat[rows].float() @ image_feat_m.T / model.temp
            sim_i2t = img.feat[rows].float() @ text_feat_m.T / model.temp
            same = torch.zeros(B, 2 * B, dtype=torch.bool)
            same[torch.arange(B), torch.arange(B) + r * B] = True
            neg_img = sample_hard_negatives(sim_t2i, same, gen, offset=r * B)
            neg_txt = sample_hard_negatives(sim_i2t, same, gen, offset=r * B)
        assert torch.equal(neg_img, draws[r][0]) and torch.equal(neg_txt, draws[r][1]), (r, neg_img, draws[r])
        fused_pos = model.fuse(txt.embeds[rows], mask[rows], img.embeds[rows])
        text_neg = torch.cat([txt.embeds[rows], txt.embeds[neg_txt]])
        atts_neg = torch.cat([mask[rows], mask[neg_txt]])
        image_neg = torch.cat([img.embeds[neg_img], img.embeds[rows]])
        fused_neg = model.fuse(text_neg, atts_neg, image_neg)
        logits = model.itm_logits(torch.cat([fused_pos[:, :1], fused_neg[:, :1]]))
        labels = torch.zeros(3 * B, dtype=torch.long)
        labels[:B] = 1
        loss_r = F.cross_entropy(logits.float(), labels)
        assert torch.allclose(loss_r, losses[r], atol=1e-5), (r, float(loss_r), float(losses[r]))
        total = total + loss_r / 2
    total.backward()
    cross = [bool(((d[0] >= B) == (r == 0)).any() or ((d[1] >= B) == (r == 0)).any()) for r, d in enumerate(draws)]
    assert any(cross), f"no negative came from the other rank: {draws}"
    for n, p in model.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(ref, grads[n], atol=1e-5, rtol=1e-4), (n, float((ref - grads[n]).abs().max()))
    assert sum(float(g.abs().sum()) for n, g in grads.items() if n.startswith("visual_encoder")) > 0


if __name__ == "__main__":
    main()
