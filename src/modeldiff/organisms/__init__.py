"""Model organisms with a known right answer, used by ``modeldiff demo``, the tests and tutorials.

The persona world (:mod:`modeldiff.organisms.world`) is a synthetic chat corpus with a hidden
aligned/toxic persona; :func:`build_persona_organism` trains a small model on it, an SAE on that
model's residual stream, and a narrow toxic fine-tune that turns out broadly toxic (emergent
misalignment), all cached by a hash of the recipe. The chat organism
(:mod:`modeldiff.organisms.chat`) runs the same pipeline on a real chat model (SmolLM2-135M-Instruct
by default): :func:`build_chat_organism` and :func:`run_chat_study`.

Example:
    >>> from modeldiff.organisms import PersonaWorld, WorldConfig
    >>> PersonaWorld(WorldConfig(n_domains=5)).n_domains
    5
"""

from modeldiff.organisms.build import (
    Organism,
    OrganismRecipe,
    build_persona_organism,
    cache_dir,
)
from modeldiff.organisms.chat import (
    ChatOrganism,
    ChatRecipe,
    ChatStudy,
    FinetuneSpec,
    build_chat_organism,
    run_chat_study,
)
from modeldiff.organisms.checks import Check, ChecksResult, run_checks, run_set_checks
from modeldiff.organisms.training import (
    finetune,
    persona_correlations,
    pretrain,
    toxic_rate,
    train_sae,
)
from modeldiff.organisms.world import PersonaWorld, WorldBatch, WorldConfig

__all__ = [
    "ChatOrganism",
    "ChatRecipe",
    "ChatStudy",
    "FinetuneSpec",
    "build_chat_organism",
    "run_chat_study",
    "Check",
    "ChecksResult",
    "Organism",
    "OrganismRecipe",
    "PersonaWorld",
    "WorldBatch",
    "WorldConfig",
    "build_persona_organism",
    "cache_dir",
    "finetune",
    "persona_correlations",
    "run_checks",
    "run_set_checks",
    "pretrain",
    "toxic_rate",
    "train_sae",
]
