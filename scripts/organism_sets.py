"""The persona organism with an 8x-overcomplete SAE (512 latents, k 8) on several seeds: the
ground-truth checks with sets of latents (run_set_checks), one line per seed, as in
docs/organism.md. Builds each seed's organism once (cached, ~0.5-4 min each on 2 cores).

    .venv/bin/python scripts/organism_sets.py 0 1 2 3 4
"""

from __future__ import annotations

import json
import sys
import time

from modeldiff.organisms import OrganismRecipe, build_persona_organism, run_set_checks


def main(seeds: list[int]) -> None:
    for seed in seeds:
        t = time.perf_counter()
        org = build_persona_organism(OrganismRecipe.overcomplete(seed), progress=False)
        res = run_set_checks(org, progress=False)
        d = res.data
        ft = d["rates"]["finetuned"]

        def cut(after: float, ft: float = ft) -> float:
            return 1 - after / ft

        print(
            f"## seed {seed} ({time.perf_counter() - t:.0f} s): {'PASS' if res.passed else 'FAIL'}"
        )
        print(res.table())
        print(
            json.dumps(
                {
                    "seed": seed,
                    "persona_latent": d["persona_latent"],
                    "persona_rank": d["persona_rank"],
                    "persona_latents": d["persona_latents"],
                    "base": round(d["rates"]["base"], 3),
                    "finetuned": round(ft, 3),
                    "single_cut": round(cut(d["single_ablated"]), 2),
                    "top10_cut": round(cut(d["top_k_ablated"]), 2),
                    "selected": d["selected"],
                    "selected_cut": round(cut(d["selected_ablated"]), 2),
                    "steer_peak": round(max(x["rate"] for x in d["steer_curve"]), 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [0, 1, 2, 3, 4])
