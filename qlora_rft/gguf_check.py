"""A GGUF export checked by the real reader: llama.cpp (llama-cpp-python) loads both files and its logits, image
embedding, token ids and greedy answer are compared with the merged transformers model in float32 on the same inputs.
A gap that is llama.cpp's own (an RMS-norm epsilon it does not read) is measured and reported apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qlora_rft.export import VERIFICATION_ANSWER, VERIFICATION_PROMPT, verification_image

IMAGE_TOKENS = (12, 8)  # the check image in image tokens (width, height): resized by neither side's pixel bounds
ANSWER_TOKENS = 16  # greedy tokens generated on each side
CONTEXT = 512  # llama.cpp context for the checks (the image prompt is ~130 tokens)


@dataclass
class Comparison:
    """Largest |llama.cpp - transformers| of one output, the reference's scale and the bound it must stay within."""

    name: str
    max_abs_diff: float
    scale: float  # max |reference|
    tolerance: float  # relative tolerance * max(1, scale)

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance


@dataclass
class Answers:
    """The greedy answer to the image prompt from each side, and how many leading tokens they share."""

    llama_cpp: str
    transformers: str
    tokens: int  # tokens llama.cpp generated (at most ANSWER_TOKENS; fewer when it ended its answer)
    same_leading_tokens: int


@dataclass
class NormEpsilon:
    """The language model's RMS-norm epsilon: the model's, the file's, and the one llama.cpp computes with (from its
    load log); and the largest logit difference the reader's gap alone makes on the check prompts (transformers both
    ways; 0 without a gap)."""

    model: float
    file: float
    llama_cpp: float
    effect: float = 0.0

    @property
    def differs(self) -> bool:
        """llama.cpp computes with another epsilon than the file states, which states the model's."""
        return (math.isclose(self.file, self.model, rel_tol=1e-6)
                and not math.isclose(self.model, self.llama_cpp, rel_tol=0.05))  # llama.cpp logs 2 digits


@dataclass
class GgufCheck:
    """What `check_gguf` found: it passes when every comparison is within its tolerance and the token ids agree."""

    comparisons: list[Comparison]
    tokenizer_agrees: bool  # llama.cpp's token ids of the check conversation's text == transformers'
    answers: Answers
    image_tokens: int
    norm_epsilon: NormEpsilon

    @property
    def ok(self) -> bool:
        return self.tokenizer_agrees and all(c.ok for c in self.comparisons)

    def failures(self) -> str:
        """One line naming what failed, e.g. "text logits 0.41 > 0.3; llama.cpp's token ids differ"."""
        failed = [f"{c.name} {c.max_abs_diff:.3g} > {c.tolerance:.3g}" for c in self.comparisons if not c.ok]
        return "; ".join(failed + ([] if self.tokenizer_agrees else ["llama.cpp's token ids differ"]))


# ----------------------------------------------------------------------------- the check


