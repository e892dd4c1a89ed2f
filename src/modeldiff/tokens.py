"""Prompts to token ids, one convention for every model of an experiment.

modeldiff tokenizes prompts itself and hands token tensors to the model, so a wrapper never adds a BOS
of its own: the base and the fine-tuned model of a diff see identical ids.

A prompt is one of

* a plain string;
* a chat: a list of ``{"role": ..., "content": ...}`` messages, rendered with the tokenizer's chat
  template and the assistant generation prompt;
* a ``(prompt, response)`` pair, ``prompt`` being a string or a chat and ``response`` a string. The
  response is tokenized on its own and appended, exactly as if the model had generated it;
* token ids already (a list of ints or a 1-D integer tensor), used as they are.

BOS: plain strings get the tokenizer's BOS token when ``prepend_bos`` is true (default: the model's
``cfg.default_prepend_bos``, the convention sae-lens SAEs are usually trained with). Chats get exactly
what their template writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from jaxtyping import Int
from torch import Tensor

from . import models
from .errors import ArgumentError, ModeldiffError

__all__ = [
    "Positions",
    "Prompt",
    "PromptError",
    "TokenizedPrompt",
    "pad_batch",
    "render_chat",
    "select_positions",
    "tokenize_prompts",
]

Chat = Sequence[Mapping[str, str]]
Prompt = Union[str, Chat, tuple[str | Chat, str], Sequence[int], Tensor]
# "all" | "prompt" | "response" | "last_prompt", or one explicit selection per prompt: a bool mask
# over that prompt's tokens or a list of token indices.
Positions = Union[str, Sequence[Sequence[int] | Sequence[bool] | Tensor]]
POSITION_NAMES = ("all", "prompt", "response", "last_prompt", "user", "assistant")


class PromptError(ModeldiffError, ValueError):
    """A prompt that cannot be tokenized as asked."""


@dataclass(frozen=True)
class TokenizedPrompt:
    """Token ids of one prompt; ``ids[:n_prompt]`` are prompt tokens, the rest response tokens.

    ``user`` and ``assistant`` are the positions of the *content* of the user turns and of the
    assistant turns (the response included): no chat-template tokens, no system prompt a template
    inserts by itself. For a plain-string prompt the whole prompt (BOS excluded) is the user's.
    ``None`` when they could not be located (a slow tokenizer without offsets).

    Example:
        >>> from modeldiff.testing import make_tokenizer
        >>> tok = make_tokenizer()
        >>> [tp] = tokenize_prompts(tok, [("Hello", " world")], prepend_bos=True)
        >>> tp.has_bos, tok.decode(tp.ids[: tp.n_prompt]), tok.decode(tp.ids[tp.n_prompt :])
        (True, '<s>Hello', ' world')
        >>> tp.user, tp.assistant  # positions of "Hello" and of " world"
        ((1,), (2,))
    """

    ids: tuple[int, ...]
    n_prompt: int
    has_bos: bool
    user: tuple[int, ...] | None = field(default=None, compare=False)
    assistant: tuple[int, ...] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.ids)


def get_tokenizer(model_or_tokenizer: Any) -> Any:
    """The transformers tokenizer of a model, or the tokenizer itself when given one."""
    if _is_model(model_or_tokenizer):
        return models.get_tokenizer(model_or_tokenizer)
    if callable(getattr(model_or_tokenizer, "encode", None)):
        return model_or_tokenizer
    return models.get_tokenizer(model_or_tokenizer)


def _is_model(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) or hasattr(obj, "cfg")


def _is_chat(x: Any) -> bool:
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and len(x) > 0
        and all(isinstance(m, Mapping) for m in x)
    )


def _is_ids(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.ndim == 1 and not x.is_floating_point()
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and len(x) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    )


#: Roles a chat message may have.
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def render_chat(tokenizer: Any, messages: Chat, *, add_generation_prompt: bool = True) -> str:
    """Render chat ``messages`` with the tokenizer's chat template, as text.

    Example:
        >>> from modeldiff.testing import make_tokenizer
        >>> render_chat(make_tokenizer(), [{"role": "user", "content": "Hi"}])
        '<s>user\\nHi</s>\\n<s>assistant\\n'
    """
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            "chat prompts need a chat template, and this tokenizer has none. Pass plain strings, or set "
            "tokenizer.chat_template to a Jinja template for this model."
        )
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise PromptError(f"chat message {i} needs 'role' and 'content' keys, got {sorted(m)}")
        if m["role"] not in CHAT_ROLES:
            raise PromptError(
                f"chat message {i} has role {m['role']!r}; use one of {', '.join(CHAT_ROLES)} "
                "(a misspelt role would be rendered as an unknown speaker)"
            )
        if not isinstance(m["content"], str):
            raise PromptError(
                f"chat message {i} ({m['role']}) has content of type {type(m['content']).__name__}; "
                "content must be a string (use '' for an empty turn)"
            )
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _default_prepend_bos(model_or_tokenizer: Any) -> bool:
    if not _is_model(model_or_tokenizer):
        return False
    from .adapters import adapter_for

    return adapter_for(model_or_tokenizer).default_prepend_bos


def _describe(prompt: Any) -> str:
    text = repr(prompt)
    return text if len(text) <= 60 else text[:57] + "..."


def tokenize_prompts(
    model_or_tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    prepend_bos: bool | None = None,
    max_length: int | None = None,
    truncate: bool = False,
) -> list[TokenizedPrompt]:
    """Tokenize ``prompts`` with the model's tokenizer under modeldiff's one convention.

    ``max_length`` defaults to the model's context window (``cfg.n_ctx``). A longer prompt is an
    error naming it, unless ``truncate=True`` keeps its first ``max_length`` tokens.

    Example:
        >>> from modeldiff.testing import make_tokenizer
        >>> tok = make_tokenizer()
        >>> [tp] = tokenize_prompts(tok, [("Hello", " world")], prepend_bos=True)
        >>> tp.has_bos, tp.n_prompt < len(tp)
        (True, True)
    """
    if isinstance(prompts, (str, Tensor)) or _is_chat(prompts):
        prompts = [prompts]  # type: ignore[list-item]
    if len(prompts) == 0:
        raise PromptError("the prompt list is empty; pass at least one prompt")
    tok = get_tokenizer(model_or_tokenizer)
    if prepend_bos is None:
        prepend_bos = _default_prepend_bos(model_or_tokenizer)
    if max_length is None and _is_model(model_or_tokenizer):
        from .adapters import adapter_for

        max_length = adapter_for(model_or_tokenizer).n_ctx
    bos = tok.bos_token_id
    n_vocab = len(tok)
    if _is_model(model_or_tokenizer):
        from .adapters import adapter_for

        n_vocab = adapter_for(model_or_tokenizer).d_vocab

    out: list[TokenizedPrompt] = []
    for i, prompt in enumerate(prompts):
        response: str | None = None
        if isinstance(prompt, tuple):
            if len(prompt) != 2 or not isinstance(prompt[1], str):
                raise PromptError(
                    f"prompt {i} is a tuple but not a (prompt, response-string) pair: {_describe(prompt)}"
                )
            prompt, response = prompt
        if _is_ids(prompt):
            ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, Tensor) else prompt)]
            bad = [t for t in ids if not 0 <= t < n_vocab]
            if bad:
                raise PromptError(
                    f"prompt {i} holds token ids outside the vocabulary (0..{n_vocab - 1}): "
                    f"{bad[:5]}; token ids must come from this model's tokenizer."
                )
            prompt_text = None
            spans: dict[str, list[int]] | None = None
        elif _is_chat(prompt):
            prompt_text = render_chat(tok, prompt)  # type: ignore[arg-type]
            ids, spans = _encode_chat(tok, prompt, prompt_text)  # type: ignore[arg-type]
        elif isinstance(prompt, str):
            prompt_text = prompt
            ids = _encode(tok, prompt)
            if prepend_bos:
                if bos is None:
                    raise PromptError(
                        "prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False"
                    )
                ids = [bos, *ids]
            spans = {"user": list(range(1 if prepend_bos else 0, len(ids))), "assistant": []}
        else:
            raise PromptError(
                f"prompt {i} is neither a string, a chat message list, a (prompt, response) pair nor "
                f"token ids: {_describe(prompt)}"
            )
        n_prompt = len(ids)
        if response is not None:
            if prompt_text is not None and _is_chat(prompt):
                # The assistant turn as the template writes it (end-of-turn markers included).
                full = tok.apply_chat_template(
                    [*map(dict, prompt), {"role": "assistant", "content": response}],  # type: ignore[arg-type]
                    tokenize=False,
                )
                if full.startswith(prompt_text):
                    turn = full[len(prompt_text) :]
                    if spans is not None:
                        start = turn.find(response) if response else -1
                        extra = (
                            _tokens_in(tok, turn, [(start, start + len(response))])
                            if start >= 0
                            else None
                        )
                        if extra is None:
                            spans = None
                        else:
                            spans["assistant"] += [len(ids) + j for j in extra[1]]
                    response = turn
                    ids = ids + list(tok(turn, add_special_tokens=False)["input_ids"])
                else:
                    spans = None
                    ids = ids + _encode(tok, response)
            else:
                if spans is not None:
                    spans["assistant"] = list(
                        range(len(ids), len(ids) + len(_encode(tok, response)))
                    )
                ids = ids + _encode(tok, response)
        if not ids:
            raise PromptError(f"prompt {i} is empty after tokenization: {_describe(prompt)}")
        if max_length is not None and len(ids) > max_length:
            if not truncate:
                raise PromptError(
                    f"prompt {i} has {len(ids)} tokens, more than the model's context window of "
                    f"{max_length}: {_describe(prompt)}. Shorten it, or pass truncate=True to keep the "
                    f"first {max_length} tokens."
                )
            ids = ids[:max_length]
            n_prompt = min(n_prompt, max_length)
        kept = (
            None
            if spans is None
            else {k: tuple(j for j in v if j < len(ids)) for k, v in spans.items()}
        )
        out.append(
            TokenizedPrompt(
                tuple(ids),
                n_prompt,
                bos is not None and ids[0] == bos,
                user=None if kept is None else kept["user"],
                assistant=None if kept is None else kept["assistant"],
            )
        )
    return out


_MARK = "\ue000{}\ue001"  # private-use characters: no template or tokenizer treats them specially


def _encode_chat(
    tok: Any, messages: Chat, text: str
) -> tuple[list[int], dict[str, list[int]] | None]:
    """Token ids of a rendered chat and the positions of each user / assistant turn's content.

    The template is rendered once more with every content replaced by a marker, which shows the
    template text around each content; walking the real rendering with those pieces gives each
    content's characters, and the tokenizer's offsets give its tokens (those lying wholly inside).
    """
    ids = _encode(tok, text)
    try:
        marked = tok.apply_chat_template(
            [{**dict(m), "content": _MARK.format(i)} for i, m in enumerate(messages)],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # a template that inspects content: no spans, positions='user' will say so
        return ids, None
    pieces = re.split("\ue000(\\d+)\ue001", marked)
    templ, order = pieces[0::2], [int(x) for x in pieces[1::2]]
    if not text.startswith(templ[0]):
        return ids, None
    pos, chars = len(templ[0]), []
    for k, i in enumerate(order):
        content, after = messages[i]["content"], templ[k + 1]
        for cand in (content, content.strip(), content.rstrip(), content.lstrip()):
            end = pos + len(cand)
            if text.startswith(cand, pos) and (
                text.startswith(after, end) if k + 1 < len(order) else text.endswith(after)
            ):
                break
        else:
            return ids, None
        chars.append((messages[i]["role"], pos, end))
        pos = end + len(after)
    spans: dict[str, list[int]] = {"user": [], "assistant": []}
    for role in spans:
        found = _tokens_in(tok, text, [(a, b) for r, a, b in chars if r == role])
        if found is None or found[0] != ids:
            return ids, None
        spans[role] = found[1]
    return ids, spans


def _tokens_in(
    tok: Any, text: str, ranges: list[tuple[int, int]]
) -> tuple[list[int], list[int]] | None:
    """``text``'s token ids and the indices of the tokens lying wholly inside ``ranges``."""
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return None
    inside = [
        j
        for j, (a, b) in enumerate(enc["offset_mapping"])
        if b > a and any(lo <= a and b <= hi for lo, hi in ranges)
    ]
    return list(enc["input_ids"]), inside


