"""Batch mode: `python -m sparse_viz.analysis batch --config configs/analysis/prompts.yaml`.

Runs token masking for every entry of a YAML file with one model loaded once (seed 001's
phase 1.1 format):

    model: path/to/checkpoint        # optional here; --model overrides
    output: results/batch            # optional; --output overrides
    prompts:                         # or the list alone as the whole file
      - name: piggy_describe         # letters, digits, _ . - ; unique; names the output folder
        prompt: "Describe this"
        image: testimg.png           # or images: [a.png, b.jpg]; paths relative to the cwd
        num_tokens: 3                # optional, default 1
        mask: vision                 # optional: text (default) | vision | all
        layers: "0-3"                # optional, default all

Unknown keys are rejected. Each entry writes `<output>/<name>/` exactly like `mask`; the whole
`<output>` folder is written at the end (`sparse_viz.output_dir`: a new or empty folder, or an
earlier batch result replaced with `overwrite`; the default is a new `results/batch-<date>-<time>`); an entry with bad input (missing image, unknown key, image on a text-only
model, ...) is reported on stderr by name and the others still run. `<output>/index.html`
and `index.json` list every entry with its status and a link to its report. The exit status is
2 when the file itself is bad (nothing runs) or when any entry failed, 0 otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_viz.errors import UserInputError
from sparse_viz.output_dir import check_output_dir, default_output_dir, write_output_dir

TOP_LEVEL_KEYS = ("model", "output", "device", "dtype", "prompts")
ENTRY_KEYS = ("name", "prompt", "image", "images", "num_tokens", "mask", "layers")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class BatchEntry:
    """One validated entry of the YAML list."""

    name: str
    prompt: str
    images: list[str] = field(default_factory=list)
    num_tokens: int = 1
    mask: str = "text"
    layers: str | list[int] | None = None


@dataclass
class BatchConfig:
    """The parsed file: settings, valid entries, and (name, message) of the invalid ones."""

    entries: list[BatchEntry]
    invalid: list[tuple[str, str]]
    model: str | None = None
    output: str | None = None
    device: str | None = None
    dtype: str | None = None


def _entry_label(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"]:
        return raw["name"]
    return f"#{index + 1}"


def parse_entry(raw: Any) -> BatchEntry:
    """Validate one entry.

    Raises:
        UserInputError: not a mapping, unknown keys, missing/invalid fields.
    """
    from sparse_viz.analysis.masking.vision import MASK_KINDS

    if not isinstance(raw, dict):
        raise UserInputError(f"an entry must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(ENTRY_KEYS))
    if unknown:
        raise UserInputError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ENTRY_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise UserInputError("'name' is required: letters, digits, '_', '.', '-' (it names the output folder)")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserInputError("'prompt' is required and must be non-empty text")
    if "image" in raw and "images" in raw:
        raise UserInputError("give 'image' or 'images', not both")
    images = raw.get("images", [raw["image"]] if "image" in raw else [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise UserInputError("'image'/'images' must be a path or a list of paths")
    num_tokens = raw.get("num_tokens", 1)
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise UserInputError(f"'num_tokens' must be an integer >= 1, got {num_tokens!r}")
    mask = raw.get("mask", "text")
    if mask not in MASK_KINDS:
        raise UserInputError(f"'mask' must be one of {', '.join(MASK_KINDS)}, got {mask!r}")
    if mask == "vision" and not images:
        raise UserInputError("mask: vision needs an image")
    layers = raw.get("layers")
    if layers is not None and not isinstance(layers, (str, list)):
        raise UserInputError("'layers' must be a spec like \"0-3,5\" or a list of integers")
    return BatchEntry(name=name, prompt=prompt, images=list(images), num_tokens=num_tokens, mask=mask, layers=layers)


def load_batch_config(path: str | Path) -> BatchConfig:
    """Read and validate the YAML file; bad entries are collected, not raised.

    Raises:
        UserInputError: unreadable or malformed file, unknown top-level keys, no entries.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"batch config {str(path)!r} does not exist")
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read batch config {str(path)!r}: {error}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UserInputError(f"batch config {str(path)!r} is not valid YAML{line}") from None
    settings: dict = {}
    if isinstance(document, dict):
        unknown = sorted(set(map(str, document)) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise UserInputError(
                f"batch config {str(path)!r}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_LEVEL_KEYS)}"
            )
        settings = {k: document[k] for k in TOP_LEVEL_KEYS if k != "prompts" and document.get(k) is not None}
        for key, value in settings.items():
            if not isinstance(value, str):
                raise UserInputError(f"batch config {str(path)!r}: {key!r} must be text")
        document = document.get("prompts")
    if not isinstance(document, list) or not document:
        raise UserInputError(f"batch config {str(path)!r} must hold a non-empty list of prompts")
    entries, invalid, seen = [], [], set()
    for index, raw in enumerate(document):
        label = _entry_label(raw, index)
        try:
            entry = parse_entry(raw)
            if entry.name in seen:
                raise UserInputError("duplicate name")
        except UserInputError as error:
            invalid.append((label, str(error)))
            continue
        seen.add(entry.name)
        entries.append(entry)
    return BatchConfig(entries=entries, invalid=invalid, **settings)


def run_entry(entry: BatchEntry, model: Any, output: Path, report: bool = True) -> int:
    """Run one entry with the loaded model into `output/<name>`; returns the number of rows.

    Raises:
        UserInputError: the entry's bad input (missing image, image on a text-only model, ...).
    """
    from sparse_viz.analysis.masking.experiment import run_masking_experiment
    from sparse_viz.analysis.masking.outputs import write_masking_outputs
    from sparse_viz.pretrained.vision import is_vision_model, load_image

    images = [load_image(path) for path in entry.images]
    target = output / entry.name
    if is_vision_model(model.model):
        from sparse_viz.analysis.masking.vision import run_vision_masking_experiment
        from sparse_viz.report.vision import write_vision_outputs

        results = run_vision_masking_experiment(
            entry.prompt, images, model=model, mask=entry.mask, num_tokens=entry.num_tokens, layers=entry.layers
        )
        metadata = results.attrs["metadata"]
        metadata["vision"]["images"] = list(entry.images)
        extra = lambda staging: write_vision_outputs(staging, results, metadata, report=report)  # noqa: E731
    else:
        if images:
            raise UserInputError(f"model {model.name_or_path!r} is a text-only model; images need a Qwen3-VL checkpoint")
        results = run_masking_experiment(entry.prompt, model=model, num_tokens=entry.num_tokens, layers=entry.layers)
        metadata, extra = results.attrs["metadata"], None
    metadata["batch_entry"] = entry.name
    write_masking_outputs(target, results, metadata, report=report, extra_outputs=extra)
    return len(results)


def run_batch(
    config_path: str | Path,
    model_name: str | None = None,
    output: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    report: bool = True,
    model: Any = None,
    stderr: Any = None,
    overwrite: bool = False,
) -> list[dict]:
    """Run every entry; returns one status dict per entry (name, status, rows|error, files).

    The output folder (`output`, else the config's, else a new `results/batch-<date>-<time>`) is
    written whole at the end; `overwrite` lets it replace an earlier batch result
    (`sparse_viz.output_dir`).

    Raises:
        UserInputError: a bad file, or no model given (nothing runs then).
    """
    from sparse_viz.pretrained.loading import load_model

    stderr = stderr or sys.stderr
    config = load_batch_config(config_path)
    model_name = model_name or config.model
    if model is None and not model_name:
        raise UserInputError("no model: pass --model or set 'model' in the batch config")
    out_dir = check_output_dir(output or config.output or default_output_dir("batch"), overwrite=overwrite)
    statuses: list[dict] = [{"name": name, "status": "error", "error": message} for name, message in config.invalid]
    for name, message in config.invalid:
        print(f"batch entry {name!r}: {message}", file=stderr)
    if config.entries and model is None:
        model = load_model(model_name, device=device or config.device or "auto", dtype=dtype or config.dtype or "float32")
    with write_output_dir(out_dir, written_by="run_batch", overwrite=overwrite) as staging:
        for entry in config.entries:
            try:
                rows = run_entry(entry, model, staging, report=report)
            except UserInputError as error:
                print(f"batch entry {entry.name!r}: {error}", file=stderr)
                statuses.append({"name": entry.name, "status": "error", "error": str(error)})
                continue
            files = sorted(p.name for p in (staging / entry.name).iterdir() if p.suffix == ".html")
            statuses.append({"name": entry.name, "status": "ok", "rows": rows, "mask": entry.mask, "files": files})
            print(f"batch entry {entry.name!r}: {rows} rows")
        write_batch_index(staging, statuses, str(config_path), str(model_name or getattr(model, "name_or_path", "")))
    print(f"batch written to {out_dir}")
    return statuses


def write_batch_index(out_dir: Path, statuses: list[dict], config_path: str, model_name: str) -> None:
    """index.json and index.html (links to each entry's reports, errors by name)."""
    from sparse_viz.report.html import render_report, write_text_atomic

    data = {"config": config_path, "model": model_name, "entries": statuses}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "index.json", json.dumps(data, indent=1))
    render_report("vision_batch.html.j2", out_dir / "index.html", title="Batch masking runs", data=data)
