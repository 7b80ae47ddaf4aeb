"""Continuous batching over one llama.cpp context: the only thread that touches it.

Each step builds one ``llama_batch`` holding the next token of every decoding sequence plus a
chunk of the prompts being prefilled, runs one ``llama_decode``, then samples each sequence
with its own sampler chain. New requests join at any step; cancelled ones leave at the next.
A slot keeps the tokens its KV cache holds, so a follow-up turn that shares a prefix only
processes the new tokens.
"""

from __future__ import annotations

import codecs
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.engine.job import Job, Outbox
from appliance.engine.native import NativeModel, Sampler
from appliance.engine.protocol import Finish, FinishReason, TextDelta
from appliance.engine.stops import StopBuffer
from appliance.errors import OverloadedError

__all__ = ["BatchScheduler", "Job", "SchedulerStats"]

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Sequence:
    job: Job
    sampler: Sampler
    prompt: list[int]
    prefilled: int  # prompt tokens already in the KV cache
    cached: int  # prompt tokens reused from an earlier request
    checkpoint_at: int  # prompt position to snapshot at (recurrent models), or -1
    stops: StopBuffer
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    last_token: int = -1
    generated: int = 0
    unreported: int = 0  # tokens sampled since the last TextDelta


@dataclass(slots=True)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what this slot's KV cache holds
    seq: _Sequence | None = None
    last_used: float = 0.0
    # (position, state) snapshots of the non-truncatable part of the state, oldest first.
    checkpoints: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerStats:
    running: int = 0
    queued: int = 0
    tokens_generated: int = 0
    prompt_tokens_processed: int = 0
    prompt_tokens_cached: int = 0


