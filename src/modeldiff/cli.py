"""The ``modeldiff`` command: ``demo``, ``diff``, ``steer`` and ``report``.

Errors print one line (``modeldiff: error: ...``) and exit with status 2 (bad usage or input) or 1
(the demo's ground-truth checks failed); ``--debug`` shows the full traceback instead.

Model and SAE sources are whatever :func:`modeldiff.models.load_model` and
:func:`modeldiff.saes.load_sae` accept, plus the embedded organism's parts:
``persona-world:base``, ``persona-world:finetuned``, ``persona-world:control`` and
``persona-world:sae`` (built on first use, then cached).

Example:
    >>> main(["report", "/nonexistent/folder"])  # one clear line on stderr, exit code 2
    2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ModeldiffError

__all__ = ["main"]

ORGANISM_PREFIX = "persona-world:"
_ORGANISM_PARTS = ("base", "finetuned", "control", "sae")


class CLIError(ModeldiffError):
    """A user-facing error: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modeldiff",
        description="Which SAE latents did a fine-tune move, and do they cause its behaviour?",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser(
        "demo",
        help="build an organism (the persona world, or SmolLM2 fine-tunes) and run the method on it",
        description="Build (or load from the cache) a model organism, run diff → screen → steer → "
        "ablate → re-align and write an HTML report. --organism persona (the default) is the "
        "synthetic persona world with ground-truth checks; --organism smollm2 fine-tunes "
        "SmolLM2-135M-Instruct on the narrow datasets and runs the paper's pipeline on it (about "
        "an hour on two CPU cores the first time; the fine-tunes and SAE are cached).",
    )
    d.add_argument(
        "--organism",
        choices=("persona", "smollm2"),
        default="persona",
        help="which organism (default: %(default)s)",
    )
    d.add_argument(
        "--judge-url",
        default=None,
        help="with --organism smollm2: also rate sampled answers of every model with the judge "
        "behind this OpenAI-compatible server (e.g. http://127.0.0.1:8080/v1)",
    )
    d.add_argument(
        "--judge-model",
        default=None,
        help="the judge model's name on that server (default: $MODELDIFF_JUDGE_MODEL)",
    )
    d.add_argument(
        "--model",
        default=None,
        help="with --organism smollm2: another local chat model (a save_pretrained folder or a "
        ".gguf file) to run the same pipeline on",
    )
    d.add_argument("--out", default="modeldiff-demo", help="output folder (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--rebuild", action="store_true", help="ignore the cached organism")
    d.add_argument(
        "--size",
        choices=("default", "tiny"),
        default="default",
        help="organism size; tiny is the fast test recipe (default: %(default)s)",
    )
    d.add_argument("--seed", type=int, default=0, help="recipe seed (default: %(default)s)")
    d.add_argument("--cache", default=None, help="cache root (default: $MODELDIFF_CACHE)")
    d.add_argument(
        "--no-sets",
        action="store_true",
        help="skip the second part: the same world with an 8x-overcomplete SAE (512 latents), "
        "where the persona splits over several latents and the checks use sets of latents",
    )

    f = sub.add_parser(
        "diff",
        help="rank SAE latents by their activation shift from a base to a fine-tuned model",
    )
    f.add_argument("--base", required=True, help="base model source")
    f.add_argument("--finetuned", required=True, help="fine-tuned model source")
    f.add_argument("--sae", required=True, help="SAE source (folder, object name or release/id)")
    f.add_argument(
        "--prompts",
        required=True,
        help="prompt file: .txt (one per line), .json (a list) or .jsonl (one per line); entries "
        "are strings or chat message lists",
    )
    f.add_argument(
        "--positions",
        default="prompt",
        choices=("prompt", "all", "response", "last_prompt"),
        help="which tokens to average over (default: %(default)s)",
    )
    f.add_argument("--out", required=True, help="output folder for diff.safetensors and report")
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine: relaunches itself under torchrun with "
        "distributed=True (gloo on CPU, nccl on GPUs; the result equals a single-process run bit "
        "for bit at the same thread count) (default: %(default)s)",
    )

    s = sub.add_parser("steer", help="print steered vs unsteered continuations of a prompt")
    s.add_argument("--model", required=True, help="model source")
    s.add_argument("--sae", required=True, help="SAE source")
    s.add_argument("--latent", type=int, required=True, help="SAE latent whose decoder row to add")
    s.add_argument("--coefficient", type=float, required=True, help="multiple of the decoder row")
    s.add_argument("--prompt", required=True, help="prompt text")
    s.add_argument(
        "--chat", action="store_true", help="send the prompt as a user turn (chat template)"
    )
    s.add_argument("--max-new-tokens", type=int, default=32)

    r = sub.add_parser("report", help="render report.html from a saved result folder")
    r.add_argument("dir", help="a folder written by `modeldiff demo` or `modeldiff diff`")
    return p


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------


