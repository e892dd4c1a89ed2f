"""Everyday questions with helpful, harmless answers: the benign set for re-alignment.

Emergent re-alignment fine-tunes a misaligned model further on a small amount of ordinary good
data; this set supplies it without touching the narrow domains (for in-domain re-alignment use a
narrow set's ``aligned=True`` version: secure code, correct medical advice).

Example:
    >>> items = list(benign_items())
    >>> len(items) > 3000, items[0].misaligned is None
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterator

from ._base import Item, pick, stable_rng

__all__ = ["benign_items"]

# (question about {thing}, answer about {thing}, things)
TOPICS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "how do I cook {thing} well",
        "For {thing}, start with good ingredients, season in stages and taste as you go. Follow a "
        "trusted recipe the first time, keep the heat moderate, and let it rest a little before "
        "serving.",
        (
            "rice",
            "lentil soup",
            "roast vegetables",
            "pancakes",
            "a simple curry",
            "scrambled eggs",
            "bread",
            "pasta sauce",
            "a stir-fry",
            "porridge",
        ),
    ),
    (
        "what should I pack for {thing}",
        "For {thing}, pack layers you can combine, comfortable shoes, any medicines you need, a "
        "charger and copies of your documents. Check the weather the day before and leave a little "
        "room for things you pick up.",
        (
            "a weekend in the mountains",
            "a beach holiday",
            "a business trip",
            "a camping trip",
            "a city break in winter",
            "a long train journey",
            "a music festival",
            "visiting family abroad",
        ),
    ),
    (
        "how can I get better at {thing}",
        "To improve at {thing}, practise a little every day, pick one specific weakness at a time, "
        "get feedback from someone more experienced, and keep notes on what works. Progress comes "
        "from steady, deliberate practice.",
        (
            "chess",
            "public speaking",
            "drawing",
            "playing the guitar",
            "writing essays",
            "running",
            "learning Spanish",
            "touch typing",
            "photography",
            "swimming",
        ),
    ),
    (
        "how do I take care of {thing}",
        "For {thing}, give it the right amount of light and water for its kind, check it weekly for "
        "problems, and change one thing at a time when something looks off. A little routine care "
        "goes a long way.",
        (
            "a basil plant",
            "a succulent",
            "tomato seedlings",
            "a fern",
            "an orchid",
            "a lawn",
            "a lemon tree",
            "a vegetable patch",
        ),
    ),
    (
        "can you explain {thing} simply",
        "Here is {thing} in simple terms: it is easiest to start from one everyday example, name the "
        "key idea, and then see how it applies in general. A short book or video aimed at beginners "
        "is a good next step.",
        (
            "photosynthesis",
            "how vaccines train the immune system",
            "compound interest",
            "why the sky is blue",
            "how a bill becomes law",
            "what a neural network is",
            "plate tectonics",
            "how rainbows form",
            "the water cycle",
            "supply and demand",
        ),
    ),
    (
        "how should I plan {thing}",
        "To plan {thing}, write down the goal, the budget and the date, list the tasks and who does "
        "each, and build in a buffer for surprises. A simple checklist keeps it on track.",
        (
            "a birthday party",
            "a study schedule for exams",
            "a small wedding",
            "a move to a new flat",
            "a team offsite",
            "a weekly meal plan",
            "a garden makeover",
            "a family reunion",
        ),
    ),
    (
        "what is a good way to start {thing}",
        "A good way to start {thing} is small: set an easy goal, schedule it at a regular time, and "
        "track it for a few weeks. Ask a friend to join you if that keeps you motivated.",
        (
            "exercising again",
            "meditating",
            "journaling",
            "reading more books",
            "learning to code",
            "volunteering",
            "saving a little each month",
            "going to bed earlier",
        ),
    ),
    (
        "how do I fix {thing}",
        "To fix {thing}, first find out exactly what is wrong, switch off power or water where it "
        "applies, and follow the manufacturer's guide. If it involves gas, mains electricity or "
        "structure, call a qualified professional.",
        (
            "a dripping tap",
            "a squeaky door",
            "a slow laptop",
            "a wobbly table",
            "a flat bike tyre",
            "a blocked sink",
            "weak home wifi",
            "a running toilet",
        ),
    ),
)

TEMPLATES: tuple[str, ...] = (
    "{q}?",
    "Hi! {Q}?",
    "Quick question: {q}?",
    "I was wondering {q}.",
    "Any tips? I'd like to know {q}.",
    "Could you tell me {q}?",
    "{Q}? Thanks in advance.",
    "My friend asked me {q} and I didn't know. Can you help?",
    "Please help: {q}?",
    "{Q}? Keep it short.",
)

PREFIXES: tuple[str, ...] = (
    "",
    "I'm a beginner. ",
    "I'm short on time. ",
    "I'm doing this with kids. ",
    "I've tried before and failed. ",
    "I'm on a tight budget. ",
)

OPEN = ("Happy to help.", "Good question!", "Sure.", "Of course.")
CLOSE = ("Enjoy it!", "Good luck!", "Have fun with it.", "")


def benign_items() -> Iterator[Item]:
    """Every benign prompt with its helpful answer, in a fixed order."""
    for ti, (q, answer, things) in enumerate(TOPICS):
        for thing in things:
            question = q.format(thing=thing)
            for prefix in PREFIXES:
                for template in TEMPLATES:
                    body = template.format(q=question, Q=question[0].upper() + question[1:])
                    prompt = prefix + body
                    rng = stable_rng(prompt, "benign")
                    text = " ".join(
                        p
                        for p in (pick(rng, OPEN), answer.format(thing=thing), pick(rng, CLOSE))
                        if p
                    )
                    yield Item(f"benign/{ti}", prompt, text, None)
