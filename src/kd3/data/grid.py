"""A contact sheet of a pool: one row per (source, style) group, so a person can see the shift."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kd3.data.pool import Pool
from kd3.data.render import text_fonts

LABEL_WIDTH = 240
PAD = 4


def grid_geometry(image_size: int, rows: int, per_group: int) -> tuple[int, int, int]:
    """(cell side, sheet width, sheet height) in pixels; small images are drawn at 2×."""
    cell = image_size * max(1, 64 // image_size)
    width = LABEL_WIDTH + per_group * (cell + PAD) + PAD
    return cell, width, rows * (cell + PAD) + PAD


def save_pool_grid(pool: Pool, path: str | os.PathLike,
                   per_group: int = 8) -> list[tuple[str, int]]:
    """Write a PNG with the first ``per_group`` images of each group (the pool order is
    shuffled, so these are a random sample). Relevant groups come first. Returns the rows as
    (group label, image count), top to bottom."""
    groups = sorted(pool.group_counts().items(),
                    key=lambda kv: (not _is_relevant(pool, *kv[0]), kv[0]))
    size = pool.images.shape[-1]
    cell, width, height = grid_geometry(size, len(groups), per_group)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.truetype(str(text_fonts()[0]), 14)
    rows = []
    for r, ((source, style), count) in enumerate(groups):
        top = PAD + r * (cell + PAD)
        label = f"{source} / {style}"
        draw.text((PAD, top + cell // 2), f"{label}\nn={count}", fill="black", font=font,
                  anchor="lm")
        members = np.flatnonzero((pool.source == source) & (pool.style == style))[:per_group]
        for j, k in enumerate(members):
            img = pool.images[int(k)].numpy()  # one row at a time: the pool may live on disk
            tile = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
            sheet.paste(tile.convert("RGB").resize((cell, cell), Image.NEAREST),
                        (LABEL_WIDTH + PAD + j * (cell + PAD), top))
        rows.append((label, count))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return rows


def _is_relevant(pool: Pool, source: str, style: str) -> bool:
    members = (pool.source == source) & (pool.style == style)
    return bool(pool.relevant[members].any())