def select_positions(
    prompts: Sequence[TokenizedPrompt],
    positions: Positions = "all",
    *,
    include_bos: bool = False,
) -> list[Sequence[int]]:
    """Which token positions of each prompt to use. Pad tokens never appear (they are not in ``ids``).

    A named selection is a ``range`` per prompt (a contiguous run costs the same few bytes at any
    length, so a long run's bookkeeping does not grow with its tokens); explicit selections come
    back as sorted lists, except a ``range`` of step 1 within the prompt, which stays a range.

    Example:
        >>> tp = TokenizedPrompt(ids=(1, 7, 8, 9), n_prompt=3, has_bos=True)
        >>> select_positions([tp], "prompt"), select_positions([tp], "response")
        ([range(1, 3)], [range(3, 4)])
        >>> list(select_positions([tp], "last_prompt", include_bos=True)[0])
        [2]
    """
    out: list[Sequence[int]] = []
    if isinstance(positions, str):
        if positions not in POSITION_NAMES:
            raise PromptError(
                f"unknown positions {positions!r}; use one of {', '.join(POSITION_NAMES)} or one explicit "
                "selection (bool mask or index list) per prompt"
            )
        for tp in prompts:
            n, p = len(tp), tp.n_prompt
            if positions in ("user", "assistant"):
                found = getattr(tp, positions)
                if found is None:
                    raise PromptError(
                        f"positions={positions!r} needs to know where each turn's content lies, and "
                        "it could not be located for this prompt (a slow tokenizer without "
                        "offsets, token-id prompts, or a template that rewrites content). Use "
                        "a fast tokenizer, or pass explicit positions."
                    )
                out.append(_as_range(found))
                continue
            start, stop = {
                "all": (0, n),
                "prompt": (0, p),
                "response": (p, n),
                "last_prompt": (max(p - 1, 0), p),
            }[positions]
            if start == 0 < stop and tp.has_bos and not include_bos:
                start = 1  # BOS is position 0
            out.append(range(start, stop))
        if positions in ("user", "assistant") and not any(out):
            raise PromptError(
                f"positions={positions!r} selects nothing: no prompt has {positions} content "
                "(chat prompts have user turns; responses are assistant turns)"
            )
        if positions == "response" and not any(out):
            raise PromptError(
                "positions='response' selects nothing: pass (prompt, response) pairs to have response tokens"
            )
        return out

    if len(positions) != len(prompts):
        raise PromptError(
            f"got {len(positions)} explicit position selections for {len(prompts)} prompts; pass one per prompt"
        )
    for i, (tp, sel) in enumerate(zip(prompts, positions)):
        if isinstance(sel, range) and sel.step == 1 and sel.start >= 0 and sel.stop <= len(tp):
            # a contiguous run (what a named selection gave): no per-token checks, kept a range
            start = 1 if sel.start == 0 < len(sel) and tp.has_bos and not include_bos else sel.start
            out.append(range(start, max(start, sel.stop)))
            continue
        vals = sel.tolist() if isinstance(sel, Tensor) else list(sel)
        if vals and all(isinstance(v, bool) for v in vals):
            if len(vals) != len(tp):
                raise PromptError(
                    f"the position mask of prompt {i} has {len(vals)} entries but the prompt has "
                    f"{len(tp)} tokens"
                )
            idx = [j for j, keep in enumerate(vals) if keep]
        else:
            idx = [int(v) + len(tp) if int(v) < 0 else int(v) for v in vals]
            bad = [v for v in idx if not 0 <= v < len(tp)]
            if bad:
                raise PromptError(
                    f"positions {bad} are out of range for prompt {i}, which has {len(tp)} tokens"
                )
            idx = sorted(set(idx))
        out.append([j for j in idx if include_bos or not (j == 0 and tp.has_bos)])
    return out


