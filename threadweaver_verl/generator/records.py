"""A resumable, append-only record store: one JSON line per finished sample.

Crash safety (``kill -9`` at any instant):

* each record is ONE ``write`` of a complete line, followed by ``flush`` and
  ``os.fsync``, so a record is either fully on disk or it is the torn tail of
  the file;
* on open, a torn tail (the bytes after the last newline, or a last line that
  is not valid JSON) is cut off, and the sample it belonged to counts as not
  done, so the rerun produces it again;
* the done-set is keyed by sample id and built from the file itself, so a
  rerun skips every sample that has a record and appends each missing one
  exactly once. A second record for an id already in the store is refused.

Samples that could not be finished for a transient reason (the LLM API gave up
after its retries) are NOT records: they go to a side log (``log_error``) and
stay out of the done-set, so the next run tries them again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class RecordStoreError(RuntimeError):
    pass


class RecordStore:
    """Append-only JSONL records keyed by ``record["id"]``."""

    def __init__(self, path: str | os.PathLike, error_path: str | os.PathLike | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.error_path = Path(error_path) if error_path else self.path.with_name(self.path.stem + ".errors.jsonl")
        self.torn_bytes = 0  # bytes of a torn tail removed on open (a record the crash cut short)
        self._records: dict[str, dict[str, Any]] = {}
        self._load()
        self._fh = open(self.path, "ab")

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn tail: no newline
            line = data[pos:nl]
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    if data[nl + 1 :].strip():
                        raise RecordStoreError(
                            f"{self.path}: line at byte {pos} is not JSON ({e}) and is followed by more records; "
                            "the file was edited by hand or by another program. Fix or remove that line."
                        ) from e
                    break  # a torn last line
                if not isinstance(rec, dict) or "id" not in rec:
                    raise RecordStoreError(f"{self.path}: record at byte {pos} has no 'id' field")
                rid = str(rec["id"])
                if rid in self._records:
                    raise RecordStoreError(f"{self.path}: two records for sample id {rid!r}; the store is corrupt")
                self._records[rid] = rec
            pos = nl + 1
            good_end = pos
        if good_end < len(data):
            self.torn_bytes = len(data) - good_end
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())

    def __contains__(self, sample_id: object) -> bool:
        return str(sample_id) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._records.values()))

    def get(self, sample_id: str) -> dict[str, Any] | None:
        return self._records.get(str(sample_id))

    @property
    def done(self) -> frozenset[str]:
        return frozenset(self._records)

    # ------------------------------------------------------------------ writing
    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (write + flush + fsync) before returning."""
        if "id" not in record:
            raise RecordStoreError("a record needs an 'id'")
        rid = str(record["id"])
        if rid in self._records:
            raise RecordStoreError(f"sample {rid!r} already has a record in {self.path}")
        line = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n"
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._records[rid] = record

    def log_error(self, sample_id: str, step: str, message: str, extra: dict[str, Any] | None = None) -> None:
        """A transient failure: logged, not a record, so the next run retries the sample. ``extra``: more
        fields for the log line (e.g. the failed trajectory's record)."""
        entry = {**(extra or {}), "id": str(sample_id), "step": step, "error": message, "time": time.time()}
        with open(self.error_path, "ab") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
