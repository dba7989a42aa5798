"""`python -m sparse_viz.analysis <command> ...`: every subcommand's options, in one place.

Each subcommand is an `add_*_arguments(parser)` and a `run_*(args)` that checks what it can
before a model loads, then calls the library (`masking/`, `ablation/`, `batch.py`), which never
imports this module. Bad input becomes `UserInputError`: one line on stderr, exit status 2.

    mask        token masking: what each key token matters to each layer; Qwen3-VL prompts with --image
    heads       head ablation
    components  component ablation of q/k/v/o projections
    impact      all-pairs attention impact and its agreement with selections of keys
    sparse-eval perplexity of a model whose layers attend to k selected keys, per selector and k
    batch       token masking for a YAML list of prompts
    generate    text from a model attending to k selected keys, through its caches (prefill/decode speeds)

Examples:
    python -m sparse_viz.analysis mask --model .cache/smollm2-135m --prompt "The capital of France is"
    python -m sparse_viz.analysis heads --model DIR --sweep --batch-size 32 --output results/heads
    python -m sparse_viz.analysis components --model DIR --ablate 3.o_proj:0-3 --mode adversarial --ci-default 0.5
    python -m sparse_viz.analysis components --model DIR --sweep 3.o_proj 3.q_proj:0-63 --output results/sweep
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sparse_viz.analysis.index_spec import parse_index_spec
from sparse_viz.errors import UserInputError, exit_on_user_error
from sparse_viz.output_dir import check_output_dir, default_output_dir

PROG = "python -m sparse_viz.analysis"


# -- options every command shares ---------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --prompt/--prompt-file, --device, --dtype, --chat, --output, --trust-remote-code.

    --device and --dtype are validated when the model loads (one-line error), not by argparse.
    """
    parser.add_argument("--model", required=True, help="local model directory or hub id (hub only when online)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument(
        "--prompt-file", help="file whose whole content is the prompt (default: ./prompt.txt if present)"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    add_output_arguments(parser)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    parser.add_argument("--attention", default="own", choices=("own", "dense"),
                        help="a DSA training checkpoint (.ckpt) runs its own selector (default) or dense attention")


OUTPUT_HELP = (
    "folder for the results (default: a new folder results/<command>-<date>-<time>). It is written "
    "whole at the end; an existing folder must be empty, or an earlier result of sparse_viz replaced "
    "with --overwrite. A folder holding anything else is never touched: the command stops first")


def add_output_arguments(parser: argparse.ArgumentParser, default_help: str | None = None) -> None:
    """--output and --overwrite, the same for every command that writes a folder."""
    parser.add_argument("--output", default=None, help=default_help or OUTPUT_HELP)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output if it holds an earlier sparse_viz result (and nothing else)")


def output_dir(args: argparse.Namespace) -> Path:
    """The checked output folder of a command (before any model loads): --output, or a new
    results/<command>-<date>-<time>.

    Raises:
        UserInputError: see `sparse_viz.output_dir.check_output_dir`.
    """
    return check_output_dir(args.output or default_output_dir(args.command), overwrite=args.overwrite)


def resolve_prompt(args: argparse.Namespace) -> str:
    """The prompt text from --prompt, --prompt-file, ./prompt.txt or the built-in default; the
    built-in default is announced on stderr, so a run without --prompt is never silent about it.

    Raises:
        UserInputError: unreadable prompt file or empty prompt.
    """
    from sparse_viz.pretrained.prompts import DEFAULT_PROMPT, DEFAULT_PROMPT_FILE, read_prompt

    prompt, prompt_file = getattr(args, "prompt", None), getattr(args, "prompt_file", None)
    if prompt is None and prompt_file is None and not DEFAULT_PROMPT_FILE.is_file():
        print(f"note: no --prompt, --prompt-file or ./{DEFAULT_PROMPT_FILE}: using the built-in prompt "
              f"{DEFAULT_PROMPT!r}", file=sys.stderr)
    return read_prompt(prompt, prompt_file)


def attention_suffix(loaded) -> str:
    """" (attention: topk k=32)" for a model attending through a key selection (a DSA checkpoint), else ""."""
    selection = loaded.adapter.selection
    return "" if selection is None else f" (attention: {selection.label})"


# -- mask ---------------------------------------------------------------------------------------


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--num-tokens", type=int, default=1, help="generation steps G >= 1 (step 0 = prompt)")
    parser.add_argument("--layers", default=None, help='layers to analyse, e.g. "0,3,5-9" (default: all)')
    parser.add_argument("--positions", default=None, help='key positions to mask, e.g. "0-4,7" (default: all)')
    parser.add_argument("--exclude-first-token", action="store_true", help="never mask position 0")
    parser.add_argument(
        "--method", default="fast", choices=("fast", "reference"), help="fast (default) or brute-force reference"
    )
    parser.add_argument("--no-report", action="store_true", help="skip report.html")
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
        "tokens of one image see each other both ways in every layer, which the model does not do)",
    )
    parser.add_argument(
        "--no-chat", action="store_true", help="VL models: don't apply the chat template (it is on by default)"
    )


