"""Run under `torchrun --nproc_per_node=2` (gloo, CPU): one DDP step of a tiny ALBEF with rank-specific data.

Checks, on every rank: parameters start identical (DDP broadcast from rank 0), gradients are identical after
backward (synchronised), and the feature queues hold both ranks' momentum features in rank order.
Prints "OK rank=R" on success; raises otherwise.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from models.albef import ALBEF, ALBEFConfig  # noqa: E402
from models.bert import BertConfig  # noqa: E402
from models.vit import VisionConfig  # noqa: E402
from utils import distributed as du  # noqa: E402


def main():
    info = du.init_distributed("cpu")
    assert info.distributed and info.world_size == 2, info
    rank = info.rank
    torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's
    cfg = ALBEFConfig(image_res=16, vision_width=32, embed_dim=8, queue_size=8, momentum=0.9,
                      vit=VisionConfig(patch_size=8, embed_dim=32, depth=1, num_heads=2),
                      bert=BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, fusion_layer=1, encoder_width=32,
                                      max_position_embeddings=16),
                      pad_token_id=0, cls_token_id=2, mask_token_id=4)
    model = ALBEF(cfg)
    ddp = du.wrap_ddp(model, torch.device('cpu'))  # what the Trainer does
    model.eval()  # no dropout, so momentum features can be recomputed exactly below
    bs = 2
    g = torch.Generator().manual_seed(rank)
    image = torch.randn(bs, 3, 16, 16, generator=g)
    ids = torch.randint(5, 50, (bs, 6), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    losses = ddp(image, ids, mask, alpha=0.4)
    sum(losses.values()).backward()

    flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    grads = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(grads, flat)
    assert torch.equal(grads[0], grads[1]), "gradients differ across ranks"
    queues = [torch.empty_like(model.image_queue) for _ in range(2)]
    dist.all_gather(queues, model.image_queue)
    assert torch.equal(queues[0], queues[1]), "queues differ across ranks"
    with torch.no_grad():
        feat_m = model.encode_image(image, momentum=True).feat
    all_feat = du.all_gather_no_grad(feat_m)
    assert torch.allclose(model.image_queue[:, : 2 * bs].T, all_feat, atol=1e-6), "queue lacks a rank's features"
    assert int(model.queue_ptr) == 2 * bs
    print(f"OK rank={rank}", flush=True)
    du.cleanup()


if __name__ == "__main__":
    main()
