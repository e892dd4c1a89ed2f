"""Render README's static figure (docs/assets/persona-diff.png): the persona world's latent diff.

GitHub shows no JavaScript, so the README carries one PNG of what ``LatentDiff.plot()`` draws for
the default persona-world organism. Static export needs kaleido; kaleido >= 1 needs a Chrome
install, kaleido 0.2.1 bundles its own, but supports only plotly < 6. So the figure is made here
(any plotly) and written as plotly JSON, then rendered by a small separate environment:

    python3 -m venv build/kaleido
    build/kaleido/bin/pip install kaleido==0.2.1 "plotly<6"
    .venv/bin/python scripts/readme_figure.py --renderer build/kaleido/bin/python

(about a minute: the organism is loaded from the cache or built, then one diff.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RENDER = """
import sys, plotly.io as pio
fig = pio.from_json(open(sys.argv[1]).read(), skip_invalid=True)
fig.write_image(sys.argv[2], width=900, height=520, scale=2)
"""


def main() -> None:
    from modeldiff import diff_latents
    from modeldiff.organisms import OrganismRecipe, build_persona_organism

    ap = argparse.ArgumentParser()
    ap.add_argument("--renderer", required=True, help="python of an env with kaleido 0.2.1")
    ap.add_argument("--out", default="docs/assets/persona-diff.png")
    args = ap.parse_args()
    org = build_persona_organism(OrganismRecipe.default(), progress=False)
    batch = org.world.prompts(org.recipe.held_out)
    prompts = [org.world.chat_messages(batch, i) for i in range(batch.ids.shape[0])]
    diff = diff_latents(
        org.base, org.finetuned, org.sae, prompts, positions="last_prompt", progress=False
    )
    fig = diff.plot()
    fig.update_layout(
        title=f"Persona world: which SAE latents the narrow fine-tune moved (the persona latent is "
        f"{org.persona_latent})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "fig.json"
        spec.write_text(fig.to_json())
        subprocess.run([args.renderer, "-c", RENDER, str(spec), str(out)], check=True)
    print(f"wrote {out}; top latent {diff.top(1)[0].latent}, persona latent {org.persona_latent}")


if __name__ == "__main__":
    main()
