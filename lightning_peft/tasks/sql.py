"""Text-to-SQL over the world's tables, in the style of WikiSQL and Spider.

WikiSQL (Zhong et al., 2017, "Seq2SQL", arXiv:1709.00103) maps questions over one table to
``SELECT agg(col) FROM t WHERE ...``; Spider (Yu et al., 2018, EMNLP) adds several tables,
``ORDER BY``/``LIMIT``, ``GROUP BY`` and ``DISTINCT``. Here the tables are the zoo world's::

    games(name, genre, developer, year, rating, platform)
    employees(name, department, salary, city)

and a question is composed from a head (which rows/aggregate) and 1-3 conditions whose
values come from the table, so queries usually return rows. The prompt carries the schema::

    Tables: games(name, genre, developer, year, rating, platform); employees(name, ...)
    Question: How many racing games by Lisun are there?
    SQL: SELECT COUNT(*) FROM games WHERE genre = 'racing' AND developer = 'Lisun';

Use `world_tables` to load the tables into ``sqlite3`` and run the answers.
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import astuple, dataclass

from lightning_peft.tasks.base import normalize_whitespace
from lightning_peft.tasks.data import Example
from lightning_peft.tasks.synthetic import SyntheticTask
from lightning_peft.zoo.world import EMPLOYEES_COLUMNS, GAMES_COLUMNS, SCHEMA, World


@dataclass(frozen=True)
class Condition:
    """One ``WHERE`` term and its English phrase."""

    column: str
    op: str  # "=", ">" or "<"
    value: str | int
    phrase: str

    def sql(self) -> str:
        value = f"'{self.value}'" if isinstance(self.value, str) else str(self.value)
        return f"{self.column} {self.op} {value}"


def world_tables(world: World) -> sqlite3.Connection:
    """An in-memory ``sqlite3`` database holding the world's ``games`` and ``employees``."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE games (name TEXT, genre TEXT, developer TEXT, year INTEGER, rating TEXT, platform TEXT)")
    db.execute("CREATE TABLE employees (name TEXT, department TEXT, salary INTEGER, city TEXT)")
    db.executemany("INSERT INTO games VALUES (?, ?, ?, ?, ?, ?)", [astuple(g) for g in world.games])
    db.executemany("INSERT INTO employees VALUES (?, ?, ?, ?)", [astuple(e) for e in world.employees])
    return db


def _where(conds: list[Condition]) -> str:
    return " WHERE " + " AND ".join(c.sql() for c in conds) if conds else ""


def _game_conditions(rng: random.Random, world: World, k: int) -> tuple[str, list[Condition]]:
    """``k`` conditions on games (values from a random row) and the plural noun phrase."""
    row = rng.choice(world.games)
    year_ops = (">", "<", "=")
    columns = rng.sample(("genre", "developer", "platform", "rating", "year"), k)
    conds = []
    for col in ("genre", "developer", "platform", "rating", "year"):  # canonical order
        if col not in columns:
            continue
        if col == "year":
            op = rng.choice(year_ops)
            year = row.year + (rng.randint(-3, -1) if op == ">" else rng.randint(1, 3) if op == "<" else 0)
            word = {">": "after", "<": "before", "=": "in"}[op]
            conds.append(Condition("year", op, year, f"released {word} {year}"))
        else:
            value = getattr(row, col)
            phrase = {"genre": "{}", "developer": "by {}", "platform": "on {}", "rating": "rated {}"}[col].format(value)
            conds.append(Condition(col, "=", value, phrase))
    adjective = [c.phrase for c in conds if c.column == "genre"]
    rest = [c.phrase for c in conds if c.column != "genre"]
    return " ".join([*adjective, "games", *rest]), conds


def _games_question(rng: random.Random, world: World) -> tuple[str, str]:
    if rng.random() < 0.15:  # attribute lookup
        g = rng.choice(world.games)
        col = rng.choice(GAMES_COLUMNS[1:])
        word = {"year": "release year"}.get(col, col)
        return f"What is the {word} of {g.name}?", f"SELECT {col} FROM games WHERE name = '{g.name}';"
    k = rng.choices((1, 2, 3), weights=(0.45, 0.4, 0.15))[0]
    np_, conds = _game_conditions(rng, world, k)
    cols = {c.column for c in conds}
    heads = ["names", "count", "newest", "oldest", "sorted", "name_year"]
    if "developer" not in cols:
        heads += ["studios", "per_studio"]
    head = rng.choice(heads)
    where = _where(conds)
    singular = np_.replace("games", "game", 1)
    if head == "names":
        return f"Which {np_} are there?", f"SELECT name FROM games{where};"
    if head == "count":
        return f"How many {np_} are there?", f"SELECT COUNT(*) FROM games{where};"
    if head in ("newest", "oldest"):
        order = "DESC" if head == "newest" else "ASC"
        return f"What is the {head} {singular}?", f"SELECT name FROM games{where} ORDER BY year {order} LIMIT 1;"
    if head == "sorted":
        if rng.random() < 0.5:
            return f"List the {np_} from oldest to newest.", f"SELECT name FROM games{where} ORDER BY year ASC;"
        return f"List the {np_} from newest to oldest.", f"SELECT name FROM games{where} ORDER BY year DESC;"
    if head == "name_year":
        return f"List the names and release years of the {np_}.", f"SELECT name, year FROM games{where};"
    if head == "studios":
        return f"Which studios made {np_}?", f"SELECT DISTINCT developer FROM games{where};"
    return (
        f"How many {np_} did each studio make?",
        f"SELECT developer, COUNT(*) FROM games{where} GROUP BY developer;",
    )


