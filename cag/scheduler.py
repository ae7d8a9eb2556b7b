"""Continuous batching: one thread per knowledge base decodes every answer in progress on it, one step for all.

Why: decoding reads every weight once per step, whether for one answer or for many, so answers decoded
together cost little more than one. An answer that arrives while others are decoding joins at the next
step (after its question prefill, run by the same thread between two steps); one that ends (end of turn,
max_new_tokens, its consumer gone) leaves it, and its row goes back to the decoder. Every row is computed
as it would be alone (cag.engines.base.Decoder), so joining changes no answer's tokens.

The path is chosen by the caller: KnowledgeBase.ask(batching=Batching(...)) hands the answer to the
knowledge base's Scheduler; without it an answer decodes inline in its caller's thread (cag.decode).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

from .engines.base import Decoder, Job

IDLE_S = 5.0  # a scheduler thread with nothing to do ends after this long (the next answer starts another)
_END = object()


@dataclass(frozen=True)
class Batching:
    """How answers join: at most `max_batch` rows per step; an idle scheduler that gets an answer waits up
    to `window_s` (or until `max_batch` have arrived) before its first step, so answers that arrive close
    together start together. A running batch takes newcomers at its next step without waiting."""

    max_batch: int = 32
    window_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {self.max_batch})")
        if self.window_s < 0:
            raise ValueError(f"the batch window must not be negative (got {self.window_s} s)")


@dataclass
class _Ticket:
    job: Job
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    gone: bool = False  # its consumer stopped reading: leave at the next step


class Scheduler:
    """The rows in progress on one prefix and the thread that steps them."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self._cond = threading.Condition()
        self._waiting: deque[_Ticket] = deque()
        self._thread: threading.Thread | None = None
        self._max_batch = 1
        self._window_s = 0.0
        self.steps = 0  # decoding steps run, with `rows_stepped` rows in all (for tests and metrics)
        self.rows_stepped = 0
        self.rows = 0  # answers in the batch now

    def answer(self, job: Job, batching: Batching) -> Iterator[int]:
        """Queue `job` and yield its tokens as they are produced; closing the generator makes it leave."""
        ticket = _Ticket(job)
        with self._cond:
            self._max_batch, self._window_s = batching.max_batch, batching.window_s
            self._waiting.append(ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cag-batch", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            while (item := ticket.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            ticket.gone = True

    def _run(self) -> None:
        active: list[_Ticket] = []
        try:
            while True:
                with self._cond:
                    while not self._waiting and not active:
                        if not self._cond.wait(IDLE_S) and not self._waiting:
                            self._thread = None
                            return
                    if not active and self._window_s > 0:  # a fresh batch: let close arrivals start together
                        deadline = time.monotonic() + self._window_s
                        while len(self._waiting) < self._max_batch and (left := deadline - time.monotonic()) > 0:
                            self._cond.wait(left)
                    slots = max(0, self._max_batch - len(active))
                while slots > 0 and (ticket := self._next(bool(active))) is not None:
                    slots -= 1
                    if self._start(ticket):
                        active.append(ticket)
                active = self._leave(active)
                if active:
                    self._step(active)
                    active = self._leave(active)
                self.rows = len(active)
        except BaseException as err:  # noqa: BLE001 - never leave a consumer waiting forever
            with self._cond:
                stranded = active + list(self._waiting)
                self._waiting.clear()
                self._thread = None
                self.rows = 0
            for ticket in stranded:
                self.decoder.finish(ticket.job)
                ticket.out.put(err)
            raise

    def _next(self, busy: bool) -> _Ticket | None:
        """The first waiting answer, if the decoder has room for it now (while rows run, one that does not
        fit waits for them to end; with none running it starts, and is refused if it can never fit)."""
        with self._cond:
            if not self._waiting or (busy and not self.decoder.admits(self._waiting[0].job)):
                return None
            return self._waiting.popleft()

    def _start(self, ticket: _Ticket) -> bool:
        """The question prefill and first token; False when the answer is already over."""
        if ticket.gone:
            ticket.out.put(_END)
            return False
        try:
            token = self.decoder.start(ticket.job)
        except Exception as err:  # noqa: BLE001 - this answer's failure is its consumer's to raise
            self.decoder.finish(ticket.job)
            ticket.out.put(err)
            return False
        if not self._deliver(ticket, token):
            self.decoder.finish(ticket.job)
            return False
        return True

    def _step(self, active: list[_Ticket]) -> None:
        try:
            tokens = self.decoder.step([t.job for t in active])
        except Exception as err:  # noqa: BLE001 - the step failed for every row in it
            for ticket in active:
                ticket.job.done = True
                ticket.out.put(err)
            return
        self.steps += 1
        self.rows_stepped += len(active)
        for ticket, token in zip(active, tokens):
            self._deliver(ticket, token)

    def _deliver(self, ticket: _Ticket, token: int | None) -> bool:
        """Hand a token to the consumer; True while the answer goes on."""
        if token is not None:
            ticket.out.put(token)
        if token is None or ticket.job.done:
            ticket.job.done = True
            ticket.out.put(_END)
            return False
        return True

    def _leave(self, active: list[_Ticket]) -> list[_Ticket]:
        """Rows that are done or whose consumer left give their buffers back."""
        staying = []
        for ticket in active:
            if ticket.job.done or ticket.gone:
                self.decoder.finish(ticket.job)
            else:
                staying.append(ticket)
        return staying
