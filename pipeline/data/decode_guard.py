"""Decoding that a bad file cannot hang: every ``probe`` and ``load_frames`` of ``pipeline.data.video`` runs in a
helper process, under a deadline and a memory bound.

Why a process: decord's ``get_batch`` can loop forever on a file whose container over-reports its frame count while
holding the GIL (decord issue #373), PyAV can stall on crafted input, and decord can abort the process or leak memory
on long files. A thread cannot stop C code that holds the GIL; a process can be killed.

- **One helper per reading thread**, started on its first read (``python -m pipeline.data.decode_guard``: numpy and
  PyAV, no torch; ~0.3 s) and kept warm, so the file indices and the decord/torchcodec verdicts it caches serve the
  later reads. A DataLoader worker or a flow worker gets its own. Requests go over a pipe; frames come back through a
  shared memory file (``memfd``) that the caller sizes to the read, so they are copied once.
- **Deadline**: ``floor + (last frame asked + 1) * H * W / PIXEL_RATE`` seconds for a read (a read never decodes
  more than from the start to its last frame), ``floor + file size / BYTE_RATE`` for a probe (the first one of a
  file demuxes it whole). ``floor`` is ``ELEATT_DECODE_TIMEOUT`` (seconds, default ``DEFAULT_TIMEOUT``); ``off``
  decodes in the calling process, with no deadline or bound. A read past its deadline kills the helper (SIGKILL:
  whatever it was doing) and raises ``VideoReadError("'path': decoding did not finish in N s ...")``; the next read
  starts a new helper. So does a helper that dies (decord aborting) or outgrows its memory bound.
- **Memory**: a read whose frames would exceed ``ELEATT_DECODE_MAX_MB`` (default ``DEFAULT_MAX_MB``) is refused
  before decoding. While it runs, a helper whose resident memory grows by more than its frames plus
  ``MEMORY_MARGIN`` is stopped (Linux; checked every ``POLL_S``), and between reads one above ``RECYCLE_RSS`` (a
  decoder that leaks) is replaced.
- **Nothing left running**: helpers are killed when their process ends (atexit and multiprocessing's finalizers),
  when their thread's process dies (Linux: ``PR_SET_PDEATHSIG``), and by ``shutdown()``, which commands call when
  they end; they ignore Ctrl-C (the caller handles it, and a read interrupted by it kills its helper).

The helper runs functions named ``"module:function"`` (``pipeline.data.video``'s in-process probe and read), so this
module imports nothing of the decoding itself. Errors raised there come back as the same project error with the same
message; anything else there is a bug and comes back as a RuntimeError carrying the helper's traceback.
"""
from __future__ import annotations

import atexit
import importlib
import math
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from pipeline.errors import UsageError

__all__ = ["DEFAULT_MAX_MB", "DEFAULT_TIMEOUT", "call", "check_read_size", "enabled", "max_read_bytes", "probe_deadline",
           "read_deadline", "shutdown", "timeout_floor"]

ENV_TIMEOUT = "ELEATT_DECODE_TIMEOUT"
ENV_MAX_MB = "ELEATT_DECODE_MAX_MB"
DEFAULT_TIMEOUT = 60.0  # seconds: the floor of every deadline
DEFAULT_MAX_MB = 4096  # the most frame data one read may return (64 frames of 1080p RGB are 400 MB)
# The slowest decoding a read is given time for: 20 Mpixel/s is ~10 frames/s of 1080p, several times below what a
# loaded 2-core machine decodes; and the slowest a first probe may read the file at.
PIXEL_RATE = 20e6
BYTE_RATE = 20e6
MEMORY_MARGIN = 2 << 30  # bytes a helper may grow beyond the frames of the read in flight
RECYCLE_RSS = 3 << 30  # a helper above this between reads (a leaking decoder) is replaced
POLL_S = 0.25  # how often a waiting caller checks its helper's health
START_TIMEOUT = 120.0  # seconds a new helper may take to import numpy and PyAV and say it is ready
_KEEP_BUFFER = 192 << 20  # reads up to this size share a buffer kept between reads (allocating shared memory
# costs ~0.5 ms per MB, 7x a copy: measured on the 2-core machine); larger ones get one of their own, not copied back
_OFF = ("off", "0", "none", "false", "no")