def _employee_conditions(rng: random.Random, world: World, k: int) -> tuple[str, list[Condition]]:
    row = rng.choice(world.employees)
    columns = rng.sample(("department", "city", "salary"), k)
    conds = []
    if "department" in columns:
        conds.append(Condition("department", "=", row.department, f"in {row.department}"))
    if "city" in columns:
        conds.append(Condition("city", "=", row.city, f"living in {row.city}"))
    if "salary" in columns:
        if rng.random() < 0.5:
            s = row.salary - 10 * rng.randint(1, 3)
            conds.append(Condition("salary", ">", s, f"earning more than {s}"))
        else:
            s = row.salary + 10 * rng.randint(1, 3)
            conds.append(Condition("salary", "<", s, f"earning less than {s}"))
    return " ".join(["employees", *(c.phrase for c in conds)]), conds


def _employees_question(rng: random.Random, world: World) -> tuple[str, str]:
    if rng.random() < 0.15:  # attribute lookup
        e = rng.choice(world.employees)
        col = rng.choice(EMPLOYEES_COLUMNS[1:])
        question = {
            "department": f"Which department does {e.name} work in?",
            "salary": f"What is the salary of {e.name}?",
            "city": f"Which city does {e.name} live in?",
        }[col]
        return question, f"SELECT {col} FROM employees WHERE name = '{e.name}';"
    k = rng.choices((1, 2, 3), weights=(0.45, 0.4, 0.15))[0]
    np_, conds = _employee_conditions(rng, world, k)
    heads = ["names", "count", "average", "highest", "lowest", "best_paid", "sorted"]
    if "city" not in {c.column for c in conds}:
        heads.append("cities")
    head = rng.choice(heads)
    where = _where(conds)
    if head == "names":
        return f"Who are the {np_}?", f"SELECT name FROM employees{where};"
    if head == "count":
        return f"How many {np_} are there?", f"SELECT COUNT(*) FROM employees{where};"
    if head in ("average", "highest", "lowest"):
        agg = {"average": "AVG", "highest": "MAX", "lowest": "MIN"}[head]
        return f"What is the {head} salary of the {np_}?", f"SELECT {agg}(salary) FROM employees{where};"
    if head == "best_paid":
        return f"Who is the best paid of the {np_}?", f"SELECT name FROM employees{where} ORDER BY salary DESC LIMIT 1;"
    if head == "sorted":
        return f"List the {np_} from highest to lowest salary.", f"SELECT name FROM employees{where} ORDER BY salary DESC;"
    return f"In which cities do the {np_} live?", f"SELECT DISTINCT city FROM employees{where};"


def random_question(rng: random.Random, world: World) -> tuple[str, str]:
    """A random ``(question, sql)`` pair over the world's tables."""
    if rng.random() < 0.6:
        return _games_question(rng, world)
    return _employees_question(rng, world)


class SQLTask(SyntheticTask):
    """Text-to-SQL over the world's ``games`` and ``employees`` (WikiSQL/Spider style).

    Prompt ``"Tables: {schema}\\nQuestion: {question}\\nSQL:"``, completion ``" {sql}"``;
    the answer is the SQL string. Arguments: see `PromptCompletionDataModule`.
    """

    task_name = "sql"

    def generate(self, rng: random.Random) -> Example:
        """One random question and its SQL."""
        question, sql = random_question(rng, self.world)
        return Example(f"Tables: {SCHEMA}\nQuestion: {question}\nSQL:", f" {sql}", sql)

    def extract_answer(self, text: str) -> str:
        """The first statement of the first non-empty line (up to and with its ``;``).

        ``" SELECT name FROM games;\\nQuestion: ..."`` -> ``"SELECT name FROM games;"``.
        """
        for line in text.splitlines():
            if line.strip():
                head, sep, _ = line.partition(";")
                return normalize_whitespace(head) + sep
        return ""