def run_text_mask(args: argparse.Namespace) -> object:
    # Cheap checks first: bad input is reported before torch and the model load.
    if args.num_tokens < 1:
        raise UserInputError(f"--num-tokens must be >= 1, got {args.num_tokens}")
    output = output_dir(args)
    prompt = resolve_prompt(args)

    from sparse_viz.analysis.masking.experiment import run_masking_experiment
    from sparse_viz.analysis.masking.outputs import write_masking_outputs

    results = run_masking_experiment(
        prompt=prompt,
        model_name=args.model,
        device=args.device,
        dtype=args.dtype,
        num_tokens=args.num_tokens,
        layers=args.layers,
        positions=args.positions,
        exclude_first_token=args.exclude_first_token,
        chat=args.chat,
        method=args.method,
        trust_remote_code=args.trust_remote_code,
        progress=True,
        attention=args.attention,
    )
    metadata = results.attrs["metadata"]
    write_masking_outputs(output, results, metadata, report=not args.no_report, overwrite=args.overwrite)
    print(f"generated: {metadata['generated_text']!r}")
    print(f"{len(results)} rows written to {output}")
    return results


def run_mask(args: argparse.Namespace) -> object:
    """Text models go to the text experiment; Qwen3-VL checkpoints (or any run with an image)
    to the vision one, chat template on by default."""
    from sparse_viz.analysis.masking.vision import VISION_ATTENTION, check_mask_request
    from sparse_viz.pretrained.loading import peek_model_type
    from sparse_viz.pretrained.vision import VISION_MODEL_TYPES

    check_mask_request(args.mask, len(args.image))

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
            # Text models, and models whose type cannot be read (run_text_mask reports why): the text
            # command, unchanged (--mask text/all = every position).
            return run_text_mask(args)
    if args.num_tokens < 1:
        raise UserInputError(f"--num-tokens must be >= 1, got {args.num_tokens}")
    if args.positions is not None:
        raise UserInputError("--positions is not supported on VL prompts; use --mask text|vision|all")
    from sparse_viz.pretrained.vision import load_image

    images = [load_image(path) for path in args.image]  # bad images fail before the model loads
    output = output_dir(args)
    prompt = resolve_prompt(args)

    from sparse_viz.analysis.masking.outputs import write_masking_outputs
    from sparse_viz.analysis.masking.vision import run_vision_masking_experiment
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
        overwrite=args.overwrite,
    )
    print(f"generated: {metadata['generated_text']!r}")
    print(f"{len(results)} rows written to {output}")
    return results


# -- heads and components ---------------------------------------------------------------------


def _add_shared(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--prompt-lines", default=None,
                        help="file with one prompt per line: extra sequences of the batch (after --prompt)")
    parser.add_argument("--prediction-positions", type=int, nargs="+", default=None,
                        help="positions for the top-5 prediction table (negative = from the end; default: -1)")
    parser.add_argument("--no-patterns", action="store_true", help="do not capture attention patterns (faster)")


