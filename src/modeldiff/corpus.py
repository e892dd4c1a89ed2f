"""Offline text corpora built from what the machine already has, for training SAEs without downloads.

Three sources, each deterministic on one machine:

* ``"packages"``: the documentation of the installed Python distributions, read through
  :mod:`importlib.metadata`: each distribution's long description (its README, from ``METADATA``)
  and the docstrings of its Python files. Files are *parsed* (:mod:`ast`), never imported, so
  building a corpus runs no package's code.
* ``"python"``: Python's own documentation: the docstrings of the standard-library modules, their
  classes and functions (the text :mod:`pydoc` shows), again parsed from the source files.
* ``"chat"``: the model's own greedy chat answers (through :func:`modeldiff.generate`) to many
  varied prompts made from templates and topics; each item is a ``(chat, answer)`` pair, the form
  :func:`modeldiff.tokenize_prompts` reads as a conversation. This needs ``model=`` and runs the
  model, so it is slow on real models (SmolLM2-135M on two CPU cores: about a second per answer of
  64 tokens at batch size 8).

``"docs"`` mixes ``packages`` and ``python`` half and half; ``"mixed"`` adds a third of chat answers
when a model is given. Documents are cut into chunks of ``min_chars``..``max_chars`` characters at
paragraph breaks; chunks are sorted and drawn with a seeded generator, so the same ``seed`` gives the
same corpus on the same machine (the same installed packages and Python). The returned
:class:`Corpus` is a plain ``list`` with a :attr:`Corpus.manifest` saying where every item came from
and a content hash, so two runs can check they trained on the same text.

Example:
    >>> corpus = build_corpus("python", n=5, seed=0)
    >>> len(corpus), corpus.manifest["sources"]
    (5, {'python': 5})
    >>> build_corpus("python", n=5, seed=0).manifest["hash"] == corpus.manifest["hash"]
    True
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from .errors import ArgumentError

__all__ = ["CHAT_TEMPLATES", "CHAT_TOPICS", "Corpus", "build_corpus", "chat_questions"]

Kind = Literal["docs", "packages", "python", "chat", "mixed"]
KINDS = ("docs", "packages", "python", "chat", "mixed")

#: Question templates for ``kind="chat"``; ``{topic}`` is filled from :data:`CHAT_TOPICS`.
CHAT_TEMPLATES: tuple[str, ...] = (
    "Explain {topic} to a curious twelve-year-old.",
    "What are three surprising facts about {topic}?",
    "Write a short story in which {topic} plays a central role.",
    "Give me practical advice about {topic}.",
    "What is the history of {topic}, in a few sentences?",
    "Write a haiku about {topic}.",
    "What are the most common misconceptions about {topic}?",
    "Compare {topic} with something from everyday life.",
    "How would you teach {topic} in a one-hour lesson?",
    "Summarise the pros and cons of {topic}.",
    "Write a friendly email to a colleague about {topic}.",
    "What questions should a beginner ask about {topic}?",
)

#: Topics for ``kind="chat"``: everyday, scientific, technical and social subjects.
CHAT_TOPICS: tuple[str, ...] = (
    "photosynthesis",
    "the French Revolution",
    "baking bread",
    "black holes",
    "saving money",
    "learning a new language",
    "volcanoes",
    "the immune system",
    "chess openings",
    "recycling",
    "machine learning",
    "the water cycle",
    "jazz music",
    "running a marathon",
    "honeybees",
    "the printing press",
    "climate change",
    "sleep",
    "public speaking",
    "prime numbers",
    "gardening",
    "the Roman Empire",
    "electric cars",
    "friendship",
    "coffee",
    "earthquakes",
    "writing a resume",
    "the human heart",
    "video games",
    "ocean tides",
    "vaccines",
    "the stock market",
    "origami",
    "the moon landing",
    "meditation",
    "dinosaurs",
    "Python programming",
    "renting an apartment",
    "rainbows",
    "the Olympic Games",
    "mushrooms",
    "time management",
    "the internet",
    "glaciers",
    "cooking pasta",
    "democracy",
    "penguins",
    "first aid",
    "the periodic table",
    "painting with watercolours",
    "bicycles",
    "solar panels",
    "Shakespeare",
    "budget travel",
    "antibiotics",
    "the Silk Road",
    "cats",
    "probability",
    "moving to a new city",
    "thunderstorms",
)


class Corpus(list):
    """A list of corpus items (strings, or ``(chat, answer)`` pairs) with a :attr:`manifest`.

    ``manifest`` holds the build arguments, how many items each source gave, the distributions
    and Python version the text came from, and ``hash``: the SHA-256 of the items as JSON.

    Example:
        >>> c = Corpus(["a", "b"], manifest={"kind": "custom"})
        >>> c.manifest["hash"] == content_hash(["a", "b"]), list(c)
        (True, ['a', 'b'])
    """

    manifest: dict[str, Any]

    def __init__(self, items: Iterable[Any] = (), manifest: dict[str, Any] | None = None) -> None:
        super().__init__(items)
        self.manifest = {**(manifest or {}), "n": len(self), "hash": content_hash(self)}


def content_hash(items: Sequence[Any]) -> str:
    """SHA-256 of ``items`` as canonical JSON (chats and pairs included), in hex.

    Example:
        >>> content_hash(["x"])[:12]
        'cd65ea2c2ad9'
    """
    text = json.dumps(_jsonable(list(items)), ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    return x


# -- cutting documents into chunks ------------------------------------------------------------

_TAG = re.compile(r"<!--.*?-->|<[^>\n]{1,300}>", re.S)
_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_SPACES = re.compile(r"[ \t]+")


def _clean(text: str) -> str:
    text = _IMAGE.sub("", _TAG.sub("", text))
    lines = [_SPACES.sub(" ", ln).rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def chunk_text(text: str, *, min_chars: int, max_chars: int) -> list[str]:
    """Cut ``text`` at paragraph breaks into chunks of ``min_chars``..``max_chars`` characters.

    Paragraphs are joined while the chunk stays within ``max_chars``; a paragraph longer than
    ``max_chars`` is cut at the last line break (or space) before the limit. Chunks shorter than
    ``min_chars`` are dropped.

    Example:
        >>> chunk_text("aaaa\\n\\nbbbb\\n\\ncc", min_chars=5, max_chars=10)
        ['aaaa\\n\\nbbbb']
    """
    out: list[str] = []
    current = ""
    for para in _clean(text).split("\n\n"):
        para = para.strip()
        while len(para) > max_chars:
            cut = max(para.rfind("\n", 0, max_chars), para.rfind(" ", 0, max_chars))
            cut = cut if cut > max_chars // 2 else max_chars
            head, para = para[:cut].rstrip(), para[cut:].lstrip()
            if current:
                out.append(current)
            current = ""
            out.append(head)
        if not para:
            continue
        joined = f"{current}\n\n{para}" if current else para
        if len(joined) > max_chars:
            out.append(current)
            current = para
        else:
            current = joined
    out.append(current)
    return [c for c in out if len(c) >= min_chars]


# -- sources ----------------------------------------------------------------------------------


_MAX_FILE_BYTES = 150_000


def _docstrings(path: Path) -> list[str]:
    """The module, class and function docstrings of a Python file, parsed (never imported)."""
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            return []  # generated tables, vendored bundles: slow to parse, rarely prose
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
        return []
    docs: list[str] = []
    # the module, its public top-level functions and classes, and their public methods: a shallow
    # walk (ast.walk into every expression costs more than parsing)
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    nodes: list[Any] = [tree]
    for top in tree.body:
        if isinstance(top, defs) and not top.name.startswith("_"):
            nodes.append(top)
            if isinstance(top, ast.ClassDef):
                nodes += [m for m in top.body if isinstance(m, defs) and not m.name.startswith("_")]
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)  # type: ignore[arg-type]
        if doc and len(doc) > 40:
            title = "" if isinstance(node, ast.Module) else f"{node.name}: "  # type: ignore[attr-defined]
            docs.append(title + inspect.cleandoc(doc))
    return docs


@functools.lru_cache(maxsize=4)
def _package_documents(max_files: int) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
    """(source label, text) of every installed distribution's README and docstrings, sorted."""
    dists: dict[str, Any] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").strip()
        if name and name.lower() not in dists:
            dists[name.lower()] = dist
    docs: list[tuple[str, str]] = []
    versions: dict[str, str] = {}
    for key in sorted(dists):
        dist = dists[key]
        name = dist.metadata["Name"]
        got = False
        description = dist.metadata.get_payload() or dist.metadata["Description"] or ""  # type: ignore[attr-defined]
        if description.strip():
            docs.append((f"{name}:README", description))
            got = True
        files = sorted(
            str(f) for f in (dist.files or []) if str(f).endswith(".py") and "test" not in str(f)
        )
        for rel in files[:max_files]:
            path = Path(str(dist.locate_file(rel)))
            text = "\n\n".join(_docstrings(path))
            if text:
                docs.append((f"{name}:{rel}", text))
                got = True
        if got:
            versions[name] = dist.version
    return tuple(docs), versions


