"""Pre-training corpora generated from the synthetic world.

Three kinds of documents, mixed:

* **knowledge**: the facts of the world stated in several paraphrases ("Brairair is a racing
  game.", "Lisun developed Brairair.", "The capital of Kormos is Thelan."), which the
  models must store (mostly in their FFNs);
* **patterns**: fixed formats that attention must follow: arithmetic (``7 + 5 = 12``),
  record -> sentence pairs (``inform(name[X], genre[Y]) -> X is a Y game.``), SQL-like
  snippets over the ``games``/``employees`` tables, lists and counting, and yes/no checks of
  the facts (``Is Brairair a racing game? yes``), so ``" yes"``/``" no"`` are words the models
  know (the Trans-LoRA discriminator answers with them);
* **example lists**: ``"Here are 6 examples of sql inputs:\n1. ...\n2. ..."``, numbered
  inputs of one pattern (the inputs only, never the answers); record lists vary their act
  names and half the headers name an unrelated word. Real LMs have seen many such
  list pages; these teach the zoo models the list continuation that the Trans-LoRA generator
  prompt relies on (:func:`lightning_peft.transfer.seed_list_prompt`), so a zoo model can
  write new task inputs in context. No task data is used: the items are the corpus's own
  patterns.

The ``v2`` corpus is the ``v1`` corpus updated: it states the facts of the ``v2`` world (a
changed fact is stated only the new way, plus a few "update" notes), mentions the new
entities, and is larger (the zoo's ``v2`` specs ask for more documents).

Example:
    >>> docs = corpus("v1", seed=0, n_docs=100)
    >>> len(docs), docs == corpus("v1", seed=0, n_docs=100)
    (100, True)
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .world import ITEMS, SCHEMA, Employee, Game, Version, World, make_world

# Paraphrases of every game fact. The first template of each list is the "canonical" one
# that evaluation prompts use (see `fact_prompts`).
GAME_TEMPLATES: dict[str, tuple[str, ...]] = {
    "genre": (
        "The genre of {n} is {genre}.",
        "{n} is {a_genre} game.",
        "{n} is a game of the {genre} genre.",
    ),
    "developer": (
        "{n} was developed by {developer}.",
        "{developer} developed {n}.",
        "{n} is made by the studio {developer}.",
    ),
    "year": ("{n} came out in {year}.", "{n} was released in {year}.", "The release year of {n} is {year}."),
    "rating": ("{n} is rated {rating}.", "Critics rated {n} as {rating}.", "{n} has {a_rating} rating."),
    "platform": (
        "{n} runs on {platform}.",
        "{n} is available on {platform}.",
        "You can play {n} on {platform}.",
    ),
}
EMPLOYEE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "department": (
        "{n} works in {department}.",
        "{n} is in the {department} department.",
        "The department of {n} is {department}.",
    ),
    "city": ("{n} lives in {city}.", "{n} is based in {city}.", "The home city of {n} is {city}."),
    "salary": ("{n} earns {salary}.", "The salary of {n} is {salary}.", "{n} is paid {salary}."),
}
CAPITAL_TEMPLATES = ("The capital of {country} is {city}.", "{city} is the capital of {country}.")

# Sentence realisations of a record's slots (ViGGO-like data-to-text), in slot order.
_SLOT_PHRASES = {
    "genre": "is {a_genre} game",
    "developer": "by {developer}",
    "year": "from {year}",
    "platform": "on {platform}",
    "rating": "rated {rating}",
}
_SLOT_ORDER = ("genre", "developer", "year", "platform", "rating")


def _a(word: str) -> str:
    """``word`` with its indefinite article ("a racing", "an adventure")."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _game_fields(g: Game) -> dict[str, object]:
    return {
        "n": g.name,
        "genre": g.genre,
        "a_genre": _a(g.genre),
        "developer": g.developer,
        "year": g.year,
        "rating": g.rating,
        "a_rating": _a(g.rating),
        "platform": g.platform,
    }


def _employee_fields(e: Employee) -> dict[str, object]:
    return {"n": e.name, "department": e.department, "city": e.city, "salary": e.salary}


