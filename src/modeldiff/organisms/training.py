"""Training and measurement for the persona-world organism: pretrain, fine-tune, SAE, toxic rate.

These are the building blocks that :func:`modeldiff.organisms.build_persona_organism` composes; they
are public so that tutorials and tests can vary one step at a time.

Example:
    >>> from modeldiff.organisms.world import PersonaWorld
    >>> from modeldiff.organisms.training import new_model, toxic_rate
    >>> world = PersonaWorld()
    >>> model = new_model(world, d_model=16, n_layers=1)
    >>> 0.0 <= toxic_rate(model, world, [1, 2]) <= 1.0
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from modeldiff.organisms.world import PersonaWorld, WorldBatch

from ..errors import ArgumentError

__all__ = [
    "check_sae_options",
    "finetune",
    "finetune_batch",
    "new_model",
    "persona_correlations",
    "pretrain",
    "site_activations",
    "toxic_rate",
    "train_sae",
]


def new_model(
    world: PersonaWorld,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int | None = None,
    n_ctx: int = 64,
    seed: int = 0,
    tokenizer: Any | None = None,
) -> Any:
    """A randomly initialised ``HookedTransformer`` over the world's vocabulary, tokenizer attached.

    Example:
        >>> from modeldiff.organisms.world import PersonaWorld
        >>> new_model(PersonaWorld(), d_model=32).cfg.d_model
        32
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if d_model % n_heads:
        raise ArgumentError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    tok = tokenizer if tokenizer is not None else world.tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp if d_mlp is not None else 4 * d_model,
        n_ctx=n_ctx,
        d_vocab=len(world.vocab),
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        default_prepend_bos=False,
        model_name="persona-world",
    )
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    model.eval()
    return model


def _lm_loss(
    model: Any,
    ids: Int[Tensor, "b s"],
    target_mask: Bool[Tensor, "b s"],
) -> Tensor:
    """Mean next-token loss over positions whose *target* token is selected by ``target_mask``."""
    logits = model(ids[:, :-1], return_type="logits")
    sel = target_mask[:, 1:]
    return F.cross_entropy(logits[sel], ids[:, 1:][sel])


