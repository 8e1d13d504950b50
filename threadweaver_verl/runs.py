"""What every command does with its output folder, so that it fails clearly and loses nothing.

- :class:`UserError`: a problem the user can fix (a setting, an input file, a busy output folder). The
  dispatcher (:func:`threadweaver_verl.cli.run_command`) prints it as a message and exits with
  :data:`EXIT_USAGE`, without a traceback (``--debug`` shows one).
- :func:`output_dir`: checks an output folder at start-up (not a file; creatable), before any work.
- :class:`OutputLock`: one writer per output folder. The lock file holds the PID, host and command of
  the writer; a second run refuses and names it; a lock left by a dead process is taken over with a
  message (the kernel lock dies with its process, so no run waits on a stale file).
- :func:`atomic_write_text` / :func:`atomic_path`: a file is written under a temporary name in its
  folder and renamed into place, so a reader sees the old file or the new one, never a torn one.
- :class:`Marker`: a finished-marker, written last, recording the settings and the fingerprints of the
  inputs a result was made from; :meth:`Marker.mismatch` says why an existing result does not fit.
- :func:`stop_on_signals`: SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, so
  ``with``/``finally`` blocks run: servers are stopped, temporary folders removed, finished work kept.
  :func:`run_async` is ``asyncio.run`` for the same: a signal cancels the coroutine, then raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_FAILED = 1
"""The command ran but some work failed (e.g. trajectories or samples to retry)."""
EXIT_USAGE = 2
"""A setting, an input or the output folder is wrong: nothing was done. The message names the fix."""

LOCK_NAME = ".threadweaver.lock"


class UserError(Exception):
    """A problem the user can fix; printed as a message (no traceback), exit code :data:`EXIT_USAGE`."""


class OutputBusyError(UserError):
    """Another live process writes to the same output folder."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a KeyboardInterrupt so that asyncio and ``finally`` treat it as Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` (main thread only) for the duration."""
    previous: dict[int, Any] = {}
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if received:  # a second signal while cleaning up: let the cleanup finish
            print(f"{signal.Signals(signum).name}: still stopping, please wait", file=sys.stderr)
            return
        received.append(signum)
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, where SIGINT and SIGTERM cancel ``main`` (its ``finally`` and ``async with``
    blocks run, every task it started is cancelled) and then raise :class:`Interrupted`."""
    received: list[int] = []
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        task = loop.create_task(main)

        def on_signal(signum: int) -> None:
            if not received:
                received.append(signum)
                task.cancel()

        main_thread = threading.current_thread() is threading.main_thread()  # signals reach only that one
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
        for sig in previous:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if received:
                raise Interrupted(received[0]) from None
            raise
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)


# --------------------------------------------------------------------------- output folders and files


def output_dir(path: str | os.PathLike, setting: str = "out_dir") -> Path:
    """``path`` as an existing folder (created if missing); a clear error if it is a file or not creatable."""
    p = Path(path)
    if not str(path):
        raise UserError(f"{setting} is empty: pass an output folder as {setting}=DIR")
    if p.exists() and not p.is_dir():
        raise UserError(f"{setting}={str(p)!r} is a file, not a folder; pass a folder path (it is created if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{setting}={str(p)!r}: cannot create the folder ({e.strerror}); pass a writable path") from e
    return p


def output_file(path: str | os.PathLike, setting: str = "output", suffix: str | None = None) -> Path:
    """``path`` checked as a file to write (nothing is created): a clear error if it is empty or a folder, does
    not end in ``suffix`` (e.g. ``".parquet"``), or its folder runs through a file or is not writable."""
    p = Path(path)
    example = f"DIR/NAME{suffix or ''}"
    if not str(path):
        raise UserError(f"{setting} is empty: pass the file to write as {setting}={example}")
    if p.is_dir():
        raise UserError(f"{setting}={str(p)!r} is a folder; pass the path of the file to write ({setting}={example})")
    if suffix and p.suffix.lower() != suffix:
        raise UserError(f"{setting}={str(p)!r}: the file written is {suffix}; give it a {suffix} name ({example})")
    existing = next(a for a in (p.parent, *p.parent.parents) if a.exists())  # "." exists at the latest
    if not existing.is_dir():
        raise UserError(f"{setting}={str(p)!r}: its folder path runs through the file {str(existing)!r}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{setting}={str(p)!r}: cannot write in {str(existing)!r}; pass a writable path")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``,
    on failure removed. Usage: ``with atomic_path(out / "x.parquet") as tmp: frame.to_parquet(tmp)``."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary name in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove the temporary files an interrupted :func:`atomic_path` left in ``folder``."""
    for tmp in Path(folder).glob(".*.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a folder's file names and bytes (recursively, sorted; lock files and
    temporaries excluded). A missing path is ``"missing"``."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        files = [(p.name, p)]
    elif p.is_dir():
        files = [
            (str(f.relative_to(p)), f)
            for f in sorted(p.rglob("*"))
            if f.is_file() and f.name != LOCK_NAME and ".tmp-" not in f.name
        ]
    else:
        return "missing"
    for name, f in files:
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


