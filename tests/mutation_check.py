"""Mutation check: plausible one-line bugs, each of which some named test must catch.

    python tests/mutation_check.py                 # every mutation
    python tests/mutation_check.py --only kl_future_scores type_share_summed_axis
    python tests/mutation_check.py --list

A maintainer script, not a test (pytest collects only `test_*.py`, and no test imports this).
It copies the repository to a temporary folder, and for each entry of `MUTATIONS` alone: replaces
the exact `original` snippet of `path` (which must occur exactly once) with `mutated`, runs the
named pytest node ids on the copy, and restores the file. It prints one line per mutation,

    caught      <name>   (the named tests failed)
    NOT caught  <name>   (they passed: the suite lets this bug through)
    ERROR       <name>   (the snippet is not in the file once, or pytest could not run the tests)

and exits 1 if any mutation is not caught or errs. Before the mutations the named tests are run
once on the unmodified copy: they must pass there, or a "caught" would mean nothing.

Adding an entry: append a `Mutation` to `MUTATIONS` (any section; names must be unique). Keep
`original` short but unique in its file, copy it byte for byte (indentation included), and name
the fastest tests that should catch the bug. The repository's working tree is copied as it is,
uncommitted changes included, so a new entry can be checked before it is committed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One plausible bug: `original` -> `mutated` in `path`; some test of `tests` must fail."""

    name: str
    path: str  # relative to the repository root
    original: str
    mutated: str
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root
    why: str = ""  # the bug it stands for, in words


METRICS = "sparse_viz/tracking/metrics.py"
CALLBACK = "sparse_viz/tracking/callback.py"
TRACKING_METRICS_TESTS = "tests/test_tracking_metrics.py"
ANALYSE_TESTS = "tests/test_tracking_analyse.py"
PLOTS = "sparse_viz/report/plots.py"
PLOTS_TESTS = "tests/test_plots.py"
TRAINING_REPORT = "sparse_viz/report/training.py"
TRAINING_REPORT_TESTS = "tests/test_training_report.py"
FUSED_TOPK = "sparse_viz/model/fused_cpu/index_topk.cpp"
FUSED_ATTENTION = "sparse_viz/model/fused_cpu/sparse_attention.cpp"
FUSED_SCORES = "sparse_viz/model/fused_cpu/index_scores.cpp"
FUSED_VECTOR_OPS = "sparse_viz/model/fused_cpu/vector_ops.h"
FUSED_TESTS = "tests/test_fused_kernels.py"

MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ training: resume
    Mutation(
        "resume_ignores_ckpt_path", "sparse_viz/train.py",
        'cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))',
        "cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=None)",
        ("tests/test_train_resume.py::test_resumed_run_starts_from_the_checkpointed_weights_and_optimizer_state",),
        "training silently ignores --ckpt_path and starts over (the run store hid it)",
    ),
    # ------------------------------------------------------------------ tracking: metrics.py
    Mutation(
        "distance_profile_entropy_unnormalised", METRICS,
        "entropy = attention_entropy(probs).mean(dim=(0, 2)) / max(math.log(T), 1e-30)  # (H,)",
        "entropy = attention_entropy(probs).mean(dim=(0, 2))  # (H,)",
        (f"{TRACKING_METRICS_TESTS}::test_head_distance_profile_entropy_feature_is_normalised_by_log_t",
         f"{TRACKING_METRICS_TESTS}::test_head_distance_profile_matches_a_loop_in_every_feature",
         f"{ANALYSE_TESTS}::test_head_features_are_each_heads_distance_profile"),
        "a head's distance profile keeps its mean entropy unnormalised",
    ),
    Mutation(
        "distance_bucket_ceil", METRICS,
        "bucket = torch.floor(torch.log2(distance.float() + 1))",
        "bucket = torch.ceil(torch.log2(distance.float() + 1))",
        (f"{TRACKING_METRICS_TESTS}::test_head_distance_profile_matches_a_loop_in_every_feature",),
        "distance buckets rounded up: distance 2 lands with distances 3-6",
    ),
    Mutation(
        "recall_top_k_of_first_head", METRICS,
        "dense_top = selection_mask(topk_selection(p, k), T)  # (B, T, T)",
        "dense_top = selection_mask(topk_selection(dense_probs[:, 0], k), T)  # (B, T, T)",
        (f"{TRACKING_METRICS_TESTS}::test_mass_and_recall_at_k_match_loops_over_queries_heads_and_probe_rows",),
        "recall@k's dense top-k taken from head 0 instead of the mean over heads",
    ),
    Mutation(
        "jaccard_union_as_size_sum", METRICS,
        "union = (a | b).sum(dim=-1).float()",
        "union = (a.sum(dim=-1) + b.sum(dim=-1)).float()",
        (f"{TRACKING_METRICS_TESTS}::test_jaccard_matches_set_arithmetic_for_selections_of_different_sizes",),
        "Jaccard divides by |A| + |B| instead of |A u B|",
    ),
    Mutation(
        "position_frequency_ignores_batch", METRICS,
        "seen = eligible.sum(dim=0).float() * B  # (T,)",
        "seen = eligible.sum(dim=0).float()  # (T,)",
        (f"{TRACKING_METRICS_TESTS}::test_selection_frequencies_match_counting_loops_over_probe_rows",),
        "frequency by position counts the visible queries of one probe row only",
    ),
    Mutation(
        "distance_frequency_ignores_batch", METRICS,
        "torch.full((int(valid.sum()),), float(B), device=selected.device)",
        "torch.full((int(valid.sum()),), 1.0, device=selected.device)",
        (f"{TRACKING_METRICS_TESTS}::test_selection_frequencies_match_counting_loops_over_probe_rows",),
        "frequency by distance counts the visible queries of one probe row only",
    ),
    Mutation(
        "local_window_inclusive", METRICS,
        "near = real & ((t[None, :, None] - chosen) < window)",
        "near = real & ((t[None, :, None] - chosen) <= window)",
        (f"{TRACKING_METRICS_TESTS}::test_sink_and_local_window_shares_match_counting_loops",),
        "the local window holds window + 1 distances",
    ),
    Mutation(
        "kl_softmax_over_future_scores", METRICS,
        "log_q = index_scores.float().masked_fill(~visible, -math.inf).log_softmax(dim=-1)  # (B, T, T)",
        "log_q = index_scores.float().log_softmax(dim=-1)  # (B, T, T)",
        (f"{TRACKING_METRICS_TESTS}::test_indexer_kl_matches_a_loop_and_ignores_future_scores",),
        "the indexer's softmax normalises over future keys too",
    ),
    Mutation(
        "score_histogram_from_zero", METRICS,
        "hist = torch.histc(values, bins=bins, min=lo, max=hi)",
        "hist = torch.histc(values, bins=bins, min=0.0, max=hi)",
        (f"{TRACKING_METRICS_TESTS}::test_index_score_statistics_match_a_loop_including_every_histogram_bin",
         f"{ANALYSE_TESTS}::test_indexer_scalars_and_arrays_match_loops"),
        "score histogram assumes non-negative scores (the weights w can be negative)",
    ),
    Mutation(
        "head_share_signed", METRICS,
        "per_head = magnitude.sum(dim=(0, 2, 3))  # (H_I,)",
        "per_head = terms.sum(dim=(0, 2, 3))  # (H_I,)",
        (f"{TRACKING_METRICS_TESTS}::test_indexer_head_specialisation_matches_a_loop_with_signed_terms",),
        "indexer head weight shares from signed terms, which cancel",
    ),
    # ------------------------------------------------------------------ tracking: callback.py (analyse_probe)
    Mutation(
        "type_share_summed_axis", CALLBACK,
        "picked = mask.sum(dim=1).float()  # (P, T) selections of each key position",
        "picked = mask.sum(dim=2).float()  # (P, T) selections of each key position",
        (f"{ANALYSE_TESTS}::test_token_type_shares_match_a_counting_loop",),
        "token-type shares count selections per query instead of per key",
    ),
    Mutation(
        "type_base_over_all_rows", CALLBACK,
        "visible = M.causal_mask(T, mask.device) & rows[:, None]  # (T, T)",
        "visible = M.causal_mask(T, mask.device)  # (T, T)",
        (f"{ANALYSE_TESTS}::test_token_type_shares_match_a_counting_loop",),
        "token-type base rates include the short (dense) rows",
    ),
    Mutation(
        "top_tokens_summed_axis", CALLBACK,
        "picked = mask.sum(dim=1).reshape(-1).cpu()  # (P*T,)",
        "picked = mask.sum(dim=2).reshape(-1).cpu()  # (P*T,)",
        (f"{ANALYSE_TESTS}::test_most_selected_tokens_match_a_counting_loop",),
        "most selected tokens counted by query instead of by key",
    ),
    Mutation(
        "recall_against_attention_used", CALLBACK,
        "M.mean_over_rows(M.recall_at_k(dense, selected, k), rows)",
        "M.mean_over_rows(M.recall_at_k(used, selected, k), rows)",
        (f"{ANALYSE_TESTS}::test_recall_at_k_matches_a_loop_over_informative_queries",),
        "recall@k measured against the sparse attention instead of the dense one",
    ),
    Mutation(
        "entropy_sparse_from_dense", CALLBACK,
        'values["entropy_sparse"] = float(M.attention_entropy(used).mean())',
        'values["entropy_sparse"] = float(M.attention_entropy(dense).mean())',
        (f"{ANALYSE_TESTS}::test_entropies_match_a_loop_over_rows_of_the_attention_used_and_the_dense_one",),
        "the entropy of the attention used is the dense attention's",
    ),
    Mutation(
        "jaccard_previous_of_layer_0", CALLBACK,
        "M.jaccard(selected, previous_selected[layer].to(selected.device), T), rows)",
        "M.jaccard(selected, previous_selected[0].to(selected.device), T), rows)",
        (f"{ANALYSE_TESTS}::test_jaccard_with_the_previous_selection_matches_set_arithmetic_layer_by_layer",),
        "every layer's Jaccard compares with layer 0's previous selection",
    ),
    Mutation(
        "show_attn_from_dense", CALLBACK,
        'arrays["show_attn"][layer] = _gather(M.head_mean_probs(used)[0], selected[0]).cpu().numpy()',
        'arrays["show_attn"][layer] = _gather(p[0], selected[0]).cpu().numpy()',
        (f"{ANALYSE_TESTS}::test_probe_row_zero_views_match_the_traces",),
        "the report's attention-used view shows the dense attention",
    ),
    Mutation(
        "oracle_baseline_from_attention_used", CALLBACK,
        "dense_probs=trace.dense_attn_probs, sink_tokens=cfg.sink_tokens,",
        "dense_probs=trace.attn_probs, sink_tokens=cfg.sink_tokens,",
        (f"{ANALYSE_TESTS}::test_callback_baselines_are_the_selectors_they_are_named_after",),
        "the oracle baseline takes the top-k of the sparse attention (its own selection) in a sparse stage",
    ),
    Mutation(
        "jaccard_previous_is_the_first_snapshot", CALLBACK,
        'selected = self.store.load_snapshot(max(earlier))["selected"].astype(np.int64)',
        'selected = self.store.load_snapshot(min(earlier))["selected"].astype(np.int64)',
        ("tests/test_tracking_resume.py::test_kill_and_resume_has_exactly_one_line_per_snapshot_step",),
        "Jaccard compares with the first stored snapshot instead of the previous one (slow: ~1 min)",
    ),
    # ------------------------------------------------------------------ tracking: token_types.py, store.py
    Mutation(
        "frequent_ids_off_by_one", "sparse_viz/tracking/token_types.py",
        "frequent[order[before < frequent_mass]] = True",
        "frequent[order[cumulative < frequent_mass]] = True",
        (f"{TRACKING_METRICS_TESTS}::test_frequency_classes_by_corpus_mass",),
        "the id that crosses the frequent mass is left out of 'frequent'",
    ),
    Mutation(
        "uncounted_ids_frequent", "sparse_viz/tracking/token_types.py",
        "out[~inside, 5] = True",
        "out[~inside, 4] = True",
        (f"{TRACKING_METRICS_TESTS}::test_token_type_matrix_marks_ids_the_counts_do_not_cover_as_rare",),
        "an id the corpus counts do not cover is marked frequent instead of rare",
    ),
    Mutation(
        "history_not_sorted", "sparse_viz/tracking/store.py",
        'history.sort(key=lambda r: int(r["step"]))',
        "history.sort(key=lambda r: 0)",
        ("tests/test_tracking_store.py::test_history_stays_ordered_by_step_when_an_earlier_step_arrives_late",),
        "the history is kept in arrival order, not step order",
    ),
    Mutation(
        "store_appends_a_step_twice", "sparse_viz/tracking/store.py",
        'if any(int(r["step"]) == step for r in history):',
        'if any(int(r["step"]) == step for r in history[:-1]):',
        ("tests/test_tracking_store.py::test_a_step_already_in_the_history_is_never_written_again",),
        "a resumed run rewrites the last snapshot it already has",
    ),
    # ------------------------------------------------------------------ report: training.py (payload)
    Mutation(
        "payload_attention_used_from_dense", TRAINING_REPORT,
        'attn_q.append(_sqrt_uint8(arrays["show_attn"]))',
        'attn_q.append(_sqrt_uint8(arrays["show_dense"]))',
        (f"{TRAINING_REPORT_TESTS}::test_payload_views_of_attention_used_dense_top_k_and_score_range_match_the_snapshot",),
        "the report's attention-used view carries the dense attention",
    ),
    Mutation(
        "payload_dense_top_from_selection", TRAINING_REPORT,
        'top = arrays["show_dense_top"].astype(np.int64)',
        'top = arrays["show_selected"].astype(np.int64)',
        (f"{TRAINING_REPORT_TESTS}::test_payload_views_of_attention_used_dense_top_k_and_score_range_match_the_snapshot",),
        "the report's dense top-k keys are the selection itself",
    ),
    Mutation(
        "payload_score_range_over_pads", TRAINING_REPORT,
        "lo = np.where(finite.any(-1), np.nanmin(np.where(finite, scores, np.inf), axis=-1), 0.0)",
        "lo = np.where(finite.any(-1), np.nanmin(np.where(finite, scores, 0.0), axis=-1), 0.0)",
        (f"{TRAINING_REPORT_TESTS}::test_payload_views_of_attention_used_dense_top_k_and_score_range_match_the_snapshot",),
        "the score range counts empty slots as score 0",
    ),
    Mutation(
        "payload_stages_from_attention", TRAINING_REPORT,
        '"stages": [str(r.get("stage", "")) for r in history],',
        '"stages": [str(r.get("attention", "")) for r in history],',
        (f"{TRAINING_REPORT_TESTS}::test_payload_history_columns_and_labels_follow_the_history_lines",),
        "the report labels stages by their attention (warmup shows as dense)",
    ),
    Mutation(
        "payload_columns_rounded_coarsely", TRAINING_REPORT,
        "else round(float(value), 6))",
        "else round(float(value), 3))",
        (f"{TRAINING_REPORT_TESTS}::test_payload_history_columns_and_labels_follow_the_history_lines",),
        "history columns rounded to 3 decimals (mass@k differences of 1e-4 vanish)",
    ),
    # ------------------------------------------------------------------ report: plots.py
    Mutation(
        "layer_mean_counts_nan_layers", PLOTS,
        "count = np.sum(np.isfinite(array), axis=0)",
        "count = np.full(array.shape[1:], array.shape[0])",
        (f"{PLOTS_TESTS}::test_attention_patterns_panels_show_the_stored_values",
         f"{PLOTS_TESTS}::test_indexer_behavior_panels_show_the_stored_values"),
        "a layer without a value counts as 0 in the layer means of the plots",
    ),
    Mutation(
        "stage_band_ends_at_its_last_snapshot", PLOTS,
        "end = steps[i] if i < len(history) else steps[-1]",
        "end = steps[i - 1]",
        (f"{PLOTS_TESTS}::test_stage_bands_span_each_stage_from_its_first_snapshot_to_the_next_stages",),
        "stage bands leave a gap between a stage's last snapshot and the next stage",
    ),
    Mutation(
        "entropy_lines_swapped", PLOTS,
        'ax.plot(steps, _series(history, "entropy_sparse"), "o-", label="attention used (sparse)", ms=3)',
        'ax.plot(steps, _series(history, "entropy_dense"), "o-", label="attention used (sparse)", ms=3)',
        (f"{PLOTS_TESTS}::test_attention_patterns_panels_show_the_stored_values",),
        "the sparse-entropy line plots the dense entropy",
    ),
    Mutation(
        "score_distribution_unnormalised", PLOTS,
        "ax.stairs(counts / max(counts.sum(), 1), common,",
        "ax.stairs(counts, common,",
        (f"{PLOTS_TESTS}::test_attention_patterns_panels_show_the_stored_values",),
        "the score distribution shows counts under a 'share of pairs' axis",
    ),
    Mutation(
        "token_type_bars_swapped", PLOTS,
        'share, base = _layer_mean(last["type_share"]), _layer_mean(last["type_base"])',
        'base, share = _layer_mean(last["type_share"]), _layer_mean(last["type_base"])',
        (f"{PLOTS_TESTS}::test_indexer_behavior_panels_show_the_stored_values",),
        "selected and base-rate token-type bars swapped",
    ),
    Mutation(
        "heatmap_colour_without_sqrt", PLOTS,
        "image[rows, selected[rows, slots]] = np.nan_to_num(np.sqrt(np.clip(dense[rows, slots], 0, 1)))",
        "image[rows, selected[rows, slots]] = np.nan_to_num(np.clip(dense[rows, slots], 0, 1))",
        (f"{PLOTS_TESTS}::test_selection_heatmap_colours_exactly_the_selected_cells_by_dense_attention",),
        "heatmap colours p under a colour bar labelled sqrt(p)",
    ),
    # ------------------------------------------------------------------ analysis (component ablation etc.): append here
    Mutation(
        "stochastic_ablated_run_draws_its_own_noise",
        "sparse_viz/analysis/ablation/component_modes.py",
        "abl_mask = {p: ci_ablated[p] + (1 - ci_ablated[p]) * u[p] for p in paths}",
        "abl_mask = {p: ci_ablated[p] + (1 - ci_ablated[p]) * torch.rand((N, T, ci[p].numel()), generator=generator)"
        ".to(device) for p in paths}",
        ("tests/test_component_ablation.py::test_stochastic_baseline_and_ablated_runs_share_each_samples_noise",),
        "the ablated run of a stochastic sample does not share the baseline's u (unpaired samples)",
    ),
    Mutation(
        "factor_file_ci_discarded",
        "sparse_viz/analysis/ablation/decomposition.py",
        "ci=None if ci is None else ci.to(weight.device, torch.float32))",
        "ci=None)",
        ("tests/test_component_ablation.py::test_causal_importances_in_a_factor_file_are_read_and_bound_the_adversarial_masks",),
        "SPD factors load without their causal importances",
    ),
    Mutation(
        "all_pairs_sinks_through_the_unstable_form",
        "sparse_viz/analysis/masking/all_pairs.py",
        "DOMINANT = 0.5 ",
        "DOMINANT = 1.01 ",
        ("tests/test_all_pairs_impact.py::test_sink_keys_holding_almost_all_the_mass_stay_finite_and_exact",),
        "keys holding ~all of a row's mass go through p / (1 - p) (z - v), which cancels",
    ),
    Mutation(
        "selection_ignored_by_the_fast_masking_path",
        "sparse_viz/analysis/masking/layer_attention.py",
        "        att.visible = att.visible & keep[query_positions]",
        "        att.visible = att.visible",
        ("tests/test_dsa_checkpoint_probes.py::test_masking_a_dsa_checkpoint_equals_brute_force_with_its_selection",),
        "masking a DSA checkpoint lets the final query see keys its selection dropped",
    ),
    # ------------------------------------------------------------------ training: exact resume, DDP, CLI
    Mutation(
        "data_position_not_restored", "sparse_viz/data/resumable.py",
        'self._resume_at = {"epoch": int(state["epoch"]), "batches": batches}',
        "self._resume_at = None",
        ("tests/test_resumable_data.py::test_a_loader_restored_from_state_dict_continues_with_the_next_batch",
         "tests/test_train_interrupt.py::test_interrupted_run_resumes_to_the_uninterrupted_weights_and_metrics"),
        "a resumed run restarts its epoch's order: batches seen twice, others never",
    ),
    Mutation(
        "checkpoint_promoted_before_its_step_is_logged", "sparse_viz/training/checkpointing.py",
        "            self._write_pending(trainer)\n        if signum and not done:",
        "            self._write_pending(trainer)\n            self._promote(trainer)\n        if signum and not done:",
        ("tests/test_train_interrupt.py::test_run_sigkilled_during_a_validation_resumes_with_every_metrics_row_once",),
        "last.ckpt written before its step's validation rows: a kill then loses them for good",
    ),
    Mutation(
        "progress_bar_total_from_remaining_steps", "sparse_viz/training/progress.py",
        "total = min(total, batch_idx + remaining)",
        "total = min(total, remaining)",
        ("tests/test_train_interrupt.py::test_progress_bar_of_a_run_resumed_in_its_last_epoch_ends_full_not_past_its_total",),
        "the bar of a run resumed part-way through an epoch overflows (800/699)",
    ),
    Mutation(
        "tokens_per_s_of_one_process", "sparse_viz/training/module.py",
        "tokens = batch_tokens(batch) * self.trainer.world_size",
        "tokens = batch_tokens(batch)",
        ("tests/test_training_throughput.py",),
        "tokens/s under DDP counts one process's batch",
    ),
    Mutation(
        "ddp_rank_chooses_its_own_run_dir", "sparse_viz/train.py",
        "if RUN_DIR_ENV in os.environ:",
        "if False:",
        ("tests/test_train_ddp.py::test_two_processes_write_one_run_directory_and_announce_it_once",),
        "rank 1 names a run directory of its own (the time differs) that does not exist",
    ),
    Mutation(
        "abbreviated_options_expanded", "sparse_viz/train.py",
        '"allow_abbrev": False,',
        '"allow_abbrev": True,',
        ("tests/test_train.py::test_bad_input_is_one_line_exit_2_and_no_run_directory",
         "tests/test_train_cli_help.py::test_the_real_parser_names_the_nearest_option_too"),
        "--trainer.max_step=30 silently means --trainer.max_steps=30",
    ),
    # ------------------------------------------------------------------ nothing a user has is destroyed
    Mutation(
        "output_dir_replaces_a_result_holding_a_users_file", "sparse_viz/output_dir.py",
        "    if foreign:\n",
        "    if False:\n",
        ("tests/test_output_dir.py::test_an_earlier_result_with_a_file_added_by_the_user_is_not_replaced",),
        "--overwrite deletes a notes file the user put into an earlier result",
    ),
    Mutation(
        "output_dir_replaces_a_result_without_consent", "sparse_viz/output_dir.py",
        "    if not overwrite:\n",
        "    if False:\n",
        ("tests/test_output_dir.py::test_an_earlier_result_is_replaced_only_with_consent",),
        "a second run with the same --output replaces the first without --overwrite",
    ),
    Mutation(
        "output_dir_not_rechecked_before_the_rename", "sparse_viz/output_dir.py",
        "        write_manifest(staging, written_by)\n        check_replaceable(output, overwrite)\n",
        "        write_manifest(staging, written_by)\n",
        ("tests/test_output_dir.py::test_a_file_added_while_the_analysis_runs_stops_the_replacement",),
        "a file added while an analysis runs is deleted when its result moves in",
    ),
    Mutation(
        "new_run_written_into_a_used_run_directory", "sparse_viz/train.py",
        "            if not ckpt_path and launched_as_global_rank_zero():\n",
        "            if False:\n",
        ("tests/test_train_run_dir.py",),
        "a second run with the same --run_name writes over the first",
    ),
    # ------------------------------------------------------------------ installs and reports that explain themselves
    Mutation(
        "setup_installs_without_the_constraints",
        "scripts/setup.sh",
        ' -c constraints.txt "$@"; }',
        ' "$@"; }',
        ("tests/test_install_constraints.py::test_setup_script_installs_everything_with_the_constraints",),
        "a fresh machine resolves the newest releases instead of the versions the tests passed with",
    ),
    Mutation(
        "plot_legends_drawn_on_the_data",
        PLOTS,
        'ax.legend(fontsize=fontsize, ncol=ncol, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)',
        "ax.legend(fontsize=fontsize, ncol=ncol)",
        ("tests/test_plots.py::test_panels_say_they_average_layers_and_legends_sit_beside_the_data",),
        "training PNG legends cover curves",
    ),
    Mutation(
        "masking_sink_toggle_ignored",
        "sparse_viz/report/static/masking.js",
        "const counted = (i) => !(state.excludeFirst && rowPositions[Math.floor(i / layers.length)] === 0);",
        "const counted = (i) => true;",
        ("tests/test_masking_report.py::test_sink_position_can_be_left_out_of_the_colour_scale",),
        "the masking report's sink toggle leaves the colour scale dominated by position 0",
    ),
    Mutation(
        "head_grid_colour_scale_fixed_at_one",
        "sparse_viz/report/static/ablation.js",
        ": d3.scaleSequential(d3.interpolateMagma).domain([0, extent[1] || 1]);",
        ": d3.scaleSequential(d3.interpolateMagma).domain([0, 1]);",
        ("tests/test_ablation_report.py::test_head_report_explains_itself_colour_scales_and_token_labels",),
        "the layer x head grid's colours (and its scale) stop at 1 whatever the largest KL",
    ),
    Mutation(
        "ablation_metadata_without_the_arguments",
        "sparse_viz/analysis/cli.py",
        '"prompts": prompts, "arguments": arguments,',
        '"prompts": prompts,',
        ("tests/test_ablation_report.py::test_heads_metadata_records_the_command_and_the_definitions",),
        "heads/components metadata.json does not say how the command was run",
    ),
    # ------------------------------------------------------------------ associative recall: short convolution, curriculum
    Mutation(
        "short_conv_reads_the_future", "sparse_viz/model/short_conv.py",
        "(self.kernel_size - 1, 0))",
        "(0, self.kernel_size - 1))",
        ("tests/test_short_conv.py::test_a_model_with_it_never_reads_a_later_token",),
        "the convolution padded on the right: position t reads t + 1 .. t + K - 1",
    ),
    Mutation(
        "short_conv_feeds_attention_only", "sparse_viz/model/transformer.py",
        "            projected = self.indexer.project(h, *indexer_rope)",
        "            projected = self.indexer.project(self.attn_norm(x), *indexer_rope)",
        ("tests/test_short_conv.py::test_the_attention_and_the_indexer_read_the_filtered_input",),
        "the indexer reads the unfiltered input: it cannot find a value by the key beside it",
    ),
    Mutation(
        "curriculum_batch_number_restarts_each_epoch", "sparse_viz/data/resumable.py",
        "first_batch = self.epoch * -(-self.num_samples // size)",
        "first_batch = 0",
        ("tests/test_resumable_data.py::test_numbered_items_carry_the_count_of_training_batches_since_the_run_began",
         "tests/test_recall_data.py::test_a_curriculum_draws_the_first_batches_at_its_lengths_then_the_full_one"),
        "every epoch replays the length curriculum",
    ),
    Mutation(
        "curriculum_count_lost_on_resume", "sparse_viz/data/resumable.py",
        "enumerate(indices[skip:], start=skip)",
        "enumerate(indices[skip:])",
        ("tests/test_resumable_data.py::test_a_resumed_numbered_loader_continues_the_count",),
        "a resumed run restarts the curriculum at its first length",
    ),
    Mutation(
        "prefilter_bound_excludes_its_own_value", "sparse_viz/model/topk_prefilter.py",
        "(scores >= bound).nonzero(as_tuple=True)",
        "(scores > bound).nonzero(as_tuple=True)",
        ("tests/test_topk_prefilter.py",),
        "the entry that sets the bound is dropped: a k-th value equal to it goes missing",
    ),
    Mutation(
        "prefilter_ties_keep_the_latest", "sparse_viz/model/selectors.py",
        "keep = above | (at & (at.cumsum(dim=-1) <= wanted))",
        "keep = above | (at & (at.flip(-1).cumsum(dim=-1).flip(-1) <= wanted))",
        ("tests/test_topk_prefilter.py",
         "tests/test_model_indexer_blocks.py::test_ties_at_the_kth_score_keep_the_earliest_keys_whatever_the_row_length"),
        "among keys tied at the k-th score the latest are kept: the selection depends on the block size",
    ),
    # ------------------------------------------------------------------ fused CPU kernels (C++)
    Mutation(
        "fused_topk_takes_ties_before_larger_keys", FUSED_TOPK,
        "if (x > kth || (x == kth && ties_left-- > 0)) out[filled++] = candidates[i];",
        "if (x >= kth) out[filled++] = candidates[i];",
        (f"{FUSED_TESTS}::test_ties_at_the_kth_score_keep_the_earliest_keys",
         f"{FUSED_TESTS}::test_the_top_k_is_topk_causal_of_the_full_score_matrix"),
        "a key tied at the k-th score is taken before a later, larger one, which is then dropped",
    ),
    Mutation(
        "fused_topk_bound_too_high", FUSED_TOPK,
        "(count_at_least(x, n, mid) >= K ? lo : hi) = mid;",
        "(count_at_least(x, n, mid) >= K / 2 ? lo : hi) = mid;",
        (f"{FUSED_TESTS}::test_the_top_k_is_topk_causal_of_the_full_score_matrix",),
        "the prefilter's bound sits above the k-th group maximum: keys that belong are skipped",
    ),
    Mutation(
        "fused_topk_avx512_compaction_drops_entries_at_the_bound", FUSED_TOPK,
        "_mm512_mask_cmp_ps_mask(valid, x, b, _CMP_GE_OQ)",
        "_mm512_mask_cmp_ps_mask(valid, x, b, _CMP_GT_OQ)",
        (f"{FUSED_TESTS}::test_integer_scores_with_many_exact_ties_select_as_the_reference",),
        "the AVX-512 candidates leave out entries equal to the bound",
    ),
    Mutation(
        "fused_topk_avx512_takes_ties_before_larger_keys", FUSED_TOPK,
        "filled += key > kth || (key == kth && ties_left > 0);",
        "filled += key >= kth;",
        (f"{FUSED_TESTS}::test_ties_at_the_kth_score_keep_the_earliest_keys",
         f"{FUSED_TESTS}::test_integer_scores_with_many_exact_ties_select_as_the_reference"),
        "a key tied at the k-th score is taken before a later, larger one (AVX-512 path)",
    ),
    Mutation(
        "blockwise_topk_under_autocast_scores_in_bfloat16", "sparse_viz/model/indexer_blocks.py",
        "        dtype = torch.promote_types(dtype, torch.float32)\n",
        "        pass\n",
        ("tests/test_model_indexer_blocks.py::test_under_autocast_a_real_indexers_selection_is_the_topk_of_its_rounded_q_and_k",),
        "under autocast the torch block path sums the rounded q and k's products in bfloat16, not float32",
    ),
    Mutation(
        "blockwise_topk_under_autocast_keeps_q_and_k_unrounded", "sparse_viz/model/indexer_blocks.py",
        "        q, k = q.to(low), k.to(low)\n",
        "        pass\n",
        ("tests/test_model_indexer_blocks.py::test_under_autocast_the_ranking_reads_q_and_k_rounded_as_the_full_paths_matmul_does",),
        "under autocast the block paths rank float32 q and k, not the bfloat16 ones the full path's matmul takes",
    ),
    Mutation(
        "fused_topk_float_tiles_skip_the_last_dim", FUSED_TOPK,
        "for (int64_t d = 0; d < DI; ++d) {",
        "for (int64_t d = 0; d < DI - 1; ++d) {",
        (f"{FUSED_TESTS}::test_the_top_k_is_topk_causal_of_the_full_score_matrix",
         f"{FUSED_TESTS}::test_integer_scores_with_many_exact_ties_select_as_the_reference"),
        "the float score tiles (one and two rows) leave out the keys' last dim",
    ),
    Mutation(
        "fused_topk_dpbf16_scores_skip_the_last_pair", FUSED_TOPK,
        "for (int64_t p = 0; p < DI / 2; ++p) {",
        "for (int64_t p = 0; p < DI / 2 - 1; ++p) {",
        (f"{FUSED_TESTS}::test_the_top_k_of_bfloat16_q_and_k_ranks_their_exact_products",
         f"{FUSED_TESTS}::test_integer_scores_with_many_exact_ties_select_as_the_reference"),
        "the bfloat16 score tiles leave out the keys' last two dims (machines with AVX512-BF16)",
    ),
    Mutation(
        "fused_topk_dpbf16_scores_pair_the_wrong_query_dims", FUSED_TOPK,
        "std::memcpy(&pair, q_rows[r] + h * DI + 2 * p, sizeof(pair));",
        "std::memcpy(&pair, q_rows[r] + h * DI + (DI - 2 - 2 * p), sizeof(pair));",
        (f"{FUSED_TESTS}::test_the_top_k_of_bfloat16_q_and_k_ranks_their_exact_products",
         f"{FUSED_TESTS}::test_integer_scores_with_many_exact_ties_select_as_the_reference"),
        "the bfloat16 score tiles multiply each key pair by another pair of the query's dims (machines with AVX512-BF16)",
    ),
    Mutation(
        "fused_topk_dpbf16_two_rows_share_the_first_rows_query", FUSED_TOPK,
        "  score_rows_dpbf16<2>(q_rows, w_rows, k2, T_pad, n, HI, DI, rows);",
        "  const at::BFloat16* first[2] = {q_rows[0], q_rows[0]};\n  score_rows_dpbf16<2>(first, w_rows, k2, T_pad, n, HI, DI, rows);",
        (f"{FUSED_TESTS}::test_the_top_k_of_bfloat16_q_and_k_ranks_their_exact_products",
         f"{FUSED_TESTS}::test_integer_scores_with_many_exact_ties_select_as_the_reference"),
        "the second of two bfloat16 rows scored together is scored with the first row's query",
    ),
    Mutation(
        "fused_topk_kth_key_search_skips_the_last_bit", FUSED_TOPK,
        "for (int bit = 31; bit >= 0; --bit) {",
        "for (int bit = 31; bit >= 1; --bit) {",
        (f"{FUSED_TESTS}::test_integer_scores_with_many_exact_ties_select_as_the_reference",
         f"{FUSED_TESTS}::test_the_top_k_is_topk_causal_of_the_full_score_matrix"),
        "the K-th largest key is found to all but its last bit: ties and the keys above are miscounted",
    ),
    Mutation(
        "fused_topk_row_sees_its_future_key", FUSED_TOPK,
        "row_topk(row0.data(), t0 + 1, K, scratch, candidates, out0);\n      row_topk(row1",
        "row_topk(row0.data(), t1 + 1, K, scratch, candidates, out0);\n      row_topk(row1",
        (f"{FUSED_TESTS}::test_the_top_k_is_topk_causal_of_the_full_score_matrix",),
        "of two rows scored together, the first ranks the second's key too: one future key",
    ),
    Mutation(
        "fused_attention_backward_drops_delta", FUSED_ATTENTION,
        "ds_h[j] = p_h[j] * (ds_h[j] - row_delta) * scale;",
        "ds_h[j] = p_h[j] * ds_h[j] * scale;",
        (f"{FUSED_TESTS}::test_attention_and_its_gradients_equal_the_masked_path",),
        "softmax backward without the row's sum P . dP: the query gradient is wrong",
    ),
    Mutation(
        "fused_attention_key_pass_reads_head_0", FUSED_ATTENTION,
        "p[i] = p[i] * scale - lse[query[i] + h];",
        "p[i] = p[i] * scale - lse[query[i]];",
        (f"{FUSED_TESTS}::test_attention_and_its_gradients_equal_the_masked_path",),
        "the key/value pass normalises every head by head 0's log-sum-exp",
    ),
    Mutation(
        "fused_attention_group_dots_mix_heads", FUSED_VECTOR_OPS,
        "out[i * stride + j0 + r] = sums[r * G + i];",
        "out[i * stride + j0 + r] = sums[i * R + r];",
        (f"{FUSED_TESTS}::test_grouped_query_attention_equals_the_masked_path_on_repeated_key_value_heads",
         f"{FUSED_TESTS}::test_bfloat16_is_read_as_stored_computed_in_float32_and_rounded_once"),
        "a group's tile of rows x heads is read back in the wrong order: heads get each other's scores",
    ),
    Mutation(
        "fused_attention_group_sums_use_head_0s_weights", FUSED_VECTOR_OPS,
        "const v8f w = splat8(weight[i * stride + j]);",
        "const v8f w = splat8(weight[j]);",
        (f"{FUSED_TESTS}::test_grouped_query_attention_equals_the_masked_path_on_repeated_key_value_heads",),
        "every head of a group sums the values with head 0's probabilities",
    ),
    Mutation(
        "fused_attention_scatter_uses_head_0s_weights", FUSED_VECTOR_OPS,
        "for (int i = 0; i < G; ++i) w[i] = splat8(weight[i * stride + j]);",
        "for (int i = 0; i < G; ++i) w[i] = splat8(weight[j]);",
        (f"{FUSED_TESTS}::test_grouped_query_attention_equals_the_masked_path_on_repeated_key_value_heads",),
        "the scattered key/value gradients weight every head of a group by head 0's dS and P",
    ),
    Mutation(
        "fused_attention_scatter_drops_other_threads", FUSED_ATTENTION,
        "          dk += sums_k[t][i];",
        "          dk += t == 0 ? sums_k[t][i] : 0;",
        (f"{FUSED_TESTS}::test_attention_gradients_with_two_threads_equal_the_masked_path",),
        "the key gradients scattered by the second thread are never added",
    ),
    Mutation(
        "fused_attention_bfloat16_loads_drop_a_bit", FUSED_VECTOR_OPS,
        "  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));",
        "  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_and_si128(h, _mm_set1_epi16(-2))), 16));",
        (f"{FUSED_TESTS}::test_bfloat16_is_read_as_stored_computed_in_float32_and_rounded_once",),
        "bfloat16 rows widened to float lose their last mantissa bit",
    ),
    Mutation(
        "fused_attention_bfloat16_scores_rounded", FUSED_ATTENTION,
        "          for (int64_t j = 0; j < n; ++j) s_h[j] *= scale;\n          const acc_t m",
        "          for (int64_t j = 0; j < n; ++j) s_h[j] = acc_t(scalar_t(s_h[j] * scale));\n          const acc_t m",
        (f"{FUSED_TESTS}::test_bfloat16_is_read_as_stored_computed_in_float32_and_rounded_once",),
        "the forward's scores are rounded to the inputs' dtype before the softmax (bfloat16 arithmetic)",
    ),
    Mutation(
        "fused_attention_bfloat16_key_pass_sums_rounded", FUSED_VECTOR_OPS,
        "      odd[u] += wb * load8(b + 8 * u);",
        "      odd[u] += wb * load8(b + 8 * u);\n      if constexpr (!std::is_same_v<row_t, float>) for (int c = 0; c < 8; ++c) odd[u][c] = float(at::BFloat16(odd[u][c]));",
        (f"{FUSED_TESTS}::test_bfloat16_is_read_as_stored_computed_in_float32_and_rounded_once",),
        "a bfloat16 row's weighted sums (the key pass's dK and dV, dQ of one head) accumulate in bfloat16",
    ),
    Mutation(
        "fused_attention_dpbf16_dots_skip_the_last_chunk", FUSED_VECTOR_OPS,
        "    for (int c = 1; c < C; ++c)\n      for (int r = 0; r < 8; ++r) acc[r] = _mm256_dpbf16_ps",
        "    for (int c = 1; c < C - 1; ++c)\n      for (int r = 0; r < 8; ++r) acc[r] = _mm256_dpbf16_ps",
        (f"{FUSED_TESTS}::test_bfloat16_is_read_as_stored_computed_in_float32_and_rounded_once",),
        "the AVX512-BF16 dots of one head leave out the row's last sixteen dims (machines with AVX512-BF16)",
    ),
    Mutation(
        "fused_attention_dpbf16_group_dots_mix_heads", FUSED_VECTOR_OPS,
        "acc[r * G + i] = _mm256_dpbf16_ps(acc[r * G + i], load16_bf16(fixed + i * D + 16 * c), x);",
        "acc[r * G + i] = _mm256_dpbf16_ps(acc[r * G + i], load16_bf16(fixed + (G - 1 - i) * D + 16 * c), x);",
        (f"{FUSED_TESTS}::test_bfloat16_is_read_as_stored_computed_in_float32_and_rounded_once",),
        "the AVX512-BF16 group tiles give each head another head's scores (machines with AVX512-BF16)",
    ),
    Mutation(
        "fused_index_scores_weight_grad_ignores_relu", FUSED_SCORES,
        "    sum += active ? gi * x : zero;",
        "    sum += gi * x;",
        (f"{FUSED_TESTS}::test_selected_scores_and_gradients_equal_the_full_matrix_read_at_the_selection",),
        "the head weights' gradient counts negative logits the ReLU removed (float32 path)",
    ),
    Mutation(
        "fused_index_key_grad_overwritten", FUSED_SCORES,
        "for (int u = 0; u < U; ++u) store8(gk + 8 * u, load8(gk + 8 * u) + acc[u]);",
        "for (int u = 0; u < U; ++u) store8(gk + 8 * u, acc[u]);",
        (f"{FUSED_TESTS}::test_selected_scores_and_gradients_equal_the_full_matrix_read_at_the_selection",),
        "a key's gradient keeps only the last row that selected it, not the sum over rows (float path)",
    ),
    Mutation(
        "fused_index_kl_grad_without_mass_check", FUSED_SCORES,
        "g[i] = upstream[row] * (g[i] * has_mass - p[row * K + slot[i]] * inv);",
        "g[i] = upstream[row] * (g[i] - p[row * K + slot[i]] * inv);",
        (f"{FUSED_TESTS}::test_the_selected_key_kl_and_its_gradients_equal_a_row_by_row_kl_of_the_full_matrix",),
        "a row whose target has no mass still pushes its scores towards softmax's gradient",
    ),
    Mutation(
        "fused_index_kl_counts_zero_weights", FUSED_SCORES,
        "const v8f term = pi * (log8(positive ? pi : one) - load8(scores + i) + s);",
        "const v8f term = pi * (log8(pi + 1e-3f) - load8(scores + i) + s);",
        (f"{FUSED_TESTS}::test_the_selected_key_kl_and_its_gradients_equal_a_row_by_row_kl_of_the_full_matrix",),
        "the KL's p log p smoothed (float path)",
    ),
]


