"""Stream activations at one or more sites over many prompts, batch by batch.

Only the selected token positions leave a hook, the forward pass is ended right after the deepest site
(no logits, no later blocks), and nothing is kept beyond the current batch: memory stays flat however many
prompts stream through.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ._hooks import eval_mode, restore_training, run_until
from .adapters import adapter_for
from .errors import ArgumentError
from .models import model_device
from .sites import Site, as_sites
from .tokens import (
    Positions,
    Prompt,
    PromptError,
    TokenizedPrompt,
    get_tokenizer,
    pad_batch,
    pad_id,
    select_positions,
    tokenize_prompts,
)

__all__ = ["CaptureBatch", "capture", "collect"]


@dataclass(frozen=True)
class CaptureBatch:
    """Activations of the selected tokens of one batch of prompts.

    Rows are ordered prompt by prompt, and by position within a prompt.

    Example:
        >>> import torch
        >>> b = CaptureBatch(acts={Site.resid_post(0): torch.zeros(3, 4)},
        ...                  prompt_index=torch.tensor([0, 0, 1]), position=torch.tensor([0, 1, 0]),
        ...                  token=torch.tensor([5, 6, 7]))
        >>> len(b), "3 tokens from 2 prompts" in b._repr_html_()
        (3, True)
    """

    acts: dict[Site, Float[Tensor, "n d"]]
    prompt_index: Int[Tensor, " n"]  # index into the caller's prompt list
    position: Int[Tensor, " n"]  # position in that prompt's own token ids
    token: Int[Tensor, " n"]  # token id at that position
    # each row's activation norm over the median norm of its prompt's tokens (up to its last
    # selected one) at that site: the outlier filter's measure (attention sinks reach 100x)
    norm_ratio: dict[Site, Float[Tensor, " n"]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.prompt_index.numel())

    def _repr_html_(self) -> str:
        from .views import capture_batch_html

        return capture_batch_html(self)


def plan_batches(
    lengths: Sequence[int], batch_size: int, *, sort_by_length: bool
) -> list[list[int]]:
    """Group prompt indices into batches; sorting by length keeps padding small.

    Sorted batches run longest first: the first batch is the largest, so a batch size that does not
    fit in memory fails at once rather than at the end of a long run, and the allocator can serve
    every later (smaller) batch from memory the earlier ones freed instead of growing the heap.

    Example:
        >>> plan_batches([3, 9, 5, 7], 2, sort_by_length=True)
        [[1, 3], [2, 0]]
    """
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be at least 1, got {batch_size}")
    order = (
        sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if sort_by_length
        else list(range(len(lengths)))
    )
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def capture(
    model: Any,
    prompts: Sequence[Prompt],
    sites: Site | str | Sequence[Site | str],
    *,
    positions: Positions = "all",
    batch_size: int = 8,
    include_bos: bool = False,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    padding_side: Literal["right", "left"] = "right",
    sort_by_length: bool = True,
    tokenized: Sequence[TokenizedPrompt] | None = None,
    progress: bool = True,
    desc: str = "capture",
) -> Iterator[CaptureBatch]:
    """Yield the activations of the selected tokens at ``sites``, one batch of prompts at a time.

    The stream keeps no reference to a batch it has yielded, so a consumer that drops each batch
    (``del b`` at the end of a loop body) holds one batch of activations at a time.

    Args:
        model: any model :func:`~modeldiff.load_model` returns (it carries its tokenizer).
        prompts: strings, chat message lists, ``(prompt, response)`` pairs or token ids.
        sites: one or several :class:`Site` (or hook names).
        positions: ``"all"``, ``"prompt"``, ``"response"``, ``"last_prompt"``, or one explicit
            selection per prompt (bool mask or index list). Pad tokens are never selected.
        include_bos: keep a leading BOS token in the selection (dropped by default: its activations
            are outliers that dominate means).
        prepend_bos: add BOS to plain-string prompts (default: the model's convention).
        truncate: cut prompts longer than the context window instead of raising.
        padding_side: ``"right"`` or ``"left"``; results do not depend on it.
        sort_by_length: batch prompts of similar length together, longest first (less padding,
            and the largest batch runs first); ``prompt_index`` still names each row's prompt.
        tokenized: already tokenized prompts (skips tokenization; ``prompts`` is then only counted).
        progress: show a progress bar.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> batches = list(capture(m, ["Hello world", "The fox"], Site.resid_post(1), progress=False))
        >>> sum(len(b) for b in batches) == sum(b.acts[Site.resid_post(1)].shape[0] for b in batches)
        True
    """
    site_list = as_sites(sites)  # type: ignore[arg-type]
    for s in site_list:
        s.validate(model)
    if tokenized is None:
        tokenized = tokenize_prompts(model, prompts, prepend_bos=prepend_bos, truncate=truncate)
    elif len(tokenized) == 0:
        raise PromptError("the prompt list is empty; pass at least one prompt")
    selections = select_positions(tokenized, positions, include_bos=include_bos)
    return _stream(
        model,
        tokenized,
        selections,
        site_list,
        batch_size,
        padding_side,
        sort_by_length,
        progress,
        desc,
    )


def _stream(
    model: Any,
    tokenized: Sequence[TokenizedPrompt],
    selections: Sequence[Sequence[int]],
    sites: list[Site],
    batch_size: int,
    padding_side: str,
    sort_by_length: bool,
    progress: bool,
    desc: str,
) -> Iterator[CaptureBatch]:
    device = model_device(model)
    pad = pad_id(get_tokenizer(model))
    # Prompts with nothing selected never need a forward pass.
    todo = [i for i, sel in enumerate(selections) if sel]
    batches = plan_batches(
        [len(tokenized[i]) for i in todo], batch_size, sort_by_length=sort_by_length
    )
    deepest = max(sites).hook_name
    # the bar counts selected tokens (what the caller gets), not batches: one batch of long
    # prompts is minutes of work, and "0/1 batch" shows nothing moving
    n_selected = [sum(len(selections[todo[j]]) for j in batch) for batch in batches]
    bar = tqdm(total=sum(n_selected), desc=desc, disable=not progress, unit="tok", unit_scale=True)
    in_training = eval_mode(model)
    try:
        for batch, n_batch in zip(batches, n_selected, strict=True):
            idx = [todo[j] for j in batch]
            seqs = [tokenized[i].ids for i in idx]
            toks, mask, offset = pad_batch(seqs, pad=pad, side=padding_side)
            rows = torch.cat([torch.full((len(selections[i]),), r) for r, i in enumerate(idx)])
            pos = torch.cat([torch.as_tensor(selections[i], dtype=torch.long) for i in idx])
            cols = pos + offset[rows]
            if padding_side == "right":
                # Causal attention: tokens after the last selected one cannot change it, so skip them.
                width = int(cols.max()) + 1
                toks, mask = toks[:, :width], mask[:, :width]
            # each row's tokens up to its own last selected one: the outlier filter's reference
            last = torch.zeros(len(idx), dtype=torch.long).scatter_reduce_(0, rows, cols, "amax")
            upto = mask.bool() & (torch.arange(mask.shape[1])[None] <= last[:, None])
            got: dict[Site, Tensor] = {}
            ratios: dict[Site, Tensor] = {}
            with torch.inference_mode():
                run_until(
                    model,
                    toks.to(device),
                    hooks=[
                        (s.hook_name, _grabber(got, ratios, s, rows, cols, upto)) for s in sites
                    ],
                    stop_at=deepest,
                    attention_mask=mask.to(device),
                )
            bar.update(n_batch)
            # pop: while suspended here the generator holds none of the batch's activations, so the
            # consumer alone decides when they are freed (before the next forward, if it drops them).
            yield CaptureBatch(
                acts={s: got.pop(s) for s in sites},
                prompt_index=torch.as_tensor(idx, dtype=torch.long)[rows],
                position=pos,
                token=toks[rows, cols],
                norm_ratio={s: ratios.pop(s) for s in sites},
            )
    finally:
        bar.close()
        restore_training(in_training)


def _grabber(
    got: dict[Site, Tensor],
    ratios: dict[Site, Tensor],
    site: Site,
    rows: Tensor,
    cols: Tensor,
    upto: Tensor,
) -> Any:
    def grab(x: Tensor, hook: Any) -> None:
        r, c = rows.to(x.device), cols.to(x.device)
        got[site] = x[r, c].detach()
        norms = x.detach().float().norm(dim=-1)
        median = norms.masked_fill(~upto.to(x.device), math.nan).nanmedian(dim=1).values
        ratios[site] = (norms[r, c] / median[r].clamp_min(1e-30)).cpu()

    return grab


def collect(
    model: Any,
    prompts: Sequence[Prompt],
    sites: Site | str | Sequence[Site | str],
    **kwargs: Any,
) -> dict[Site, list[Float[Tensor, "n_selected d"]]]:
    """Capture into memory: for each site, one ``[selected tokens, d]`` tensor per prompt, in prompt order.

    Convenient for a handful of prompts; use :func:`capture` to stream large sets.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> acts = collect(m, ["Hello world"], "blocks.0.hook_resid_post", progress=False)
        >>> acts[Site.resid_post(0)][0].shape[-1]
        64
    """
    site_list = as_sites(sites)  # type: ignore[arg-type]
    n = len(prompts) if not isinstance(prompts, str) else 1
    parts: dict[Site, list[list[Tensor]]] = {s: [[] for _ in range(n)] for s in site_list}
    for b in capture(model, prompts, site_list, **kwargs):
        for s in site_list:
            for p in b.prompt_index.unique().tolist():
                parts[s][p].append(b.acts[s][b.prompt_index == p])
    d_model = adapter_for(model).d_model
    d = {s: d_model for s in site_list}
    return {
        s: [torch.cat(chunks) if chunks else torch.empty(0, d[s]) for chunks in parts[s]]
        for s in site_list
    }
