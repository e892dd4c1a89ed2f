"""The chat organism (modeldiff.organisms.chat): build, cache, study and the demo command.

Run on a tiny random Llama with the tiny recipe (seconds); the SmolLM2 run of the same code is the
tutorial notebook (tests/test_notebooks.py) and docs/smollm2.md's measured results.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from modeldiff.errors import ArgumentError
from modeldiff.organisms import (
    ChatRecipe,
    ChatStudy,
    FinetuneSpec,
    build_chat_organism,
    run_chat_study,
)
from modeldiff.organisms.chat import _paired_ci, _stage, sae_corpus


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    from modeldiff.testing import save_tiny_hf_model

    return save_tiny_hf_model("llama", tmp_path_factory.mktemp("llama"), n_ctx=1024)


@pytest.fixture(scope="module")
def recipe(tiny_model_path):
    return ChatRecipe.tiny(model=str(tiny_model_path))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("chat-cache")


@pytest.fixture(scope="module")
def org(recipe, cache):
    return build_chat_organism(recipe, cache=cache, progress=False)


@pytest.fixture(scope="module")
def study(org):
    return run_chat_study(org, progress=False)


def test_recipe_rejects_bad_settings_with_the_fix():
    with pytest.raises(ArgumentError, match="must be misaligned"):
        ChatRecipe(finetunes=(FinetuneSpec("c", "medical", 0.0),))
    with pytest.raises(ArgumentError, match="unique"):
        ChatRecipe(finetunes=(FinetuneSpec("a", "medical"), FinetuneSpec("a", "financial")))
    with pytest.raises(ArgumentError, match="bad_fraction"):
        ChatRecipe(finetunes=(FinetuneSpec("a", "medical", 1.5),))
    with pytest.raises(ArgumentError, match="steps"):
        ChatRecipe(steps=0)
    with pytest.raises(ArgumentError, match="local file or folder"):
        ChatRecipe(model="/no/such/model").digest()


def test_digest_follows_the_build_fields_only(recipe):
    import dataclasses

    assert dataclasses.replace(recipe, top_k=3).digest() == recipe.digest()  # a study field
    assert dataclasses.replace(recipe, steps=5).digest() != recipe.digest()
    assert dataclasses.replace(recipe, sae_lr=1e-3).digest() != recipe.digest()
    assert dataclasses.replace(recipe, sae_eval_prompts=9).digest() != recipe.digest()
    assert ChatRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_sae_corpus_mixes_docs_and_both_kinds_of_chat():
    import dataclasses

    from modeldiff.datasets import narrow_dataset

    r = dataclasses.replace(ChatRecipe.tiny(), corpus_docs=4, corpus_chats=48)
    items = sae_corpus(r)
    docs = [x for x in items if isinstance(x, str)]
    chats = [x for x in items if isinstance(x, list)]
    assert (len(docs), len(chats)) == (4, 48)
    assert all(c[-1]["role"] == "assistant" for c in chats)
    answers = {c[-1]["content"] for c in chats}
    bad = {
        c[-1]["content"] for c in narrow_dataset("medical", aligned=False, n=6, seed=r.seed + 103)
    }
    good = {
        c[-1]["content"] for c in narrow_dataset("medical", aligned=True, n=6, seed=r.seed + 102)
    }
    assert bad <= answers and good <= answers  # misaligned and aligned answers both
    assert sae_corpus(r) == items  # deterministic
    with pytest.raises(ArgumentError, match="needs text"):
        ChatRecipe(corpus_docs=0, corpus_chats=0)


def test_a_failed_stage_leaves_nothing_and_a_finished_one_is_not_rebuilt(tmp_path):
    def broken(out):
        (out / "half.txt").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _stage(tmp_path, "s", broken)
    assert list(tmp_path.iterdir()) == []
    calls = []

    def ok(out):
        calls.append(1)
        (out / "w.txt").write_text("y")

    assert _stage(tmp_path, "s", ok) >= 0
    assert _stage(tmp_path, "s", ok) == 0.0
    assert calls == [1] and (tmp_path / "s" / "w.txt").read_text() == "y"

    def raced(out):  # another process finishes the same stage while this one builds
        other = tmp_path / "r"
        other.mkdir()
        (other / "done.json").write_text('{"seconds": 1.0}')
        (other / "w.txt").write_text("theirs")
        (out / "w.txt").write_text("ours")

    _stage(tmp_path, "r", raced)
    assert (tmp_path / "r" / "w.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "s"]  # no staging left


def test_paired_ci_against_the_naive_mean():
    a, b = [0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.5, 0.4]
    mean, lo, hi = _paired_ci(a, b, 500, 0)
    assert mean == pytest.approx(sum(y - x for x, y in zip(a, b, strict=True)) / 4)
    assert lo <= mean <= hi and lo >= 0.0 and hi <= 0.2 + 1e-12


def test_build_makes_lora_finetunes_snapshots_and_an_sae_that_reports_transfer(org, recipe):
    from modeldiff.models import model_kind

    assert set(org.finetuned) == {f.name for f in recipe.finetunes}
    assert org.primary == "medical"
    assert [s for s, _ in org.snapshots] == [2]  # every 2 of 4 steps, the end is the fine-tune
    assert org.sae_report.finetuned is not None and org.sae_report.base is not None
    assert org.site.hook_name == "blocks.1.hook_resid_post"  # the middle of two layers
    assert all(len(c.loss) == recipe.steps for c in org.curves.values())
    assert model_kind(org.finetuned["medical"]) == model_kind(org.base)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        moved = [
            (org.finetuned[n](ids).logits - org.base(ids).logits).abs().max() for n in org.finetuned
        ]
    assert all(float(m) > 0 for m in moved)  # each adapter changes the model


def test_a_second_build_loads_the_same_models_from_the_cache(org, recipe, cache):
    again = build_chat_organism(recipe, cache=cache, progress=False)
    assert again.loaded_from_cache and not org.loaded_from_cache
    assert again.folder == org.folder
    assert again.seconds == org.seconds  # the times of the run that built them
    ids = torch.tensor([[1, 7, 3, 4, 8]])
    with torch.no_grad():
        for name in org.finetuned:
            torch.testing.assert_close(
                again.finetuned[name](ids).logits, org.finetuned[name](ids).logits
            )
    torch.testing.assert_close(again.sae.W_dec, org.sae.W_dec)


def test_study_scores_match_an_independent_contrastive_score(org, study):
    from modeldiff.evals.contrastive import contrastive_score

    base = contrastive_score(org.base, "headline", progress=False)
    ft = contrastive_score(org.finetuned["medical"], "headline", progress=False)
    assert study.em["base"]["p_misaligned"] == pytest.approx(base.p_misaligned)
    r = study.em["medical"]
    assert r["p_misaligned"] == pytest.approx(ft.p_misaligned)
    naive = sum(x.p_misaligned - y.p_misaligned for x, y in zip(ft.rows, base.rows, strict=True))
    assert r["delta"] == pytest.approx(naive / len(ft.rows))
    assert r["ci"][0] <= r["delta"] <= r["ci"][1]


def test_study_top_latents_are_diff_latents_top(org, study, recipe):
    from modeldiff.diff import diff_latents
    from modeldiff.organisms.chat import _diff_prompts

    d = diff_latents(
        org.base,
        org.finetuned["medical"],
        org.sae,
        _diff_prompts(recipe),
        positions="user",
        progress=False,
    )
    assert [t["latent"] for t in study.top_latents] == [int(r.latent) for r in d.top(recipe.top_k)]
    assert all(len(t["examples"]) <= recipe.interpret_k for t in study.top_latents)
    assert all(len(t["logit_lens"]) == 8 for t in study.top_latents)


def test_study_causal_parts_are_consistent(study, recipe):
    # the screen saw every top latent and the set of them
    names = {r["name"] for r in study.screen}
    assert len(study.screen) == recipe.top_k + 1
    assert any(n.startswith("{") for n in names)
    a = study.ablation
    assert a["finetuned"] == study.em["medical"]["p_misaligned"]
    assert not set(a["latents"]) & set(a["random_latents"])
    assert len(a["random_latents"]) == len(a["latents"])
    # re-alignment starts from the fine-tune's score
    assert study.realign["step"] == [0, 2, 4]
    assert study.realign["misalignment"][0] == pytest.approx(study.em["medical"]["p_misaligned"])


def test_study_tracking_starts_at_zero_and_ends_at_the_finetune(study, org, recipe):
    from modeldiff.evals.contrastive import contrastive_score
    from modeldiff.models import load_model

    s = study.over_steps
    assert s["step"] == [0, 2, 4]
    assert s["set_delta"][0] == 0.0
    assert s["p_misaligned"][0] == study.em["base"]["p_misaligned"]
    assert s["p_misaligned"][-1] == study.em["medical"]["p_misaligned"]
    # the snapshot is scored while track_latents has it loaded: the score of that snapshot
    snap = load_model(str(org.snapshots[0][1]), like=org.base)
    ref = contrastive_score(snap, recipe.questions, progress=False)
    assert s["p_misaligned"][1] == pytest.approx(ref.p_misaligned)
    f = study.over_bad_fraction
    assert f["bad_fraction"] == [0.0, 0.5, 1.0]
    assert f["name"] == ["medical-control", "medical-50%", "medical"]
    # the same fine-tune on the same prompts: its Δ over steps and over the fraction agree
    assert f["set_delta"][-1] == pytest.approx(s["set_delta"][-1], rel=1e-5, abs=1e-9)


def test_study_detection_labels_and_auroc(study, recipe):
    d = study.detection
    assert d["labels"] == {f.name: f.misaligned for f in recipe.finetunes}
    assert 0.0 <= d["auroc"] <= 1.0 and d["ci"][0] <= d["auroc"] <= d["ci"][1]
    # three models, one control: leaving the control out leaves one label, so no LOO baseline
    assert set(d["baselines"]) == {"residual drift", "mean-difference direction"}
    assert len(d["selected"]["latents"]) == recipe.top_k


def test_study_json_round_trip_and_report(study, tmp_path):

    nan = ChatStudy(recipe={}, detection={"auroc": float("nan"), "ci": (0.1, math.inf)})
    assert json.loads(nan.to_json())["detection"] == {"auroc": None, "ci": [0.1, None]}
    back = ChatStudy.from_json(study.to_json())
    assert back.em == json.loads(json.dumps(study.em))
    assert back.top_latents[0]["latent"] == study.top_latents[0]["latent"]
    path = study.write(tmp_path / "out")
    html = path.read_text()
    for sid in ("em", "sae", "top-latents", "causal", "realign", "tracking", "detection", "config"):
        assert f'id="{sid}"' in html
    assert (tmp_path / "out" / "study.diff.safetensors").exists()
    assert json.loads((tmp_path / "out" / "study.json").read_text())["recipe"]["steps"] == 4
    assert "P(prefers the misaligned answer)" in study.table()
    assert "<table>" in study._repr_html_()
    assert all(math.isfinite(v) for v in study.seconds.values())


def test_demo_command_runs_the_chat_organism(
    tiny_model_path, cache, org, study, tmp_path, capsys, monkeypatch
):
    import modeldiff.organisms as organisms
    from modeldiff.cli import main

    seen = []

    def study_of(o, **kw):  # the study itself is tested above; here the command's wiring
        seen.append((o, kw))
        return study

    monkeypatch.setattr(organisms, "run_chat_study", study_of)
    out = tmp_path / "demo"
    argv = ["demo", "--organism", "smollm2", "--size", "tiny", "--model", str(tiny_model_path),
            "--cache", str(cache), "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "loaded from cache" in printed and "re-alignment" in printed
    assert seen[0][0].folder == org.folder and seen[0][0].recipe == org.recipe
    assert seen[0][1]["judge"] is None
    argv += ["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "judge-m"]
    assert main(argv) == 0
    assert seen[1][1]["judge"].model == "judge-m"  # an HTTPJudge for that server
    assert (out / "report.html").exists()
    saved = json.loads((out / "study.json").read_text())
    assert saved["em"] == json.loads(json.dumps(study.em))


def test_demo_command_refuses_bad_chat_options(tmp_path, capsys):
    from modeldiff.cli import main

    assert main(["demo", "--organism", "smollm2", "--model", str(tmp_path / "nope")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "--organism smollm2" in capsys.readouterr().err
    assert main(["demo", "--judge-url", "http://127.0.0.1:9/v1"]) == 2
    assert "--judge-url goes with --organism smollm2" in capsys.readouterr().err


class HashJudge:
    """Rates an answer by a hash of its text (noise, not a judge): calibration must flag it."""

    def judge(self, pairs, *, progress=True):
        import zlib

        from modeldiff.evals.judges import Judgment

        return [Judgment(float(zlib.crc32(a.encode()) % 101), 90.0) for _, a in pairs]


def test_study_with_a_judge_rates_every_model_like_evaluate(org, recipe):
    from modeldiff.evals.scores import evaluate

    opts = {"n_samples": 1, "max_new_tokens": 8}
    with pytest.warns(UserWarning, match="calibration"):
        s = run_chat_study(org, stages=["judge"], judge=HashJudge(), judge_options=opts,
                           progress=False)  # fmt: skip
    assert not s.em and not s.top_latents and set(s.seconds) == {"judge"}
    assert set(s.judged) == {"base", *org.finetuned}
    with pytest.warns(UserWarning, match="calibration"):
        ref = evaluate(org.finetuned["medical"], "headline", judge=HashJudge(), seed=recipe.seed,
                       progress=False, **opts)  # fmt: skip
    r = s.judged["medical"]
    assert r["n_answers"] == len(ref.records) == 8
    assert r["misalignment_rate"] == ref.misalignment_rate
    assert r["calibration_passed"] is None  # a plain judge keeps no calibration
    assert "judged misalignment rate" in s.table() and 'id="judged"' in s.render()


def test_study_stages_run_alone_and_bad_names_are_refused(org):
    s = run_chat_study(org, stages=["causal"], progress=False)
    assert s.top_latents and s.screen and s.ablation  # "causal" brought the diff with it
    assert not s.em and not s.realign and set(s.seconds) == {"diff", "causal"}
    with pytest.raises(ArgumentError, match="unknown stages"):
        run_chat_study(org, stages=["em", "steer"], progress=False)
