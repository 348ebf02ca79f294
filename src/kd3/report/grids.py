"""Samples of the pool images an epoch trained on next to those it left out, with per-source counts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kd3.data.grid import LABEL_WIDTH, PAD, grid_geometry
from kd3.data.pool import Pool
from kd3.data.render import text_fonts
from kd3.report.page import Picture, Section, table
from kd3.report.run import RunData

SAMPLE = 48  # images shown of each side
PER_ROW = 12
IRRELEVANT_BORDER = (220, 30, 30)
REJECTED_BACKGROUND = (232, 232, 232)  # sets the rejected block apart from the selected one
TITLE = "Selected vs rejected pool images"


def pick_epochs(epochs: list[int]) -> list[int]:
    """First, middle and last saved epoch (fewer when fewer were saved)."""
    return sorted({epochs[0], epochs[(len(epochs) - 1) // 2], epochs[-1]})


def grids_section(run: RunData, out: Path) -> Section:
    if not run.selections:
        return Section(TITLE, note="No selection was saved: every epoch trained on the whole pool "
                                   "(or the method does not train on pool images).")
    pool, problem = _run_pool(run)
    if pool is None:
        return Section(TITLE, note=problem)
    pictures = []
    for epoch in pick_epochs(list(run.selections)):
        indices = np.load(run.selections[epoch], allow_pickle=False)
        if len(indices) and indices.max() >= len(pool):
            return Section(TITLE, note=f"selections/epoch-{epoch:04d}.npy holds index {indices.max()} but the pool "
                                       f"has {len(pool)} images: the pool changed after the run.")
        chosen = np.zeros(len(pool), dtype=bool)
        chosen[indices] = True
        name = f"selection-epoch-{epoch:04d}.png"
        selection_sheet(pool, chosen).save(out / name)
        pictures.append(Picture(name, _caption(pool, chosen, epoch), _source_table(pool, chosen)))
    note = "" if pool.has_provenance else "The pool has no provenance, so irrelevant images cannot be marked."
    return Section(TITLE, pictures, note=note)


def _run_pool(run: RunData) -> tuple[Pool | None, str]:
    # Imported here: the training stack is heavy and only reports with saved selections need the pool.
    from kd3 import api
    from kd3.config import DistillConfig, load_config
    from kd3.methods.base import get_method

    try:
        cfg = load_config(DistillConfig, run.run_dir / "config.yaml")
        if get_method(cfg.method.get("name", "")).uses_original_data:
            return None, "The method trains on its original data, whose images are not part of the report."
        return api.load_pool(cfg), ""
    except (FileNotFoundError, ValueError) as error:  # ConfigError is a ValueError
        return None, f"The run's pool could not be loaded, so its images are not shown: {error}"


def selection_sheet(pool: Pool, chosen: np.ndarray) -> Image.Image:
    """Two blocks, a random sample of the selected images above one of the rejected; with
    provenance, irrelevant images get a red border."""
    rng = np.random.default_rng(0)  # the same sample every time the report is rebuilt
    blocks = []
    for label, members in (("selected", np.flatnonzero(chosen)), ("rejected", np.flatnonzero(~chosen))):
        shown = np.sort(rng.choice(members, size=min(SAMPLE, len(members)), replace=False))
        blocks.append((label, len(members), shown, max(1, -(-len(shown) // PER_ROW))))
    cell, width, height = grid_geometry(pool.images.shape[-1], sum(b[3] for b in blocks), PER_ROW)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.truetype(str(text_fonts()[0]), 13)
    top = PAD
    for label, count, shown, rows in blocks:
        if label == "rejected":
            draw.rectangle((0, top - PAD, width, top + rows * (cell + PAD)), fill=REJECTED_BACKGROUND)
        text = f"{label}: {count:,}\n{count / len(pool):.1%} of the pool"
        if pool.has_provenance:
            text += f"\n{int((~pool.relevant[shown]).sum())} of {len(shown)} shown irrelevant"
        draw.multiline_text((PAD, top), text, fill="black", font=font)
        for j, k in enumerate(shown):
            x = LABEL_WIDTH + PAD + (j % PER_ROW) * (cell + PAD)
            y = top + (j // PER_ROW) * (cell + PAD)
            sheet.paste(_tile(pool.images[int(k)].numpy(), cell), (x, y))  # the pool may live on disk
            if pool.has_provenance and not pool.relevant[k]:
                # Drawn in the PAD gap around the tile, so the image itself stays untouched.
                draw.rectangle((x - 2, y - 2, x + cell + 1, y + cell + 1), outline=IRRELEVANT_BORDER, width=2)
        top += rows * (cell + PAD)
    return sheet


def _tile(image: np.ndarray, cell: int) -> Image.Image:
    """A uint8 C×H×W image as an RGB tile of side ``cell`` (the conversion kd3.data.grid does)."""
    tile = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    return tile.convert("RGB").resize((cell, cell), Image.NEAREST)


def _caption(pool: Pool, chosen: np.ndarray, epoch: int) -> str:
    text = (f"Epoch {epoch}: {int(chosen.sum()):,} of {len(pool):,} pool images selected. "
            f"Random samples of up to {SAMPLE} selected (top) and up to {SAMPLE} rejected (grey, bottom) images.")
    if pool.has_provenance:
        irrelevant = int((chosen & ~pool.relevant).sum())
        missed = int((~chosen & pool.relevant).sum())
        text += (f" Red border: irrelevant (provenance). Irrelevant among selected: {irrelevant:,}; "
                 f"relevant among rejected: {missed:,}.")
    return text


def _source_table(pool: Pool, chosen: np.ndarray) -> str:
    """Selected vs rejected per pool source; only meaningful (and only shown) with provenance."""
    if not pool.has_provenance:
        return ""
    sources = sorted(set(pool.source.tolist()), key=lambda s: (not pool.relevant[pool.source == s].any(), s))
    rows = []
    for source in sources:
        members = pool.source == source
        selected = int((chosen & members).sum())
        relevant = "yes" if pool.relevant[members].all() else "some" if pool.relevant[members].any() else "no"
        rows.append([source, relevant, f"{selected:,}", f"{int(members.sum()) - selected:,}",
                     f"{selected / members.sum():.1%}"])
    return table(["source", "relevant", "selected", "rejected", "share of source selected"], rows)
