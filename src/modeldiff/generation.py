"""Our own decoding loop: batched, seeded, correct on every model adapter.

Why not the wrappers' ``generate``? With transformer-lens 3.9 a TransformerBridge's KV-cache path gives
wrong tokens for rotary models (Llama, Qwen2, SmolLM2) and for left-padded batches, and no wrapper
tells interventions which tokens are prompt and which are generated. This loop

* tokenizes prompts with :mod:`modeldiff.tokens` (chat templates, one BOS convention) and left-pads
  each batch, passing the attention mask so padding changes nothing;
* decodes through the model's adapter (:meth:`~modeldiff.adapters.ModelAdapter.prefill` /
  :meth:`~modeldiff.adapters.ModelAdapter.step`): TransformerLens' KV cache on a HookedTransformer,
  transformers' own ``past_key_values`` cache on a native transformers model (both checked token for
  token against the uncached loop and transformers' ``generate``), and re-running the whole sequence
  each step on a TransformerBridge (no cache), which matches transformers exactly;
* publishes each forward's token positions (:func:`modeldiff.interventions.publish_positions`), so
  interventions with ``positions="prompt" | "generated"`` act on the right tokens at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._hooks import eval_mode, restore_training
from .adapters import adapter_for
from .errors import ModeldiffError
from .interventions import ForwardPositions, publish_positions
from .tokens import Prompt, pad_batch, pad_id, tokenize_prompts

__all__ = ["GenerationError", "generate", "generate_ids"]


class GenerationError(ModeldiffError, ValueError):
    """Generation settings that cannot work; the message names the fix.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> try:
        ...     generate(tiny_hooked_transformer(), "Hi", progress=False)
        ... except GenerationError as err:
        ...     print(err)
        prompts must be a list of prompts; wrap a single prompt or chat in a list: [prompt]
    """


def _eos_ids(model: Any) -> set[int]:
    return adapter_for(model).eos_ids()


def _pick(
    logits: Float[Tensor, "batch vocab"],
    temperature: float,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Int[Tensor, " batch"]:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(
    temperature: float, top_p: float | None, max_new_tokens: int, batch_size: int
) -> None:
    if not (
        isinstance(temperature, (int, float)) and temperature >= 0.0 and temperature < float("inf")
    ):
        raise GenerationError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
        )
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GenerationError(f"batch_size must be a positive integer, got {batch_size!r}")


def _resolve_cache(model: Any, use_cache: bool | None) -> bool:
    adapter = adapter_for(model)
    cached = adapter.supports_cache
    if use_cache is None:
        return cached
    if use_cache and not cached:
        why = (
            "its KV-cache path gives tokens that differ from transformers' generate (rotary "
            "models, left-padded batches) in transformer-lens 3.9"
            if adapter.name == "bridge"
            else "its adapter has no KV-cached decoding step"
        )
        raise GenerationError(
            f"use_cache=True is refused on this {adapter.name} model: {why}. Pass use_cache=None "
            "(decode without the cache, exact) or load the model with load_model(..., "
            "wrapper='native') for a fast cached loop."
        )
    return bool(use_cache)


def generate_ids(
    model: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    use_cache: bool | None = None,
    stop_at_eos: bool = True,
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> list[list[int]]:
    """Generated token ids for each prompt (the prompt itself not included).

    Same arguments as :func:`generate`. A row that stops at EOS ends with the EOS id, like
    transformers' ``generate``.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> ids = generate_ids(m, ["Hello world"], max_new_tokens=4, stop_at_eos=False, progress=False)
        >>> len(ids[0])
        4
    """
    from tqdm.auto import tqdm

    _check_args(temperature, top_p, max_new_tokens, batch_size)
    if isinstance(prompts, (str, bytes)) or (
        isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], dict)
    ):
        raise GenerationError(
            "prompts must be a list of prompts; wrap a single prompt or chat in a list: [prompt]"
        )
    cached = _resolve_cache(model, use_cache)
    tokenized = tokenize_prompts(model, list(prompts), prepend_bos=prepend_bos)
    adapter = adapter_for(model)
    n_ctx = adapter.n_ctx or 0
    longest = max((len(tp) for tp in tokenized), default=0)
    if n_ctx and longest + max_new_tokens > n_ctx:
        raise GenerationError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {n_ctx} tokens; shorten the prompt or lower max_new_tokens."
        )
    device = adapter.input_device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    eos = _eos_ids(model) if stop_at_eos else set()
    pad = pad_id(adapter.tokenizer)
    out: list[list[int]] = []
    in_training = eval_mode(model)
    # The bar counts finished answers; within a batch its postfix follows the decoding step and
    # the tokens generated so far, so a long batch still shows progress.
    bar = tqdm(total=len(tokenized), desc="generate", unit="answer", disable=not progress)
    generated = 0

    def on_step(step: int, n_new: int) -> None:
        nonlocal generated
        generated += n_new
        bar.set_postfix_str(f"token {step + 1}/{max_new_tokens}, {generated:,} tokens", False)
        bar.update(0)  # redraws at most every mininterval

    try:
        with torch.no_grad():
            for start in range(0, len(tokenized), batch_size):
                chunk = [list(tp.ids) for tp in tokenized[start : start + batch_size]]
                out.extend(
                    _decode_batch(
                        adapter,
                        chunk,
                        max_new_tokens,
                        temperature,
                        top_p,
                        generator,
                        eos,
                        pad,
                        cached,
                        device,
                        on_step=on_step if progress else None,
                    )
                )
                bar.update(len(chunk))
    finally:
        bar.close()
        restore_training(in_training)
    return out


def _decode_batch(
    adapter: Any,
    seqs: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    generator: torch.Generator | None,
    eos: set[int],
    pad: int,
    cached: bool,
    device: torch.device,
    on_step: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Decode one left-padded batch; ``on_step(step, n_new)`` after each step, ``n_new`` the
    rows that had not finished (the tokens generated in that step)."""
    toks, mask, _ = pad_batch(seqs, pad=pad, side="left", device=device)
    b = toks.shape[0]
    prompt_lengths = mask.sum(-1)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    new: list[Tensor] = []
    state = None

    def positions(m: Tensor) -> Tensor:
        return (m.cumsum(-1) - 1).masked_fill(m == 0, -1)

    # First forward: the whole left-padded prompt.
    with publish_positions(ForwardPositions(positions(mask), prompt_lengths)):
        if cached:
            logits, state = adapter.prefill(toks, mask)
        else:
            logits = adapter.logits(toks, mask)
    for step in range(max_new_tokens):
        nxt = _pick(logits[:, -1, :], temperature, top_p, generator)
        if on_step is not None:
            on_step(step, b - int(finished.sum()))
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        new.append(nxt)
        if eos_t.numel():
            finished |= torch.isin(nxt, eos_t)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        toks = torch.cat([toks, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if cached:
            fp = ForwardPositions(positions(mask)[:, -1:], prompt_lengths)
            with publish_positions(fp):
                logits = adapter.step(state, nxt[:, None], mask)
        else:
            with publish_positions(ForwardPositions(positions(mask), prompt_lengths)):
                logits = adapter.logits(toks, mask)
    gen = torch.stack(new, dim=1).tolist()
    result = []
    for row in gen:
        kept: list[int] = []
        for t in row:
            kept.append(int(t))
            if t in eos:
                break
        result.append(kept)
    return result


def generate(
    model: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    use_cache: bool | None = None,
    stop_at_eos: bool = True,
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> list[str]:
    """Continue each prompt and return the generated text, under whatever interventions are active.

    ``prompts`` are strings, chats (``[{"role": "user", "content": ...}]``, rendered with the chat
    template and the assistant generation prompt) or token ids. ``temperature=0`` is greedy;
    otherwise tokens are sampled (optionally nucleus ``top_p``) from a generator seeded by ``seed``.
    Batches of ``batch_size`` prompts are left-padded. ``use_cache=None`` decodes with a KV cache
    where the model's adapter has a trusted one (TransformerLens' on a HookedTransformer,
    transformers' on a native model) and without on a TransformerBridge (whose cache path is wrong
    for rotary models). Special tokens are dropped from the text; decoding stops at EOS when
    ``stop_at_eos``.

    Example:
        >>> import torch
        >>> from modeldiff import interventions
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> plain = generate(m, ["The capital of France"], max_new_tokens=5, progress=False)
        >>> d = torch.randn(64, generator=torch.Generator().manual_seed(0))
        >>> with interventions.steer(m, d, site="blocks.0.hook_resid_post",
        ...                          coefficient=50.0, positions="generated"):
        ...     steered = generate(m, ["The capital of France"], max_new_tokens=5, progress=False)
        >>> plain != steered
        True
    """
    ids = generate_ids(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        use_cache=use_cache,
        stop_at_eos=stop_at_eos,
        prepend_bos=prepend_bos,
        progress=progress,
    )
    tok = adapter_for(model).tokenizer
    eos = _eos_ids(model) if stop_at_eos else set()
    # the EOS that ended a row is not part of the text, even when it is not a "special" token
    return [
        tok.decode(row[:-1] if row and row[-1] in eos else row, skip_special_tokens=True)
        for row in ids
    ]
