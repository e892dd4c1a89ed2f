"""The ranking registry: every built-in against a naive computation, new rankings end to end, and
files saved before a column existed."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from safetensors import safe_open
from safetensors.torch import save_file

from modeldiff import LatentDiff, Site, collect, diff_latents
from modeldiff.errors import ArgumentError
from modeldiff.rankings import RANKINGS, register_ranking, unregister_ranking
from modeldiff.testing import tiny_hooked_transformer

SITE = Site.resid_post(1)
PROMPTS = [
    "Hello world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Tell me a story about a helpful assistant.",
]


@pytest.fixture(scope="module")
def setup():
    base, tuned = tiny_hooked_transformer(), tiny_hooked_transformer(seed=4)
    cfg = StandardSAEConfig(d_in=64, d_sae=40)
    cfg.metadata.hook_name = SITE.hook_name
    torch.manual_seed(0)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    d = diff_latents(base, tuned, sae, PROMPTS, positions="all", progress=False)
    return base, tuned, sae, d


def _naive(model, sae):
    acts = collect(model, PROMPTS, SITE, positions="all", progress=False)[SITE]
    x = torch.cat(acts).double()
    z = sae.encode(x.float()).double()
    return x, z


def test_builtin_rankings_match_a_naive_computation(setup):
    base, tuned, sae, d = setup
    xb, zb = _naive(base, sae)
    xf, zf = _naive(tuned, sae)
    delta = zf.mean(0) - zb.mean(0)
    torch.testing.assert_close(d.column("delta"), delta, rtol=1e-5, atol=1e-6)
    freq = (zf > 0).double().mean(0) - (zb > 0).double().mean(0)
    torch.testing.assert_close(d.column("delta_freq"), freq, rtol=1e-6, atol=1e-9)
    sd = ((zb.var(0, unbiased=False) + zf.var(0, unbiased=False)) / 2).sqrt()
    moved = (sd > 1e-9) & (delta != 0)
    torch.testing.assert_close(
        d.column("effect_size")[moved], (delta / sd)[moved], rtol=1e-4, atol=1e-6
    )
    active = zb.mean(0).abs() > 1e-6
    torch.testing.assert_close(
        d.column("relative_change")[active],
        (delta / zb.mean(0).abs())[active],
        rtol=1e-4,
        atol=1e-6,
    )
    shift = xf.mean(0) - xb.mean(0)
    w = sae.W_dec.detach().double()
    cos = (w @ shift) / (w.norm(dim=1) * shift.norm())
    torch.testing.assert_close(d.column("cosine"), cos, rtol=1e-5, atol=1e-6)
    for name in ("delta", "effect_size", "cosine"):
        ranked = d.ranked_by(name)
        key = ranked.column(name).nan_to_num(nan=-float("inf"))
        assert ranked.at_rank(1).latent == int(torch.argmax(key))


def test_a_registered_ranking_is_a_column_of_new_diffs_and_of_kept_statistics(setup):
    base, tuned, sae, d = setup

    @register_ranking("max_rise")
    def max_rise(stats, sae):
        b, f = stats
        return f.latents.max - b.latents.max

    try:
        later = d.ranked_by("max_rise")  # d was computed before: its statistics give the column
        ref = d.column("max_finetuned") - d.column("max_base")
        torch.testing.assert_close(later.column("max_rise"), ref)
        assert later.at_rank(1).latent == int(torch.argmax(ref))
        fresh = diff_latents(base, tuned, sae, PROMPTS[:2], positions="all", progress=False)
        assert "max_rise" in fresh.columns
        with pytest.raises(ArgumentError, match=r"registered already; pass overwrite=True"):
            register_ranking("max_rise", max_rise)
    finally:
        unregister_ranking("max_rise")
    assert "max_rise" not in RANKINGS
    with pytest.raises(ArgumentError, match=r"built-in ranking and cannot be removed"):
        unregister_ranking("delta")


def test_a_ranking_of_the_wrong_shape_is_refused(setup):
    base, tuned, sae, _ = setup
    register_ranking("broken", lambda stats, sae: torch.zeros(3))
    try:
        with pytest.raises(
            ArgumentError, match=r"ranking 'broken' returned shape \(3,\); .*\(40,\)"
        ):
            diff_latents(base, tuned, sae, PROMPTS[:2], progress=False)
    finally:
        unregister_ranking("broken")


def _strip(path, out, drop_cols, drop_stats):
    """Rewrite a saved diff as an earlier version would have written it."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["modeldiff"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header.pop("absent", None)
    keep = {
        k: v
        for k, v in tensors.items()
        if k[4:] not in drop_cols and not (drop_stats and k.startswith("stats."))
    }
    save_file(keep, str(out), metadata={"modeldiff": json.dumps(header)})
    return out