def _inputs(args: argparse.Namespace, loaded):
    """(N, T) input ids, attention mask (None when nothing is padded) and the prompt texts."""
    from sparse_viz.pretrained.prompts import encode_prompts

    prompts = [resolve_prompt(args)]
    if args.prompt_lines:
        try:
            with open(args.prompt_lines, encoding="utf-8") as handle:
                prompts += [line.rstrip("\n") for line in handle if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise UserInputError(f"cannot read --prompt-lines file {args.prompt_lines!r}: {type(error).__name__}") from error
    ids, mask = encode_prompts(loaded.tokenizer, prompts, loaded.device, chat=args.chat,
                               max_positions=loaded.adapter.max_positions)
    return ids, (None if bool(mask.all()) else mask), prompts


def run_metadata(args: argparse.Namespace, loaded, prompts: list[str], load_seconds: float) -> dict:
    """What an ablation command ran, for its metadata.json: the model, the prompts, every
    command-line argument as parsed, and the load time.

    Args:
        args: the parsed command line.
        loaded: the `LoadedModel`.
        prompts: the prompt texts, in batch order.
        load_seconds: time to load the model.

    Returns:
        {command, model, model_type, device, dtype, attention, prompts, arguments, timings}.
    """
    from sparse_viz.analysis.masking.experiment import attention_label

    arguments = {key: value for key, value in vars(args).items() if key != "command"}
    return {
        "command": args.command, "model": str(loaded.name_or_path), "model_type": loaded.adapter.model_type,
        "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
        "attention": attention_label(loaded.adapter), "prompts": prompts, "arguments": arguments,
        "timings": {"load_seconds": round(load_seconds, 4)},
    }


# -- heads ------------------------------------------------------------------------------------


def add_heads_arguments(parser: argparse.ArgumentParser) -> None:
    _add_shared(parser)
    parser.add_argument("--ablate", nargs="+", default=[], metavar="L.H", help="heads zeroed together, e.g. 3.5 7.0")
    parser.add_argument("--ablate-kv", nargs="+", default=[], metavar="L.G",
                        help="KV heads whose values are zeroed (= their GQA query-head group)")
    parser.add_argument("--sweep", action="store_true", help="every head alone (batched)")
    parser.add_argument("--sweep-layers", action="store_true", help="all heads of each layer together")
    parser.add_argument("--positions", default=None,
                        help='query positions where heads are zeroed, e.g. "0-4,7" or "-1" (the last; negative = from the end). '
                             'Only those positions and later ones are recomputed (default: all)')
    parser.add_argument("--batch-size", type=int, default=16, help="ablations per forward (default 16)")
    parser.add_argument("--pattern-layers", default=None,
                        help='layers whose ablated patterns are kept, e.g. "0-3" or "all" (default: the layer after each ablation)')


def run_heads(args: argparse.Namespace):
    from sparse_viz.analysis.ablation.components import with_analysis_seconds
    from sparse_viz.analysis.ablation.heads import (
        AttentionLayout,
        build_ablations,
        head_ablation_study,
    )
    from sparse_viz.pretrained.loading import load_model
    from sparse_viz.report.ablation import write_head_ablation_outputs

    output = output_dir(args)
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                        attention=args.attention)
    load_seconds = time.perf_counter() - started
    layout = AttentionLayout.of(loaded.model)
    input_ids, attention_mask, prompts = _inputs(args, loaded)
    analysis_started = time.perf_counter()
    T = input_ids.shape[1]
    positions = parse_index_spec(args.positions, T, what="positions")
    pattern_layers = None
    if args.pattern_layers is not None:
        pattern_layers = parse_index_spec(args.pattern_layers, layout.n_layers, what="pattern-layers")
        pattern_layers = list(range(layout.n_layers)) if pattern_layers is None else pattern_layers
    ablations = build_ablations(layout, ablate=args.ablate, ablate_kv=args.ablate_kv, sweep=args.sweep,
                                sweep_layers=args.sweep_layers, positions=positions)
    result = head_ablation_study(loaded.model, input_ids, ablations, attention_mask=attention_mask,
                                 batch_size=args.batch_size, patterns=not args.no_patterns,
                                 pattern_layers=pattern_layers, prediction_positions=args.prediction_positions,
                                 tokenizer=loaded.tokenizer, progress=True)
    metadata = with_analysis_seconds(run_metadata(args, loaded, prompts, load_seconds), analysis_started)
    write_head_ablation_outputs(result, output, title=f"Head ablation: {loaded.name_or_path}{attention_suffix(loaded)}",
                                metadata=metadata, overwrite=args.overwrite)
    top = result.table.sort_values("kl_divergence", ascending=False).head(10)
    print(top[["ablation", "kl_divergence", "frac_top1_changed", "delta_logprob_top1"]].to_string(index=False))
    print(f"{len(result.table)} ablation(s) written to {output}")
    return result.table


