"""The images and questions twin tests ask with: two images of different sizes and aspect ratios, and
two questions on the first one (as eval's runner builds queries)."""
import numpy as np
from PIL import Image


def blocky_image(width: int, height: int, seed: int, block: int = 4) -> Image.Image:
    """Random colour blocks of ``block`` px: they survive the processors' resizing."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // block + 1, width // block + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.NEAREST)


def question_rows(swap: bool = False, block: int = 4) -> list[tuple]:
    """(image key, image, question, options) rows; ``swap`` exchanges the two images."""
    first, second = ("wide", blocky_image(112, 84, 0, block)), ("tall", blocky_image(64, 96, 1, block))
    if swap:
        first, second = second, first
    return [(*first, "Which side is the lesion on?", ("left", "right")),
            (*second, "What imaging modality is shown?", ("CT", "MRI")),
            (*first, "Is there a fracture?", ("yes", "no"))]
