"""Data-parallel diffing: two CPU processes on gloo (launched with torchrun) give bit for bit the
result of a single-process run.

Run under torchrun (``torchrun --nproc-per-node 2 tests/test_distributed.py OUT``), this file is the
worker: every rank runs the same diff with ``distributed=True``; rank 0 saves its result, the
others check they got ``None``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from test_resume import assert_same_tensors, diff_tensors, run_diff, setup

N_RANKS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def top_activations_run(model, sae, prompts, **kw):
    """top_activations over chunks of 2 prompts (so two ranks share the chunks)."""
    import modeldiff.interpret as interpret

    saved, interpret._CHUNK_PROMPTS = interpret._CHUNK_PROMPTS, 2
    try:
        return interpret.top_activations(
            model, sae, list(range(8)), prompts, k=3, context=2, progress=False, **kw
        )
    finally:
        interpret._CHUNK_PROMPTS = saved


def _worker(out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    base, tuned, sae, prompts = setup()
    try:
        d = run_diff(base, tuned, sae, prompts, distributed=True)
        # the activation cache, distributed: the first run writes it (each rank its own batches'
        # shards, rank 0 the manifest), the second reads it
        cache = f"{out}.cache"
        written = run_diff(base, tuned, sae, prompts, distributed=True, cache=cache)
        from modeldiff.cache import MANIFEST

        dist.barrier()
        assert os.path.exists(os.path.join(cache, MANIFEST)), "the cache was not completed"
        read = run_diff(base, tuned, sae, prompts, distributed=True, cache=cache)
        from modeldiff import diff_residuals

        resid = diff_residuals(base, tuned, prompts, batch_size=2, distributed=True, progress=False)
        top = top_activations_run(tuned, sae, prompts, distributed=True)
        rank = dist.get_rank()
        if rank == 0:
            save_file(diff_tensors(d), out)
            save_file({s.hook_name: v for s, v in resid.delta.items()}, f"{out}.resid")
            top.save(f"{out}.top.json")
            save_file(diff_tensors(written), f"{out}.cache-write")
            save_file(diff_tensors(read), f"{out}.cache-read")
        else:
            assert d is None and resid is None and top is None, "only rank 0 returns results"
            with open(f"{out}.rank{rank}", "w") as f:
                f.write("none")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _torchrun(out) -> subprocess.CompletedProcess:
    # CPU kernels split their reductions by thread, so the activations (float32) are the same
    # only at the same thread count: one per rank here, and the reference runs at one too.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={N_RANKS}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        __file__,
        str(out),
    ]
    # bounded: the run itself takes seconds; most of the time is two processes importing torch,
    # TransformerLens and sae-lens at once (20-40 s on a loaded 2-core machine)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)


def test_two_gloo_processes_equal_a_single_process_run_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "rank0.safetensors"
    done = _torchrun(out)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "rank0.safetensors.rank1").read_text() == "none"
    base, tuned, sae, prompts = setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run_diff(base, tuned, sae, prompts)
    finally:
        torch.set_num_threads(threads)
    assert_same_tensors(diff_tensors(reference), load_file(str(out)))
    # with the activation cache: written by both ranks, then read back by both
    assert (tmp_path / "rank0.safetensors.cache").is_dir()
    assert_same_tensors(diff_tensors(reference), load_file(f"{out}.cache-write"))
    assert_same_tensors(diff_tensors(reference), load_file(f"{out}.cache-read"))
    # diff_residuals, sharded the same way
    from modeldiff import diff_residuals

    torch.set_num_threads(1)
    try:
        single = diff_residuals(base, tuned, prompts, batch_size=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    # top_activations: the chunks shared over the ranks, the heaps merged on rank 0
    import json

    torch.set_num_threads(1)
    try:
        alone = top_activations_run(tuned, sae, prompts)
    finally:
        torch.set_num_threads(threads)
    merged = json.loads((tmp_path / "rank0.safetensors.top.json").read_text())
    assert merged == json.loads(json.dumps(alone.to_dict()))
    assert sum(len(alone[j]) for j in alone.latents) > 0
    got = load_file(f"{out}.resid")
    assert set(got) == {s.hook_name for s in single.delta}
    for s, v in single.delta.items():
        assert torch.equal(got[s.hook_name], v), s


def test_distributed_without_a_process_group_says_how_to_launch(monkeypatch):
    from modeldiff.errors import ArgumentError

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    base, tuned, sae, prompts = setup()
    with pytest.raises(ArgumentError, match="launch with torchrun"):
        run_diff(base, tuned, sae, prompts, distributed=True)


def test_pack_and_unpack_round_trip_every_dtype():
    from modeldiff.distributed import pack_state, unpack_state
    from modeldiff.stats import SiteStats

    st = SiteStats(5, 3)
    st.update(
        torch.tensor([[0.0, 1.5, 0.0, 0.0, 2.0]]),
        torch.tensor([[1.0, 2.0, 3.0]]),
        prompt_index=torch.tensor([7]),
        position=torch.tensor([2]),
    )
    state = st.state_dict()
    buf, sizes = pack_state(state)
    back = unpack_state(buf, sizes, SiteStats(5, 3).state_dict())
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


if __name__ == "__main__":
    _worker(sys.argv[1])