# -- components -------------------------------------------------------------------------------


def add_components_arguments(parser: argparse.ArgumentParser) -> None:
    _add_shared(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--ablate", nargs="+", default=[], metavar="L.PROJ:IDX",
                      help='components ablated together, e.g. 3.o_proj:0,2,5-7 2.q_proj:all (or MODULE_PATH:IDX)')
    what.add_argument("--sweep", nargs="+", default=[], metavar="L.PROJ[:IDX]",
                      help="every component of these modules alone, batched (deterministic mode), e.g. 3.o_proj 2.q_proj:0-31")
    parser.add_argument("--batch-size", type=int, default=16, help="--sweep: components per forward (default 16)")
    parser.add_argument("--decomposition", default=None,
                        help="SPD-style factors (.safetensors/.pt with <module>.V, .U, optional .ci); default: SVD baseline")
    parser.add_argument("--mode", default="deterministic", choices=("deterministic", "stochastic", "adversarial"))
    parser.add_argument("--samples", type=int, default=10, help="stochastic mode: mask samples (default 10)")
    parser.add_argument("--ci-default", type=float, default=1.0,
                        help="causal importance of components without one, in [0, 1] (default 1)")
    parser.add_argument("--pgd-steps", type=int, default=20, help="adversarial mode: PGD steps (default 20)")
    parser.add_argument("--pgd-step-size", type=float, default=0.1, help="adversarial mode: PGD step (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)


def run_components(args: argparse.Namespace):
    from sparse_viz.analysis.ablation.component_sweep import run_component_sweep
    from sparse_viz.analysis.ablation.components import run_component_ablation
    from sparse_viz.pretrained.loading import load_model

    output = output_dir(args)
    if args.sweep and args.mode != "deterministic":
        raise UserInputError(f"--sweep runs deterministic ablations only (got --mode {args.mode}); "
                             "use --ablate for stochastic or adversarial runs")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.mode == "adversarial" and args.decomposition is None and args.ci_default >= 1:
        # SVD components carry no causal importance, so every ci is --ci-default: at 1 the PGD
        # constraint mask = ci + (1 - ci) s pins every mask, and the run IS the deterministic one.
        print("warning: --mode adversarial with SVD components and --ci-default 1 leaves PGD nothing to vary: "
              "the result equals --mode deterministic. Give --ci-default < 1 or --decomposition with ci values.",
              file=sys.stderr)
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                        attention=args.attention)
    input_ids, attention_mask, prompts = _inputs(args, loaded)
    metadata = run_metadata(args, loaded, prompts, time.perf_counter() - started)
    if args.sweep:
        table = run_component_sweep(
            loaded.model, input_ids, args.sweep, tokenizer=loaded.tokenizer, attention_mask=attention_mask,
            decomposition=args.decomposition, batch_size=args.batch_size, patterns=not args.no_patterns,
            prediction_positions=args.prediction_positions, output_dir=output, overwrite=args.overwrite, metadata=metadata,
            title=f"Component sweep: {loaded.name_or_path}{attention_suffix(loaded)}")
        top = table.sort_values("kl_divergence", ascending=False).head(10)
        print(top[["ablation", "component_norm", "kl_divergence", "frac_top1_changed", "delta_logprob_top1"]].to_string(index=False))
        print(f"{len(table)} component(s) written to {output}")
        return table
    table = run_component_ablation(
        loaded.model, input_ids, args.ablate, tokenizer=loaded.tokenizer, attention_mask=attention_mask,
        decomposition=args.decomposition,
        mode=args.mode, n_samples=args.samples, ci_default=args.ci_default, pgd_steps=args.pgd_steps,
        pgd_step_size=args.pgd_step_size, seed=args.seed, patterns=not args.no_patterns,
        prediction_positions=args.prediction_positions, output_dir=output, overwrite=args.overwrite, metadata=metadata,
        title=f"Component ablation ({args.mode}): {loaded.name_or_path}{attention_suffix(loaded)}")
    print(table.T.to_string(header=False))
    print(f"written to {output}")
    return table


