"""Image grids as PNG (Pillow only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..files import atomic_path


def grid(rows: Sequence[torch.Tensor], tile: int | None = None, pad: int = 2) -> Image.Image:
    """Arrange rows of N x C x H x W images in [0, 1] into one grey (or RGB) picture.

    Small images are enlarged with nearest-neighbour to ``tile`` px (default: at least 96 px) so that
    pixels stay visible as pixels.
    """
    rows = [r.detach().cpu().float().clamp(0, 1) for r in rows]
    h = rows[0].shape[-1]
    tile = tile or max(h, 96 if h < 96 else h)
    cols = max(r.shape[0] for r in rows)
    c = rows[0].shape[1]
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(mode, (cols * (tile + pad) + pad, len(rows) * (tile + pad) + pad),
                       255 if mode == "L" else (255, 255, 255))
    for i, r in enumerate(rows):
        for j in range(r.shape[0]):
            a = (r[j].numpy() * 255 + 0.5).astype(np.uint8)
            img = Image.fromarray(a[0] if c == 1 else a.transpose(1, 2, 0), mode)
            if img.size[0] != tile:
                img = img.resize((tile, tile), Image.NEAREST)
            canvas.paste(img, (pad + j * (tile + pad), pad + i * (tile + pad)))
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
