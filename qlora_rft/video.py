"""Video clips: which frames the model sees and at what size (qwen-vl-utils' rule, pure), and decoding with PyAV.

A clip is decided when the data loads: `probe` decodes every frame once, one at a time (never the whole file in
memory), and the frames to sample and their size are fixed then. A step decodes only those frames again
(`read_frames`), each resized as soon as it is decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VideoRule:
    """How clips are sampled (data.video_fps, data.video_max_frames, data.video_max_pixels), the same in training
    and evaluation."""

    fps: float  # frames sampled per second of the clip
    max_frames: int
    max_pixels: int  # the pixel budget of all the sampled frames together

    @classmethod
    def of(cls, data_cfg) -> "VideoRule":
        return cls(data_cfg.video_fps, data_cfg.video_max_frames, data_cfg.video_max_pixels)


@dataclass(frozen=True)
class Clip:
    """A row's video, checked when the data loads: where its frames are, and which of them the model sees at which
    size (decided then, so every step and the evaluation see the same)."""

    source: dict | tuple[dict, ...]  # a video file {"bytes": ..., "path": ...}, or the cells of its frame images
    fps: float  # the source's frames per second (a list of frames: data.video_fps)
    total: int  # frames in the source
    indices: tuple[int, ...]  # the frames sampled, increasing
    size: tuple[int, int]  # (width, height) every sampled frame is resized to

    def metadata(self) -> dict:
        """What the processor reads for the clip's time: Qwen2.5-VL's seconds per temporal patch (from the sampled
        frame rate), Qwen3-VL's timestamps written into the prompt (from the frame indices and fps)."""
        return {"fps": self.fps, "frames_indices": list(self.indices), "total_num_frames": self.total,
                "width": self.size[0], "height": self.size[1]}


@dataclass(frozen=True)
class Probe:
    """What decoding a whole video file found."""

    frames: int
    fps: float
    width: int
    height: int


def sample_indices(total: int, fps: float, rule: VideoRule) -> tuple[int, ...]:
    """The frames a clip of `total` frames shot at `fps` is sampled at: qwen-vl-utils' count (rule.fps per second,
    at least 4 and at most rule.max_frames and `total`, rounded down to an even number: two frames make one temporal
    patch), spread evenly from the first frame to the last. ValueError for a clip of fewer than 2 frames.

    >>> rule = VideoRule(fps=2.0, max_frames=32, max_pixels=401408)
    >>> sample_indices(30, 10.0, rule)  # 3 s at 10 fps, 2 per second: 6 frames
    (0, 6, 12, 17, 23, 29)
    >>> sample_indices(5, 10.0, rule)  # 0.5 s: at least 4 frames, linspace(0, 4, 4) rounded
    (0, 1, 3, 4)
    """
    from qwen_vl_utils.vision_process import smart_nframes

    if total < 2:
        raise ValueError(f"a clip of {total} frame cannot be sampled (at least 2 frames)")
    count = smart_nframes({"fps": rule.fps, "max_frames": rule.max_frames}, total_frames=total, video_fps=fps)
    return tuple(torch.linspace(0, total - 1, count).round().long().tolist())


def frame_size(width: int, height: int, count: int, rule: VideoRule, min_pixels: int, max_pixels: int,
               factor: int) -> tuple[int, int]:
    """(width, height) of each of `count` sampled frames: qwen-vl-utils' resize rule with its video cap, an even
    share of the budget per temporal patch (rule.max_pixels / count x 2), within the frame bounds min_pixels and
    max_pixels (the image bounds) and at least 1.05 x min_pixels; sides multiples of `factor`, the family's image
    token side. ValueError when the rule refuses the shape.

    >>> rule = VideoRule(fps=2.0, max_frames=32, max_pixels=401408)
    >>> frame_size(640, 480, 16, rule, min_pixels=3136, max_pixels=401408, factor=28)  # 50176 pixels a frame at most
    (252, 168)
    """
    from qwen_vl_utils.vision_process import smart_resize

    cap = max(min(max_pixels, rule.max_pixels / count * 2), int(min_pixels * 1.05))
    new_height, new_width = smart_resize(height, width, factor, min_pixels, cap)
    if new_width < 1 or new_height < 1:
        raise ValueError(f"frames {width}x{height} would be resized to {new_width}x{new_height}: too elongated")
    return new_width, new_height


def resize_frame(frame: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] uint8 -> [C, height, width] uint8 for size (width, height): bicubic with antialias, as
    qwen-vl-utils resizes video frames."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    width, height = size
    return F.resize(frame[None], [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)[0]


# ----------------------------------------------------------------------------- decoding (PyAV)


def _open(cell: dict):
    import av

    if cell.get("bytes"):
        return av.open(io.BytesIO(cell["bytes"]))
    if cell.get("path"):
        return av.open(cell["path"])
    raise ValueError("no video bytes or path")


def probe(cell: dict) -> Probe:
    """Decode every frame of a video file {"bytes": ..., "path": ...}, one at a time, and say what it holds.
    ValueError saying why it is unusable: it does not open, has no video stream or no frame rate, no frame decodes,
    or fewer frames decode than its container lists (cut short)."""
    try:
        with _open(cell) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate, listed = stream.average_rate or stream.guessed_rate, stream.frames
            count, width, height = 0, 0, 0
            for frame in container.decode(stream):
                if count == 0:
                    width, height = frame.width, frame.height
                count += 1
    except ValueError:
        raise
    except Exception as e:  # any decoder error means the same thing to the user: this clip is unusable
        raise ValueError(f"{type(e).__name__}: {e}") from None
    if count == 0:
        raise ValueError("no frame decodes (an empty clip)")
    if listed and count < listed:
        raise ValueError(f"only {count} of its {listed} frames decode (cut short)")
    if not rate or rate <= 0:
        raise ValueError("no frame rate")
    return Probe(count, float(rate), width, height)


def read_frames(cell: dict, indices: tuple[int, ...], size: tuple[int, int]) -> torch.Tensor:
    """The frames at `indices` (increasing) of a video file, each resized to size (width, height) as it is
    decoded; decoding stops after the last one.  -> [T, C, height, width] uint8"""
    wanted, last = set(indices), max(indices)
    frames = {}
    with _open(cell) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)  # [C, H, W]
                frames[index] = resize_frame(rgb, size)
            if index >= last:
                break
    missing = [i for i in indices if i not in frames]
    if missing:
        raise ValueError(f"frame {missing[0]} no longer decodes (the file changed since the data loaded?)")
    return torch.stack([frames[i] for i in indices])


def write_clip(frames: list, path, fps: float) -> None:
    """Frames ([H, W, 3] uint8 arrays of one even size) as an H.264 mp4 (the codec PyAV's wheels carry); for the
    synthetic clips and the tests, which draw theirs at run time."""
    from fractions import Fraction

    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast"}  # near lossless, fast
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
