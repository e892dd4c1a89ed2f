"""Train an SAE on any model modeldiff runs, and report how good it is on the base and the fine-tune.

:func:`train_sae` streams activations at one :class:`~modeldiff.Site` over a corpus (strings, chats,
``(prompt, response)`` pairs; :func:`modeldiff.build_corpus` makes one offline) through
:func:`modeldiff.capture` and so through the model's adapter (TransformerLens, Bridge or native
transformers models alike). BOS tokens and outlier tokens (a norm more than ``outlier_factor`` times
the median of their prompt's tokens: attention sinks reach 100x) are dropped, the rest shuffled in a
bounded buffer and fed to **sae-lens' own** ``SAETrainer``: any architecture sae-lens registers
(``topk``, ``batchtopk``, ``jumprelu``, ``standard``, ``gated``, ...), its losses, its dead-latent
auxiliary loss, its activation normalisation folded into the weights at the end. No SAE maths here.

:func:`evaluate_sae` (also run by :func:`train_sae` on held-out prompts) measures, on the same kept
tokens:

* **explained variance** ``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²`` (pooled over tokens and dimensions);
* **L0**, the mean number of active latents per token, and the **dead fraction**, the share of
  latents that never fire on those tokens;
* **CE loss recovered** ``(CE_zero − CE_sae) / (CE_zero − CE_clean)``: the next-token loss with the
  SAE's reconstruction spliced into the forward at the site (at the kept tokens only; BOS and
  outliers keep their own activations), against the clean loss and the loss with those activations
  set to zero; and the **KL** of the spliced (and of the zeroed) next-token distribution from the
  clean one. Scored at every prediction from the first spliced token on.

With ``finetuned=``, the same numbers on the fine-tuned model's activations tell whether the SAE
transfers to the fine-tune (the premise of diffing through it).

Example:
    >>> from modeldiff import Site
    >>> from modeldiff.testing import tiny_hooked_transformer
    >>> m = tiny_hooked_transformer()
    >>> texts = [f"the cat number {i} sat on the mat and looked at the dog" for i in range(20)]
    >>> result = train_sae(m, Site.resid_post(0), texts, d_sae=128, k=8, steps=20,
    ...                    batch_tokens=64, progress=False)
    >>> result.sae.cfg.metadata.hook_name, result.report.base.l0 <= 8
    ('blocks.0.hook_resid_post', True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from ._hooks import eval_mode, restore_training
from ._io import SaveError, _alive, _fsync_dir, write_json_atomic
from .adapters import adapter_for
from .capture import capture
from .errors import ArgumentError, FileFormatError, MissingFileError
from .sites import Site
from .tokens import Positions, Prompt, TokenizedPrompt, pad_batch, pad_id, tokenize_prompts

__all__ = [
    "REPORT_FILENAME",
    "SAEQuality",
    "SAEQualityReport",
    "SAETrainingResult",
    "evaluate_sae",
    "train_sae",
]

#: The report's file name inside a saved SAE folder.
REPORT_FILENAME = "quality_report.json"


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class SAEQuality:
    """How well an SAE reconstructs one model's activations at its site (see the module).

    ``n_tokens`` kept tokens were scored for explained variance, L0 and dead fraction; the CE and
    KL numbers average over ``n_predictions`` next-token predictions. A number that cannot be
    computed (no kept tokens; zero-ablation that changes nothing) is NaN.

    Example:
        >>> q = SAEQuality("base", 2, 10, 0, 0.9, 0.1, 8.0, 0.0, 9, 1.0, 1.1, 2.0, 0.9, 0.01, 0.5)
        >>> q.ce_loss_recovered, SAEQuality.from_dict(q.to_dict()) == q
        (0.9, True)
    """

    model: str
    n_prompts: int
    n_tokens: int
    n_outliers: int
    explained_variance: float
    mse: float  # mean over kept tokens of ‖x − x̂‖²
    l0: float
    dead_fraction: float
    n_predictions: int
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_loss_recovered: float
    kl_sae: float
    kl_zero: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (NaN becomes ``None``)."""
        return {
            k: (_num(v) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEQuality:
        return cls(**{k: (math.nan if v is None else v) for k, v in d.items()})


_METRICS = (
    ("explained_variance", "explained variance", "{:.3f}"),
    ("mse", "MSE per token", "{:.4g}"),
    ("l0", "L0 (active latents / token)", "{:.1f}"),
    ("dead_fraction", "dead fraction (never fire on these tokens)", "{:.1%}"),
    ("ce_loss_recovered", "CE loss recovered", "{:.3f}"),
    ("ce_clean", "CE clean", "{:.4f}"),
    ("ce_sae", "CE with SAE spliced in", "{:.4f}"),
    ("ce_zero", "CE with site zeroed", "{:.4f}"),
    ("kl_sae", "KL(clean ‖ SAE spliced)", "{:.4f}"),
    ("kl_zero", "KL(clean ‖ zeroed)", "{:.4f}"),
    ("n_tokens", "tokens scored", "{:d}"),
    ("n_outliers", "outlier tokens left out", "{:d}"),
)


@dataclass(frozen=True)
class SAEQualityReport:
    """What :func:`train_sae` trained and how good the SAE is, on the base and the fine-tune.

    ``base`` is measured on held-out prompts of the base model, ``finetuned`` (``None`` without
    ``finetuned=``) on the same prompts through the fine-tuned model. ``mse_curve`` is sae-lens'
    reconstruction loss at every training step (on its normalised activations).

    Example:
        >>> q = SAEQuality("base", 2, 10, 0, 0.9, 0.1, 8.0, 0.0, 9, 1.0, 1.1, 2.0, 0.9, 0.01, 0.5)
        >>> r = SAEQualityReport(site="blocks.0.hook_resid_post", architecture="topk", d_in=64,
        ...                      d_sae=128, k=8, steps=1, batch_tokens=8, lr=1e-3, seed=0,
        ...                      base=q)
        >>> SAEQualityReport.from_dict(r.to_dict()) == r
        True
        >>> "CE loss recovered" in r._repr_html_()
        True
    """

    site: str
    architecture: str
    d_in: int
    d_sae: int
    k: float | None
    steps: int
    batch_tokens: int
    lr: float
    seed: int
    base: SAEQuality
    finetuned: SAEQuality | None = None
    model: str = ""
    finetuned_model: str = ""
    positions: str = "all"
    outlier_factor: float = 10.0
    n_train_prompts: int = 0
    n_eval_prompts: int = 0
    n_train_tokens: int = 0  # tokens fed to the trainer (steps × batch_tokens)
    n_corpus_tokens: int = 0  # kept tokens read in the first pass over the training prompts
    n_train_outliers: int = 0  # outlier tokens left out in that pass
    epochs: float = 0.0  # passes over the training prompts read (the buffer reads a little ahead)
    dead_fraction_train: float = math.nan  # sae-lens' dead latents at the end (its window)
    train_seconds: float = 0.0
    mse_curve: tuple[float, ...] = ()
    corpus: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what :meth:`save` writes); :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, SAEQuality):
                v = v.to_dict()
            elif isinstance(v, float):
                v = _num(v)
            elif isinstance(v, tuple):
                v = [_num(x) for x in v]
            out[f.name] = v
        out["format"] = "modeldiff.SAEQualityReport/1"
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEQualityReport:
        d = {k: v for k, v in d.items() if k != "format"}
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}  # fields added later load as defaults
        d["base"] = SAEQuality.from_dict(d["base"])
        if d.get("finetuned") is not None:
            d["finetuned"] = SAEQuality.from_dict(d["finetuned"])
        for key in ("dead_fraction_train",):
            if key in d and d[key] is None:
                d[key] = math.nan
        d["mse_curve"] = tuple(math.nan if x is None else x for x in d.get("mse_curve", ()))
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SAEQualityReport:
        """Read a report :meth:`save` wrote (a folder: its ``quality_report.json``)."""
        p = Path(path)
        if p.is_dir():
            p = p / REPORT_FILENAME
        if not p.exists():
            raise MissingFileError(
                f"no SAE quality report at {str(p)!r}; train_sae(..., out=folder) writes "
                f"{REPORT_FILENAME} into the folder"
            )
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise FileFormatError(
                f"{str(p)!r} cannot be read as an SAE quality report ({err}); re-create it with "
                "train_sae(..., out=folder) or report.save(path)"
            ) from err

    @property
    def transfer(self) -> dict[str, float] | None:
        """Fine-tuned minus base, for explained variance, CE recovered, L0 and KL (None without one)."""
        if self.finetuned is None:
            return None
        keys = ("explained_variance", "ce_loss_recovered", "l0", "kl_sae")
        return {k: getattr(self.finetuned, k) - getattr(self.base, k) for k in keys}

    def summary(self) -> str:
        """A few lines of plain text: what was trained and the main numbers."""
        head = (
            f"{self.architecture} SAE at {self.site}: d_sae {self.d_sae}"
            + (f", k {self.k:g}" if self.k is not None else "")
            + f", {self.steps} steps x {self.batch_tokens} tokens in {self.train_seconds:.0f}s"
        )
        lines = [head]
        for q in (self.base, self.finetuned):
            if q is not None:
                lines.append(
                    f"  {q.model}: EV {q.explained_variance:.3f}, L0 {q.l0:.1f}, dead "
                    f"{q.dead_fraction:.1%}, CE recovered {q.ce_loss_recovered:.3f}, KL "
                    f"{q.kl_sae:.4f} ({q.n_tokens} tokens)"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        from .views import html_table

        cols = [self.base] + ([self.finetuned] if self.finetuned is not None else [])
        rows = []
        for key, label, fmt in _METRICS:
            cells = []
            for q in cols:
                v = getattr(q, key)
                finite = not (isinstance(v, float) and not math.isfinite(v))
                cells.append(fmt.format(v) if finite else "n/a")
            rows.append((label, *cells))
        return html_table(
            ("metric", *(q.model for q in cols)), rows, self.summary().splitlines()[0]
        )


@dataclass
class SAETrainingResult:
    """What :func:`train_sae` returns: the inference SAE, its report, and where it was saved.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> texts = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(8)]
        >>> r = train_sae(tiny_hooked_transformer(), "blocks.0.hook_resid_post", texts, d_sae=32,
        ...               k=4, steps=3, batch_tokens=16, progress=False)
        >>> r.path is None, "<table>" in r._repr_html_(), str(r).startswith("topk SAE")
        (True, True, True)
    """

    sae: Any
    report: SAEQualityReport
    path: Path | None = None

    def _repr_html_(self) -> str:
        return self.report._repr_html_()

    def __str__(self) -> str:
        return self.report.summary() + (f"\n  saved to {self.path}" if self.path else "")


# ------------------------------------------------------------------------------------------------
# Activations for the trainer
# ------------------------------------------------------------------------------------------------


class _StreamStats:
    def __init__(self) -> None:
        self.epochs_started = 0
        self.tokens_first_epoch = 0
        self.outliers_first_epoch = 0
        self.tokens_total = 0
        self.tokens_per_epoch = 0
        self.prompts_read = 0  # over all passes; / len(prompts) = passes read


def _permute_positions(positions: Positions, order: list[int]) -> Positions:
    return positions if isinstance(positions, str) else [positions[i] for i in order]


def _kept_stream(
    model: Any,
    site: Site,
    tokenized: Sequence[TokenizedPrompt],
    *,
    positions: Positions,
    outlier_factor: float,
    batch_size: int,
    seed: int,
    stats: _StreamStats,
) -> Iterator[Float[Tensor, "n d"]]:
    """Kept activations (BOS and outliers dropped), epoch after epoch, prompts in a seeded order."""
    while True:
        epoch = stats.epochs_started
        stats.epochs_started += 1
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(tokenized), generator=g).tolist()
        toks = [tokenized[i] for i in order]
        got = 0
        for b in capture(
            model,
            toks,  # type: ignore[arg-type]
            site,
            positions=_permute_positions(positions, order),
            tokenized=toks,
            batch_size=batch_size,
            include_bos=False,
            sort_by_length=False,  # the seeded order is the epoch's shuffle
            progress=False,
        ):
            ratio = b.norm_ratio[site]
            keep = torch.isfinite(ratio) & (ratio <= outlier_factor)
            acts = b.acts[site][keep.to(b.acts[site].device)].float()
            stats.prompts_read += int(b.prompt_index.unique().numel())
            if epoch == 0:
                stats.tokens_first_epoch += int(keep.sum())
                stats.outliers_first_epoch += int((~keep).sum())
            got += len(acts)
            stats.tokens_total += len(acts)
            del b
            if len(acts):
                yield acts
        if got == 0:
            raise ArgumentError(
                "no training tokens are left at this site: every selected token is a BOS or an "
                f"outlier (norm > outlier_factor={outlier_factor} x its prompt's median), or the "
                "positions select nothing. Pass longer prompts, positions='all', or a larger "
                "outlier_factor"
            )
        if epoch == 0:
            stats.tokens_per_epoch = got