class BatchScheduler:
    """Owns a NativeModel's context; ``submit`` is thread-safe, everything else runs inside."""

    def __init__(
        self,
        native: NativeModel,
        *,
        max_queue: int,
        prefill_chunk: int = 256,
        name: str = "",
        checkpoint_offset: int = 8,
        max_checkpoints: int = 3,
    ) -> None:
        self.native = native
        self.max_queue = max_queue
        self.prefill_chunk = max(1, min(prefill_chunk, native.n_batch))
        self.slots = [_Slot(seq_id=i) for i in range(native.n_seq)]
        # A follow-up turn re-renders the end of the previous prompt differently (e.g. the
        # opened think block), so the snapshot sits a few tokens before the prompt's end.
        self.checkpoint_offset = checkpoint_offset
        self.max_checkpoints = max_checkpoints
        self.stats = SchedulerStats()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        # Events of one step go to the event loop together (scheduler thread only).
        self._outbox = Outbox()
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- called from the event loop -------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            # Jobs that free slots will take at the next step are not "waiting".
            free = sum(1 for s in self.slots if s.seq is None)
            if len(self._queue) >= self.max_queue + free:
                raise OverloadedError(
                    "The server is busy: too many requests are waiting. Retry shortly.",
                    retry_after=2,
                )
            self._queue.append(job)
            self.stats.queued = len(self._queue)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    @property
    def idle(self) -> bool:
        return not self._queue and all(s.seq is None for s in self.slots)

    # -- the scheduler thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._queue and self._active() == 0:
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._admit()
                self._step()
                self._outbox.flush()
        except Exception:  # a bug here must not hang clients: fail everything and log it
            _log.exception("engine scheduler crashed")
            self._fail_all("The engine failed; see the server log.")
        finally:
            with self._cond:
                queued = list(self._queue)
                self._queue.clear()
            for job in queued:
                job.finish_unstarted("cancelled", "the server is shutting down")
            for slot in self.slots:
                if slot.seq is not None:
                    self._finish(slot, "cancelled")
            self._outbox.flush()

    def _active(self) -> int:
        return sum(1 for s in self.slots if s.seq is not None)

    def _next_job(self) -> Job:
        """Fair between owners: the oldest job of the owner with the fewest running sequences."""
        running: dict[str, int] = {}
        for s in self.slots:
            if s.seq is not None:
                owner = s.seq.job.request.owner
                running[owner] = running.get(owner, 0) + 1
        best = min(
            range(len(self._queue)),
            key=lambda i: (running.get(self._queue[i].request.owner, 0), i),
        )
        job = self._queue[best]
        del self._queue[best]
        return job

    def _admit(self) -> None:
        """Move queued jobs into free slots, reusing the longest cached prefix (lock held)."""
        while self._queue:
            free = [s for s in self.slots if s.seq is None]
            if not free:
                break
            job = self._next_job()
            if job.cancelled:
                job.finish_unstarted("cancelled")  # the client left while queued
                continue
            prompt = job.request.prompt
            slot = max(free, key=lambda s: (_common_prefix(s.tokens, prompt), -s.last_used))
            self._start(slot, job)
        self.stats.queued = len(self._queue)
        self.stats.running = self._active()

    def _start(self, slot: _Slot, job: Job) -> None:
        prompt = job.request.prompt
        keep = self._reuse_prefix(slot, min(_common_prefix(slot.tokens, prompt), len(prompt) - 1))
        checkpoint_at = -1
        if self.native.needs_checkpoints:
            checkpoint_at = len(prompt) - self.checkpoint_offset
            if checkpoint_at <= keep:
                checkpoint_at = -1
        sp = job.request.sampling
        try:
            sampler = Sampler(
                self.native,
                temperature=sp.temperature,
                top_k=sp.top_k,
                top_p=sp.top_p,
                min_p=sp.min_p,
                seed=sp.seed,
                repeat_penalty=sp.repeat_penalty,
                frequency_penalty=sp.frequency_penalty,
                presence_penalty=sp.presence_penalty,
                grammar=sp.grammar,
            )
        except ValueError as exc:
            job.finish_unstarted("error", str(exc))
            return
        slot.seq = _Sequence(
            job=job,
            sampler=sampler,
            prompt=prompt,
            prefilled=keep,
            cached=keep,
            checkpoint_at=checkpoint_at,
            stops=StopBuffer(job.request.stop),
        )
        self.stats.prompt_tokens_cached += keep

    def _reuse_prefix(self, slot: _Slot, wanted: int) -> int:
        """Cut the slot's cache back to ``wanted`` tokens where possible; return what is kept."""
        native = self.native
        keep = wanted
        if keep < len(slot.tokens) and not native.seq_rm(slot.seq_id, keep, -1):
            # Recurrent state cannot be cut back: restore the newest snapshot at or before
            # ``wanted``, then drop the attention cache past it.
            keep = 0
            for pos, state in reversed(slot.checkpoints):
                if 0 < pos <= wanted and native.restore_partial_state(slot.seq_id, state):
                    if native.seq_rm(slot.seq_id, pos, -1):
                        keep = pos
                    break
            if keep == 0:
                native.seq_rm(slot.seq_id, -1, -1)
        slot.checkpoints = [(p, st) for p, st in slot.checkpoints if p <= keep]
        del slot.tokens[keep:]
        return keep

    def _step(self) -> None:
        native = self.native
        batch = native.batch
        n = 0
        samplers: list[tuple[_Slot, int]] = []
        for slot in self.slots:
            seq = slot.seq
            if seq is None:
                continue
            if seq.job.cancelled:
                self._finish(slot, "cancelled")
                continue
            if seq.prefilled >= len(seq.prompt):  # decoding: feed the last sampled token
                n = _put(batch, n, seq.last_token, len(slot.tokens), slot.seq_id, True)
                slot.tokens.append(seq.last_token)
                samplers.append((slot, n - 1))
        decoding = n
        budget = native.n_batch - n
        if decoding:
            # Keep running streams moving: a long prompt is fed in chunks between their tokens.
            budget = min(budget, self.prefill_chunk)
        for slot in self.slots:
            seq = slot.seq
            if seq is None or seq.prefilled >= len(seq.prompt) or budget <= 0:
                continue
            take = min(budget, len(seq.prompt) - seq.prefilled)
            if seq.checkpoint_at > seq.prefilled:
                take = min(take, seq.checkpoint_at - seq.prefilled)
            for token in seq.prompt[seq.prefilled : seq.prefilled + take]:
                last = seq.prefilled + 1 == len(seq.prompt)
                n = _put(batch, n, token, len(slot.tokens), slot.seq_id, last)
                slot.tokens.append(token)
                seq.prefilled += 1
            budget -= take
            self.stats.prompt_tokens_processed += take
            if seq.prefilled == len(seq.prompt):
                samplers.append((slot, n - 1))
        if n == 0:
            return
        batch.n_tokens = n
        rc = native.decode()
        if rc != 0:
            _log.error("llama_decode returned %d", rc)
            for slot in self.slots:
                if slot.seq is not None:
                    self._finish(slot, "error", f"llama_decode failed ({rc})")
                    native.seq_rm(slot.seq_id, -1, -1)
                    slot.tokens.clear()
            return
        for slot in self.slots:
            seq = slot.seq
            if seq is not None and seq.prefilled == seq.checkpoint_at:
                self._checkpoint(slot, seq)
        for slot, index in samplers:
            self._sample(slot, index)

    def _checkpoint(self, slot: _Slot, seq: _Sequence) -> None:
        seq.checkpoint_at = -1
        slot.checkpoints.append((seq.prefilled, self.native.save_partial_state(slot.seq_id)))
        del slot.checkpoints[: -self.max_checkpoints]

    def _sample(self, slot: _Slot, index: int) -> None:
        seq = slot.seq
        assert seq is not None
        native = self.native
        token = seq.sampler.sample(native, index)
        seq.generated += 1
        seq.unreported += 1
        self.stats.tokens_generated += 1
        request = seq.job.request
        eog = native.is_eog(token)
        if eog and not request.ignore_eos:
            self._finish(slot, "stop")
            return
        seq.last_token = token
        # An ignored end-of-generation token is fed back but adds no text.
        piece = b"" if eog else native.token_piece(token)
        text = seq.stops.push(seq.decoder.decode(piece))
        if seq.stops.stopped:
            self._emit_text(seq, text)
            self._finish(slot, "stop")
            return
        self._emit_text(seq, text)
        limit_hit = seq.generated >= request.max_tokens or (
            request.deadline > 0 and time.monotonic() > request.deadline
        )
        context_full = len(slot.tokens) + 1 >= native.n_ctx_seq
        if limit_hit or context_full:
            self._finish(slot, "length")

    def _emit_text(self, seq: _Sequence, text: str) -> None:
        if text:
            self._outbox.put(seq.job, TextDelta(text=text, tokens=seq.unreported))
            seq.unreported = 0

    def _finish(self, slot: _Slot, reason: FinishReason, message: str = "") -> None:
        seq = slot.seq
        assert seq is not None
        if reason in ("stop", "length"):
            tail = seq.stops.push(seq.decoder.decode(b"", final=True))
            tail += seq.stops.flush()
            self._emit_text(seq, tail)
        seq.sampler.close()
        self._outbox.put(
            seq.job,
            Finish(
                reason=reason,
                prompt_tokens=len(seq.prompt),
                completion_tokens=seq.generated,
                cached_tokens=seq.cached,
                message=message,
            ),
        )
        slot.seq = None
        slot.last_used = time.monotonic()
        self.stats.running = self._active()

    def _fail_all(self, message: str) -> None:
        with self._cond:
            queued = list(self._queue)
            self._queue.clear()
        for job in queued:
            job.finish_unstarted("error", message)
        for slot in self.slots:
            if slot.seq is not None:
                self._finish(slot, "error", message)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _put(batch: Any, n: int, token: int, pos: int, seq_id: int, logits: bool) -> int:
    """Append one token to a llama_batch (a ctypes struct); return the new token count."""
    batch.token[n] = token
    batch.pos[n] = pos
    batch.n_seq_id[n] = 1
    batch.seq_id[n][0] = seq_id
    batch.logits[n] = logits
    return n + 1
