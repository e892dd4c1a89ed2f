"""Interventions: exact effects against independent references, positions under KV caches, hook safety."""

from __future__ import annotations

import contextlib
import math

import plotly.graph_objects as go
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _reference import reference_greedy
from modeldiff._hooks import add_hook
from modeldiff.directions import DirectionError, resolve_direction
from modeldiff.interventions import (
    Composed,
    ForwardPositions,
    InterventionError,
    ablate,
    compose,
    forward_positions,
    median_residual_norm,
    project_out,
    publish_positions,
    steer,
    sweep,
)
from modeldiff.sites import Site

SITE = "blocks.0.hook_resid_post"
TOKS = torch.tensor([[5, 9, 33, 40, 7, 12], [3, 14, 15, 92, 65, 35]])


@pytest.fixture(scope="module")
def model(tokenizer):
    from modeldiff.testing import tiny_hooked_transformer

    return tiny_hooked_transformer(tokenizer=tokenizer, seed=1)


@pytest.fixture(scope="module")
def sae():
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=64, d_sae=128)
    cfg.metadata.hook_name = SITE
    torch.manual_seed(0)
    s = StandardSAE(cfg)
    s.requires_grad_(False)
    return s


def site_value(model, toks, site=SITE):
    """The activation at ``site`` after every hook already there has run (ours included)."""
    got = []
    h = add_hook(model, site, lambda x, hook: got.append(x.detach().clone()))
    try:
        with torch.no_grad():
            model(toks)
    finally:
        h.remove()
    return got[0]


def n_hooks(model):
    return {name: len(hp.fwd_hooks) for name, hp in model.hook_dict.items()}


def no_trackers(model):
    return not model._forward_pre_hooks and not model.blocks[0]._forward_pre_hooks


# ------------------------------------------------------------------------------------------------
# directions
# ------------------------------------------------------------------------------------------------


def test_resolve_direction_sources(sae):
    assert torch.equal(resolve_direction((sae, 7), d_model=64), sae.W_dec[7])

    class Row:
        def as_direction(self):
            return torch.arange(64.0)

    assert torch.equal(resolve_direction(Row(), d_model=64), torch.arange(64.0))
    unit = resolve_direction([3.0, 4.0], d_model=2, normalize=True)
    assert torch.allclose(unit, torch.tensor([0.6, 0.8]))


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (torch.ones(63), "d_model is 64"),
        (torch.ones(2, 64), "one vector"),
        (torch.full((64,), float("nan")), "NaN or inf"),
        ("toxic", "cannot use str"),
    ],
)
def test_resolve_direction_errors(obj, match):
    with pytest.raises(DirectionError, match=match):
        resolve_direction(obj, d_model=64)


def test_resolve_direction_sae_errors(sae):
    with pytest.raises(DirectionError, match="out of range: the SAE has 128 latents"):
        resolve_direction((sae, 128), d_model=64)
    with pytest.raises(DirectionError, match="d_model is 32"):
        resolve_direction((sae, 0), d_model=32)


# ------------------------------------------------------------------------------------------------
# steer / project_out / ablate: exact effects
# ------------------------------------------------------------------------------------------------