class Marker:
    """A finished-marker: JSON with ``config`` (the settings that shaped the result), ``inputs`` (name ->
    :func:`fingerprint` of each input) and ``result``. Written last and atomically; removed first when the
    result is remade, so a folder without it is unfinished."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def mismatch(self, config: Mapping[str, Any], inputs: Mapping[str, str | os.PathLike]) -> str | None:
        """None if the marker exists and records ``config`` and the current fingerprints of ``inputs``;
        otherwise what differs, in words."""
        data = self.read()
        if data is None:
            return f"{self.path} is missing or unreadable (the run did not finish)"
        if "config" not in data or "inputs" not in data:
            return f"{self.path} records no settings (made by an older version)"
        then, now = _flat(data["config"]), _flat(json.loads(json.dumps(dict(config))))
        diffs = [
            f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
            for k in sorted(set(then) | set(now))
            if then.get(k) != now.get(k)
        ]
        diffs += [f"input {name} changed" for name, p in inputs.items() if data["inputs"].get(name) != fingerprint(p)]
        if set(data["inputs"]) != set(inputs):
            diffs.append(f"inputs {sorted(data['inputs'])} then, {sorted(inputs)} now")
        return "; ".join(diffs) or None

    def write(
        self, config: Mapping[str, Any], inputs: Mapping[str, str | os.PathLike], result: Any = None
    ) -> dict[str, Any]:
        data = {
            "config": json.loads(json.dumps(dict(config))),
            "inputs": {name: fingerprint(p) for name, p in inputs.items()},
            "result": result,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(self.path, json.dumps(data, indent=2))
        return data

    def remove(self) -> None:
        """Mark the result unfinished (before it is remade)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (``controller.max_response_tokens``), to name what differs."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------- one writer per folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """One writer per output folder: ``with OutputLock(out, "eval"): ...``.

    The lock is an exclusive ``flock`` on ``<folder>/.threadweaver.lock``, which also holds the writer's
    PID, host, command and start time. A second process finds it held and raises :class:`OutputBusyError`
    naming the holder. A lock whose holder died (``kill -9``, power loss) is no longer held by the kernel:
    the next run takes it over and prints a message naming the dead holder. Use it on a local file system.
    """

    def __init__(self, folder: str | os.PathLike, command: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def _holder(self, fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            data = json.loads(raw) if raw.strip() else {}
        except ValueError:
            data = {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> OutputLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputBusyError(
                    f"{self.folder} is in use by {describe_holder(holder)}; wait for it to finish, or pass "
                    "another output folder"
                ) from None
            # the file may have been removed and recreated by a holder that just finished: lock the live one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = self._holder(fd)
        if stale:
            alive = stale.get("host") == socket.gethostname() and _alive(int(stale.get("pid", 0) or 0))
            state = "" if alive else " (no longer running)"
            print(
                f"{self.command}: taking over the lock of {self.folder} left by {describe_holder(stale)}{state}",
                file=sys.stderr,
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked: a waiting opener re-checks the inode and retries
        os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def describe_holder(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "another process (its lock file names none)"
    return (
        f"`{holder.get('command', '?')}` (PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')})"
    )


# --------------------------------------------------------------------------- input checks


def require_count(value: int | None, setting: str) -> None:
    """A count setting: None (all) or >= 0 (0 means none); negative is an error."""
    if value is not None and value < 0:
        raise UserError(f"{setting}={value}: a count cannot be negative (0 means none; leave it unset for all)")


def require_model_dir(path: str | os.PathLike | None, setting: str = "model", what: str = "model") -> Path:
    """A local Hugging Face folder: exists, is a folder, holds ``config.json`` (model) or a tokenizer file."""
    p = Path(str(path or ""))
    if not str(path or ""):
        raise UserError(f"{setting} is not set; pass a local {what} folder as {setting}=DIR")
    if not p.exists():
        raise UserError(
            f"{setting}={str(p)!r} not found; pass a local {what} folder (e.g. one made by "
            "`threadweaver tiny-model out=DIR` or `threadweaver prepare-model`)"
        )
    if not p.is_dir():
        raise UserError(f"{setting}={str(p)!r} is a file; pass the {what} folder that holds it")
    need = ("config.json",) if what == "model" else ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((p / n).is_file() for n in need):
        raise UserError(
            f"{setting}={str(p)!r} is not a {what} folder (none of {list(need)} in it); pass a Hugging Face "
            f"{what} folder"
        )
    return p
