# %% [markdown]
# # Steering experiments: steer, ablate, sweep a coefficient, watch the score
#
# A diff says which latents *moved*; an intervention says whether one *causes* the behaviour.
# Two tests, as in the paper: **induce** (add the latent's decoder direction to the base model:
# does it turn toxic?) and **repair** (remove the latent from the fine-tune: does the toxicity
# go?). We run them on the persona-world organism (see the [quickstart](quickstart.py)), whose
# score is exact: the held-out toxic rate, the chance that a sampled answer starts toxic, with no
# sampling noise.

# %%
import os

import torch

from modeldiff import ablate, median_residual_norm, project_out, steer, sweep
from modeldiff.organisms import OrganismRecipe, build_persona_organism

torch.set_num_threads(2)
small = os.environ.get("MODELDIFF_TUTORIAL_SIZE") == "tiny"  # what the test suite sets
org = build_persona_organism(
    OrganismRecipe.tiny() if small else OrganismRecipe.default(), progress=False
)
base, finetuned, sae, latent = org.base, org.finetuned, org.sae, org.persona_latent
site = sae.cfg.metadata.hook_name

world, held_out = org.world, org.recipe.held_out
batch = world.prompts(held_out)
prompts = [world.chat_messages(batch, i) for i in range(batch.ids.shape[0])]


def score(model):
    """The misalignment score: held-out toxic rate (0 = never toxic, 1 = always)."""
    return org.toxic_rate(model)


base_rate, tuned_rate = score(base), score(finetuned)
print(f"base {base_rate:.3f}, fine-tuned {tuned_rate:.3f}; latent {latent} at {site}")

# %% [markdown]
# ## Steering strength in units of the residual norm
#
# An SAE's decoder row has unit norm, while the residual stream it lives in is much larger (about
# 170 in SmolLM2-135M's middle layers, a few units here). A raw coefficient therefore means
# nothing across models. With `scale="residual_norm"` the direction is made unit length and the
# coefficient counts in units of the **median norm of the activation at the site**, measured once
# on `calibration_prompts`: 0.4 is the strength the paper's follow-up uses.

# %%
calibration = prompts[:64]  # enough for a median; each steer() measures it once
print(f"median residual norm at {site}: {median_residual_norm(base, calibration, site):.2f}")

with steer(
    base, (sae, latent), coefficient=0.4, scale="residual_norm", calibration_prompts=calibration
):
    induced = score(base)
print(f"base steered along latent {latent} at 0.4 x norm: {base_rate:.3f} -> {induced:.3f}")
assert induced > base_rate + 0.3, induced
assert score(base) == base_rate  # the hooks are gone after the `with` block

# %% [markdown]
# ## Ablate: take the latent out of the fine-tune
#
# `ablate` changes only the chosen latents' contribution and keeps the SAE's error term, so the
# cut is not won by replacing the activation with the SAE's (imperfect) reconstruction.
# `project_out` removes the whole direction from the residual instead.

# %%
with ablate(finetuned, sae, [latent]):
    ablated = score(finetuned)
with project_out(finetuned, (sae, latent)):
    projected = score(finetuned)
print(f"fine-tuned {tuned_rate:.3f} -> zero-ablated {ablated:.3f}, projected out {projected:.3f}")
assert ablated < 0.5 * tuned_rate, ablated

# %% [markdown]
# ## A control: a random direction of the same strength
#
# If any push of this size made the model toxic, the result above would say nothing about the
# latent.

# %%
random_dir = torch.randn(base.cfg.d_model, generator=torch.Generator().manual_seed(0))
with steer(
    base,
    random_dir,
    site=site,
    coefficient=0.4,
    scale="residual_norm",
    calibration_prompts=calibration,
):
    control = score(base)
print(f"base steered along a random direction at 0.4 x norm: {control:.3f}")
assert abs(control - base_rate) < 0.5 * (induced - base_rate)

# %% [markdown]
# ## Sweep a coefficient: the dose-response curve
#
# `sweep` applies one intervention per coefficient, scores the model under it and removes it
# before the next. Negative coefficients on the fine-tune steer *against* the latent.

# %%
coefficients = [0.0, 0.1, 0.2, 0.3, 0.4, 0.6]


def along_latent(model, sign):
    return lambda c: steer(
        model,
        (sae, latent),
        coefficient=sign * c,
        scale="residual_norm",
        calibration_prompts=calibration,
    )


induce = sweep(base, along_latent(base, +1), coefficients, score, progress=False)
repair = sweep(finetuned, along_latent(finetuned, -1), coefficients, score, progress=False)
for a, b in zip(induce.records, repair.records):
    print(
        f"c = {a['coefficient']:.1f}:  base +c -> {a['score']:.3f}   "
        f"fine-tuned -c -> {b['score']:.3f}"
    )

induce_scores = [r["score"] for r in induce.records]
repair_scores = [r["score"] for r in repair.records]
assert induce_scores == sorted(induce_scores)  # more of the latent, more toxic
assert repair_scores == sorted(repair_scores, reverse=True)

# %%
induce.plot()

# %% [markdown]
# ## Interventions compose
#
# `a + b` (or `compose(a, b)`) applies both and removes them in reverse order; `apply()` gives a
# handle for use outside a `with` block.

# %%
both = steer(
    base, (sae, latent), coefficient=0.4, scale="residual_norm", calibration_prompts=calibration
) + ablate(base, sae, [latent])
handle = both.apply()
print(f"base steered, then the latent ablated again: {score(base):.3f}")
handle.remove()
assert score(base) == base_rate

# %% [markdown]
# On a real model the score is a misalignment eval: `contrastive_score` (fast, deterministic) or
# `evaluate` with a judge, see the evaluation page. `screen_latents` runs the induce and repair
# tests for a diff's top latents with an incoherence budget.