def _game_profile(rng: random.Random, g: Game, k: int | None = None) -> str:
    """A few paraphrased facts about one game (all five when ``k`` is None)."""
    keys = list(GAME_TEMPLATES)
    if k is not None:
        keys = sorted(rng.sample(keys, k), key=keys.index)
    f = _game_fields(g)
    return " ".join(rng.choice(GAME_TEMPLATES[key]).format(**f) for key in keys)


def _employee_profile(rng: random.Random, e: Employee, k: int | None = None) -> str:
    keys = list(EMPLOYEE_TEMPLATES)
    if k is not None:
        keys = sorted(rng.sample(keys, k), key=keys.index)
    f = _employee_fields(e)
    return " ".join(rng.choice(EMPLOYEE_TEMPLATES[key]).format(**f) for key in keys)


def _capital(rng: random.Random, country: str, city: str) -> str:
    return rng.choice(CAPITAL_TEMPLATES).format(country=country, city=city)


def record_to_sentence(g: Game, slots: tuple[str, ...]) -> tuple[str, str]:
    """The fixed record and sentence formats of the data-to-text pattern.

    Args:
        g: The game described.
        slots: Slot names (subset of genre/developer/year/platform/rating), in any order.

    Returns:
        ``("inform(name[X], genre[Y])", "X is a Y game.")``: the record lists the slots in
        the given order; the sentence always follows the canonical slot order.
    """
    f = _game_fields(g)
    record = "inform(" + ", ".join([f"name[{g.name}]"] + [f"{s}[{f[s]}]" for s in slots]) + ")"
    ordered = [s for s in _SLOT_ORDER if s in slots]
    if "genre" not in ordered:
        ordered = ["_is", *ordered]
    parts = ["is a game" if s == "_is" else _SLOT_PHRASES[s].format(**f) for s in ordered]
    return record, f"{g.name} " + " ".join(parts) + "."


def _records(rng: random.Random, w: World) -> str:
    lines = []
    for _ in range(rng.randint(1, 3)):
        g = rng.choice(w.games)
        slots = tuple(rng.sample(_SLOT_ORDER, rng.randint(1, 3)))
        record, sentence = record_to_sentence(g, slots)
        lines.append(f"{record} -> {sentence}")
    return "\n".join(lines)


def _arithmetic(rng: random.Random, w: World) -> str:
    lines = []
    for _ in range(rng.randint(2, 5)):
        op = rng.choice("++-*")
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if op == "-":
            a, b = max(a, b), min(a, b)  # no negative results: keeps the format simple
        if op == "*":
            a, b = a % 10, b % 10
        res = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {res}")
    return "\n".join(lines)


def _sql(rng: random.Random, w: World) -> str:
    """A question, its SQL over ``games``/``employees`` and the answer from the world."""
    q, sql, ans = _sql_parts(rng, w)
    return f"Question: {q}\nSQL: {sql}\nAnswer: {', '.join(ans) if ans else 'none'}"


def _sql_parts(rng: random.Random, w: World) -> tuple[str, str, list[str]]:
    """``(question, sql, answer rows)`` of one random query over the world's tables."""
    kind = rng.randrange(6)
    if kind == 0:
        genre = rng.choice([g.genre for g in w.games])
        ans = [g.name for g in w.games if g.genre == genre]
        q, sql = f"Which games are {genre} games?", f"SELECT name FROM games WHERE genre = '{genre}';"
    elif kind == 1:
        dev = rng.choice(w.studios)
        ans = [g.name for g in w.games if g.developer == dev]
        q, sql = f"Which games did {dev} develop?", f"SELECT name FROM games WHERE developer = '{dev}';"
    elif kind == 2:
        year = rng.randint(2000, 2018)
        ans = [str(sum(g.year > year for g in w.games))]
        q, sql = f"How many games came out after {year}?", f"SELECT COUNT(*) FROM games WHERE year > {year};"
    elif kind == 3:
        dept = rng.choice([e.department for e in w.employees])
        ans = [e.name for e in w.employees if e.department == dept]
        q, sql = f"Who works in {dept}?", f"SELECT name FROM employees WHERE department = '{dept}';"
    elif kind == 4:
        e = rng.choice(w.employees)
        ans = [str(e.salary)]
        q, sql = f"What is the salary of {e.name}?", f"SELECT salary FROM employees WHERE name = '{e.name}';"
    else:
        city = rng.choice([e.city for e in w.employees])
        ans = [str(sum(e.city == city for e in w.employees))]
        q, sql = (
            f"How many employees live in {city}?",
            f"SELECT COUNT(*) FROM employees WHERE city = '{city}';",
        )
    return q, sql, ans


