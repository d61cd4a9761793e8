"""Class-incremental text-classification streams (paper Fig 6) from the installed classification sets.

A benchmark's classes are shuffled with a seed and cut into ``n_tasks`` tasks of disjoint classes; task i holds
``train_per_class`` training and ``test_per_class`` test examples of each of its classes (drawn, seeded, from the
package's own train and test splits, so no test text is ever trained on). Tasks arrive in order; a learner never
sees the classes of a later task before it arrives.

Texts become language-model prompts (see :func:`format_example`): ``"<text> =>"`` followed by the label *name*
``" <label name>\\n"``; the newline closes the label so that a label that is a prefix of another ("card" and
"card arrival") is still a different string.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# Benchmark name -> set name in the installed package (check with ``available_sets()``).
BENCHMARKS = {"clinc": "clinc", "banking": "banking", "dbpedia": "DBPedia"}
PROMPT_SEPARATOR = " =>"
LABEL_END = "\n"


@dataclasses.dataclass
class CLTask:
    index: int
    classes: list[str]  # raw label strings of this task
    train: list[tuple[str, str]]  # (text, raw label)
    test: list[tuple[str, str]]


@dataclasses.dataclass
class CLStream:
    benchmark: str
    tasks: list[CLTask]
    label_names: dict[str, str]  # raw label -> the natural-language name used in prompts

    def classes_up_to(self, i: int) -> list[str]:
        """Raw labels of tasks 0..i: the candidate set after learning task i (class-incremental)."""
        return [c for t in self.tasks[: i + 1] for c in t.classes]


def label_name(raw: str) -> str:
    """``"insurance_change"`` -> ``"insurance change"``, ``"FilmFestival"`` -> ``"film festival"``."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", raw.replace("_", " ").replace("-", " "))
    return " ".join(spaced.lower().split())


def format_example(text: str, name: str | None = None) -> tuple[str, str]:
    """(prompt, continuation) of one example; the continuation is ``""`` when ``name`` is None (a query)."""
    prompt = " ".join(text.split()) + PROMPT_SEPARATOR
    return prompt, ("" if name is None else f" {name}{LABEL_END}")


def make_stream(
    benchmark: str,
    n_tasks: int = 5,
    classes_per_task: int | None = None,
    train_per_class: int = 16,
    test_per_class: int = 8,
    seed: int = 0,
) -> CLStream:
    """A class-incremental stream over ``benchmark`` (``"clinc"``, ``"banking"``, ``"dbpedia"``, or any other
    installed classification set by its folder name, e.g. ``"hwu"``).

    ``classes_per_task=None`` uses all classes (the last ``n_classes % n_tasks`` are dropped so tasks are equal).
    Classes with fewer examples than asked contribute what they have.
    """
    from nested_learning.data import load_classification_set
    from nested_learning.data.corpus import available_sets

    key = benchmark.lower()
    sets = available_sets()
    name = BENCHMARKS.get(key) or next((s for s in sets if s.lower() == key), None)
    if name is None:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {sorted(BENCHMARKS)} or a set of {sets}")
    train = load_classification_set(name, "train")
    test = load_classification_set(name, "test")
    classes = sorted({label for _, label in train} & {label for _, label in test})
    rng = np.random.default_rng([seed, 7])
    order = [classes[i] for i in rng.permutation(len(classes))]
    per_task = classes_per_task or len(order) // n_tasks
    if per_task < 1 or per_task * n_tasks > len(order):
        raise ValueError(f"{benchmark} has {len(order)} classes: cannot make {n_tasks} tasks of {per_task}")
    by_class_train = _group(train)
    by_class_test = _group(test)
    names = {c: label_name(c) for c in order}
    tasks = []
    for i in range(n_tasks):
        task_classes = order[i * per_task : (i + 1) * per_task]
        tr = _sample(by_class_train, task_classes, train_per_class, rng)
        te = _sample(by_class_test, task_classes, test_per_class, rng)
        tasks.append(CLTask(i, task_classes, tr, te))
    return CLStream(key, tasks, names)


def _group(rows: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for text, label in rows:
        out.setdefault(label, []).append(text)
    return out


def _sample(by_class: dict[str, list[str]], classes: list[str], k: int, rng) -> list[tuple[str, str]]:
    """k examples per class, seeded, then shuffled so classes of a task are interleaved."""
    rows = []
    for c in classes:
        texts = by_class[c]
        idx = rng.choice(len(texts), min(k, len(texts)), replace=False)
        rows += [(texts[j], c) for j in idx]
    return [rows[j] for j in rng.permutation(len(rows))]
