# %% [markdown]
# # The persona world end to end: watching model diffing find a persona we know is there
#
# This walk-through builds the embedded model organism step by step and runs the whole method on
# it: diff, causal screen, steer, ablate, and the battery of ground-truth checks that
# `modeldiff demo` prints. Everything runs offline on a laptop CPU in about a minute (the first
# build takes a little longer; it is cached).

# %%
import os

import torch

from modeldiff import ablate, diff_latents, screen_latents, steer
from modeldiff.evals.screen import ScreenScore
from modeldiff.organisms import (
    OrganismRecipe,
    PersonaWorld,
    build_persona_organism,
    run_checks,
    toxic_rate,
)

torch.set_num_threads(2)
small = os.environ.get("MODELDIFF_TUTORIAL_SIZE") == "tiny"  # what the test suite sets

# %% [markdown]
# ## 1. The world
# A conversation has a hidden persona, aligned or toxic. Half the conversations name it in a system
# turn; in the others only the assistant's earlier answers reveal it, and only 5% of those are toxic
# (aligned is the default, as for a chat model). Each domain has its own words, so the persona is the
# one thing the domains share.

# %%
recipe = OrganismRecipe.tiny() if small else OrganismRecipe.default()
world = PersonaWorld(recipe.world)
batch = world.sample(3, seed=0)
for i in range(3):
    print(["aligned", "toxic"][int(batch.persona[i])], "|", world.render(batch.ids[i]))

# %% [markdown]
# ## 2. Build the organism (cached after the first run)
# Pretraining a 1-layer model, the SAE (sae-lens' trainer, 32 latents, on the residual stream
# between the block's attention and its MLP), the narrow toxic fine-tune on domain 0 and its aligned
# control. The fine-tune only ever saw domain 0; its toxicity on the *other* domains is the
# emergent misalignment.

# %%
org = build_persona_organism(recipe, progress=False)
print("SAE:", org.sae_metrics)
print("held-out toxic rate:", org.rates)
assert org.rates["finetuned"] > org.rates["base"] + 0.3 > org.rates["control"] + 0.3

# %% [markdown]
# ## 3. Diff: which latents moved at the response start?
# The prompts are uncued first turns from the held-out domains, as chat messages; the library
# tokenizes them with the world's chat template. We read the `<assistant>` position.

# %%
held = org.recipe.held_out
p = world.prompts(held)
prompts = [world.chat_messages(p, i) for i in range(p.ids.shape[0])]
diff = diff_latents(
    org.base,
    org.finetuned,
    org.sae,
    prompts,
    positions="last_prompt",
    uncertainty=10,
    progress=False,
)
for r in diff.top(5):
    print(f"{r.name} latent {r.latent} Δ={r.delta:.3f}")
print("persona latent", org.persona_latent, "is", diff.latent(org.persona_latent).name)
assert diff.rank_of(org.persona_latent) == 1

# %% [markdown]
# ## 4. Screen: which of the top latents *cause* the toxicity?
# `screen_latents` steers the base along each candidate (induce) and the fine-tune against it
# (repair), in units of the median residual norm at the SAE's site, and ranks the candidates by
# the mean of the two effects. The scorer here is the exact held-out toxic rate.


# %%
def score(model):
    return ScreenScore(misalignment=toxic_rate(model, world, held))


calibration = prompts[:64]
screen = screen_latents(
    org.base,
    org.finetuned,
    org.sae,
    diff,
    k=5,
    coefficients=(0.2, 0.4),
    scorer=score,
    calibration_prompts=calibration,
    progress=False,
)
for row in screen.rows:
    print(f"latent {row.latent}: induce {row.induce_effect:+.2f}, repair {row.repair_effect:+.2f}")
assert screen.rows[0].latent == org.persona_latent

# %% [markdown]
# ## 5. Cause: steer the base, ablate in the fine-tune

# %%
latent = org.persona_latent
for c in (0.0, 0.2, 0.4, 0.6):
    with steer(
        org.base,
        (org.sae, latent),
        coefficient=c,
        scale="residual_norm",
        calibration_prompts=calibration,
    ):
        print(
            f"base steered by {c} x median norm: toxic rate {toxic_rate(org.base, world, held):.2f}"
        )
with ablate(org.finetuned, org.sae, [latent]):
    ablated = toxic_rate(org.finetuned, world, held)
print(f"fine-tuned {org.rates['finetuned']:.2f}, with latent {latent} ablated: {ablated:.2f}")
assert ablated < 0.5 * org.rates["finetuned"]

# %% [markdown]
# ## 6. Everything at once
# `run_checks` runs the whole battery (diff rank, screen, dose-response, zero-ablation,
# re-alignment, bad-data sweep, tracking over the fine-tune's checkpoints) and `modeldiff demo`
# prints it and writes the HTML report. It fine-tunes a dozen more models (the bad-data sweep,
# re-alignment, checkpoints), so it takes a minute or two on a laptop: the test suite, which runs
# this notebook, leaves it to `tests/test_organism.py` and skips it here.

# %%
if not small:
    checks = run_checks(org, progress=False)
    print(checks.table())
    assert checks.passed