def test_steer_adds_exactly_coefficient_times_direction(model):
    d = torch.randn(64)
    plain = site_value(model, TOKS)
    with steer(model, d, site=SITE, coefficient=2.5) as handle:
        assert handle.active
        steered = site_value(model, TOKS)
    assert not handle.active
    assert torch.allclose(steered, plain + 2.5 * d, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(site_value(model, TOKS), plain)


def test_steer_manual_handle_and_idempotent_remove(model):
    before = n_hooks(model)
    h = steer(model, torch.ones(64), site=Site.resid_pre(1), coefficient=1.0).apply()
    assert n_hooks(model)["blocks.1.hook_resid_pre"] == before["blocks.1.hook_resid_pre"] + 1
    h.remove()
    h.remove()
    assert n_hooks(model) == before


def test_steer_with_sae_latent_uses_its_decoder_row(model, sae):
    plain = site_value(model, TOKS)
    with steer(model, (sae, 11), site=SITE, coefficient=3.0):
        steered = site_value(model, TOKS)
    assert torch.allclose(steered - plain, (3.0 * sae.W_dec[11]).expand_as(plain), atol=1e-5)


def test_residual_norm_scale_matches_independent_median(model, tokenizer):
    prompts = ["The quick brown fox jumps", "What is the capital of France?", "Hello world"]
    norms = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=SITE)
        norms.append(cache[SITE][0].norm(dim=-1))
    median = float(torch.cat(norms).median())
    assert median_residual_norm(model, prompts, SITE) == pytest.approx(median, rel=1e-5)

    d = torch.randn(64)
    plain = site_value(model, TOKS)
    with steer(
        model, d, site=SITE, coefficient=0.4, scale="residual_norm", calibration_prompts=prompts
    ) as _:
        added = site_value(model, TOKS) - plain
    assert added[0, 0].norm().item() == pytest.approx(0.4 * median, rel=1e-4)
    assert torch.allclose(added[0, 0] / added[0, 0].norm(), d / d.norm(), atol=1e-5)


def test_project_out_removes_the_component_only_where_asked(model):
    d = torch.randn(64)
    u = d / d.norm()
    plain = site_value(model, TOKS)
    with project_out(model, d, site=SITE):
        out = site_value(model, TOKS)
    assert (out @ u).abs().max() < 1e-5
    assert torch.allclose(out, plain - (plain @ u)[..., None] * u, atol=1e-5)
    with project_out(model, d, site=SITE, positions=[1, 3]):
        part = site_value(model, TOKS)
    assert torch.equal(part[:, [0, 2, 4, 5]], plain[:, [0, 2, 4, 5]])
    assert (part[:, [1, 3]] @ u).abs().max() < 1e-5


def sae_lens_reference(sae, x, latents, target):
    """sae-lens' own error-term path with the latents set to ``target`` (an independent reference)."""

    def edit(acts, hook):
        acts[..., latents] = torch.as_tensor(target, dtype=acts.dtype)
        return acts

    sae.use_error_term = True
    try:
        with torch.no_grad():
            return sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", edit)])
    finally:
        sae.use_error_term = False


@pytest.mark.parametrize(
    ("mode", "value"), [("zero", None), ("clamp", 4.0), ("clamp", [1.0, 2.0, 3.0])]
)
def test_ablate_matches_sae_lens_error_term_path(model, sae, mode, value):
    latents = [1, 2, 5]
    plain = site_value(model, TOKS)
    with ablate(model, sae, latents, mode=mode, value=value):
        out = site_value(model, TOKS)
    target = 0.0 if value is None else value
    ref = sae_lens_reference(sae, plain, latents, target)
    assert torch.allclose(out, ref, atol=1e-5)
    # and it is not the bare reconstruction: the SAE's error term is still there
    assert not torch.allclose(out, sae.decode(sae.encode(plain)), atol=1e-3)


def test_ablating_nothing_is_bit_identical(model, sae):
    with torch.no_grad():
        pristine = model(TOKS)
    before = n_hooks(model)
    with ablate(model, sae, []):
        assert n_hooks(model) == before
        with torch.no_grad():
            assert torch.equal(model(TOKS), pristine)
    # zero-ablating latents that never fire also changes nothing
    acts = sae.encode(site_value(model, TOKS))
    dead = [i for i in range(128) if float(acts[..., i].abs().max()) == 0.0][:5]
    assert dead, "expected some latents that are zero on these tokens"
    with ablate(model, sae, dead), torch.no_grad():
        assert torch.equal(model(TOKS), pristine)


