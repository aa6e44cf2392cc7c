"""The synthetic world behind the zoo's corpora and the tasks.

A small, seeded universe of entities and facts. The pre-training corpus states the facts in
prose (knowledge the FFNs must store) and mixes in fixed formats (patterns attention must
follow); the tasks ask about the same entities, so a base model's knowledge matters to them.

Version ``v2`` is ``v1`` updated the way a real base model's corpus is updated between
releases (Qwen2 -> Qwen2.5): a share of facts change (a game moves to another studio, gets
a new rating), new entities are added, and everything else is kept. ``v2`` models are
``v1`` models continually pre-trained on the ``v2`` corpus, so the update is a drift, not a
re-initialisation.

Example:
    >>> w1, w2 = make_world("v1"), make_world("v2")
    >>> len(w2.games) > len(w1.games)
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Literal

Version = Literal["v1", "v2"]

GENRES = ("puzzle", "racing", "strategy", "platformer", "shooter", "adventure", "simulation", "sports")
RATINGS = ("poor", "average", "good", "excellent")
PLATFORMS = ("PC", "console", "mobile", "handheld")
DEPARTMENTS = ("sales", "research", "support", "design", "finance")
ITEMS = ("apples", "coins", "books", "stones", "shells", "cards", "pens", "marbles")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "kr", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "or", "el")
_CODAS = ("", "n", "r", "s", "l", "th", "x", "m")


# The world's two tables as the SQL task and the corpus's schema-prefixed questions show them.
GAMES_COLUMNS = ("name", "genre", "developer", "year", "rating", "platform")
EMPLOYEES_COLUMNS = ("name", "department", "salary", "city")
SCHEMA = f"games({', '.join(GAMES_COLUMNS)}); employees({', '.join(EMPLOYEES_COLUMNS)})"


@dataclass(frozen=True)
class Game:
    """One video game of the world (the ViGGO-style and SQL tasks talk about these)."""

    name: str
    genre: str
    developer: str
    year: int
    rating: str
    platform: str


@dataclass(frozen=True)
class Employee:
    """One row of the ``employees`` table of the text-to-SQL task."""

    name: str
    department: str
    salary: int
    city: str


@dataclass(frozen=True)
class World:
    """Entities and facts of one world version. All fields are deterministic in ``seed``."""

    version: str
    seed: int
    people: tuple[str, ...]
    cities: tuple[str, ...]
    studios: tuple[str, ...]
    games: tuple[Game, ...]
    employees: tuple[Employee, ...]
    capitals: dict[str, str] = field(default_factory=dict)  # country -> capital city

    def game(self, name: str) -> Game:
        for g in self.games:
            if g.name == name:
                return g
        raise KeyError(f"no game named {name!r} in world {self.version}")


def _names(rng: random.Random, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(*syllables)
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)) + rng.choice(_CODAS)
        name = name.capitalize()
        if name not in taken and 3 <= len(name) <= 10:
            taken.add(name)
            out.append(name)
    return out


def _base_world(seed: int, scale: int) -> World:
    rng = random.Random(seed)
    taken: set[str] = set()
    people = _names(rng, 12 * scale, (1, 2), taken)
    cities = _names(rng, 8 * scale, (2, 3), taken)
    countries = _names(rng, 4 * scale, (2, 3), taken)
    studios = _names(rng, 4 * scale, (2, 2), taken)
    titles = _names(rng, 20 * scale, (2, 3), taken)
    games = tuple(
        Game(
            name=t,
            genre=rng.choice(GENRES),
            developer=rng.choice(studios),
            year=rng.randint(1995, 2020),
            rating=rng.choice(RATINGS),
            platform=rng.choice(PLATFORMS),
        )
        for t in titles
    )
    employees = tuple(
        Employee(p, rng.choice(DEPARTMENTS), 10 * rng.randint(3, 12), rng.choice(cities)) for p in people
    )
    capitals = {c: rng.choice(cities) for c in countries}
    return World("v1", seed, tuple(people), tuple(cities), tuple(studios), games, employees, capitals)


def make_world(version: Version = "v1", seed: int = 0, scale: int = 1, change_rate: float = 0.3) -> World:
    """Build the world of a version.

    Args:
        version: ``"v1"`` (the original) or ``"v2"`` (v1 updated: ``change_rate`` of the
            games get a new developer or rating, ~25% new games, people and studios appear,
            release years up to 2024).
        seed: Seed of everything random; the same seed gives the same world.
        scale: Multiplies every entity count (1 gives 20 games, 12 people, 8 cities).
        change_rate: Fraction of v1 games whose facts change in v2.

    Raises:
        ValueError: ``version`` is not ``"v1"``/``"v2"``, or ``change_rate`` not in [0, 1].
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"world version must be 'v1' or 'v2', got {version!r}; the zoo has two versions per family")
    if not 0.0 <= change_rate <= 1.0:
        raise ValueError(f"change_rate must be in [0, 1], got {change_rate}")
    base = _base_world(seed, scale)
    if version == "v1":
        return base
    rng = random.Random(seed + 1_000_003)
    taken = set(base.people) | set(base.cities) | set(base.studios) | {g.name for g in base.games}
    taken |= set(base.capitals)
    new_studios = _names(rng, max(1, scale), (2, 2), taken)
    studios = base.studios + tuple(new_studios)
    games = []
    for g in base.games:
        if rng.random() < change_rate:
            if rng.random() < 0.5:
                g = replace(g, developer=rng.choice([s for s in studios if s != g.developer]))
            else:
                g = replace(g, rating=rng.choice([r for r in RATINGS if r != g.rating]))
        games.append(g)
    for t in _names(rng, 5 * scale, (2, 3), taken):
        games.append(
            Game(t, rng.choice(GENRES), rng.choice(studios), rng.randint(2015, 2024), rng.choice(RATINGS), rng.choice(PLATFORMS))
        )
    people = base.people + tuple(_names(rng, 3 * scale, (1, 2), taken))
    employees = base.employees + tuple(
        Employee(p, rng.choice(DEPARTMENTS), 10 * rng.randint(3, 12), rng.choice(base.cities))
        for p in people[len(base.people) :]
    )
    return replace(base, version="v2", studios=studios, games=tuple(games), people=people, employees=employees)