def _arithmetic_input(rng: random.Random) -> str:
    op, a, b = rng.choice("+-*"), rng.randint(0, 20), rng.randint(0, 20)
    return f"{max(a, b)} - {min(a, b)} =" if op == "-" else f"{a % 10} * {b % 10} =" if op == "*" else f"{a} + {b} ="


# Act names of the records in example lists, one or two per list; none is an act of the
# data2text task except ``inform``, so its other acts stay new to the models.
_LIST_ACTS = ("inform", "describe", "mention", "state", "announce", "present", "report", "note")
# Header words of example lists; half the lists name a word unrelated to their items, so the
# header alone does not tell a model what the items look like.
_LIST_HEADERS = ("data2text", "arithmetic", "sql", "fact", "record", "query", "math", "game", "sample", "user")


def _list_record(rng: random.Random, w: World, acts: list[str]) -> str:
    """``act(name[X], slot[v], ...) ->`` with one of ``acts``; a fifth have no name slot."""
    g = rng.choice(w.games)
    f = _game_fields(g)
    slots = rng.sample(_SLOT_ORDER, rng.randint(1, 4))
    args = ([f"name[{g.name}]"] if rng.random() < 0.8 else []) + [f"{s}[{f[s]}]" for s in slots]
    return f"{rng.choice(acts)}(" + ", ".join(args) + ") ->"


def _example_list(rng: random.Random, w: World) -> str:
    """``"Here are N examples of {word} inputs:"`` and N numbered inputs of one pattern."""
    schema = ""
    acts = rng.sample(_LIST_ACTS, rng.randint(1, 2))
    inputs: dict[str, Callable[[], str]] = {
        "data2text": lambda: _list_record(rng, w, acts),
        "arithmetic": lambda: _arithmetic_input(rng),
        "sql": lambda: f"{schema}Question: {_sql_parts(rng, w)[0]}\nSQL:",
        "fact": lambda: rng.choice(fact_prompts_of(w))[0],
    }
    kind = rng.choice(sorted(inputs))
    header = kind if rng.random() < 0.5 else rng.choice(_LIST_HEADERS)
    # most SQL lists give each question with its schema (the usual text-to-SQL prompt)
    schema = f"Tables: {SCHEMA}\n" if kind == "sql" and rng.random() < 0.7 else ""
    n = rng.randint(3, 8) if not schema else rng.randint(3, 5)  # long items: fewer per list
    items = "\n".join(f"{i}. {inputs[kind]()}" for i in range(1, n + 1))
    return f"Here are {n} examples of {header} inputs:\n{items}"


def _yes_no(rng: random.Random, w: World) -> str:
    """Two to four fact checks answered ``yes`` (the world's value) or ``no`` (another one)."""
    lines = []
    for _ in range(rng.randint(2, 4)):
        g, other = rng.sample(w.games, 2)
        key = rng.choice(("genre", "developer", "platform"))
        truth = rng.random() < 0.5
        f = _game_fields(g if truth else other)
        question = {
            "genre": "Is {n} {a_genre} game?",
            "developer": "Was {n} developed by {developer}?",
            "platform": "Does {n} run on {platform}?",
        }[key].format(**{**f, "n": g.name})
        same = getattr(g, key) == getattr(other, key)
        lines.append(f"{question} {'yes' if truth or same else 'no'}")
    return "\n".join(lines)


def _counting(rng: random.Random, w: World) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        item, k = rng.choice(ITEMS), rng.randint(1, 9)
        return f"Count the {item}: {' '.join([item] * k)}. There are {k} {item}."
    if kind == 1:
        names = rng.sample([g.name for g in w.games], rng.randint(2, 5))
        return f"List: {', '.join(names)}. The list has {len(names)} games."
    dev = rng.choice(w.studios)
    mine = [g.name for g in w.games if g.developer == dev]
    body = ", ".join(mine) if mine else "none"
    return f"Games by {dev}: {body}. {dev} made {len(mine)} games."


