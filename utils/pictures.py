"""Pictures of rankings: one row per query, its top images as thumbnails (``tools.search --save_grid`` and the
demo's ``examples.png``). matplotlib (Agg) is imported only when a picture is drawn."""
from __future__ import annotations

import textwrap
from typing import List, Optional, Sequence, Tuple

GRID_TITLE_PX, GRID_CAPTION_PX, GRID_PAD_PX, GRID_DPI = 26, 20, 6, 100  # layout in pixels
MARK_COLORS = {True: "#1a9c3a", False: "#d0312d"}  # frame of a thumbnail marked correct / wrong


def grid_layout(rows: int, cols: int, thumb: int = 160
                ) -> Tuple[Tuple[int, int], List[List[Tuple[int, int, int, int]]]]:
    """Picture size ``(width, height)`` in pixels and, per row, each thumbnail's box ``(left, top, width, height)``
    in pixels from the top-left corner: every row is a title band, ``cols`` thumbnails and a caption band."""
    row_h = GRID_TITLE_PX + thumb + GRID_CAPTION_PX + GRID_PAD_PX
    col_w = thumb + GRID_PAD_PX
    boxes = [[(GRID_PAD_PX + c * col_w, r * row_h + GRID_TITLE_PX, thumb, thumb) for c in range(cols)]
             for r in range(rows)]
    return (GRID_PAD_PX + cols * col_w, rows * row_h), boxes


def save_ranking_grid(rows: Sequence[Tuple[str, Sequence[Tuple[str, str, Optional[bool]]]]], out: str,
                      thumb: int = 160) -> None:
    """Write ``[(title, [(image path, caption, mark), ...]), ...]`` as one PNG (layout :func:`grid_layout`): a row
    per title, its images letterboxed to ``thumb`` pixels and captioned; ``mark`` True / False draws a green / red
    frame (correct / wrong), None none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image, ImageOps

    cols = max(1, max(len(r) for _, r in rows))
    (fig_w, fig_h), boxes = grid_layout(len(rows), cols, thumb)
    fig = plt.figure(figsize=(fig_w / GRID_DPI, fig_h / GRID_DPI), dpi=GRID_DPI, facecolor="white")
    try:
        for r, (title, items) in enumerate(rows):
            title_y = boxes[r][0][1] - GRID_TITLE_PX / 2
            fig.text(GRID_PAD_PX / fig_w, 1 - title_y / fig_h,
                     textwrap.shorten(f"{r + 1}. {title}", width=max(10, fig_w // 8), placeholder="..."),
                     ha="left", va="center", fontsize=11, fontweight="bold")
            for c, (path, caption, mark) in enumerate(items):
                left, y, w, h = boxes[r][c]
                ax = fig.add_axes((left / fig_w, 1 - (y + h) / fig_h, w / fig_w, h / fig_h))
                ax.set_axis_off()
                with Image.open(path) as im:
                    ax.imshow(ImageOps.pad(im.convert("RGB"), (thumb, thumb), color=(255, 255, 255)))
                if mark is not None:
                    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, linewidth=4,
                                           edgecolor=MARK_COLORS[bool(mark)], clip_on=False))
                ax.text(0.5, -0.02, caption, transform=ax.transAxes, ha="center", va="top", fontsize=9)
        fig.savefig(out, dpi=GRID_DPI, facecolor="white")
    finally:
        plt.close(fig)
