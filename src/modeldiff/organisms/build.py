"""Build (or load from the cache) the persona-world model organism.

:func:`build_persona_organism` runs the whole recipe: pretrain a small ``HookedTransformer`` on the
persona world, train a TopK SAE with sae-lens on its residual stream, fine-tune it narrowly on one
domain's toxic answers (and, as a control, on the same domain's aligned answers), and measure the
toxic-answer rate on the held-out domains. The result is cached under ``MODELDIFF_CACHE`` (default
``~/.cache/modeldiff``) in a folder named by a content hash of the recipe, so a changed recipe
rebuilds and an unchanged one loads in a second.

Example (builds for about a minute; tests/test_organism.py runs the same calls)::

    from modeldiff.organisms import OrganismRecipe, build_persona_organism
    org = build_persona_organism(OrganismRecipe.tiny(), progress=False)
    org.rates["finetuned"] > org.rates["base"]  # -> True
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modeldiff.organisms.training import (
    check_sae_options,
    finetune,
    new_model,
    persona_correlations,
    pretrain,
    toxic_rate,
    train_sae,
)
from modeldiff.organisms.world import PersonaWorld, WorldConfig

from ..errors import ArgumentError

__all__ = ["Organism", "OrganismRecipe", "build_persona_organism", "cache_dir"]

# Bump when the code that turns a recipe into artifacts changes meaning (not for refactors).
RECIPE_FORMAT = 1
# Recipe fields added later, with the defaults that reproduce the earlier behaviour.
_LATER_FIELDS: dict[str, Any] = {
    "sae_positions": "all",
    "sae_sequences": 4000,
    "sae_architecture": "topk",
}
_LATER_WORLD_FIELDS: dict[str, Any] = {
    "uncued_toxic_fraction": None,
    "aligned_cue": True,
    "graded_persona": False,
}


def cache_dir() -> Path:
    """The folder artifacts are cached in: ``$MODELDIFF_CACHE`` or ``~/.cache/modeldiff``.

    Example:
        >>> cache_dir().name in ("modeldiff",) or "MODELDIFF_CACHE" in __import__("os").environ
        True
    """
    env = os.environ.get("MODELDIFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modeldiff"


@dataclass(frozen=True)
class OrganismRecipe:
    """Everything that determines the organism's artifacts (its hash names the cache folder).

    ``default()`` is the demo's size; ``tiny()`` is a faster variant for tests.

    Example:
        >>> r = OrganismRecipe()
        >>> r.digest() == OrganismRecipe().digest(), r.digest() == OrganismRecipe(seed=1).digest()
        (True, False)
    """

    world: WorldConfig = field(default_factory=lambda: WorldConfig(uncued_toxic_fraction=0.05))
    n_layers: int = 1
    d_model: int = 64
    n_heads: int = 4
    n_ctx: int = 64
    pretrain_steps: int = 300
    pretrain_batch: int = 64
    pretrain_lr: float = 5e-3
    hook_name: str = "blocks.0.hook_resid_mid"
    d_sae: int = 32
    k: int = 4
    sae_steps: int = 1000
    sae_lr: float = 3e-3
    sae_positions: str = "all"
    sae_sequences: int = 4000
    sae_architecture: str = "topk"
    finetune_domain: int = 0
    finetune_steps: int = 20
    finetune_batch: int = 32
    finetune_lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.finetune_domain < self.world.n_domains:
            raise ArgumentError(
                f"finetune_domain={self.finetune_domain} is not a domain of the world "
                f"(0..{self.world.n_domains - 1})"
            )
        check_sae_options(
            self.sae_positions,
            self.sae_architecture,
            names=("sae_positions", "sae_architecture"),
        )
        layer = self.hook_name.split(".")
        if len(layer) != 3 or layer[0] != "blocks" or not layer[1].isdigit():
            raise ArgumentError(
                f"hook_name={self.hook_name!r} is not a block hook; use e.g. 'blocks.0.hook_resid_post'"
            )
        if int(layer[1]) >= self.n_layers:
            raise ArgumentError(
                f"hook_name={self.hook_name!r} names a layer the {self.n_layers}-layer model lacks"
            )

    @classmethod
    def default(cls) -> OrganismRecipe:
        """The demo's recipe.

        Example:
            >>> OrganismRecipe.default().d_sae
            32
        """
        return cls()

    @classmethod
    def tiny(cls, seed: int = 0) -> OrganismRecipe:
        """A faster recipe for tests (fewer SAE training steps, same world and model).

        Example:
            >>> OrganismRecipe.tiny().sae_steps < OrganismRecipe().sae_steps
            True
        """
        return cls(sae_steps=600, seed=seed)

    @classmethod
    def overcomplete(cls, seed: int = 0) -> OrganismRecipe:
        """The organism with an SAE sized like real ones (8× overcomplete: 512 latents, k 8).

        The persona splits over several latents here; check it with
        :func:`~modeldiff.organisms.run_set_checks`.

        Example:
            >>> r = OrganismRecipe.overcomplete()
            >>> r.d_sae // r.d_model, r.k
            (8, 8)
        """
        return cls(d_sae=512, k=8, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the recipe (the world nested).

        Example:
            >>> OrganismRecipe().to_dict()["world"]["n_domains"]
            6
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OrganismRecipe:
        """Inverse of :meth:`to_dict`.

        Example:
            >>> r = OrganismRecipe(seed=3)
            >>> OrganismRecipe.from_dict(r.to_dict()) == r
            True
        """
        data = dict(data)
        world = WorldConfig(**data.pop("world"))
        return cls(world=world, **data)

    def digest(self) -> str:
        """Content hash of the recipe and the recipe format (16 hex digits).

        Example:
            >>> len(OrganismRecipe().digest())
            16
        """
        data = self.to_dict()
        # Fields added after format 1 enter the hash only when set, so existing digests stay valid.
        for key, default in _LATER_FIELDS.items():
            if data.get(key) == default:
                del data[key]
        for key, default in _LATER_WORLD_FIELDS.items():
            if data["world"].get(key) == default:
                del data["world"][key]
        spec = json.dumps({"format": RECIPE_FORMAT, **data}, sort_keys=True)
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    @property
    def held_out(self) -> list[int]:
        """The domains the narrow fine-tune never sees.

        Example:
            >>> OrganismRecipe().held_out
            [1, 2, 3, 4, 5]
        """
        return [d for d in range(self.world.n_domains) if d != self.finetune_domain]


@dataclass
class Organism:
    """The built organism: world, models, SAE and the measurements made while building it.

    Attributes:
        recipe: what was built.
        world: the persona world (vocabulary, sampler, tokenizer).
        base: the pretrained model (mostly aligned).
        finetuned: the base fine-tuned on one domain's toxic answers, no cue.
        control: the base fine-tuned on the same domain's aligned answers.
        sae: a sae-lens ``SAE`` on ``recipe.hook_name`` of the base.
        sae_metrics: held-out explained variance, L0, dead fraction of the SAE.
        rates: held-out toxic rate of ``base``, ``finetuned``, ``control``.
        persona_latent: the SAE latent most correlated with the persona label.
        persona_corr: its correlation.
        folder: the cache folder it lives in.
        build_seconds: wall time of the build that made the cached artifacts.
        loaded_from_cache: true when this call loaded an earlier build instead of building.

    Example (builds for about a minute; tests/test_organism.py runs the same calls)::

        org = build_persona_organism(OrganismRecipe.tiny(), progress=False)
        org.base.cfg.n_layers  # -> 2

    Example:
        >>> # put together by hand from untrained parts (what a build returns, in seconds)
        >>> from sae_lens import TopKSAE, TopKSAEConfig
        >>> recipe = OrganismRecipe(d_model=16, n_heads=2, d_sae=8, k=2)
        >>> world = PersonaWorld(recipe.world)
        >>> model = new_model(world, n_layers=1, d_model=16, n_heads=2)
        >>> org = Organism(recipe, world, base=model, finetuned=model, control=model,
        ...                sae=TopKSAE(TopKSAEConfig(d_in=16, d_sae=8, k=2)), sae_metrics={},
        ...                rates={}, persona_latent=0, persona_corr=0.0, folder=Path("."))
        >>> 0 <= org.toxic_rate(org.base) <= 1, org.recipe.held_out
        (True, [1, 2, 3, 4, 5])
    """

    recipe: OrganismRecipe
    world: PersonaWorld
    base: Any
    finetuned: Any
    control: Any
    sae: Any
    sae_metrics: dict[str, float]
    rates: dict[str, float]
    persona_latent: int
    persona_corr: float
    folder: Path
    build_seconds: float = 0.0
    loaded_from_cache: bool = False

    def toxic_rate(self, model: Any, domains: list[int] | None = None) -> float:
        """Held-out toxic rate of ``model`` (default domains: the held-out ones).

        Example (builds for about a minute; tests/test_organism.py runs the same calls)::

            org = build_persona_organism(OrganismRecipe.tiny(), progress=False)
            0 <= org.toxic_rate(org.base) <= 1  # -> True
        """
        return toxic_rate(model, self.world, domains or self.recipe.held_out)


_MODELS = ("base", "finetuned", "control")


def _save_model(model: Any, path: Path) -> None:
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def _load_model(world: PersonaWorld, recipe: OrganismRecipe, tokenizer: Any, path: Path) -> Any:
    model = _fresh_model(world, recipe, tokenizer)
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    return model


def _fresh_model(world: PersonaWorld, recipe: OrganismRecipe, tokenizer: Any) -> Any:
    return new_model(
        world,
        n_layers=recipe.n_layers,
        d_model=recipe.d_model,
        n_heads=recipe.n_heads,
        n_ctx=recipe.n_ctx,
        seed=recipe.seed,
        tokenizer=tokenizer,
    )


def build_persona_organism(
    recipe: OrganismRecipe | None = None,
    *,
    cache: str | Path | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> Organism:
    """Build the persona-world organism, or load it from the cache if this recipe was built before.

    Args:
        recipe: what to build (default :meth:`OrganismRecipe.default`).
        cache: cache root (default :func:`cache_dir`); artifacts go to
            ``<cache>/persona-world/<recipe digest>/``.
        rebuild: ignore a cached copy and build again (the new copy replaces it atomically).
        progress: show progress bars.

    Example (about a minute the first time on this machine, then loaded from the cache; the
    test suite builds this recipe before the doctests run):
        >>> org = build_persona_organism(OrganismRecipe.tiny(), progress=False)
        >>> org.rates["finetuned"] > org.rates["control"], org.recipe == OrganismRecipe.tiny()
        (True, True)
    """
    recipe = recipe or OrganismRecipe.default()
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    folder = root / "persona-world" / recipe.digest()
    if not rebuild and (folder / "organism.json").exists():
        return _load(folder, recipe)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        org = _build(recipe, staging, progress=progress)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _load(folder, recipe, build_seconds=org.build_seconds, fresh=True)


def _remove_stale_staging(folder: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete staging folders of this recipe left by a build that was killed (older than 6 h)."""
    now = time.time()
    for p in folder.parent.glob(f".{folder.name}.*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _build(recipe: OrganismRecipe, out: Path, *, progress: bool) -> Organism:
    start = time.perf_counter()
    world = PersonaWorld(recipe.world)
    tokenizer = world.tokenizer(out / "tokenizer")
    torch.manual_seed(recipe.seed)
    base = _fresh_model(world, recipe, tokenizer)
    losses = pretrain(
        base,
        world,
        steps=recipe.pretrain_steps,
        batch_size=recipe.pretrain_batch,
        lr=recipe.pretrain_lr,
        seed=recipe.seed,
        progress=progress,
    )
    sae, sae_metrics = train_sae(
        base,
        world,
        hook_name=recipe.hook_name,
        d_sae=recipe.d_sae,
        k=recipe.k,
        steps=recipe.sae_steps,
        lr=recipe.sae_lr,
        n_sequences=recipe.sae_sequences,
        positions=recipe.sae_positions,
        architecture=recipe.sae_architecture,
        seed=recipe.seed,
        progress=progress,
    )
    common = {
        "domain": recipe.finetune_domain,
        "steps": recipe.finetune_steps,
        "batch_size": recipe.finetune_batch,
        "lr": recipe.finetune_lr,
        "seed": recipe.seed + 1,
        "progress": progress,
    }
    finetuned = finetune(base, world, bad_fraction=1.0, **common)
    control = finetune(base, world, bad_fraction=0.0, **common)
    models = {"base": base, "finetuned": finetuned, "control": control}
    rates = {name: toxic_rate(m, world, recipe.held_out) for name, m in models.items()}
    corr = persona_correlations(base, sae, world, hook_name=recipe.hook_name)
    latent = int(corr.argmax())
    for name, m in models.items():
        _save_model(m, out / f"{name}.safetensors")
    sae.save_model(str(out / "sae"))
    seconds = time.perf_counter() - start
    meta = {
        "recipe": recipe.to_dict(),
        "digest": recipe.digest(),
        "sae_metrics": sae_metrics,
        "rates": rates,
        "persona_latent": latent,
        "persona_corr": float(corr[latent]),
        "pretrain_final_loss": losses[-1] if losses else None,
        "build_seconds": seconds,
        "versions": _versions(),
    }
    (out / "organism.json").write_text(json.dumps(meta, indent=2))
    return Organism(
        recipe=recipe,
        world=world,
        base=base,
        finetuned=finetuned,
        control=control,
        sae=sae,
        sae_metrics=sae_metrics,
        rates=rates,
        persona_latent=latent,
        persona_corr=float(corr[latent]),
        folder=out,
        build_seconds=seconds,
    )


def _load(
    folder: Path, recipe: OrganismRecipe, *, build_seconds: float = 0.0, fresh: bool = False
) -> Organism:
    from sae_lens import SAE

    meta = json.loads((folder / "organism.json").read_text())
    if meta.get("digest") != recipe.digest():
        raise RuntimeError(
            f"cached organism in {folder} was built from another recipe; delete that folder "
            "or call build_persona_organism(..., rebuild=True)"
        )
    world = PersonaWorld(recipe.world)
    tokenizer = world.tokenizer(folder / "tokenizer")
    models = {
        n: _load_model(world, recipe, tokenizer, folder / f"{n}.safetensors") for n in _MODELS
    }
    sae = SAE.load_from_disk(str(folder / "sae"), device="cpu")
    sae.eval()
    return Organism(
        recipe=recipe,
        world=world,
        sae=sae,
        sae_metrics=meta["sae_metrics"],
        rates=meta["rates"],
        persona_latent=int(meta["persona_latent"]),
        persona_corr=float(meta["persona_corr"]),
        folder=folder,
        build_seconds=build_seconds or float(meta.get("build_seconds", 0.0)),
        loaded_from_cache=not fresh,
        **models,
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("modeldiff", "torch", "transformer-lens", "sae-lens", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