# modules whose import has effects (a browser, printed text); they are parsed, never imported,
# but their docstrings are jokes rather than documentation
_SKIP_STDLIB = {"antigravity", "this", "idlelib", "turtledemo", "lib2to3", "test"}


@functools.lru_cache(maxsize=1)
def _python_documents() -> tuple[tuple[str, str], ...]:
    """(module, text) of the standard library's docstrings, parsed from its source files."""
    docs: list[tuple[str, str]] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_STDLIB:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None)
        if not origin or not origin.endswith(".py"):
            continue  # built-in or compiled: no source to read
        files = [Path(origin)]
        if Path(origin).name == "__init__.py":  # a package: its submodules too (tests left out)
            files += sorted(
                f
                for f in Path(origin).parent.rglob("*.py")
                if f.name != "__init__.py" and "test" not in str(f.relative_to(Path(origin).parent))
            )
        for f in files:
            text = "\n\n".join(_docstrings(f))
            if text:
                rel = f.relative_to(Path(origin).parent).with_suffix("")
                docs.append((name if f == Path(origin) else f"{name}.{rel}", text))
    return tuple(docs)


def chat_questions(n: int, *, seed: int = 0) -> list[str]:
    """``n`` distinct questions from :data:`CHAT_TEMPLATES` × :data:`CHAT_TOPICS`, seeded.

    Example:
        >>> chat_questions(2, seed=0) == chat_questions(2, seed=0)
        True
    """
    pool = [t.format(topic=topic) for t in CHAT_TEMPLATES for topic in CHAT_TOPICS]
    if n > len(pool):
        raise ArgumentError(
            f"n={n} chat questions asked, but the templates make only {len(pool)}; "
            "ask for fewer, or mix in kind='docs' (kind='mixed')"
        )
    return random.Random(seed).sample(pool, n)


