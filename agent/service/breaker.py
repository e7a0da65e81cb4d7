"""When analysing fails for reasons outside the stack: retry, then stop taking stacks for a while.

A `StackError` is a verdict on a stack's bytes (failed/, an error once). Anything else raised
while decoding or running the models (MemoryError, a runtime that breaks, an OSError of the
machine) says more about the agent's surroundings than about the stack: failing every stack
for it would file good data away as bad. So such a stack is kept and tried again after a
pause, up to `per_stack` times (after that the stack itself is the likeliest cause and it
fails for good); and after `threshold` such failures in a row, whatever the stacks, the
agent is `degraded`: it takes no stack for `pause` seconds, reports it (log, stats, systemd
STATUS=), then tries again. Any success closes the breaker.

Pure: no threads and no clock of its own; every call is given `now`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Breaker:
    threshold: int = 5  # unexpected failures in a row before the agent stops taking stacks
    pause: float = 60.0  # how long it stops
    per_stack: int = 3  # attempts of one stack before it fails for good
    retry_after: float = 5.0  # pause before the same stack is tried again
    in_a_row: int = 0
    open_until: float = 0.0
    tries: dict[str, int] = field(default_factory=dict)  # stack key -> unexpected failures

    def failed(self, key: str, now: float) -> float | None:
        """An unexpected failure of stack `key`: when to try it again, or None to fail it for good."""
        self.in_a_row += 1
        if self.in_a_row >= self.threshold:
            self.open_until = now + self.pause
            self.in_a_row = 0
        self.tries[key] = self.tries.get(key, 0) + 1
        if self.tries[key] >= self.per_stack:
            del self.tries[key]
            return None
        return max(now + self.retry_after, self.open_until)

    def succeeded(self, key: str) -> None:
        self.in_a_row = 0
        self.open_until = 0.0
        self.tries.pop(key, None)

    def degraded(self, now: float) -> bool:
        """Stacks are not taken now."""
        return now < self.open_until