def copy_repository(target: Path) -> None:
    """The working tree without .git, caches and results; `.cache` (large models) is linked."""
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "results", ".cache", "*.pyc")
    shutil.copytree(REPO, target, ignore=ignore, symlinks=True)
    if (REPO / ".cache").exists():
        (target / ".cache").symlink_to(REPO / ".cache")


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """pytest on `tests` inside `root` (its package first on the path); (exit status, tail)."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    return result.returncode, (result.stdout + result.stderr)[-1500:]


def check(mutation: Mutation, root: Path, timeout: float, verbose: bool) -> str:
    """'caught', 'NOT caught' or 'ERROR: ...' for one mutation applied alone to the copy."""
    path = root / mutation.path
    source = path.read_text(encoding="utf-8")
    count = source.count(mutation.original)
    if count != 1:
        return f"ERROR: the original snippet occurs {count} times in {mutation.path}"
    path.write_text(source.replace(mutation.original, mutation.mutated), encoding="utf-8")
    try:
        status, tail = run_tests(root, mutation.tests, timeout)
    finally:
        path.write_text(source, encoding="utf-8")
    if verbose:
        print(tail)
    if status == 1:  # pytest: some test failed
        return "caught"
    if status == 0:
        return "NOT caught"
    return f"ERROR: pytest exit status {status}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    parser.add_argument("--verbose", action="store_true", help="print pytest's output tail")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        parser.error(f"duplicate mutation names: {', '.join(duplicates)}")
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown mutation(s): {', '.join(unknown)}")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {m.path}: {m.why}")
        return 0

    width = max(len(m.name) for m in chosen)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="sparse_viz-mutation-") as tmp:
        root = Path(tmp) / "repo"
        copy_repository(root)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        started = time.perf_counter()
        status, tail = run_tests(root, tests, args.timeout * 2)
        if status != 0:
            print(f"the named tests do not pass on the unmodified copy (pytest exit status {status}):\n{tail}")
            return 1
        print(f"baseline: {len(tests)} named tests pass on the unmodified copy "
              f"({time.perf_counter() - started:.0f} s)")
        for mutation in chosen:
            started = time.perf_counter()
            outcome = check(mutation, root, args.timeout, args.verbose)
            failures += outcome != "caught"
            label = outcome if not outcome.startswith("ERROR") else "ERROR"
            detail = f"  {outcome}" if label == "ERROR" else ""
            print(f"{label:10}  {mutation.name:{width}}  {mutation.path}  "
                  f"({time.perf_counter() - started:.0f} s){detail}", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutations caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
