"""Box geometry shared by detection and grounding: one `Box` type, IoU and GIoU, the 0-1000 coordinate scale, and
the `Frame` a model family writes its boxes in.

Coordinates are fractions of the image's original width (x) and height (y) times 1000: (x1, y1) is the top-left
corner, (x2, y2) the bottom-right one. A family trained on absolute pixels of its resized input (Qwen2.5-VL) is asked
for those and its answers are mapped back to this scale before any reward or metric. Pure functions, total on
finite boxes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

SCALE = 1000  # coordinates run from 0 to SCALE along the original width and height


class Box(NamedTuple):
    """Top-left (x1, y1), bottom-right (x2, y2); on the 0-1000 scale unless converted with `to_pixels`."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


def _intersection(a: Box, b: Box) -> float:
    return Box(max(a.x1, b.x1), max(a.y1, b.y1), min(a.x2, b.x2), min(a.y2, b.y2)).area


def iou(a: Box, b: Box) -> float:
    """Intersection over union, in [0, 1]; 0 for degenerate boxes.

    >>> iou(Box(0, 0, 10, 10), Box(5, 0, 15, 10))  # 50 / (100 + 100 - 50)
    0.3333333333333333
    """
    inter = _intersection(a, b)
    union = a.area + b.area - inter
    if not union > 0 or not math.isfinite(union):
        return 0.0
    return min(1.0, max(0.0, inter / union))


def giou(a: Box, b: Box) -> float:
    """Generalised IoU: IoU - (enclosing area - union) / enclosing area, in [-1, 1].

    >>> giou(Box(0, 0, 10, 10), Box(20, 0, 30, 10))  # 0 - (300 - 200) / 300
    -0.3333333333333333
    """
    inter = _intersection(a, b)
    union = a.area + b.area - inter
    enclosing = Box(min(a.x1, b.x1), min(a.y1, b.y1), max(a.x2, b.x2), max(a.y2, b.y2)).area
    overlap = iou(a, b)
    if not enclosing > 0 or not math.isfinite(enclosing):
        return overlap
    return overlap - (enclosing - union) / enclosing


def to_pixels(box: Box, width: int, height: int) -> Box:
    """From the 0-1000 scale to pixels of a width x height image.

    >>> to_pixels(Box(100, 250, 500, 1000), 640, 480)
    Box(x1=64.0, y1=120.0, x2=320.0, y2=480.0)
    """
    return Box(box.x1 * width / SCALE, box.y1 * height / SCALE, box.x2 * width / SCALE, box.y2 * height / SCALE)


def to_scale(box: tuple[float, float, float, float], width: int, height: int) -> Box:
    """From pixels to the 0-1000 scale (rounded to integers, as the answers are written)."""
    x1, y1, x2, y2 = box
    return Box(round(x1 * SCALE / width), round(y1 * SCALE / height), round(x2 * SCALE / width),
               round(y2 * SCALE / height))


class Frame(NamedTuple):
    """What a model's box coordinates run over: x from 0 to `width`, y from 0 to `height`. `RELATIVE` is the
    dataset's own 0-1000 scale (Qwen2-VL, Qwen3-VL); Frame(w, h) the pixels of the w x h image the model was shown
    (Qwen2.5-VL)."""

    width: float = SCALE
    height: float = SCALE


RELATIVE = Frame()


def from_frame(box: Box, frame: Frame) -> Box:
    """A box a model wrote in `frame`, on the dataset's 0-1000 scale (unrounded).

    >>> from_frame(Box(64, 120, 320, 480), Frame(640, 480))
    Box(x1=100.0, y1=250.0, x2=500.0, y2=1000.0)
    """
    if frame == RELATIVE:
        return box
    w, h = frame.width, frame.height
    return Box(box.x1 * SCALE / w, box.y1 * SCALE / h, box.x2 * SCALE / w, box.y2 * SCALE / h)


def into_frame(box: tuple[float, float, float, float], frame: Frame) -> Box:
    """A 0-1000 box as the model writes it in `frame` (rounded to integers in an absolute frame).

    >>> into_frame((100, 250, 500, 1000), Frame(640, 480))
    Box(x1=64, y1=120, x2=320, y2=480)
    """
    if frame == RELATIVE:
        return Box(*box)
    x1, y1, x2, y2 = box
    w, h = frame.width, frame.height
    return Box(round(x1 * w / SCALE), round(y1 * h / SCALE), round(x2 * w / SCALE), round(y2 * h / SCALE))


def frame_instruction(frame: Frame) -> str:
    """What the prompt adds for an absolute frame (the datasets' problems ask for 0-1000); "" for RELATIVE."""
    if frame == RELATIVE:
        return ""
    w, h = int(frame.width), int(frame.height)
    return (f"Write every box coordinate in absolute pixels of this {w}x{h} image (x from 0 to {w}, y from 0 to "
            f"{h}), not on a 0-1000 scale.")
