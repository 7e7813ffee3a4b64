"""How long a failed delivery waits before it is handed back to its queue (both bus adapters)."""

from __future__ import annotations

import random


def retry_delay(failures_before: int, base: float, maximum: float) -> float:
    """Exponential backoff with jitter: about ``base * 2**failures_before`` seconds, capped at ``maximum``.

    The jitter (50-100 % of the step) keeps a burst of failed messages from retrying in lockstep.
    """
    step = min(maximum, base * 2.0 ** min(failures_before, 32))
    return step * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not cryptography
