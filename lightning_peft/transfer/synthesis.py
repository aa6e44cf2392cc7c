"""Seed-list prompts, parsing of one new example per completion, de-duplication.

Trans-LoRA (Wang et al., NeurIPS 2024, arXiv 2405.17258, section 3.2): the generator is
prompted with the ``k = 5`` seed inputs as a numbered list and continues it::

    Here are 10 examples of {task} inputs:
    1. <seed 1>
    ...
    5. <seed 5>
    6.

and one new input is parsed per completion: the text up to the next list number. Seeds may
span several lines (``"Question: ...\\nAnswer:"``); only a line that *starts* with a number and a
dot or parenthesis ends an item, so a prompt's own lines survive.

:class:`SeedFormat` (ours, not in the paper) anchors the open item to what every seed shares:
the common opening (``"Tables: ...\\nQuestion: "``) is written into the prompt after ``k+1.``,
so the generator only writes the variable part, and an item is cut right after the common
ending (``"\\nSQL:"``, ``" ->"``) and rejected without it. Small generators otherwise drift
into their pre-training formats (a record followed by its own answer, a list of the wrong
kind); the anchor keeps every proposal a well-formed input without looking at any data but
the seeds.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Sequence

__all__ = ["Deduplicator", "SeedFormat", "normalize_for_dedup", "parse_generation", "seed_list_prompt"]

# a line that starts a new list item: "7." / "7)" / " 12 ." at the beginning of a line
_ITEM_START = re.compile(r"(?:^|\n)[ \t]*\d{1,3}[ \t]*[.)](?=\s|$)")
_TRAILING_JUNK = re.compile(r"(?:</s>|<\|endoftext\|>|<\|im_end\|>|<eos>|<pad>)+\s*$")


def seed_list_prompt(seeds: Sequence[str], task_name: str = "task", total: int | None = None, opening: str = "") -> str:
    """The generator's prompt: a header, the seeds numbered ``1..k`` and the open item ``k+1.``.

    Args:
        seeds: ``k >= 1`` real task inputs (each may contain newlines; none may be empty).
        task_name: Named in the header ("Here are 10 examples of arithmetic inputs:").
        total: The count announced in the header (default ``2 * k``, the paper's 10 for 5 seeds).
        opening: Text the open item starts with (:attr:`SeedFormat.prefix`); default none.

    Returns:
        The prompt, ending with ``"{k+1}."`` (no trailing space: the model writes it), or with
        ``"{k+1}. {opening}"`` when an opening is given.

    Raises:
        ValueError: no seeds, an empty seed, or ``total < k + 1``.
    """
    if not seeds:
        raise ValueError("seed_list_prompt needs at least one seed input; pass e.g. the first 5 training prompts.")
    cleaned = [s.strip() for s in seeds]
    if any(not s for s in cleaned):
        raise ValueError("seed_list_prompt got an empty seed; drop empty inputs before building the prompt.")
    k = len(cleaned)
    total = 2 * k if total is None else total
    if total < k + 1:
        raise ValueError(f"seed_list_prompt: total={total} must announce more than the {k} seeds; use total >= {k + 1}.")
    items = "\n".join(f"{i}. {s}" for i, s in enumerate(cleaned, start=1))
    head = f"Here are {total} examples of {task_name} inputs:\n{items}\n{k + 1}."
    return f"{head} {opening}" if opening else head


def parse_generation(completion: str, *, min_chars: int = 8, max_chars: int = 1000) -> str | None:
    """The one new example in a completion of :func:`seed_list_prompt`, or ``None``.

    Takes the text before the next list item (a line starting with ``N.``/``N)``), strips
    special-token text and surrounding whitespace/quotes, and rejects items that are too short
    (a stray number, an empty line) or too long (the model never closed the item). A completion
    that repeats the open number (``"6. 6. text"``) is handled.

    Args:
        completion: The generated text *after* the prompt (decoded, special tokens skipped or not).
        min_chars: Shorter items are rejected.
        max_chars: Longer items are rejected (unterminated rambling).

    Returns:
        The new input, or ``None`` when nothing usable was generated.
    """
    text = _TRAILING_JUNK.sub("", completion)
    text = re.sub(r"^[ \t]*(?:\d{1,3}[ \t]*[.)][ \t]*)+", "", text)  # a repeated open number: "6. 6. text"
    end = _ITEM_START.search(text)
    item = text[: end.start()] if end else text
    item = item.strip().strip('"\u201c\u201d').strip()
    if not min_chars <= len(item) <= max_chars:
        return None
    return item


def normalize_for_dedup(text: str) -> str:
    """Key for de-duplication: NFKC, case-folded, whitespace collapsed, edge punctuation dropped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    return text.strip(" .,;:!?\"'")


