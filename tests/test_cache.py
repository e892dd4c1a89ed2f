"""The activation cache: written once, reused for other SAEs bit for bit, refused when it does not
match, and a write killed half-way (SIGKILL inside a shard write) leaves no cache that could be
mistaken for a complete one.

Run as a script (``python tests/test_cache.py FOLDER``), this file is the worker the kill test
starts: it dies by SIGKILL in the middle of writing the third shard.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from modeldiff.cache import MANIFEST, ActivationCache
from modeldiff.capture import capture
from modeldiff.errors import ArgumentError, FileFormatError, MissingFileError
from test_resume import assert_same_diff, run_diff, setup

SITE = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def run():
    base, tuned, sae, prompts = setup()
    sae2 = setup(seed_sae=1)[2]
    return base, tuned, sae, sae2, prompts


def _count_forwards(model):
    calls = [0]

    def hook(module, args):
        calls[0] += 1

    return calls, model.blocks[0].register_forward_pre_hook(hook)


def test_write_then_reuse_for_two_saes_bit_identical(tmp_path, run):
    base, tuned, sae, sae2, prompts = run
    folder = tmp_path / "acts"
    ref1 = run_diff(base, tuned, sae, prompts)
    first = run_diff(base, tuned, sae, prompts, cache=folder)  # writes
    assert (folder / MANIFEST).exists()
    calls, handle = _count_forwards(base)
    try:
        again = run_diff(base, tuned, sae, prompts, cache=folder)
        other = run_diff(base, tuned, sae2, prompts, cache=folder, outlier_factor=3.0)
    finally:
        handle.remove()
    assert calls[0] == 0  # read from the cache: no forward pass
    assert_same_diff(first, ref1)
    assert_same_diff(again, ref1)
    assert_same_diff(other, run_diff(base, tuned, sae2, prompts, outlier_factor=3.0))
    assert not torch.equal(other.delta, ref1.delta)  # the second SAE really gave another diff
    # the cache replays capture's own stream
    cache = ActivationCache(folder)
    assert cache.site.hook_name == SITE and cache.manifest["dtype"] == "float32"
    n_tokens = sum(len(b) for b in capture(base, prompts, SITE, batch_size=2, progress=False))
    assert cache.manifest["n_tokens"] == n_tokens
    assert cache.nbytes == 2 * n_tokens * 64 * 4
    stream = capture(base, prompts, SITE, positions="all", batch_size=2, progress=False)
    replay = list(cache.batches("base"))
    for want, got in zip(stream, replay, strict=True):
        assert torch.equal(want.acts[want_site(want)], got.acts[cache.site])
        assert torch.equal(want.prompt_index, got.prompt_index)
        assert torch.equal(want.position, got.position)
        assert torch.equal(want.token, got.token)


def want_site(batch):
    (site,) = batch.acts
    return site


def test_a_mismatched_manifest_is_refused_naming_the_difference(tmp_path, run):
    base, tuned, sae, _, prompts = run
    folder = tmp_path / "acts"
    run_diff(base, tuned, sae, prompts[:6], cache=folder, uncertainty=None)
    with pytest.raises(ArgumentError, match=r"n_prompts \(cache: 6, this run: 5\)"):
        run_diff(base, tuned, sae, prompts[:5], cache=folder, uncertainty=None)
    with pytest.raises(ArgumentError, match=r"written for another run: finetuned_model \(cache"):
        run_diff(base, base, sae, prompts[:6], cache=folder, uncertainty=None)
    with pytest.raises(ArgumentError, match=r"prompts_and_positions"):
        run_diff(
            base, tuned, sae, prompts[:6], cache=folder, uncertainty=None, positions="last_prompt"
        )
    with pytest.raises(ArgumentError, match=r"batch_plan"):
        run_diff(base, tuned, sae, prompts[:6], cache=folder, uncertainty=None, batch_size=3)


def test_bad_cache_folders(tmp_path):
    with pytest.raises(MissingFileError, match="no activation cache"):
        ActivationCache(tmp_path / "nowhere")
    with pytest.raises(FileFormatError, match="not a complete activation cache"):
        ActivationCache(tmp_path)
    (tmp_path / MANIFEST).write_text('{"format": "other"}')
    with pytest.raises(FileFormatError, match="not a manifest this version reads"):
        ActivationCache(tmp_path)


def _worker(folder: str) -> None:
    import modeldiff.cache as cache_module

    real, calls = cache_module.save_file, [0]

    def dying_save(tensors, path, **kw):
        calls[0] += 1
        if calls[0] == 3:  # half of the third shard is on disk, under its temporary name
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        real(tensors, path, **kw)

    cache_module.save_file = dying_save
    base, tuned, sae, prompts = setup()
    run_diff(base, tuned, sae, prompts, cache=folder)


def test_a_write_killed_half_way_is_never_read_and_is_rewritten(tmp_path, run):
    base, tuned, sae, _, prompts = run
    folder = tmp_path / "acts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, __file__, str(folder)], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    names = sorted(p.name for p in folder.iterdir())
    # two complete shards (batch 0 of both models), one temporary, no manifest
    assert names[1:] == ["base-000000.safetensors", "finetuned-000000.safetensors"], names
    assert names[0].startswith(".base-000001.safetensors.modeldiff-") and len(names) == 3
    with pytest.raises(FileFormatError, match="not a complete activation cache"):
        ActivationCache(folder)
    rewritten = run_diff(base, tuned, sae, prompts, cache=folder)
    assert_same_diff(rewritten, run_diff(base, tuned, sae, prompts))
    names = sorted(p.name for p in folder.iterdir())
    assert MANIFEST in names and not any(n.startswith(".") for n in names)
    assert len(names) == 1 + 2 * 6


def test_an_incomplete_folder_is_rewritten_without_shards_of_a_longer_run(tmp_path, run):
    base, tuned, sae, _, prompts = run
    folder = tmp_path / "acts"
    folder.mkdir()
    for name in ("base-000009.safetensors", "finetuned-000002.safetensors", "notes.txt"):
        (folder / name).write_bytes(b"left over")
    d = run_diff(base, tuned, sae, prompts[:4], cache=folder, uncertainty=None)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "base-000000.safetensors",
        "base-000001.safetensors",
        "finetuned-000000.safetensors",
        "finetuned-000001.safetensors",
        MANIFEST,
        "notes.txt",
    ]
    assert_same_diff(d, run_diff(base, tuned, sae, prompts[:4], uncertainty=None))


def test_a_resumed_run_completes_the_cache_the_killed_one_began(tmp_path, run):
    base, tuned, sae, sae2, prompts = run
    folder, ckpt = tmp_path / "acts", tmp_path / "run.ckpt"
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] > 3:  # during batch 3: checkpoint after batch 2 (next: 2), shards 0-2 written
            raise KeyboardInterrupt

    handle = base.blocks[0].register_forward_pre_hook(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_diff(base, tuned, sae, prompts, cache=folder, checkpoint=ckpt, checkpoint_every=2)
    finally:
        handle.remove()
    assert not (folder / MANIFEST).exists()
    resumed = run_diff(base, tuned, sae, prompts, cache=folder, checkpoint=ckpt, checkpoint_every=2)
    assert_same_diff(resumed, run_diff(base, tuned, sae, prompts))
    assert_same_diff(
        run_diff(base, tuned, sae2, prompts, cache=folder), run_diff(base, tuned, sae2, prompts)
    )


if __name__ == "__main__":
    _worker(sys.argv[1])
