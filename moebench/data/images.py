"""Image loading and the LLaVA-1.5 preprocessing (pad to square with the mean colour, resize, normalise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moebench.errors import MissingFile, UserError


def load_image(path: Path):
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise MissingFile(path, "image", "check the data root and the image folder of the task or stage")
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"image {path} does not decode ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "re-download it or remove the record that names it") from None


def preprocess(image, size: int, mean, std, aspect: str = "pad"):
    """PIL image -> float tensor (3, size, size). `aspect="pad"` is LLaVA-1.5's expand2square."""
    import torch
    from PIL import Image

    if aspect == "pad" and image.width != image.height:
        side = max(image.width, image.height)
        fill = tuple(int(round(m * 255)) for m in mean)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / std_t


def load_pixels(path: Path, vision):
    """The image at `path` preprocessed for a vision config (image_size, image_mean, image_std, aspect)."""
    return preprocess(load_image(path), vision.image_size, vision.image_mean, vision.image_std, vision.aspect)
