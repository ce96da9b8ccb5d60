"""
C{general.tls_rate_limit_per_second}: at most that many client TLS handshakes start per
second; the others wait for their turn (nobody is refused), as in PgDoorman, so a reconnect
storm of TLS clients cannot spend all the CPU on handshakes while established clients wait.

PgDoorman releases C{rate / 100} handshakes every 10 ms; this is the same budget as a generic
cell rate algorithm (GCRA) with a burst of C{rate / 100}: one computation per SSLRequest, no
timer unless a client has to wait.  0 means no limit.
"""

from __future__ import annotations

import time

__all__ = ["HandshakeLimiter", "limiter"]


class HandshakeLimiter:
    """
    C{delay(rate)} reserves the next handshake slot and returns how many seconds its client
    must wait for it (0.0 at once).
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._tat = 0.0  # theoretical arrival time of the next handshake
        #: handshakes that had to wait (for SHOW/metrics and tests).
        self.delayed = 0

    def delay(self, rate: int) -> float:
        if not rate or rate <= 0:
            return 0.0
        now = self._clock()
        interval = 1.0 / rate
        burst = max(1, rate // 100)
        tat = max(self._tat, now)
        wait = tat - (burst - 1) * interval - now
        self._tat = tat + interval
        if wait > 0:
            self.delayed += 1
            return wait
        return 0.0


#: The process-wide limiter for client handshakes.
limiter = HandshakeLimiter()
