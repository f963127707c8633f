"""Turning examples into model inputs: the chat messages and prompt text of a task, the processor on the resized
images and the sampled clips, one prompt's inputs (`PromptInputs`, with its shared vision features once encoded),
left-padded batches for evaluation, and prompt lengths counted without pixels (`without_long_prompts`: rows over
data.max_prompt_length become bad rows before the first step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from qlora_rft.data import BadRow, Dataset, Example, open_cell, open_clip, open_images, resize_image
from qlora_rft.errors import DataError
from qlora_rft.tasks import Task
from qlora_rft.tasks.boxes import RELATIVE, Frame

@dataclass
class SharedVision(BaseModelOutputWithPooling):
    """A vision encoding run once: `pooler_output` per image (or video), and, for families with deepstack, each
    deepstack level's features per item (read by their forward; ignored by the others)."""

    deepstack_features: list[tuple[torch.Tensor, ...]] | None = None


Encoded = tuple[tuple[torch.Tensor, ...], ...]  # per image or video, its feature levels ([tokens, H] each)


@dataclass
class PromptInputs:
    """Processor outputs for one prompt (batch of 1), on the model's device."""

    input_ids: torch.Tensor  # [1, P]
    attention_mask: torch.Tensor  # [1, P]
    mm_token_type_ids: torch.Tensor  # [1, P]: 0 text, 1 image, 2 video
    pixel_values: torch.Tensor | None = None  # [patches, C*t*p*p]; None: no image
    image_grid_thw: torch.Tensor | None = None  # [images, 3]: one row per image of the prompt
    pixel_values_videos: torch.Tensor | None = None  # [patches, C*t*p*p]; None: no video
    video_grid_thw: torch.Tensor | None = None  # [videos, 3]: temporal patches, height and width in patches
    video_times: dict = field(default_factory=dict)  # the family's time inputs per video (Family.time_inputs)
    vision: Encoded | None = None  # per image, its shared feature levels (share_vision)
    video_vision: Encoded | None = None  # per video, the same
    frame: Frame = RELATIVE  # the box coordinates the prompt asked for (rewards map answers back with it)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def repeated(self, n: int) -> dict:
        """Model kwargs for n copies of this prompt; shared vision features instead of pixels when present."""
        kwargs = dict(
            input_ids=self.input_ids.expand(n, -1),
            attention_mask=self.attention_mask.expand(n, -1),
            mm_token_type_ids=self.mm_token_type_ids.expand(n, -1),
        )
        return kwargs | visual_kwargs([self] * n)


def visual_kwargs(prompts: list[PromptInputs]) -> dict:
    """The model kwargs of the images and videos of several prompt rows, in order: grids, time inputs, and pixels
    or (when every row has them) the shared features."""
    kwargs = {}
    if any(p.image_grid_thw is not None for p in prompts):
        kwargs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in prompts if p.image_grid_thw is not None])
    if any(p.video_grid_thw is not None for p in prompts):
        kwargs["video_grid_thw"] = torch.cat([p.video_grid_thw for p in prompts if p.video_grid_thw is not None])
        for name in {name for p in prompts for name in p.video_times}:
            kwargs[name] = torch.cat([p.video_times[name] for p in prompts if p.video_grid_thw is not None])
    if all(p.vision is not None or p.image_grid_thw is None for p in prompts) and \
            all(p.video_vision is not None or p.video_grid_thw is None for p in prompts):
        images = tuple(f for p in prompts for f in (p.vision or ()))
        videos = tuple(f for p in prompts for f in (p.video_vision or ()))
        return kwargs | {"mm_encoder_outputs": shared_features(images, videos)} if images or videos else kwargs
    if "image_grid_thw" in kwargs:
        kwargs["pixel_values"] = torch.cat([p.pixel_values for p in prompts if p.pixel_values is not None])
    if "video_grid_thw" in kwargs:
        kwargs["pixel_values_videos"] = torch.cat([p.pixel_values_videos for p in prompts
                                                   if p.pixel_values_videos is not None])
    return kwargs