# -- impact -------------------------------------------------------------------------------------


def add_impact_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--layers", default=None, help='layers to analyse, e.g. "0,3,5-9" (default: all)')
    parser.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64],
                        help="selection sizes to score against impact (default: 8 16 32 64)")
    parser.add_argument("--sink-tokens", type=int, default=4, help="sinks of the sink_local selection (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random selection")
    parser.add_argument("--block-size", type=int, default=64, help="queries per block (memory ~ block * T * H^2)")
    parser.add_argument("--report-layers", default=None,
                        help='layers embedded in report.html, e.g. "0,15" (default: up to six spread out)')
    parser.add_argument("--no-report", action="store_true", help="skip report.html")


def run_impact(args: argparse.Namespace) -> object:
    """All-pairs impact of every key on every query, and how selections agree with it."""
    if any(k < 1 for k in args.k):
        raise UserInputError(f"--k values must be >= 1, got {args.k}")
    if args.block_size < 1:
        raise UserInputError(f"--block-size must be >= 1, got {args.block_size}")
    if args.sink_tokens < 0:
        raise UserInputError(f"--sink-tokens must be >= 0, got {args.sink_tokens}")
    output = output_dir(args)
    prompt = resolve_prompt(args)

    from sparse_viz.analysis.impact.experiment import run_impact_analysis
    from sparse_viz.analysis.impact.outputs import write_impact_outputs

    result = run_impact_analysis(prompt, args.model, device=args.device, dtype=args.dtype, layers=args.layers,
                                 k=args.k, sink_tokens=args.sink_tokens, seed=args.seed, block_size=args.block_size,
                                 chat=args.chat, trust_remote_code=args.trust_remote_code, progress=True,
                                 attention=args.attention)
    report_layers = parse_index_spec(args.report_layers, max(result.layers) + 1, what="report-layers")
    write_impact_outputs(output, result, report=not args.no_report, report_layers=report_layers,
                         overwrite=args.overwrite)
    if not result.agreement.empty:  # empty: every k >= the prompt's length, warned about by the analysis
        summary = result.agreement.groupby(["k", "selector"])[["impact_recall_at_k", "impact_share"]].mean()
        print(summary.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"{len(result.layers)} layer(s) x {len(result.tokens)} tokens written to {output}")
    return result


# -- sparse-eval ----------------------------------------------------------------------------------


def add_sparse_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local model directory (or hub id when online)")
    parser.add_argument("--corpus", default="shakespeare",
                        help="held-out text: shakespeare (its validation plays, default) or a folder/file of .txt/.md")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default 1024)")
    parser.add_argument("--windows", type=int, default=4, help="windows of held-out text (default 4)")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 32, 64, 128], help="keys per query (default 16 32 64 128)")
    parser.add_argument("--selectors", nargs="+", default=None,
                        help="which selectors (default: dense local sink_local random oracle, and topk with --indexers)")
    parser.add_argument("--indexers", default=None,
                        help="a retrofit run's checkpoint (results/<run>/checkpoints/last.ckpt): its trained "
                             "Lightning Indexers give the topk selector")
    parser.add_argument("--sink-tokens", type=int, default=4, help="sinks of sink_local (default 4)")
    parser.add_argument("--dense-layers", type=int, default=0, help="keep the first N layers dense (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random selector")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    add_output_arguments(parser)
    parser.add_argument("--no-report", action="store_true", help="skip report.html")