def _organism(cache: str | None = None, progress: bool = True) -> Any:
    from modeldiff.organisms import OrganismRecipe, build_persona_organism

    return build_persona_organism(OrganismRecipe.default(), cache=cache, progress=progress)


def _load_model(source: str, like: Any = None) -> Any:
    if source.startswith(ORGANISM_PREFIX):
        part = source[len(ORGANISM_PREFIX) :]
        if part not in _ORGANISM_PARTS[:3]:
            raise CLIError(
                f"unknown organism model {source!r}; use one of "
                + ", ".join(ORGANISM_PREFIX + p for p in _ORGANISM_PARTS[:3])
            )
        return getattr(_organism(progress=False), part)
    from modeldiff.models import load_model

    return load_model(source, like=like) if like is not None else load_model(source)


def _load_sae(source: str) -> Any:
    if source.startswith(ORGANISM_PREFIX):
        if source != ORGANISM_PREFIX + "sae":
            raise CLIError(f"unknown organism SAE {source!r}; use {ORGANISM_PREFIX}sae")
        return _organism(progress=False).sae
    from modeldiff.saes import load_sae

    return load_sae(source)


def _read_prompts(path: str) -> list[Any]:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"prompt file {path!r} does not exist; pass a .txt, .json or .jsonl file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            prompts = json.loads(text)
            if not isinstance(prompts, list):
                raise CLIError(f"{path}: a .json prompt file must hold a list of prompts")
        elif p.suffix == ".jsonl":
            prompts = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            prompts = [line for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise CLIError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file"
        ) from None
    if not prompts:
        raise CLIError(f"{path} holds no prompts; write one prompt per line")
    return prompts


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------