def shared_features(images: Encoded, videos: Encoded = ()) -> dict:
    """Precomputed features (per image or video: merged output, then deepstack levels if any) in the form the
    models' forward takes as `mm_encoder_outputs` instead of pixel_values / pixel_values_videos."""
    found = {}
    for name, items in (("image", images), ("video", videos)):
        if items:
            levels = list(zip(*items))  # [level][item]
            found[name] = SharedVision(pooler_output=levels[0], deepstack_features=levels[1:] or None)
    return found


def messages(task: Task, problem: str, frame: Frame = RELATIVE, layout: tuple[str, ...] = ("image",)) -> list[dict]:
    """The user turn (the prompt's images and videos in `layout` order, then its text), after the task's system
    prompt when it has one."""
    content = [{"type": kind} for kind in layout] + [{"type": "text", "text": task.ask(problem, frame)}]
    user = {"role": "user", "content": content}
    return [{"role": "system", "content": [{"type": "text", "text": task.system}]}, user] if task.system else [user]


def prompt_text(processor, task: Task, problem: str, frame: Frame = RELATIVE, layout: tuple[str, ...] = ("image",)
                ) -> str:
    return processor.apply_chat_template(messages(task, problem, frame, layout), add_generation_prompt=True,
                                         tokenize=False)


@dataclass
class Visuals:
    """The images and clips of several examples, ready for the processor, and each example's box frame."""

    images: list[Image.Image]  # resized; all of an example's before the next one's
    videos: list[torch.Tensor]  # [T, C, H, W] uint8 each, the sampled frames resized
    metadata: list[dict]  # per video, what the processor reads for its time (Clip.metadata)
    frames: list[Frame]  # per example, the box frame (on its first image: box tasks have one)


def model_inputs(processor, examples: list[Example], min_pixels: int, max_pixels: int) -> Visuals:
    """The resized images and sampled clips of the examples, in order, and the box frame the processor's model
    family is asked for on each example."""
    from qlora_rft.models import family_of

    family = family_of(processor)
    resized = [[resize_image(image, min_pixels, max_pixels, family.factor) for image in open_images(ex)]
               for ex in examples]
    return Visuals([image for images in resized for image in images],
                   [open_clip(clip) for ex in examples for clip in ex.clips],
                   [clip.metadata() for ex in examples for clip in ex.clips],
                   [family.frame(*images[0].size) if images else RELATIVE for images in resized])


def process(processor, texts: list[str], visuals: Visuals, **kwargs):
    """The processor on prompt texts with their visuals. Clips go in as sampled and sized at load: the processor
    neither samples nor resizes them, and reads their time from the metadata."""
    if visuals.videos:
        kwargs |= dict(videos=visuals.videos, videos_kwargs=dict(
            video_metadata=visuals.metadata, do_sample_frames=False, do_resize=False, cap_pixels_per_frame=True))
    return processor(text=texts, images=visuals.images or None, return_tensors="pt", **kwargs)


def prompt_lengths(processor, task: Task, examples: list[Example], min_pixels: int, max_pixels: int) -> list[int]:
    """Each example's prompt length in tokens, as encode_prompts makes it (image and video tokens included),
    without its pixels: the text is tokenized per row, the tokens of an image counted once per resized size (on a
    blank image), of a clip once per frame count, size and timing (on blank frames)."""
    from qwen_vl_utils.vision_process import smart_resize

    from qlora_rft.models import family_of

    family = family_of(processor)
    counted: dict[tuple, int] = {}  # tokens an image (a clip) of this size (and timing) adds to its placeholder
    lengths = []
    for ex in examples:
        sizes = []
        for cell in ex.images:
            with open_cell(cell) as image:
                width, height = image.size  # the header alone
            height, width = smart_resize(height, width, family.factor, min_pixels, max_pixels)
            sizes.append((width, height))
        frame = family.frame(*sizes[0]) if sizes else RELATIVE
        length = len(processor.tokenizer(prompt_text(processor, task, ex.problem, frame, ex.layout))["input_ids"])
        for size in sizes:
            if size not in counted:
                counted[size] = _added_tokens(processor, task, ex.problem, frame, Visuals(
                    [Image.new("RGB", size)], [], [], [frame]))
            length += counted[size]
        for clip in ex.clips:
            key = (clip.size, clip.fps, clip.total, clip.indices)
            if key not in counted:
                blank = torch.zeros(len(clip.indices), 3, clip.size[1], clip.size[0], dtype=torch.uint8)
                counted[key] = _added_tokens(processor, task, ex.problem, frame, Visuals(
                    [], [blank], [clip.metadata()], [frame]))
            length += counted[key]
        lengths.append(length)
    return lengths


