"""Checkpointed diffs: a run SIGKILLed mid-way resumes to exactly the uninterrupted result.

Run as a script (``python tests/test_resume.py CKPT``), this file is the worker process the kill
test starts: it checkpoints every second batch and dies by SIGKILL during the fourth.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

N_PROMPTS, BATCH, EVERY = 12, 2, 2  # 6 batches, a checkpoint every 2
KILL_AT = 4  # the 4th batch's base forward: the last checkpoint says "next batch: 2"


def setup(seed_sae: int = 0):
    """Two tiny models, a sparse TopK SAE and prompts of varied lengths (all deterministic)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from modeldiff.testing import tiny_hooked_transformer

    base, tuned = tiny_hooked_transformer(), tiny_hooked_transformer(seed=1)
    torch.manual_seed(seed_sae)
    cfg = TopKSAEConfig(d_in=64, d_sae=256, k=6)
    cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "owls",
        "watch",
    ]
    prompts = [" ".join(words[: 2 + (5 * i) % 11]) for i in range(N_PROMPTS)]
    return base, tuned, sae, prompts


def run_diff(base, tuned, sae, prompts, **kw):
    from modeldiff import diff_latents

    kw = {"batch_size": BATCH, "positions": "all", "n_permutations": 200, "progress": False, **kw}
    return diff_latents(base, tuned, sae, prompts, **kw)


def assert_same_diff(a, b) -> None:
    """Bit-identical: every statistic tensor and every column (NaN where the other has NaN)."""
    for sa, sb in zip(a.stats, b.stats, strict=True):
        da, db = sa.state_dict(), sb.state_dict()
        assert da.keys() == db.keys()
        for k in da:
            assert da[k].dtype == db[k].dtype and torch.equal(da[k], db[k]), k
    assert a.columns == b.columns
    for name in a.columns:
        x, y = a.column(name), b.column(name)
        assert torch.equal(x.isnan(), y.isnan()), name
        assert torch.equal(x[~x.isnan()], y[~y.isnan()]), name
    assert torch.equal(a.order, b.order)
    assert a.meta == b.meta


def diff_tensors(d) -> dict[str, torch.Tensor]:
    """Every column and every statistic tensor of a diff, by name (safetensors-ready)."""
    out = {f"col.{c}": d.column(c) for c in d.columns}
    for name, st in zip(("base", "finetuned"), d.stats):
        out.update({f"{name}.{k}": v for k, v in st.state_dict().items()})
    return out


def assert_same_tensors(ref: dict, got: dict) -> None:
    """The same names, dtypes and values bit for bit (NaN where the other has NaN)."""
    assert set(ref) == set(got)
    for k, v in ref.items():
        w = got[k]
        assert v.dtype == w.dtype and torch.equal(v.isnan(), w.isnan()), k
        assert torch.equal(v[~v.isnan()], w[~w.isnan()]), k


def _forward_counter(model, kill_at: int | None):
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if kill_at is not None and calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    # a pre-hook: the forward stops inside block 0 (after its resid_post), so a post-hook never runs
    return calls, model.blocks[0].register_forward_pre_hook(hook)


def _worker(ckpt: str) -> None:
    base, tuned, sae, prompts = setup()
    _forward_counter(base, KILL_AT)
    run_diff(base, tuned, sae, prompts, checkpoint=ckpt, checkpoint_every=EVERY)