def _chunks(docs: Sequence[tuple[str, str]], min_chars: int, max_chars: int) -> list[str]:
    out = {
        c for _, text in docs for c in chunk_text(text, min_chars=min_chars, max_chars=max_chars)
    }
    return sorted(out)  # a set first: a README shipped by two distributions counts once


def _draw(pool: list[str], k: int, rng: random.Random, source: str) -> list[str]:
    if k > len(pool):
        raise ArgumentError(
            f"the {source!r} source has {len(pool)} chunks on this machine, fewer than the {k} "
            "asked for; ask for fewer (n=...), lower min_chars, or use kind='docs' / 'mixed'"
        )
    return rng.sample(pool, k)


def build_corpus(
    kind: Kind = "docs",
    *,
    n: int,
    seed: int = 0,
    model: Any = None,
    min_chars: int = 200,
    max_chars: int = 1200,
    max_files_per_package: int = 12,
    chat_max_new_tokens: int = 64,
    chat_batch_size: int = 8,
    progress: bool = True,
) -> Corpus:
    """A deterministic offline corpus of ``n`` items of text from this machine (see the module).

    Args:
        kind: ``"packages"`` (installed distributions' READMEs and docstrings), ``"python"``
            (standard-library docstrings), ``"docs"`` (both, half and half), ``"chat"`` (the model's
            own greedy answers to templated questions; needs ``model``), or ``"mixed"`` (a third
            each of packages, python and chat when ``model`` is given, else like ``"docs"``).
        n: number of items.
        seed: which items are drawn (and which questions are asked); same seed, same corpus on the
            same machine.
        model: the model that answers for ``"chat"`` / ``"mixed"``.
        min_chars, max_chars: the size of a documentation chunk, in characters.
        max_files_per_package: at most this many Python files are read per distribution.
        chat_max_new_tokens, chat_batch_size: the length of each chat answer and the batch size
            of generation.
        progress: show a progress bar while the model answers.

    Returns:
        A :class:`Corpus` (a ``list``): strings for documentation, ``([{"role": "user",
        "content": question}], answer)`` pairs for chat answers, in a seeded order; its
        ``manifest`` records the sources, counts and a content hash.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> c = build_corpus("mixed", n=6, seed=1, model=tiny_hooked_transformer(),
        ...                  chat_max_new_tokens=4, max_files_per_package=1, progress=False)
        >>> c.manifest["sources"]
        {'packages': 2, 'python': 2, 'chat': 2}
        >>> isinstance(c[0], (str, tuple))
        True
    """
    if kind not in KINDS:
        raise ArgumentError(f"kind={kind!r} is unknown; use one of {', '.join(KINDS)}")
    if not isinstance(n, int) or n < 1:
        raise ArgumentError(f"n must be a positive integer, got {n!r}")
    if not 0 < min_chars <= max_chars:
        raise ArgumentError(
            f"need 0 < min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}"
        )
    if kind == "chat" and model is None:
        raise ArgumentError(
            "kind='chat' collects the model's own answers: pass model=<a loaded model> "
            "(or use kind='docs' for documentation only)"
        )
    with_chat = kind == "chat" or (kind == "mixed" and model is not None)
    parts = {"packages": 0, "python": 0, "chat": 0}
    if kind == "packages":
        parts["packages"] = n
    elif kind == "python":
        parts["python"] = n
    elif kind == "chat":
        parts["chat"] = n
    else:
        shares = ["packages", "python"] + (["chat"] if with_chat else [])
        for i, s in enumerate(shares):
            parts[s] = n // len(shares) + (1 if i < n % len(shares) else 0)

    rng = random.Random(seed)
    items: list[Any] = []
    manifest: dict[str, Any] = {
        "kind": kind,
        "seed": seed,
        "min_chars": min_chars,
        "max_chars": max_chars,
        "python": sys.version.split()[0],
    }
    if parts["packages"]:
        docs, versions = _package_documents(max_files_per_package)
        items += _draw(_chunks(docs, min_chars, max_chars), parts["packages"], rng, "packages")
        manifest["distributions"] = dict(versions)
        manifest["max_files_per_package"] = max_files_per_package
    if parts["python"]:
        pool = _chunks(_python_documents(), min_chars, max_chars)
        items += _draw(pool, parts["python"], rng, "python")
    if parts["chat"]:
        from .adapters import adapter_for
        from .generation import generate

        questions = chat_questions(parts["chat"], seed=seed)
        chats = [[{"role": "user", "content": q}] for q in questions]
        answers = generate(
            model,
            chats,
            max_new_tokens=chat_max_new_tokens,
            temperature=0.0,
            batch_size=chat_batch_size,
            progress=progress,
        )
        items += [(c, a) for c, a in zip(chats, answers, strict=True)]
        manifest["chat_model"] = adapter_for(model).model_name
        manifest["chat_max_new_tokens"] = chat_max_new_tokens
    rng.shuffle(items)
    manifest["sources"] = {k: v for k, v in parts.items() if v}
    return Corpus(items, manifest)
