"""EleAtt-RNN video action recognition: element-wise attention gates for RNN/LSTM/GRU, and the pipeline around them.

Public names are imported lazily so that `import pipeline` (and `eleatt --help`) stays fast.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "EleAttRNN": "pipeline.nn.eleatt",
    "EleAttLSTM": "pipeline.nn.eleatt",
    "EleAttGRU": "pipeline.nn.eleatt",
    "EleAttRNNCell": "pipeline.nn.eleatt",
    "EleAttLSTMCell": "pipeline.nn.eleatt",
    "EleAttGRUCell": "pipeline.nn.eleatt",
    "FrameEncoder": "pipeline.nn.backbone",
    "SequenceClassifier": "pipeline.nn.classifier",
    "VideoReadError": "pipeline.data.video",
    "probe": "pipeline.data.video",
    "load_frames": "pipeline.data.video",
    "classify": "pipeline.serving.classify",
    "StreamingClassifier": "pipeline.serving.streaming",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