def run_sparse_eval(args: argparse.Namespace) -> object:
    """Held-out perplexity of the model with each layer attending to k selected keys, per selector."""
    from sparse_viz.model.config import SELECTORS

    if args.selectors is None:
        args.selectors = ["dense"] + (["topk"] if args.indexers else []) + ["local", "sink_local", "random", "oracle"]
    unknown = sorted(set(args.selectors) - set(SELECTORS))
    if unknown:
        raise UserInputError(f"unknown selector(s) {', '.join(unknown)}; choose from {', '.join(SELECTORS)}")
    if "topk" in args.selectors and not args.indexers:
        raise UserInputError("selector topk needs trained indexers: --indexers results/<retrofit run>/checkpoints/last.ckpt")
    if args.indexers and not Path(args.indexers).is_file():
        raise UserInputError(f"indexer checkpoint not found: {args.indexers}")
    if args.indexers and not Path(args.model).is_dir():
        raise UserInputError(f"--indexers needs --model to be the Hugging Face model directory they were trained on, "
                             f"got {args.model!r}")
    if any(k < 1 for k in args.k):
        raise UserInputError(f"--k values must be >= 1, got {args.k}")
    if args.seq_len < 2 or args.windows < 1 or args.dense_layers < 0:
        raise UserInputError("--seq-len must be >= 2, --windows >= 1 and --dense-layers >= 0")
    from sparse_viz.analysis.sparse_eval.evaluation import check_k_against_length, evaluate_selectors

    if min(args.k) >= args.seq_len:  # refused before the model loads (the analysis warns about single k itself)
        check_k_against_length(sorted(set(args.k)), args.seq_len)
    output = output_dir(args)

    from sparse_viz.analysis.sparse_eval.outputs import write_sparse_eval_outputs
    from sparse_viz.analysis.sparse_eval.windows import held_out_windows
    from sparse_viz.pretrained.loading import load_model
    from sparse_viz.pretrained.retrofit_indexers import load_retrofit_indexers

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if loaded.adapter.max_positions is not None and args.seq_len > loaded.adapter.max_positions:
        raise UserInputError(f"--seq-len {args.seq_len} is longer than the model's context of {loaded.adapter.max_positions}")
    indexers, indexer_settings = None, {}
    if args.indexers:
        indexers = load_retrofit_indexers(args.indexers, args.model, loaded.adapter)
        indexers.to(device=loaded.device, dtype=loaded.dtype).eval()
        indexer_settings = dict(indexer_rope_dim=indexers.settings["rope_dim"],
                                indexer_rope_theta=indexers.settings["rope_theta"])
    windows, documents = held_out_windows(loaded.tokenizer, args.corpus, args.windows, args.seq_len)
    result = evaluate_selectors(loaded, windows.to(loaded.device), k=args.k, selectors=args.selectors,
                                sink_tokens=args.sink_tokens, seed=args.seed, dense_layers=args.dense_layers,
                                indexers=indexers, progress=True, **indexer_settings)
    result.metadata.update({"corpus": args.corpus, "documents": documents, "indexers": args.indexers,
                            "indexer_settings": None if indexers is None else indexers.settings})
    write_sparse_eval_outputs(output, result, report=not args.no_report, overwrite=args.overwrite)
    print(result.table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"written to {output}")
    return result


# -- generate -----------------------------------------------------------------------------------


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local model directory (or hub id when online)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="file whose whole content is the prompt (default: ./prompt.txt if present)")
    parser.add_argument("--selector", default="topk", help="dense, topk (needs --indexers), local, sink_local or "
                        "oracle (top-k of the layer's own attention: a reference, as costly as dense)")
    parser.add_argument("--indexers", default=None, help="a retrofit run's checkpoint: its Lightning Indexers "
                        "give the topk selector (results/<run>/checkpoints/last.ckpt)")
    parser.add_argument("--k", type=int, default=256, help="keys per query (default 256)")
    parser.add_argument("--sink-tokens", type=int, default=4, help="sinks of sink_local (default 4)")
    parser.add_argument("--dense-layers", type=int, default=0, help="keep the first N layers dense (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept when sampling (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")