class Deduplicator:
    """Accepts each new input once, never one equal (after :func:`normalize_for_dedup`) to a seed."""

    def __init__(self, seeds: Iterable[str] = ()) -> None:
        self._seen = {normalize_for_dedup(s) for s in seeds}
        self.rejected = 0

    def add(self, text: str) -> bool:
        """``True`` (and remember it) if ``text`` is new; ``False`` for a duplicate."""
        key = normalize_for_dedup(text)
        if key in self._seen:
            self.rejected += 1
            return False
        self._seen.add(key)
        return True


class SeedFormat:
    """What all seeds share at their start and end, to anchor generated items to it.

    ``prefix`` is the seeds' common opening cut back to a line start and extended by a
    leading ``"Label:"`` of the next line, so ``"Tables: ...\\nQuestion: What is ..."`` and
    ``"...\\nQuestion: How many ..."`` share ``"Tables: ...\\nQuestion:"`` (a shared first word
    of the question is left to the generator; the space after the colon too, since a prompt
    ending in a space splits the next word into unusual tokens). ``suffix`` is the common ending from its last
    line break, or from its last space when it has none (``"...]) ->"`` gives ``" ->"``).
    Either is ``""`` when the seeds share nothing at that end, and both are ``""`` for a
    single seed (nothing to compare).

    Example:
        >>> f = SeedFormat(["Question: Ann has 3 pens.\\nAnswer:", "Question: Bo has 2 cats.\\nAnswer:"])
        >>> f.prefix, f.suffix
        ('Question:', '\\nAnswer:')
        >>> f.parse(" Cy has 4 hats.\\nAnswer: 4 hats\\n7. Question:")
        'Question: Cy has 4 hats.\\nAnswer:'
    """

    def __init__(self, seeds: Sequence[str]) -> None:
        cleaned = [s.strip() for s in seeds]
        if len(cleaned) < 2:
            self.prefix = self.suffix = ""
            return
        head = os.path.commonprefix(cleaned)
        line_start = head.rfind("\n") + 1
        label = re.match(r"[A-Za-z][\w ]{0,30}:(?= )", head[line_start:])  # no trailing space: the model writes it
        self.prefix = head[:line_start] + (label.group(0) if label else "")
        tail = os.path.commonprefix([s[::-1] for s in cleaned])[::-1]
        cut = tail.find("\n")
        self.suffix = tail[cut:] if cut >= 0 else tail[tail.rfind(" "):] if " " in tail else ""
        if self.prefix and self.suffix and len(self.prefix) + len(self.suffix) > min(map(len, cleaned)):
            self.suffix = ""  # they overlap in the shortest seed: keep the opening only

    def parse(self, completion: str, **limits: int) -> str | None:
        """The anchored item of a completion of ``seed_list_prompt(..., opening=self.prefix)``.

        The prefix is put back in front, :func:`parse_generation` takes the item, and it is cut
        right after its first ``suffix`` (an item without the suffix is ``None``).
        """
        item = parse_generation(self.prefix + completion, **limits)
        if item is None or not self.suffix:
            return item
        end = item.find(self.suffix, len(self.prefix.rstrip()))
        return item[: end + len(self.suffix)] if end >= 0 else None

    def __repr__(self) -> str:
        return f"SeedFormat(prefix={self.prefix!r}, suffix={self.suffix!r})"

