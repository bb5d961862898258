"""Progress display for long loops: a tqdm bar on a terminal, plain lines anywhere else.

A carriage-return bar written into a log file or a CI console turns into one long line of
overwritten text, so when the stream is not a terminal the same information is printed as one
plain line every `every` steps (and at the last step). On a terminal the bar is refreshed at most
once per step: the postfix is set without a refresh and `update()` redraws."""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`update(**postfix)` once per step; `close()` at the end.

    enabled: show anything at all; every: steps between plain lines (non-terminal streams);
    stream: where to write (default sys.stderr, tqdm's default); terminal: override the stream's
    isatty() (tests)."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, enabled: bool = True, every: int = 10,
                 stream=None, terminal: bool | None = None):
        if every < 1:
            raise ValueError(f"every: must be >= 1, got {every}")
        self.total, self.desc, self.n, self.every = total, desc, initial, every
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        if terminal is None:
            isatty = getattr(self.stream, "isatty", None)
            terminal = bool(isatty and isatty())
        self.terminal = terminal
        self._bar = None
        self._start, self._start_n = time.perf_counter(), initial
        if enabled and terminal:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False,
                             file=self.stream)

    def update(self, **postfix) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(refresh=False, **postfix)  # one redraw per step: update()'s
            self._bar.update()
            return
        if self.n % self.every == 0 or self.n == self.total:
            elapsed = time.perf_counter() - self._start
            done = self.n - self._start_n
            eta = elapsed / done * (self.total - self.n) if done else 0.0
            fields = " ".join(f"{k} {v}" for k, v in postfix.items())
            pct = 100.0 * self.n / self.total if self.total else 100.0
            self.stream.write(f"{self.desc} step {self.n}/{self.total} ({pct:.0f}%) {fields} "
                              f"elapsed {_clock(elapsed)} eta {_clock(eta)}\n".replace("  ", " "))
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