def check_gguf(model_file: Path, mmproj_file: Path, model, processor, family,
               relative_tolerance: float) -> GgufCheck:
    """Load `model_file` and `mmproj_file` in llama.cpp and compare its outputs with `model` (the merged model,
    float32, eval mode); `relative_tolerance` scales with each reference's largest value.

    Compared: next-token logits on fixed token ids (fed directly, so a tokenizer difference cannot hide a weight
    error), the mmproj's embedding of a fixed image (deepstack levels included) against the vision tower's output,
    the logits after each token that follows that image in a chat prompt, and llama.cpp's token ids of the prompt's
    text. A greedy answer to the image prompt is recorded from both sides. Where llama.cpp computes the RMS norms
    with another epsilon than the model's while the file states the model's (0.3.36 reads none for the qwen2vl
    architecture and uses 0), the logits are compared with the model run at llama.cpp's epsilon, and what that gap
    alone changes is reported beside them: the reader's fault, not the files'.
    """
    prompt = Prompt.build(processor, family)
    eog = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    with LlamaCpp(model_file, mmproj_file) as llama:
        text_logits = llama.logits(prompt.text_ids)
        image_embedding = llama.image_embedding(prompt.image)
        image_logits = llama.image_prompt_logits(prompt)
        answer = llama.greedy_answer(prompt, eog)
        llama_text_ids = llama.tokenize(prompt.text)
        model_eps, read_eps = model.config.get_text_config().rms_norm_eps, llama.norm_epsilon()
        eps = NormEpsilon(model_eps, file_norm_epsilon(model_file), model_eps if read_eps is None else read_eps)
    with torch.no_grad():
        reference = as_read = Reference.of(model, family, prompt, eog)
        if eps.differs:
            with text_norm_epsilon(model, eps.llama_cpp):
                as_read = Reference.of(model, family, prompt, eog, answer=False)
            eps.effect = max(float((as_read.text_logits - reference.text_logits).abs().max()),
                             float((as_read.image_logits - reference.image_logits).abs().max()))

    def compare(name: str, ours: np.ndarray, theirs: torch.Tensor) -> Comparison:
        theirs = theirs.float().numpy()
        scale = float(np.abs(theirs).max())
        diff = float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else float("inf")
        return Comparison(name, diff, scale, relative_tolerance * max(1.0, scale))

    same = 0
    while same < min(len(answer), len(reference.answer)) and answer[same] == reference.answer[same]:
        same += 1
    tokenizer = processor.tokenizer
    return GgufCheck(
        comparisons=[compare("text logits", text_logits, as_read.text_logits),
                     compare("image embedding", image_embedding, as_read.image_embedding),
                     compare("logits after the image", image_logits, as_read.image_logits)],
        tokenizer_agrees=llama_text_ids == prompt.text_ids,
        answers=Answers(tokenizer.decode(answer), tokenizer.decode(reference.answer), len(answer), same),
        image_tokens=prompt.image_tokens,
        norm_epsilon=eps,
    )


@dataclass
class Prompt:
    """The fixed inputs: a text-only conversation (its ids) and a conversation with the check image, split
    around the image's placeholder tokens (llama.cpp takes the image between the two)."""

    text: str  # the text-only conversation through the chat template
    text_ids: list[int]
    image: object  # PIL image, IMAGE_TOKENS image tokens of the family
    processed: dict  # processor outputs of the image conversation (batch of 1)
    before_image: list[int]  # its ids up to <|vision_start|> included
    after_image: list[int]  # from <|vision_end|> on, ending with the assistant's header
    image_tokens: int

    @classmethod
    def build(cls, processor, family) -> "Prompt":
        text_messages = [{"role": "user", "content": [{"type": "text", "text": VERIFICATION_PROMPT}]},
                         {"role": "assistant", "content": [{"type": "text", "text": VERIFICATION_ANSWER}]}]
        text = processor.apply_chat_template(text_messages, tokenize=False)
        text_ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        width, height = (n * family.factor for n in IMAGE_TOKENS)
        image = verification_image(width, height)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VERIFICATION_PROMPT}]}]
        chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        processed = dict(processor(text=[chat], images=[image], return_tensors="pt"))
        ids = processed["input_ids"][0].tolist()
        pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        first, count = ids.index(pad), ids.count(pad)
        if count != IMAGE_TOKENS[0] * IMAGE_TOKENS[1]:
            raise RuntimeError(f"the processor resized the {width}x{height} check image ({count} image tokens)")
        return cls(text, text_ids, image, processed, ids[:first], ids[first + count:], count)