def test_ablate_mean_from_vector_and_from_calibration_prompts(model, sae, tokenizer):
    latents = [0, 4]
    means = torch.linspace(0.0, 1.0, 128)
    plain = site_value(model, TOKS)
    with ablate(model, sae, latents, mode="mean", means=means):
        out = site_value(model, TOKS)
    assert torch.allclose(out, sae_lens_reference(sae, plain, latents, means[latents]), atol=1e-5)

    class FakeDiff:
        mean_base = means  # what LatentDiff.mean_base gives

    iv = ablate(model, sae, latents, mode="mean", means=FakeDiff())
    assert torch.allclose(iv.targets, means[latents])

    prompts = ["Hello world! How are you today?", "Tell me a story"]
    feats = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
        feats.append(sae.encode(site_value(model, ids)[0])[:, latents])
    expected = torch.cat(feats).mean(0)
    iv = ablate(model, sae, latents, mode="mean", calibration_prompts=prompts)
    assert torch.allclose(iv.targets, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_problem_and_the_fix(model, sae):
    from sae_lens import StandardSAE, StandardSAEConfig

    d = torch.ones(64)
    with pytest.raises(DirectionError, match="d_model is 64"):
        steer(model, torch.ones(65), site=SITE, coefficient=1.0)
    with pytest.raises(InterventionError, match=r"out of range.*0\.\.1"):
        steer(model, d, site="blocks.7.hook_resid_post", coefficient=1.0)
    with pytest.raises(InterventionError, match="not a site"):
        steer(model, d, site="blocks.0.attn.hook_z", coefficient=1.0)
    for bad in (float("nan"), float("inf"), -math.inf):
        with pytest.raises(InterventionError, match="must be finite"):
            steer(model, d, site=SITE, coefficient=bad)
    with pytest.raises(InterventionError, match="calibration_prompts"):
        steer(model, d, site=SITE, coefficient=0.4, scale="residual_norm")
    with pytest.raises(InterventionError, match="unknown scale"):
        steer(model, d, site=SITE, coefficient=0.4, scale="relative")
    with pytest.raises(InterventionError, match="unknown positions"):
        steer(model, d, site=SITE, coefficient=1.0, positions="response")
    with pytest.raises(InterventionError, match=">= 0"):
        steer(model, d, site=SITE, coefficient=1.0, positions=[-1])
    with pytest.raises(InterventionError, match=r"latent\(s\) \[128\] out of range"):
        ablate(model, sae, [3, 128])
    with pytest.raises(InterventionError, match="repeat"):
        ablate(model, sae, [3, 3])
    other_cfg = StandardSAEConfig(d_in=32, d_sae=16)
    other_cfg.metadata.hook_name = SITE
    with pytest.raises(InterventionError, match=r"SAE reads 32-dimensional.*trained on this model"):
        ablate(model, StandardSAE(other_cfg), [0])
    with pytest.raises(InterventionError, match="needs value"):
        ablate(model, sae, [0], mode="clamp")
    with pytest.raises(InterventionError, match="must be finite"):
        ablate(model, sae, [0], mode="clamp", value=float("nan"))
    with pytest.raises(InterventionError, match="means=<LatentDiff"):
        ablate(model, sae, [0], mode="mean")
    with pytest.raises(InterventionError, match="one per SAE latent"):
        ablate(model, sae, [0, 1], mode="mean", means=torch.ones(5))
    with pytest.raises(InterventionError, match="unknown mode"):
        ablate(model, sae, [0], mode="resample")
    no_site = StandardSAEConfig(d_in=64, d_sae=16)
    with pytest.raises(InterventionError, match="site="):
        ablate(model, StandardSAE(no_site), [0])
    with pytest.raises(DirectionError, match="zero direction"):
        project_out(model, torch.zeros(64), site=SITE)


def test_position_restricted_steering_sees_string_input_on_hooked_transformer(model, tokenizer):
    """HookedTransformer tokenizes strings inside forward; the tracker watches block 0, so it still knows."""
    text = "Hello world! How are you"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    d = torch.randn(64)
    sel = torch.zeros(ids.shape[1], dtype=torch.bool)
    sel[[0, 2]] = True
    h = add_hook(model, SITE, lambda x, hook: x + sel[None, :, None].float() * (5.0 * d))
    with torch.no_grad():
        ref = model(ids)
    h.remove()
    with steer(model, d, site=SITE, coefficient=5.0, positions=[0, 2]), torch.no_grad():
        from_text = model(text, prepend_bos=False)
        from_ids = model(ids)
    assert torch.allclose(from_text, ref, atol=1e-5) and torch.allclose(from_ids, ref, atol=1e-5)
    assert no_trackers(model)


# ------------------------------------------------------------------------------------------------
# positions under generation: the per-forward-mask bug
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["generated", "prompt", "all", [1, 7, 9]])
def test_steered_ht_generate_cached_equals_uncached_equals_reference(model, positions):
    torch.manual_seed(3)
    d = torch.randn(64)
    prompt = [5, 9, 33, 40, 7]
    n = 8
    ref = reference_greedy(model, prompt, d, SITE, 6.0, positions, n)
    with torch.no_grad():
        plain = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            verbose=False,
            stop_at_eos=False,
        )[0, 5:].tolist()
    outs = {}
    with steer(model, d, site=SITE, coefficient=6.0, positions=positions):
        for use_cache in (True, False):
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=n,
                    do_sample=False,
                    verbose=False,
                    stop_at_eos=False,
                    use_past_kv_cache=use_cache,
                )
            outs[use_cache] = out[0, 5:].tolist()
    assert no_trackers(model)
    assert outs[True] == outs[False] == ref
    assert ref != plain  # the steering does something, so the equality above is not vacuous


