"""Deployment export of a trained checkpoint: `eleatt export` and `pipeline.serving.export.export_checkpoint`.

Two standalone models, in three formats (ONNX for onnxruntime, a `torch.export` ExportedProgram, TorchScript):

- the whole-sequence model: features float32 (B, T, D) as `eleatt extract` writes them and lengths int64 (B,)
  -> class probabilities (B, C), what `eleatt classify` computes from those features (the data module's
  normalisation stored in the checkpoint included; the whole given sequence is used, no `num_steps` sampling);
- the one-step model (`--step`), for streaming: the features of one frame (B, D) and the recurrent state
  h, c (L, B, H) -> probabilities (B, C) after that frame and the new h, c. Start from zeros; for a GRU or RNN
  checkpoint c is passed through unchanged. After T steps the probabilities equal the whole-sequence model's.

With `--with-backbone` the timm backbone the features were made with runs in front: images float (B, T, 3, H, W)
(one frame (B, 3, H, W) for `--step`), normalised with the backbone's mean/std, and the features go through the
feature folder's storage precision (float16) as they do in `extract`.

The recurrence is the readable step-by-step definition (`pipeline.nn.steps`: `attention_gate` and the cell
steps, the maths `impl="reference"` runs), run so that every exporter can keep the time dimension dynamic:
TorchScript and ONNX script the time loop (ONNX `Loop`), `torch.export` captures it as one `scan` (`scan_layer`).
Padded steps come after a sequence's last valid step, so pooling at `lengths - 1` (or the mean over valid steps,
`pipeline.nn.classifier.pool_steps`) gives the packed result without packing; the normalisation is
`pipeline.data.sequences.normalize_features`, what `FeatureNormalizer` computes.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import List, Tuple

import torch
from torch import Tensor, nn

from pipeline.data.sequences import normalize_features
from pipeline.errors import EXIT_OK, EXIT_USAGE, UsageError
from pipeline.nn.classifier import pool_steps
from pipeline.nn.steps import attention_gate, cell_step, scan_layer
from pipeline.paths import atomic_path, atomic_write, check_not_input, ensure_writable_file

FORMATS = ("onnx", "exported", "torchscript")
ONNX_OPSET = 17


class ExportError(UsageError):
    """A checkpoint or request the exporter cannot handle (message says why and what to do)."""


# --------------------------------------------------------------------------------------------------------------
# Scriptable modules (TorchScript-compatible: constants for the branches, no Optional weights)
# --------------------------------------------------------------------------------------------------------------
class ExportLayer(nn.Module):
    """One (optionally gated) recurrent layer of an EleAtt stack, as buffers; zeros stand for absent biases."""

    __constants__ = ["mode", "gated", "gate", "hidden_size"]

    def __init__(self, mode: str, weights, gate_weights, gate: str, hidden_size: int) -> None:
        super().__init__()
        self.mode = mode  # "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"
        self.gated = gate_weights is not None
        self.gate = gate
        self.hidden_size = hidden_size
        w_ih, w_hh, b_ih, b_hh = (None if w is None else w.detach().clone().float() for w in weights)
        g = w_ih.size(0)
        self.register_buffer("w_ih", w_ih)  # (G, D)
        self.register_buffer("w_hh", w_hh)  # (G, H)
        self.register_buffer("b_ih", b_ih if b_ih is not None else torch.zeros(g))  # (G,)
        self.register_buffer("b_hh", b_hh if b_hh is not None else torch.zeros(g))  # (G,)
        d = w_ih.size(1)
        if gate_weights is not None:
            w_xa, w_ha, b_a = (None if w is None else w.detach().clone().float() for w in gate_weights)
            self.register_buffer("w_xa", w_xa)  # (D, D)
            self.register_buffer("w_ha", w_ha)  # (D, H)
            self.register_buffer("b_a", b_a if b_a is not None else torch.zeros(d))  # (D,)
        else:  # never read (the branch is compiled out); present so that every layer has the same attributes
            self.register_buffer("w_xa", torch.zeros(0, d))
            self.register_buffer("w_ha", torch.zeros(0, hidden_size))
            self.register_buffer("b_a", torch.zeros(0))

    def step(self, x: Tensor, h: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
        """x (B, D), h and c (B, H) -> new (h, c); c is returned unchanged except for the LSTM."""
        if self.gated:
            x = attention_gate(x, h, self.w_xa, self.w_ha, self.b_a, self.gate) * x  # x~ = a * x
        return cell_step(self.mode, x, h, c, self.w_ih, self.w_hh, self.b_ih, self.b_hh)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, D) -> outputs (B, T, H), from a zero state."""
        if torch.jit.is_scripting():
            return self._loop(x)
        else:  # (an else: TorchScript skips the branch it cannot compile)
            return self._scan(x) if torch.compiler.is_exporting() else self._loop(x)

    def _loop(self, x: Tensor) -> Tensor:
        # eager, TorchScript and ONNX: a loop over the dynamic T (scripted: an ONNX Loop)
        b = x.size(0)
        h = x.new_zeros(b, self.hidden_size)  # (B, H)
        c = x.new_zeros(b, self.hidden_size)
        outs: List[Tensor] = []
        for t in range(x.size(1)):
            h, c = self.step(x[:, t], h, c)
            outs.append(h)
        return torch.stack(outs, 1)  # (B, T, H)

    def _scan(self, x: Tensor) -> Tensor:
        # torch.export: the loop as one `scan`, which keeps T symbolic instead of unrolling it
        h0 = x.new_zeros(x.size(0), self.hidden_size)  # (B, H)
        state = (h0, h0.clone()) if self.mode == "LSTM" else (h0,)  # an unchanged carry (c) would alias
        gate_weights = (self.w_xa, self.w_ha, self.b_a) if self.gated else None
        outs, _, _ = scan_layer(self.mode, x.transpose(0, 1), state, (self.w_ih, self.w_hh, self.b_ih, self.b_hh),
                                gate_weights, self.gate)  # outs (T, B, H)
        return outs.transpose(0, 1)


