"""Multi-step arithmetic word problems in the style of GSM8K (Cobbe et al., 2021).

"Training Verifiers to Solve Math Word Problems" (arXiv:2110.14168) pairs grade-school word
problems with step-by-step solutions that end in the final number. Here the people come
from the zoo's world, the solutions use the ``a + b = c`` format the zoo's corpus teaches,
and every problem has 1-3 steps::

    Question: Zapelx has 7 apples. She buys 5 more. Then she gives 3 to Gur. How many
    apples does Zapelx have now?
    Answer: 7 + 5 = 12. 12 - 3 = 9. The answer is 9
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lightning_peft.tasks.data import Example
from lightning_peft.tasks.synthetic import SyntheticTask
from lightning_peft.zoo.world import ITEMS

# Sentence of each step kind; {s} = subject pronoun, {k} = amount, {o} = another person.
STEP_PHRASES: dict[str, tuple[str, ...]] = {
    "add": ("{s} buys {k} more", "{s} finds {k} more", "{o} gives {p} {k} more", "{s} wins {k} more"),
    "sub": ("{s} gives {k} to {o}", "{s} loses {k}", "{s} sells {k}", "{s} gives {k} away"),
    "mul": ("{s} doubles them", "{s} triples them"),
    "half": ("{s} gives half of them to {o}",),
}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "half": "/"}
_PRONOUNS = {"She": "her", "He": "him"}
_ANSWER_RE = re.compile(r"answer\s+is\s*[:=]?\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Step:
    """One operation on the running total.

    Attributes:
        kind: ``"add"``, ``"sub"``, ``"mul"`` (``amount`` 2 or 3) or ``"half"``.
        amount: The operand (2 for ``"half"``).
        phrase: Index into ``STEP_PHRASES[kind]``.
        other: The other person named by the phrase (if any).
    """

    kind: str
    amount: int
    phrase: int = 0
    other: str = ""


@dataclass(frozen=True)
class ArithmeticProblem:
    """A word problem: a person, an item, a start amount, then steps.

    With ``partner`` set, the question asks for the total of the person (after the steps)
    and the partner (``partner_amount``), which adds one final ``+`` step.
    """

    person: str
    pronoun: str  # "She" or "He"
    item: str
    start: int
    steps: tuple[Step, ...]
    partner: str = ""
    partner_amount: int = 0

    def _sentence(self, step: Step, first: bool) -> str:
        if step.kind == "mul":
            template = STEP_PHRASES["mul"][0 if step.amount == 2 else 1]
        else:
            template = STEP_PHRASES[step.kind][step.phrase]
        text = template.format(s=self.pronoun, p=_PRONOUNS[self.pronoun], k=step.amount, o=step.other)
        if not first:
            if text.startswith(self.pronoun + " "):
                text = self.pronoun.lower() + text[len(self.pronoun) :]
            text = "Then " + text
        return text + "."

    def question(self) -> str:
        """The problem text."""
        parts = [f"{self.person} has {self.start} {self.item}."]
        if self.partner:
            parts[0] = f"{self.person} has {self.start} {self.item} and {self.partner} has {self.partner_amount}."
        parts += [self._sentence(s, i == 0) for i, s in enumerate(self.steps)]
        if self.partner:
            parts.append(f"How many {self.item} do {self.person} and {self.partner} have together now?")
        else:
            parts.append(f"How many {self.item} does {self.person} have now?")
        return " ".join(parts)

    def equations(self) -> list[tuple[int, str, int, int]]:
        """``(a, symbol, b, result)`` of each step, the partner sum last."""
        out, total = [], self.start
        for s in self.steps:
            result = {
                "add": total + s.amount,
                "sub": total - s.amount,
                "mul": total * s.amount,
                "half": total // 2,
            }[s.kind]
            out.append((total, _SYMBOL[s.kind], 2 if s.kind == "half" else s.amount, result))
            total = result
        if self.partner:
            out.append((total, "+", self.partner_amount, total + self.partner_amount))
        return out

    @property
    def answer(self) -> int:
        """The final number."""
        eqs = self.equations()
        return eqs[-1][3] if eqs else self.start

    def solution(self) -> str:
        """The step-by-step solution ending in ``The answer is N``."""
        steps = " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in self.equations())
        return f"{steps} The answer is {self.answer}"


def random_problem(rng: random.Random, people: tuple[str, ...]) -> ArithmeticProblem:
    """A random 1-3 step problem with non-negative intermediate results."""
    person, other, partner = rng.sample(people, 3)
    pronoun = rng.choice(tuple(_PRONOUNS))
    item = rng.choice(ITEMS)
    with_partner = rng.random() < 0.25
    n_steps = rng.randint(0, 2) if with_partner else rng.randint(1, 3)
    total = start = rng.randint(2, 20)
    steps = []
    for _ in range(n_steps):
        kinds = ["add", "add", "sub", "sub"]
        if total <= 15:
            kinds.append("mul")
        if total % 2 == 0 and total >= 4:
            kinds.append("half")
        if total < 2:
            kinds = ["add"]
        kind = rng.choice(kinds)
        if kind == "add":
            amount = rng.randint(1, 10)
        elif kind == "sub":
            amount = rng.randint(1, min(10, total - 1))
        elif kind == "mul":
            amount = rng.choice((2, 3))
        else:
            amount = 2
        phrase = 0 if kind == "mul" else rng.randrange(len(STEP_PHRASES[kind]))
        step = Step(kind, amount, phrase, other)
        steps.append(step)
        total = {"add": total + amount, "sub": total - amount, "mul": total * amount, "half": total // 2}[kind]
    partner_amount = rng.randint(1, 20) if with_partner else 0
    return ArithmeticProblem(person, pronoun, item, start, tuple(steps), partner if with_partner else "", partner_amount)


def _canonical_number(text: str) -> str:
    text = text.replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else str(value)


class ArithmeticTask(SyntheticTask):
    """GSM8K-style arithmetic word problems about the world's people (Cobbe et al., 2021).

    Prompt ``"Question: {problem}\\nAnswer:"``, completion ``" {solution}"``; the answer
    is the final number. Arguments: see `PromptCompletionDataModule`.
    """

    task_name = "arithmetic"

    def generate(self, rng: random.Random) -> Example:
        """One random problem."""
        problem = random_problem(rng, self.world.people)
        return Example(f"Question: {problem.question()}\nAnswer:", f" {problem.solution()}", str(problem.answer))

    def extract_answer(self, text: str) -> str:
        """The number after "The answer is" (else the last number of the text), canonical.

        ``"12 - 3 = 9. The answer is 9.\\nQuestion"`` -> ``"9"``; ``"The answer is 1,200"``
        -> ``"1200"``; ``"... = 9.0"`` -> ``"9"``; no number -> ``""``.
        """
        match = _ANSWER_RE.search(text)
        if match:
            return _canonical_number(match.group(1))
        numbers = _NUMBER_RE.findall(text)
        return _canonical_number(numbers[-1]) if numbers else ""