def test_a_hand_written_cached_loop_is_tracked_too(model):
    """A user's own decoding loop calling model(..., past_kv_cache=...) one token at a time."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    d = torch.randn(64, generator=torch.Generator().manual_seed(9))
    prompt = [5, 9, 33, 40, 7]
    ref = reference_greedy(model, prompt, d, SITE, 6.0, "generated", 6)
    out = []
    with steer(model, d, site=SITE, coefficient=6.0, positions="generated"), torch.no_grad():
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", 1)
        logits = model(torch.tensor([prompt]), past_kv_cache=cache)
        for _ in range(6):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), past_kv_cache=cache)
    assert out == ref
    # a forward that skips block 0 gives the tracker nothing: an error, not stale positions
    later = steer(model, d, site="blocks.1.hook_resid_pre", coefficient=1.0, positions="prompt")
    resid = model.embed(torch.tensor([prompt])) + model.pos_embed(torch.tensor([prompt]))
    with later, torch.no_grad():
        model(torch.tensor([prompt]))  # leaves positions behind for a 5-token forward
        with pytest.raises(InterventionError, match="positions='all'"):
            model(resid, start_at_layer=1)


def test_generated_positions_are_steered_at_every_cached_step(model):
    """Count the tokens actually changed per forward: one per decoding step, not only the first."""
    changed = []
    prompt = torch.tensor([[5, 9, 33, 40, 7]])
    iv = steer(model, torch.ones(64), site=SITE, coefficient=1.0, positions="generated")

    def spy(x, hook):
        changed.append(x.shape[1])

    with iv:
        h = add_hook(model, SITE, spy)
        try:
            with torch.no_grad():
                model.generate(
                    prompt, max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False
                )
        finally:
            h.remove()
    # cached HookedTransformer.generate: one prompt forward, then one-token forwards
    assert changed == [5, 1, 1, 1, 1]
    # the tracker saw them as generated positions 5..8 (checked through the published-state path)
    with publish_positions(ForwardPositions(torch.tensor([[6]]), torch.tensor([5]))):
        assert forward_positions().positions.item() == 6
    assert forward_positions() is None


def test_tracker_handles_left_padded_batches_in_ht_generate(model, tokenizer):
    """Two prompts of different length, left-padded by HookedTransformer.generate itself."""
    d = torch.randn(64, generator=torch.Generator().manual_seed(5))
    prompts = ["Hello world! How are you", "The fox"]
    with steer(model, d, site=SITE, coefficient=6.0, positions="generated"), torch.no_grad():
        batched = model.generate(
            prompts,
            max_new_tokens=6,
            do_sample=False,
            verbose=False,
            stop_at_eos=False,
            return_type="tokens",
            padding_side="left",
            prepend_bos=False,
        )
    for i, p in enumerate(prompts):
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        ref = reference_greedy(model, ids, d, SITE, 6.0, "generated", 6)
        assert batched[i, -6:].tolist() == ref


# ------------------------------------------------------------------------------------------------
# composing, nesting, hook safety
# ------------------------------------------------------------------------------------------------


def test_compose_and_nest_on_several_sites(model, sae):
    d1, d2 = torch.randn(64), torch.randn(64)
    a = steer(model, d1, site=SITE, coefficient=1.5)
    b = project_out(model, d2, site="blocks.1.hook_resid_pre")
    c = ablate(model, sae, [2])
    both = a + b
    assert isinstance(both, Composed) and len(compose(both, c).parts) == 3
    before = n_hooks(model)
    with torch.no_grad():
        pristine = model(TOKS)
        with a:
            only_a = model(TOKS)
        with both, c:
            assert n_hooks(model)[SITE] == before[SITE] + 2
            with a:  # the same intervention entered twice nests
                assert n_hooks(model)[SITE] == before[SITE] + 3
            all3 = model(TOKS)
        h = compose(a, b, c).apply()
        again = model(TOKS)
        h.remove()
        h.remove()
        assert n_hooks(model) == before
        assert torch.equal(model(TOKS), pristine)
    assert not torch.equal(only_a, pristine) and torch.equal(all3, again)


def test_apply_failure_leaves_nothing_behind(model):
    a = steer(model, torch.ones(64), site=SITE, coefficient=1.0, positions="generated")
    before = n_hooks(model)
    with pytest.raises(InterventionError), compose(a, a):
        raise InterventionError("boom")
    assert n_hooks(model) == before and no_trackers(model)


def test_interventions_apply_to_a_twin_model_and_refuse_other_widths(model, tokenizer):
    from modeldiff.testing import tiny_hooked_transformer

    twin = tiny_hooked_transformer(tokenizer=tokenizer, seed=2)
    narrow = tiny_hooked_transformer(tokenizer=tokenizer, d_model=32)
    iv = steer(model, torch.ones(64), site=SITE, coefficient=1.0)
    with iv.apply(twin):
        assert len(twin.hook_dict[SITE].fwd_hooks) == 1
    assert len(twin.hook_dict[SITE].fwd_hooks) == 0
    with pytest.raises(InterventionError, match="d_model 32"):
        iv.apply(narrow)


KINDS = ("steer", "project", "ablate")
POSITIONS = ("all", "prompt", "generated", (0, 2))
SITES = ("blocks.0.hook_resid_pre", SITE, "blocks.1.hook_attn_out", "blocks.1.hook_resid_post")


DIR = torch.randn(64, generator=torch.Generator().manual_seed(11))


class Boom(Exception):
    pass


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    plan=st.lists(
        st.tuples(
            st.sampled_from(KINDS),
            st.sampled_from(SITES),
            st.sampled_from(POSITIONS),
            st.booleans(),  # use the `with` form (else apply()/remove())
        ),
        min_size=1,
        max_size=4,
    ),
    raise_at=st.integers(min_value=-1, max_value=4),
    run_inside=st.booleans(),
)
def test_random_nests_with_exceptions_leave_the_model_pristine(
    model, sae, plan, raise_at, run_inside
):
    user_calls = []
    model.add_hook("blocks.1.hook_resid_pre", lambda x, hook: user_calls.append(1))
    try:
        before = n_hooks(model)
        with torch.no_grad():
            pristine = model(TOKS)
        user_calls.clear()

        def build(kind, site, positions):
            if kind == "steer":
                return steer(model, DIR, site=site, coefficient=2.0, positions=positions)
            if kind == "project":
                return project_out(model, DIR, site=site, positions=positions)
            return ablate(model, sae, [1, 2], site=site, positions=positions)

        def nest(depth):
            if depth == raise_at:
                raise Boom
            if depth == len(plan):
                if run_inside:
                    with torch.no_grad():
                        model(TOKS)
                return
            kind, site, positions, with_form = plan[depth]
            iv = build(kind, site, positions)
            if with_form:
                with iv:
                    nest(depth + 1)
            else:
                h = iv.apply()
                try:
                    nest(depth + 1)
                finally:
                    h.remove()

        with contextlib.suppress(Boom):
            nest(0)
        assert n_hooks(model) == before
        assert no_trackers(model)
        with torch.no_grad():
            assert torch.equal(model(TOKS), pristine)
        assert user_calls, "the user's own hook must still run"
    finally:
        model.reset_hooks()


# ------------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------------


def test_sweep_records_scores_and_plots(model):
    d = torch.randn(64)

    def score(m):
        with torch.no_grad():
            logits = m(TOKS)
        return {"logit0": float(logits[0, -1, 0]), "logit1": float(logits[0, -1, 1])}

    coefficients = [-2.0, 0.0, 2.0]
    res = sweep(
        model,
        lambda c: steer(model, d, site=SITE, coefficient=c),
        coefficients,
        score,
        progress=False,
    )
    assert res.column("coefficient") == coefficients and res.metrics == ["logit0", "logit1"]
    for c, row in zip(coefficients, res.records):
        with steer(model, d, site=SITE, coefficient=c):
            assert row["logit0"] == pytest.approx(score(model)["logit0"])
    assert res.records[1]["logit0"] == pytest.approx(score(model)["logit0"])
    fig = res.plot("logit0")
    assert isinstance(fig, go.Figure) and list(fig.data[0].x) == coefficients
    assert len(res.plot().data) == 2
    with pytest.raises(InterventionError, match="must return an intervention"):
        sweep(model, lambda c: None, [1.0], score, progress=False)


def test_ablate_with_an_sae_in_another_dtype(model, sae):
    """A float64 SAE on a float32 model: computed in the SAE's dtype, written back in the model's."""
    import copy

    sae64 = copy.deepcopy(sae).to(torch.float64)
    plain = site_value(model, TOKS)
    with ablate(model, sae64, [1, 2]):
        out = site_value(model, TOKS)
    assert out.dtype == plain.dtype
    ref = sae_lens_reference(sae64, plain.double(), [1, 2], 0.0)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_site_defaults_to_the_directions_own_site(tiny_ht):
    """A LatentDiff row or an (sae, latent) pair knows its site; a bare vector must be told."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from modeldiff import InterventionError, Site, project_out, steer

    cfg = StandardSAEConfig(d_in=64, d_sae=16)
    cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    sae = StandardSAE(cfg)
    toks = torch.tensor([[5, 6, 7]])
    with steer(tiny_ht, (sae, 3), coefficient=2.0):
        implicit = tiny_ht(toks)
    with steer(tiny_ht, (sae, 3), site=Site.resid_pre(1), coefficient=2.0):
        explicit = tiny_ht(toks)
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    assert not torch.equal(implicit, tiny_ht(toks))

    class Row:
        site = Site.resid_post(0)

        def as_direction(self):
            return sae.W_dec[3].detach()

    with project_out(tiny_ht, Row()):
        projected = tiny_ht(toks)
    with project_out(tiny_ht, Row(), site=Site.resid_post(0)):
        torch.testing.assert_close(tiny_ht(toks), projected, rtol=0, atol=0)
    with pytest.raises(InterventionError, match="site is missing"):
        steer(tiny_ht, torch.ones(64), coefficient=1.0)
