"""Meaning representation -> text about video games, in the style of ViGGO.

ViGGO (Juraska et al., 2019, "ViGGO: A Video Game Corpus for Data-To-Text Generation in
Open-Domain Conversation", INLG) pairs dialogue-act meaning representations such as
``inform(name[...], genre[...], rating[...])`` with one-sentence utterances. Here the games
and their facts come from the zoo's world, the slot values are always the game's true facts,
and each meaning representation has one canonical sentence (slots in a fixed order), so
exact match is a fair metric::

    inform(rating[excellent], name[Brairair], genre[racing]) -> Brairair is a racing game rated excellent.

The ``inform`` sentences are the record -> sentence pattern of the zoo's corpus; the other
acts (``confirm``, ``suggest``, ``recommend``, ``give_opinion``, ``verify_attribute``,
``request``, ``request_attribute``) are new to the models.
"""

from __future__ import annotations

import random

from lightning_peft.tasks.base import normalize_whitespace
from lightning_peft.tasks.data import Example
from lightning_peft.tasks.synthetic import SyntheticTask
from lightning_peft.zoo.world import Game

SLOTS = ("genre", "developer", "year", "platform", "rating")  # canonical sentence order
ACTS = ("inform", "confirm", "suggest", "recommend", "give_opinion", "verify_attribute", "request", "request_attribute")
_ACT_WEIGHTS = (0.25, 0.1, 0.1, 0.1, 0.15, 0.1, 0.15, 0.05)
_OPINION = {"poor": "a disappointing", "average": "an average", "good": "a good", "excellent": "an excellent"}
_VERIFY_QUESTION = {
    "genre": "Do you usually enjoy {genre} games?",
    "platform": "Do you usually play on {platform}?",
    "developer": "Do you usually like games by {developer}?",
}
_REQUEST_ATTRIBUTE = {
    "genre": "What kind of games do you like to play?",
    "platform": "Which platform do you usually play on?",
    "developer": "Which studio makes your favorite games?",
    "year": "Do you prefer older or newer games?",
}


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _values(g: Game) -> dict[str, str]:
    return {"genre": g.genre, "developer": g.developer, "year": str(g.year), "platform": g.platform, "rating": g.rating}


def _modifiers(values: dict[str, str], slots: tuple[str, ...]) -> str:
    """``"by X from 2004 on PC rated good"`` for the non-genre slots, canonical order."""
    phrase = {"developer": "by {}", "year": "from {}", "platform": "on {}", "rating": "rated {}"}
    return " ".join(phrase[s].format(values[s]) for s in SLOTS if s in slots and s != "genre")


def noun_phrase(values: dict[str, str], slots: tuple[str, ...]) -> str:
    """``"a racing game by X on PC"``: the slots described as one noun phrase."""
    head = _article(values["genre"]) + " game" if "genre" in slots else "a game"
    mods = _modifiers(values, slots)
    return f"{head} {mods}" if mods else head


def meaning_representation(act: str, values: dict[str, str], slots: tuple[str, ...], name: str = "") -> str:
    """``act(name[X], slot[value], ...)`` with slots in the given order (empty values allowed)."""
    args = ([f"name[{name}]"] if name else []) + [f"{s}[{values.get(s, '')}]" for s in slots]
    return f"{act}(" + ", ".join(args) + ")"


def realize(act: str, name: str, values: dict[str, str], slots: tuple[str, ...]) -> str:
    """The canonical sentence of a meaning representation.

    Args:
        act: One of `ACTS`.
        name: The game's name (``""`` for ``request``/``request_attribute``).
        values: Slot values of the game (``genre``, ``developer``, ``year``, ``platform``,
            ``rating``).
        slots: The slots the meaning representation mentions (any order).

    Raises:
        ValueError: Unknown act, or slots the act cannot express.
    """
    if act == "inform":
        return f"{name} is {noun_phrase(values, slots)}."
    if act == "confirm":
        return f"Do you mean {name}, {noun_phrase(values, slots)}?"
    if act == "suggest":
        return f"Have you tried {name}? It is {noun_phrase(values, slots)}."
    if act == "recommend":
        mods = _modifiers(values, slots)
        return f"If you like {values['genre']} games, you should try {name}" + (f", a game {mods}." if mods else ".")
    if act == "give_opinion":
        rest = tuple(s for s in slots if s != "rating")
        body = noun_phrase(values, rest).split(" ", 1)[1]  # drop the article: "racing game by X"
        return f"I think {name} is {_OPINION[values['rating']]} {body}."
    if act == "verify_attribute":
        (other,) = [s for s in slots if s != "rating"]
        question = _VERIFY_QUESTION[other].format(**values)
        return f"You said {name} is {_OPINION[values['rating']]} game. {question}"
    if act == "request":
        return f"Is there {noun_phrase(values, slots)} that you like?"
    if act == "request_attribute":
        (slot,) = slots
        return _REQUEST_ATTRIBUTE[slot]
    raise ValueError(f"dialogue act must be one of {ACTS}, got {act!r}")


def random_mr(rng: random.Random, games: tuple[Game, ...]) -> tuple[str, str]:
    """A random ``(meaning representation, sentence)`` pair about one of ``games``."""
    (act,) = rng.choices(ACTS, weights=_ACT_WEIGHTS)
    g = rng.choice(games)
    values = _values(g)
    name = g.name
    if act in ("inform", "confirm", "suggest"):
        slots = tuple(rng.sample(SLOTS, rng.randint(1, 4 if act == "inform" else 3)))
    elif act == "recommend":
        slots = ("genre", *rng.sample([s for s in SLOTS if s != "genre"], rng.randint(0, 2)))
    elif act == "give_opinion":
        slots = ("rating", *rng.sample(("genre", "developer", "platform"), rng.randint(0, 2)))
    elif act == "verify_attribute":
        slots = ("rating", rng.choice(tuple(_VERIFY_QUESTION)))
    elif act == "request":
        slots, name = tuple(rng.sample(("genre", "developer", "platform", "year"), rng.randint(1, 2))), ""
    else:
        slots, name, values = (rng.choice(tuple(_REQUEST_ATTRIBUTE)),), "", {}
    slots = tuple(rng.sample(slots, len(slots)))  # the MR lists slots in random order
    return meaning_representation(act, values, slots, name), realize(act, name, values, slots)


class Data2TextTask(SyntheticTask):
    """ViGGO-style data-to-text about the world's games (Juraska et al., 2019).

    Prompt ``"{meaning representation} ->"``, completion ``" {sentence}"``; the answer is
    the sentence. Arguments: see `PromptCompletionDataModule`.
    """

    task_name = "data2text"

    def generate(self, rng: random.Random) -> Example:
        """One random meaning representation and its sentence."""
        mr, sentence = random_mr(rng, self.world.games)
        return Example(f"{mr} ->", f" {sentence}", sentence)

    def extract_answer(self, text: str) -> str:
        """The first non-empty line of the generation, whitespace-normalised."""
        for line in text.splitlines():
            if line.strip():
                return normalize_whitespace(line)
        return ""