def _spawn(ckpt: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run(
        [sys.executable, __file__, str(ckpt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def reference():
    base, tuned, sae, prompts = setup()
    return run_diff(base, tuned, sae, prompts)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    ckpt = tmp_path / "run.ckpt"
    killed = _spawn(ckpt)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # only the checkpoint itself is left (atomic writes leave no partial file behind)
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]
    # resume here, in a process that shares nothing with the killed one but the file
    base, tuned, sae, prompts = setup()
    calls, handle = _forward_counter(base, None)
    try:
        resumed = run_diff(base, tuned, sae, prompts, checkpoint=ckpt, checkpoint_every=EVERY)
    finally:
        handle.remove()
    # it resumed after batch 2 (the last checkpoint before the kill), not from scratch
    assert calls[0] == math.ceil(N_PROMPTS / BATCH) - 2
    assert_same_tensors(diff_tensors(reference), diff_tensors(resumed))
    assert_same_diff(resumed, reference)


def test_in_process_resume_from_every_checkpoint_is_bit_identical(tmp_path, reference):
    """Interrupt after the first and after the next-to-last checkpoint (an exception from a hook),
    resume, compare."""
    base, tuned, sae, prompts = setup()
    n_batches = math.ceil(N_PROMPTS / BATCH)
    for stop in (1, n_batches - 1):
        ckpt = tmp_path / f"stop{stop}.ckpt"
        calls = [0]

        def hook(module, args, calls=calls, stop=stop):
            calls[0] += 1
            if calls[0] > stop:
                raise KeyboardInterrupt

        handle = base.blocks[0].register_forward_pre_hook(hook)
        try:
            with pytest.raises(KeyboardInterrupt):
                run_diff(base, tuned, sae, prompts, checkpoint=ckpt, checkpoint_every=1)
        finally:
            handle.remove()
        resumed = run_diff(base, tuned, sae, prompts, checkpoint=ckpt, checkpoint_every=1)
        assert_same_diff(resumed, reference)


def test_a_finished_checkpoint_returns_without_running(tmp_path, reference):
    base, tuned, sae, prompts = setup()
    ckpt = tmp_path / "done.ckpt"
    first = run_diff(base, tuned, sae, prompts, checkpoint=ckpt, checkpoint_every=4)
    assert_same_diff(first, reference)
    calls, handle = _forward_counter(base, None)
    try:
        again = run_diff(base, tuned, sae, prompts, checkpoint=ckpt)
    finally:
        handle.remove()
    assert calls[0] == 0
    assert_same_diff(again, reference)


def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path):
    from modeldiff.errors import ArgumentError

    base, tuned, sae, prompts = setup()
    ckpt = tmp_path / "run.ckpt"
    run_diff(base, tuned, sae, prompts[:4], checkpoint=ckpt, uncertainty=None)
    with pytest.raises(
        ArgumentError, match=r"n_prompts \(checkpoint: 4, this run: 5\); prompts_and_positions"
    ):
        run_diff(base, tuned, sae, prompts[:5], checkpoint=ckpt, uncertainty=None)
    other_sae = setup(seed_sae=1)[2]
    with pytest.raises(ArgumentError, match=r"belongs to another run: sae \(checkpoint"):
        run_diff(base, tuned, other_sae, prompts[:4], checkpoint=ckpt, uncertainty=None)
    with pytest.raises(ArgumentError, match=r"finetuned_model"):
        run_diff(base, base, sae, prompts[:4], checkpoint=ckpt, uncertainty=None)
    with pytest.raises(ArgumentError, match=r"outlier_factor"):
        run_diff(
            base, tuned, sae, prompts[:4], checkpoint=ckpt, uncertainty=None, outlier_factor=3.0
        )
    with pytest.raises(ArgumentError, match=r"track_prompts"):
        run_diff(base, tuned, sae, prompts[:4], checkpoint=ckpt)


def test_bad_checkpoint_arguments_and_files(tmp_path):
    from modeldiff.errors import ArgumentError, ArgumentTypeError, FileFormatError

    base, tuned, sae, prompts = setup()
    with pytest.raises(ArgumentError, match="checkpoint_every must be a positive integer"):
        run_diff(base, tuned, sae, prompts, checkpoint=tmp_path / "c", checkpoint_every=0)
    with pytest.raises(ArgumentTypeError, match="checkpoint must be a file path"):
        run_diff(base, tuned, sae, prompts, checkpoint=3)
    with pytest.raises(ArgumentError, match="is a folder"):
        run_diff(base, tuned, sae, prompts, checkpoint=tmp_path)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FileFormatError):
        run_diff(base, tuned, sae, prompts, checkpoint=junk)


if __name__ == "__main__":
    _worker(sys.argv[1])
