"""modeldiff: which internal features did fine-tuning move, and do they cause the behaviour?

The public API, on one screen. See README.md and docs/ for the method and examples.
"""

from __future__ import annotations

from .capture import CaptureBatch, capture, collect
from .sites import Site, SiteError
from .tokens import PromptError, TokenizedPrompt, tokenize_prompts

__version__ = "0.1.0"

__all__ = [
    "CaptureBatch",
    "PromptError",
    "Site",
    "SiteError",
    "TokenizedPrompt",
    "__version__",
    "capture",
    "collect",
    "tokenize_prompts",
]