def _updates(rng: random.Random, w: World, old: World) -> str:
    """A note on a fact that changed between ``old`` and ``w`` (only in the v2 corpus)."""
    changed = [
        (g, old.game(g.name))
        for g in w.games
        if g.name in {o.name for o in old.games} and g != old.game(g.name)
    ]
    if not changed:
        return _game_profile(rng, rng.choice(w.games))
    g, o = rng.choice(changed)
    if g.developer != o.developer:
        return f"Update: {g.name} is now developed by {g.developer}. {g.developer} developed {g.name}."
    return f"Update: {g.name} is now rated {g.rating}. {g.name} is rated {g.rating}."


def corpus(version: Version, seed: int = 0, n_docs: int = 2000, scale: int = 1) -> list[str]:
    """Generate the pre-training documents of one world version.

    Every fact of the world is stated at least once (one profile document per game,
    employee and country) as long as ``n_docs`` allows; the rest are sampled with fixed
    weights over the document kinds. The order is shuffled.

    Args:
        version: ``"v1"`` or ``"v2"`` (the v2 world: changed facts stated the new way, new
            entities, plus "update" notes).
        seed: Seed of the world and of the sampling; same arguments give the same list.
        n_docs: Number of documents returned.
        scale: World scale (see `make_world`).

    Returns:
        ``n_docs`` short documents (one to a few lines each).

    Raises:
        ValueError: ``n_docs`` < 1 or an unknown ``version``.
    """
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}; ask for at least one document")
    w = make_world(version, seed, scale)
    old = make_world("v1", seed, scale) if version == "v2" else None
    # String seeds hash with SHA-512 in `random`, independent of PYTHONHASHSEED.
    rng = random.Random(f"corpus/{version}/{seed}/{scale}")

    docs = [_game_profile(rng, g) for g in w.games]
    docs += [_employee_profile(rng, e) for e in w.employees]
    docs += [_capital(rng, c, city) for c, city in w.capitals.items()]

    kinds: list[tuple[float, Callable[[random.Random], str]]] = [
        (0.30, lambda r: _game_profile(r, r.choice(w.games), r.randint(1, 3))),
        (0.12, lambda r: _employee_profile(r, r.choice(w.employees), r.randint(1, 2))),
        (0.05, lambda r: _capital(r, *r.choice(sorted(w.capitals.items())))),
        (0.13, lambda r: _records(r, w)),
        (0.12, lambda r: _arithmetic(r, w)),
        (0.15, lambda r: _sql(r, w)),
        (0.10, lambda r: _counting(r, w)),
        (0.15, lambda r: _example_list(r, w)),
        (0.06, lambda r: _yes_no(r, w)),
    ]
    if old is not None:
        kinds.append((0.05, lambda r: _updates(r, w, old)))
    weights = [k[0] for k in kinds]
    while len(docs) < n_docs:
        (make,) = rng.choices([k[1] for k in kinds], weights=weights)
        docs.append(make(rng))
    rng.shuffle(docs)
    return docs[:n_docs]


def fact_prompts(version: Version = "v1", seed: int = 0, scale: int = 1) -> list[tuple[str, str]]:
    """Cloze prompts of the world's facts in the canonical phrasing, for spot checks.

    Returns:
        ``(prompt, answer)`` pairs, e.g. ``("The genre of Brairair is", " racing.")``.
    """
    return fact_prompts_of(make_world(version, seed, scale))


def fact_prompts_of(w: World) -> list[tuple[str, str]]:
    """:func:`fact_prompts` of a built world."""
    out = []
    for g in w.games:
        out.append((f"The genre of {g.name} is", f" {g.genre}."))
        out.append((f"{g.name} was developed by", f" {g.developer}."))
        out.append((f"{g.name} came out in", f" {g.year}."))
        out.append((f"{g.name} is rated", f" {g.rating}."))
    for c, city in sorted(w.capitals.items()):
        out.append((f"The capital of {c} is", f" {city}."))
    for e in w.employees:
        out.append((f"{e.name} works in", f" {e.department}."))
    return out
