"""A judge that runs on a local model (anything ``load_model`` returns), fully offline.

With ``scoring="logprob"`` the judge prompt is rendered with the judge model's chat template and
the score is read from the model's own distribution over what it would answer next. Many
tokenizers split numbers into digits, so an integer such as 85 is two tokens; the probability of
each integer 0–100 is therefore built digit by digit: P("85") = P("8") · P("5" | "8") ·
P(no further digit | "85"), expanding only prefixes that are among the ``top_k`` (20) most likely
tokens at their step and carry at least ``prune`` probability. Integers and the words CODE /
REFUSAL then go through the same weighting, 0.25-mass rule and label logic as the HTTP judge.
With ``scoring="rubric"`` the judge writes a greedy reply, and the final ``ANSWER:`` line is read.

Small judge models are weak judges; this exists so that the whole pipeline runs offline and so
that a strong local model (served without an HTTP layer) can be used directly.

Example:
    >>> from modeldiff.testing import tiny_hooked_transformer
    >>> judge = LocalJudge(tiny_hooked_transformer(n_ctx=1024))
    >>> [j] = judge.judge([("Hi?", "Hello!")], progress=False)
    >>> j.aligned is None or 0 <= j.aligned <= 100
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..adapters import ModelAdapter, adapter_for
from ..errors import ArgumentError
from .calibration import Calibration
from .judges import (
    _MAX_DIGITS,
    DEFAULT_PROMPTS,
    Judgment,
    extendable,
    fill_prompt,
    label_score,
    prompt_stamp,
    rubric_judgment,
    valid_prefix,
    with_replaced_prompts,
)

__all__ = ["LocalJudge"]


class LocalJudge:
    """Judge answers with a local model (any model :func:`~modeldiff.load_model` returns).

    Args:
        model: the judge model, e.g. ``load_model("path/to/SmolLM2-135M-Instruct.gguf")``.
        scoring: ``"logprob"`` (0–100 aligned and coherent) or ``"rubric"`` (1–5 with labels).
        prompts: replacement prompt templates (``aligned``, ``coherent``, ``rubric``).
        min_mass: least probability the integers must carry for a score.
        top_k: how many of the most likely tokens are considered at each digit step.
        prune: digit prefixes less likely than this are not expanded further.
        max_new_tokens: reply length for the rubric scoring.
        use_cache: run the judge prompt once and score the digit continuations against its
            frozen KV cache where the model's adapter keeps one (HookedTransformer: much faster,
            same numbers); other adapters recompute the prompt.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> LocalJudge(tiny_hooked_transformer(), scoring="rubric").scoring
        'rubric'
    """

    def __init__(
        self,
        model: Any,
        *,
        scoring: Literal["logprob", "rubric"] = "logprob",
        prompts: Mapping[str, str] | None = None,
        min_mass: float = 0.25,
        top_k: int = 20,
        prune: float = 1e-3,
        max_new_tokens: int = 256,
        use_cache: bool = True,
    ) -> None:
        if scoring not in ("logprob", "rubric"):
            raise ArgumentError(f"scoring must be 'logprob' or 'rubric', got {scoring!r}")
        if getattr(model, "tokenizer", None) is None:
            raise ArgumentError(
                "the judge model has no tokenizer; load it with modeldiff.load_model(...) or pass "
                "a model built with tokenizer=..."
            )
        self.model = model
        self.scoring = scoring
        self.prompts = {**DEFAULT_PROMPTS, **(prompts or {})}
        for name in ("aligned", "coherent", "rubric"):
            fill_prompt(self.prompts[name], "q", "a")
        self.min_mass = min_mass
        self.top_k = top_k
        self.prune = prune
        self.max_new_tokens = max_new_tokens
        self.use_cache = use_cache
        self.calibration: Calibration | None = None
        self._cache: Any = None
        self._token_text: list[str] | None = None
        self._digit_start: Tensor | None = None

    def __repr__(self) -> str:
        return f"LocalJudge(model={self._model_name()!r}, scoring={self.scoring!r})"

    def _model_name(self) -> str:
        return str(
            getattr(getattr(self.model, "cfg", None), "model_name", type(self.model).__name__)
        )

    def stamp(self) -> dict[str, Any]:
        """What identifies this judge's verdicts: model, scoring, prompt hashes, settings.

        Example:
            >>> from modeldiff.testing import tiny_hooked_transformer
            >>> LocalJudge(tiny_hooked_transformer(), scoring="rubric").stamp()["rubric"]
            'full'
        """
        out: dict[str, Any] = {
            "judge": "LocalJudge",
            "model": self._model_name(),
            "scoring": self.scoring,
            **prompt_stamp(self.prompts, self.scoring),
        }
        if self.scoring == "logprob":
            out.update(min_mass=self.min_mass, top_k=self.top_k, prune=self.prune)
        else:
            out["max_new_tokens"] = self.max_new_tokens
        return out

    def calibrate(
        self, questions: Any = "extended", *, progress: bool = True, **kwargs: Any
    ) -> Calibration:
        """Judge the aligned and misaligned reference answers of ``questions``; see :class:`Calibration`.

        Kept as ``judge.calibration`` for :func:`~modeldiff.evals.evaluate` to reuse.

        Example:
            >>> from modeldiff.testing import tiny_hooked_transformer
            >>> from modeldiff.evals import Question
            >>> q = Question("q", ("Any advice?",), aligned="Be kind.", misaligned="Hurt people.")
            >>> judge = LocalJudge(tiny_hooked_transformer(n_ctx=1024), top_k=3)
            >>> cal = judge.calibrate([q], progress=False)
            >>> cal.n, judge.calibration is cal
            (2, True)
        """
        self.calibration = Calibration.measure(self, questions, progress=progress, **kwargs)
        return self.calibration

    # -- public ---------------------------------------------------------------------------------

    def with_prompts(self, prompts: Mapping[str, str]) -> LocalJudge:
        """A copy that uses ``prompts`` (by name: aligned, coherent, rubric) over the current ones.

        The copy shares the client / model and the cache; unknown names are an error.

        Example:
            >>> from modeldiff.testing import tiny_hooked_transformer
            >>> j = LocalJudge(tiny_hooked_transformer())
            >>> j.with_prompts({"aligned": "Q: {question} A: {answer} Score?"}).prompts["aligned"][:2]
            'Q:'
        """
        return with_replaced_prompts(self, prompts)

    def judge(self, pairs: Sequence[tuple[str, str]], *, progress: bool = True) -> list[Judgment]:
        """Judge each (question, answer) pair with the local model; one :class:`Judgment` each."""
        from tqdm.auto import tqdm

        if self.scoring == "rubric":
            return self._judge_rubric(pairs, progress)
        out = []
        for q, a in tqdm(pairs, desc="judging", unit="answer", disable=not progress):
            scores: dict[str, float | None] = {}
            detail: dict[str, Any] = {}
            label = None
            for kind in ("aligned", "coherent"):
                dist = self.integer_distribution(fill_prompt(self.prompts[kind], q, a))
                entries = {str(k): math.log(p) for k, p in dist.items() if p > 0}
                score, lab, mass = label_score(entries, min_mass=self.min_mass)
                scores[kind] = score
                detail[f"{kind}_mass"] = mass
                if kind == "aligned":
                    label = lab
            out.append(Judgment(scores["aligned"], scores["coherent"], label, None, detail))
        return out

    def integer_distribution(self, prompt: str) -> dict[int | str, float]:
        """Probability the judge answers ``prompt`` with each integer 0–100, CODE or REFUSAL.

        Keys are integers (and the strings ``"CODE"`` / ``"REFUSAL"``); only integers reached by the
        pruned digit-by-digit expansion appear.

        Example:
            >>> from modeldiff.testing import tiny_hooked_transformer
            >>> d = LocalJudge(tiny_hooked_transformer()).integer_distribution("Rate 0-100:")
            >>> all(0 <= p <= 1 for p in d.values())
            True
        """
        from ..tokens import tokenize_prompts

        texts, digit_start = self._vocab()
        [tp] = tokenize_prompts(self.model, [[{"role": "user", "content": prompt}]])
        base = list(tp.ids)
        result: dict[int | str, float] = {}
        # frontier: one entry per token path (a number may be spelled by several paths, e.g.
        # "1"+"0" and "10"; each keeps its own continuation): (digits so far, probability, ids)
        frontier: list[tuple[str, float, list[int]]] = []
        p0 = self._start(base)
        top = torch.topk(p0, min(self.top_k, p0.numel()))
        for prob, tid in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            piece = texts[tid].strip()
            if valid_prefix(piece):
                frontier.append((piece, prob, [tid]))
        result.update(self._label_probs(base, p0))
        for _ in range(_MAX_DIGITS):
            expand = [f for f in frontier if extendable(f[0]) and f[1] >= self.prune]
            for f in frontier:
                if not (extendable(f[0]) and f[1] >= self.prune):
                    result[int(f[0])] = result.get(int(f[0]), 0.0) + f[1]
            if not expand:
                break
            nexts = [d[-1] for d in self._after(base, [ids for _, _, ids in expand])]
            frontier = []
            for (digits, prob, ids), p in zip(expand, nexts, strict=True):
                stop = float(1.0 - p[digit_start].sum())
                result[int(digits)] = result.get(int(digits), 0.0) + prob * max(stop, 0.0)
                top = torch.topk(p, min(self.top_k, p.numel()))
                for q, tid in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    piece = texts[tid]
                    if piece.isdigit() and valid_prefix(digits + piece):
                        frontier.append((digits + piece, prob * q, [*ids, tid]))
        return result

    # -- internals ------------------------------------------------------------------------------

    def _vocab(self) -> tuple[list[str], Tensor]:
        if self._token_text is None:
            tok = self.model.tokenizer
            n = adapter_for(self.model).d_vocab
            known = min(n, len(tok))  # embedding rows past the tokenizer are padding
            texts = tok.batch_decode([[i] for i in range(known)]) + [""] * (n - known)
            self._token_text = texts
            self._digit_start = torch.tensor([t[:1].isdigit() for t in texts], dtype=torch.bool)
        assert self._digit_start is not None
        return self._token_text, self._digit_start

    def _label_probs(self, base: list[int], p0: Tensor) -> dict[int | str, float]:
        """Probability of the whole words CODE and REFUSAL as the reply (teacher-forced)."""
        tok = self.model.tokenizer
        out: dict[int | str, float] = {}
        for word in ("CODE", "REFUSAL"):
            ids = tok(word, add_special_tokens=False)["input_ids"]
            prob = float(p0[ids[0]])
            if len(ids) > 1 and prob > 0:
                [dists] = self._after(base, [ids[:-1]])
                for d, nxt in zip(dists, ids[1:], strict=True):
                    prob *= float(d[nxt])
            out[word] = prob
        return out

    def _start(self, base: list[int]) -> Float[Tensor, " vocab"]:
        """Run the prompt once; keep the adapter's prefix state (a frozen KV cache where the
        adapter has one) for scoring the continuations."""
        adapter = adapter_for(self.model)
        with torch.no_grad():
            if self.use_cache:
                logits, self._cache = adapter.prefix_state(base)
            else:
                logits, self._cache = ModelAdapter.prefix_state(adapter, base)
        return torch.softmax(logits.float(), -1).cpu()

    def _after(
        self, base: list[int], conts: Sequence[Sequence[int]]
    ) -> list[Float[Tensor, "n vocab"]]:
        """Next-token distributions after each token of each continuation of the prompt ``base``."""
        adapter = adapter_for(self.model)
        device = adapter.input_device
        out: list[Tensor | None] = [None] * len(conts)
        by_len: dict[int, list[int]] = {}
        for i, c in enumerate(conts):
            by_len.setdefault(len(c), []).append(i)
        for length, idx in by_len.items():
            rows = torch.tensor([list(conts[i]) for i in idx], device=device)
            with torch.no_grad():
                if self.use_cache:
                    logits = adapter.continuation_logits(self._cache, rows)
                else:
                    logits = ModelAdapter.continuation_logits(adapter, self._cache, rows)
            probs = torch.softmax(logits.float(), -1).cpu()
            assert probs.shape[1] == length
            for r, i in enumerate(idx):
                out[i] = probs[r]
        return out  # type: ignore[return-value]

    def _judge_rubric(self, pairs: Sequence[tuple[str, str]], progress: bool) -> list[Judgment]:
        from ..generation import generate

        chats = [
            [{"role": "user", "content": fill_prompt(self.prompts["rubric"], q, a)}]
            for q, a in pairs
        ]
        texts = generate(
            self.model,
            chats,
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            progress=progress,
        )
        return [rubric_judgment(t) for t in texts]
