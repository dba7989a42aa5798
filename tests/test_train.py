"""`python -m sparse_viz.train` end to end: a short real run, resume, and bad input."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_viz.model.selectors import select_keys
from sparse_viz.train import run_training

REPO = str(Path(__file__).resolve().parents[1])
TINY = str(Path(REPO) / "configs" / "train" / "tiny.yaml")


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row["val/loss"])) for row in read_metrics(run_dir) if row.get("val/loss")]


def mass_at_k(dense_probs: torch.Tensor, selected: torch.Tensor, top_k: int) -> float:
    """Brute-force share of dense attention mass on the selected keys, over rows with t + 1 > k.

    dense_probs: (B, H, T, T); selected: (B, T, k) with -1 pads.
    """
    B, H, T, _ = dense_probs.shape
    total, rows = 0.0, 0
    for b in range(B):
        for t in range(top_k, T):
            keys = [s for s in selected[b, t].tolist() if s >= 0]
            total += dense_probs[b, :, t, keys].sum().item() / H
            rows += 1
    return total / rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("data-cache")
    cli = run_training([
        "--config", TINY, "--run_root", str(root), "--run_name", "tiny",
        f"--data.cache_dir={cache}",
        "--model.stages=[{name: dense, steps: 40, lr: 0.01, indexer_lr: 0.003},"
        " {name: warmup, steps: 20, indexer_lr: 0.003}, {name: sparse, steps: 40, lr: 0.003, indexer_lr: 0.003}]",
    ])
    return cli, cache


@pytest.mark.slow
def test_short_run_writes_its_run_directory_and_lowers_validation_loss(tiny_run):
    cli, _ = tiny_run
    run_dir = cli.run_dir
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    losses = val_losses(run_dir)
    assert [step for step, _ in losses] == sorted(step for step, _ in losses)
    # An untrained model predicts ~uniformly: its loss is about ln(V).
    assert losses[0][1] < math.log(cli.model.model_config.vocab_size)
    assert losses[-1][1] < losses[0][1]
    header = read_metrics(run_dir)[0].keys()
    for column in ("train/loss", "train/stage", "train/lr_main", "train/lr_indexer", "train/tokens_per_s",
                   "train/indexer_kl/layer_0", "val/ppl"):
        assert column in header


@pytest.mark.slow
def test_trained_indexer_captures_more_attention_mass_than_random(tiny_run):
    cli, _ = tiny_run
    model = cli.model.model.eval()
    top_k = model.config.top_k
    batch = next(iter(cli.datamodule.val_dataloader()))[:, :-1]
    with torch.no_grad():
        out = model(batch, attention="sparse", trace="full")
    indexer, random = [], []
    for trace in out.traces:
        indexer.append(mass_at_k(trace.dense_attn_probs, trace.selected, top_k))
        chosen = select_keys("random", top_k=top_k, seq_len=batch.shape[1], seed=1, batch_size=batch.shape[0])
        random.append(mass_at_k(trace.dense_attn_probs, chosen, top_k))
    assert sum(indexer) / len(indexer) > sum(random) / len(random)


@pytest.mark.slow
def test_resume_continues_in_the_same_run_directory(tiny_run, tmp_path):
    cli, cache = tiny_run
    ckpt = cli.run_dir / "checkpoints" / "last.ckpt"
    before = val_losses(cli.run_dir)
    resumed = run_training([
        "--config", TINY, f"--data.cache_dir={cache}", "--ckpt_path", str(ckpt),
        "--model.stages=[{name: dense, steps: 40, lr: 0.01, indexer_lr: 0.003},"
        " {name: warmup, steps: 20, indexer_lr: 0.003}, {name: sparse, steps: 60, lr: 0.003, indexer_lr: 0.003}]",
    ])
    assert resumed.run_dir == cli.run_dir
    assert resumed.trainer.global_step == 120
    after = val_losses(cli.run_dir)
    # The history is kept, not restarted: every earlier validation row is still there, once.
    assert after[: len(before)] == before
    steps = [step for step, _ in after]
    assert len(steps) == len(set(steps)) and max(steps) > max(step for step, _ in before)


def run_cli(*args: str, cwd: Path, **env_extra: str) -> subprocess.CompletedProcess:
    # this checkout's package, not whichever one is installed (cwd is a temporary folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])), **env_extra}
    return subprocess.run([sys.executable, "-m", "sparse_viz.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    line = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n"
    (folder / "a.txt").write_text(line * 400)
    (folder / "b.txt").write_text(line.upper() * 400)
    return folder


BAD_INPUTS = [
    (["--model.selector=topkk"], "unknown selector"),
    (["--model.top_k=0"], "top_k"),
    (["--data.seq_len=128"], "max_seq_len"),
    (["--data.corpus=/no/such/corpus"], "/no/such/corpus"),
    (["--model.no_such_option=3"], "no_such_option"),
    # an abbreviation is not expanded (it would silently be --trainer.max_steps)
    (["--trainer.max_step=30"], "unrecognized arguments: --trainer.max_step=30"),
    # an unknown class names the ones that exist
    (["--data", "sparse_viz.data.NoSuch"],
     ("unknown data module 'sparse_viz.data.NoSuch'", "sparse_viz.data.RecallDataModule, sparse_viz.data.TextDataModule")),
    (["--model", "sparse_viz.training.NoSuchModule"],
     ("unknown model 'sparse_viz.training.NoSuchModule'",
      "sparse_viz.training.DSALightningModule, sparse_viz.training.RetrofitLightningModule")),
    (["--trainer.callbacks+=sparse_viz.tracking.NoSuchCallback"],
     ("unknown callback 'sparse_viz.tracking.NoSuchCallback'", "sparse_viz.tracking.SelectionAnalysisCallback",
      "ModelCheckpoint", "EarlyStopping")),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, fragment", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_no_run_directory(extra, fragment, small_corpus, tmp_path):
    root = tmp_path / "runs"
    args = ["--config", TINY, "--run_root", str(root), f"--data.cache_dir={tmp_path / 'cache'}"]
    if not any(a.startswith("--data.corpus") for a in extra):
        args.append(f"--data.corpus={small_corpus}")
    result = run_cli(*args, *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    for part in (fragment,) if isinstance(fragment, str) else fragment:
        assert part in lines[0], lines[0]
    assert not root.exists() or not any(root.iterdir())


@pytest.mark.slow
def test_processes_of_a_cluster_launcher_without_a_run_name_are_refused(small_corpus, tmp_path):
    """torchrun / srun start every process themselves: named after each one's clock, their run
    directories would differ, so a run name is required (one line, exit 2, nothing written)."""
    root = tmp_path / "runs"
    args = ["--config", TINY, "--run_root", str(root), f"--data.cache_dir={tmp_path / 'cache'}",
            f"--data.corpus={small_corpus}"]
    for env in ({"WORLD_SIZE": "2"}, {"SLURM_NTASKS": "4"}):
        result = run_cli(*args, cwd=tmp_path, **env)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "give --run_name" in lines[0], result.stderr[-2000:]
        assert not root.exists() or not any(root.iterdir())


@pytest.mark.slow
def test_malformed_yaml_and_empty_corpus_are_rejected(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {top_k: [1, 2\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    root = tmp_path / "runs"
    for args in (["--config", str(bad_yaml)], ["--config", TINY, f"--data.corpus={empty}"]):
        result = run_cli(*args, "--run_root", str(root), f"--data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr[-2000:]
        assert not root.exists() or not any(root.iterdir())


@pytest.mark.slow
def test_validation_loss_is_the_token_weighted_mean_with_the_stage_attention(tiny_run):
    import torch.nn.functional as F

    cli, _ = tiny_run
    module = cli.model
    # The run's own trainer: its global step places validation in the final, sparse stage.
    assert module.stage_attention == "sparse"
    assert cli.trainer.limit_val_batches == 2
    (logged,) = cli.trainer.validate(module, datamodule=cli.datamodule, verbose=False)
    total, tokens = 0.0, 0
    batches = iter(cli.datamodule.val_dataloader())
    with torch.no_grad():
        for _ in range(2):
            batch = next(batches)
            logits = module.model(batch[:, :-1], attention="sparse").logits
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            tokens += batch[:, 1:].numel()
    assert logged["val/loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert logged["val/ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_progress_bar_names_the_step_budget_not_a_negative_epoch(tiny_run):
    from lightning.pytorch.callbacks import RichProgressBar

    cli, _ = tiny_run
    bars = [c for c in cli.trainer.callbacks if isinstance(c, RichProgressBar)]
    assert len(bars) == 1  # the stock bar was replaced, not joined
    description = bars[0]._get_train_description(0)
    assert description.strip() == f"Epoch 0 (max {cli.trainer.max_steps} steps)"
    assert cli.trainer.max_epochs == -1 and "-2" not in description


def test_a_corpus_too_small_for_the_requested_vocabulary_trains_with_the_vocabulary_it_has(small_corpus, tmp_path):
    """The BPE of a small corpus stops short of --data.vocab_size; the model is built with the real
    size (linked) and the run trains (it used to stop on Lightning's hyperparameter merge)."""
    cli = run_training([
        "--config", TINY, "--run_root", str(tmp_path / "runs"), "--run_name", "small",
        f"--data.corpus={small_corpus}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.vocab_size=4096",
        "--trainer.max_steps=2", "--trainer.callbacks=[]",
    ])
    real = cli.datamodule.tokenizer.get_vocab_size()
    assert real < 4096
    assert cli.model.model_config.vocab_size == real
    assert (tmp_path / "runs" / "small" / "checkpoints" / "last.ckpt").is_file()


def test_checkpoints_are_full_and_saved_without_a_log_line_each(tmp_path):
    """Each step checkpoint keeps the optimizer and loop state (a resume needs them), and saving it
    logs nothing: Lightning logs "`weights_only` was not set" for every save that leaves it unset,
    a line per checkpoint in every run's output."""
    import logging

    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(handler)
    try:
        run_training([
            "--config", TINY, "--run_root", str(tmp_path / "runs"), "--run_name", "ckpt",
            f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=2", "--trainer.callbacks=[]",
        ])
    finally:
        lightning_logger.removeHandler(handler)
    checkpoint = torch.load(tmp_path / "runs" / "ckpt" / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["optimizer_states"] and "loops" in checkpoint
    assert messages, "the handler should hear Lightning's other INFO lines"
    assert not [m for m in messages if "weights_only" in m]


def test_a_bf16_mixed_run_goes_through_the_three_stages_with_finite_non_negative_losses(tmp_path):
    """`--trainer.precision bf16-mixed` (autocast on CPU: the fused sparse attention reads bfloat16
    as stored): the dense, warm-up and sparse stages each train, every logged loss is finite and
    every logged KL is >= 0 (a KL is never negative), and the weights stay float32."""
    cli = run_training([
        "--config", TINY, "--run_root", str(tmp_path / "runs"), "--run_name", "bf16",
        f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.precision=bf16-mixed", "--trainer.callbacks=[]",
        "--trainer.log_every_n_steps=1",
        "--model.stages=[{name: dense, steps: 3, lr: 0.003, indexer_lr: 0.001},"
        " {name: warmup, steps: 3, indexer_lr: 0.001}, {name: sparse, steps: 3, lr: 0.001, indexer_lr: 0.001}]",
    ])
    rows = read_metrics(tmp_path / "runs" / "bf16")
    stages = {float(row["train/stage"]) for row in rows if row.get("train/stage")}
    assert stages == {0.0, 1.0, 2.0}
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    kls = [float(row["train/indexer_kl"]) for row in rows if row.get("train/indexer_kl")]
    assert losses and all(math.isfinite(x) for x in losses)
    assert kls and all(x >= 0 for x in kls)
    assert all(p.dtype == torch.float32 for p in cli.model.parameters())
