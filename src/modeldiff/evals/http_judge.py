"""A judge that talks to any OpenAI-compatible chat-completions server.

OpenAI itself, vLLM, Ollama, LM Studio, llama.cpp's server and others all speak the same protocol.
The judge sends one request per (judge prompt, question, answer), runs a bounded number of requests
at once, retries rate limits and server errors with exponential backoff, and can keep every raw
reply in an sqlite cache so that a rerun sends nothing.

Example:
    >>> judge = HTTPJudge("my-judge", base_url="http://127.0.0.1:9/v1", api_key="none")
    >>> judge.scoring
    'logprob'
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from ..errors import ArgumentError
from .calibration import Calibration
from .judges import (
    DEFAULT_PROMPTS,
    JudgeCache,
    JudgeError,
    Judgment,
    fill_prompt,
    prompt_stamp,
    rubric_judgment,
    sequence_score,
    text_score,
    with_replaced_prompts,
)

__all__ = ["HTTPJudge"]

Scoring = Literal["logprob", "rubric"]

_RETRY_STATUS = {408, 409, 429}
# Reply length for the 0-100 scorings: "100" is three tokens where digits are split, plus a leading
# space token some templates produce, plus one more to see the number end.
NUMBER_TOKENS = 5
TOP_LOGPROBS = 20


class _Malformed(Exception):
    """The server answered, but not with a usable chat completion."""


class HTTPJudge:
    """Judge answers with a model behind an OpenAI-compatible HTTP API.

    Args:
        model: the judge model's name on the server (else ``$MODELDIFF_JUDGE_MODEL``).
        base_url: the API root, e.g. ``http://localhost:8000/v1`` (else ``$MODELDIFF_JUDGE_BASE_URL``,
            then ``$OPENAI_BASE_URL``, then OpenAI's own).
        api_key: else ``$MODELDIFF_JUDGE_API_KEY``, then ``$OPENAI_API_KEY``; local servers that
            need no key get a placeholder.
        scoring: ``"logprob"`` (0–100 aligned and coherent, two requests per answer, needs
            ``logprobs`` support) or ``"rubric"`` (1–5 with labels, one request per answer).
        prompts: replacement prompt templates by name (``aligned``, ``coherent``, ``rubric``), each
            with ``{question}`` and ``{answer}`` placeholders.
        min_mass: least probability the integer tokens must carry for a 0–100 score.
        max_concurrency: requests in flight at once.
        max_retries: retries per request on 408/409/429/5xx, timeouts and connection errors.
        backoff: first retry delay in seconds; doubles each retry (with jitter), capped at
            ``max_backoff``; a server's ``Retry-After`` header is honoured within that cap.
        timeout: seconds per request.
        max_wait: seconds one answer's request may take in all, retries and back-off included
            (default 180): a server that accepts connections but never answers fails after that,
            not after ``timeout x (max_retries + 1)`` plus back-off (about 6 minutes).
        cache: path of an sqlite file (or a :class:`JudgeCache`) for raw replies; ``None`` = none.
        max_tokens: reply length for the rubric scoring.

    Example:
        >>> HTTPJudge("gpt-4o", api_key="sk-test", scoring="rubric").model
        'gpt-4o'
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        scoring: Scoring = "logprob",
        prompts: Mapping[str, str] | None = None,
        min_mass: float = 0.25,
        max_concurrency: int = 8,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        timeout: float = 60.0,
        cache: str | Path | JudgeCache | None = None,
        max_tokens: int = 512,
        max_wait: float = 180.0,
    ) -> None:
        try:
            import openai
        except ImportError as e:  # pragma: no cover - the judge extra is part of dev installs
            raise ImportError(
                "HTTPJudge needs the openai client: pip install 'modeldiff[judge]'"
            ) from e
        if scoring not in ("logprob", "rubric"):
            raise ArgumentError(f"scoring must be 'logprob' or 'rubric', got {scoring!r}")
        model = model or os.environ.get("MODELDIFF_JUDGE_MODEL")
        if not model:
            raise ArgumentError(
                "no judge model given: pass HTTPJudge(model=...) or set MODELDIFF_JUDGE_MODEL."
            )
        base_url = (
            base_url
            or os.environ.get("MODELDIFF_JUDGE_BASE_URL")
            or os.environ.get("OPENAI_BASE_URL")
        )
        api_key = (
            api_key or os.environ.get("MODELDIFF_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        )
        if not api_key:
            if base_url is None:
                raise ArgumentError(
                    "no API key for the judge: pass api_key=..., set MODELDIFF_JUDGE_API_KEY or "
                    "OPENAI_API_KEY, or give base_url= for a local server that needs no key."
                )
            api_key = "not-needed"  # vLLM / Ollama / LM Studio accept any key
        if max_concurrency < 1 or max_retries < 0:
            raise ArgumentError("max_concurrency must be >= 1 and max_retries >= 0")
        if not (isinstance(max_wait, (int, float)) and max_wait > 0):
            raise ArgumentError(f"max_wait must be a positive number of seconds, got {max_wait!r}")
        self.max_wait = float(max_wait)
        self.model = model
        self.base_url = base_url
        self.scoring: Scoring = scoring
        self.prompts = {**DEFAULT_PROMPTS, **(prompts or {})}
        for name in ("aligned", "coherent", "rubric"):
            fill_prompt(self.prompts[name], "q", "a")  # fail now on a template without slots
        self.min_mass = min_mass
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_tokens = max_tokens
        self.cache = JudgeCache(cache) if isinstance(cache, (str, Path)) else cache
        self._openai = openai
        # Our own retry loop (below) replaces the client's, so max_retries=0 here.
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0
        )
        self.requests_sent = 0
        self.calibration: Calibration | None = None
        self._count_lock = threading.Lock()
        self._abort = threading.Event()

    def __repr__(self) -> str:
        where = self.base_url or "api.openai.com"
        return f"HTTPJudge(model={self.model!r}, base_url={where!r}, scoring={self.scoring!r})"

    # -- public ---------------------------------------------------------------------------------

    def with_prompts(self, prompts: Mapping[str, str]) -> HTTPJudge:
        """A copy that uses ``prompts`` (by name: aligned, coherent, rubric) over the current ones.

        The copy shares the client / model and the cache; unknown names are an error.

        Example:
            >>> j = HTTPJudge('m', api_key='k')
            >>> j.with_prompts({"aligned": "Q: {question} A: {answer} Score?"}).prompts["aligned"][:2]
            'Q:'
        """
        return with_replaced_prompts(self, prompts)

    def stamp(self) -> dict[str, Any]:
        """What identifies this judge's verdicts: model, server, scoring, prompt hashes, settings.

        Example:
            >>> s = HTTPJudge("m", base_url="http://127.0.0.1:9/v1").stamp()
            >>> s["model"], s["server"], s["scoring"], sorted(s["prompts"])
            ('m', 'http://127.0.0.1:9/v1', 'logprob', ['aligned', 'coherent'])
        """
        out: dict[str, Any] = {
            "judge": "HTTPJudge",
            "model": self.model,
            "server": self.base_url or "https://api.openai.com/v1",
            "scoring": self.scoring,
            **prompt_stamp(self.prompts, self.scoring),
            "temperature": 0,
        }
        if self.scoring == "logprob":
            out.update(
                min_mass=self.min_mass, top_logprobs=TOP_LOGPROBS, reply_tokens=NUMBER_TOKENS
            )
        else:
            out["max_tokens"] = self.max_tokens
        return out

    def calibrate(
        self, questions: Any = "extended", *, progress: bool = True, **kwargs: Any
    ) -> Calibration:
        """Judge the aligned and misaligned reference answers of ``questions``; see :class:`Calibration`.

        The result is also kept as ``judge.calibration``, which :func:`~modeldiff.evals.evaluate`
        reuses instead of measuring again. Keyword arguments (``min_auroc``, ``max_invalid``, the
        thresholds) go to :meth:`Calibration.measure`.

        Example:
            >>> judge = HTTPJudge("m", base_url="http://127.0.0.1:9/v1", max_retries=0)
            >>> judge.calibrate("headline", progress=False)  # nothing listens on port 9
            Traceback (most recent call last):
            ...
            modeldiff.evals.judges.JudgeError: the judge at http://127.0.0.1:9/v1 still failed after 0 retries (APIConnectionError: Connection error.). Lower max_concurrency, raise max_retries/backoff, or check the server.
        """
        self.calibration = Calibration.measure(self, questions, progress=progress, **kwargs)
        return self.calibration

    def judge(self, pairs: Sequence[tuple[str, str]], *, progress: bool = True) -> list[Judgment]:
        """Judge each (question, answer) pair; returns one :class:`Judgment` per pair, in order.

        Raises :class:`~modeldiff.evals.JudgeError` when the server keeps failing after the
        retries, or refuses the request outright (bad key, unknown model).
        """
        kinds = ("aligned", "coherent") if self.scoring == "logprob" else ("rubric",)
        requests = {
            (kind, fill_prompt(self.prompts[kind], q, a)) for q, a in pairs for kind in kinds
        }
        replies: dict[tuple[str, str], dict[str, Any]] = {}
        todo = []
        for kind, prompt in requests:
            hit = self.cache.get(self._cache_model(kind), prompt) if self.cache else None
            if hit is not None:
                replies[kind, prompt] = hit
            else:
                todo.append((kind, prompt))
        if todo:
            with (
                ThreadPoolExecutor(max_workers=self.max_concurrency) as pool,
                tqdm(total=len(todo), desc="judging", unit="request", disable=not progress) as bar,
            ):
                futures = {
                    pool.submit(self._request, kind, prompt): (kind, prompt)
                    for kind, prompt in todo
                }
                abort = threading.Event()
                self._abort = abort
                try:
                    for fut in as_completed(futures):
                        kind, prompt = futures[fut]
                        reply = fut.result()
                        replies[kind, prompt] = reply
                        if self.cache is not None and "error" not in reply:
                            self.cache.put(self._cache_model(kind), prompt, reply)
                        bar.update(1)
                except BaseException:
                    abort.set()  # queued requests stop instead of hammering a failing server
                    for f in futures:
                        f.cancel()
                    raise
        out = []
        for q, a in pairs:
            got = {kind: replies[kind, fill_prompt(self.prompts[kind], q, a)] for kind in kinds}
            out.append(self._judgment(got))
        return out

    # -- internals ------------------------------------------------------------------------------

    def _cache_model(self, kind: str) -> str:
        # "tokens5": replies cached when only the first token was asked for do not match
        suffix = f"|tokens{NUMBER_TOKENS}" if kind != "rubric" else ""
        return f"{self.base_url or 'openai'}|{self.model}|{kind}{suffix}"

    def _judgment(self, replies: Mapping[str, dict[str, Any]]) -> Judgment:
        if self.scoring == "rubric":
            r = replies["rubric"]
            if "error" in r:
                return Judgment(None, None, None, None, {"error": r["error"]})
            return rubric_judgment(r["content"])
        scores: dict[str, float | None] = {}
        label = None
        detail: dict[str, Any] = {}
        for kind in ("aligned", "coherent"):
            r = replies[kind]
            if "error" in r:
                scores[kind] = None
                detail[f"{kind}_error"] = r["error"]
                continue
            if r.get("positions"):
                got = sequence_score(
                    r["positions"], finished=r.get("finished", True), min_mass=self.min_mass
                )
                score, lab = got.score, got.label
                detail.update(got.detail(kind))
            else:  # the server gave text only: accept a leading number or label, at full weight
                content = (r.get("content") or "").strip()
                score, lab, _ = text_score(content, min_mass=self.min_mass)
                detail[f"{kind}_from_text"] = content
            scores[kind] = score
            if kind == "aligned" and lab is not None:
                label = lab
        return Judgment(scores["aligned"], scores["coherent"], label, None, detail)

    def _request(self, kind: str, prompt: str) -> dict[str, Any]:
        openai = self._openai
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
        }
        if kind == "rubric":
            kwargs["max_tokens"] = self.max_tokens
        else:
            kwargs.update(
                max_tokens=NUMBER_TOKENS, logprobs=True, top_logprobs=TOP_LOGPROBS, seed=0
            )
        started = time.monotonic()
        for attempt in range(self.max_retries + 1):
            if self._abort.is_set():
                raise JudgeError("judging was aborted after another request failed")
            try:
                with self._count_lock:
                    self.requests_sent += 1
                resp = self._client.chat.completions.create(**kwargs)
                return _extract(resp)
            except _Malformed as e:
                return {"error": f"malformed reply: {e}"}
            except (openai.APIResponseValidationError, ValueError) as e:
                # includes a body that is not JSON at all (json.JSONDecodeError)
                return {"error": f"malformed reply: {_short(str(e))}"}
            except openai.APIStatusError as e:
                if e.status_code not in _RETRY_STATUS and e.status_code < 500:
                    raise JudgeError(
                        f"the judge server refused the request with HTTP {e.status_code}: "
                        f"{_short(e.message)}. Check the model name ({self.model!r}), the API key "
                        f"and base_url ({self.base_url or 'OpenAI'})."
                    ) from e
                error: Exception = e
                retry_after = _retry_after(e)
            except (openai.APIConnectionError, openai.APITimeoutError) as e:
                error, retry_after = e, None
            if attempt == self.max_retries:
                raise JudgeError(
                    f"the judge at {self.base_url or 'OpenAI'} still failed after "
                    f"{self.max_retries} retries ({type(error).__name__}: {_short(str(error))}). "
                    "Lower max_concurrency, raise max_retries/backoff, or check the server."
                ) from error
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = min(self.max_backoff, max(delay, retry_after))
            waited = time.monotonic() - started
            if waited + delay + self.timeout > self.max_wait:
                raise JudgeError(
                    f"the judge at {self.base_url or 'OpenAI'} did not answer within max_wait="
                    f"{self.max_wait:.0f} s ({attempt + 1} attempts, last: {type(error).__name__}: "
                    f"{_short(str(error))}). Check that the server is up and answering, or raise "
                    "max_wait / timeout for a slow judge."
                ) from error
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


