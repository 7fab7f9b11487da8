"""Which chunks of an idle blob to give back when only part of it needs to go.

Culling a whole multi-gigabyte blob to free a few megabytes throws away far more than
the limits ask for. Instead the culler *trims* such a blob: it forgets some of its
present chunks (their bits cleared durably first) and punches holes over them.

What the daemon can know about a chunk's worth is little: on-demand mode shows misses,
never hits, and a sidecar records presence, not age. The order used is therefore
structural: chunks are given back **from the end of the blob toward its start**, and
the first ``keep_head`` chunks are never trimmed. mkfs.erofs lays out the superblock
and metadata (inodes, directories) at the start of an image and file data after it, so
the head is what every mount and every lookup reads, the tail the data of some files.

Pure: runs of present chunks in, runs to trim out.
"""

from __future__ import annotations

#: trim a blob instead of culling it whole when it holds more than this many times
#: the bytes still to be freed
TRIM_FACTOR = 2
#: bytes at the head of a blob that are never trimmed (rounded up to whole chunks)
KEEP_HEAD_BYTES = 1 << 20


def should_trim(blob_bytes: int, still_needed: int) -> bool:
    """Trim rather than cull whole: the blob is much larger than what is still needed."""
    return still_needed > 0 and blob_bytes > TRIM_FACTOR * still_needed


def keep_head_chunks(chunk_size: int, keep_bytes: int = KEEP_HEAD_BYTES) -> int:
    return max(1, -(-keep_bytes // chunk_size))


def chunks_to_trim(
    present_runs: list[tuple[int, int]],
    blob_size: int,
    chunk_size: int,
    need_bytes: int,
    keep_head: int,
) -> list[tuple[int, int]]:
    """Runs ``(first, count)`` of present chunks (``present_runs``: the blob's runs of
    present chunks, ascending), taken from the tail backwards and never below
    ``keep_head``, whose bytes add up to at least ``need_bytes`` (or everything
    trimmable when the blob has less). Runs are returned tail first."""
    if need_bytes <= 0:
        return []
    last_chunk = (blob_size - 1) // chunk_size
    runs: list[tuple[int, int]] = []
    got = 0
    for run_first, count in reversed(present_runs):
        first, end = max(run_first, keep_head), min(run_first + count, last_chunk + 1)
        # take whole chunks from the run's end until enough bytes are covered
        take = 0
        while end - take > first and got < need_bytes:
            index = end - 1 - take
            got += min(chunk_size, blob_size - index * chunk_size)
            take += 1
        if take:
            runs.append((end - take, take))
        if got >= need_bytes:
            break
    return runs
