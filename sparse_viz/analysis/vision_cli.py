"""The `mask` command, extended for Qwen3-VL: `--image a.png --image b.jpg`, `--mask text|vision|all`.

Registered over `cli.py`'s `mask` (imported through `cli.COMMAND_MODULES`): text-only models
without images go to the original `run_mask` unchanged; Qwen3-VL checkpoints (or any run with
an image) go to `vision_masking.run_vision_masking_experiment`, chat template on by default.
Outputs are token masking's (CSV/JSON/metadata/report.html, with the extra columns) plus the
vision token map, the heatmap PNGs and `vision_report.html` (see `report.vision`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparse_viz.analysis.cli import add_mask_arguments, check_output_dir, register_command, resolve_prompt, run_mask
from sparse_viz.errors import UserInputError


def add_vision_mask_arguments(parser: argparse.ArgumentParser) -> None:
    add_mask_arguments(parser)
    parser.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image for the prompt (repeat for several)"
    )
    parser.add_argument(
        "--mask",
        default="text",
        help="which tokens to mask on VL prompts: text (default; every non-image token), vision, all",
    )
    parser.add_argument(
        "--vision-attention",
        default="causal",
        help="causal (default: what Qwen3-VL does) or bidirectional (a labelled COUNTERFACTUAL: "
        "tokens of one image see each other both ways, seed 001's assumption)",
    )
    parser.add_argument(
        "--no-chat", action="store_true", help="VL models: don't apply the chat template (it is on by default)"
    )


def peek_model_type(name: str) -> str | None:
    """model_type from a local directory's config.json (or a hub id's config when online),
    without loading weights; None when it cannot be read (load_model then reports why)."""
    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        if Path(name).expanduser().exists() or name.count("/") != 1:
            return None
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(name).model_type
        except Exception:  # offline, unknown id: load_model gives the one-line error
            return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None  # load_model reports it properly


def run_vision_mask(args: argparse.Namespace) -> object:
    from sparse_viz.analysis.vision import VISION_MODEL_TYPES
    from sparse_viz.analysis.vision_masking import check_mask_request

    check_mask_request(args.mask, len(args.image))
    from sparse_viz.analysis.vision_masking import VISION_ATTENTION

    if args.vision_attention not in VISION_ATTENTION:
        raise UserInputError(f"unknown --vision-attention {args.vision_attention!r}; use causal or bidirectional")
    if args.vision_attention != "causal":
        print("note: --vision-attention bidirectional is a COUNTERFACTUAL, not what Qwen3-VL computes", file=sys.stderr)
    model_type = peek_model_type(args.model)
    if model_type not in VISION_MODEL_TYPES:
        if args.image and model_type is not None:
            raise UserInputError(
                f"model {args.model!r} is a text-only model ({model_type}); --image needs a Qwen3-VL checkpoint"
            )
        if not args.image:
            # Text models, and models whose type cannot be read (run_mask reports why): the text
            # command, unchanged (--mask text/all = every position).
            return run_mask(args)
    if args.num_tokens < 1:
        raise UserInputError(f"--num-tokens must be >= 1, got {args.num_tokens}")
    if args.positions is not None:
        raise UserInputError("--positions is not supported on VL prompts; use --mask text|vision|all")
    from sparse_viz.analysis.vision import load_image

    images = [load_image(path) for path in args.image]  # bad images fail before the model loads
    output = check_output_dir(args.output or "results/masking")
    prompt = resolve_prompt(args)

    from sparse_viz.analysis.token_masking import write_masking_outputs
    from sparse_viz.analysis.vision_masking import run_vision_masking_experiment
    from sparse_viz.report.vision import write_vision_outputs

    results = run_vision_masking_experiment(
        prompt,
        images,
        model_name=args.model,
        mask=args.mask,
        device=args.device,
        dtype=args.dtype,
        num_tokens=args.num_tokens,
        layers=args.layers,
        exclude_first_token=args.exclude_first_token,
        chat=not args.no_chat,
        method=args.method,
        trust_remote_code=args.trust_remote_code,
        progress=True,
        verbose=True,
        vision_attention=args.vision_attention,
    )
    metadata = results.attrs["metadata"]
    metadata["vision"]["images"] = list(args.image)
    write_masking_outputs(
        output,
        results,
        metadata,
        report=not args.no_report,
        extra_outputs=lambda staging: write_vision_outputs(staging, results, metadata, report=not args.no_report),
    )
    print(f"generated: {metadata['generated_text']!r}")
    print(f"{len(results)} rows written to {output}")
    return results


register_command(
    "mask",
    add_vision_mask_arguments,
    run_vision_mask,
    help="token masking impact per layer (seed 000); Qwen3-VL prompts with --image (seed 001)",
)
