"""Decoding: a preallocated KV cache, sampling, and the `lmforge sample` command.

Design
------
`KVCache` holds, per layer, K and V tensors of shape (B, kv_heads, max_len, head_dim) allocated
once, plus one position counter shared by the batch. The model writes each call's keys and values
(already rotated by RoPE) at [pos, pos + T) and attends over [0, pos + T); the model advances `pos`
after its last layer. Prefill is one forward over the whole prompt; each further token is a
forward of length 1, so a step costs O(context) instead of O(context^2).

`stream()` yields new token ids one at a time; `generate()` collects them. Sampling draws from its
own `torch.Generator` seeded by `seed`, never from the global RNG, so a sample is a pure function
of (weights, prompt, settings, seed). temperature 0 is greedy (argmax) and ignores top_k/top_p.
Every temperature > 0 and top_p in (0, 1] is usable, however small: `pick_token` shifts the
logits so the best is 0 and divides in float64 (a tiny temperature approaches greedy instead of
overflowing into NaN), and top_p always keeps the best token. A seed is a 64-bit signed integer
(OpenAI's `seed`); the i-th of several samples uses `nth_seed(seed, i)` (seed + i, wrapped).

Context policy (the choice the model's fixed max_seq_len forces):
- a prompt longer than max_seq_len keeps its LAST max_seq_len tokens (the text nearest the
  continuation matters most; raising would make long chat histories unusable);
- when the cache is full, the window slides: the cache is reset and re-filled with the last
  max_seq_len // 2 tokens, then decoding continues. Generation length is therefore unbounded; each
  slide costs one prefill of half a window, amortised over the next half window of tokens.
A stop id ends the stream and is not yielded.

Trade-off: one sequence at a time. `num_samples > 1` runs the samples one after another (seeds
seed, seed + 1, ...); batched decoding with per-sequence positions belongs to the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .aot import AotDecode, supported
from .artifacts import Loaded, load_model
from .config import ModelConfig
from .errors import LmforgeError
from .model import Transformer, compile_blocks, is_compiled, run_compiled
from .quant import check_weights, prepare, row_major
from .ranges import INT64_MAX, INT64_MIN, MAX_TOKENS, SEED, TEMPERATURE, TOP_K, TOP_P
from .threads import Governor, govern
from .tokenizer import StreamDecoder, lone_surrogate
from .util import compile_failed, console

SEED_MIN, SEED_MAX = INT64_MIN, INT64_MAX  # a seed is a 64-bit signed integer, as OpenAI's `seed`


class KVCache:
    """Per-layer K/V buffers (B, kv_heads, max_len, head_dim) and the number of cached positions
    (a `model.KVCacheLike`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int = 1,
        *,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.pos = 0  # positions 0 .. pos-1 are filled in every layer

    @classmethod
    def for_model(cls, model: Transformer, batch_size: int = 1, max_len: int | None = None) -> "KVCache":
        p = model.model.embed_tokens.weight  # fp32 also when the projections are int8 (lmforge/quant.py)
        return cls(model.cfg, batch_size, max_len=max_len, dtype=p.dtype, device=p.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv, T, hd) at [pos, pos + T); return views of [0, pos + T)."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise LmforgeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called by the model once every layer has written its n new positions."""
        self.pos += n

    def reset(self) -> None:
        self.pos = 0  # stale entries beyond pos are never read


# ---- sampling --------------------------------------------------------------------------------


def pick_token(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> int:
    """One token id from logits (V,): argmax at temperature 0, else sample the filtered softmax.

    Any temperature > 0 and top_p in (0, 1] work, however small: the logits are shifted so the
    best is 0 and scaled in float64, so logits / temperature never overflows into inf - inf = NaN
    (the best token stays at 0, the others go towards -inf: a tiny temperature samples among the
    tokens tied for best), and the best token always survives top_p.
    """
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = (logits.double() - logits.max()) / temperature  # (V,) <= 0, the best at 0
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the first always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop_sorted[0] = False
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(temperature: float, top_k: int, top_p: float, seed: int | None = None) -> None:
    """LmforgeError naming the first sampling setting out of range (for `sample` and the server; the
    rules are ranges.py's, which `sample`'s flags also use)."""
    TEMPERATURE.check("temperature", temperature)
    TOP_K.check("top_k", min(top_k, INT64_MAX))  # any top_k >= the vocabulary is "off", however large (an API client's 1e30)
    TOP_P.check("top_p", top_p)
    if seed is not None:
        SEED.check("seed", seed)


def nth_seed(seed: int, i: int) -> int:
    """The seed of the i-th of several samples (`sample --num-samples`, the server's `n`): seed + i,
    wrapped around within the 64-bit signed range so every sample's seed is a valid one."""
    return (seed + i - SEED_MIN) % 2**64 + SEED_MIN


def _check(max_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None = None) -> None:
    MAX_TOKENS.check("max_tokens", max_tokens)
    check_sampling(temperature, top_k, top_p, seed)


@torch.no_grad()
def stream(
    model: Transformer,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    governor: Governor | None = None,
) -> Iterator[int]:
    """Yield up to max_tokens new token ids after prompt_ids (see the module doc for the policy).
    governor: told each token's time (lmforge/threads.py: fewer threads while the machine is busy)."""
    _check(max_tokens, temperature, top_k, top_p, seed)
    if len(prompt_ids) == 0:
        raise LmforgeError("the prompt is empty; pass at least one token id (e.g. the BOS id)")
    vocab, window = model.cfg.vocab_size, model.cfg.max_seq_len
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise LmforgeError(f"prompt token ids must be within 0..{vocab - 1}")
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # fresh entropy, still not the global RNG
    else:
        generator.manual_seed(seed)
    stop = set(stop_ids)
    keep = max(1, window // 2)

    def prefill(ids: list[int]) -> torch.Tensor:
        cache.reset()
        hidden = model(torch.tensor([ids], device=device), cache=cache, hidden=True)  # (1, T, C)
        return model.lm_head(hidden[0, -1:])[0]  # (V,): only the last position's logits are read

    context = list(prompt_ids)[-window:]
    # Only as many positions as this call can fill (a model's window may be 8192 positions: a cache
    # of that size is ~0.4 GB to allocate per call for a 135M model); a full window slides.
    cache = KVCache.for_model(model, max_len=min(window, len(context) + max_tokens))
    logits = prefill(context)
    start = 0.0
    for n in range(max_tokens):
        token = pick_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if governor is not None and n > 0:  # a decode step's time (the prefill is another kind of step)
            governor.step(time.perf_counter() - start)
        if token in stop:
            return
        yield token
        if n == max_tokens - 1:
            return  # no forward for a token nobody will read
        start = time.perf_counter()  # the caller's time with the token is not the model's
        context.append(token)
        if cache.pos == window:  # full: slide to the last half window
            context = context[-keep:]
            logits = prefill(context)
        else:
            logits = decode_step(model, torch.tensor([[token]], device=device),
                                 torch.tensor([[cache.pos]], device=device), cache.k, cache.v)[0]
            cache.advance(1)


def decode_step(model: Transformer, idx: torch.Tensor, positions: torch.Tensor, k: Sequence[torch.Tensor],
                v: Sequence[torch.Tensor]) -> torch.Tensor:
    """`Transformer.decode` (the one decode step of `stream` and the server's engine): idx (B, 1),
    positions (B, 1) -> logits (B, V). On a model whose decode step is compiled
    (`compile_decode`), a first step that cannot be compiled warns once and decodes eagerly."""
    aot = model.aot_decode
    if aot is not None:
        # one row past position 0 (the exported step's lengths start at 2): the step compiled ahead of time
        if idx.shape[0] == 1 and int(positions) > 0 and aot.ready(model):
            return model.decode(idx, positions, k, v, masked=aot)
        if not is_compiled(model, "decode"):  # a step it does not take: the per-block graphs, compiled now
            compile_blocks(model, "decode")
    return run_compiled(model, "decode", lambda: model.decode(idx, positions, k, v), compile_failed("decoding"))


def compile_decode(model: Transformer) -> None:
    """`--compile` of the verbs that decode, with fp32 weights row-major (what the compiled one-row
    products read fastest, `model.linear`): where lmforge/aot.py supports the model, a step of
    one row (a single stream) compiled ahead of time as one library, which runs no Python per
    block (~2x the tokens/s of eager fp32 decoding for one stream on a CPU; ~1 min to compile the
    first time for a model shape on a machine, then cached on disk); every other step (several
    rows, or a model it does not support) through every block's decode step, and the final norm
    and head, compiled by torch.compile (`model.compile_blocks`; 3-15 s at its first step)
    (docs/inference.md "Compiled decoding")."""
    row_major(model)
    if supported(model):
        # the per-block graphs wait for a step the ahead-of-time one does not take (`decode_step`):
        # a single stream never imports torch.compile's machinery (~1 s a process)
        model.aot_decode = AotDecode()
    else:
        compile_blocks(model, "decode")


def compile_wait(model: Transformer) -> str:
    """How much longer the first token of a model just given to `compile_decode` takes, in words
    (what `sample` and `ask` print before it)."""
    aot = model.aot_decode
    if aot is not None and not aot.cached(model):
        return "~1 min more (compiling ahead of time, once per model shape and machine)"
    return "a few seconds more"


def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    governor: Governor | None = None,
) -> list[int]:
    """The new token ids (not the prompt) that `stream` yields."""
    return list(
        stream(
            model,
            prompt_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_ids=stop_ids,
            governor=governor,
        )
    )


def load_for_decoding(path: str | Path, quantize: str | None = None, *, compile: bool = False) -> Loaded:
    """`artifacts.load_model` for the verbs that decode (sample, serve, eval's generation tasks):
    weights held as `quantize` (None: as stored; fp32 weights laid out for decoding, lmforge/quant.py);
    compile: the decode step compiled (`compile_decode`)."""
    loaded = load_model(path, quantize=quantize)
    if not hasattr(loaded.model, "weights"):  # stored fp32, nothing asked: the decoding layout
        prepare(loaded.model, "fp32", compiled=compile)
    if compile:
        compile_decode(loaded.model)
    return loaded


def decode_compiled(model: Transformer) -> bool:
    """Whether `compile_decode` is in effect (the per-block graphs, or the step compiled ahead of
    time that sets them up when a step needs them)."""
    return is_compiled(model, "decode") or model.aot_decode is not None


# ---- the CLI verb ----------------------------------------------------------------------------


def sample_command(
    path: str | Path,
    *,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    num_samples: int,
    threads: int | None = None,
    quantize: str | None = None,
    compile: bool = False,
) -> int:
    """`lmforge sample`: print prompt + continuation (streamed) for each of num_samples samples."""
    if num_samples < 1:
        raise LmforgeError(f"--num-samples must be >= 1, got {num_samples}")
    _check(max_tokens, temperature, top_k, top_p, seed)
    if lone_surrogate(prompt) is not None:  # bytes that were not UTF-8 in argv arrive as lone surrogates
        raise LmforgeError("--prompt is not valid UTF-8 text; pass it as UTF-8")
    if quantize is not None:
        check_weights(quantize)
    governor = govern(threads)
    loaded = load_for_decoding(path, quantize, compile=compile)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:  # nothing to condition on: start from a document boundary
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise LmforgeError("empty prompt and the tokenizer has no BOS/EOS token; pass --prompt")
        ids = [start]
    stop = list(tokenizer.end_ids)  # EOS, and an instruct model's recorded end of turn
    print(f"# {path} ({loaded.origin.describe()})", flush=True)
    if compile:  # the first token waits for it: say why
        console.print(f"compiling the decode step (--compile): the first token takes {compile_wait(loaded.model)}",
                      markup=False)
    for i in range(num_samples):
        if num_samples > 1:
            print(f"\n----- sample {i + 1}/{num_samples} (seed {nth_seed(seed, i)}) -----", flush=True)
        print(prompt, end="", flush=True)
        decoder = StreamDecoder(tokenizer)  # a token may end inside a UTF-8 character: held back until whole
        for token in stream(
            model,
            ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=nth_seed(seed, i),
            stop_ids=stop,
            governor=governor,
        ):
            if text := decoder.push(token):
                print(text, end="", flush=True)
        print(decoder.flush(), flush=True)
    return 0


__all__ = ["KVCache", "pick_token", "check_sampling", "nth_seed", "SEED_MIN", "SEED_MAX", "stream", "generate",
           "decode_step", "compile_decode", "load_for_decoding", "sample_command"]
