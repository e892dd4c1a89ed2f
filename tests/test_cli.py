"""The `modeldiff` command end to end: help, diff → report, steer, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeldiff.cli import main


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "modeldiff.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("demo", "diff", "steer", "report"):
        assert cmd in out.stdout
    sub = run_cli("diff", "--help")
    for flag in ("--base", "--finetuned", "--sae", "--prompts", "--positions", "--out"):
        assert flag in sub.stdout


def test_errors_are_one_line_and_nonzero_and_debug_shows_traceback(tmp_path):
    out = run_cli("report", str(tmp_path / "missing"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modeldiff: error:")
    assert "has no result.json" in lines[0] and "Traceback" not in out.stderr
    dbg = run_cli("--debug", "report", str(tmp_path / "missing"))
    assert dbg.returncode == 2 and "Traceback" in dbg.stderr


@pytest.fixture(scope="module")
def pair_and_sae(tmp_path_factory):
    """A tiny GPT-2 base, a perturbed 'fine-tune' of it, and an SAE on blocks.0.hook_resid_post."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from transformers import AutoModelForCausalLM

    from modeldiff.testing import save_tiny_hf_model

    root = tmp_path_factory.mktemp("cli")
    base = save_tiny_hf_model("gpt2", root / "base")
    tuned = save_tiny_hf_model("gpt2", root / "tuned")
    m = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(tuned)
    cfg = TopKSAEConfig(d_in=64, d_sae=96, k=8)
    cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    torch.manual_seed(0)
    sae = TopKSAE(cfg)
    sae.save_model(root / "sae")
    prompts = root / "prompts.txt"
    prompts.write_text("Hello world\nThe quick brown fox\nWhat is the capital of France?\n")
    return base, tuned, root / "sae", prompts


def test_diff_then_report_end_to_end(pair_and_sae, tmp_path, capsys):
    from modeldiff.diff import LatentDiff, diff_latents
    from modeldiff.models import load_model
    from modeldiff.saes import load_sae

    base, tuned, sae, prompts = pair_and_sae
    out = tmp_path / "d"
    code = main(
        [
            "diff",
            "--base",
            str(base),
            "--finetuned",
            str(tuned),
            "--sae",
            str(sae),
            "--prompts",
            str(prompts),
            "--positions",
            "all",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    saved = LatentDiff.load(out / "diff.safetensors")
    # the CLI's ranking equals a direct library call on the same inputs
    b = load_model(str(base))
    ref = diff_latents(
        b,
        load_model(str(tuned), like=b),
        load_sae(str(sae)),
        prompts.read_text().splitlines(),
        positions="all",
        progress=False,
    )
    assert [r.latent for r in saved.top(10)] == [r.latent for r in ref.top(10)]
    assert torch.allclose(saved.delta, ref.delta, atol=1e-6)
    assert f"latent {ref.top(1)[0].latent}" in printed
    html = (out / "report.html").read_text()
    assert '<section id="top-latents">' in html and '<section id="delta">' in html
    # `report DIR` re-renders from the saved folder
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert '<section id="top-latents">' in (out / "report.html").read_text()
    assert json.loads((out / "result.json").read_text())["config"]["positions"] == "all"


def test_diff_bad_prompt_file_is_one_clear_line(pair_and_sae, tmp_path, capsys):
    base, tuned, sae, _ = pair_and_sae
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    code = main(
        [
            "diff",
            "--base",
            str(base),
            "--finetuned",
            str(tuned),
            "--sae",
            str(sae),
            "--prompts",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_steer_prints_both_continuations_and_matches_library(pair_and_sae, capsys):
    from modeldiff.generation import generate
    from modeldiff.interventions import steer
    from modeldiff.models import load_model
    from modeldiff.saes import load_sae

    base, _, sae, _ = pair_and_sae
    args = ["steer", "--model", str(base), "--sae", str(sae), "--latent", "3"]
    args += ["--coefficient", "50", "--prompt", "Hello world", "--max-new-tokens", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    m, s = load_model(str(base)), load_sae(str(sae))
    plain = generate(m, ["Hello world"], max_new_tokens=6, progress=False)[0]
    with steer(m, (s, 3), site="blocks.0.hook_resid_post", coefficient=50.0):
        steered = generate(m, ["Hello world"], max_new_tokens=6, progress=False)[0]
    assert f"unsteered:  {plain}" in out and f"steered:    {steered}" in out
    assert plain != steered


def test_steer_latent_out_of_range_is_explained(pair_and_sae, capsys):
    base, _, sae, _ = pair_and_sae
    code = main(
        [
            "steer",
            "--model",
            str(base),
            "--sae",
            str(sae),
            "--latent",
            "500",
            "--coefficient",
            "1",
            "--prompt",
            "hi",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "out of range" in err and "0..95" in err


def test_diff_with_nproc_2_equals_one_process_bit_for_bit(pair_and_sae, tmp_path):
    """`modeldiff diff --nproc 2` relaunches itself under torchrun (two gloo workers, one thread
    each); its saved diff equals a one-process run at one thread, tensor for tensor."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    base, tuned, sae, prompts = pair_and_sae
    common = [
        "diff",
        "--base",
        str(base),
        "--finetuned",
        str(tuned),
        "--sae",
        str(sae),
        "--prompts",
        str(prompts),
        "--quiet",
        "--batch-size",
        "1",
    ]  # 3 batches: both work
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeldiff.cli",
            *common,
            "--out",
            str(tmp_path / "two"),
            "--nproc",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = (
        load_file(str(tmp_path / "one" / "diff.safetensors")),
        load_file(str(tmp_path / "two" / "diff.safetensors")),
    )
    assert set(a) == set(b)
    for k in a:  # bit for bit, NaN where the other has NaN
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert (tmp_path / "two" / "result.json").is_file()
    assert main([*common, "--out", str(tmp_path / "bad"), "--nproc", "0"]) == 2
    assert not (tmp_path / "bad").exists()