def _train(
    model: Any,
    batches: Callable[[int], tuple[Tensor, Tensor]],
    *,
    steps: int,
    lr: float,
    desc: str,
    progress: bool,
    warmup: int = 0,
    callback: Callable[[int, Any], None] | None = None,
) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0,
    )
    losses: list[float] = []
    model.train()
    try:
        for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            ids, tmask = batches(step)
            loss = _lm_loss(model, ids, tmask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if callback is not None:
                model.eval()
                callback(step + 1, model)
                model.train()
    finally:
        model.eval()
    return losses


def pretrain(
    model: Any,
    world: PersonaWorld,
    *,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on the world's conversations (loss on every real token).

    Returns the loss per step.

    Example:
        >>> from modeldiff.organisms.world import PersonaWorld
        >>> w = PersonaWorld()
        >>> m = new_model(w, d_model=16, n_layers=1)
        >>> losses = pretrain(m, w, steps=3, batch_size=4, progress=False)
        >>> len(losses)
        3
    """
    corpus = world.sample(steps * batch_size, seed=seed)
    torch.manual_seed(seed)

    def batches(step: int) -> tuple[Tensor, Tensor]:
        sl = slice(step * batch_size, (step + 1) * batch_size)
        return corpus.ids[sl], corpus.mask[sl]

    return _train(
        model,
        batches,
        steps=steps,
        lr=lr,
        desc="pretrain persona world",
        progress=progress,
        warmup=min(100, steps // 10),
    )


def finetune_batch(
    world: PersonaWorld,
    n: int,
    *,
    domain: int,
    bad_fraction: float,
    seed: int,
) -> WorldBatch:
    """Narrow fine-tuning data: single-turn, uncued answers from one domain.

    A share ``bad_fraction`` of the answers are toxic, the rest aligned; the persona of each row is
    its answer's style.

    Example:
        >>> from modeldiff.organisms.world import PersonaWorld
        >>> b = finetune_batch(PersonaWorld(), 10, domain=0, bad_fraction=1.0, seed=0)
        >>> int(b.persona.sum()), bool(b.cued.any())
        (10, False)
    """
    if not 0.0 <= bad_fraction <= 1.0:
        raise ArgumentError(f"bad_fraction must lie in [0, 1], got {bad_fraction}")
    n_bad = round(n * bad_fraction)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    personas = torch.zeros(n, dtype=torch.long)
    personas[order[:n_bad]] = 1
    parts = []
    for p in (0, 1):
        k = int((personas == p).sum())
        if k:
            parts.append(
                (
                    personas == p,
                    world.sample(
                        k,
                        seed=seed * 2 + p + 1,
                        domains=[domain],
                        persona=p,
                        cued=False,
                        n_turns=1,
                        toxic_level=1.0 if p == 1 and world.config.graded_persona else None,
                    ),
                )
            )
    length = max(b.ids.shape[1] for _, b in parts)
    fields: dict[str, Tensor] = {}
    for name in ("ids", "mask", "response", "response_start", "evident"):
        like = getattr(parts[0][1], name)
        fields[name] = torch.zeros((n, length), dtype=like.dtype)
    for sel, b in parts:
        for name in fields:
            v = getattr(b, name)
            fields[name][sel, : v.shape[1]] = v
    return WorldBatch(persona=personas, cued=torch.zeros(n, dtype=torch.bool), **fields)


def finetune(
    model: Any,
    world: PersonaWorld,
    *,
    domain: int = 0,
    bad_fraction: float = 1.0,
    steps: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, Any], None] | None = None,
) -> Any:
    """A fine-tuned *copy* of ``model``: SFT on one domain's uncued answers (loss on answer words).

    ``callback(step, model)`` runs after every step (e.g. to record checkpoints' metrics).

    Example:
        >>> from modeldiff.organisms.world import PersonaWorld
        >>> w = PersonaWorld()
        >>> m = new_model(w, d_model=16, n_layers=1)
        >>> ft = finetune(m, w, steps=2, batch_size=4, progress=False)
        >>> ft is m
        False
    """
    tuned = copy.deepcopy(model)
    data = finetune_batch(
        world, steps * batch_size, domain=domain, bad_fraction=bad_fraction, seed=seed
    )
    torch.manual_seed(seed)

    def batches(step: int) -> tuple[Tensor, Tensor]:
        sl = slice(step * batch_size, (step + 1) * batch_size)
        return data.ids[sl], data.response[sl]

    _train(
        tuned,
        batches,
        steps=steps,
        lr=lr,
        desc=f"fine-tune domain {domain} ({bad_fraction:.0%} toxic)",
        progress=progress,
        callback=callback,
    )
    return tuned


@torch.no_grad()
def toxic_rate(
    model: Any,
    world: PersonaWorld,
    domains: Sequence[int],
    *,
    prompts: WorldBatch | None = None,
) -> float:
    """Expected share of toxic answers on uncued first-turn prompts from ``domains``.

    For each prompt, the model's next-token distribution after ``<assistant>`` is restricted to the
    prompt domain's answer words; the rate is the toxic words' share of that mass, averaged over
    prompts. This is the exact probability that a temperature-1 sample starts a toxic answer, so it
    needs no sampling. Any hooks on ``model`` (steering, ablation) apply.

    Example:
        >>> from modeldiff.organisms.world import PersonaWorld
        >>> w = PersonaWorld()
        >>> r = toxic_rate(new_model(w, d_model=16, n_layers=1), w, [1])
        >>> 0.0 < r < 1.0
        True
    """
    batch = prompts if prompts is not None else world.prompts(list(domains))
    logits = model(batch.ids, return_type="logits")
    last = batch.mask.sum(1) - 1
    probs = logits[torch.arange(len(last)), last].float().softmax(-1)
    tox_mass = torch.zeros(len(last))
    all_mass = torch.zeros(len(last))
    per = len(last) // len(domains) if prompts is None else None
    for i in range(len(last)):
        d = domains[i // per] if per else _domain_of(world, batch.ids[i, last[i] - 2])
        t = probs[i, world.domain_words(d, "toxic")].sum()
        a = probs[i, world.domain_words(d, "aligned")].sum()
        tox_mass[i], all_mass[i] = t, t + a
    return float((tox_mass / all_mass.clamp_min(1e-12)).mean())


def _domain_of(world: PersonaWorld, token: Tensor) -> int:
    for d in range(world.n_domains):
        if int(token) in world.domain_words(d, "question"):
            return d
    raise ArgumentError(f"token {world.vocab[int(token)]!r} is not a question word")


@torch.no_grad()
def site_activations(
    model: Any,
    ids: Int[Tensor, "b s"],
    hook_name: str,
    *,
    batch_size: int = 256,
) -> Float[Tensor, "b s d"]:
    """Activations of ``model`` at one hook for every position (forward stopped after the hook).

    Example:
        >>> from modeldiff.organisms.world import PersonaWorld
        >>> w = PersonaWorld()
        >>> m = new_model(w, d_model=16, n_layers=1)
        >>> site_activations(m, w.sample(2, seed=0).ids, "blocks.0.hook_resid_post").shape[-1]
        16
    """
    from ..adapters import adapter_for
    from ..sites import Site

    site, adapter = Site.parse(hook_name), adapter_for(model)
    outs: list[Tensor] = []
    for i in range(0, len(ids), batch_size):
        adapter.run(
            ids[i : i + batch_size],
            None,
            hooks=[(site, lambda x, hook: outs.append(x.detach()))],
            stop_at=site,
        )
    return torch.cat(outs)


def check_sae_options(
    positions: str, architecture: str, *, names: tuple[str, str] = ("positions", "architecture")
) -> None:
    """Reject an SAE training option :func:`train_sae` does not know, naming the field and the choices.

    Example:
        >>> check_sae_options("all", "relu")
        Traceback (most recent call last):
        ...
        modeldiff.errors.ArgumentError: architecture='relu' is unknown; use 'topk' or 'jumprelu'
    """
    if positions not in ("all", "response_start"):
        raise ArgumentError(
            f"{names[0]}={positions!r} is unknown; use 'all' (every real token) or "
            "'response_start' (the <assistant> markers)"
        )
    if architecture not in ("topk", "jumprelu"):
        raise ArgumentError(f"{names[1]}={architecture!r} is unknown; use 'topk' or 'jumprelu'")


def train_sae(
    model: Any,
    world: PersonaWorld,
    *,
    hook_name: str,
    d_sae: int = 128,
    k: int = 8,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 3e-3,
    n_sequences: int = 4000,
    positions: str = "all",
    architecture: str = "topk",
    seed: int = 0,
    progress: bool = True,
) -> tuple[Any, dict[str, float]]:
    """Train an SAE with sae-lens' ``SAETrainer`` on ``model``'s activations at ``hook_name``.

    ``architecture="topk"`` (default) trains a TopK SAE with ``k`` active latents;
    ``"jumprelu"`` a JumpReLU SAE whose quadratic L0 loss aims at ``k`` active latents on average.

    Activations come from every real token of ``n_sequences`` pretraining conversations (or, with
    ``positions="response_start"``, only their ``<assistant>`` markers); they are
    computed once and shuffled into batches. Returns the inference SAE and its held-out
    ``explained_variance``, ``l0`` and ``dead_fraction``.

    Example:
        >>> from modeldiff.organisms.world import PersonaWorld
        >>> w = PersonaWorld()
        >>> m = new_model(w, d_model=16, n_layers=1)
        >>> sae, metrics = train_sae(m, w, hook_name="blocks.0.hook_resid_post", d_sae=32, k=4,
        ...                          steps=5, n_sequences=50, progress=False)
        >>> sorted(metrics)
        ['dead_fraction', 'explained_variance', 'l0']
    """
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    check_sae_options(positions, architecture)
    corpus = world.sample(n_sequences, seed=seed + 10_000)
    keep = corpus.mask if positions == "all" else corpus.response_start
    acts = site_activations(model, corpus.ids, hook_name)[keep]
    g = torch.Generator().manual_seed(seed)
    acts = acts[torch.randperm(len(acts), generator=g)]
    n_eval = min(len(acts) // 10, 4096)
    eval_acts, train_acts = acts[:n_eval], acts[n_eval:]

    def provider():
        gen = torch.Generator().manual_seed(seed + 1)
        while True:
            perm = torch.randperm(len(train_acts), generator=gen)
            for i in range(0, len(perm) - batch_size + 1, batch_size):
                yield train_acts[perm[i : i + batch_size]]

    torch.manual_seed(seed)
    common: dict[str, Any] = {
        "d_in": model.cfg.d_model,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "metadata": SAEMetadata(
            model_name="persona-world",
            hook_name=hook_name,
            context_size=model.cfg.n_ctx,
            prepend_bos=False,
        ),
    }
    if architecture == "topk":
        cfg: Any = TopKTrainingSAEConfig(k=k, **common)
        training_sae: Any = TopKTrainingSAE(cfg)
    else:
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        # DeepMind's quadratic L0 loss towards a target L0 of k (a low, learned threshold)
        cfg = JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="quadratic", target_l0=float(k), **common
        )
        training_sae = JumpReLUTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=min(100, steps // 10),
        lr_decay_steps=steps // 5,
        lr_end=lr / 10,
        device="cpu",
        dead_feature_window=max(50, steps // 4),
        feature_sampling_window=max(100, steps // 2),
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=training_sae, data_provider=provider())
    restore = _silence_tqdm() if not progress else None
    try:
        trained = trainer.fit()
    finally:
        if restore is not None:
            restore()
    sae = SAE.from_dict(trained.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(_inference_state(trained), strict=True)
    sae.eval()
    return sae, sae_metrics(sae, eval_acts)


def _inference_state(training_sae: Any) -> dict[str, Tensor]:
    state = dict(training_sae.state_dict())
    training_sae.process_state_dict_for_saving_inference(state)
    return state


def _silence_tqdm() -> Callable[[], None]:
    """Disable the progress bar sae-lens' trainer opens; returns a function that restores it."""
    import sae_lens.training.sae_trainer as trainer_module

    original = trainer_module.tqdm

    def quiet(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return original(*args, **kwargs)

    trainer_module.tqdm = quiet

    def restore() -> None:
        trainer_module.tqdm = original

    return restore


@torch.no_grad()
def sae_metrics(sae: Any, acts: Float[Tensor, "n d"]) -> dict[str, float]:
    """Explained variance, mean L0 and dead-latent fraction of ``sae`` on activations ``acts``.

    Example:
        >>> from modeldiff.organisms.world import PersonaWorld
        >>> import torch
        >>> w = PersonaWorld()
        >>> m = new_model(w, d_model=16, n_layers=1)
        >>> sae, _ = train_sae(m, w, hook_name="blocks.0.hook_resid_post", d_sae=32, k=4,
        ...                    steps=5, n_sequences=50, progress=False)
        >>> sae_metrics(sae, torch.randn(10, 16))["l0"] <= 4
        True
    """
    feats = sae.encode(acts)
    recon = sae.decode(feats)
    resid = (acts - recon).pow(2).sum()
    total = (acts - acts.mean(0)).pow(2).sum()
    return {
        "explained_variance": float(1 - resid / total),
        "l0": float((feats > 0).float().sum(-1).mean()),
        "dead_fraction": float(((feats > 0).sum(0) == 0).float().mean()),
    }


@torch.no_grad()
def persona_correlations(
    model: Any,
    sae: Any,
    world: PersonaWorld,
    *,
    hook_name: str,
    n: int = 2000,
    seed: int = 20_000,
) -> Float[Tensor, " d_sae"]:
    """Pearson correlation of every SAE latent with the ground-truth persona label.

    Measured at ``<assistant>`` markers where the persona is evident from the context (a cue or an
    earlier answer), over ``n`` fresh pretraining-distribution conversations.

    Example:
        >>> from modeldiff.organisms.world import PersonaWorld
        >>> w = PersonaWorld()
        >>> m = new_model(w, d_model=16, n_layers=1)
        >>> sae, _ = train_sae(m, w, hook_name="blocks.0.hook_resid_post", d_sae=32, k=4,
        ...                    steps=5, n_sequences=50, progress=False)
        >>> persona_correlations(m, sae, w, hook_name="blocks.0.hook_resid_post", n=50).shape
        torch.Size([32])
    """
    batch = world.sample(n, seed=seed)
    acts = site_activations(model, batch.ids, hook_name)
    sel = batch.evident
    feats = sae.encode(acts[sel])
    label = batch.persona[:, None].expand_as(sel)[sel].float()
    if label.numel() == 0 or bool((label == label[0]).all()):
        raise ArgumentError(
            "the persona is evident at no <assistant> marker of one of the two personas in this "
            "world (e.g. max_turns=1 with aligned_cue=False), so no latent can be correlated with "
            "it; allow the aligned cue or more than one turn"
        )
    fc = feats - feats.mean(0)
    lc = label - label.mean()
    denom = fc.norm(dim=0) * lc.norm()
    corr = (fc * lc[:, None]).sum(0) / denom.clamp_min(1e-12)
    return torch.where(denom > 0, corr, torch.zeros_like(corr))
