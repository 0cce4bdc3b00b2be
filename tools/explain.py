"""Picture where an ALBEF checkpoint finds a text in an image: the Grad-CAM of its image-text matching score on the
image patches, as the original's ``visualization.ipynb`` draws it (reference §1.10).

    python -m tools.explain --checkpoint output/grounding/checkpoint_best.pth --image photo.jpg \\
        --text "a dog on a sofa" --out heat.png [--config CFG] [--block_num 8] [--proposals boxes.json]

Writes one PNG: panel 0 the image, panel 1 the heat of the whole expression (the Grad-CAM averaged over the text's
positions, [CLS] included, as the original's grounding score), then one panel per word piece ([CLS] skipped, as the
notebook), titled with the piece. ``--proposals`` is a JSON list of ``[x, y, w, h]`` boxes in image pixels; the
best one by the grounding score (heat inside the box over ``sqrt(box area)`` on the mean map upsampled bicubically
to the image size, ``engine.grounding``) is drawn on panel 1.

Rendering (the notebook's): min-max normalise each map, upsample it bicubically to the image size, Gaussian blur with
``sigma = 0.02 * max(H, W)`` (``--no_blur`` skips it), normalise again, colour with ``jet`` and blend
``(1 - m**0.7) * image + m**0.7 * heat``. The normalisation after upsampling is a min-max rescale rather than the
notebook's clip to [0, 1], so the rendered peak is exactly the upsampled Grad-CAM's peak. Images larger than
``--max_side`` are rendered at that size (the picture is smaller anyway); box scores always use the full size.

``--config`` defaults to the ``config.yaml`` that training wrote beside the checkpoint. The checkpoint is read by
``models.load_model`` (any wrapper or prefix it accepts) and must be a pre-training or retrieval/grounding one:
the other tasks' models have no ITM head.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import textwrap
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.images import BadImageError, load_rgb
from dataset.text import pre_caption
from models import load_model
from models.gradcam import itm_gradcam
from models.tokenizer import tokenize

BLUR_SIGMA = 0.02  # of the longer image side, as the original
HEAT_GAMMA = 0.7  # blend weight m ** 0.7
TITLE_PX, PAD_PX, DPI = 30, 6, 100  # panel layout in pixels


@dataclass
class Explanation:
    """What :func:`explain` found; :func:`render` draws it."""

    image: Image.Image  # the RGB image at its own size
    text: str  # after pre_caption
    tokens: List[str]  # word pieces, [CLS] dropped
    cam: torch.Tensor  # [L, h, w] Grad-CAM per text position ([CLS] first)
    expression: torch.Tensor  # [h, w] mean of ``cam`` over the text positions
    masks: torch.Tensor  # [1 + len(tokens), H', W'] rendered heat in [0, 1]: the expression, then each token
    boxes: Optional[torch.Tensor] = None  # [N, 4] float64 proposals, xywh in image pixels
    scores: Optional[torch.Tensor] = None  # [N] grounding scores of the proposals
    best: Optional[int] = None  # index of the best proposal (None: every box has zero area)


# ------------------------------------------------------------------------------------------------ heat maps
def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Rescale each map of ``[n, H, W]`` to [0, 1]; a constant map becomes zeros."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each map of ``[n, H, W]`` (kernel radius ``4 sigma``, reflected borders)."""
    if sigma <= 0:
        return x
    out = x[:, None]
    for dim in (-1, -2):
        size = x.shape[dim]
        radius = min(int(4 * sigma + 0.5), size - 1)
        if radius < 1:
            continue
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = kernel / kernel.sum()
        if dim == -1:
            out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        else:
            out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def heat_masks(cams: torch.Tensor, size: Tuple[int, int], blur: bool = True) -> torch.Tensor:
    """The notebook's heat of each patch-grid map ``[n, h, w]`` at image ``size = (H, W)``: ``[n, H, W]`` in [0, 1]."""
    m = _minmax(cams.detach().float().cpu())
    m = _minmax(F.interpolate(m[:, None], size=size, mode="bicubic", align_corners=False)[:, 0])
    if blur:
        m = _minmax(gaussian_blur(m, BLUR_SIGMA * max(size)))
    return m


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blend ``jet(mask)`` onto ``image`` (``[H, W, 3]`` in [0, 1]) with weight ``mask ** 0.7``: ``[H, W, 3]``."""
    import matplotlib

    heat = matplotlib.colormaps["jet"](mask)[..., :3]
    w = (mask ** HEAT_GAMMA)[..., None]
    return (1 - w) * image + w * heat


# ------------------------------------------------------------------------------------------------ model side
def _grounding():
    """``upsample_cam`` and ``proposal_scores`` of ``engine.grounding`` (the grounding evaluation's own)."""
    from engine.grounding import proposal_scores, upsample_cam

    return upsample_cam, proposal_scores


def explain(model, image: Image.Image, text: str, block_num: int = 8, proposals: Optional[Sequence] = None,
            blur: bool = True, max_side: int = 1024) -> Explanation:
    """Grad-CAM of ``model``'s ITM score for ``(image, text)`` and its rendered heat maps.

    ``model`` is a loaded pre-training or retrieval ALBEF with ``.tokenizer`` and ``.transform`` (``load_model``).
    Raises ``ValueError`` if ``text`` tokenises to nothing.
    """
    caption = pre_caption(text)
    enc = tokenize(model.tokenizer, [caption], max_length=model.cfg.bert.max_position_embeddings)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if int(mask.sum()) < 2:  # [CLS] alone
        raise ValueError(f"text {text!r} tokenises to nothing (after cleaning: {caption!r})")
    device = next(model.parameters()).device
    pixels = model.transform(image)[None].to(device)
    cam = itm_gradcam(model, pixels, ids.to(device), mask.to(device), block_num=block_num)[0].float().cpu()
    expression = cam.mean(dim=0)  # one text, no padding: the mean over its positions
    tokens = model.tokenizer.convert_ids_to_tokens(ids[0, 1:].tolist())

    width, height = image.size
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    masks = heat_masks(torch.cat([expression[None], cam[1:]]), size, blur=blur)
    out = Explanation(image=image, text=caption, tokens=tokens, cam=cam, expression=expression, masks=masks)
    if proposals is not None:
        upsample_cam, proposal_scores = _grounding()
        out.boxes = torch.as_tensor(proposals, dtype=torch.float64).reshape(-1, 4)
        heat = upsample_cam(expression, size=(height, width)).reshape(height, width)
        out.scores = proposal_scores(heat, out.boxes.tolist(), alpha=0.5).reshape(-1)  # Python numbers, as JSON
        if not bool(out.scores.isnan().all()):  # a zero-area box scores NaN and never wins
            out.best = int(out.scores.nan_to_num(nan=-math.inf).argmax())
    return out


# ------------------------------------------------------------------------------------------------ picture
def panel_layout(num_panels: int, image_size: Tuple[int, int], panel: int = 256, cols: int = 4
                 ) -> Tuple[Tuple[int, int], List[Tuple[int, int, int, int]]]:
    """Figure size ``(width, height)`` in pixels and each panel's image box ``(left, top, width, height)`` in pixels
    from the top-left corner: a grid of ``cols`` columns, each image scaled so its longer side is ``panel``, with a
    title band above it."""
    width, height = image_size
    scale = panel / max(width, height)
    pw, ph = max(1, round(width * scale)), max(1, round(height * scale))
    cols = max(1, min(cols, num_panels))
    rows = math.ceil(num_panels / cols)
    cell_w, cell_h = pw + 2 * PAD_PX, ph + TITLE_PX + PAD_PX
    boxes = [((i % cols) * cell_w + PAD_PX, (i // cols) * cell_h + TITLE_PX, pw, ph) for i in range(num_panels)]
    return (cols * cell_w, rows * cell_h), boxes


def _axes(fig, box: Tuple[int, int, int, int], fig_size: Tuple[int, int]):
    left, top, w, h = box
    fw, fh = fig_size
    ax = fig.add_axes((left / fw, 1 - (top + h) / fh, w / fw, h / fh))
    ax.set_axis_off()
    return ax


def _title(text: str, width_px: int) -> str:
    return textwrap.shorten(text, width=max(8, width_px // 7), placeholder="...")


def render(expl: Explanation, out: str, panel: int = 256, cols: int = 4) -> None:
    """Write the picture of ``expl`` to ``out`` (PNG): image, expression heat (+ best proposal), one panel per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    width, height = expl.image.size
    size = tuple(expl.masks.shape[-2:])
    shown = expl.image if size == (height, width) else expl.image.resize(size[::-1], Image.BICUBIC)
    rgb = np.asarray(shown, dtype=np.float64) / 255.0
    titles = ["image", f'"{expl.text}"'] + expl.tokens
    pictures = [rgb] + [np.clip(overlay(rgb, m.numpy().astype(np.float64)), 0, 1) for m in expl.masks]
    fig_size, boxes = panel_layout(len(pictures), (width, height), panel, cols)
    fig = plt.figure(figsize=(fig_size[0] / DPI, fig_size[1] / DPI), dpi=DPI, facecolor="white")
    try:
        for i, (picture, title, box) in enumerate(zip(pictures, titles, boxes)):
            ax = _axes(fig, box, fig_size)
            ax.imshow(picture, extent=(0, width, height, 0), aspect="auto", interpolation="antialiased")
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            if i == 1 and expl.best is not None:
                x, y, w, h = expl.boxes[expl.best].tolist()
                ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="lime", linewidth=2.5))
                score = f"  [box {float(expl.scores[expl.best]):.3g}]"
                room = box[2] - 7 * len(score)  # the score only where the text keeps 12 characters
                title = _title(title, room) + score if room >= 7 * 12 else _title(title, box[2])
            else:
                title = _title(title, box[2])
            ax.set_title(title, fontsize=10, pad=4)
        fig.savefig(out, dpi=DPI, facecolor="white")
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI
def _load_proposals(path: str) -> List[List[float]]:
    if not os.path.isfile(path):
        raise SystemExit(f"proposals file not found: {path}")
    with open(path) as f:
        try:
            boxes = json.load(f)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not JSON ({e})") from e
    ok = isinstance(boxes, list) and boxes and all(
        isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
        and b[2] >= 0 and b[3] >= 0 for b in boxes)
    if not ok:
        raise SystemExit(f"{path}: expected a non-empty JSON list of [x, y, w, h] boxes (w, h >= 0)")
    return boxes


def main(argv=None) -> Explanation:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a pre-training or retrieval/grounding checkpoint")
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--config", default=None,
                   help="any task YAML with the model keys (default: config.yaml beside the checkpoint)")
    p.add_argument("--block_num", type=int, default=8, help="BERT layer whose cross-attention is explained "
                                                             "(8: the original's; must be a fusion layer)")
    p.add_argument("--proposals", default=None, help="JSON list of [x, y, w, h] boxes; the best is drawn")
    p.add_argument("--no_blur", action="store_true", help="skip the Gaussian blur of the heat maps")
    p.add_argument("--panel", type=int, default=256, help="longer side of each panel in pixels")
    p.add_argument("--cols", type=int, default=4, help="panels per row")
    p.add_argument("--max_side", type=int, default=1024, help="render heat maps at most this large")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    for what, path in (("checkpoint", args.checkpoint), ("image", args.image)):
        if not os.path.isfile(path):
            raise SystemExit(f"{what} file not found: {path}")
    config = args.config or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "config.yaml")
    if not os.path.isfile(config):
        raise SystemExit(f"config file not found: {config}" + ("" if args.config else " (pass --config)"))
    proposals = _load_proposals(args.proposals) if args.proposals else None
    if proposals is not None:
        try:
            _grounding()
        except ImportError as e:
            raise SystemExit(f"--proposals needs engine.grounding's upsample_cam and proposal_scores: {e}") from e
    try:
        image = load_rgb(args.image)
    except BadImageError as e:
        raise SystemExit(str(e)) from e
    model = load_model(args.checkpoint, config, args.device)
    if not hasattr(model, "itm_logits"):
        raise SystemExit(f"{args.checkpoint} is a {model.layout} checkpoint, which has no ITM head; use a "
                         "pre-training or retrieval/grounding checkpoint")
    bert = model.cfg.bert
    if not bert.fusion_layer <= args.block_num < bert.num_hidden_layers:
        raise SystemExit(f"--block_num {args.block_num} is not a fusion layer of this model (layers "
                         f"{bert.fusion_layer}..{bert.num_hidden_layers - 1})")
    try:
        expl = explain(model, image, args.text, args.block_num, proposals, blur=not args.no_blur,
                       max_side=args.max_side)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    render(expl, args.out, panel=args.panel, cols=args.cols)
    print(f"wrote {args.out}: {len(expl.tokens) + 2} panels for {expl.text!r}")
    if expl.boxes is not None and expl.best is None:
        print("no proposal has a non-zero area: no box drawn")
    elif expl.best is not None:
        x, y, w, h = expl.boxes[expl.best].tolist()
        print(f"best proposal {expl.best}: [{x:g}, {y:g}, {w:g}, {h:g}] score {float(expl.scores[expl.best]):.4g}")
    return expl


if __name__ == "__main__":
    main()
