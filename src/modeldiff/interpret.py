"""What is this latent? The contexts it fires on, the tokens its direction writes, how it is spread.

Three views of one SAE latent (or any direction), each reading the model through its adapter:

* :func:`top_activations` streams a corpus through the model and keeps, per latent, the ``k``
  tokens where it fires most, each with a window of context and the latent's activation on every
  token of the window (a bounded heap per latent: memory ``O(latents × k)``, however large the
  corpus);
* :func:`logit_lens` reads a direction through the unembedding, with the final norm's elementwise
  scale folded in the way the model's family applies it (see :class:`~modeldiff.adapters.NormFold`);
* :func:`activation_histogram` overlays a latent's activation distribution on a base and a
  fine-tuned model.
"""

from __future__ import annotations

import heapq
import html
import itertools
import json
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ._io import write_json_atomic
from .adapters import adapter_for
from .capture import capture
from .directions import _is_sae_pair, resolve_direction
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    MissingFileError,
    OutOfRangeError,
    damaged_file,
    reading,
)
from .saes import check_sae, load_sae, sae_d_sae, sae_identity
from .sites import Site
from .tokens import (
    Positions,
    Prompt,
    PromptError,
    TokenizedPrompt,
    _is_chat,
    get_tokenizer,
    select_positions,
    tokenize_prompts,
)

__all__ = [
    "ActivationExample",
    "LogitLens",
    "TokenLogit",
    "TopActivations",
    "activation_histogram",
    "logit_lens",
    "top_activations",
]

_FORMAT = "modeldiff.TopActivations"
_VERSION = 1
# Prompts tokenized at a time: a generator corpus is never held whole, a list only as token ids.
_CHUNK_PROMPTS = 512
# Elements of one [rows, d_sae] encoder output (float32: 16 MB), as in diff_latents.
_ENCODE_ELEMENTS = 2**22


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


def _latent_list(latents: Any, d_sae: int) -> list[int]:
    """Latent indices from an int, a sequence / tensor of ints, or LatentDiff rows (``.latent``)."""
    if isinstance(latents, Tensor):
        if latents.is_floating_point():
            raise ArgumentTypeError("latents must be integer indices, got a floating tensor")
        items: list[Any] = latents.flatten().tolist()
    elif isinstance(latents, numbers.Integral) or hasattr(latents, "latent"):
        items = [latents]
    elif isinstance(latents, Iterable) and not isinstance(latents, (str, bytes)):
        items = list(latents)
    else:
        raise ArgumentTypeError(
            f"latents must be an int, a list of ints or LatentDiff rows, got {type(latents).__name__}"
        )
    out: list[int] = []
    for item in items:
        value = getattr(item, "latent", item)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ArgumentTypeError(
                f"latents must be integer indices (or LatentDiff rows), got {value!r}"
            )
        if not 0 <= int(value) < d_sae:
            raise OutOfRangeError(
                f"latent {int(value)} is out of range: the SAE has {d_sae} latents (0..{d_sae - 1})"
            )
        if int(value) not in out:
            out.append(int(value))
    if not out:
        raise ArgumentError("no latents given; pass e.g. latents=[12] or diff.top(5)")
    return out