def timeout_floor() -> float | None:
    """The deadline floor in seconds from ``ELEATT_DECODE_TIMEOUT``, None when the guard is off."""
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    if raw.lower() in _OFF:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{ENV_TIMEOUT}={raw!r}: give the decoding deadline's floor in seconds (e.g. 60), or 'off' "
                         f"to decode in the calling process without a deadline")
    return value


def enabled() -> bool:
    """Whether reads go through a helper process (``ELEATT_DECODE_TIMEOUT`` is not ``off``; POSIX only)."""
    return os.name == "posix" and timeout_floor() is not None


def max_read_bytes() -> int:
    """The most frame data one read may return, from ``ELEATT_DECODE_MAX_MB``."""
    raw = os.environ.get(ENV_MAX_MB, "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_MAX_MB
    except ValueError:
        mb = float("nan")
    if not (math.isfinite(mb) and mb > 0):
        raise UsageError(f"{ENV_MAX_MB}={raw!r}: give the most frame data one read may return, in MB (e.g. 4096)")
    return int(mb * (1 << 20))


def read_deadline(last: int, height: int, width: int) -> float:
    """Seconds a read up to frame ``last`` of ``height x width`` frames may take."""
    return timeout_floor() + (last + 1) * height * width / PIXEL_RATE


def probe_deadline(size: int) -> float:
    """Seconds a probe of a file of ``size`` bytes may take (the first one demuxes the whole file)."""
    return timeout_floor() + size / BYTE_RATE


# ---------------------------------------------------------------------------------------------------------------------
# The calling side
# ---------------------------------------------------------------------------------------------------------------------


class _Died(Exception):
    """The helper ended (or was stopped) while a request was in flight; the message says how."""


class _Helper:
    """One helper process, its pipes and its frame buffer; used by one thread."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.proc: subprocess.Popen | None = None
        self.buffer_file = None
        # Requests go over a socket (it also carries the buffer of a large read: SCM_RIGHTS), replies over a pipe.
        self.sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_in, self_out = child_sock.detach(), os.dup(self.sock.fileno())
        self_in, child_out = os.pipe()
        try:
            if hasattr(os, "memfd_create"):
                self.buffer_fd = os.memfd_create("eleatt-frames", os.MFD_CLOEXEC)
            else:  # macOS: an unlinked temporary file
                self.buffer_file = tempfile.TemporaryFile(prefix="eleatt-frames-")
                self.buffer_fd = self.buffer_file.fileno()
            self.size = 0
            self.map: mmap.mmap | None = None
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(_import_path()))
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.data.decode_guard", str(child_in), str(child_out),
                 str(self.buffer_fd)],
                pass_fds=(child_in, child_out, self.buffer_fd), env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            for fd in (self_out, self_in):
                os.close(fd)
            self.sock.close()
            self._close_buffer()
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
        self.send_conn = Connection(self_out, readable=False)
        self.recv_conn = Connection(self_in, writable=False)
        _live[id(self)] = self
        try:
            self.wait(START_TIMEOUT, 0, "start")
        except BaseException:
            self.kill()
            raise

    # -- health ---------------------------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int | None:
        """Resident memory in bytes (Linux), None where it cannot be read."""
        try:
            with open(f"/proc/{self.proc.pid}/statm", "rb") as f:
                return int(f.read().split()[1]) * mmap.PAGESIZE
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """Stops the helper at once (whatever it is doing) and reaps it; closes its pipes and buffer."""
        _live.pop(id(self), None)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
                pass
        for conn in ("send_conn", "recv_conn", "sock"):
            c = getattr(self, conn, None)
            if c is not None:
                try:
                    c.close()
                except OSError:
                    pass
        self._close_buffer()

    def _close_buffer(self) -> None:
        if getattr(self, "map", None) is not None:
            self._unmap()
        if self.buffer_file is not None:
            self.buffer_file.close()
            self.buffer_file = None
        elif getattr(self, "buffer_fd", None) is not None:
            try:
                os.close(self.buffer_fd)
            except OSError:
                pass
        self.buffer_fd = None

    # -- one request ----------------------------------------------------------------------------------------------
    def wait(self, deadline: float, nbytes: int, what: str) -> object:
        """The helper's reply within ``deadline`` seconds; _Died / TimeoutError otherwise."""
        end = time.monotonic() + deadline
        base = self.rss() if nbytes else None
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if self.recv_conn.poll(min(left, POLL_S)):
                try:
                    return self.recv_conn.recv()
                except (EOFError, OSError, pickle.UnpicklingError):
                    raise _Died(self._death()) from None
            if not self.alive():
                raise _Died(self._death())
            if base is not None:
                now = self.rss()
                if now is not None and now - base > nbytes + MEMORY_MARGIN:
                    raise _Died(f"its decoder used more than {(nbytes + MEMORY_MARGIN) >> 20} MB of memory for "
                                f"this {what}")

    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "its decoding process stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"its decoding process was killed by {name} (the decoder crashed on it)"
        return f"its decoding process ended with status {code} (the decoder crashed on it)"

    def request(self, message: tuple, deadline: float, nbytes: int, what: str, own: int | None = None) -> object:
        """Sends ``message`` (with ``own``: the fd of a buffer of its own for the frames) and waits for the reply."""
        if own is None and nbytes > self.size:  # grow the frame buffer (a mapping of the old size stays valid)
            os.ftruncate(self.buffer_fd, nbytes)
            self.size = nbytes
        try:
            self.send_conn.send(message)
            if own is not None:
                socket.send_fds(self.sock, [b"F"], [own])
        except (OSError, ValueError):
            raise _Died(self._death()) from None
        return self.wait(deadline, nbytes, what)

    def frames(self, shape: tuple, pos: np.ndarray) -> np.ndarray:
        """The frames the helper wrote, ``shape`` (U, H, W, 3), gathered at ``pos`` (a copy). The buffer (at most
        ``_KEEP_BUFFER`` bytes: larger reads get one of their own) stays mapped between reads: no page faults."""
        nbytes = math.prod(shape)
        if self.map is None or len(self.map) < nbytes:
            self._unmap()
            self.map = mmap.mmap(self.buffer_fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        view = np.frombuffer(self.map, dtype=np.uint8, count=nbytes).reshape(shape)
        out = np.ascontiguousarray(view[pos])
        del view
        return out

    def _unmap(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None


_local = threading.local()
_live: dict[int, _Helper] = {}  # every helper of this process, for shutdown
_registered_exit = 0  # the process that registered shutdown at exit (a forked child registers its own)


def _import_path() -> list[str]:
    """sys.path for the helper: this package's root first (the same code), then the caller's entries (absolute),
    so that a backend added with register_backend imports there as here."""
    root = str(Path(__file__).resolve().parents[2])
    out = [root]
    for p in sys.path:
        p = os.path.abspath(p or os.getcwd())
        if p not in out and os.path.isdir(p):
            out.append(p)
    return out


def _helper() -> _Helper:
    """This thread's live helper, started (or replaced) when needed."""
    global _registered_exit
    helper = getattr(_local, "helper", None)
    if helper is not None and (helper.owner != os.getpid() or not helper.alive()):
        if helper.owner == os.getpid():
            helper.kill()
        helper = None  # a forked child does not use (or kill) its parent's helper
    elif helper is not None:
        rss = helper.rss()
        if rss is not None and rss > RECYCLE_RSS:  # a decoder that leaks: start afresh between reads
            helper.kill()
            helper = None
    if helper is None:
        if _registered_exit != os.getpid():
            atexit.register(shutdown)
            try:
                from multiprocessing import util  # DataLoader and pool workers end without atexit

                util.Finalize(None, shutdown, exitpriority=100)
            except Exception:  # pragma: no cover
                pass
            _registered_exit = os.getpid()
        helper = _local.helper = _Helper()
    return helper


def shutdown() -> None:
    """Stops every helper of this process (the next read starts one again)."""
    for helper in list(_live.values()):
        if helper.owner == os.getpid():
            helper.kill()
    _local.__dict__.pop("helper", None)


def clear_remote_cache(target: str) -> None:
    """Runs ``target`` (a cache reset, ``"module:function"``) in this thread's helper, if one runs."""
    helper = getattr(_local, "helper", None)
    if helper is not None and helper.owner == os.getpid() and helper.alive():
        call(target, (), Path("."), timeout_floor() or DEFAULT_TIMEOUT, "cache reset", UsageError)


def call(target: str, args: tuple, path: Path, deadline: float, what: str, error: type,
         shape: tuple | None = None, pos: np.ndarray | None = None) -> object:
    """Runs ``target`` (``"module:function"``) with ``args`` in this thread's helper within ``deadline`` seconds and
    returns its result, or, with ``shape``, the uint8 array of that shape it returned, gathered at ``pos`` (rows).

    A deadline passed, a helper that dies or outgrows its memory bound, or one that cannot start: the helper is
    killed and ``error`` (a project error type) is raised naming ``path``. A project error raised there is raised
    here, of the same type with the same message; anything else there is a bug: RuntimeError with its traceback."""
    helper = _started(path, error)
    nbytes = math.prod(shape) if shape is not None else 0
    own = _new_buffer(nbytes) if nbytes > _KEEP_BUFFER else None
    try:
        reply = helper.request(("call", target, args, shape, own is not None), deadline, nbytes, what, own)
    except TimeoutError:
        _close(own)
        helper.kill()
        raise error(f"{path}: decoding did not finish in {deadline:.0f} s (the deadline of this {what}; the file may "
                    f"be damaged or crafted, or the machine overloaded); check the file (re-encode it), or raise the "
                    f"floor with {ENV_TIMEOUT}=SECONDS") from None
    except _Died as e:
        _close(own)
        helper.kill()
        raise error(f"{path}: {e}; re-encode the file (ffmpeg -i IN -c:v libx264 OUT.mp4), or read it with "
                    f"backend='pyav'") from None
    except BaseException:  # Ctrl-C while waiting: the helper's state is unknown
        _close(own)
        helper.kill()
        raise
    status, *rest = reply
    if status == "ok" and own is not None:
        return _adopt(own, shape, pos)
    _close(own)
    if status == "ok":
        return helper.frames(shape, pos) if shape is not None else rest[0]
    if status == "user":
        module, name, text = rest
        raise _user_error(module, name)(text)
    raise RuntimeError(f"decoding {path} raised in the decoding process (a bug; please report it):\n{rest[0]}")


def _new_buffer(nbytes: int) -> int:
    """A file descriptor of ``nbytes`` of shared memory (memfd; an unlinked temporary file on macOS)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("eleatt-read", os.MFD_CLOEXEC)
    else:
        with tempfile.TemporaryFile(prefix="eleatt-read-") as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, nbytes)
    return fd


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _adopt(fd: int, shape: tuple, pos: np.ndarray) -> np.ndarray:
    """The frames a helper wrote into the buffer ``fd`` of their own: the mapping itself when they are in the order
    asked (no copy: the array keeps it, unmapped when the array goes), else gathered at ``pos``."""
    try:
        mm = mmap.mmap(fd, math.prod(shape), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    frames = np.frombuffer(mm, dtype=np.uint8).reshape(shape)
    if len(pos) == shape[0] and (pos == np.arange(shape[0])).all():
        return frames
    out = np.ascontiguousarray(frames[pos])
    del frames
    mm.close()
    return out


def _user_error(module: str, name: str) -> type:
    """The project error type a helper raised (UsageError where it cannot be imported here)."""
    from pipeline.errors import UserError

    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return UsageError
    return cls if isinstance(cls, type) and issubclass(cls, UserError) else UsageError


def _started(path: Path, error: type) -> _Helper:
    """This thread's helper; ``error`` naming ``path`` when none can be started."""
    try:
        return _helper()
    except (_Died, TimeoutError, OSError) as e:
        reason = str(e) or f"it did not say it was ready within {START_TIMEOUT:.0f} s"
        raise error(f"{path}: the decoding process could not be started ({reason}); see the lines above, or set "
                    f"{ENV_TIMEOUT}=off to decode in this process") from None


def check_read_size(path: Path, count: int, height: int, width: int, error: type) -> None:
    """Refuses, before decoding, a read of ``count`` frames of ``height x width`` RGB above ``max_read_bytes()``."""
    nbytes, bound = count * height * width * 3, max_read_bytes()
    if nbytes > bound:
        raise error(f"{path}: reading {count} frames of {width}x{height} needs {nbytes >> 20} MB, more than one read "
                    f"may take ({bound >> 20} MB, {ENV_MAX_MB}); read fewer frames at a time")


# ---------------------------------------------------------------------------------------------------------------------
# The helper
# ---------------------------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the thread that started it ends (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - no prctl: atexit and shutdown() still stop it
        pass


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _serve(read_fd: int, write_fd: int, buffer_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the caller died before the line above
        os._exit(1)
    from pipeline.errors import UserError

    sock = socket.socket(fileno=os.dup(read_fd))  # the same stream: buffers of large reads come over it
    recv_conn = Connection(read_fd, writable=False)
    send_conn = Connection(write_fd, readable=False)
    send_conn.send(("ok", os.getpid()))
    mapped: mmap.mmap | None = None  # the frame buffer, kept mapped between reads
    while True:
        try:
            _, target, args, shape, own = recv_conn.recv()
            own_fd = socket.recv_fds(sock, 1, 1)[1][0] if own else None
        except (EOFError, OSError, IndexError):
            return
        result = None
        try:
            result = _resolve(target)(*args)
            if shape is not None:  # frames: into the shared buffer the caller sized
                if not isinstance(result, np.ndarray) or result.dtype != np.uint8 or result.shape != tuple(shape):
                    raise UsageError(f"{args[0]}: changed while it was read (frames of shape "
                                     f"{getattr(result, 'shape', None)}, expected {tuple(shape)}); run again")
                nbytes = math.prod(shape)
                if own_fd is not None:  # a large read: into the buffer the caller made for it, then let go of it
                    with mmap.mmap(own_fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                        out = np.frombuffer(mm, dtype=np.uint8, count=nbytes).reshape(shape)
                        out[...] = result
                        del out
                else:
                    size = os.fstat(buffer_fd).st_size  # the caller sized it; it may have shrunk it since
                    if mapped is None or len(mapped) < nbytes or len(mapped) > size:
                        if mapped is not None:
                            mapped.close()
                        mapped = mmap.mmap(buffer_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                    out = np.frombuffer(mapped, dtype=np.uint8, count=nbytes).reshape(shape)
                    out[...] = result
                    del out
                result = None
            reply = ("ok", result)
        except UserError as e:
            reply = ("user", type(e).__module__, type(e).__qualname__, str(e))
        except Exception:
            reply = ("bug", traceback.format_exc())
        result = None  # the frames, written: free them before waiting
        if own_fd is not None:
            os.close(own_fd)
        try:
            send_conn.send(reply)
        except (OSError, ValueError):
            return


if __name__ == "__main__":
    _serve(*map(int, sys.argv[1:4]))