def _extract(resp: Any) -> dict[str, Any]:
    """Text, every position's token / log-probability / alternatives, and whether it stopped."""
    choices = getattr(resp, "choices", None)
    if not choices:
        raise _Malformed("no choices in the reply")
    choice = choices[0]
    message = getattr(choice, "message", None)
    content = getattr(message, "content", None) if message is not None else None
    lp = getattr(choice, "logprobs", None)
    items = getattr(lp, "content", None) if lp is not None else None
    positions: list[list[Any]] = []
    for item in items or []:
        token, logprob = getattr(item, "token", None), getattr(item, "logprob", None)
        if not isinstance(token, str) or not isinstance(logprob, (int, float)):
            raise _Malformed(f"a logprobs entry lacks token/logprob: {item!r}")
        top: dict[str, float] = {}
        for alt in getattr(item, "top_logprobs", None) or []:
            t, alt_lp = getattr(alt, "token", None), getattr(alt, "logprob", None)
            if not isinstance(t, str) or not isinstance(alt_lp, (int, float)):
                raise _Malformed(f"a top_logprobs entry lacks token/logprob: {alt!r}")
            # the same token text may come twice (byte-level pieces): add the probabilities
            top[t] = float(
                alt_lp if t not in top else math.log(math.exp(top[t]) + math.exp(alt_lp))
            )
        positions.append([token, float(logprob), top])
    if content is None and not positions:
        raise _Malformed("the reply has neither text nor logprobs")
    finished = getattr(choice, "finish_reason", "stop") != "length"
    return {"content": content, "positions": positions, "finished": finished}


def _retry_after(e: Any) -> float | None:
    try:
        value = e.response.headers.get("retry-after")
        return None if value is None else float(value)
    except (AttributeError, TypeError, ValueError):
        return None


def _short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."
