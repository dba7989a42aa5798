"""`python -m sparse_viz.analysis heads ...` and `... components ...`.

Examples:
    python -m sparse_viz.analysis heads --model .cache/smollm2-135m --ablate 3.5 7.0
    python -m sparse_viz.analysis heads --model DIR --sweep --batch-size 32 --output results/heads
    python -m sparse_viz.analysis heads --model DIR --ablate-kv 4.1
    python -m sparse_viz.analysis components --model DIR --ablate 3.o_proj:0-3 --mode adversarial --ci-default 0.5
    python -m sparse_viz.analysis components --model DIR --decomposition spd.safetensors --ablate 3.q_proj:7 --mode stochastic
    python -m sparse_viz.analysis components --model DIR --sweep 3.o_proj 3.q_proj:0-63 --output results/sweep
"""

from __future__ import annotations

import argparse

from sparse_viz.analysis.cli import add_common_arguments, check_output_dir, parse_index_spec, register_command, resolve_prompt
from sparse_viz.errors import UserInputError
from sparse_viz.report.ablation import check_replaceable


def _add_shared(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--prompt-lines", default=None,
                        help="file with one prompt per line: extra sequences of the batch (after --prompt)")
    parser.add_argument("--prediction-positions", type=int, nargs="+", default=None,
                        help="positions for the top-5 prediction table (negative = from the end; default: -1)")
    parser.add_argument("--no-patterns", action="store_true", help="do not capture attention patterns (faster)")


def _inputs(args: argparse.Namespace, loaded):
    """(N, T) input ids and attention mask (None when nothing is padded) of every prompt."""
    import torch

    from sparse_viz.analysis.prompts import encode_prompt

    prompts = [resolve_prompt(args)]
    if args.prompt_lines:
        try:
            with open(args.prompt_lines, encoding="utf-8") as handle:
                prompts += [line.rstrip("\n") for line in handle if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise UserInputError(f"cannot read --prompt-lines file {args.prompt_lines!r}: {type(error).__name__}") from error
    encoded = [encode_prompt(loaded.tokenizer, p, chat=args.chat, max_positions=loaded.adapter.max_positions)[0] for p in prompts]
    T = max(len(e) for e in encoded)
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(encoded), T), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for n, e in enumerate(encoded):
        ids[n, : len(e)], mask[n, : len(e)] = e, 1
    return ids.to(loaded.device), (None if bool(mask.all()) else mask.to(loaded.device))


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
    from sparse_viz.analysis.head_ablation import AttentionLayout, build_ablations, head_ablation_study
    from sparse_viz.analysis.loading import load_model
    from sparse_viz.report.ablation import write_head_ablation_outputs

    output = check_output_dir(args.output or "results/head_ablation")
    check_replaceable(output)
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    layout = AttentionLayout.of(loaded.model)
    input_ids, attention_mask = _inputs(args, loaded)
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
    write_head_ablation_outputs(result, output, title=f"Head ablation: {loaded.name_or_path}")
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
    from sparse_viz.analysis.component_ablation import run_component_ablation, run_component_sweep
    from sparse_viz.analysis.loading import load_model

    output = check_output_dir(args.output or ("results/component_sweep" if args.sweep else "results/component_ablation"))
    check_replaceable(output)
    if args.sweep and args.mode != "deterministic":
        raise UserInputError(f"--sweep runs deterministic ablations only (got --mode {args.mode}); "
                             "use --ablate for stochastic or adversarial runs")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    input_ids, attention_mask = _inputs(args, loaded)
    if args.sweep:
        table = run_component_sweep(
            loaded.model, input_ids, args.sweep, tokenizer=loaded.tokenizer, attention_mask=attention_mask,
            decomposition=args.decomposition, batch_size=args.batch_size, patterns=not args.no_patterns,
            prediction_positions=args.prediction_positions, output_dir=output,
            title=f"Component sweep: {loaded.name_or_path}")
        top = table.sort_values("kl_divergence", ascending=False).head(10)
        print(top[["ablation", "component_norm", "kl_divergence", "frac_top1_changed", "delta_logprob_top1"]].to_string(index=False))
        print(f"{len(table)} component(s) written to {output}")
        return table
    table = run_component_ablation(
        loaded.model, input_ids, args.ablate, tokenizer=loaded.tokenizer, attention_mask=attention_mask,
        decomposition=args.decomposition,
        mode=args.mode, n_samples=args.samples, ci_default=args.ci_default, pgd_steps=args.pgd_steps,
        pgd_step_size=args.pgd_step_size, seed=args.seed, patterns=not args.no_patterns,
        prediction_positions=args.prediction_positions, output_dir=output,
        title=f"Component ablation ({args.mode}): {loaded.name_or_path}")
    print(table.T.to_string(header=False))
    print(f"written to {output}")
    return table


register_command("heads", add_heads_arguments, run_heads, help="head ablation: zero heads' outputs, KL / top-1 effects")
register_command("components", add_components_arguments, run_components,
                 help="component ablation of q/k/v/o projections (SVD baseline or SPD factors)")