@dataclass
class Reference:
    """transformers' outputs on the prompt (the merged model in float32)."""

    text_logits: torch.Tensor  # [T, V]
    image_embedding: torch.Tensor  # [image tokens, hidden * (1 + deepstack levels)]
    image_logits: torch.Tensor  # [len(after_image), V]
    answer: list[int]  # greedy token ids, end-of-generation token excluded (empty when not asked for)

    @classmethod
    def of(cls, model, family, prompt: Prompt, eog: set[int], answer: bool = True) -> "Reference":
        text_logits = model(input_ids=torch.tensor([prompt.text_ids]), use_cache=False).logits[0]
        inputs = prompt.processed
        levels = family.encode_images(model, inputs["pixel_values"], inputs["image_grid_thw"])[0]
        image_logits = model(**inputs, use_cache=False).logits[0, -len(prompt.after_image):]
        generated = []
        if answer:
            generated = model.generate(**inputs, do_sample=False, max_new_tokens=ANSWER_TOKENS, temperature=None,
                                       top_p=None, top_k=None, eos_token_id=sorted(eog), pad_token_id=min(eog),
                                       )[0, inputs["input_ids"].shape[1]:].tolist()
        end = next((i for i, token in enumerate(generated) if token in eog), len(generated))
        return cls(text_logits, torch.cat(levels, dim=-1), image_logits, generated[:end])


def file_norm_epsilon(model_file: Path) -> float:
    """The RMS-norm epsilon a language model file states ({arch}.attention.layer_norm_rms_epsilon)."""
    import gguf

    fields = gguf.GGUFReader(str(model_file)).fields
    return float(next(f.contents() for key, f in fields.items() if key.endswith(".attention.layer_norm_rms_epsilon")))


@contextlib.contextmanager
def text_norm_epsilon(model, eps: float):
    """The language model's RMS norms computed with `eps` inside the block (the model is left as it was)."""
    norms = [m for m in model.model.language_model.modules() if hasattr(m, "variance_epsilon")]
    kept = [m.variance_epsilon for m in norms]
    for m in norms:
        m.variance_epsilon = eps
    try:
        yield
    finally:
        for m, value in zip(norms, kept):
            m.variance_epsilon = value


# ----------------------------------------------------------------------------- llama.cpp


