"""The persona organism with an SAE sized like real ones (8x overcomplete, 512 latents, k 8): one
latent no longer carries the persona, sets of latents do. Seed 0 here; seeds 0-4 are reported in
docs/organism.md (scripts/organism_sets.py)."""

from __future__ import annotations

import pytest

from modeldiff.organisms import OrganismRecipe, build_persona_organism, run_set_checks


@pytest.fixture(scope="module")
def result():
    # the ordinary cache (built once per machine; content-addressed by the recipe's digest)
    org = build_persona_organism(OrganismRecipe.overcomplete(0), progress=False)
    return org, run_set_checks(org, progress=False)


def test_the_overcomplete_recipe_is_the_demo_world_with_a_wider_sae():
    r = OrganismRecipe.overcomplete(3)
    default = OrganismRecipe()
    assert (r.d_sae, r.k, r.seed) == (512, 8, 3)
    assert (r.world, r.d_model, r.hook_name) == (default.world, default.d_model, default.hook_name)


def test_set_checks_pass_on_seed_0(result):
    org, res = result
    assert res.passed, res.table()
    d = res.data
    # selection and measurement never share prompts (nor, for the transfer check, domains)
    assert not set(d["select_prompts"]) & set(d["measure_prompts"])
    t = d["domain_transfer"]
    assert not set(t["select_domains"]) & set(t["measure_domains"])
    assert set(t["select_domains"]) | set(t["measure_domains"]) == set(org.recipe.held_out)
    # the set removes more than the best-correlated latent alone
    assert d["selected_ablated"] < d["single_ablated"]
    assert len(d["selected"]) <= 10
    # the numbers in the table are the ones in data
    cut = 1 - d["selected_ablated"] / d["rates"]["finetuned"]
    assert res.checks[1].value == pytest.approx(cut)
    assert res.checks[2].value == max(x["rate"] for x in d["steer_curve"])
