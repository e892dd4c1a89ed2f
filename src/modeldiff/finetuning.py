"""Supervised fine-tuning with the loss on response tokens only, resumable, with training-time defences.

:func:`finetune` trains a *copy* of a model on chats (or ``(prompt, response)`` pairs): the loss is
the next-token cross-entropy of the response tokens only (the final assistant turn, its
end-of-turn tokens included), averaged over all response tokens of a batch. The prompt tokens are
context, never targets; :func:`modeldiff.tokenize_prompts` says where each prompt ends.

* ``method="lora"``: a LoRA adapter (peft) on a transformers model run natively
  (``load_model(folder, wrapper="native")``). The base weights are shared with the input model and
  never change; :func:`modeldiff.save_model` saves the adapter folder. A model that already is a
  LoRA fine-tune continues training its own adapter.
* ``method="full"``: every parameter of a copy (transformers models and HookedTransformers).

Checkpoints (``checkpoint_every=N``, ``checkpoint_dir=...``) are single safetensors files written
atomically, holding the trained weights, the optimizer state, the RNG state and the step; resuming
from one gives exactly the run that was not interrupted (bit for bit on CPU).

Training-time interventions:

* **preventative steering**: ``interventions=(steer(...),)`` are applied to the model during every
  training forward and removed afterwards (also on errors), so the fine-tune need not move the
  model along the steered direction itself;
* **latent blocking** (BLOCK-EM): ``block=block_latents(sae, [k, ...])`` adds
  ``λ · mean_t Σ_k ReLU(z_k − z_k^ref)²`` over response tokens, where ``z`` are the SAE's latents at
  its site and ``z^ref`` those of the frozen starting model on the same batch (or fixed values),
  so the chosen latents may not rise (``falling=`` latents may not fall).

:func:`realign` is the paper's emergent re-alignment as one call: fine-tune on benign data and
score misalignment along the way.

Example:
    >>> from modeldiff.testing import tiny_hooked_transformer
    >>> from modeldiff.datasets import narrow_dataset
    >>> model = tiny_hooked_transformer(n_ctx=256)
    >>> run = finetune(model, narrow_dataset("medical", n=8), method="full", steps=3,
    ...                lr=1e-3, batch_size=4, progress=False)
    >>> tuned, curve = run
    >>> len(curve.loss), tuned is model
    (3, False)
"""

from __future__ import annotations

import copy
import hashlib
import html
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ._hooks import eval_mode, restore_training
from ._io import atomic_path, write_json_atomic
from .adapters import adapter_for
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    FileFormatError,
    MissingFileError,
    UnsupportedError,
    reading,
)
from .sites import Site
from .tokens import TokenizedPrompt, pad_batch, pad_id, tokenize_prompts

__all__ = [
    "FinetuneResult",
    "LatentBlock",
    "LossCurve",
    "RealignmentCurve",
    "block_latents",
    "finetune",
    "realign",
    "response_loss",
]

