"""'k of N' progress lines with an estimate of the time left, for commands that run many similar
steps (the demo's models, an evaluation's tasks). One line a step, no carriage returns: the lines
read the same in a terminal and in a piped log."""
import time
from typing import Callable


def duration(seconds: float) -> str:
    """'about 8 s', 'about 2.5 min', 'about 1.2 h', 'under a second': as rough as an estimate is."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    return f"about {seconds / 60:.1f} min" if seconds < 5400 else f"about {seconds / 3600:.1f} h"


class Progress:
    """Says `PREFIX: k of N: WHAT` after each step, with `about T left`: the mean time of the steps
    that ran (a cached step is said but not timed) times the steps still to come. The first timed
    step carries the start-up (imports, lm-eval's first tasks: 5 of the micro demo's 22 s), so once
    others ran it is left out of the mean."""

    def __init__(self, *, total: int, say: Callable[[str], None], prefix: str, clock=time.monotonic):
        self.total, self.say, self.prefix, self.clock = total, say, prefix, clock
        self.done, self.timed, self.seconds, self.first = 0, 0, 0.0, 0.0
        self.last = clock()

    def step(self, what: str, *, timed: bool = True) -> None:
        now = self.clock()
        self.done += 1
        if timed:
            self.timed, self.seconds = self.timed + 1, self.seconds + (now - self.last)
            self.first = self.first or self.seconds
        self.last = now
        left = self.total - self.done
        mean = (self.seconds - self.first) / (self.timed - 1) if self.timed > 1 else self.seconds
        estimate = f"; {duration(mean * left)} left" if self.timed and left > 0 else ""
        self.say(f"{self.prefix}: {self.done} of {self.total}: {what}{estimate}")
