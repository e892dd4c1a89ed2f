"""Attribution ranking: which latents carry the loss difference between two sets of completions.

The follow-up to the persona-features paper ranks latents by how much each one *causes* a model to
prefer misaligned over aligned completions, using one model only. For token ``t`` of a completion,
with ``a_t`` the activation at the SAE's site, ``g_t`` the gradient there of the completion's
loss (the summed negative log-likelihood of its response tokens), ``d_i`` latent ``i``'s unit
decoder direction and ``ā`` the mean activation over every selected token of both sets, the
first-order effect on the loss of mean-ablating the component along ``d_i`` is

    δ_i(t) ≈ −(g_t · d_i) ((a_t − ā) · d_i)

and latents are ranked by ``Δ attribution = mean δ over misaligned tokens − mean over aligned
tokens``. The result is a :class:`~modeldiff.diff.LatentDiff` ranked by its ``attribution``
column, so it steers, ablates and screens like any diff; its other columns compare the two sets'
SAE activations (``base`` = aligned completions, ``finetuned`` = misaligned ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ._hooks import eval_mode, restore_training
from .adapters import adapter_for
from .capture import capture
from .errors import ArgumentError
from .saes import check_sae, load_sae
from .sites import Site
from .stats import SiteStats
from .tokens import Positions, pad_batch, pad_id, select_positions, tokenize_prompts

__all__ = ["attribution_diff", "token_attributions"]


def token_attributions(
    grads: Float[Tensor, "n d"],
    acts: Float[Tensor, "n d"],
    mean: Float[Tensor, " d"],
    directions: Float[Tensor, "d_sae d"],
) -> Float[Tensor, "n d_sae"]:
    """``δ_i(t) = −(g_t·d_i)((a_t − ā)·d_i)`` for every token ``t`` and unit direction ``d_i``.

    Example:
        >>> import torch
        >>> g, a = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 1.0]])
        >>> token_attributions(g, a, torch.tensor([1.0, 1.0]), torch.eye(2))
        tensor([[-2., -0.]])
    """
    return -(grads @ directions.T) * ((acts - mean) @ directions.T)


def attribution_diff(
    model: Any,
    sae: Any,
    misaligned: Sequence[tuple[Any, str]],
    aligned: Sequence[tuple[Any, str]],
    *,
    site: Site | str | None = None,
    positions: Positions = "response",
    batch_size: int = 8,
    convert_sae: bool = False,
    progress: bool = True,
) -> Any:
    """Rank ``sae``'s latents by Δ attribution between misaligned and aligned completions.

    Args:
        model: one model (no second model is needed).
        sae: the SAE whose decoder directions are scored (its site by default).
        misaligned, aligned: ``(prompt, response)`` pairs; prompts are chats or strings.
        positions: which tokens' attributions are averaged (default: the response tokens).
        batch_size, convert_sae, progress: as in :func:`~modeldiff.diff_latents`.

    Returns:
        A ``LatentDiff`` ranked by ``attribution`` (``meta["kind"] == "attribution"``).

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> d = attribution_diff(m, StandardSAE(cfg), [("Hi", " go away")], [("Hi", " hello")],
        ...                      progress=False)
        >>> d.rank_by, d.top(1)[0].rank
        ('attribution', 1)
    """
    from .diff import LatentDiff

    for name, pairs in (("misaligned", misaligned), ("aligned", aligned)):
        if isinstance(pairs, (str, tuple)) or len(pairs) == 0:
            raise ArgumentError(f"{name} must be a non-empty list of (prompt, response) pairs")
        for i, p in enumerate(pairs):
            if not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], str)):
                raise ArgumentError(
                    f"{name}[{i}] is not a (prompt, response) pair; attribution needs completions"
                )
    sae = load_sae(sae)
    site = Site.parse(site) if site is not None else Site.from_sae(sae)
    sae = check_sae(sae, model, site, convert=convert_sae)
    adapter = adapter_for(model)
    d_model = adapter.d_model
    sets = {
        "misaligned": tokenize_prompts(model, list(misaligned)),
        "aligned": tokenize_prompts(model, list(aligned)),
    }
    selections = {k: select_positions(v, positions) for k, v in sets.items()}
    # the mean activation over every selected token of both sets (no gradients needed)
    total, count = torch.zeros(d_model, dtype=torch.float64), 0
    for key, tps in sets.items():
        stream = capture(
            model,
            [],
            site,
            positions=selections[key],
            include_bos=True,
            tokenized=tps,
            progress=False,
        )
        for b in stream:
            total += b.acts[site].double().sum(0).cpu()
            count += len(b)
            del b
    if count == 0:
        raise ArgumentError(f"positions={positions!r} selects no token of the completions")
    mean = (total / count).float()
    w = sae.W_dec.detach().float()
    directions = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    scores, stats = {}, {}
    for key, tps in sets.items():
        sums, n, st = _attribute(
            model, sae, site, tps, selections[key], mean, directions, batch_size, progress, key
        )
        scores[key], stats[key] = sums / max(n, 1), st
    column = scores["misaligned"] - scores["aligned"]
    meta = {
        "kind": "attribution",
        "positions": positions if isinstance(positions, str) else "explicit",
        "n_misaligned": len(misaligned),
        "n_aligned": len(aligned),
        "model": adapter.model_name,
    }
    return LatentDiff.from_stats(
        stats["aligned"],
        stats["misaligned"],
        site=site,
        sae=sae,
        rank_by="attribution",
        uncertainty=None,
        paired=False,
        extra_columns={"attribution": column},
        meta=meta,
    )


def _attribute(
    model: Any,
    sae: Any,
    site: Site,
    tokenized: Sequence[Any],
    selections: Sequence[Sequence[int]],
    mean: Tensor,
    directions: Tensor,
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[Tensor, int, SiteStats]:
    """Summed token attributions over one set of completions, and the set's SAE statistics."""
    adapter = adapter_for(model)
    device = adapter.input_device
    d_sae = directions.shape[0]
    sums = torch.zeros(d_sae, dtype=torch.float64)
    stats = SiteStats(d_sae, adapter.d_model, track_prompts=False)
    n = 0
    in_training = eval_mode(model)
    try:
        starts = range(0, len(tokenized), batch_size)
        for start in tqdm(starts, desc=f"attribution ({desc})", disable=not progress):
            chunk = list(range(start, min(start + batch_size, len(tokenized))))
            toks, mask, _ = pad_batch(
                [tokenized[i].ids for i in chunk],
                pad=pad_id(adapter.tokenizer),
                side="right",
                device=device,
            )
            held: list[Tensor] = []

            def hold(x: Tensor, hook: Any, held: list[Tensor] = held) -> Tensor:
                leaf = x.detach().requires_grad_(True)
                held.append(leaf)
                return leaf

            with torch.enable_grad():
                logits = adapter.run(toks, mask, hooks=[(site, hold)])
                assert logits is not None
                logp = torch.log_softmax(logits.float(), dim=-1)
                loss = logp.new_zeros(())
                for r, i in enumerate(chunk):
                    tp = tokenized[i]
                    idx = torch.arange(max(tp.n_prompt, 1), len(tp.ids), device=device)
                    loss = loss - logp[r, idx - 1, toks[r, idx]].sum()
                (grad,) = torch.autograd.grad(loss, held[0])
            rows = torch.cat(
                [
                    torch.full((len(selections[i]),), r, dtype=torch.long)
                    for r, i in enumerate(chunk)
                ]
            )
            cols = torch.cat(
                [torch.as_tensor(list(selections[i]), dtype=torch.long) for i in chunk]
            )
            a = held[0].detach()[rows.to(device), cols.to(device)].float()
            g = grad[rows.to(device), cols.to(device)].float()
            dev = directions.device
            sums += (
                token_attributions(g.to(dev), a.to(dev), mean.to(dev), directions)
                .double()
                .sum(0)
                .cpu()
            )
            n += len(rows)
            with torch.no_grad():
                stats.update(
                    sae.encode(a.to(sae.W_dec.device, sae.W_dec.dtype)),
                    a,
                    prompt_index=torch.as_tensor(chunk, dtype=torch.long)[rows],
                    position=cols,
                )
            del held, grad, logits, logp, loss
    finally:
        restore_training(in_training)
    return sums, n, stats