def _as_range(idx: Sequence[int]) -> Sequence[int]:
    """A contiguous run of positions as a ``range`` (cheap at any length), else a list."""
    if idx and idx[-1] - idx[0] + 1 == len(idx):
        return range(idx[0], idx[-1] + 1)
    return list(idx)


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: pad, else EOS, else 0 (masked out either way)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def pad_batch(
    seqs: Sequence[Sequence[int]], *, pad: int, side: str = "right", device: Any = None
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"], Int[Tensor, " batch"]]:
    """Pad token sequences into a batch. Returns tokens, attention mask and each row's start offset.

    Example:
        >>> toks, mask, offset = pad_batch([[5, 6], [7]], pad=0, side="left")
        >>> toks.tolist(), mask.tolist(), offset.tolist()
        ([[5, 6], [0, 7]], [[1, 1], [0, 1]], [0, 1])
    """
    if side not in ("left", "right"):
        raise ArgumentError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    toks = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offset = torch.zeros(len(seqs), dtype=torch.long)
    for r, s in enumerate(seqs):
        start = width - len(s) if side == "left" else 0
        toks[r, start : start + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, start : start + len(s)] = 1
        offset[r] = start
    if device is not None:
        toks, mask, offset = toks.to(device), mask.to(device), offset.to(device)
    return toks, mask, offset
