"""Progress reports that read well both in a terminal and in a log file: one helper for every loop.

In a terminal (stderr is a TTY) a tqdm bar redraws itself in place. Anywhere else -- CI, ``nohup``, ``2> log`` --
carriage-return redraws leave one unreadable line per update, so :class:`LineProgress` instead prints a plain line
every ``every`` seconds (default ``$NESTED_LEARNING_PROGRESS_EVERY`` or 30 s) and one when the loop ends:

    train hope: 120/300 (40%), 95 s, ~142 s left, loss=3.214, tok_s=1,234

``progress(...)`` takes the tqdm arguments the package uses (iterable, total, desc, initial, disable, unit, leave)
and returns an object with tqdm's ``update``, ``set_postfix``, ``set_postfix_str``, ``close``, iteration and
``with``. ``write(msg)`` prints a message without breaking a bar.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any

ENV_EVERY = "NESTED_LEARNING_PROGRESS_EVERY"
DEFAULT_EVERY = 30.0


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def report_every() -> float:
    """Seconds between two progress lines when stderr is not a terminal."""
    raw = os.environ.get(ENV_EVERY)
    if raw is None:
        return DEFAULT_EVERY
    try:
        value = float(raw)
    except ValueError as err:
        raise ValueError(f"${ENV_EVERY} must be a number of seconds, got {raw!r}") from err
    if not value >= 0:
        raise ValueError(f"${ENV_EVERY} must be >= 0 seconds, got {raw!r}")
    return value


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0,
             disable: bool = False, unit: str = "it", leave: bool = True, **tqdm_kwargs):
    """A tqdm bar in a terminal, a :class:`LineProgress` elsewhere (same calls)."""
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, unit=unit, leave=leave,
                    dynamic_ncols=True, **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, disable=disable, unit=unit)


def write(message: str) -> None:
    """Print ``message`` on its own line (above a live bar in a terminal)."""
    from tqdm.auto import tqdm

    tqdm.write(message)


class LineProgress:
    """tqdm's interface, printing ``desc: n/total (p%), elapsed, ~left, postfix`` every ``every`` seconds."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0,
                 disable: bool = False, unit: str = "it", every: float | None = None, file=None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.start_n, self.disable = initial, initial, disable
        self.every = report_every() if every is None else float(every)
        self.file = file
        self.postfix = ""
        self._pending = False
        self.t0 = self.last = time.monotonic()
        self.closed = False

    # ------------------------------------------------------------ tqdm's calls
    def __iter__(self):
        if self.iterable is None:
            raise TypeError("this progress report was made without an iterable")
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; a line that is due waits for the ``set_postfix`` that usually follows (so it shows
        this step's values) or is printed at the next update."""
        self.n += n
        if self._pending:
            self._emit()
        elif time.monotonic() - self.last >= self.every:
            self._pending = True

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in items.items()), refresh)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)
        if refresh and self._pending:
            self._emit()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:
                self._print(time.monotonic(), final=True)

    # ------------------------------------------------------------ the line
    def line(self, now: float | None = None, final: bool = False) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.t0
        done = self.n - self.start_n
        parts = [f"{self.n}/{self.total}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{elapsed:.0f} s" + (" (done)" if final else ""))
        if not final and self.total and done > 0 and self.n < self.total:
            parts.append(f"~{elapsed / done * (self.total - self.n):.0f} s left")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " + ", ".join(parts) if self.desc else ", ".join(parts)

    def _emit(self) -> None:
        self._pending = False
        self.last = time.monotonic()
        if not (self.total and self.n >= self.total):  # the last line is close()'s
            self._print(self.last)

    def _print(self, now: float, final: bool = False) -> None:
        if self.disable:
            return
        print(self.line(now, final), file=self.file if self.file is not None else sys.stderr, flush=True)
