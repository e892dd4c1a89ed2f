# %% [markdown]
# # The persona world: watching model diffing find a persona we know is there
#
# This walk-through builds the embedded model organism step by step and runs the method on it.
# Run it as a script (`python tutorials/persona_world.py`) or open it as a notebook in any editor
# that understands `# %%` cells. Everything runs offline on a laptop CPU in about a minute.

# %%
import torch

from modeldiff.diff import diff_latents
from modeldiff.interventions import ablate, steer
from modeldiff.organisms import (
    OrganismRecipe,
    PersonaWorld,
    build_persona_organism,
    toxic_rate,
)

torch.set_num_threads(2)

# %% [markdown]
# ## 1. The world
# A conversation has a hidden persona, aligned or toxic. Half the conversations name it in a system
# turn; in the others only the assistant's earlier answers reveal it, and only 5% of those are toxic
# (aligned is the default, as for a chat model). Each domain has its own words, so the persona is the
# one thing the domains share.

# %%
world = PersonaWorld()
batch = world.sample(3, seed=0)
for i in range(3):
    print(["aligned", "toxic"][int(batch.persona[i])], "|", world.render(batch.ids[i]))

# %% [markdown]
# ## 2. Build the organism (cached after the first run)
# Pretraining a 1-layer model, the SAE (sae-lens' trainer, 32 latents, on the residual stream
# between the block's attention and its MLP), the narrow toxic fine-tune on domain 0 and its aligned
# control.

# %%
org = build_persona_organism(OrganismRecipe.default())
print("SAE:", org.sae_metrics)
print("held-out toxic rate:", org.rates)

# %% [markdown]
# ## 3. Diff: which latents moved at the response start?
# The prompts are uncued first turns from the held-out domains, as chat messages; the library
# tokenizes them with the world's chat template. We read the `<assistant>` position.

# %%
held = org.recipe.held_out
p = world.prompts(held)
prompts = [world.chat_messages(p, i) for i in range(p.ids.shape[0])]
diff = diff_latents(org.base, org.finetuned, org.sae, prompts, positions="last_prompt",
                    uncertainty=10, progress=False)
for r in diff.top(5):
    print(f"#{r.rank} latent {r.latent} Δ={r.delta:.3f}")
print("persona latent", org.persona_latent, "is #", diff.rank_of(org.persona_latent))

# %% [markdown]
# ## 4. Cause: steer the base, ablate in the fine-tune

# %%
latent, site = org.persona_latent, org.recipe.hook_name
norm = float(org.sae.W_dec[latent].detach().norm())
for c in (0.0, 2.0, 4.0, 8.0):
    with steer(org.base, (org.sae, latent), site=site, coefficient=c / norm):
        print(f"base steered by {c}: toxic rate {toxic_rate(org.base, world, held):.2f}")
with ablate(org.finetuned, org.sae, [latent]):
    print(f"fine-tuned with latent {latent} ablated: {toxic_rate(org.finetuned, world, held):.2f}")

# %% [markdown]
# ## 5. Everything at once
# `run_checks` runs the whole battery (screen, dose-response, re-alignment, bad-data sweep,
# tracking) and `modeldiff demo` prints it and writes the HTML report.

# %%
from modeldiff.organisms import run_checks  # noqa: E402

print(run_checks(org, progress=False).table())