def _mixed_batches(
    stream: Iterator[Float[Tensor, "n d"]], *, batch_tokens: int, buffer_tokens: int, seed: int
) -> Iterator[Float[Tensor, "batch_tokens d"]]:
    """Batches of ``batch_tokens`` drawn from a shuffled buffer of at most ~``buffer_tokens`` rows.

    When the buffer is full it is shuffled, half of it leaves as batches and the rest waits to be
    mixed with new tokens (sae-lens' mixing-buffer scheme), so consecutive batches do not come from
    the same few prompts.
    """
    g = torch.Generator().manual_seed(seed + 7)
    parts: list[Tensor] = []
    n = 0
    for chunk in stream:
        parts.append(chunk)
        n += len(chunk)
        if n < buffer_tokens:
            continue
        buf = torch.cat(parts)
        buf = buf[torch.randperm(len(buf), generator=g).to(buf.device)]
        out = max(batch_tokens, (len(buf) // 2) // batch_tokens * batch_tokens)
        for i in range(0, out, batch_tokens):
            yield buf[i : i + batch_tokens]
        parts, n = [buf[out:]], len(buf) - out


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def _splice_hook(mask: Bool[Tensor, "b s"], replace: Any) -> Any:
    def hook(x: Tensor, hook: Any) -> Tensor:
        m = mask.to(x.device)
        out = x.clone()
        out[m] = replace(x[m]).to(x.dtype)
        return out

    return hook


@torch.no_grad()
def evaluate_sae(
    sae: Any,
    model: Any,
    prompts: Sequence[Prompt],
    *,
    site: Site | str | None = None,
    positions: Positions = "all",
    outlier_factor: float = 10.0,
    batch_size: int = 4,
    label: str = "base",
    tokenized: Sequence[TokenizedPrompt] | None = None,
    progress: bool = False,
) -> SAEQuality:
    """Explained variance, L0, dead fraction, CE loss recovered and KL of ``sae`` on ``model``.

    Tokens are selected as :func:`train_sae` selects training tokens (``positions``, BOS dropped,
    outliers above ``outlier_factor`` left out); see the module for each number's definition.
    ``site`` defaults to the SAE's own (``Site.from_sae``). Works with any SAE whose ``encode`` /
    ``decode`` are sae-lens'.

    Example:
        >>> from sae_lens import TopKSAE, TopKSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=32, k=4))
        >>> q = evaluate_sae(sae, tiny_hooked_transformer(), ["a b c d e f"],
        ...                  site="blocks.0.hook_resid_post")
        >>> q.l0 <= 4, q.n_tokens > 0
        (True, True)
    """
    site = Site.from_sae(sae) if site is None else Site.parse(site)
    site.validate(model)
    adapter = adapter_for(model)
    if tokenized is None:
        tokenized = tokenize_prompts(model, prompts, truncate=True)
    sae_dtype = next(sae.parameters()).dtype
    sae_device = next(sae.parameters()).device
    d_sae = int(sae.cfg.d_sae)

    def reconstruct(x: Tensor) -> Tensor:
        xs = x.to(device=sae_device, dtype=sae_dtype)
        return sae.decode(sae.encode(xs)).to(x.device)

    # 1. the kept tokens and the reconstruction numbers (float64 sums: residual means are large)
    kept: list[list[int]] = [[] for _ in tokenized]
    n_tok = n_out = 0
    sum_x = sum_xx = sum_err = sum_l0 = None
    fired = torch.zeros(d_sae, dtype=torch.bool)
    for b in capture(
        model,
        tokenized,  # type: ignore[arg-type]
        site,
        positions=positions,
        tokenized=tokenized,
        batch_size=batch_size,
        include_bos=False,
        progress=False,
    ):
        ratio = b.norm_ratio[site]
        keep = torch.isfinite(ratio) & (ratio <= outlier_factor)
        n_out += int((~keep).sum())
        for p, pos in zip(b.prompt_index[keep].tolist(), b.position[keep].tolist(), strict=True):
            kept[p].append(pos)
        x = b.acts[site][keep.to(b.acts[site].device)]
        if not len(x):
            continue
        z = sae.encode(x.to(device=sae_device, dtype=sae_dtype))
        xh = sae.decode(z).double().cpu()
        xd = x.double().cpu()
        n_tok += len(xd)
        s_x, s_xx = xd.sum(0), xd.pow(2).sum()
        s_err, s_l0 = (xd - xh).pow(2).sum(), (z != 0).sum().double().cpu()
        sum_x = s_x if sum_x is None else sum_x + s_x
        sum_xx = s_xx if sum_xx is None else sum_xx + s_xx
        sum_err = s_err if sum_err is None else sum_err + s_err
        sum_l0 = s_l0 if sum_l0 is None else sum_l0 + s_l0
        fired |= (z != 0).any(0).cpu()
    if n_tok:
        assert sum_x is not None and sum_xx is not None and sum_err is not None
        total = float(sum_xx - sum_x.pow(2).sum() / n_tok)
        ev = 1.0 - float(sum_err) / total if total > 0 else math.nan
        mse, l0 = float(sum_err) / n_tok, float(sum_l0) / n_tok
        dead = float((~fired).float().mean())
    else:
        ev = mse = l0 = dead = math.nan

    # 2. the next-token losses, clean / SAE spliced in / zeroed, at the kept tokens
    pad = pad_id(adapter.tokenizer)
    dev = adapter.input_device
    order = [i for i in range(len(tokenized)) if kept[i]]
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl = {"sae": 0.0, "zero": 0.0}
    n_pred = 0
    in_training = eval_mode(model)
    try:
        for start in tqdm(
            range(0, len(order), batch_size), desc=f"evaluate SAE ({label})", disable=not progress
        ):
            idx = order[start : start + batch_size]
            toks, mask, _ = pad_batch([tokenized[i].ids for i in idx], pad=pad, side="right")
            splice = torch.zeros(toks.shape, dtype=torch.bool)
            scored = torch.zeros(toks.shape, dtype=torch.bool)  # predictions from position t
            for r, i in enumerate(idx):
                splice[r, kept[i]] = True
                scored[r, min(kept[i]) : len(tokenized[i]) - 1] = True
            if not scored.any():
                continue
            toks_d, mask_d = toks.to(dev), mask.to(dev)
            targets = toks[:, 1:]
            clean = adapter.logits(toks_d, mask_d)
            lp_clean = _scored_logprobs(clean, scored)
            del clean
            tgt = targets[scored[:, :-1]]
            ce["clean"] += float(-lp_clean.gather(1, tgt[:, None].to(lp_clean.device)).sum())
            for name, fn in (("sae", reconstruct), ("zero", torch.zeros_like)):
                logits = adapter.run(toks_d, mask_d, hooks=[(site, _splice_hook(splice, fn))])
                assert logits is not None
                lp = _scored_logprobs(logits, scored)
                del logits
                ce[name] += float(-lp.gather(1, tgt[:, None].to(lp.device)).sum())
                kl[name] += float((lp_clean.exp() * (lp_clean - lp)).sum())
            n_pred += int(scored.sum())
    finally:
        restore_training(in_training)
    if n_pred:
        ce = {k: v / n_pred for k, v in ce.items()}
        kl = {k: v / n_pred for k, v in kl.items()}
        gap = ce["zero"] - ce["clean"]
        recovered = (ce["zero"] - ce["sae"]) / gap if abs(gap) > 1e-12 else math.nan
    else:
        ce = {k: math.nan for k in ce}
        kl = {k: math.nan for k in kl}
        recovered = math.nan
    return SAEQuality(
        model=label,
        n_prompts=len(tokenized),
        n_tokens=n_tok,
        n_outliers=n_out,
        explained_variance=ev,
        mse=mse,
        l0=l0,
        dead_fraction=dead,
        n_predictions=n_pred,
        ce_clean=ce["clean"],
        ce_sae=ce["sae"],
        ce_zero=ce["zero"],
        ce_loss_recovered=recovered,
        kl_sae=kl["sae"],
        kl_zero=kl["zero"],
    )


def _scored_logprobs(
    logits: Float[Tensor, "b s v"], scored: Bool[Tensor, "b s"]
) -> Float[Tensor, "n v"]:
    """Log-probabilities (float32) of the predictions made at the ``scored`` positions."""
    return logits[scored.to(logits.device)].float().log_softmax(-1)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _architectures() -> list[str]:
    import sae_lens  # noqa: F401  (registers the architectures)
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    return sorted(SAE_TRAINING_CLASS_REGISTRY)


def _training_sae(
    architecture: str,
    *,
    d_in: int,
    d_sae: int,
    k: float | None,
    device: str,
    normalize_activations: str,
    metadata: Any,
    options: dict[str, Any],
) -> tuple[Any, float | None]:
    from sae_lens.registry import get_sae_training_class

    known = _architectures()
    if architecture not in known:
        raise ArgumentError(
            f"architecture={architecture!r} is not one sae-lens can train; use one of "
            f"{', '.join(known)}"
        )
    sae_cls, cfg_cls = get_sae_training_class(architecture)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    kwargs: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": device,
        "normalize_activations": normalize_activations,
        "metadata": metadata,
    }
    if "k" in names:  # topk, batchtopk, matryoshka_batchtopk, ...
        k = 32 if k is None else k
        kwargs["k"] = int(k) if architecture == "topk" else k
    elif "target_l0" in names:  # jumprelu: DeepMind's quadratic L0 loss towards k active latents
        if k is not None:
            kwargs["jumprelu_sparsity_loss_mode"] = "quadratic"
            kwargs["target_l0"] = float(k)
    elif k is not None:
        raise ArgumentError(
            f"k={k} has no meaning for architecture={architecture!r} (its sparsity is a penalty); "
            "leave k out and set the penalty with sae_options, e.g. "
            "sae_options={'l1_coefficient': 5.0}"
        )
    unknown = sorted(set(options) - names)
    if unknown:
        raise ArgumentError(
            f"sae_options {unknown} are not fields of sae-lens' {cfg_cls.__name__}; its fields "
            f"are: {', '.join(sorted(names))}"
        )
    kwargs.update(options)
    return sae_cls(cfg_cls(**kwargs)), kwargs.get("k", kwargs.get("target_l0"))


def _trainer_config(
    *, steps: int, batch_tokens: int, lr: float, device: str, options: dict[str, Any]
) -> Any:
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    window = max(20, min(1000, steps // 10))
    kwargs: dict[str, Any] = {
        "total_training_samples": steps * batch_tokens,
        "train_batch_size_samples": batch_tokens,
        "lr": lr,
        "lr_scheduler_name": "constant",
        "lr_warm_up_steps": steps // 20,
        "lr_decay_steps": steps // 5,
        "lr_end": lr / 10,
        "device": device,
        # a latent silent for `window` steps counts as dead (TopK's aux loss revives those)
        "dead_feature_window": window,
        "feature_sampling_window": window,
        "n_batches_for_norm_estimate": 8,
        "logger": LoggingConfig(log_to_wandb=False),
    }
    names = {f.name for f in dataclasses.fields(SAETrainerConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ArgumentError(
            f"trainer_options {unknown} are not fields of sae-lens' SAETrainerConfig; its fields "
            f"are: {', '.join(sorted(names))}"
        )
    kwargs.update(options)
    return SAETrainerConfig(**kwargs)


class _quiet_trainer_bar:
    """Disable (or keep) the progress bars sae-lens' trainer opens (training, norm estimate)."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> None:
        if self.progress:
            return
        import sae_lens.training.activation_scaler as scaler_module
        import sae_lens.training.sae_trainer as trainer_module

        for module in (trainer_module, scaler_module):
            original = module.tqdm
            self.saved.append((module, original))

            def quiet(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                return _original(*args, **{**kwargs, "disable": True})

            module.tqdm = quiet  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        for module, original in self.saved:
            module.tqdm = original  # type: ignore[assignment]
        self.saved.clear()


def _split(n: int, eval_fraction: float, max_eval: int, seed: int) -> tuple[list[int], list[int]]:
    if n < 2:
        raise ArgumentError(
            f"the corpus has {n} prompt(s); train_sae needs at least 2 (one to train on, one held "
            "out), or pass eval_corpus=... . modeldiff.build_corpus(n=...) makes one offline"
        )
    n_eval = min(max_eval, max(1, round(n * eval_fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _corpus_info(corpus: Sequence[Any]) -> dict[str, Any]:
    from .corpus import content_hash

    manifest = getattr(corpus, "manifest", None)
    if isinstance(manifest, dict):
        return dict(manifest)
    try:
        return {"n": len(corpus), "hash": content_hash(list(corpus))}
    except TypeError:  # token-id tensors: not JSON
        return {"n": len(corpus)}


def train_sae(
    model: Any,
    site: Site | str,
    corpus: Sequence[Prompt],
    *,
    d_sae: int,
    architecture: str = "topk",
    k: float | None = None,
    steps: int = 2000,
    batch_tokens: int = 4096,
    lr: float = 5e-4,
    positions: Positions = "all",
    outlier_factor: float = 10.0,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    finetuned: Any = None,
    eval_corpus: Sequence[Prompt] | None = None,
    eval_fraction: float = 0.1,
    max_eval_prompts: int = 64,
    buffer_tokens: int | None = None,
    batch_size: int = 8,
    normalize_activations: str = "expected_average_only_in",
    sae_options: dict[str, Any] | None = None,
    trainer_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> SAETrainingResult:
    """Train an SAE at ``site`` of ``model`` on a corpus with sae-lens' trainer; report its quality.

    Args:
        model: any model :func:`~modeldiff.load_model` returns (hooked, bridge or native).
        site: where (a :class:`~modeldiff.Site` or hook name such as ``"blocks.6.hook_resid_post"``).
        corpus: prompts: strings, chats, ``(prompt, response)`` pairs or token ids (e.g.
            :func:`~modeldiff.build_corpus`). Prompts longer than the context are cut.
        d_sae: the number of latents.
        architecture: any architecture sae-lens can train (``"topk"``, ``"batchtopk"``,
            ``"jumprelu"``, ``"standard"``, ``"gated"``, ``"matryoshka_batchtopk"``, ...).
        k: the sparsity: active latents per token for the TopK family (default 32), the target L0
            of JumpReLU's quadratic L0 loss (default: sae-lens' own step loss). Architectures with
            an L1 penalty take it in ``sae_options`` instead.
        steps, batch_tokens, lr: training steps, tokens per step and the peak learning rate (a
            5% warm-up and a decay over the last 20% of the steps, to ``lr / 10``).
        positions: which tokens train the SAE: ``"all"``, ``"response"``, ... (as in
            :func:`~modeldiff.capture`). A leading BOS is always left out.
        outlier_factor: tokens whose norm exceeds this many times the median norm of their
            prompt's tokens are left out of training and evaluation (``math.inf``: keep all).
        seed: the prompt order, the held-out split, the buffer's shuffle and the SAE's
            initialisation; the same seed gives the same weights.
        out: a folder to save to (sae-lens' format: ``cfg.json``, ``sae_weights.safetensors``,
            plus ``quality_report.json``), written to a temporary folder and renamed into place.
        overwrite: replace an existing non-empty ``out``.
        finetuned: a fine-tuned model with the same tokenizer; the report then also measures the
            SAE on its activations over the same held-out prompts.
        eval_corpus: held-out prompts (default: ``eval_fraction`` of ``corpus``, at most
            ``max_eval_prompts``, drawn with ``seed`` and not trained on).
        buffer_tokens: the shuffle buffer's size in tokens (default ``16 * batch_tokens``).
        batch_size: prompts per model forward.
        normalize_activations: sae-lens' input normalisation (the default scales activations to
            norm ``sqrt(d_in)`` while training and folds the scale into the saved weights).
        sae_options, trainer_options: further fields of sae-lens' training-SAE config and of its
            ``SAETrainerConfig`` (checked against them).
        progress: show progress bars (training steps with the current MSE, and the evaluation);
            sae-lens' own bars are always silenced.

    Returns:
        :class:`SAETrainingResult` with the inference SAE (``cfg.metadata.hook_name`` is the site,
        so :meth:`Site.from_sae` finds it), the :class:`SAEQualityReport` and the saved path.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> texts = [f"note {i}: a red fox runs past the old grey barn" for i in range(12)]
        >>> r = train_sae(m, "blocks.1.hook_resid_post", texts, d_sae=64, architecture="jumprelu",
        ...               steps=10, batch_tokens=32, progress=False)
        >>> type(r.sae).__name__, r.report.base.n_tokens > 0
        ('JumpReLUSAE', True)
    """
    from sae_lens.saes.sae import SAEMetadata

    from .saes import to_inference_sae

    site = Site.parse(site)
    site.validate(model)
    adapter = adapter_for(model)
    for name, value in (("d_sae", d_sae), ("steps", steps), ("batch_tokens", batch_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ArgumentError(f"lr must be positive, got {lr}")
    if not outlier_factor > 1:
        raise ArgumentError(
            f"outlier_factor={outlier_factor} would drop ordinary tokens (their norm is about the "
            "median); use a value above 1, e.g. 10, or math.inf to keep every token"
        )
    if out is not None:
        _check_out(Path(out), overwrite)
    if finetuned is not None:
        from .models import check_compatible

        check_compatible(model, finetuned)

    prompts = list(corpus)
    tokenized = tokenize_prompts(model, prompts, truncate=True)
    if eval_corpus is None:
        train_idx, eval_idx = _split(len(prompts), eval_fraction, max_eval_prompts, seed)
        train_tok = [tokenized[i] for i in train_idx]
        eval_tok = [tokenized[i] for i in eval_idx]
        train_pos = _permute_positions(positions, train_idx)
        eval_pos = _permute_positions(positions, eval_idx)
    else:
        train_tok, train_pos = tokenized, positions
        eval_tok = tokenize_prompts(model, list(eval_corpus), truncate=True)
        eval_pos = positions if isinstance(positions, str) else "all"

    device = str(adapter.site_device(site))
    metadata = SAEMetadata(
        model_name=adapter.model_name,
        hook_name=site.hook_name,
        context_size=adapter.n_ctx,
        prepend_bos=adapter.default_prepend_bos,
        modeldiff_positions=positions if isinstance(positions, str) else "explicit",
        modeldiff_outlier_factor=outlier_factor if math.isfinite(outlier_factor) else None,
    )
    stats = _StreamStats()
    batches = _mixed_batches(
        _kept_stream(
            model,
            site,
            train_tok,
            positions=train_pos,
            outlier_factor=outlier_factor,
            batch_size=batch_size,
            seed=seed,
            stats=stats,
        ),
        batch_tokens=batch_tokens,
        buffer_tokens=buffer_tokens if buffer_tokens is not None else 16 * batch_tokens,
        seed=seed,
    )
    curve: list[float] = []
    fork_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        training_sae, k_used = _training_sae(
            architecture,
            d_in=adapter.d_model,
            d_sae=d_sae,
            k=k,
            device=device,
            normalize_activations=normalize_activations,
            metadata=metadata,
            options=dict(sae_options or {}),
        )
        trainer = _make_trainer(
            training_sae,
            batches,
            _trainer_config(
                steps=steps,
                batch_tokens=batch_tokens,
                lr=lr,
                device=device,
                options=dict(trainer_options or {}),
            ),
            curve,
        )
        # our own bar, moved every step (sae-lens' moves every 100 steps, so a slow run looks stuck)
        bar = tqdm(
            total=steps, desc=f"train SAE at {site.hook_name}", unit="step", disable=not progress
        )
        trainer_step = trainer.step

        def step_with_bar(batch: Tensor) -> Any:
            output = trainer_step(batch)
            bar.update(1)
            if bar.n % 10 == 0 or bar.n == steps:
                bar.set_postfix(mse=f"{curve[-1]:.4g}", refresh=False)
            return output

        trainer.step = step_with_bar  # type: ignore[method-assign]
        try:
            with _quiet_trainer_bar(False):
                trained = trainer.fit()
        finally:
            bar.close()
    train_seconds = time.perf_counter() - t0
    dead_train = float(trainer.dead_neurons.float().mean())
    sae = to_inference_sae(trained)
    sae.cfg.metadata.hook_name = site.hook_name
    sae.eval()

    base_q = evaluate_sae(
        sae,
        model,
        [],
        site=site,
        positions=eval_pos,
        outlier_factor=outlier_factor,
        batch_size=max(1, batch_size // 2),
        label="base",
        tokenized=eval_tok,
        progress=progress,
    )
    ft_q = None
    if finetuned is not None:
        ft_q = evaluate_sae(
            sae,
            finetuned,
            [],
            site=site,
            positions=eval_pos,
            outlier_factor=outlier_factor,
            batch_size=max(1, batch_size // 2),
            label="finetuned",
            tokenized=eval_tok,
            progress=progress,
        )
    report = SAEQualityReport(
        site=site.hook_name,
        architecture=architecture,
        d_in=adapter.d_model,
        d_sae=d_sae,
        k=None if k_used is None else float(k_used),
        steps=steps,
        batch_tokens=batch_tokens,
        lr=lr,
        seed=seed,
        base=base_q,
        finetuned=ft_q,
        model=adapter.model_name,
        finetuned_model=adapter_for(finetuned).model_name if finetuned is not None else "",
        positions=positions if isinstance(positions, str) else "explicit",
        outlier_factor=outlier_factor,
        n_train_prompts=len(train_tok),
        n_eval_prompts=len(eval_tok),
        n_train_tokens=steps * batch_tokens,
        n_corpus_tokens=stats.tokens_first_epoch,
        n_train_outliers=stats.outliers_first_epoch,
        epochs=stats.prompts_read / max(1, len(train_tok)),
        dead_fraction_train=dead_train,
        train_seconds=train_seconds,
        mse_curve=tuple(curve),
        corpus=_corpus_info(corpus),
        versions=_versions(),
    )
    path = _save_folder(sae, report, Path(out), overwrite) if out is not None else None
    return SAETrainingResult(sae=sae, report=report, path=path)


def _make_trainer(
    training_sae: Any, batches: Iterator[Tensor], cfg: Any, curve: list[float]
) -> Any:
    """sae-lens' trainer over our batches, recording its MSE loss at every step."""
    from sae_lens.training.sae_trainer import SAETrainer

    trainer = SAETrainer(cfg=cfg, sae=training_sae, data_provider=batches)
    step = trainer.step

    def recorded(batch: Tensor) -> Any:
        output = step(batch)
        mse = output.losses.get("mse_loss", output.loss)
        curve.append(float(mse.detach() if isinstance(mse, Tensor) else mse))
        return output

    trainer.step = recorded  # type: ignore[method-assign]  # fit() calls self.step per batch
    return trainer


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for name in ("modeldiff", "sae-lens", "torch", "transformer-lens", "transformers"):
        with suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SaveError(f"cannot save the SAE to {str(out)!r}: it is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SaveError(
            f"{str(out)!r} already exists and is not empty; pass overwrite=True to replace it, or "
            "another folder"
        )


def _remove_stale_folders(parent: Path, name: str) -> None:
    from ._io import _TMP

    with suppress(OSError):
        for entry in parent.iterdir():
            m = _TMP.match(entry.name)
            mine = m and entry.name.startswith(f".{name}.") and entry.is_dir()
            if mine and not _alive(int(m.group(1))):
                shutil.rmtree(entry, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _save_folder(sae: Any, report: SAEQualityReport, out: Path, overwrite: bool) -> Path:
    """Write the SAE (sae-lens' ``save_model``) and the report into a temporary folder beside
    ``out``, then rename it into place: ``out`` is complete or absent (or the old one)."""
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_folders(out.parent, out.name)
    tag = f"modeldiff-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    tmp = out.parent / f".{out.name}.{tag}"
    old = out.parent / f".{out.name}.old.{tag}"
    try:
        sae.save_model(tmp)
        write_json_atomic(tmp / REPORT_FILENAME, report.to_dict())
        _fsync_tree(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out
