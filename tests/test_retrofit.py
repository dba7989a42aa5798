"""Lightning Indexers retrofitted onto a frozen Hugging Face model (DSA on a pretrained checkpoint).

References: the model's own eager attention (`output_attentions=True`) for the warm-up target;
the unmodified model for dense logits; an independent brute-force sparse forward (the full
index-score matrix, `select_keys`, and an additive mask in the model's eager attention, through
`KeySelection`) for the sparse path, which itself runs the blockwise top-k and CSR kernels.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny, tiny_llama, tiny_qwen3
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sparse_viz.errors import UserInputError
from sparse_viz.model.attention import selection_mask
from sparse_viz.model.indexer import indexer_kl
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.retrofit_indexers import RetrofitIndexers, load_retrofit_indexers
from sparse_viz.pretrained.retrofit_model import RetrofitModel
from sparse_viz.pretrained.selected_attention import KeySelection, selection_installed

REPO = Path(__file__).resolve().parents[1]
MODELS = {"qwen3": tiny_qwen3, "llama": tiny_llama}  # both GQA (4 query heads, 2 KV heads)


def retrofit(make, top_k: int = 6, warmup_kl: str = "full", seed: int = 0):
    """(RetrofitModel on a tiny model, an untouched copy of that model, random ids (2, 40))."""
    hf, _ = make()
    reference = copy.deepcopy(hf)
    torch.manual_seed(seed)
    indexers = RetrofitIndexers.for_model(ArchitectureAdapter.for_model(hf), heads=3, dim=8, rope_dim=4)
    model = RetrofitModel(hf, indexers, top_k=top_k, block_size=7, warmup_kl=warmup_kl)  # 7 does not divide 40
    for parameter in model.main_parameters():
        parameter.requires_grad_(False)
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(seed))
    return model, reference, ids


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("warmup_kl", ["full", "blocks", "checkpointed"])
def test_warmup_kl_targets_the_models_eager_attention_summed_over_heads(name, warmup_kl):
    model, reference, ids = retrofit(MODELS[name], warmup_kl=warmup_kl)
    eager = reference(input_ids=ids, output_attentions=True).attentions  # per layer (B, H, T, T)
    out = model(ids, attention="dense", indexer_loss="all", trace="full")
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    for layer, trace in enumerate(out.traces):
        torch.testing.assert_close(trace.dense_attn_probs, eager[layer], rtol=1e-5, atol=1e-6)
        p = eager[layer].sum(1) / eager[layer].sum((1, 3))[..., None]  # summed over heads, L1-normalised
        expected = indexer_kl(p, trace.index_scores, causal).mean()
        torch.testing.assert_close(out.indexer_kl[layer], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_dense_forward_reproduces_the_models_logits(name):
    model, reference, ids = retrofit(MODELS[name])
    want = reference(input_ids=ids).logits
    for indexer_loss in (None, "all"):
        torch.testing.assert_close(model(ids, attention="dense", indexer_loss=indexer_loss).logits, want,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_sparse_forward_equals_a_brute_force_masked_forward_with_the_same_indexers(name):
    model, reference, ids = retrofit(MODELS[name], top_k=6)
    out = model(ids, attention="sparse", trace="full")
    settings = model.indexers.settings
    selection = KeySelection("topk", top_k=6, indexers=model.indexers, indexer_rope_dim=settings["rope_dim"],
                             indexer_rope_theta=settings["rope_theta"])
    with selection_installed(reference, selection):
        want = reference(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    t = torch.arange(40)[None, :, None]
    for layer, trace in enumerate(out.traces):
        assert torch.equal(trace.selected, selection.last_selected[layer])  # the same keys, layer by layer
        assert not (trace.selected > t).any(), "a future key was selected"
        # one selection per layer, shared by every head: off the selection, no head has weight
        assert (trace.attn_probs.masked_fill(selection_mask(trace.selected, 40)[:, None], 0) == 0).all()


def test_no_gradient_reaches_the_frozen_model_and_every_indexer_learns():
    model, _, ids = retrofit(tiny_qwen3)
    before = {name: p.detach().clone() for name, p in model.hf.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for attention, loss in (("dense", "all"), ("sparse", "selected")):
        out = model(ids, attention=attention, indexer_loss=loss)
        optimizer.zero_grad()
        out.indexer_kl.sum().backward()
        assert all(p.grad is None for p in model.hf.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.indexers.parameters())
        optimizer.step()
    for name, p in model.hf.named_parameters():
        assert torch.equal(p, before[name]), name


def test_a_short_warmup_lowers_the_indexer_kl():
    model, _, ids = retrofit(tiny_llama)
    optimizer = torch.optim.AdamW(model.indexers.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        kl = model(ids, attention="dense", indexer_loss="all").indexer_kl.sum()
        optimizer.zero_grad()
        kl.backward()
        optimizer.step()
        losses.append(kl.item())
    assert losses[-1] < 0.6 * losses[0]  # 1.09 -> 0.47 when written


def test_bad_construction_is_a_user_error():
    hf, _ = tiny_qwen3()
    adapter = ArchitectureAdapter.for_model(hf)
    with pytest.raises(UserInputError, match="k must be >= 1"):
        RetrofitModel(hf, RetrofitIndexers.for_model(adapter, 2, 8, 4), top_k=0)
    with pytest.raises(UserInputError, match="rope_dim"):
        RetrofitIndexers.for_model(adapter, 2, 8, 10)
    with pytest.raises(UserInputError, match="indexers of width"):
        RetrofitModel(hf, RetrofitIndexers(hidden_size=32, n_layers=2), top_k=4)  # the model has 3 layers


# -- the training command and its checkpoints ------------------------------------------------


def tiny_model_with_its_tokenizer(directory: Path, corpus: Path, seed: int) -> Path:
    """A tiny Llama whose tokenizer is a BPE trained on `corpus` (with `<|endoftext|>`, as the
    training data needs), saved as a Hugging Face model directory."""
    from sparse_viz.data.tokenizer import train_bpe

    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, 300), eos_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    return save_tiny(LlamaForCausalLM(config).eval(), tokenizer, directory)


@pytest.fixture(scope="module")
def retrofit_run(tmp_path_factory):
    """Two tiny models on one corpus, and a retrofit run (warm-up then sparse) on the first."""
    root = tmp_path_factory.mktemp("retrofit")
    corpus = root / "corpus"
    corpus.mkdir()
    line = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n"
    (corpus / "a.txt").write_text(line * 300)
    (corpus / "b.txt").write_text(line.upper() * 300)
    model_dir = tiny_model_with_its_tokenizer(root / "model", corpus, seed=0)
    other_dir = tiny_model_with_its_tokenizer(root / "other", corpus, seed=1)
    args = ["--config", str(REPO / "configs/train/retrofit_smollm2.yaml"), f"--run_root={root / 'runs'}",
            "--run_name=r", f"--model.model_path={model_dir}", "--model.top_k=8", "--model.indexer_heads=2",
            "--model.indexer_dim=8", "--model.indexer_rope_dim=4",
            "--model.stages=[{name: warmup, steps: 4, indexer_lr: 0.01}, {name: sparse, steps: 2, indexer_lr: 0.01}]",
            f"--data.corpus={corpus}", "--data.seq_len=32", "--data.batch_size=2",
            f"--data.tokenizer_path={model_dir / 'tokenizer.json'}", f"--data.cache_dir={root / 'cache'}",
            "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
            "--trainer.callbacks.every_n_steps=3", "--trainer.callbacks.probe_seq_len=24"]
    result = subprocess.run([sys.executable, "-m", "sparse_viz.train", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "model": model_dir, "other": other_dir, "corpus": corpus, "args": args,
            "run": root / "runs" / "r", "stdout": result.stdout}


@pytest.mark.slow
def test_retrofit_run_prints_the_indexer_size_and_tracks_its_selection(retrofit_run):
    run = retrofit_run["run"]
    per_layer = 2 * 8 * 32 + 8 * 32 + 2 * 32 + 2 * 8  # wq, wk, ww, LayerNorm weight + bias
    assert f"= {2 * per_layer:,} parameters" in retrofit_run["stdout"]
    import pandas as pd

    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["indexer_parameters"].dropna().iloc[0] == 2 * per_layer
    assert {"train/indexer_kl/layer_0", "train/indexer_kl/layer_1", "val/sparse_loss"} <= set(metrics.columns)
    assert (run / "report.html").is_file() and any((run / "plots").rglob("*.png"))
    history = pd.read_json(run / "analysis" / "history.jsonl", lines=True)
    assert list(history["step"]) == [0, 3, 6]  # snapshots every 3 steps, warm-up then sparse
    assert list(history["stage"]) == ["warmup", "warmup", "sparse"]  # the stage of the next update: 4 warm-up, 2 sparse
    for layer in (0, 1):  # the indexer's selection against the baselines, on the probe's 24 tokens
        for column in ("mass_at_k", "mass_at_k_local", "mass_at_k_oracle", "recall_at_k", "indexer_kl"):
            assert history[f"L{layer}/{column}"].between(0, 1e3).all(), column
    assert (history["L0/mass_at_k_oracle"] >= history["L0/mass_at_k"] - 1e-6).all()  # the oracle is the ceiling


@pytest.mark.slow
def test_retrofit_checkpoint_holds_only_the_indexers_and_their_models_identity(retrofit_run):
    checkpoint = torch.load(retrofit_run["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["state_dict"], "no tensors saved"
    assert all(key.startswith("model.indexers.") for key in checkpoint["state_dict"]), "frozen weights were saved"
    indexers = load_retrofit_indexers(retrofit_run["run"] / "checkpoints" / "last.ckpt", retrofit_run["model"],
                                      ArchitectureAdapter.for_model(LlamaForCausalLM.from_pretrained(retrofit_run["model"])))
    saved = {k.removeprefix("model.indexers."): v for k, v in checkpoint["state_dict"].items()}
    for key, value in indexers.state_dict().items():
        assert torch.equal(value, saved[key])


@pytest.mark.slow
def test_indexers_from_another_model_are_refused(retrofit_run):
    other = retrofit_run["other"]
    adapter = ArchitectureAdapter.for_model(LlamaForCausalLM.from_pretrained(other))
    with pytest.raises(UserInputError, match="trained for the model"):
        load_retrofit_indexers(retrofit_run["run"] / "checkpoints" / "last.ckpt", other, adapter)
    result = subprocess.run([sys.executable, "-m", "sparse_viz.analysis", "sparse-eval", "--model", str(other),
                             "--indexers", str(retrofit_run["run"] / "checkpoints" / "last.ckpt"),
                             "--corpus", str(retrofit_run["corpus"]), "--seq-len", "32", "--windows", "1",
                             "--k", "8", "--output", str(retrofit_run["root"] / "eval-other"), "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "trained for the model" in result.stderr
    assert not (retrofit_run["root"] / "eval-other").exists()


@pytest.mark.slow
def test_sparse_eval_runs_the_trained_indexers_as_the_topk_selector(retrofit_run):
    output = retrofit_run["root"] / "eval"
    result = subprocess.run([sys.executable, "-m", "sparse_viz.analysis", "sparse-eval", "--model",
                             str(retrofit_run["model"]), "--indexers",
                             str(retrofit_run["run"] / "checkpoints" / "last.ckpt"), "--corpus",
                             str(retrofit_run["corpus"]), "--seq-len", "32", "--windows", "1", "--k", "4", "8",
                             "--output", str(output), "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    import pandas as pd

    table = pd.read_csv(output / "perplexity.csv")
    assert set(table["selector"]) == {"dense", "topk", "local", "sink_local", "random", "oracle"}
    assert sorted(table.loc[table.selector == "topk", "k"]) == [4, 8]


@pytest.mark.slow
def test_resuming_a_retrofit_run_continues_from_its_indexers(retrofit_run):
    """The checkpoint lacks the frozen weights: resuming must load it (non-strict) and go on."""
    args = [a for a in retrofit_run["args"] if not a.startswith(("--run_name", "--model.stages"))]
    args += ["--model.stages=[{name: warmup, steps: 4, indexer_lr: 0.01}, {name: sparse, steps: 4, indexer_lr: 0.01}]",
             "--ckpt_path", str(retrofit_run["run"] / "checkpoints" / "last.ckpt")]
    result = subprocess.run([sys.executable, "-m", "sparse_viz.train", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(retrofit_run["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 8


RETROFIT_BAD_INPUTS = [
    (["--model.model_path=/no/such/model"], "/no/such/model"),
    (["--model.top_k=0"], "top_k"),
    (["--model.stages=[{name: dense, steps: 3}]"], "warmup and sparse stages only"),
    (["--model.indexer_rope_dim=5"], "rope_dim"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, fragment", RETROFIT_BAD_INPUTS)
def test_bad_retrofit_input_is_one_line_exit_2_and_no_run_directory(extra, fragment, retrofit_run, tmp_path):
    args = [a for a in retrofit_run["args"] if not a.startswith(("--run_root", "--run_name"))]
    args += [f"--run_root={tmp_path / 'runs'}", *extra]
    result = subprocess.run([sys.executable, "-m", "sparse_viz.train", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(retrofit_run, tmp_path):
    bigger = tiny_model_with_its_tokenizer(tmp_path / "m", retrofit_run["corpus"], seed=0)
    config = LlamaConfig.from_pretrained(bigger)
    config.vocab_size = 100  # fewer embedding rows than the tokenizer's ids
    LlamaForCausalLM(config).save_pretrained(bigger)
    args = [a for a in retrofit_run["args"] if not a.startswith(("--run_root", "--run_name", "--model.model_path"))]
    args += [f"--run_root={tmp_path / 'runs'}", f"--model.model_path={bigger}"]
    result = subprocess.run([sys.executable, "-m", "sparse_viz.train", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "use the model's own tokenizer" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_a_checkpoint_that_is_not_a_causal_lm_is_refused(retrofit_run, tmp_path):
    encoder = tmp_path / "bert"
    encoder.mkdir()
    (encoder / "config.json").write_text('{"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, '
                                         '"num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 300}')
    args = [a for a in retrofit_run["args"] if not a.startswith(("--run_root", "--run_name", "--model.model_path"))]
    args += [f"--run_root={tmp_path / 'runs'}", f"--model.model_path={encoder}"]
    result = subprocess.run([sys.executable, "-m", "sparse_viz.train", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "unsupported architecture 'bert'" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_evaluation_text_too_short_for_the_windows_is_refused(retrofit_run, tmp_path):
    output = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "sparse_viz.analysis", "sparse-eval", "--model",
                             str(retrofit_run["model"]), "--indexers",
                             str(retrofit_run["run"] / "checkpoints" / "last.ckpt"), "--corpus",
                             str(retrofit_run["corpus"]), "--seq-len", "128", "--windows", "500", "--k", "8",
                             "--output", str(output), "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "500 windows of 128 need 64000" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and not output.exists()


@pytest.mark.slow
def test_generate_runs_the_trained_indexers_through_the_caches_and_refuses_another_models(retrofit_run, capsys):
    """`generate --selector topk` with the run's indexers: the tokens `generate` emits through the
    masked reference, then the speeds; the same indexers on another model: one line, exit 2."""
    from analysis_cli import run_analysis_cli

    from sparse_viz.pretrained.sparse_inference import load_sparse_model

    checkpoint = str(retrofit_run["run"] / "checkpoints" / "last.ckpt")
    argv = ["generate", "--model", str(retrofit_run["model"]), "--indexers", checkpoint, "--k", "8",
            "--prompt", "To be, or not to be, that is the question: whether", "--max-new-tokens", "6", "--device", "cpu"]
    result = run_analysis_cli(argv, capsys)
    assert result.returncode == 0, result.stderr
    assert "attention: topk k=8; prefill" in result.stderr and "tokens/s" in result.stderr

    loaded = load_sparse_model(str(retrofit_run["model"]), checkpoint, "topk", 8, device="cpu")
    state = loaded.model._sparse_viz_inference
    state.uninstall()
    ids = loaded.tokenizer("To be, or not to be, that is the question: whether", return_tensors="pt")["input_ids"]
    with selection_installed(loaded.model, state.selection):
        want = loaded.model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)[0, ids.shape[1]:]
    assert result.stdout.strip() == loaded.tokenizer.decode(want, skip_special_tokens=True).strip()

    other = run_analysis_cli([*argv[:2], str(retrofit_run["other"]), *argv[3:]], capsys)
    lines = [line for line in other.stderr.splitlines() if line.strip()]
    assert other.returncode == 2 and len(lines) == 1 and "trained for the model" in lines[0], other.stderr
