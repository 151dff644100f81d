"""A run's report: the accuracy table of each stream (and baselines, with chance level), training curves,
confusion matrices with class names, the attention picture and the commands that reproduce each stage.

Writes `report.html` (images embedded, so the file can be mailed or moved alone) and `report.md` (links to the
PNGs beside it) into one folder. Streams are a list, so one stream (RGB) and two streams plus their fusion go
through the same call.
"""
from __future__ import annotations

import base64
import html
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.paths import atomic_write
from pipeline.evaluation.scores import accuracy_summary, read_scores
from pipeline.evaluation.plots import confusion_matrix, plot_confusion, plot_curves
from pipeline.errors import InputNotFoundError, UsageError


REPRODUCE = "Reproduce, stage by stage"


@dataclass
class Stream:
    """One row of the report: a name ("RGB", "flow", "fused"), the scores file of the test list, and the run folder
    of its training (metrics.csv for the curves; None for a fusion, which has no training)."""

    name: str
    scores: str | os.PathLike
    run: str | os.PathLike | None = None
    note: str = ""


@dataclass
class StreamMetrics:
    name: str
    top1: float
    topk: float
    mca: float
    videos: int
    note: str = ""
    classes: list[str] = field(default_factory=list)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "stream"


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _topk_key(summary: dict) -> str:
    return next(k for k in summary if k.startswith("top") and k != "top1")


def stream_metrics(stream: Stream) -> tuple[StreamMetrics, dict]:
    """The accuracy summary of a stream's scores file, and the scores themselves."""
    path = Path(stream.scores)
    if not path.is_file():
        raise InputNotFoundError(f"scores file '{path}' of stream {stream.name!r} not found (`eleatt test` writes "
                                "scores_test.npz into the run folder; `eleatt fuse` the fused one)")
    scores = read_scores(path)
    summary = accuracy_summary(scores["scores"], scores["labels"])
    if summary is None:
        raise UsageError(f"scores file '{path}' of stream {stream.name!r} has no labelled video to measure")
    classes = [str(c) for c in scores["classes"]] if "classes" in scores else []
    metrics = StreamMetrics(stream.name, summary["top1"], summary[_topk_key(summary)], summary["mca"],
                            int((scores["labels"] >= 0).sum()), stream.note, classes)
    return metrics, scores


def write_report(
    out: str | os.PathLike,
    streams: list[Stream],
    baselines: dict[str, dict] | None = None,
    attention: str | os.PathLike | None = None,
    commands: list[tuple[str, str]] | None = None,
    title: str = "EleAtt run report",
    intro: str = "",
    images: list[tuple[str, str | os.PathLike]] | None = None,
    left_out: list[dict] | None = None,
) -> Path:
    """Writes `<out>/report.html` and `<out>/report.md` (and the PNGs they show) and returns the HTML path.

    streams: the rows of the table, in order (e.g. RGB, flow, fused); each gets a confusion matrix, and each with
        a run folder a line on the training-curves figure.
    baselines: more rows, {name: a dict with top1, top<k>, mca} (e.g. `pipeline.evaluation.baseline.order_blind_baseline`).
    attention: the attention picture (a PNG; copied beside the report when it lies elsewhere).
    commands: (stage, command line) pairs that reproduce each stage on a real dataset.
    images: more (caption, PNG) pairs shown at the end.
    left_out: the videos left out of every stream ({"video", "stage", "reason"}, e.g. `eleatt run`'s
        problems.jsonl), listed after the table.
    """
    if not streams:
        raise UsageError("write_report needs at least one stream")
    seen: dict[str, str] = {}
    for stream in streams:  # each stream's picture has a file of its own, and a line of its own in the curves
        other = seen.setdefault(_slug(stream.name), stream.name)
        if other != stream.name or sum(s.name == stream.name for s in streams) > 1:
            raise UsageError(f"streams {other!r} and {stream.name!r} would share confusion_{_slug(stream.name)}.png; "
                             "give the streams names that differ in more than case and punctuation")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, figures = [], []  # figures: (heading, caption, file name inside out)
    num_classes = None
    k = None
    for stream in streams:
        metrics, scores = stream_metrics(stream)
        rows.append(metrics)
        c = scores["scores"].shape[1]
        if num_classes is not None and c != num_classes:
            raise UsageError(f"stream {stream.name!r} has {c} classes, the first stream {num_classes}; a report "
                             "compares streams of one label space")
        num_classes, k = c, min(5, c)
        cm = confusion_matrix(scores["scores"], scores["labels"], c)
        name = f"confusion_{_slug(stream.name)}.png"
        plot_confusion(cm, out / name, metrics.classes or None,
                       title=f"{stream.name}: confusion on the test list (top-1 {_percent(metrics.top1)})")
        figures.append(("Confusion matrices", f"{stream.name}: rows true class, columns predicted; numbers are "
                                              "video counts, colour the fraction of the true class", name))
    curves = {s.name: s.run for s in streams if s.run is not None and (Path(s.run) / "metrics.csv").is_file()}
    if curves:
        plot_curves(curves, out / "curves.png", title="training curves: " + ", ".join(curves))
        figures.insert(0, ("Training curves", "loss per epoch (solid: train, dashed: validation) and validation "
                                              "top-1, one colour per stream", "curves.png"))
    if attention is not None:
        attention = Path(attention)
        if not attention.is_file():
            raise InputNotFoundError(f"attention picture '{attention}' not found")
        if attention.resolve().parent != out.resolve():
            shutil.copyfile(attention, out / attention.name)
        figures.append(("Attention", "the first gated layer's gate values (elements x steps) for a few test videos, "
                                     "next to a few of their frames (in the spirit of the EleAtt paper's Fig. 3)",
                        attention.name))
    for caption, path in images or []:
        path = Path(path)
        if path.resolve().parent != out.resolve():
            shutil.copyfile(path, out / path.name)
        figures.append(("More", caption, path.name))

    for name, summary in (baselines or {}).items():
        rows.append(StreamMetrics(name, summary["top1"], summary[_topk_key(summary)], summary["mca"],
                                  int((np.asarray(summary.get("labels", [])) >= 0).sum()), summary.get("note", "")))
    chance = StreamMetrics("chance level", 1.0 / num_classes, k / num_classes, 1.0 / num_classes, 0,
                           f"{num_classes} classes")
    header = ["", "top-1", f"top-{k}", "mean class accuracy", "test videos", ""]
    table = [[r.name, _percent(r.top1), _percent(r.topk), _percent(r.mca), str(r.videos or ""), r.note]
             for r in [*rows, chance]]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    left = [(str(p.get("video", "")), str(p.get("stage", "")), str(p.get("reason", ""))) for p in left_out or []]
    _write_markdown(out / "report.md", title, intro, stamp, header, table, figures, commands or [], left)
    path = out / "report.html"
    _write_html(path, out, title, intro, stamp, header, table, figures, commands or [], left)
    return path