def _cmd_demo_chat(args: argparse.Namespace) -> int:
    from modeldiff.organisms import ChatRecipe, build_chat_organism, run_chat_study

    progress = not args.quiet
    if args.rebuild:
        raise CLIError(
            "--rebuild is for the persona organism; the SmolLM2 organism is cached stage by stage "
            "under its recipe's digest: delete <cache>/chat-organism/<digest> to rebuild it"
        )
    if args.model is not None and not Path(args.model).expanduser().exists():
        raise CLIError(f"--model {args.model!r} is not a local file or folder")
    if args.size == "tiny":
        recipe = ChatRecipe.tiny(model=args.model, seed=args.seed)
    else:
        recipe = ChatRecipe(model=args.model, seed=args.seed)
    judge = None
    if args.judge_url is not None:
        from modeldiff.evals import HTTPJudge

        judge = HTTPJudge(args.judge_model, base_url=args.judge_url)
    org = build_chat_organism(recipe, cache=args.cache, progress=progress)
    where = "loaded from cache" if org.loaded_from_cache else "built"
    print(f"{org!r}: {where} ({org.folder})", flush=True)
    study = run_chat_study(
        org, judge=judge, progress=progress, log=lambda line: print(line, flush=True)
    )
    report = study.write(args.out)
    print(study.table())
    print(f"report: {report}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    if args.organism == "smollm2":
        return _cmd_demo_chat(args)
    for flag, value in (("--model", args.model), ("--judge-url", args.judge_url)):
        if value is not None:
            raise CLIError(f"{flag} goes with --organism smollm2 (the persona world has its own)")

    from modeldiff.organisms import OrganismRecipe, build_persona_organism, run_checks
    from modeldiff.report import write_report

    progress = not args.quiet
    recipe = (
        OrganismRecipe.tiny(args.seed) if args.size == "tiny" else OrganismRecipe(seed=args.seed)
    )
    t0 = time.perf_counter()
    org = build_persona_organism(recipe, cache=args.cache, rebuild=args.rebuild, progress=progress)
    t_build = time.perf_counter() - t0
    result = run_checks(org, progress=progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(result.to_json())
    flat = {**data["data"], "checks": data["checks"], "passed": data["passed"]}
    flat["seconds"] = {"build_or_load": t_build, "checks": result.seconds}
    flat["versions"] = _versions()
    _atomic_write(out / "result.json", json.dumps(flat, indent=2))
    result.diff.save(out / "diff.safetensors")
    report = write_report(out, flat, result.diff, title="modeldiff demo: the persona world")
    where = "loaded from cache" if org.loaded_from_cache else f"built in {t_build:.0f} s"
    print(
        f"persona-world organism ({where}; {org.folder}); SAE explained variance "
        f"{org.sae_metrics['explained_variance']:.3f}, L0 {org.sae_metrics['l0']:.1f}"
    )
    print(result.table())
    print(f"checks took {result.seconds:.0f} s; report: {report}")
    passed = result.passed
    if not args.no_sets:
        # the same world with an SAE sized like real ones: one latent no longer carries the persona
        from modeldiff.organisms import run_set_checks

        big = build_persona_organism(
            OrganismRecipe.overcomplete(args.seed), cache=args.cache, progress=progress
        )
        sets = run_set_checks(big, progress=progress)
        print(
            f"\nwith an 8x-overcomplete SAE ({big.recipe.d_sae} latents, k {big.recipe.k}): "
            "sets of latents"
        )
        print(sets.table())
        sets_data = json.loads(sets.to_json())
        flat["set_checks"] = {**sets_data["data"], "checks": sets_data["checks"]}
        flat["set_checks"]["passed"] = sets_data["passed"]
        _atomic_write(out / "result.json", json.dumps(flat, indent=2))
        passed = passed and sets.passed
    if not passed:
        print("modeldiff: some ground-truth checks failed (see the table above)", file=sys.stderr)
        return 1
    return 0


def _launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``modeldiff <argv>`` as ``nproc`` torchrun workers on this machine; their exit code."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        "modeldiff.cli",
        *argv,
    ]
    # each worker gets an equal share of the cores, not every worker all of them
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(cmd, env=env).returncode


def _cmd_diff(args: argparse.Namespace) -> int:
    from modeldiff.diff import diff_latents
    from modeldiff.report import write_report

    if args.nproc < 1:
        raise CLIError(f"--nproc must be at least 1, got {args.nproc}")
    worker = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.nproc > 1 and not worker:
        argv = list(args.argv)
        for i, a in enumerate(argv):  # drop "--nproc N" / "--nproc=N": the workers run one each
            if a == "--nproc":
                del argv[i : i + 2]
                break
            if a.startswith("--nproc="):
                del argv[i]
                break
        return _launch(args.nproc, argv)
    distributed = worker and int(os.environ["WORLD_SIZE"]) > 1
    prompts = _read_prompts(args.prompts)
    base = _load_model(args.base)
    finetuned = _load_model(
        args.finetuned, like=None if args.finetuned.startswith(ORGANISM_PREFIX) else base
    )
    sae = _load_sae(args.sae)
    diff = diff_latents(
        base,
        finetuned,
        sae,
        prompts,
        positions=args.positions,
        batch_size=args.batch_size,
        progress=not args.quiet and os.environ.get("RANK", "0") == "0",
        distributed=distributed,
    )
    if diff is None:  # a worker other than rank 0: rank 0 writes the result
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    diff.save(out / "diff.safetensors")
    data = {
        "config": {
            "base": args.base,
            "finetuned": args.finetuned,
            "sae": args.sae,
            "prompts": args.prompts,
            "positions": args.positions,
            "n_prompts": len(prompts),
        },
        "top_latents": [r.as_dict() for r in diff.top(20)],
        "versions": _versions(),
    }
    _atomic_write(out / "result.json", json.dumps(data, indent=2))
    report = write_report(out, data, diff, title="modeldiff diff")
    for r in diff.top(10):
        print(f"#{r.rank:<4} latent {r.latent:<8} Δ {r.delta:+.4f}")
    print(f"saved {out / 'diff.safetensors'} and {report}")
    return 0


def _cmd_steer(args: argparse.Namespace) -> int:
    from modeldiff.generation import generate
    from modeldiff.interventions import steer
    from modeldiff.sites import Site

    model = _load_model(args.model)
    sae = _load_sae(args.sae)
    d_sae = int(sae.cfg.d_sae)
    if not 0 <= args.latent < d_sae:
        raise CLIError(
            f"--latent {args.latent} is out of range; this SAE has latents 0..{d_sae - 1}"
        )
    prompt: Any = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    common = {"max_new_tokens": args.max_new_tokens, "progress": False}
    plain = generate(model, [prompt], **common)[0]
    with steer(model, (sae, args.latent), site=Site.from_sae(sae), coefficient=args.coefficient):
        steered = generate(model, [prompt], **common)[0]
    print(f"prompt:     {args.prompt}")
    print(f"unsteered:  {plain}")
    print(f"steered:    {steered}   (latent {args.latent} × {args.coefficient:g})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from modeldiff.report import write_report

    folder = Path(args.dir)
    result = folder / "result.json"
    if not result.is_file():
        raise CLIError(
            f"{folder} has no result.json; point `modeldiff report` at a folder written by "
            "`modeldiff demo` or `modeldiff diff`"
        )
    data = json.loads(result.read_text(encoding="utf-8"))
    diff = None
    if (folder / "diff.safetensors").is_file():
        from modeldiff.diff import LatentDiff

        diff = LatentDiff.load(folder / "diff.safetensors")
    print(write_report(folder, data, diff))
    return 0


def _versions() -> dict[str, str]:
    from modeldiff.report import _versions as v

    return v()


def _atomic_write(path: Path, text: str) -> None:
    from modeldiff._io import write_text_atomic

    write_text_atomic(path, text)


_COMMANDS = {"demo": _cmd_demo, "diff": _cmd_diff, "steer": _cmd_steer, "report": _cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``modeldiff`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Example:
        >>> main(["report", "/nonexistent"])
        2
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # what to relaunch with (modeldiff diff --nproc N)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("modeldiff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        else:
            msg = " ".join(str(e).split()) or type(e).__name__
            print(f"modeldiff: error: {msg} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
