"""The `static` backend: decoding on a static KV cache. The prompt rows are prefilled once (`backend.prefill`), their
cache copied into a preallocated [rows, kv_heads, cache_length, head_dim] cache, then one token per step for every
row, with the sampling rule applied on the device (no host sync per token; all-finished is checked every few
tokens) and the log-prob of each drawn token kept (temperature applied, before top-k/top-p).

`StaticBackend` keeps the caches and the one-token step across a run. Cache lengths are bucketed (the prompt width
rounded up, plus max_new_tokens) and only grow, so a new prompt reuses the step built for the last one. With
`compile` (CUDA only by default; unmeasured there in this version) the step is torch.compile'd once per shape,
mode reduce-overhead (CUDA graphs), and `compiles` counts every graph the compiler builds.
The sampling rule is `Settings`'s, with the semantics transformers' generate gives it (processor order and
tie rules of its RepetitionPenalty, MinNewTokens, SuppressTokens, Temperature, TopK and TopP processors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlora_rft.model import SpecialTokens, base_model
from qlora_rft.sampling.backend import Decoded, FiniteLogits, Prefix, Settings, prefill

CHECK_EVERY = 8  # tokens between the host's looks at "has every row finished?"


# ----------------------------------------------------------------------------- the sampling rule (pure)


def filter_logits(logits: torch.Tensor, banned: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, do_sample: bool = True) -> torch.Tensor:
    """Scores to sample from: banned ids (vision placeholders; EOS before the minimum length) at -inf, then for
    sampling the temperature, top-k (ties with the k-th kept) and top-p (the smallest high-probability set whose
    mass exceeds top_p; at least one token).  [B, V] -> [B, V] fp32

    >>> filter_logits(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), torch.tensor([False, False, False, True]), top_k=2)
    tensor([[-inf, 3., 2., -inf]])
    """
    scores = logits.float().masked_fill(banned, -math.inf)
    if not do_sample:
        return scores
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p  # the low tail whose mass stays within 1 - top_p
        drop[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return scores


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty on the ids a row holds already (prompt, padding and completion so far, as generate
    counts them): a score below 0 times `penalty`, any other divided by it.  [B, V], [B, V] bool -> [B, V]

    >>> penalize(torch.tensor([[2.0, -2.0, 2.0]]), torch.tensor([[True, True, False]]), 2.0)
    tensor([[ 1., -4.,  2.]])
    """
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def draw(scores: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """One token per row: the argmax for greedy (noise None), else a sample from softmax(scores) by the
    exponential race: argmax(p / q) with q ~ Exp(1) picks i with probability p_i, without a host sync.  -> [B]

    >>> draw(torch.tensor([[0.0, 2.0, 1.0]]), None)
    tensor([1])
    >>> draw(torch.tensor([[0.0, -math.inf, 0.0]]), torch.tensor([[1.0, 1e-9, 2.0]]))  # a banned id never wins
    tensor([0])
    """
    if noise is None:
        return scores.argmax(-1)
    return (scores.softmax(-1) / noise).argmax(-1)


def banned_ids(vocab: int, suppress: list[int], eos: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[V] bool masks: what is never sampled, and that plus EOS (before min_new_tokens)."""
    never = torch.zeros(vocab, dtype=torch.bool, device=device)
    never[[t for t in suppress if t < vocab]] = True
    early = never.clone()
    early[[t for t in eos if t < vocab]] = True
    return never, early


# ----------------------------------------------------------------------------- the decoder


def bucket_length(width: int, max_new_tokens: int, bucket: int) -> int:
    """Cache length for a prompt `width` tokens wide: the width rounded up to `bucket`, plus the completion.

    >>> bucket_length(300, 256, 256), bucket_length(512, 256, 256), bucket_length(513, 256, 256)
    (768, 768, 1024)
    """
    return -(-width // bucket) * bucket + max_new_tokens


@dataclass
class Slot:
    """The cache and input buffers of one batch size, reused by every call with at most `length` positions."""

    cache: object  # transformers StaticCache
    length: int
    mask: torch.Tensor  # [B, length] bool: which cache positions hold real tokens (left padding excluded)
    step: object  # (token [B, 1], position [3, B, 1], mask) -> logits [B, V]


class StaticBackend:
    """Static-cache decoding for a run: one Slot per batch size, rebuilt only for a longer bucket.

    builds: how many times a step was built for a new shape (batch size, or a longer cache bucket);
    compiles: how many graphs torch.compile built (0 when eager); both only grow when shapes are new.
    `compiler`: torch.compile's backend when compiling (inductor; "eager" for dynamo's tracing alone, in tests).
    """

    def __init__(self, compile: bool = False, bucket: int = 256, compiler: str = "inductor", reason: str = ""):
        self.compile, self.bucket, self.compiler, self.reason = compile, bucket, compiler, reason
        self.builds = 0
        self.compiles = 0
        self._slots: dict[int, Slot] = {}

    @property
    def name(self) -> str:
        return "static, compiled" if self.compile else "static"

    @property
    def keeps_weights(self) -> bool:
        return self.compile  # CUDA graphs read the sampling copy where it was when they were captured

    def counters(self) -> dict:
        return {"decode_builds": self.builds, "decode_compiles": self.compiles}

    @torch.no_grad()
    def decode(self, model, batch: dict, repeat: int, settings: Settings, tokens: SpecialTokens,
               finite: FiniteLogits | None, generator: torch.Generator | None = None,
               prefix: Prefix | None = None) -> Decoded:
        """Completions of the k rows of `batch`, each `repeat` times, continuing one prefill of the rows (all
        their tokens but the last; `prefix` when given, only read). `finite`: a row whose logits are NaN or +inf
        ends with EOS, and it records that. -> [k * repeat, t] ids, t <= max_new_tokens (pad after a row's EOS;
        trimmed after the last EOS), and with sampling each drawn token's log-prob (0 after a row's end)."""
        base = base_model(model)
        prefix = prefix if prefix is not None else prefill(model, batch)
        mask = batch["attention_mask"]  # [k, W]
        device = mask.device
        rows, width = mask.shape[0] * repeat, mask.shape[1]
        slot = self._slot(base, rows, bucket_length(width, settings.max_new_tokens, self.bucket), prefix)
        _load_prefix(slot, prefix, mask, repeat)
        position = (mask.sum(-1, keepdim=True) - 1 + prefix.rope_deltas.to(device)).repeat_interleave(repeat, 0)
        token = batch["input_ids"][:, -1].repeat_interleave(repeat).view(rows, 1)  # [B, 1]: the last prompt tokens
        vocab = base.lm_head.weight.shape[0]
        never, early = banned_ids(vocab, tokens.vision, tokens.eos, device)
        eos = torch.tensor(tokens.eos, device=device)
        out = torch.full((rows, settings.max_new_tokens), tokens.pad, dtype=torch.long, device=device)
        logp = torch.zeros(rows, settings.max_new_tokens, device=device) if settings.do_sample else None
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        seen = None  # [B, V] bool: the ids each row holds, for the repetition penalty
        if settings.repetition_penalty != 1.0:
            seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
            seen.scatter_(1, batch["input_ids"].repeat_interleave(repeat, 0).clamp(max=vocab - 1), True)
        compiled = self.compile and device.type == "cuda"
        for t in range(settings.max_new_tokens):
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            logits = slot.step(token, position.view(1, rows, 1).expand(3, rows, 1), slot.mask)  # [B, V]
            penalized = penalize(logits, seen, settings.repetition_penalty) if seen is not None else logits
            scores = filter_logits(penalized, early if t < settings.min_new_tokens else never, settings.temperature,
                                   settings.top_k, settings.top_p, settings.do_sample)
            if finite is not None:
                scores = finite(None, scores)
            noise = (torch.empty_like(scores).exponential_(generator=generator) if settings.do_sample else None)
            new = torch.where(finished, tokens.pad, draw(scores, noise))  # [B]
            out[:, t] = new
            if logp is not None:  # under the full tempered softmax, as grpo.token_logprobs scores it
                drawn = torch.log_softmax(logits / settings.temperature, -1).gather(-1, new[:, None])[:, 0]  # [B]
                logp[:, t] = torch.where(finished, 0.0, drawn)
            finished |= torch.isin(new, eos)
            if seen is not None:
                seen.scatter_(1, new[:, None], True)
            token, position = new.view(rows, 1), position + 1
            if (t + 1) % CHECK_EVERY == 0 and bool(finished.all()):  # the only host sync, every few tokens
                break
        used = _used_columns(out, eos)
        return Decoded(out[:, :used], logp[:, :used] if logp is not None else None)

    def _slot(self, base, rows: int, length: int, prefix) -> Slot:
        slot = self._slots.get(rows)
        if slot is None or slot.length < length:
            slot = self._slots[rows] = self._build(base, rows, length, prefix)
        return slot

    def _build(self, base, rows: int, length: int, prefix) -> Slot:
        from transformers import StaticCache

        keys = prefix.cache.layers[0].keys  # [k, kv_heads, W - 1, head_dim]
        cache = StaticCache(config=base.config, max_cache_len=length)
        cache.early_initialization(rows, keys.shape[1], keys.shape[3], keys.dtype, keys.device)
        mask = torch.ones(rows, length, dtype=torch.bool, device=keys.device)
        torch._dynamo.mark_static_address(mask)  # refilled in place: CUDA graphs read it where it is
        language_model, head = base.model.language_model, base.lm_head

        def step(token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden = language_model(input_ids=token, position_ids=position, attention_mask=mask,
                                    past_key_values=cache, use_cache=True).last_hidden_state  # [B, 1, H]
            return head(hidden[:, -1]).float()  # [B, V]

        self.builds += 1
        if self.compile:
            step = torch.compile(step, backend=self._counting_backend(), fullgraph=True, dynamic=False)
        return Slot(cache, length, mask, step)

    def _counting_backend(self):
        """The compiler backend, counting each graph it is asked to build (a recompile is one more). inductor is
        what torch.compile(mode="reduce-overhead") runs: generated kernels replayed as CUDA graphs."""
        if self.compiler == "inductor":
            inner = torch._TorchCompileInductorWrapper("reduce-overhead", None, False)
        else:  # e.g. "eager": dynamo's tracing and guards alone (the CPU tests)
            inner = torch._dynamo.lookup_backend(self.compiler)

        def backend(gm, inputs):
            self.compiles += 1
            return inner(gm, inputs)

        return backend


def _load_prefix(slot: Slot, prefix, mask: torch.Tensor, repeat: int) -> None:
    """The prefill's keys and values (k rows, W - 1 positions) into the slot's cache, each row `repeat` times;
    the slot's mask: the rows' own padding over the prompt, every later position real."""
    width = mask.shape[1]
    for static, dynamic in zip(slot.cache.layers, prefix.cache.layers):
        static.keys[:, :, : width - 1].copy_(dynamic.keys.repeat_interleave(repeat, 0))
        static.values[:, :, : width - 1].copy_(dynamic.values.repeat_interleave(repeat, 0))
        static.cumulative_length.fill_(width - 1)
    slot.mask.fill_(True)
    slot.mask[:, :width].copy_(mask.bool().repeat_interleave(repeat, 0))


def _used_columns(out: torch.Tensor, eos: torch.Tensor) -> int:
    """Columns up to the step where the last row finished (generate stops there), else all of them."""
    ended = torch.isin(out, eos)  # [B, T]
    if not bool(ended.any(-1).all()):
        return out.shape[1]
    return int(ended.float().argmax(-1).max()) + 1  # first EOS of each row
