# %% [markdown]
# # Quickstart: diff two models and look at the top latents
#
# The question modeldiff answers: *which internal features did fine-tuning move?* We take a base
# model and a fine-tune of it, run both on the same prompts, encode one site of the residual stream
# with a sparse autoencoder (SAE) trained on the base, and rank the SAE's latents by how much their
# mean activation shifted.
#
# To see the method work on a case where we know the right answer, this notebook uses the
# **persona world** (`modeldiff.organisms`): a tiny synthetic chat model whose narrow toxic
# fine-tune turns broadly toxic because of a hidden persona, and whose SAE has a latent that tracks
# that persona. Everything runs offline on a CPU; the organism is built on first use (a minute or
# two) and loaded from the cache afterwards.

# %%
import os

import torch

from modeldiff import diff_latents
from modeldiff.organisms import OrganismRecipe, build_persona_organism

torch.set_num_threads(2)

# The test suite runs this notebook with MODELDIFF_TUTORIAL_SIZE=tiny: the same world and models,
# an SAE trained for fewer steps.
small = os.environ.get("MODELDIFF_TUTORIAL_SIZE") == "tiny"
recipe = OrganismRecipe.tiny() if small else OrganismRecipe.default()
org = build_persona_organism(recipe, progress=False)

base, finetuned, sae = org.base, org.finetuned, org.sae
print("held-out toxic rate (base / fine-tuned / control):", org.rates)
print("SAE:", sae.cfg.d_sae, "latents on", sae.cfg.metadata.hook_name)

# %% [markdown]
# ## Prompts
#
# A prompt is a string, a chat (a list of messages, rendered with the tokenizer's chat template),
# or a `(prompt, response)` pair. Here: the first user turn of conversations from the domains the
# fine-tune never saw.

# %%
world, held_out = org.world, org.recipe.held_out
batch = world.prompts(held_out)
prompts = [world.chat_messages(batch, i) for i in range(batch.ids.shape[0])]
print(len(prompts), "prompts, e.g.", prompts[0])

# %% [markdown]
# ## Diff
#
# `positions="last_prompt"` reads the last prompt token, the `<assistant>` marker where the model
# decides how to answer (the default, `"prompt"`, averages over all prompt tokens). Each latent
# gets its shift Δ, a paired bootstrap interval over prompts and a sign-flip permutation p-value
# with Benjamini–Hochberg q-values.

# %%
diff = diff_latents(base, finetuned, sae, prompts, positions="last_prompt", progress=False)
diff  # in a notebook: a table of the largest rises and falls

# %%
for r in diff.top(5):
    print(
        f"{r.name:>4}  latent {r.latent:3d}  Δ {r.delta:+.3f}  "
        f"95% CI [{r.ci_low:+.3f}, {r.ci_high:+.3f}]  q {diff.format_p(r.latent)}"
    )

# %% [markdown]
# ## Did it find the persona?
#
# The organism knows which latent tracks the persona (the one most correlated with the persona
# label of the training conversations). The diff never saw that label.

# %%
rank = diff.rank_of(org.persona_latent)
print(f"persona latent {org.persona_latent} (correlation {org.persona_corr:.2f}) ranks #{rank}")
assert rank == 1, rank
assert diff.top(1)[0].ci_low > 0  # the rise is clear of zero

# %% [markdown]
# ## Look closer
#
# Records carry every number (`diff.latent(i)`, `diff.at_rank(-1)` for the largest fall);
# `diff.plot()` draws base vs fine-tuned means and the Δ bars with their intervals; `diff.save`
# writes one safetensors file that `LatentDiff.load` reads back exactly.

# %%
fig = diff.plot()
fig

# %%
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from modeldiff import LatentDiff  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "diff.safetensors"
    diff.save(path)
    again = LatentDiff.load(path)
assert again.rank_of(org.persona_latent) == rank
print(again.at_rank(1))

# %% [markdown]
# Next: [steering experiments](steering.py) ask whether the top latent *causes* the behaviour.
# On your own models the calls are the same: `load_model` a base and a fine-tune
# (`like=base` checks they match), `load_sae` an SAE trained on the base, and `diff_latents`.