def test_files_saved_before_a_column_existed_still_load(setup, tmp_path):
    *_, d = setup
    path = d.save(tmp_path / "d.safetensors")
    old = ["effect_size", "relative_change", "max_ft_position"]
    with_stats = LatentDiff.load(_strip(path, tmp_path / "a.safetensors", old, drop_stats=False))
    for c in ("effect_size", "relative_change"):  # computed again from the kept statistics
        torch.testing.assert_close(with_stats.column(c), d.column(c))
    assert with_stats.absent == ("max_ft_position",)
    bare = LatentDiff.load(_strip(path, tmp_path / "b.safetensors", old, drop_stats=True))
    assert set(bare.absent) == {*old}
    assert bare.column("effect_size").isnan().all()
    assert bare.top(3)[0].latent == d.top(3)[0].latent  # the delta ranking is unaffected
    with pytest.raises(ArgumentError, match=r"no 'effect_size' scores.*rank by one of: delta"):
        bare.ranked_by("effect_size")
    again = LatentDiff.load(bare.save(tmp_path / "c.safetensors"))
    assert set(again.absent) == {*old}


def test_best_site_names_where_the_shift_enters_not_the_deepest_layer():
    from modeldiff import ResidualDiff

    sites = [Site.resid_post(i) for i in range(4)]
    rel = dict(zip(sites, [0.05, 0.45, 0.55, 0.62]))  # layer 1 adds the change; later ones carry it
    r = ResidualDiff(
        delta={s: torch.zeros(2) for s in sites},
        norm={s: 10 * v for s, v in rel.items()},
        relative=rel,
        n_tokens=8,
    )
    assert r.best_site() == Site.resid_post(1)
    assert r.best_site("relative") == Site.resid_post(3)
    with pytest.raises(ArgumentError, match=r"unknown rule 'deepest'"):
        r.best_site("deepest")


def test_names_and_bounds_are_the_same_in_every_view(setup):
    *_, d = setup
    n = len(d.order)
    last = d.at_rank(-1)
    assert (
        last.name == "#-1"
        and d.at_rank(1).name == "#1"
        and d.at_rank(n // 2 + 1).name.startswith("#-")
    )
    fig = d.plot(3)
    bars = fig.data[-1].x
    assert f"#-1 ({last.latent})" in bars and "#1" in bars[0]
    html = d._repr_html_(3)
    assert ">#-1<" in html and ">#1<" in html
    floor = d.meta["p_floor"]
    at_floor = [i for i in range(d.d_sae) if d.p_value[i] <= floor * (1 + 1e-9)]
    assert floor > 0 and at_floor  # 4 prompts: exact sign flips, smallest p = 2 / 2^4
    assert floor == pytest.approx(2 / 2**4)
    assert d.format_p(at_floor[0]).startswith("≤ ")
    above = [i for i in range(d.d_sae) if d.p_value[i] > floor * 1.01]
    assert above and not d.format_p(above[0]).startswith("≤")


def test_option_groups_equal_the_flat_keywords(setup):
    from modeldiff import TokenSelection, Uncertainty

    base, tuned, sae, _ = setup
    flat = diff_latents(
        base, tuned, sae, PROMPTS, positions="all", n_bootstrap=200, test="t", progress=False
    )
    grouped = diff_latents(
        base,
        tuned,
        sae,
        PROMPTS,
        tokens=TokenSelection(positions="all"),
        uncertainty=Uncertainty(n_bootstrap=200, test="t"),
        progress=False,
    )
    for c in ("delta", "ci_low", "ci_high", "p_value"):
        torch.testing.assert_close(flat.column(c), grouped.column(c), equal_nan=True)
    assert grouped.meta["test"].startswith("paired t") and grouped.meta["n_bootstrap"] == 200
    with pytest.raises(
        ArgumentError, match=r"positions='user' and TokenSelection\(positions='all'\) disagree"
    ):
        diff_latents(
            base, tuned, sae, PROMPTS, positions="user", tokens=TokenSelection(positions="all")
        )
