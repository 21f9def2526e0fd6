"""One long-lived watchdog thread that terminates ONNX Runtime calls running past their time limit.

A call arms the watchdog with its `onnxruntime.RunOptions` and the seconds it may take; when it
returns it disarms it. The thread sleeps until the earliest armed limit and then sets that call's
`RunOptions.terminate`, which ONNX Runtime checks between kernels, so the call raises and the
caller reports a timeout. Arming costs a lock, a heap push and, when the new limit is the earliest,
a notify: microseconds, where a `threading.Timer` per call started a thread (~1 ms a call, 20x a
small model's call). Disarmed entries are removed lazily; the heap is rebuilt from the armed calls
whenever it holds more than twice as many entries as there are armed calls (amortised O(1)).
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time


class Watchdog:
    """Terminates armed calls whose limit has passed (see the module doc)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, tuple[float, object]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self.terminated = 0  # calls this watchdog terminated

    def arm(self, seconds: float, options) -> int:
        """Watch one call: set `options.terminate` once `seconds` have passed. Returns a token for `disarm`."""
        due = time.monotonic() + float(seconds)
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = (due, options)
            heapq.heappush(self._heap, (due, token))
            if len(self._heap) > 2 * len(self._armed) + 64:
                self._heap = [(d, t) for t, (d, _) in self._armed.items()]
                heapq.heapify(self._heap)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="trojan-gate-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == token:
                self._cond.notify()
        return token

    def disarm(self, token: int):
        """The call returned: forget it."""
        with self._cond:
            self._armed.pop(token, None)

    def armed(self) -> int:
        """How many calls are being watched."""
        with self._cond:
            return len(self._armed)

    def _loop(self):
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                due, token = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                _, options = self._armed.pop(token)
                options.terminate = True
                self.terminated += 1


WATCHDOG = Watchdog()  # shared by every oracle of the process