class FeatureModel(nn.Module):
    """normalise -> projection -> EleAtt stack -> pooling -> head -> softmax, from a SequenceClassifier."""

    __constants__ = ["normalize", "pooling", "num_layers", "hidden_size"]

    def __init__(self, net: nn.Module, normalize: str, mean: Tensor | None, std: Tensor | None) -> None:
        super().__init__()
        rnn = net.rnn
        self.normalize = normalize  # "none", "l2" or "standard", as FeatureNormalizer
        d = rnn.input_size if isinstance(net.proj, nn.Identity) else net.proj.in_features
        self.register_buffer("mean", mean.float().clone() if mean is not None else torch.zeros(d))  # (D,)
        self.register_buffer("std", std.float().clone() if std is not None else torch.ones(d))  # (D,)
        self.proj = net.proj
        self.layers = nn.ModuleList(
            ExportLayer(rnn.mode, rnn.layer_weights(k), rnn.gate_weights(k), rnn.gate, rnn.hidden_size)
            for k in range(rnn.num_layers)
        )
        self.num_layers, self.hidden_size = rnn.num_layers, rnn.hidden_size
        self.pooling = net.pooling  # "last" or "mean"
        self.head = net.head

    def features_in(self, x: Tensor) -> Tensor:
        """Normalisation and projection of features (..., D), per step."""
        return self.proj(normalize_features(x, self.normalize, self.mean, self.std))

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        """features float32 (B, T, D), lengths int64 (B,) -> class probabilities (B, C)."""
        x = self.features_in(features)  # (B, T, D')
        for layer in self.layers:
            x = layer(x)  # (B, T, H)
        return torch.softmax(self.head(pool_steps(x, lengths, self.pooling)), dim=-1)  # (B, H) -> (B, C)

    def step(self, feature: Tensor, h: Tensor, c: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """feature (B, D), h and c (L, B, H) -> probabilities (B, C), new h and c (L, B, H)."""
        x = self.features_in(feature)
        hs: List[Tensor] = []
        cs: List[Tensor] = []
        k = 0
        for layer in self.layers:
            h_k, c_k = layer.step(x, h[k], c[k])
            hs.append(h_k)
            cs.append(c_k)
            x = h_k
            k += 1
        return torch.softmax(self.head(x), dim=-1), torch.stack(hs), torch.stack(cs)


class StepModel(nn.Module):
    """The one-step (streaming) model: forward = FeatureModel.step."""

    def __init__(self, model: FeatureModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, feature: Tensor, h: Tensor, c: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.model.step(feature, h, c)


class BackboneSequenceModel(nn.Module):
    """images (B, T, 3, H, W) normalised, lengths (B,) -> probabilities (B, C): backbone, store precision, model."""

    def __init__(self, encoder: nn.Module, model: FeatureModel, half_store: bool) -> None:
        super().__init__()
        self.encoder, self.model, self.half_store = encoder, model, half_store

    def forward(self, images: Tensor, lengths: Tensor) -> Tensor:
        b, t = images.size(0), images.size(1)
        feats = self.encoder(images.flatten(0, 1))  # (B*T, D)
        if self.half_store:  # the feature folder stores float16: the same rounding as extract + classify
            feats = feats.to(torch.float16).to(torch.float32)
        return self.model(feats.reshape(b, t, feats.size(-1)), lengths)


class BackboneStepModel(nn.Module):
    """image (B, 3, H, W) normalised, h, c (L, B, H) -> probabilities (B, C), new h, c."""

    def __init__(self, encoder: nn.Module, model: FeatureModel, half_store: bool) -> None:
        super().__init__()
        self.encoder, self.model, self.half_store = encoder, model, half_store

    def forward(self, image: Tensor, h: Tensor, c: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        feats = self.encoder(image)  # (B, D)
        if self.half_store:
            feats = feats.to(torch.float16).to(torch.float32)
        return self.model.step(feats, h, c)


# --------------------------------------------------------------------------------------------------------------
# From a checkpoint
# --------------------------------------------------------------------------------------------------------------
def build_models(ckpt, with_backbone: bool = False, step: bool = False, weights: str | None = None):
    """The eager export module of a checkpoint and its description.

    Returns (module, info): module is FeatureModel / StepModel / BackboneSequenceModel / BackboneStepModel in eval
    mode; info a JSON-able dict (inputs, outputs, class names, state shape, image size) written next to the export.
    """
    from pipeline.nn.classifier import SequenceClassifier
    from pipeline.nn.eleatt import _EleAttRNNBase
    from pipeline.trained.load import load_stream

    ckpt = Path(ckpt)
    stream = load_stream(ckpt)  # the trained-stream record and its classifier, as classify loads them
    net = stream.net.float()
    if not isinstance(net, SequenceClassifier) or not isinstance(getattr(net, "rnn", None), _EleAttRNNBase):
        raise ExportError(f"checkpoint '{ckpt}' does not hold a SequenceClassifier with an EleAtt stack "
                          f"(got {type(net).__name__}); export handles checkpoints of `eleatt fit`")
    if not isinstance(net.proj, (nn.Identity, nn.Linear)):
        raise ExportError(f"checkpoint '{ckpt}': the input projection {type(net.proj).__name__} is not exportable")
    if step and net.pooling != "last":
        raise ExportError(f"checkpoint '{ckpt}' pools the mean over steps (model.pooling={net.pooling!r}); the "
                          "one-step model streams the last step's prediction, so export it without --step (the "
                          "whole-sequence model handles mean pooling)")
    normalizer = stream.normalizer
    if normalizer.mode == "standard" and normalizer.mean is None:
        raise ExportError(f"checkpoint '{ckpt}' was trained with normalize='standard' but stores no statistics; "
                          "re-save it from a run of `eleatt fit`")
    model = FeatureModel(net, normalizer.mode, normalizer.mean, normalizer.std).eval()
    record = stream.record
    info = {
        "checkpoint": str(ckpt),
        "class_names": stream.class_names,
        "cell": record.network.get("cell"),
        "normalize": normalizer.mode,
        "num_steps_in_training": stream.num_steps,
        "state_shape": ["L", "B", "H"] if step else None,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "input_size": record.input_size,
    }
    if not with_backbone:
        module = StepModel(model) if step else model
        info["inputs"] = ["features (B, D) float32", "h (L, B, H)", "c (L, B, H)"] if step else [
            "features (B, T, D) float32", "lengths (B,) int64"]
        info["outputs"] = ["probs (B, C)", "h (L, B, H)", "c (L, B, H)"] if step else ["probs (B, C)"]
        return module.eval(), info
    settings = record.features
    if settings is None or settings.backbone is None or settings.data_config is None:
        raise ExportError(f"checkpoint '{ckpt}' does not record the backbone its features were made with "
                          "(its trained-stream record has no feature settings); export without --with-backbone, or "
                          "retrain on a feature folder made by `eleatt extract`")
    if settings.modality != "rgb":
        raise ExportError(f"checkpoint '{ckpt}' was trained on {settings.modality!r} features; --with-backbone "
                          "handles RGB checkpoints only (export the feature model and compute the features yourself)")
    encoder = stream.encoder(weights)  # the recorded weights, or `weights` instead (a hint names --weights)
    if encoder.num_features != info["input_size"]:
        raise ExportError(f"backbone {settings.backbone!r} gives {encoder.num_features} features but the model "
                          f"takes {info['input_size']}")
    half = settings.dtype == "float16"
    if settings.precision != "32":
        # classify runs the backbone under autocast; an exported graph computes in float32
        warnings.warn(f"checkpoint '{ckpt}': its features were extracted under {settings.precision} autocast; the "
                      "exported backbone computes in float32, so its features differ slightly from classify's",
                      stacklevel=2)
    backbone = encoder.model.float().eval()
    module = BackboneStepModel(backbone, model, half) if step else BackboneSequenceModel(backbone, model, half)
    size = list(encoder.data_config["input_size"])
    info["backbone"] = {"name": settings.backbone, "weights": str(encoder.weights), "input_size": size,
                        "mean": list(encoder.data_config["mean"]), "std": list(encoder.data_config["std"])}
    info["inputs"] = (["image (B, 3, H, W) float32 normalised", "h (L, B, H)", "c (L, B, H)"] if step else
                      ["images (B, T, 3, H, W) float32 normalised", "lengths (B,) int64"])
    info["outputs"] = ["probs (B, C)", "h (L, B, H)", "c (L, B, H)"] if step else ["probs (B, C)"]
    return module.eval(), info


def example_inputs(module: nn.Module, info: dict, batch: int = 2, steps: int = 3,
                   generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """Random inputs of the module's signature: (B, T, D)/(B, T, 3, H, W) + lengths, or one step + zero state."""
    step = isinstance(module, (StepModel, BackboneStepModel))
    if "backbone" in info:
        _, hgt, wid = info["backbone"]["input_size"]
        frame = (3, hgt, wid)
    else:
        frame = (info["input_size"],)
    if step:
        state = torch.randn(info["num_layers"], batch, info["hidden_size"], generator=generator) * 0.5
        return torch.randn(batch, *frame, generator=generator), state, state.clone()
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    return torch.randn(batch, steps, *frame, generator=generator), lengths


def _names(step: bool, with_backbone: bool) -> tuple[list[str], list[str]]:
    if step:
        return ["image" if with_backbone else "features", "h", "c"], ["probs", "h_out", "c_out"]
    return ["images" if with_backbone else "features", "lengths"], ["probs"]


def _scripted(module: nn.Module, example: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
    """TorchScript of an export module: the recurrence scripted (dynamic T); a backbone traced (only convolutions
    and pooling, valid for any batch and for the traced image size)."""
    if isinstance(module, (BackboneSequenceModel, BackboneStepModel)):
        images = example[0]
        frames = images.flatten(0, 1) if images.dim() == 5 else images
        with torch.no_grad():
            traced = torch.jit.trace(module.encoder, (frames,), check_trace=False)
        wrapper = type(module)(traced, module.model, module.half_store)
        return torch.jit.script(wrapper.eval())
    return torch.jit.script(module)


def check_outputs(ckpt, out, weights: str | None = None) -> None:
    """Refuses, before any work, an `out` (or its description `out` + '.json') that is the checkpoint or the backbone
    weights file being exported, or that is an existing folder (one line each, exit 2)."""
    inputs = [ckpt, weights if weights and Path(weights).is_file() else None]
    check_not_input(out, inputs, "--out")
    check_not_input(Path(f"{out}.json"), inputs, "--out's description file (--out + .json)")
    ensure_writable_file(out, "--out")
    ensure_writable_file(Path(f"{out}.json"), "--out's description file (--out + .json)")


def export_module(module: nn.Module, info: dict, fmt: str, out: str | Path) -> Path:
    """Writes the module in `fmt` to `out` (and the description to `out` + '.json'), each atomically (whole or not
    at all: an export that fails leaves an earlier file at `out` as it was); returns the path."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    ensure_writable_file(out, "--out")
    step = isinstance(module, (StepModel, BackboneStepModel))
    with_backbone = "backbone" in info
    example = example_inputs(module, info, batch=2, steps=3)
    inputs, outputs = _names(step, with_backbone)
    if fmt == "exported" and out.suffix != ".pt2":
        raise UsageError(f"--out {out}: torch.export programs are saved as .pt2 files; name it {out.stem}.pt2")
    with atomic_path(out) as tmp:  # the exporters take a path: written there, then renamed into place
        if fmt == "torchscript":
            _scripted(module, example).save(str(tmp))
        elif fmt == "exported":
            batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
            if step:
                shapes = ({0: batch}, {1: batch}, {1: batch})
            else:
                shapes = ({0: batch, 1: time}, {0: batch})
            with torch.no_grad():
                program = torch.export.export(module, example, dynamic_shapes=shapes)
            torch.export.save(program, str(tmp))
        else:
            axes = {inputs[0]: {0: "batch"}}
            if step:
                axes.update({"h": {1: "batch"}, "c": {1: "batch"}, "probs": {0: "batch"}, "h_out": {1: "batch"},
                             "c_out": {1: "batch"}})
            else:
                axes[inputs[0]][1] = "time"
                axes.update({"lengths": {0: "batch"}, "probs": {0: "batch"}})
            with warnings.catch_warnings():
                # the TorchScript-based exporter is the one that turns the scripted time loop into an ONNX Loop
                warnings.simplefilter("ignore")
                torch.onnx.export(_scripted(module, example), example, str(tmp), dynamo=False, input_names=inputs,
                                  output_names=outputs, dynamic_axes=axes, opset_version=ONNX_OPSET)
    info = dict(info, format=fmt, input_names=inputs, output_names=outputs)
    with atomic_write(Path(str(out) + ".json"), "w") as f:
        f.write(json.dumps(info, indent=2) + "\n")
    return out


def load_exported(path: str | Path, fmt: str):
    """A callable running an exported file with torch tensors in and a tuple of numpy/torch outputs out."""
    path = str(path)
    if fmt == "torchscript":
        module = torch.jit.load(path)
        return lambda *xs: _as_tuple(module(*xs))
    if fmt == "exported":
        module = torch.export.load(path).module()
        return lambda *xs: _as_tuple(module(*xs))
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("running an ONNX export needs onnxruntime: pip install 'eleatt[export]'") from None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda *xs: tuple(torch.from_numpy(o) for o in session.run(None, {n: x.numpy() for n, x in zip(names, xs)}))


def _as_tuple(result) -> tuple[Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def check_export(module: nn.Module, info: dict, path: Path, fmt: str, cases=((1, 1), (3, 5))) -> float:
    """Max |exported - eager| over random inputs of a few batch sizes and lengths (needs onnxruntime for ONNX)."""
    run = load_exported(path, fmt)
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for batch, steps in cases:
        xs = example_inputs(module, info, batch=batch, steps=steps, generator=gen)
        with torch.no_grad():
            want = _as_tuple(module(*xs))
            got = run(*xs)
        for w, g in zip(want, got):
            worst = max(worst, float((w - g).abs().max()))
    return worst


def _require_onnx(fmt: str) -> None:
    """Refuses --format onnx before any work when the `onnx` package (the exporter writes through it) is missing."""
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise ExportError("--format onnx needs the `onnx` package: pip install 'eleatt[export]' "
                              "(or choose --format exported / torchscript)") from None


def export_checkpoint(ckpt, out, fmt: str = "onnx", with_backbone: bool = False, step: bool = False,
                      weights: str | None = None) -> Path:
    """`eleatt export` from Python: the checkpoint's model in `fmt` at `out` (+ `out`.json); returns `out`."""
    _require_onnx(fmt)
    check_outputs(ckpt, out, weights)
    module, info = build_models(ckpt, with_backbone=with_backbone, step=step, weights=weights)
    return export_module(module, info, fmt, out)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.arguments import command_parser

    parser = command_parser(
        prog="eleatt export",
        description="Export a trained checkpoint as a standalone model for serving: ONNX (onnxruntime), a "
                    "torch.export ExportedProgram (.pt2) or TorchScript. The whole-sequence model maps features "
                    "(B, T, D) and lengths (B,) to class probabilities (B, C) as `eleatt classify` computes them "
                    "(normalisation included); --step exports the one-step streaming model instead. A description "
                    "(inputs, outputs, class names) is written next to it as FILE.json.",
        epilog="exit status: 0 exported; 2 usage error or a checkpoint the exporter cannot handle",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint of `eleatt fit` (checkpoints/<run>/best.ckpt)")
    parser.add_argument("--format", default="onnx", choices=FORMATS,
                        help="onnx (default; needs the `export` extra), exported (torch.export .pt2), torchscript")
    parser.add_argument("--with-backbone", action="store_true",
                        help="put the checkpoint's timm backbone in front: input images (B, T, 3, H, W) normalised")
    parser.add_argument("--weights", default=None,
                        help="backbone weights instead of the recorded ones (local file, 'imagenet' or 'none')")
    parser.add_argument("--step", action="store_true",
                        help="export the one-step model: (frame, h, c) -> (probs, h, c), for streaming")
    parser.add_argument("--check", action="store_true",
                        help="after exporting, run the file on random inputs and print the largest difference "
                             "from eager PyTorch (ONNX needs onnxruntime)")
    parser.add_argument("--out", required=True, help="output file (e.g. model.onnx, model.pt2, model.ts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.weights is not None and not args.with_backbone:
        print("eleatt export: error: --weights only applies with --with-backbone", file=sys.stderr)
        return EXIT_USAGE
    _require_onnx(args.format)
    check_outputs(args.ckpt, args.out, args.weights)  # before the checkpoint and backbone load
    module, info = build_models(args.ckpt, with_backbone=args.with_backbone, step=args.step, weights=args.weights)
    path = export_module(module, info, args.format, args.out)
    kind = "one-step" if args.step else "whole-sequence"
    print(f"wrote {path} ({args.format}, {kind} model{' with backbone' if args.with_backbone else ''}; "
          f"inputs {', '.join(info['inputs'])}) and {path}.json")
    if args.check:
        worst = check_export(module, info, path, args.format)
        print(f"check: max |exported - eager| = {worst:.2e} on random inputs")
    return EXIT_OK