def _added_tokens(processor, task: Task, problem: str, frame: Frame, one: Visuals) -> int:
    """Tokens one image or clip adds to its placeholder in a prompt."""
    text = prompt_text(processor, task, problem, frame, ("image",) if one.images else ("video",))
    return process(processor, [text], one)["input_ids"].shape[1] - len(processor.tokenizer(text)["input_ids"])


def too_long(length: int, max_prompt_length: int) -> str | None:
    """Why a prompt of `length` tokens is refused, or None when it fits."""
    if length <= max_prompt_length:
        return None
    return (f"prompt is {length} tokens, over data.max_prompt_length={max_prompt_length} (prompts are never cut: "
            "raise it or lower data.max_pixels)")


def without_long_prompts(data: Dataset, processor, task: Task, data_cfg) -> Dataset:
    """`data` less the rows whose prompt is over data.max_prompt_length: skipped and counted as bad rows, or
    refused under data.on_bad_row=error. Run once the processor is known, before the first step."""
    lengths = prompt_lengths(processor, task, data.examples, data_cfg.min_pixels, data_cfg.max_pixels)
    kept, bad = [], []
    for example, length in zip(data.examples, lengths):
        reason = too_long(length, data_cfg.max_prompt_length)
        if reason is None:
            kept.append(example)
        elif data_cfg.on_bad_row == "error":
            raise DataError(f"{data.source} split {data.split!r} row {example.index}: {reason} "
                            "(set data.on_bad_row=skip to skip it)")
        else:
            bad.append(BadRow(example.index, reason))
    if not kept:
        raise DataError(f"{data.source} split {data.split!r} has no usable rows: every prompt is too long "
                        f"(row {bad[0].index}: {bad[0].reason})")
    dropped = {b.index for b in bad}
    return Dataset(data.source, data.split, kept, sorted(data.skipped + bad, key=lambda b: b.index),
                   [i for i in data.downsized if i not in dropped])


def encode_prompts(
    processor, task: Task, examples: list[Example], min_pixels: int, max_pixels: int, max_prompt_length: int,
    device: torch.device,
) -> tuple[dict, list[Frame]]:
    """Left-padded batch inputs for several prompts (processor output, on device), and each prompt's box frame."""
    visuals = model_inputs(processor, examples, min_pixels, max_pixels)
    texts = [prompt_text(processor, task, ex.problem, frame, ex.layout) for ex, frame in zip(examples, visuals.frames)]
    batch = process(processor, texts, visuals, padding=True)
    length = batch["input_ids"].shape[1]
    if length > max_prompt_length:
        raise DataError(
            f"a prompt is {length} tokens, over data.max_prompt_length={max_prompt_length} (rows "
            f"{[ex.index for ex in examples]}); prompts are never cut (image tokens would be lost): raise "
            "data.max_prompt_length or lower data.max_pixels"
        )
    return {k: v.to(device) for k, v in batch.items()}, visuals.frames


def encode_prompt(processor, task: Task, example: Example, data_cfg, device: torch.device) -> PromptInputs:
    from qlora_rft.models import family_of

    batch, (frame,) = encode_prompts(
        processor, task, [example], data_cfg.min_pixels, data_cfg.max_pixels, data_cfg.max_prompt_length, device
    )
    named = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
             "pixel_values_videos", "video_grid_thw")
    times = {name: batch[name] for name in family_of(processor).time_inputs if name in batch}
    return PromptInputs(**{k: batch[k] for k in named if k in batch}, video_times=times, frame=frame)