FORMAT = "modeldiff.finetune/1"
_CKPT = re.compile(r"^step-(\d+)\.safetensors$")


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossCurve:
    """The training loss per step: ``loss`` = ``sft`` (response cross-entropy) + ``penalty``.

    ``step[i]`` is the 1-based step whose batch gave ``loss[i]`` (measured before that step's
    update). ``penalty`` is the latent-blocking term (0 without ``block=``).

    Example:
        >>> c = LossCurve((1, 2), (2.0, 1.5), (2.0, 1.5), (0.0, 0.0), (1e-3, 1e-3))
        >>> c.final, len(c)
        (1.5, 2)
    """

    step: tuple[int, ...]
    loss: tuple[float, ...]
    sft: tuple[float, ...]
    penalty: tuple[float, ...]
    lr: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.step)

    @property
    def final(self) -> float:
        """The last step's loss (NaN before any step)."""
        return self.loss[-1] if self.loss else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, JSON-ready."""
        return {k: list(getattr(self, k)) for k in ("step", "loss", "sft", "penalty", "lr")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LossCurve:
        """The inverse of :meth:`to_dict`."""
        return cls(
            tuple(int(s) for s in d["step"]),
            *(tuple(float(x) for x in d[k]) for k in ("loss", "sft", "penalty", "lr")),
        )

    def plot(self, *, title: str | None = None) -> Any:
        """A plotly figure of the loss (and its parts when a penalty was used) against the step."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_trace(go.Scatter(x=list(self.step), y=list(self.loss), name="loss"))
        if any(self.penalty):
            fig.add_trace(go.Scatter(x=list(self.step), y=list(self.sft), name="response CE"))
            fig.add_trace(go.Scatter(x=list(self.step), y=list(self.penalty), name="block penalty"))
        fig.update_layout(
            title=title or "fine-tuning loss", xaxis_title="step", yaxis_title="loss", height=360
        )
        from .views import as_figure

        return as_figure(fig)

    def _repr_html_(self) -> str:
        """A table of the loss at up to 12 evenly spaced steps (the first and last included)."""
        from .views import html_table

        n = len(self.step)
        picks = sorted({round(i * (n - 1) / 11) for i in range(12)}) if n > 12 else range(n)
        rows = [
            (self.step[i], f"{self.loss[i]:.4f}", f"{self.sft[i]:.4f}", f"{self.penalty[i]:.4g}",
             f"{self.lr[i]:.3g}")
            for i in picks
        ]  # fmt: skip
        return html_table(
            ("step", "loss", "response CE", "block penalty", "learning rate"),
            rows,
            f"fine-tuning loss over {n} steps" + (f" (every {n // 11}th shown)" if n > 12 else ""),
        )

    def __repr__(self) -> str:
        if not self.step:
            return "LossCurve(no steps)"
        return (
            f"LossCurve(steps {self.step[0]}..{self.step[-1]}, loss {self.loss[0]:.4f} -> "
            f"{self.loss[-1]:.4f})"
        )


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` returns; unpacks as ``model, curve = finetune(...)``.

    Attributes:
        model: the trained copy (the input model is never changed).
        curve: the loss per step.
        checkpoints: the checkpoint files written by this call.
        resumed_from: the step the run resumed from (0 for a fresh run).

    Example:
        >>> curve = LossCurve((1, 2), (2.0, 1.5), (2.0, 1.5), (0.0, 0.0), (1e-3, 1e-3))
        >>> run = FinetuneResult(model=torch.nn.Linear(2, 2), curve=curve)
        >>> model, curve = run  # unpacks like a (model, curve) pair
        >>> type(model).__name__, curve.final, run.checkpoints, run.resumed_from
        ('Linear', 1.5, (), 0)
    """

    model: Any
    curve: LossCurve
    checkpoints: tuple[Path, ...] = ()
    resumed_from: int = 0

    def __iter__(self) -> Iterator[Any]:
        yield self.model
        yield self.curve

    def _repr_html_(self) -> str:
        """The loss table, with where the run resumed and which checkpoints it wrote."""
        note = f"resumed from step {self.resumed_from}; " if self.resumed_from else ""
        note += f"{len(self.checkpoints)} checkpoint(s) written" if self.checkpoints else ""
        return (f"<p>{html.escape(note)}</p>" if note else "") + self.curve._repr_html_()


# ------------------------------------------------------------------------------------------------
# Latent blocking
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LatentBlock:
    """A BLOCK-EM penalty on SAE latents; build it with :func:`block_latents`.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16))
        >>> block = block_latents(sae, [3], falling=[5], site="blocks.0.hook_resid_post")
        >>> block.all_latents, block.encode(torch.randn(4, 8)).shape  # rising, then falling
        ((3, 5), torch.Size([4, 2]))
    """

    sae: Any = field(repr=False)
    latents: tuple[int, ...]
    falling: tuple[int, ...] = ()
    weight: float = 1e4
    site: Site | None = None
    reference: Any = field(default="base", repr=False)

    @property
    def all_latents(self) -> tuple[int, ...]:
        return (*self.latents, *self.falling)

    def encode(self, acts: Float[Tensor, "n d_model"]) -> Float[Tensor, "n k"]:
        """The blocked latents' activations (rising ones first, then falling ones)."""
        sae_param = next(iter(self.sae.parameters()), None)
        if sae_param is not None:
            acts = acts.to(device=sae_param.device, dtype=sae_param.dtype)
        z = self.sae.encode(acts)
        return z[:, list(self.all_latents)].float()

    def penalty(
        self, z: Float[Tensor, "n k"], z_ref: Float[Tensor, "n k"] | Float[Tensor, " k"]
    ) -> Tensor:
        """``weight · mean_t [Σ_{K+} ReLU(z − z_ref)² + Σ_{K−} ReLU(z_ref − z)²]``.

        Example:
            >>> b = LatentBlock(sae=None, latents=(0,), falling=(1,), weight=2.0)
            >>> float(b.penalty(torch.tensor([[3.0, 0.0]]), torch.tensor([1.0, 1.0])))
            10.0
        """
        k = len(self.latents)
        over = F.relu(z[:, :k] - (z_ref[..., :k]))
        under = F.relu(z_ref[..., k:] - z[:, k:])
        per_token = over.pow(2).sum(-1) + under.pow(2).sum(-1)
        return self.weight * per_token.mean()


def block_latents(
    sae: Any,
    latents: Sequence[int],
    *,
    falling: Sequence[int] = (),
    weight: float = 1e4,
    reference: Any = "base",
    site: Site | str | None = None,
) -> LatentBlock:
    """The latent-blocking penalty of BLOCK-EM, for :func:`finetune`'s ``block=``.

    Args:
        sae: an sae-lens SAE (its ``encode`` is used, with gradients to the model).
        latents: latents that may not *rise* above the reference (K+).
        falling: latents that may not *fall* below it (K−).
        weight: λ (BLOCK-EM uses ~1e4 on real models).
        reference: ``"base"``: the latents of the frozen starting model on the same batch (one
            extra forward per step, stopped at the site); another model: its latents; or a tensor
            of fixed values, one per latent (``latents`` then ``falling``), e.g. base means.
        site: where the SAE reads; default its own hook (``Site.from_sae``).

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=32))
        >>> block_latents(sae, [3], site="blocks.0.hook_resid_post")
        LatentBlock(latents=(3,), falling=(), weight=10000.0, site=Site.resid_post(0))
    """
    if not hasattr(sae, "encode"):
        raise ArgumentTypeError(
            f"block_latents needs an SAE with an encode() method, got {type(sae).__name__}; "
            "load one with modeldiff.load_sae(...)."
        )
    rising, down = tuple(int(k) for k in latents), tuple(int(k) for k in falling)
    if not rising and not down:
        raise ArgumentError("block_latents needs at least one latent (latents= or falling=)")
    d_sae = getattr(getattr(sae, "cfg", None), "d_sae", None)
    bad = [k for k in (*rising, *down) if d_sae is not None and not 0 <= k < d_sae]
    if bad:
        raise ArgumentError(f"latents {bad} are out of range for an SAE with {d_sae} latents")
    if not weight >= 0 or not math.isfinite(weight):
        raise ArgumentError(f"weight must be a finite number >= 0, got {weight}")
    if isinstance(reference, str) and reference != "base":
        raise ArgumentError(f"reference must be 'base', a model or a tensor, got {reference!r}")
    if isinstance(reference, Tensor):
        reference = reference.detach().float().flatten()
        if reference.numel() != len(rising) + len(down):
            raise ArgumentError(
                f"a fixed reference needs one value per blocked latent ({len(rising) + len(down)}: "
                f"latents then falling), got {reference.numel()}"
            )
    site_ = Site.parse(site) if site is not None else Site.from_sae(sae)
    return LatentBlock(sae, rising, down, float(weight), site_, reference)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def _as_pair(i: int, ex: Any) -> Any:
    if isinstance(ex, (TokenizedPrompt, tuple)):
        return ex
    if isinstance(ex, Sequence) and not isinstance(ex, str) and ex and isinstance(ex[-1], Mapping):
        last = ex[-1]
        if last.get("role") != "assistant":
            raise ArgumentError(
                f"example {i} ends with a {last.get('role')!r} turn; a training chat must end with "
                "the assistant's answer (the tokens that carry the loss)."
            )
        if len(ex) < 2:
            raise ArgumentError(f"example {i} is only an assistant turn; add the user's prompt.")
        return (list(ex[:-1]), str(last["content"]))
    raise ArgumentTypeError(
        f"example {i} is a {type(ex).__name__}; pass chats (lists of role/content messages ending "
        "with the assistant), (prompt, response) pairs or TokenizedPrompts."
    )


def _targets(
    model: Any, dataset: Sequence[Any], loss_on: str, truncate: bool
) -> tuple[list[tuple[int, ...]], list[list[int]]]:
    """Token ids per example and the positions whose token carries the loss."""
    if isinstance(dataset, (str, Mapping)) or len(dataset) == 0:
        raise ArgumentError("the dataset is empty or not a list of examples; pass a list of chats")
    pairs = [_as_pair(i, ex) for i, ex in enumerate(dataset)]
    todo = [(i, p) for i, p in enumerate(pairs) if not isinstance(p, TokenizedPrompt)]
    tokenized: list[Any] = list(pairs)
    if todo:
        for (i, _), tp in zip(
            todo, tokenize_prompts(model, [p for _, p in todo], truncate=truncate)
        ):
            tokenized[i] = tp
    ids, targets = [], []
    for i, tp in enumerate(tokenized):
        if loss_on == "assistant":
            if tp.assistant is None:
                raise ArgumentError(
                    f"loss_on='assistant' needs the assistant turns' positions, which could not be "
                    f"located for example {i} (slow tokenizer or token-id input); use "
                    "loss_on='response'."
                )
            pos = [t for t in tp.assistant if t > 0]
        else:
            pos = list(range(max(tp.n_prompt, 1), len(tp.ids)))
        if not pos:
            raise ArgumentError(
                f"example {i} has no response tokens to train on (empty answer, or cut by "
                "truncation); give it a non-empty final assistant turn."
            )
        ids.append(tuple(tp.ids))
        targets.append(pos)
    return ids, targets


def _collate(
    ids: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad: int, device: Any
) -> tuple[Tensor, Tensor, Tensor]:
    toks, mask, _ = pad_batch(ids, pad=pad, side="right", device=device)
    tmask = torch.zeros_like(mask, dtype=torch.bool)
    for r, pos in enumerate(targets):
        tmask[r, list(pos)] = True
    return toks, mask, tmask


def _sft_loss(logits: Tensor, toks: Tensor, tmask: Tensor) -> Tensor:
    # the token at position t is predicted from position t - 1
    sel = tmask[:, 1:]
    return F.cross_entropy(logits[:, :-1][sel].float(), toks[:, 1:][sel])


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The dataset rows of 0-based ``step``: consecutive slices of per-epoch seeded permutations."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = perm[offset : offset + batch_size - len(out)].tolist()
        out += take
        pos += len(take)
    return out


def response_loss(
    model: Any,
    dataset: Sequence[Any],
    *,
    batch_size: int = 8,
    loss_on: Literal["response", "assistant"] = "response",
) -> float:
    """Mean next-token cross-entropy over the response tokens of ``dataset`` (what finetune trains).

    Averaged over all response tokens (longer answers weigh more), as in training. Any
    interventions active on ``model`` apply.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> from modeldiff.datasets import narrow_dataset
        >>> loss = response_loss(tiny_hooked_transformer(n_ctx=256), narrow_dataset("benign", n=4))
        >>> loss > 0
        True
    """
    adapter = adapter_for(model)
    ids, targets = _targets(model, dataset, loss_on, False)
    pad = pad_id(adapter.tokenizer)
    total, count = 0.0, 0
    in_training = eval_mode(model)
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                sl = slice(start, start + batch_size)
                toks, mask, tmask = _collate(ids[sl], targets[sl], pad, adapter.input_device)
                logits = adapter.logits(toks, mask)
                n = int(tmask[:, 1:].sum())
                total += float(_sft_loss(logits, toks, tmask)) * n
                count += n
    finally:
        restore_training(in_training)
    return total / count


# ------------------------------------------------------------------------------------------------
# Models to train
# ------------------------------------------------------------------------------------------------


def _peft_owner(model: Any) -> Any:
    return getattr(model, "__dict__", {}).get("_modeldiff_peft")


def _is_tl(model: Any) -> bool:
    return hasattr(model, "cfg") and hasattr(model, "hook_dict")


def _keep_tokenizer(model: Any) -> dict[int, Any]:
    tok = getattr(model, "tokenizer", None)
    return {} if tok is None else {id(tok): tok}


def _trainable_copy(
    model: Any,
    method: str,
    *,
    rank: int,
    alpha: float | None,
    dropout: float,
    targets: Sequence[str] | None,
    seed: int,
) -> tuple[Any, list[tuple[str, torch.nn.Parameter]], Callable[[], None], dict[str, Any]]:
    """A copy to train, its trainable parameters, an undo for flags changed on shared tensors,
    and the LoRA settings used (recorded in checkpoints)."""
    owner = _peft_owner(model)
    if method == "full":
        if owner is not None:
            raise UnsupportedError(
                "this model is a LoRA fine-tune; continue it with method='lora', or merge it "
                "first (save_model(model, folder, merge=True), then load_model(folder)) to train "
                "every weight."
            )
        tuned = copy.deepcopy(model, _keep_tokenizer(model))
        params = [(n, p) for n, p in tuned.named_parameters() if p.requires_grad]
        if not params:
            raise ArgumentError(
                "the model has no parameter with requires_grad=True; unfreeze the ones to train."
            )
        return tuned, params, lambda: None, {}
    if method != "lora":
        raise ArgumentError(f"method must be 'lora' or 'full', got {method!r}")
    if _is_tl(model):
        raise UnsupportedError(
            f"LoRA trains transformers models run natively, and this is a {type(model).__name__}. "
            "Load the checkpoint with load_model(folder, wrapper='native') for LoRA, or pass "
            "method='full'."
        )
    from .models import _is_hf_model, _require_peft, _share_weights, load_model

    peft = _require_peft()
    if owner is not None:  # continue the existing adapter, on a copy sharing the frozen base
        memo = (
            {id(p): p for n, p in owner.named_parameters() if "lora_" not in n}
            | {id(b): b for b in owner.buffers()}
            | _keep_tokenizer(model)
        )
        peft_model = copy.deepcopy(owner, memo)
        settings: dict[str, Any] = {"continued": True}
    else:
        if not _is_hf_model(model):
            raise UnsupportedError(
                f"LoRA needs a transformers model (load_model(folder, wrapper='native')); got a "
                f"{type(model).__name__}. Use method='full'."
            )
        flags_before = [(p, p.requires_grad) for p in model.parameters()]
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank if alpha is None else alpha,
            lora_dropout=dropout,
            target_modules=None if targets is None else list(targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                peft_model = peft.get_peft_model(_share_weights(model), config)
            except ValueError as err:
                raise ArgumentError(
                    f"peft could not place LoRA layers on this model ({err}); pass "
                    "lora_targets=[...] naming its linear modules (e.g. ['q_proj', 'v_proj'])."
                ) from err
        for p, flag in flags_before:  # peft froze the shared tensors: restore, freeze below
            p.requires_grad_(flag)
        settings = {
            "rank": rank,
            "alpha": config.lora_alpha,
            "dropout": dropout,
            "targets": sorted(peft_model.peft_config["default"].target_modules),
        }
    inner = peft_model.base_model.model
    object.__setattr__(inner, "_modeldiff_peft", peft_model)
    tuned = load_model(peft_model)
    params = [(n, p) for n, p in tuned.named_parameters() if "lora_" in n]
    shared = [p for n, p in tuned.named_parameters() if "lora_" not in n]
    flags = [(p, p.requires_grad) for p in shared]
    for p in shared:  # the base stays frozen while training (no gradients computed for it)
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)

    def undo() -> None:
        for p, flag in flags:
            p.requires_grad_(flag)

    return tuned, params, undo, settings


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def _ckpt_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}.safetensors"


def _latest(folder: Path) -> Path | None:
    found = sorted(
        (int(m.group(1)), p)
        for p in (folder.iterdir() if folder.is_dir() else ())
        if (m := _CKPT.match(p.name))
    )
    return found[-1][1] if found else None


def _save_checkpoint(
    path: Path,
    step: int,
    params: Sequence[tuple[str, Tensor]],
    opt: torch.optim.Optimizer,
    curve: dict[str, list[float]],
    config: dict[str, Any],
) -> Path:
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for name, p in params:
        tensors[f"param/{name}"] = p.detach().to("cpu", copy=True).contiguous()
    state = opt.state_dict()["state"]
    for i, st in state.items():
        for key, value in st.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value)
            tensors[f"optim/{i}/{key}"] = t.detach().to("cpu", copy=True).contiguous()
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{d}"] = s
    for key, values in curve.items():
        tensors[f"curve/{key}"] = torch.tensor(values, dtype=torch.float64)
    meta = {"format": FORMAT, "step": str(step), "config": json.dumps(config, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise MissingFileError(
            f"no checkpoint at {str(path)!r}; pass a file written by finetune(checkpoint_dir=...) "
            "or resume=True to pick the latest one in checkpoint_dir."
        )
    with reading(path, "a finetune checkpoint"), safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    if meta.get("format") != FORMAT:
        raise FileFormatError(
            f"{str(path)!r} is not a finetune checkpoint (format {meta.get('format')!r}, expected "
            f"{FORMAT!r}); pass a file written by finetune(checkpoint_dir=...)."
        )
    return tensors, meta


def _fingerprint(ids: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for row, pos in zip(ids, targets):
        h.update(json.dumps([list(row), list(pos)]).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# finetune
# ------------------------------------------------------------------------------------------------


def finetune(
    model: Any,
    dataset: Sequence[Any],
    *,
    method: Literal["lora", "full"] = "lora",
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int = 8,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] | None = None,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    checkpoint_every: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    seed: int = 0,
    interventions: Sequence[Any] = (),
    block: LatentBlock | None = None,
    loss_on: Literal["response", "assistant"] = "response",
    truncate: bool = False,
    callback: Callable[[int, Any], None] | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on ``dataset`` with the loss on response tokens only.

    Args:
        model: a transformers model run natively (``load_model(folder, wrapper="native")``;
            LoRA or full), a LoRA fine-tune loaded that way (LoRA continues its adapter), or a
            HookedTransformer (full). Never changed.
        dataset: chats ending with the assistant turn (e.g. :func:`modeldiff.datasets.narrow_dataset`),
            ``(prompt, response)`` pairs, or :class:`~modeldiff.TokenizedPrompt` (then
            ``ids[n_prompt:]`` is the response).
        method: ``"lora"`` (peft adapter; base weights frozen and shared) or ``"full"``.
        steps: the step to train up to (a resumed run continues from its checkpoint's step).
        lr, weight_decay, max_grad_norm, warmup_steps: AdamW, gradient clipping, linear warmup.
        batch_size: examples per step, drawn as consecutive slices of a seeded permutation per
            epoch (so step ``s`` always sees the same batch).
        lora_rank, lora_alpha, lora_dropout, lora_targets: the LoRA adapter (alpha defaults to
            2 × rank; targets to peft's default for the architecture).
        checkpoint_every, checkpoint_dir: write a checkpoint every N steps (and at the last step)
            into the folder: ``step-NNNNNNN.safetensors`` with the trained weights, optimizer, RNG
            state and the loss curve so far.
        resume: ``True`` continues from the latest checkpoint in ``checkpoint_dir`` (starting
            fresh when there is none), or pass a checkpoint file. Its settings must match this
            call's (except ``steps``); the result equals the uninterrupted run's.
        seed: LoRA initialisation, batch order and dropout.
        interventions: e.g. ``steer(...)`` objects, applied during every training forward
            (preventative steering) and removed afterwards, on errors too. They are not applied
            during ``callback``.
        block: a latent-blocking penalty from :func:`block_latents` (BLOCK-EM).
        loss_on: ``"response"``: the final assistant turn with its end-of-turn tokens;
            ``"assistant"``: the content of every assistant turn.
        truncate: cut examples longer than the context window instead of raising.
        callback: ``callback(step, model)`` at the starting step and after every step, with the
            model in eval mode and no interventions (:func:`realign` scores there).
        progress: show a progress bar.

    Returns:
        a :class:`FinetuneResult`: ``model, curve = finetune(...)``.

    Example:
        >>> import tempfile
        >>> from modeldiff import load_model
        >>> from modeldiff.testing import save_tiny_hf_model
        >>> from modeldiff.datasets import narrow_dataset
        >>> base = load_model(save_tiny_hf_model("llama", tempfile.mkdtemp()), wrapper="native")
        >>> data = narrow_dataset("financial", n=8)
        >>> run = finetune(base, data, method="lora", steps=2, lr=1e-2, batch_size=4,
        ...                lora_rank=2, truncate=True, progress=False)
        >>> sorted({n.split(".")[-3] for n, _ in run.model.named_parameters() if "lora_" in n})
        ['lora_A', 'lora_B']
        >>> run.curve.step
        (1, 2)
    """
    from tqdm.auto import tqdm

    if not isinstance(steps, int) or steps < 0:
        raise ArgumentError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not lr > 0:
        raise ArgumentError(f"lr must be > 0, got {lr}")
    if loss_on not in ("response", "assistant"):
        raise ArgumentError(f"loss_on must be 'response' or 'assistant', got {loss_on!r}")
    if checkpoint_every is not None and (
        not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ArgumentError(
            f"checkpoint_every must be a positive integer, got {checkpoint_every!r}"
        )
    folder = None if checkpoint_dir is None else Path(checkpoint_dir).expanduser()
    if checkpoint_every is not None and folder is None:
        raise ArgumentError("checkpoint_every needs checkpoint_dir=<folder> to write into")
    if resume is True and folder is None:
        raise ArgumentError("resume=True looks for checkpoints in checkpoint_dir; pass it too")
    interventions = tuple(interventions)
    for iv in interventions:
        if not callable(getattr(iv, "apply", None)):
            raise ArgumentTypeError(
                f"interventions must be modeldiff interventions (steer, ablate, project_out), got "
                f"{type(iv).__name__}"
            )
    if block is not None and not isinstance(block, LatentBlock):
        raise ArgumentTypeError("block must come from modeldiff.block_latents(sae, latents, ...)")

    ids, targets = _targets(model, dataset, loss_on, truncate)
    config = {
        "method": method,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "max_grad_norm": max_grad_norm,
        "loss_on": loss_on,
        "data": _fingerprint(ids, targets),
        "block": None
        if block is None
        else [list(block.latents), list(block.falling), block.weight, str(block.site)],
        "interventions": [repr(iv) for iv in interventions],
    }
    ckpt: Path | None = None
    if resume is True:
        ckpt = _latest(folder)  # type: ignore[arg-type]
    elif resume not in (False, None):
        ckpt = Path(resume).expanduser()  # type: ignore[arg-type]
    loaded = None if ckpt is None else _load_checkpoint(ckpt)

    tuned, params, undo, lora = _trainable_copy(
        model,
        method,
        rank=lora_rank,
        alpha=lora_alpha,
        dropout=lora_dropout,
        targets=lora_targets,
        seed=seed,
    )
    try:  # until the training loop's own finally: undo the frozen flags on any error
        config["lora"] = lora
        adapter = adapter_for(tuned)
        device = adapter.input_device
        pad = pad_id(adapter.tokenizer)
        opt = torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=weight_decay)
        curve: dict[str, list[float]] = {k: [] for k in ("step", "loss", "sft", "penalty", "lr")}
        start = 0
        rng_state: dict[str, Tensor] = {}
        if loaded is not None:
            tensors, meta = loaded
            start, curve, rng_state = _restore(ckpt, tensors, meta, config, params, opt)  # type: ignore[arg-type]
            if start > steps:
                raise ArgumentError(
                    f"the checkpoint {str(ckpt)!r} is at step {start}, beyond steps={steps}; pass "
                    f"steps >= {start} (or resume from an earlier checkpoint)."
                )
        base = model
        if block is not None:
            adapter.check_site(block.site)  # type: ignore[arg-type]
            if not isinstance(block.reference, (str, Tensor)):
                base = block.reference
    except BaseException:
        undo()
        raise
    sae_flags = [] if block is None else [(p, p.requires_grad) for p in block.sae.parameters()]
    for p, _ in sae_flags:
        p.requires_grad_(False)

    written: list[Path] = []
    cuda = [device.index or 0] if device.type == "cuda" else []
    handles: list[Any] = []

    def attach() -> None:
        for iv in interventions:
            handles.append(iv.apply(tuned))

    def detach() -> None:
        while handles:
            handles.pop().remove()

    def report(step: int) -> None:
        if callback is None:
            return
        detach()
        tuned.eval()
        try:
            with torch.random.fork_rng(devices=cuda):  # scoring must not shift training's RNG
                callback(step, tuned)
        finally:
            tuned.train()
            attach()

    grabbed: dict[str, Tensor] = {}

    def grab(x: Tensor, hook: Any) -> None:
        grabbed["acts"] = x

    hooks = [] if block is None else [(block.site, grab)]
    try:
        with torch.random.fork_rng(devices=cuda):
            if rng_state:
                torch.set_rng_state(rng_state["cpu"])
                for d, s in rng_state.get("cuda", {}).items():  # type: ignore[union-attr]
                    torch.cuda.set_rng_state(s, d)
            else:
                torch.manual_seed(seed)
            tuned.train()
            attach()
            report(start)
            bar = tqdm(
                total=steps, initial=start, desc=f"fine-tune ({method})", disable=not progress
            )
            for step in range(start, steps):
                rows = _batch_indices(len(ids), batch_size, seed, step)
                toks, mask, tmask = _collate(
                    [ids[r] for r in rows], [targets[r] for r in rows], pad, device
                )
                step_lr = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
                for g in opt.param_groups:
                    g["lr"] = step_lr
                grabbed.clear()
                logits = adapter.run(toks, mask, hooks=hooks)
                sft = _sft_loss(logits, toks, tmask)
                pen = torch.zeros((), device=sft.device)
                if block is not None:
                    pen = _block_penalty(block, base, grabbed["acts"], toks, mask, tmask)
                    pen = pen.to(sft.device)
                loss = sft + pen
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], max_grad_norm)
                opt.step()
                for key, v in (
                    ("step", step + 1),
                    ("loss", float(loss.detach())),
                    ("sft", float(sft.detach())),
                    ("penalty", float(pen.detach())),
                    ("lr", step_lr),
                ):
                    curve[key].append(v)
                bar.update(1)
                bar.set_postfix(loss=f"{curve['loss'][-1]:.4f}")
                done = step + 1
                if (
                    folder is not None
                    and checkpoint_every is not None
                    and (done % checkpoint_every == 0 or done == steps)
                ):
                    written.append(
                        _save_checkpoint(_ckpt_path(folder, done), done, params, opt, curve, config)
                    )
                report(done)
            bar.close()
    finally:
        detach()
        tuned.eval()
        undo()
        for p, flag in sae_flags:
            p.requires_grad_(flag)
        with suppress(Exception):
            tuned.zero_grad(set_to_none=True)
    result_curve = LossCurve(
        tuple(int(s) for s in curve["step"]),
        *(tuple(float(x) for x in curve[k]) for k in ("loss", "sft", "penalty", "lr")),
    )
    return FinetuneResult(tuned, result_curve, tuple(written), start)


def _restore(
    path: Path,
    tensors: dict[str, Tensor],
    meta: dict[str, str],
    config: dict[str, Any],
    params: Sequence[tuple[str, torch.nn.Parameter]],
    opt: torch.optim.Optimizer,
) -> tuple[int, dict[str, list[float]], dict[str, Any]]:
    saved = json.loads(meta["config"])
    differ = sorted(
        k for k in set(saved) | set(config) if saved.get(k) != json.loads(json.dumps(config.get(k)))
    )
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in differ)
        raise ArgumentError(
            f"the checkpoint {str(path)!r} was written by a run with other settings ({detail}); "
            "resume with the same dataset and settings (only steps may change), or start fresh "
            "with resume=False."
        )
    names = {n for n, _ in params}
    stored = {k[len("param/") :] for k in tensors if k.startswith("param/")}
    if stored != names:
        raise FileFormatError(
            f"the checkpoint {str(path)!r} holds other trainable weights than this model has "
            f"({len(stored)} vs {len(names)}); resume with the model the run started from."
        )
    with torch.no_grad():
        for n, p in params:
            p.copy_(tensors[f"param/{n}"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, i, name = key.split("/", 2)
            state.setdefault(int(i), {})[name] = value
    sd = opt.state_dict()
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    curve = {k: tensors[f"curve/{k}"].tolist() for k in ("step", "loss", "sft", "penalty", "lr")}
    curve["step"] = [int(s) for s in curve["step"]]
    rng: dict[str, Any] = {"cpu": tensors["rng/cpu"]}
    cuda = {int(k.rsplit("/", 1)[1]): v for k, v in tensors.items() if k.startswith("rng/cuda/")}
    if cuda and torch.cuda.is_available():
        rng["cuda"] = cuda
    return int(meta["step"]), curve, rng


def _block_penalty(
    block: LatentBlock, base: Any, acts: Tensor, toks: Tensor, mask: Tensor, tmask: Tensor
) -> Tensor:
    """The blocking term on the response tokens of this batch."""
    sel = tmask
    z = block.encode(acts[sel])
    if isinstance(block.reference, Tensor):
        z_ref = block.reference.to(z.device)
    else:
        grabbed: dict[str, Tensor] = {}

        def grab(x: Tensor, hook: Any) -> None:
            grabbed["acts"] = x

        base_adapter = adapter_for(base)
        with torch.no_grad():
            base_adapter.run(
                toks.to(base_adapter.input_device),
                mask.to(base_adapter.input_device),
                hooks=[(block.site, grab)],
                stop_at=block.site,
            )
            z_ref = block.encode(grabbed["acts"][sel.to(grabbed["acts"].device)]).to(z.device)
    return block.penalty(z, z_ref)


# ------------------------------------------------------------------------------------------------
# realign
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RealignmentCurve:
    """Misalignment along a re-alignment fine-tune (what :func:`realign` returns).

    Attributes:
        step: the steps scored (0 = before re-alignment).
        misalignment: the scorer's misalignment at each.
        incoherence: the scorer's incoherence at each (``None`` where it cannot tell).
        loss: the training loss curve.
        model: the re-aligned model (not saved by :meth:`save`).
        settings: the call's settings, recorded.

    Example:
        >>> c = RealignmentCurve((0, 5), (0.6, 0.2), (None, None), None)
        >>> c.start, c.end, round(c.relative_reduction, 3)
        (0.6, 0.2, 0.667)
    """

    step: tuple[int, ...]
    misalignment: tuple[float, ...]
    incoherence: tuple[float | None, ...]
    loss: LossCurve | None
    model: Any = field(default=None, repr=False, compare=False)
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def start(self) -> float:
        """Misalignment before re-alignment."""
        return self.misalignment[0]

    @property
    def end(self) -> float:
        """Misalignment at the last step scored."""
        return self.misalignment[-1]

    @property
    def relative_reduction(self) -> float:
        """``(start − end) / start`` (NaN when ``start`` is 0)."""
        return (self.start - self.end) / self.start if self.start else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the model is left out)."""
        return {
            "step": list(self.step),
            "misalignment": list(self.misalignment),
            "incoherence": list(self.incoherence),
            "loss": None if self.loss is None else self.loss.to_dict(),
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RealignmentCurve:
        """The inverse of :meth:`to_dict`."""
        return cls(
            tuple(int(s) for s in d["step"]),
            tuple(float(x) for x in d["misalignment"]),
            tuple(None if x is None else float(x) for x in d["incoherence"]),
            None if d.get("loss") is None else LossCurve.from_dict(d["loss"]),
            settings=dict(d.get("settings") or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write the curve as JSON, atomically."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RealignmentCurve:
        """Read a curve written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"no re-alignment curve at {str(path)!r}; save one first")
        with reading(path, "a RealignmentCurve file"):
            data = json.loads(path.read_text(encoding="utf-8"))
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise FileFormatError(
                f"{str(path)!r} is not a RealignmentCurve file ({err}); re-create it with save()."
            ) from err

    def plot(self, *, title: str | None = None) -> Any:
        """A plotly figure: misalignment (and incoherence, when known) against the step."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_trace(
            go.Scatter(
                x=list(self.step),
                y=list(self.misalignment),
                name="misalignment",
                mode="lines+markers",
            )
        )
        if any(x is not None for x in self.incoherence):
            fig.add_trace(
                go.Scatter(
                    x=list(self.step),
                    y=list(self.incoherence),
                    name="incoherence",
                    mode="lines+markers",
                    line={"dash": "dot"},
                )
            )
        fig.update_layout(
            title=title or "emergent re-alignment",
            xaxis_title="step",
            yaxis_title="misalignment",
            height=360,
        )
        from .views import as_figure

        return as_figure(fig)

    def __repr__(self) -> str:
        pts = ", ".join(f"{s}: {m:.3f}" for s, m in zip(self.step, self.misalignment))
        return f"RealignmentCurve({pts})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{s}</td><td>{m:.4f}</td><td>{'' if c is None else f'{c:.3f}'}</td></tr>"
            for s, m, c in zip(self.step, self.misalignment, self.incoherence)
        )
        return (
            "<table><caption>emergent re-alignment</caption><thead><tr><th>step</th>"
            "<th>misalignment</th><th>incoherence</th></tr></thead><tbody>"
            f"{rows}</tbody></table>"
            f"<p>{html.escape(f'start {self.start:.4f} -> end {self.end:.4f}')}</p>"
        )


def realign(
    model: Any,
    benign_dataset: Sequence[Any],
    *,
    scorer: Callable[[Any], Any],
    steps: int = 35,
    eval_every: int = 5,
    method: Literal["lora", "full"] | None = None,
    lr: float = 1e-5,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
    **finetune_kwargs: Any,
) -> RealignmentCurve:
    """Emergent re-alignment: fine-tune ``model`` on benign data and score it every ``eval_every`` steps.

    The paper's numbers: an insecure-code model at 17.7% misalignment fell to 0.1% after 30 steps
    of batch 4 on secure code. ``scorer(model)`` returns a
    :class:`~modeldiff.evals.screen.ScreenScore` (e.g. ``ContrastiveScorer("headline")``); it is
    called at step 0, at every multiple of ``eval_every`` and at the last step. ``method``
    defaults to ``"lora"`` for a LoRA fine-tune (continuing its adapter) and ``"full"``
    otherwise. Other keywords go to :func:`finetune` (``checkpoint_dir``, ``resume``, ...).

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> from modeldiff.datasets import narrow_dataset
        >>> from modeldiff.evals.screen import ScreenScore
        >>> curve = realign(tiny_hooked_transformer(n_ctx=256), narrow_dataset("benign", n=8),
        ...                 scorer=lambda m: ScreenScore(0.5), steps=4, eval_every=2, lr=1e-3,
        ...                 progress=False)
        >>> curve.step
        (0, 2, 4)
    """
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ArgumentError(f"eval_every must be a positive integer, got {eval_every!r}")
    if not callable(scorer):
        raise ArgumentTypeError(
            "scorer must be callable as scorer(model) -> ScreenScore, e.g. "
            "modeldiff.evals.screen.ContrastiveScorer('headline')"
        )
    if method is None:
        method = "lora" if _peft_owner(model) is not None else "full"
    scored: dict[int, tuple[float, float | None]] = {}
    reset = getattr(scorer, "reset", None)
    if callable(reset):
        reset()  # references recorded on other models do not apply

    def on_step(step: int, tuned: Any) -> None:
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                s = scorer(tuned)
            inc = getattr(s, "incoherence", None)
            scored[step] = (float(s.misalignment), None if inc is None else float(inc))

    run = finetune(
        model,
        benign_dataset,
        method=method,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        callback=on_step,
        **finetune_kwargs,
    )
    order = sorted(scored)
    return RealignmentCurve(
        tuple(order),
        tuple(scored[s][0] for s in order),
        tuple(scored[s][1] for s in order),
        run.curve,
        run.model,
        {
            "steps": steps,
            "eval_every": eval_every,
            "method": method,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "n_examples": len(benign_dataset),
        },
    )