def _count_arg(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _encode(sae: Any, x: Tensor, latents: Tensor) -> Float[Tensor, "n n_latents"]:
    """The chosen latents' activations for rows ``x``, encoded in bounded chunks, float32 on CPU."""
    rows = max(16, _ENCODE_ELEMENTS // max(sae_d_sae(sae), 1))
    parts = []
    for j in range(0, x.shape[0], rows):
        z = sae.encode(x[j : j + rows])
        parts.append(z[:, latents.to(z.device)].float().cpu())
    if not parts:
        return torch.empty(0, latents.numel())
    return torch.cat(parts)


def _flatten_corpus(corpus: Any) -> Iterator[Prompt]:
    """One prompt at a time: 2-D token-id tensors (batches) are split into their rows."""
    if isinstance(corpus, str) or _is_chat(corpus):
        yield corpus
        return
    if isinstance(corpus, Tensor):
        if corpus.is_floating_point() or corpus.ndim not in (1, 2):
            raise ArgumentTypeError(
                f"a tensor corpus must hold integer token ids, 1-D (one prompt) or 2-D (a batch), "
                f"got a {corpus.dtype} tensor of shape {tuple(corpus.shape)}"
            )
        yield from (corpus.unsqueeze(0) if corpus.ndim == 1 else corpus)
        return
    if not isinstance(corpus, Iterable):
        raise ArgumentTypeError(
            f"the corpus must be prompts (a list, a generator, a token-id tensor), got "
            f"{type(corpus).__name__}"
        )
    for item in corpus:
        if isinstance(item, Tensor) and item.ndim == 2:
            yield from item
        else:
            yield item


def _corpus_size(corpus: Any) -> int | None:
    if isinstance(corpus, str) or _is_chat(corpus):
        return 1
    if isinstance(corpus, Tensor):
        return 1 if corpus.ndim == 1 else int(corpus.shape[0])
    if isinstance(corpus, Sequence):
        return sum(int(x.shape[0]) if isinstance(x, Tensor) and x.ndim == 2 else 1 for x in corpus)
    return None


def _selects_nothing(tokenized: Sequence[TokenizedPrompt], positions: Any) -> bool:
    if positions == "response":
        return all(tp.n_prompt >= len(tp) for tp in tokenized)
    if positions in ("user", "assistant"):
        spans = [getattr(tp, positions) for tp in tokenized]
        return all(s is not None and len(s) == 0 for s in spans)
    return False


def _select(
    tokenized: Sequence[TokenizedPrompt], positions: Positions, include_bos: bool
) -> list[Sequence[int]]:
    """:func:`select_positions` for one chunk of a corpus: a chunk may select nothing."""
    try:
        return select_positions(tokenized, positions, include_bos=include_bos)
    except PromptError:
        if isinstance(positions, str) and _selects_nothing(tokenized, positions):
            return [[] for _ in tokenized]
        raise


def _chunks(
    corpus: Any, positions: Positions, total: int | None
) -> Iterator[tuple[int, list[Prompt], Positions]]:
    """(offset, prompts, their positions) for consecutive chunks of the corpus."""
    explicit = not isinstance(positions, str)
    if explicit and total is not None and len(positions) != total:
        raise PromptError(
            f"got {len(positions)} explicit position selections for {total} prompts; pass one "
            "per prompt"
        )
    stream = _flatten_corpus(corpus)
    offset = 0
    while True:
        chunk = list(itertools.islice(stream, _CHUNK_PROMPTS))
        if not chunk:
            return
        pos: Positions = positions
        if explicit:
            pos = list(positions[offset : offset + len(chunk)])
            if len(pos) != len(chunk):
                raise PromptError(
                    f"the corpus has more prompts than the {len(positions)} explicit position "
                    "selections; pass one per prompt"
                )
        yield offset, chunk, pos
        offset += len(chunk)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _unfinite(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _show(token: str) -> str:
    return html.escape(token.replace("\n", "⏎").replace("\t", "⇥"))


# ------------------------------------------------------------------------------------------------
# top_activations
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationExample:
    """One of a latent's top-activating tokens and the window of context around it.

    ``token_ids`` / ``tokens`` / ``activations`` cover positions ``start .. start + len - 1`` of
    prompt ``prompt_index`` (its index in the corpus, token-id batches counted row by row), and
    ``activations[i]`` is the latent's value on ``tokens[i]``; the example's own token sits at
    ``center``.

    Example:
        >>> ex = ActivationExample(latent=3, rank=1, prompt_index=0, position=2, activation=1.5,
        ...                        start=1, token_ids=(7, 8, 9), tokens=("a", " b", " c"),
        ...                        activations=(0.0, 1.5, 0.2))
        >>> ex.center, ex.token, ex.text
        (1, ' b', 'a b c')
    """

    latent: int
    rank: int
    prompt_index: int
    position: int
    activation: float
    start: int
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    activations: tuple[float, ...]

    @property
    def center(self) -> int:
        """Index of the example's own token in the window."""
        return self.position - self.start

    @property
    def token(self) -> str:
        """The example's own token, decoded."""
        return self.tokens[self.center]

    @property
    def text(self) -> str:
        """The window as one string (the tokens decoded one by one, joined)."""
        return "".join(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "prompt_index": self.prompt_index,
            "position": self.position,
            "activation": _finite(self.activation),
            "start": self.start,
            "token_ids": list(self.token_ids),
            "tokens": list(self.tokens),
            "activations": [_finite(a) for a in self.activations],
        }

    @classmethod
    def from_dict(cls, latent: int, data: dict[str, Any]) -> ActivationExample:
        return cls(
            latent=int(latent),
            rank=int(data["rank"]),
            prompt_index=int(data["prompt_index"]),
            position=int(data["position"]),
            activation=_unfinite(data["activation"]),
            start=int(data["start"]),
            token_ids=tuple(int(t) for t in data["token_ids"]),
            tokens=tuple(str(t) for t in data["tokens"]),
            activations=tuple(_unfinite(a) for a in data["activations"]),
        )


@dataclass(frozen=True)
class TopActivations:
    """Per latent, the ``k`` tokens of a corpus where it fired most, best first.

    Ordered by activation, ties by the earlier prompt, then the earlier position. ``n_fired[l]``
    counts the scanned tokens where latent ``l`` was above zero, out of ``n_tokens`` scanned (the
    selected positions, outliers removed). Index it by latent: ``top[12]`` is latent 12's examples.

    Example:
        >>> top = TopActivations(site=Site.resid_post(0), k=2, context=1, n_tokens=10,
        ...                      examples={5: ()}, n_fired={5: 0})
        >>> top
        TopActivations(1 latent at blocks.0.hook_resid_post, k=2, ±1 tokens, 10 tokens scanned)
        >>> top[5]
        ()
    """

    site: Site
    k: int
    context: int
    n_tokens: int
    examples: dict[int, tuple[ActivationExample, ...]]
    n_fired: dict[int, int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def latents(self) -> list[int]:
        """The latents, in the order they were asked for."""
        return list(self.examples)

    def __getitem__(self, latent: int) -> tuple[ActivationExample, ...]:
        try:
            return self.examples[int(latent)]
        except KeyError:
            raise OutOfRangeError(
                f"latent {latent} was not among those searched ({self.latents}); run "
                "top_activations with it in latents="
            ) from None

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[int]:
        return iter(self.examples)

    def frequency(self, latent: int) -> float:
        """The share of scanned tokens on which ``latent`` fired (NaN when none was scanned)."""
        return self.n_fired[int(latent)] / self.n_tokens if self.n_tokens else float("nan")

    def __repr__(self) -> str:
        n = len(self.examples)
        return (
            f"TopActivations({n} latent{'s' if n != 1 else ''} at {self.site.hook_name}, "
            f"k={self.k}, ±{self.context} tokens, {self.n_tokens:,} tokens scanned)"
        )

    def _repr_html_(self) -> str:
        parts = [f"<div><b>{html.escape(repr(self))}</b>"]
        for latent, examples in self.examples.items():
            freq = self.frequency(latent)
            top = max((e.activation for e in examples), default=0.0)
            parts.append(
                f"<p><b>latent {latent}</b>: fired on {self.n_fired[latent]:,} of "
                f"{self.n_tokens:,} tokens ({freq:.2%}), max {top:.4g}</p>"
                if self.n_tokens
                else f"<p><b>latent {latent}</b>: no tokens scanned</p>"
            )
            if not examples:
                parts.append("<p><i>never fired on the selected tokens</i></p>")
                continue
            rows = []
            for e in examples:
                spans = []
                for i, (tok, act) in enumerate(zip(e.tokens, e.activations)):
                    alpha = 0.0 if not (top > 0 and act > 0) else min(1.0, act / top)
                    style = f"background:rgba(220,38,38,{alpha:.2f})"
                    if i == e.center:
                        style += ";outline:1px solid #111;font-weight:bold"
                    title = html.escape(f"{tok!r}: {act:.4g}", quote=True)
                    spans.append(f'<span style="{style}" title="{title}">{_show(tok)}</span>')
                rows.append(
                    f"<tr><td>{e.rank}</td><td>{e.activation:.4g}</td><td>{e.prompt_index}</td>"
                    f'<td>{e.position}</td><td style="white-space:pre;text-align:left;'
                    f'font-family:monospace">{"".join(spans)}</td></tr>'
                )
            parts.append(
                "<table><thead><tr><th>#</th><th>activation</th><th>prompt</th><th>position</th>"
                f"<th>context</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            )
        parts.append("</div>")
        return "".join(parts)

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the :meth:`save` format); non-finite values become ``null``."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "site": self.site.hook_name,
            "k": self.k,
            "context": self.context,
            "n_tokens": self.n_tokens,
            "latents": [
                {
                    "latent": latent,
                    "n_fired": self.n_fired[latent],
                    "examples": [e.to_dict() for e in examples],
                }
                for latent, examples in self.examples.items()
            ],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TopActivations:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ArgumentError(
                f"not a TopActivations dict (format {data.get('format') if isinstance(data, dict) else None!r})"
            )
        if int(data.get("version", 0)) > _VERSION:
            raise ArgumentError(
                f"this TopActivations was written by a newer modeldiff (format version "
                f"{data['version']}); upgrade modeldiff to read it"
            )
        examples, fired = {}, {}
        for item in data["latents"]:
            latent = int(item["latent"])
            examples[latent] = tuple(
                ActivationExample.from_dict(latent, e) for e in item["examples"]
            )
            fired[latent] = int(item["n_fired"])
        return cls(
            site=Site.parse(data["site"]),
            k=int(data["k"]),
            context=int(data["context"]),
            n_tokens=int(data["n_tokens"]),
            examples=examples,
            n_fired=fired,
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON, atomically (never a pickle); :meth:`load` reads it back."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TopActivations:
        """Read a file written by :meth:`save`.

        Example:
            >>> import tempfile, pathlib
            >>> bad = pathlib.Path(tempfile.mkdtemp()) / "top.json"
            >>> _ = bad.write_text('{"format": "something else"}')
            >>> TopActivations.load(bad)
            Traceback (most recent call last):
            ...
            modeldiff.errors.FileFormatError: '...top.json' cannot be read as a TopActivations file (not a TopActivations dict (format 'something else')): it is damaged, cut short or of another kind. Re-create it (save it again), or pass the right file.
        """
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"no TopActivations file at {str(path)!r}; check the path")
        with reading(path, "a TopActivations file"):
            data = json.loads(path.read_text(encoding="utf-8"))
        try:
            return cls.from_dict(data)
        except (ArgumentError, KeyError, TypeError, ValueError) as err:
            raise damaged_file(path, "a TopActivations file", err) from err


def top_activations(
    model: Any,
    sae: Any,
    latents: Any,
    corpus: Any,
    *,
    k: int = 20,
    context: int = 8,
    positions: Positions = "all",
    batch_size: int = 8,
    site: Site | str | None = None,
    include_bos: bool = False,
    outlier_factor: float | None = 10.0,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    convert_sae: bool = False,
    distributed: bool = False,
    progress: bool = True,
) -> TopActivations:
    """The ``k`` tokens of ``corpus`` where each latent fires most, with their contexts.

    The corpus streams through the model batch by batch (tokenized a chunk at a time, so a
    generator is never held whole); each forward stops after the SAE's site, the SAE encodes the
    tokens there, and each latent keeps a bounded heap of its best ``k`` tokens: memory is
    ``O(len(latents) × k × context)``, not ``O(corpus)``. A token is a candidate when it is among
    ``positions``, is not a leading BOS (unless ``include_bos``), is not an outlier, and the latent
    fired on it (activation > 0); a latent that fires on fewer tokens gets fewer examples.

    Args:
        model: any model :func:`~modeldiff.load_model` returns.
        sae: an sae-lens SAE (or what :func:`~modeldiff.load_sae` accepts).
        latents: one latent index, several, or LatentDiff rows (``diff.top(5)``).
        corpus: prompts (strings, chat message lists, ``(prompt, response)`` pairs, token-id
            lists), as a list or any iterable; or integer token-id tensors, 2-D ones read row
            by row (a dataloader's batches).
        k: examples kept per latent.
        context: tokens shown on each side of an example (clipped at the prompt's ends). The
            window shows every token there, BOS and unselected positions included.
        positions: which tokens are candidates: ``"all"``, ``"prompt"``, ``"response"``,
            ``"last_prompt"``, ``"user"``, ``"assistant"``, or one explicit selection per prompt.
        batch_size: prompts per forward pass.
        site: where to read (default: the SAE's own hook, ``Site.from_sae(sae)``).
        include_bos: let a leading BOS token be a candidate (its activations are outliers).
        outlier_factor: drop candidates whose activation norm exceeds this multiple of their
            prompt's median (attention sinks), as :func:`~modeldiff.diff_latents` does; ``None``
            keeps all. The count dropped is in ``meta["n_outliers_dropped"]``.
        prepend_bos, truncate: tokenization, as in :func:`~modeldiff.capture`.
        convert_sae: use a copy of the SAE converted to the model's dtype/device.
        distributed: under ``torchrun``, shard the corpus's chunks (of 512 prompts) over the ranks
            and merge the heaps on rank 0, which returns the result (the others return
            ``None``); every rank iterates the same corpus. Equal to one process at the same
            thread count.
        progress: show a progress bar (over prompts).

    Returns:
        A :class:`TopActivations` (``top[latent]`` lists its examples; shown as highlighted
        tables in Jupyter; ``save`` / ``load`` as JSON).

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model = tiny_hooked_transformer()
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.1.hook_resid_post"
        >>> sae = StandardSAE(cfg)
        >>> top = top_activations(model, sae, [0, 3], ["The quick brown fox", "Hello world"],
        ...                       k=2, context=2, progress=False)
        >>> top.latents, len(top[0]) <= 2
        ([0, 3], True)
    """
    sae = load_sae(sae)
    site = Site.parse(site) if site is not None else Site.from_sae(sae)
    site.validate(model)
    sae = check_sae(sae, model, site, convert=convert_sae)
    lat = _latent_list(latents, sae_d_sae(sae))
    k = _count_arg(k, "k", 1)
    context = _count_arg(context, "context", 0)
    if outlier_factor is not None and not (outlier_factor > 0):
        raise ArgumentError(f"outlier_factor must be positive or None, got {outlier_factor!r}")
    lat_idx = torch.as_tensor(lat, dtype=torch.long)
    total = _corpus_size(corpus)
    # min-heaps keyed (activation, -prompt, -position): the root is the worst kept example, and of
    # two equal activations the later token is the worse, so the earlier one is kept
    heaps: list[list[tuple[float, int, int, tuple[int, tuple[int, ...], tuple[float, ...]]]]] = [
        [] for _ in lat
    ]
    n_fired = torch.zeros(len(lat), dtype=torch.long)
    n_tokens = n_outliers = n_prompts = 0
    rank, world = 0, 1
    if distributed:
        from .distributed import init_from_env

        rank, world = init_from_env()
    bar = tqdm(
        total=total, desc="top_activations", unit="prompt", disable=not progress or rank != 0
    )
    try:
        for n_chunk, (offset, chunk, pos) in enumerate(_chunks(corpus, positions, total)):
            if n_chunk % world != rank:  # another rank's chunk
                bar.update(len(chunk))
                continue
            tokenized = tokenize_prompts(model, chunk, prepend_bos=prepend_bos, truncate=truncate)
            selections = _select(tokenized, pos, include_bos)
            n_prompts += len(chunk)
            # whole prompts run and are encoded: a window shows the latent on every token in it
            run = [range(len(tp)) if sel else [] for tp, sel in zip(tokenized, selections)]
            bar.update(sum(1 for r in run if not r))
            if not any(run):
                continue
            stream = capture(
                model,
                chunk,
                site,
                positions=run,
                batch_size=batch_size,
                include_bos=True,
                tokenized=tokenized,
                progress=False,
            )
            with torch.inference_mode():
                for b in stream:
                    dropped, scanned = _scan_batch(
                        b, site, sae, lat_idx, tokenized, selections, offset, heaps, n_fired,
                        k=k, context=context, outlier_factor=outlier_factor,
                    )  # fmt: skip
                    n_outliers += dropped
                    n_tokens += scanned
                    bar.update(int(torch.unique_consecutive(b.prompt_index).numel()))
                    del b
    finally:
        bar.close()
    if distributed:
        merged = _gather_heaps(heaps, n_fired, (n_tokens, n_outliers, n_prompts), k)
        if merged is None:
            return None  # type: ignore[return-value]  # not rank 0: its heaps went to rank 0
        heaps, n_fired, (n_tokens, n_outliers, n_prompts) = merged
    if n_prompts == 0:
        raise PromptError("the corpus is empty; pass at least one prompt")
    if n_tokens == 0 and n_outliers == 0 and isinstance(positions, str):
        raise PromptError(
            f"positions={positions!r} selected no token in the corpus; pass (prompt, response) "
            "pairs for 'response', chats for 'user' / 'assistant', or another selection"
        )
    tok = get_tokenizer(model)
    decoded: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in decoded:
            decoded[i] = tok.decode([i])
        return decoded[i]

    examples: dict[int, tuple[ActivationExample, ...]] = {}
    for j, latent in enumerate(lat):
        best = sorted(heaps[j], reverse=True)
        examples[latent] = tuple(
            ActivationExample(
                latent=latent,
                rank=r + 1,
                prompt_index=-neg_p,
                position=-neg_q,
                activation=value,
                start=start,
                token_ids=ids,
                tokens=tuple(text(i) for i in ids),
                activations=acts,
            )
            for r, (value, neg_p, neg_q, (start, ids, acts)) in enumerate(best)
        )
    meta = {
        "model": adapter_for(model).model_name,
        "sae": sae_identity(sae),
        "positions": positions if isinstance(positions, str) else "explicit",
        "include_bos": include_bos,
        "outlier_factor": outlier_factor,
        "n_outliers_dropped": n_outliers,
        "n_prompts": n_prompts,
    }
    return TopActivations(
        site=site,
        k=k,
        context=context,
        n_tokens=n_tokens,
        examples=examples,
        n_fired={latent: int(n_fired[j]) for j, latent in enumerate(lat)},
        meta=meta,
    )


def _gather_heaps(
    heaps: list[list[Any]], n_fired: Tensor, counts: tuple[int, int, int], k: int
) -> tuple[list[list[Any]], Tensor, tuple[int, int, int]] | None:
    """Every rank's heaps and counts, merged on rank 0 (``None`` elsewhere). The heap entries
    travel as JSON bytes in a uint8 tensor (nothing pickled); keys are total orders, so the
    merged top ``k`` is the one a single process keeps (json writes and reads inf and NaN)."""
    import torch.distributed as dist

    from .distributed import gather_states

    world = dist.get_world_size()
    local = {
        "heaps": [[[v, p, q, [w[0], list(w[1]), list(w[2])]] for v, p, q, w in h] for h in heaps],
        "n_fired": n_fired.tolist(),
        "counts": list(counts),
    }  # fmt: skip
    raw = torch.tensor(list(json.dumps(local).encode()), dtype=torch.uint8)
    parts: list[dict[str, Any]] = []
    is_root = gather_states(
        world,
        lambda _k: {"json": raw},
        {"json": torch.zeros(0, dtype=torch.uint8)},
        lambda state: parts.append(json.loads(bytes(state["json"].tolist()).decode())),
    )
    if not is_root:
        return None
    merged: list[list[Any]] = [[] for _ in heaps]
    fired = torch.zeros_like(n_fired)
    totals = [0, 0, 0]
    for part in parts:
        for j, h in enumerate(part["heaps"]):
            for v, p, q, w in h:
                window = (int(w[0]), tuple(int(i) for i in w[1]), tuple(float(a) for a in w[2]))
                merged[j].append((float(v), int(p), int(q), window))
        fired += torch.tensor(part["n_fired"], dtype=fired.dtype)
        totals = [a + int(b) for a, b in zip(totals, part["counts"], strict=True)]
    for j in range(len(merged)):  # the best k by (activation, earlier prompt, earlier position)
        merged[j] = sorted(merged[j], key=lambda e: e[:3], reverse=True)[:k]
        heapq.heapify(merged[j])
    return merged, fired, (totals[0], totals[1], totals[2])


def _scan_batch(
    b: Any,
    site: Site,
    sae: Any,
    lat_idx: Tensor,
    tokenized: Sequence[TokenizedPrompt],
    selections: Sequence[Sequence[int]],
    offset: int,
    heaps: list[list[Any]],
    n_fired: Tensor,
    *,
    k: int,
    context: int,
    outlier_factor: float | None,
) -> tuple[int, int]:
    """Fold one captured batch (every token of its prompts) into the heaps; (dropped, scanned)."""
    acts = _encode(sae, b.acts[site], lat_idx)  # [rows, latents]
    local, counts = torch.unique_consecutive(b.prompt_index, return_counts=True)
    starts: dict[int, int] = {}
    masks = []
    row = 0
    for p, n in zip(local.tolist(), counts.tolist()):
        starts[p] = row
        row += n
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.as_tensor(list(selections[p]), dtype=torch.long)] = True
        masks.append(m)
    selected = torch.cat(masks)
    if outlier_factor is not None:
        outlier = b.norm_ratio[site] > outlier_factor  # NaN is not an outlier
        dropped = int((selected & outlier).sum())
        candidate = selected & ~outlier
    else:
        dropped, candidate = 0, selected
    fired = candidate[:, None] & (acts > 0)
    n_fired += fired.sum(0)
    score = torch.where(fired, acts, torch.tensor(-math.inf))
    prompt = b.prompt_index + offset
    # rows in (prompt, position) order, so a stable sort breaks ties by the earlier token
    order = torch.argsort(prompt * (int(b.position.max()) + 1) + b.position)
    sorted_scores, where = torch.sort(score[order], dim=0, descending=True, stable=True)
    top = min(k, sorted_scores.shape[0])
    for j, heap in enumerate(heaps):
        for t in range(top):
            value = float(sorted_scores[t, j])
            if value == -math.inf:
                break
            r = int(order[where[t, j]])
            p_local, q = int(b.prompt_index[r]), int(b.position[r])
            key = (value, -(p_local + offset), -q)
            if len(heap) >= k and key <= heap[0][:3]:
                break  # the rest of this batch is worse still
            ids = tokenized[p_local].ids
            lo, hi = max(0, q - context), min(len(ids), q + context + 1)
            s0 = starts[p_local]
            window = (lo, tuple(ids[lo:hi]), tuple(acts[s0 + lo : s0 + hi, j].tolist()))
            if len(heap) >= k:
                heapq.heapreplace(heap, (*key, window))
            else:
                heapq.heappush(heap, (*key, window))
    return dropped, int(candidate.sum())


# ------------------------------------------------------------------------------------------------
# logit_lens
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogit:
    """One token of a logit-lens reading: its id, its text and the logit the direction gives it.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model = tiny_hooked_transformer()
        >>> top = logit_lens(model, model.W_U[:, 42].detach(), k=3).promoted[0]
        >>> type(top).__name__, top.token_id
        ('TokenLogit', 42)
        >>> TokenLogit(5, "fox", 2.0).to_dict()
        {'token_id': 5, 'token': 'fox', 'logit': 2.0}
    """

    token_id: int
    token: str
    logit: float

    def to_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "token": self.token, "logit": _finite(self.logit)}


@dataclass(frozen=True)
class LogitLens:
    """The tokens a direction promotes and suppresses through the unembedding.

    ``logits`` is the full vector ``W_U^T (scale ⊙ P(d))`` (see
    :meth:`~modeldiff.adapters.ModelAdapter.unembed_direction`); ``norm`` says how the final
    norm was folded in. Only differences between logits mean something: biases are left out.

    Example:
        >>> import torch
        >>> lens = LogitLens(source="direction", norm="ln_final: LayerNorm",
        ...                  promoted=(TokenLogit(5, "fox", 2.0),),
        ...                  suppressed=(TokenLogit(9, "dog", -1.0),), logits=torch.zeros(3))
        >>> lens.promoted_tokens, lens
        (['fox'], LogitLens(direction: promotes 'fox'; suppresses 'dog'))
    """

    source: str
    norm: str
    promoted: tuple[TokenLogit, ...]
    suppressed: tuple[TokenLogit, ...]
    logits: Tensor = field(repr=False, compare=False)

    @property
    def promoted_tokens(self) -> list[str]:
        return [t.token for t in self.promoted]

    @property
    def suppressed_tokens(self) -> list[str]:
        return [t.token for t in self.suppressed]

    def __repr__(self) -> str:
        up = ", ".join(repr(t.token) for t in self.promoted[:5])
        down = ", ".join(repr(t.token) for t in self.suppressed[:5])
        return f"LogitLens({self.source}: promotes {up}; suppresses {down})"

    def _repr_html_(self) -> str:
        def cells(items: tuple[TokenLogit, ...]) -> list[str]:
            return [
                f'<td style="font-family:monospace;white-space:pre">{_show(t.token)}</td>'
                f"<td>{t.token_id}</td><td>{t.logit:+.4g}</td>"
                for t in items
            ]

        up, down = cells(self.promoted), cells(self.suppressed)
        empty = "<td></td><td></td><td></td>"
        rows = "".join(
            f"<tr>{a}{b}</tr>" for a, b in itertools.zip_longest(up, down, fillvalue=empty)
        )
        return (
            f"<div><b>logit lens of {html.escape(self.source)}</b> "
            f"<small>({html.escape(self.norm)})</small><table><thead><tr>"
            "<th>promotes</th><th>id</th><th>logit</th><th>suppresses</th><th>id</th>"
            f"<th>logit</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the promoted and suppressed tokens; not the full logits)."""
        return {
            "source": self.source,
            "norm": self.norm,
            "promoted": [t.to_dict() for t in self.promoted],
            "suppressed": [t.to_dict() for t in self.suppressed],
        }


def _describe_direction(obj: Any) -> str:
    if _is_sae_pair(obj):
        return f"latent {int(obj[1])} (decoder row)"
    latent = getattr(obj, "latent", None)
    if hasattr(obj, "as_direction") and isinstance(latent, numbers.Integral):
        return f"latent {int(latent)} (decoder row)"
    return "direction"


def logit_lens(
    model: Any,
    direction: Float[Tensor, " d_model"] | Any,
    *,
    k: int = 10,
    fold_norm: bool = True,
) -> LogitLens:
    """The ``k`` tokens a direction promotes most and the ``k`` it suppresses most.

    ``direction`` is a vector, an ``(sae, latent)`` pair (the decoder row) or a LatentDiff row
    (:func:`~modeldiff.resolve_direction`). It is read as something *added to the last residual
    stream*: the final norm's elementwise scale is folded into it first, as the family applies
    it: RMSNorm ``γ⊙d``, Gemma-style RMSNorm ``(1+w)⊙d``, LayerNorm ``γ⊙(d − mean d)`` (the norm
    is recognised by probing its module; ``fold_norm=False`` skips it). Biases, the per-token
    ``1/rms`` and logit soft-caps do not depend on the direction and are left out, so the logits
    are comparable with each other, not with a forward pass. On processed weights
    (TransformerLens' folded norms and centred unembedding) the result is centred over the
    vocabulary; the ranking is the same. Ties go to the lower token id.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model = tiny_hooked_transformer()
        >>> lens = logit_lens(model, model.W_U[:, 42].detach(), k=3)
        >>> lens.promoted[0].token_id
        42
    """
    k = _count_arg(k, "k", 1)
    adapter = adapter_for(model)
    vec = resolve_direction(direction, d_model=adapter.d_model)
    logits = adapter.unembed_direction(vec, fold_norm=fold_norm).detach().float().cpu()
    fold = adapter.final_norm_fold().describe() if fold_norm else "final norm not folded"
    k = min(k, logits.numel())
    tok = get_tokenizer(model)

    def tokens(idx: Tensor) -> tuple[TokenLogit, ...]:
        return tuple(
            TokenLogit(int(i), tok.decode([int(i)]), float(logits[i])) for i in idx.tolist()
        )

    down = torch.sort(logits, descending=False, stable=True).indices[:k]
    up = torch.sort(logits, descending=True, stable=True).indices[:k]
    return LogitLens(
        source=_describe_direction(direction),
        norm=fold,
        promoted=tokens(up),
        suppressed=tokens(down),
        logits=logits,
    )


# ------------------------------------------------------------------------------------------------
# activation_histogram
# ------------------------------------------------------------------------------------------------


def activation_histogram(
    base: Any,
    finetuned: Any,
    sae: Any,
    latents: Any,
    prompts: Sequence[Prompt],
    *,
    bins: int = 40,
    positions: Positions = "all",
    site: Site | str | None = None,
    include_zeros: bool = False,
    log_y: bool = False,
    include_bos: bool = False,
    outlier_factor: float | None = 10.0,
    batch_size: int = 8,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    convert_sae: bool = False,
    progress: bool = True,
) -> Any:
    """A plotly figure: each latent's activation distribution on the base and the fine-tuned model.

    Both models read the same tokens (the base's tokenization; a token that is an outlier in
    either model leaves both, as in :func:`~modeldiff.diff_latents`), and the two histograms share
    their bins, overlaid, one panel per latent. By default only tokens where the latent fired are
    counted (``include_zeros=True`` adds the spike at 0); each legend entry gives the share of
    tokens that fired. ``log_y=True`` puts the counts on a log scale.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> fig = activation_histogram(tiny_hooked_transformer(), tiny_hooked_transformer(seed=1),
        ...                            StandardSAE(cfg), 3, ["The quick brown fox"], progress=False)
        >>> [t.name.split(" (")[0] for t in fig.data]
        ['base', 'fine-tuned']
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .models import check_compatible

    bins = _count_arg(bins, "bins", 1)
    sae = load_sae(sae)
    site = Site.parse(site) if site is not None else Site.from_sae(sae)
    check_compatible(base, finetuned)
    site.validate(base)
    site.validate(finetuned)
    sae = check_sae(sae, base, site, convert=convert_sae)
    check_sae(sae, finetuned, site)
    lat = _latent_list(latents, sae_d_sae(sae))
    lat_idx = torch.as_tensor(lat, dtype=torch.long)
    tokenized = tokenize_prompts(base, prompts, prepend_bos=prepend_bos, truncate=truncate)
    opts: dict[str, Any] = {
        "positions": positions,
        "batch_size": batch_size,
        "include_bos": include_bos,
        "tokenized": tokenized,
    }
    values: dict[str, list[Tensor]] = {"base": [], "fine-tuned": []}
    streams = zip(
        capture(base, prompts, site, progress=progress, desc="histogram (base)", **opts),
        capture(finetuned, prompts, site, progress=False, **opts),
    )
    with torch.inference_mode():
        for bb, bf in streams:
            keep = torch.ones(len(bb), dtype=torch.bool)
            if outlier_factor is not None:
                keep = ~(
                    (bb.norm_ratio[site] > outlier_factor) | (bf.norm_ratio[site] > outlier_factor)
                )
            values["base"].append(
                _encode(sae, bb.acts[site][keep.to(bb.acts[site].device)], lat_idx)
            )
            values["fine-tuned"].append(
                _encode(sae, bf.acts[site][keep.to(bf.acts[site].device)], lat_idx)
            )
            del bb, bf
    acts = {name: torch.cat(v) if v else torch.empty(0, len(lat)) for name, v in values.items()}
    n = acts["base"].shape[0]
    colors = {"base": "royalblue", "fine-tuned": "crimson"}
    titles = []
    for j, latent in enumerate(lat):
        freq = {
            name: float((a[:, j] > 0).float().mean()) if n else float("nan")
            for name, a in acts.items()
        }
        titles.append(
            f"latent {latent}: fired on {freq['base']:.1%} (base) vs {freq['fine-tuned']:.1%} "
            f"(fine-tuned) of {n:,} tokens"
        )
    fig = make_subplots(
        rows=len(lat), cols=1, subplot_titles=titles, vertical_spacing=0.12 if len(lat) > 1 else 0.2
    )
    for j, latent in enumerate(lat):
        shown = {
            name: (a[:, j] if include_zeros else a[:, j][a[:, j] > 0]) for name, a in acts.items()
        }
        shown = {name: v[torch.isfinite(v)] for name, v in shown.items()}
        both = torch.cat(list(shown.values()))
        lo, hi = (float(both.min()), float(both.max())) if both.numel() else (0.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = torch.linspace(lo, hi, bins + 1)
        width = float(edges[1] - edges[0])
        centers = ((edges[:-1] + edges[1:]) / 2).tolist()
        for name, v in shown.items():
            counts = (
                torch.histogram(v.double(), bins=edges.double()).hist
                if v.numel()
                else torch.zeros(bins)
            )
            fired = float((acts[name][:, j] > 0).float().mean()) if n else float("nan")
            fig.add_trace(
                go.Bar(
                    x=centers,
                    y=counts.tolist(),
                    width=width,
                    name=f"{name} (fired on {fired:.1%})",
                    legendgroup=name,
                    showlegend=j == 0,
                    marker={"color": colors[name]},
                    opacity=0.55,
                    hovertemplate=f"{name}<br>activation %{{x:.3g}}<br>%{{y}} tokens<extra></extra>",
                ),
                row=j + 1,
                col=1,
            )
        fig.update_xaxes(title_text=f"activation of latent {latent}", row=j + 1, col=1)
        fig.update_yaxes(
            title_text="tokens (log scale)" if log_y else "tokens",
            type="log" if log_y else "linear",
            row=j + 1,
            col=1,
        )
    which = "all tokens" if include_zeros else "tokens where it fired"
    fig.update_layout(
        title=f"Latent activations at {site.hook_name}, base vs fine-tuned ({which})",
        barmode="overlay",
        height=max(320, 280 * len(lat)),
        legend_title_text="model",
    )
    from .views import as_figure

    return as_figure(fig)
