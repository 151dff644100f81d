"""Video backends for the decoding-guard tests, added with `pipeline.data.video.register_backend` (imported by name
in the decoding process). Each decodes normally with PyAV, except on files whose name says otherwise."""
from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

import av
import numpy as np


def _frames(path: str, indices: np.ndarray) -> np.ndarray:
    want, out = set(indices.tolist()), []
    with av.open(path) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in want:
                out.append(frame.to_ndarray(format="rgb24"))
            if i >= indices[-1]:
                break
    return np.stack(out)


def misbehaving(path: str, indices: np.ndarray) -> np.ndarray:
    """`hang*`: never returns, holding the GIL in C code (as decord's get_batch on decord issue #373): libc's
    pause() called through ctypes.PyDLL, which keeps the GIL. `crash*`: the decoder aborts the process (SIGSEGV).
    `raise*`: the library raises its own exception type. `grow*`: allocates ~300 MB and waits. Others: PyAV."""
    name = Path(path).name
    if name.startswith("hang"):
        ctypes.PyDLL(None).pause()
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("raise"):
        raise KeyError("bad atom 'moov'")
    if name.startswith("grow"):
        hog = np.ones(300 << 20, dtype=np.uint8)
        time.sleep(30)
        del hog
    return _frames(path, indices)


def inverted(path: str, indices: np.ndarray) -> np.ndarray:
    """PyAV's frames, inverted (255 - value): a backend whose frames tell it was the one used."""
    return 255 - _frames(path, indices)