def run_generate(args: argparse.Namespace) -> object:
    """Generate with sparse attention through the KV cache and the indexer key cache; print the
    text and the prefill and decode speeds."""
    from sparse_viz.pretrained.sparse_inference import INFERENCE_SELECTORS

    if args.selector not in INFERENCE_SELECTORS:
        raise UserInputError(f"--selector must be one of {', '.join(INFERENCE_SELECTORS)}, got {args.selector!r}")
    if args.k < 1:
        raise UserInputError(f"--k must be >= 1, got {args.k}")
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserInputError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    if args.selector == "topk" and not args.indexers:
        raise UserInputError("--selector topk needs trained indexers: --indexers results/<retrofit run>/checkpoints/last.ckpt")
    if args.indexers and not Path(args.indexers).is_file():
        raise UserInputError(f"indexer checkpoint not found: {args.indexers}")
    prompt = resolve_prompt(args)

    from sparse_viz.pretrained.prompts import encode_prompts
    from sparse_viz.pretrained.sparse_inference import load_sparse_model
    from sparse_viz.pretrained.timed_generation import generate_timed

    loaded = load_sparse_model(args.model, args.indexers, args.selector, args.k, args.sink_tokens, args.dense_layers,
                               device=args.device, dtype=args.dtype)
    ids, _ = encode_prompts(loaded.tokenizer, [prompt], loaded.device, chat=args.chat,
                            max_positions=loaded.adapter.max_positions)
    context = loaded.adapter.max_positions
    if context is not None and ids.shape[1] + args.max_new_tokens > context:
        raise UserInputError(f"the prompt's {ids.shape[1]} tokens plus --max-new-tokens {args.max_new_tokens} exceed "
                             f"the model's context of {context}")
    result = generate_timed(loaded.model, ids, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                            eos_token_id=loaded.tokenizer.eos_token_id)
    print(loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True))
    label = loaded.model._sparse_viz_inference.selection.label
    print(f"attention: {label}; prefill {result.prompt_tokens} tokens in {result.prefill_seconds:.2f} s "
          f"({result.prefill_tokens_per_second:.1f} tokens/s); decode {len(result.token_ids) - 1} tokens in "
          f"{result.decode_seconds:.2f} s ({result.decode_tokens_per_second:.2f} tokens/s)", file=sys.stderr)
    return result


# -- batch --------------------------------------------------------------------------------------


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML list of {name, prompt, image(s)?, num_tokens, mask?}")
    parser.add_argument("--model", default=None, help="model directory or hub id (overrides the config's 'model')")
    add_output_arguments(parser, default_help=(
        "folder for the batch: one folder per entry plus index.html (default: the config's 'output', else a "
        "new folder results/batch-<date>-<time>). It is written whole at the end; an existing folder must be "
        "empty, or an earlier batch result of sparse_viz replaced with --overwrite. A folder holding anything "
        "else is never touched: the command stops first"))
    parser.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML reports of the entries")


def run_batch_command(args: argparse.Namespace) -> list[dict]:
    from sparse_viz.analysis.batch import run_batch

    statuses = run_batch(args.config, args.model, args.output, args.device, args.dtype, report=not args.no_report,
                         overwrite=args.overwrite)
    failed = [s["name"] for s in statuses if s["status"] != "ok"]
    if failed:
        raise UserInputError(f"{len(failed)} of {len(statuses)} batch entries failed: {', '.join(failed)}")
    return statuses


# -- entry point --------------------------------------------------------------------------------

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], object]

# name -> (help, options, run)
COMMANDS: dict[str, tuple[str, AddArguments, Run]] = {
    "mask": ("token masking: what each key token matters to each layer; Qwen3-VL prompts with --image",
             add_mask_arguments, run_mask),
    "heads": ("head ablation: zero heads' outputs, KL / top-1 effects", add_heads_arguments, run_heads),
    "components": ("component ablation of q/k/v/o projections (SVD baseline or SPD factors)",
                   add_components_arguments, run_components),
    "impact": ("all-pairs attention impact (every query and key) and its agreement with key selections",
               add_impact_arguments, run_impact),
    "sparse-eval": ("held-out perplexity with each layer attending to k selected keys, per selector",
                    add_sparse_eval_arguments, run_sparse_eval),
    "batch": ("token masking for a YAML list of prompts", add_batch_arguments, run_batch_command),
    "generate": ("generate text with sparse attention through the KV and indexer key caches, timing prefill and decode",
                 add_generate_arguments, run_generate),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the problem, and where help is), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--num-tok 3` is an error, not silently `--num-tokens 3`.
    parser = OneLineErrorParser(prog=PROG, description="Probe pretrained checkpoints.", allow_abbrev=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, allow_abbrev=False))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse `argv` and run the chosen command; bad input exits 2 with one line."""
    parser = build_parser()

    def run() -> object:
        args = parser.parse_args(argv)
        return COMMANDS[args.command][2](args)

    exit_on_user_error(run, PROG)
