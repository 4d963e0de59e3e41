"""One attempt at a shard, fenced against the other attempts at it.

A cluster of preemptible workers runs some shards more than once: the scheduler
declares a silent worker lost and re-runs its shard elsewhere, but the "lost" worker
may only have been paused and resume later (a zombie); a flow killed and re-run
leaves its old shard tasks running on the workers. Every attempt at a shard writes
the same files (an image's path and bytes follow from its seed), so the protocol
only has to make sure that no attempt undoes another's commit:

1. `begin_shard` claims the shard (`.attempts/NNNNN` holds the attempt's token; the
   newest claim wins) and returns None when the shard is already committed: another
   attempt finished it, which is not a failure.
2. Before each write the attempt checks that its claim still stands, re-reading it
   when the last check is over `FENCE_FRESH_S` old (a paused process always is when
   it resumes). An attempt whose claim was taken over raises `ShardSuperseded`
   before writing anything more.
3. The commit re-reads the claim and the writer lease, writes the sidecar and creates
   the part only if it is absent (a hard link on a local disk, `If-None-Match: *` on
   S3): a late commit never replaces a committed part. When it finds a part already
   there it leaves it and puts back that part's own checksum in the sidecar.
4. Only after its own commit does an attempt delete anything: files in the shard's
   folder that its part does not name (leftovers of earlier interrupted attempts),
   stale temp files, and its claim. Nothing is deleted before a commit, so no
   attempt can delete another's committed images.

What is left: a pause that lands exactly between a claim check and the write right
after it lets that one write through late. It writes the bytes the committing
attempt wrote (same seed, same bytes); on hardware whose kernels are not
bit-reproducible it could differ, and the audit's checksums name the image.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import pyarrow as pa

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.writer import DatasetWriter

FENCE_FRESH_S = 1.0  # a claim checked this recently is trusted (well under a worker TTL)


class ShardSuperseded(Exception):
    """Another attempt claimed or committed this shard; this one stopped writing."""


class ShardAttempt:
    """One attempt's writes to one shard: images, then the commit."""

    def __init__(self, writer: DatasetWriter, shard: int) -> None:
        self.writer = writer
        self.shard = shard
        self.token = uuid.uuid4().hex
        self._checked_at = -float("inf")

    @property
    def claim_path(self) -> str:
        return self.writer.path(layout.attempt_claim(self.shard))

    # --- the fence ------------------------------------------------------------------------

    def claim(self) -> None:
        record = {"attempt": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                  "started_at": time.time()}  # fmt: skip
        self.writer.write_bytes(
            layout.attempt_claim(self.shard), json.dumps(record).encode(), durable=False
        )
        self._checked_at = time.monotonic()

    def holds_claim(self) -> bool:
        """Whether the shard's claim is still this attempt's (a fresh read)."""
        fs = self.writer.fs
        fs.invalidate_cache(self.claim_path)
        try:
            raw = fs.cat_file(self.claim_path)
            return json.loads(raw).get("attempt") == self.token
        except (FileNotFoundError, ValueError, AttributeError):
            return False  # gone (the shard was committed) or half-written: not ours

    def check(self, force: bool = False) -> None:
        """Raise ShardSuperseded unless this attempt still holds the shard's claim."""
        now = time.monotonic()
        if not force and now - self._checked_at < FENCE_FRESH_S:
            return
        if not self.holds_claim():
            raise ShardSuperseded(
                f"shard {self.shard}: another attempt claimed or committed it; "
                "this attempt stopped writing"
            )
        self._checked_at = now

    # --- writes ---------------------------------------------------------------------------

    def write_image(self, image_id: str, data: bytes, ext: str) -> tuple[str, str, int]:
        self.check()
        return self.writer.write_image(self.shard, image_id, data, ext)

    def commit(self, table: pa.Table) -> None:
        """Commit the shard's part unless another attempt did (ShardSuperseded); then
        remove the leftovers its part does not name, and the claim."""
        self.check(force=True)
        try:
            self.writer.commit_shard(self.shard, table, exclusive=True)
        except FileExistsError:
            raise ShardSuperseded(
                f"shard {self.shard} was committed by another attempt first; its part "
                "was kept and this attempt's was not written"
            ) from None
        self._sweep(table)

    def _sweep(self, table: pa.Table) -> None:
        """After the commit: delete what the part does not name, then the claim."""
        named = {path for path in table.column("path").to_pylist() if path}
        self.writer.remove_unnamed_files(self.shard, named)
        self.release()

    def release(self) -> None:
        """Remove the claim if it is still this attempt's."""
        if self.holds_claim():
            self.writer.fs.rm_file(self.claim_path)


def begin_shard(writer: DatasetWriter, shard: int) -> ShardAttempt | None:
    """Claim `shard` for a new attempt; None when it is already committed (nothing to do).
    Only under the writer lease: a run that lost it claims nothing."""
    if writer.lease_token is None:
        raise ValueError("begin_shard writes to the output: hold the writer lease first")
    writer.check_lease()
    attempt = ShardAttempt(writer, shard)
    attempt.claim()  # first: an older attempt that commits from now on is seen below
    if writer.is_committed(shard):
        attempt.release()
        return None
    return attempt
