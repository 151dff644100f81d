"""The `eleatt` command line (also `python -m pipeline`).

`fit|validate|test|predict` go to the LightningCLI (`pipeline.training.cli`); every other subcommand has its own
parser in its own module, imported only when that subcommand runs so that `eleatt --help` stays fast.
Each subcommand's `main(argv) -> int` returns the design's exit codes: 0 all done, 3 some inputs failed,
2 usage errors and refused runs. The dispatcher gives every subcommand, present and future, the same treatment of
what escapes it: ValueError/FileNotFoundError and OSErrors naming a file become one line and exit 2, Ctrl-C becomes
exit 130 with one line saying what was kept and the command that resumes (`pipeline.errors.set_interrupt_note`).
"""
from __future__ import annotations

import importlib
import sys

LIGHTNING_COMMANDS = {
    "fit": "train an EleAtt classifier on a feature folder (Lightning CLI: --config NAME or FILE)",
    "validate": "score a checkpoint on the validation list (writes scores_val.npz and a confusion matrix)",
    "test": "score a checkpoint on the test list (writes scores_test.npz and a confusion matrix)",
    "predict": "score a checkpoint on an unlabelled list (writes scores_predict.npz)",
}

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("pipeline.run", "main", "your folder of videos end to end: lists, flow, features, both streams, test, fuse, report (resumable)"),
    "prepare": ("preprocessing.prepare", "main", "write train/val/test lists and classes.txt (official splits, folders, synthetic)"),
    "extract": ("preprocessing.extract", "main", "extract per-frame timm backbone features into a feature folder (resumable)"),
    "flow": ("preprocessing.flow", "main", "compute dense optical flow into a flow folder (resumable); import/export JPEG flow"),
    "classify": ("pipeline.serving.classify", "main", "classify video files with a trained checkpoint"),
    "fuse": ("pipeline.evaluation.fusion", "main", "fuse the scores files of several streams (weighted, optional weight search)"),
    "demo": ("pipeline.demo", "main", "run the two-stream pipeline end to end on a generated dataset (make demo)"),
    "export": ("pipeline.serving.export", "main", "export a checkpoint for serving: ONNX, torch.export or TorchScript"),
    "visualize": ("pipeline.serving.visualize", "main", "draw a checkpoint's attention gates and class probabilities over time for one video"),
    "configs": ("pipeline.arguments", "configs_main", "list the packaged configs (--config NAME finds them from any folder), or print one"),
}

STREAM_MODULE = "pipeline.serving.streaming"  # `eleatt classify --stream SOURCE ...`

from pipeline.errors import (
    EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, interrupt_message, is_user_error, quiet_broken_pipe, set_interrupt_note,
    usage_error, watch_interrupts,
)


def usage() -> str:
    lines = ["usage: eleatt <command> [options]   (eleatt <command> --help for each)", "", "commands:"]
    for name, text in LIGHTNING_COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    for name, (_, _, text) in COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    return "\n".join(lines)


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_COMMANDS:
        from pipeline.training.cli import main as lightning_main

        return lightning_main(argv)
    if command not in COMMANDS:
        print(f"eleatt: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    module, function, _ = COMMANDS[command]
    if command == "classify" and any(a == "--stream" or a.startswith("--stream=") for a in rest):
        module = STREAM_MODULE  # online recognition: `classify --stream SOURCE` has its own parser
    set_interrupt_note(None)
    with watch_interrupts() as ctrl_c:
        try:
            return _run(command, getattr(importlib.import_module(module), function), rest)
        except SystemExit as exit_:
            if ctrl_c.happened:  # a library caught the Ctrl-C and exited by itself (Lightning's predict loop)
                print(interrupt_message(command, rest), file=sys.stderr)
                return EXIT_INTERRUPTED
            raise


def _run(command: str, entry, rest: list[str]) -> int:
    try:
        return int(entry(rest) or 0)
    except KeyboardInterrupt:
        print(interrupt_message(command, rest), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:
        if not is_user_error(err):
            raise  # not about the user's input: a real failure, keep its traceback
        return usage_error(command, err)  # one clear line naming the file and the fix


if __name__ == "__main__":
    sys.exit(main())