LEFT_OUT = "Videos left out"
LEFT_OUT_NOTE = "left out of every stream's training and test, each with the stage where it failed and why:"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _write_markdown(path: Path, title, intro, stamp, header, table, figures, commands, left=()) -> None:
    lines = [f"# {title}", "", f"_written {stamp}_", ""]
    if intro:
        lines += [intro, ""]
    lines += ["## Accuracy on the test list", "", "| " + " | ".join(header) + " |",
              "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    if left:
        lines += ["", f"## {LEFT_OUT}", "", f"{len(left)} video(s) {LEFT_OUT_NOTE}", "", "| video | stage | reason |",
                  "|---|---|---|"]
        lines += [f"| {_cell(v)} | {_cell(s)} | {_cell(r)} |" for v, s, r in left]
    heading = None
    for section, caption, name in figures:
        if section != heading:
            lines += ["", f"## {section}"]
            heading = section
        lines += ["", f"![{caption}]({name})", "", f"_{caption}_"]
    if commands:
        lines += ["", f"## {REPRODUCE}", ""]
        for stage, command in commands:
            lines += [f"{stage}:", "", "```bash", command, "```", ""]
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def _write_html(path: Path, out: Path, title, intro, stamp, header, table, figures, commands, left=()) -> None:
    e = html.escape
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}"
        "td:first-child,td:last-child{text-align:left}img{max-width:100%;border:1px solid #eee}"
        "pre{background:#f4f4f4;padding:8px;overflow-x:auto}figure{margin:1em 0}"
        "figcaption{color:#555;font-size:90%}</style></head><body>",
        f"<h1>{e(title)}</h1>", f"<p><em>written {e(stamp)}</em></p>",
    ]
    if intro:
        parts.append(f"<p>{e(intro)}</p>")
    parts.append("<h2>Accuracy on the test list</h2><table>")
    parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    for row in table:
        parts.append("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>")
    parts.append("</table>")
    if left:
        parts.append(f"<h2>{e(LEFT_OUT)}</h2><p>{len(left)} video(s) {e(LEFT_OUT_NOTE)}</p><table>"
                     "<tr><th>video</th><th>stage</th><th>reason</th></tr>")
        parts += [f"<tr><td>{e(v)}</td><td>{e(s)}</td><td>{e(r)}</td></tr>" for v, s, r in left]
        parts.append("</table>")
    heading = None
    for section, caption, name in figures:
        if section != heading:
            parts.append(f"<h2>{e(section)}</h2>")
            heading = section
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{e(name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(caption)} ({e(name)})</figcaption></figure>")
    if commands:
        parts.append(f"<h2>{e(REPRODUCE)}</h2>")
        for stage, command in commands:
            parts.append(f"<p>{e(stage)}:</p><pre>{e(command)}</pre>")
    parts.append("</body></html>")
    with atomic_write(path, "w") as f:
        f.write("\n".join(parts) + "\n")
