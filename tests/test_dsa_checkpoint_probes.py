"""This project's DSA training checkpoints in the probes: the converted model computes what the
DSA model computes (its own selector, or dense), and masking / impact on it match brute force
with that model's selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from analysis_cli import run_analysis_cli

from sparse_viz.analysis.masking.all_pairs import all_pairs_attention_impact
from sparse_viz.analysis.masking.experiment import run_masking_experiment
from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
from sparse_viz.analysis.masking.reference import reference_all_pairs_impact
from sparse_viz.data.tokenizer import save_tokenizer_atomic, train_bpe
from sparse_viz.pretrained.loading import load_model
from sparse_viz.training.module import DSALightningModule

TEXT = "the cat sat on the mat and the dog sat on the log; the bird sang in the tree by the river. " * 20
PROMPT = "the dog sat on the mat by the tree and the cat sang"


def make_run(root, selector="topk", top_k=4, seed=0, n_kv_heads=None):
    """A run directory as training leaves it: checkpoints/last.ckpt (Lightning's format: state_dict
    and hyper_parameters) and tokenizer.json, with random weights of the tiny config's sizes."""
    tokenizer = train_bpe([TEXT], 300)
    torch.manual_seed(seed)
    module = DSALightningModule(vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                n_kv_heads=n_kv_heads, max_seq_len=64, selector=selector, top_k=top_k,
                                indexer_heads=2, indexer_dim=16, indexer_rope_dim=8, use_indexer=True)
    (root / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.6"}, root / "checkpoints" / "last.ckpt")
    save_tokenizer_atomic(tokenizer, root / "tokenizer.json")
    return module.model.eval(), root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@torch.no_grad()
@pytest.mark.parametrize("selector,n_kv_heads", [("topk", None), ("local", None), ("oracle", None),
                                                 ("sink_local", None), ("topk", 1)])  # 1: one key/value head
def test_the_converted_checkpoint_computes_the_dsa_models_logits(tmp_path, selector, n_kv_heads):
    dsa, checkpoint = make_run(tmp_path, selector=selector, top_k=6 if selector == "sink_local" else 4,
                               n_kv_heads=n_kv_heads)
    loaded = load_model(checkpoint, device="cpu")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 8  # long enough for the selection to leave keys out
    own = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(own, dsa(ids, attention="sparse").logits, rtol=1e-5, atol=1e-5)
    dense = load_model(checkpoint, device="cpu", attention="dense").model(input_ids=ids).logits
    torch.testing.assert_close(dense, dsa(ids, attention="dense").logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(own, dense, atol=1e-4)


def test_masking_a_dsa_checkpoint_equals_brute_force_with_its_selection(topk_run):
    _, checkpoint = topk_run
    loaded = load_model(checkpoint, device="cpu")
    fast = run_masking_experiment(PROMPT, model=loaded, num_tokens=1)
    slow = run_masking_experiment(PROMPT, model=loaded, num_tokens=1, method="reference")
    np.testing.assert_allclose(fast["l2_distance"], slow["l2_distance"], rtol=1e-4, atol=1e-6)
    assert fast.attrs["metadata"]["attention"] == "topk k=4"
    # keys the final query does not select change nothing: exactly 4 keys per layer matter
    attn = fast[fast["variant"] == "Attn"]
    assert (attn.groupby("layer")["l2_distance"].apply(lambda d: int((d > 0).sum())) == 4).all()


def test_all_pairs_impact_of_a_dsa_checkpoint_equals_brute_force(topk_run):
    _, checkpoint = topk_run
    loaded = load_model(checkpoint, device="cpu")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    inputs, _ = capture_layer_inputs(loaded.adapter, ids)
    for layer in range(loaded.adapter.n_layers):
        fast = all_pairs_attention_impact(loaded.adapter, layer, inputs[layer], block_size=5)
        slow = reference_all_pairs_impact(loaded.adapter, layer, inputs[layer])
        lower = torch.ones_like(slow.l2, dtype=torch.bool).tril()
        lower[0, 0] = False
        torch.testing.assert_close(fast.l2[lower].double(), slow.l2[lower], rtol=1e-5, atol=1e-6)
        assert ((fast.l2[lower] > 0).view(-1).sum()) <= 4 * ids.shape[1]  # at most k keys matter per query


def test_the_probe_commands_read_a_checkpoint_and_say_which_selector_ran(topk_run, tmp_path, capsys):
    _, checkpoint = topk_run
    for command, extra in (("mask", []), ("impact", ["--k", "2"]), ("heads", ["--sweep", "--no-patterns"])):
        for attention in ("own", "dense"):
            out = tmp_path / f"{command}-{attention}"
            result = run_analysis_cli([command, "--model", str(checkpoint), "--prompt", PROMPT, "--attention", attention,
                                       "--output", str(out), *extra], capsys)
            assert result.returncode == 0, result.stderr
            label = "topk k=4" if attention == "own" else "dense"
            if command != "heads":
                assert json.loads((out / "metadata.json").read_text())["attention"] == label
            else:
                assert f"(attention: {label})" in (out / "report.html").read_text()


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "cannot be read"),
    (None, "is not a sparse_viz DSA training checkpoint"),
])
def test_a_foreign_or_truncated_checkpoint_is_one_line_exit_2(tmp_path, capsys, content, message):
    checkpoint = tmp_path / "checkpoints" / "x.ckpt"
    checkpoint.parent.mkdir()
    if content is None:
        torch.save({"state_dict": {"weight": torch.zeros(2)}}, checkpoint)
    else:
        checkpoint.write_bytes(content)
    result = run_analysis_cli(["mask", "--model", str(checkpoint), "--prompt", "hi there", "--output",
                               str(tmp_path / "out")], capsys)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_real_training_run_is_probed_from_its_checkpoint(tmp_path, capsys):
    """Training writes tokenizer.json into the run directory, so its checkpoint loads as is, and
    the converted model computes the logits of the module Lightning restores from it."""
    from sparse_viz.train import run_training
    from test_train import TINY

    cli = run_training(["--config", TINY, "--run_root", str(tmp_path), "--run_name", "tiny",
                        f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.enable_progress_bar=false"])
    checkpoint = cli.run_dir / "checkpoints" / "last.ckpt"
    assert (cli.run_dir / "tokenizer.json").is_file()
    loaded = load_model(checkpoint, device="cpu")
    ids = torch.tensor([cli.datamodule.tokenizer.encode(PROMPT * 3).ids[:48]])
    trained = DSALightningModule.load_from_checkpoint(checkpoint, map_location="cpu").model.eval()  # Lightning's own loader
    with torch.no_grad():
        expected = trained(ids, attention="sparse").logits
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    result = run_analysis_cli(["impact", "--model", str(checkpoint), "--prompt", PROMPT, "--k", "8",
                               "--output", str(tmp_path / "impact")], capsys)
    assert result.returncode == 0, result.stderr


@torch.no_grad()
def test_impact_agreement_of_a_dsa_checkpoint_scores_its_indexer(topk_run):
    """Dense attention (so that every key can matter): the indexer's row is the top-k of the DSA
    model's own indexer scores, and its Spearman is scipy's against brute-force impact."""
    from scipy.stats import spearmanr

    from sparse_viz.analysis.impact.experiment import run_impact_analysis

    dsa, checkpoint = topk_run
    loaded = load_model(checkpoint, device="cpu", attention="dense")
    result = run_impact_analysis(PROMPT, model=loaded, layers=[1], k=[4])
    row = result.agreement.set_index("selector").loc["indexer"]
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    trace = dsa(ids, attention="dense", trace="select").traces[1]  # the DSA model's own index scores
    inputs, _ = capture_layer_inputs(loaded.adapter, ids, [1])
    impact = reference_all_pairs_impact(loaded.adapter, 1, inputs[1]).l2
    T = ids.shape[1]
    expected = np.mean([spearmanr(trace.index_scores[0, t, : t + 1], impact[t, : t + 1]).statistic for t in range(4, T)])
    assert row["spearman"] == pytest.approx(expected, rel=1e-6)
    hits = []
    for t in range(4, T):
        top_impact = set(np.argsort(-impact[t, : t + 1].numpy(), kind="stable")[:4].tolist())
        top_index = set(np.argsort(-trace.index_scores[0, t, : t + 1].numpy(), kind="stable")[:4].tolist())
        hits.append(len(top_impact & top_index) / 4)
    assert row["impact_recall_at_k"] == pytest.approx(np.mean(hits))