class LlamaCpp:
    """Both files loaded in llama.cpp (CPU), its log kept in `log` instead of printed."""

    def __init__(self, model_file: Path, mmproj_file: Path):
        self.model_file, self.mmproj_file = model_file, mmproj_file
        self.log: list[str] = []

    def __enter__(self) -> "LlamaCpp":
        from llama_cpp import Llama, mtmd_cpp

        self._silenced = llama_cpp_silenced(self.log)
        self._silenced.__enter__()
        self.llama = self.mtmd = None
        threads = torch.get_num_threads()
        try:
            try:
                self.llama = Llama(str(self.model_file), n_ctx=CONTEXT, n_batch=CONTEXT, n_threads=threads,
                                   logits_all=True, verbose=False)
            except ValueError as e:
                raise RuntimeError(f"llama.cpp cannot load {self.model_file}: {self._last_error(e)}") from None
            params = mtmd_cpp.mtmd_context_params_default()
            params.use_gpu = False
            params.n_threads = threads
            params.warmup = False
            self.mtmd = mtmd_cpp.mtmd_init_from_file(str(self.mmproj_file).encode(), self.llama.model, params)
            if not self.mtmd:
                raise RuntimeError(f"llama.cpp cannot load {self.mmproj_file}: {self._last_error()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        from llama_cpp import mtmd_cpp

        if self.mtmd:
            mtmd_cpp.mtmd_free(self.mtmd)
        if self.llama is not None:
            self.llama.close()
        self._silenced.__exit__(*exc)

    def _last_error(self, error: Exception | None = None) -> str:
        lines = [line.strip() for line in self.log if line.strip()]
        return lines[-1] if lines else str(error or "no message")

    def norm_epsilon(self) -> float | None:
        """The RMS-norm epsilon llama.cpp computes with, as its load log states it (None if it does not)."""
        for line in self.log:
            found = re.search(r"f_norm_rms_eps\s*=\s*([-+.0-9eE]+)", line)
            if found:
                return float(found.group(1))
        return None

    def tokenize(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode(), add_bos=False, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits after each of `ids`, from an empty context.  -> [len(ids), V]"""
        self.llama.reset()
        self.llama.eval(ids)
        return np.array(self.llama.scores[: len(ids)])

    def image_embedding(self, image) -> np.ndarray:
        """The mmproj file's output for `image`: one row per image token, the deepstack levels concatenated."""
        from llama_cpp import mtmd_cpp

        chunk, chunks, bitmap = self._image_chunk(image)
        try:
            if mtmd_cpp.mtmd_encode_chunk(self.mtmd, chunk) != 0:
                raise RuntimeError(f"llama.cpp could not encode the check image: {self._last_error()}")
            rows = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            width = self.llama_model_input_width()
            return np.ctypeslib.as_array(mtmd_cpp.mtmd_get_output_embd(self.mtmd), shape=(rows * width,)).reshape(
                rows, width).copy()
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    def llama_model_input_width(self) -> int:
        import llama_cpp

        return llama_cpp.llama_model_n_embd_inp(self.llama.model)

    def image_prompt_logits(self, prompt: Prompt) -> np.ndarray:
        """Logits after each token that follows the image, the prompt evaluated from an empty context."""
        start = self._eval_image_prompt(prompt)
        return np.array(self.llama.scores[start: start + len(prompt.after_image)])

    def greedy_answer(self, prompt: Prompt, eog: set[int]) -> list[int]:
        """Up to ANSWER_TOKENS greedy token ids after the image prompt, stopping at an end-of-generation token."""
        start = self._eval_image_prompt(prompt)
        answer: list[int] = []
        row = start + len(prompt.after_image) - 1
        while len(answer) < ANSWER_TOKENS:
            token = int(np.argmax(self.llama.scores[row]))
            if token in eog:
                break
            answer.append(token)
            self.llama.eval([token])
            row += 1
        return answer

    def _eval_image_prompt(self, prompt: Prompt) -> int:
        """Evaluates the ids before the image, the image (its M-RoPE positions advance by the larger side in
        tokens, not by the token count), then the ids after it; returns the row of scores of the first of those."""
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.llama.reset()
        self.llama.eval(prompt.before_image)
        chunk, chunks, bitmap = self._image_chunk(prompt.image)
        try:
            n_past = llama_cpp.llama_pos(0)
            status = mtmd_cpp.mtmd_helper_eval_chunk_single(
                self.mtmd, self.llama._ctx.ctx, chunk, llama_cpp.llama_pos(self.llama.n_tokens),
                llama_cpp.llama_seq_id(0), self.llama.n_batch, False, ctypes.byref(n_past))
            if status != 0:
                raise RuntimeError(f"llama.cpp could not evaluate the check image: {self._last_error()}")
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)
        self.llama.n_tokens = n_past.value  # Llama.eval places the next tokens at this position
        start = self.llama.n_tokens
        self.llama.eval(prompt.after_image)
        return start

    def _image_chunk(self, image):
        """(the image chunk, the chunk list holding it, the bitmap): mtmd's tokenization of a lone image marker."""
        from llama_cpp import mtmd_cpp

        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd_cpp.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
        text = mtmd_cpp.mtmd_input_text()
        marker = mtmd_cpp.mtmd_default_marker()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd_cpp.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise RuntimeError(f"llama.cpp could not preprocess the check image: {self._last_error()}")
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return chunk, chunks, bitmap
        raise RuntimeError("llama.cpp made no image chunk of the check image")


@contextlib.contextmanager
def llama_cpp_silenced(log: list[str] | None = None):
    """llama.cpp's and mtmd's log lines go to `log` (or nowhere) instead of stderr; llama-cpp-python's own
    callback is put back after."""
    import llama_cpp
    from llama_cpp import _logger, mtmd_cpp

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        if log is not None:
            log.append(text.decode("utf-8", errors="replace"))

    for setter in (llama_cpp.llama_log_set, mtmd_cpp.mtmd_log_set, mtmd_cpp.mtmd_helper_log_set):
        setter(keep, ctypes.c_void_p(0))
    try:
        yield
    finally:
        for setter in (llama_cpp.llama_log_set, mtmd_cpp.mtmd_log_set, mtmd_cpp.mtmd_helper_log_set):
            setter(_logger.llama_log_callback, ctypes.c_void_p(0))
