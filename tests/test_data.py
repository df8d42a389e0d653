"""patchc.data: the token cache, the memory-mapped corpus, mixing / sharding, and bad input caught early."""
import json
import shutil

import pytest
import torch

from conftest import ASSETS, need
from patchc import data
from patchc.data import (DataError, TokenCorpus, TrainingWindows, batch_indices, calibration_indices,
                         check_data_paths, chunk, holdout_indices, rank_slice, text_pieces, tokenize_files)
from patchc.models import byte_tokenizer
from patchc.token_cache import default_cache_dir

CALIB = ASSETS / "data/calib"


class Counting:
    """A tokenizer that counts its calls (tokenising), everything else passed through."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.tok(*a, **kw)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture()
def counting(tok):
    return Counting(tok)


def calib_slice(dst, folder: str, chars: int):
    """The first `chars` characters of a calibration folder's first file, written to dst."""
    src = sorted(p for p in need(CALIB / folder).rglob("*.txt"))[0]
    with open(src, encoding="utf-8") as f:
        text = f.read(chars)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text, encoding="utf-8")
    return dst


def jsonl(dst, texts):
    dst.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return dst


def build(tokenizer, paths, tmp_path, **kw):
    return TokenCorpus.build(tokenizer, [str(p) for p in paths], cache_dir=tmp_path / "cache", **kw)


def all_tokens(corpus):
    return corpus.sequences(torch.arange(corpus.num_sequences(1)), 1).flatten()


def test_cache_hits_by_content_not_path(counting, tmp_path):
    a = calib_slice(tmp_path / "a" / "c4.txt", "c4_en_train_head1000", 20_000)
    first = build(counting, [a], tmp_path)
    calls = counting.calls
    assert calls > 0 and first.hits == 0
    b = tmp_path / "elsewhere" / "renamed.txt"
    b.parent.mkdir()
    shutil.copy(a, b)
    again = build(counting, [b], tmp_path)
    assert counting.calls == calls and again.hits == 1  # no re-tokenisation
    assert torch.equal(all_tokens(again), all_tokens(first))
    assert again.files == [(str(b), first.n_tokens)]
    # the sidecar says what the entry is
    (meta,) = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert meta["n_tokens"] == first.n_tokens and meta["dtype"] == "uint16"
    assert meta["source"]["name"] == "c4.txt" and meta["source"]["size"] == a.stat().st_size
    # other content misses
    b.write_text(b.read_text() + "more")
    build(counting, [b], tmp_path)
    assert counting.calls > calls


@pytest.mark.parametrize("damage", ["truncate", "no_sidecar", "bad_sidecar", "grow"])
def test_corrupt_cache_entry_is_rebuilt(counting, tmp_path, damage):
    a = calib_slice(tmp_path / "a.txt", "wikipedia_wiki00", 10_000)
    want = all_tokens(build(counting, [a], tmp_path))
    calls = counting.calls
    (bin_path,) = (tmp_path / "cache").glob("*.bin")
    meta = bin_path.with_suffix(".json")
    if damage == "truncate":
        bin_path.write_bytes(bin_path.read_bytes()[:-3])
    elif damage == "grow":
        bin_path.write_bytes(bin_path.read_bytes() + b"\0\0")
    elif damage == "no_sidecar":
        meta.unlink()
    else:
        meta.write_text("{not json")
    again = build(counting, [a], tmp_path)
    assert counting.calls > calls and again.hits == 0
    assert torch.equal(all_tokens(again), want)
    assert build(counting, [a], tmp_path).hits == 1  # and the rebuilt entry is trusted again


def test_sequences_equal_in_memory_tokenisation(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE_BYTES", 4096)  # several pieces per text file
    files = [calib_slice(tmp_path / "b" / "gutenberg.txt", "gutenberg_nltk", 30_000),
             calib_slice(tmp_path / "a" / "stories.txt", "tinystories_train_exllamav2", 25_000),
             jsonl(tmp_path / "c.jsonl", ["first doc", "", "  ", "second doc \u00e9\u4e2d", "third"]),
             calib_slice(tmp_path / "d" / "speeches.txt", "us_speeches", 12_345)]
    corpus = build(tok, [tmp_path / "b", tmp_path / "a", files[2], tmp_path / "d"], tmp_path)
    ordered = sorted(files)  # the corpus concatenates files in sorted path order
    assert [p for p, _ in corpus.files] == [str(p) for p in ordered]
    ref = tokenize_files(tok, [str(p) for p in ordered])  # each file tokenised whole, in memory
    assert corpus.n_tokens == ref.numel() == sum(n for _, n in corpus.files)
    for seq_len in (64, 1000):
        windows = chunk(ref, seq_len)
        n = corpus.num_sequences(seq_len)
        assert n == len(windows)
        assert torch.equal(corpus.sequences(torch.arange(n), seq_len), windows)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seq_len))[:7]
        got = corpus.sequences(idx, seq_len)
        assert got.dtype == torch.int64 and got.shape == (7, seq_len) and torch.equal(got, windows[idx])
    # the jsonl's documents: one end-of-text token after each non-blank line
    eos = tok.eos_token_id
    (c_tokens,) = [n for p, n in corpus.files if p.endswith("c.jsonl")]
    assert c_tokens == len("first doc" "second doc \u00e9\u4e2d" "third".encode()) + 3  # byte tokens + 3 eos
    with pytest.raises(IndexError):
        corpus.sequences(torch.tensor([corpus.num_sequences(64)]), 64)
    assert ref[-1].item() == eos


def test_text_pieces_cut_between_a_word_and_whitespace(tmp_path):
    text = ("Alpha beta, gamma.\nAnd gamma\n\nDelta \u00e9t\u00e9 \u4e2d\u6587 epsilon 12\n" * 400)
    p = tmp_path / "t.txt"
    p.write_text(text, encoding="utf-8")
    pieces = list(text_pieces(p, piece_bytes=1000))
    assert len(pieces) > 5 and b"".join(raw for _, raw in pieces) == p.read_bytes()
    offset = 0
    for off, raw in pieces:
        assert off == offset
        offset += len(raw)
        raw.decode("utf-8")  # never inside a character
    for _, raw in pieces[:-1]:
        assert raw[-1:].isalnum() and 1000 <= len(raw) < 1200
    # at a blank line when there is one: the next piece starts with it
    assert all(raw.startswith(b"\n\n") for _, raw in pieces[1:])
    # without blank lines after a letter or digit: after a word; without any: between characters
    p.write_text("Alpha beta. \u00e9t\u00e9\n" * 400, encoding="utf-8")
    pieces = [raw for _, raw in text_pieces(p, piece_bytes=1000)]
    assert b"".join(pieces) == p.read_bytes() and all(raw.endswith(b"Alpha") for raw in pieces[:-1])
    p.write_text("\u00e9." * 2000, encoding="utf-8")
    pieces = [raw for _, raw in text_pieces(p, piece_bytes=1000)]
    assert b"".join(pieces) == p.read_bytes() and len(pieces) > 1 and all(raw.decode() for raw in pieces)


def test_every_folder_is_mixed_into_the_first_epoch(tok, tmp_path):
    folders = sorted(p.name for p in need(CALIB).iterdir() if p.is_dir())
    assert len(folders) == 13
    for name in folders:
        calib_slice(tmp_path / "calib" / name / "x.txt", name, 2_000)
    corpus = build(tok, [tmp_path / "calib" / name for name in folders], tmp_path)
    seq_len, batch = 32, 8
    n = corpus.num_sequences(seq_len)
    ends = torch.tensor([n_tok for _, n_tok in corpus.files]).cumsum(0)
    seen = set()
    for step in range(n // batch):
        idx = batch_indices(n, step, batch, seed=0)
        seen |= set(torch.searchsorted(ends, idx * seq_len, right=True).tolist())  # file of a window's start
    assert seen == set(range(13))
    # ... and they are mixed from the start, not file after file
    first = torch.searchsorted(ends, batch_indices(n, 0, 4 * batch, seed=0) * seq_len, right=True)
    assert len(set(first.tolist())) >= 8


def test_rank_slices_of_world_two_concatenate_to_the_single_process_batch(tok, tmp_path):
    corpus = build(tok, [calib_slice(tmp_path / "a.txt", "c4_exllamav2", 20_000)], tmp_path)
    seq_len, per_rank, world = 64, 3, 2
    n = corpus.num_sequences(seq_len)
    for step in (0, 1, 57):  # 57: past the first epoch
        whole = batch_indices(n, step, per_rank * world, seed=3)
        parts = [rank_slice(whole, r, world) for r in range(world)]
        assert all(len(p) == per_rank for p in parts)
        assert torch.equal(torch.cat(parts), whole)
        assert torch.equal(torch.cat([corpus.sequences(p, seq_len) for p in parts]), corpus.sequences(whole, seq_len))
    assert torch.equal(rank_slice(whole, 0, 1), whole)
    with pytest.raises(ValueError, match="not divisible by world size 4"):
        rank_slice(whole, 0, 4)
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        rank_slice(whole, 2, 2)


def test_calibration_indices(tmp_path):
    a = calibration_indices(100, 16, seed=0)
    assert torch.equal(a, calibration_indices(100, 16, seed=0)) and len(set(a.tolist())) == 16
    assert not torch.equal(a, calibration_indices(100, 16, seed=1))
    assert not torch.equal(a, batch_indices(100, 0, 16, seed=0))
    assert a.max() < 100
    with pytest.raises(DataError, match="only 10 sequences"):
        calibration_indices(10, 16, seed=0)


def test_held_out_windows_never_reach_training(tok, tmp_path):
    """--holdout: training indices (every epoch's batches, calibration) map onto the other windows only, all of
    them, in the corpus's own order."""
    corpus = build(tok, [calib_slice(tmp_path / "a.txt", "c4_exllamav2", 20_000)], tmp_path)
    seq_len = 64
    n = corpus.num_sequences(seq_len)
    held = holdout_indices(n, 20, seed=0)
    assert torch.equal(held, holdout_indices(n, 20, seed=0)) and len(set(held.tolist())) == 20
    assert not torch.equal(held, holdout_indices(n, 20, seed=1))
    train = TrainingWindows(corpus, seq_len, held)
    m = train.num_sequences(seq_len)
    assert m == n - 20 and train.n_tokens == m * seq_len
    kept = [i for i in range(n) if i not in set(held.tolist())]
    assert torch.equal(train.sequences(torch.arange(m), seq_len), corpus.sequences(torch.tensor(kept), seq_len))
    held_rows = {tuple(r) for r in corpus.sequences(held, seq_len).tolist()}
    seen = torch.cat([train.sequences(batch_indices(m, step, 8, seed=0), seq_len) for step in range(2 * m // 8)])
    seen = torch.cat([seen, train.sequences(calibration_indices(m, 16, seed=0), seq_len)])
    assert not held_rows & {tuple(r) for r in seen.tolist()}
    with pytest.raises(IndexError, match="out of range"):
        train.sequences(torch.tensor([m]), seq_len)
    with pytest.raises(DataError, match="lower --holdout"):
        holdout_indices(n, n, seed=0)


def test_bad_files_are_reported_before_any_tokenising(counting, tmp_path):
    good = calib_slice(tmp_path / "a_good.txt", "c4_en_train_head1000", 5_000)

    def fails(paths, match):
        with pytest.raises(DataError, match=match):
            build(counting, paths, tmp_path)
        assert counting.calls == 0

    binary = tmp_path / "z_model.bin"
    binary.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 10)
    fails([good, binary], r"z_model\.bin is binary \(a NUL byte at offset 5\)")
    late = tmp_path / "z_latin1.txt"  # invalid UTF-8 after the sniffed head: found by the full read
    late.write_bytes(b"plain text " * 10_000 + "caf\u00e9 au lait".encode("latin-1"))
    check_data_paths([str(late)])  # the cheap check only sniffs the head
    fails([good, late], r"z_latin1\.txt is not valid UTF-8 at byte offset 110003")
    head = tmp_path / "z_head.txt"
    head.write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match=r"z_head\.txt is not valid UTF-8 at byte offset 3"):
        check_data_paths([str(head)])
    fails([good, tmp_path / "nope.txt"], r"nope\.txt does not exist")
    no_text = tmp_path / "z.jsonl"
    no_text.write_text('{"text": "fine"}\n\n{"body": "no text field"}\n')
    fails([good, no_text], r"z\.jsonl:3: a jsonl record needs a string field 'text'")
    no_text.write_text('{"text": "fine"}\n{"text": 3}\n')
    fails([good, no_text], r"z\.jsonl:2: a jsonl record needs a string field 'text'")
    no_text.write_text('{"text": "fine"}\nnot json\n')
    fails([good, no_text], r"z\.jsonl:2: not valid JSON")
    (tmp_path / "empty_dir").mkdir()
    fails([good, tmp_path / "empty_dir"], r"data folder .*empty_dir holds no")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n \n")
    fails([blank], "holds no text")
    # the in-memory path refuses them too, rather than replacing characters
    with pytest.raises(DataError, match="not valid UTF-8"):
        tokenize_files(counting, [str(late)])


def test_too_little_text_for_one_sequence(tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    corpus = build(tok, [short], tmp_path)
    assert corpus.n_tokens == 17
    with pytest.raises(DataError, match="fewer than one sequence of 64"):
        corpus.num_sequences(64)


def test_default_cache_dir(monkeypatch, tmp_path):
    from patchc import config

    monkeypatch.setenv("PATCHC_CACHE", str(tmp_path))
    config.reload()
    try:
        assert default_cache_dir() == tmp_path / "tokens"
        monkeypatch.delenv("PATCHC_CACHE")
        config.reload()
        assert default_cache_dir().parts[-3:] == (".cache", "patchc", "tokens")
    finally:
        monkeypatch.undo()
        config.reload()


def test_in_memory_functions_keep_their_contract(tok, tmp_path):
    """tokenize_files / chunk (train.py until it moves to TokenCorpus; evaluate.py for evaluation text)."""
    a = calib_slice(tmp_path / "a.txt", "wikitext2_raw_valid", 3_000)
    b = jsonl(tmp_path / "b.jsonl", ["one", "two"])
    ids = tokenize_files(tok, [str(b), str(a)])  # file order as given; each text file whole
    assert ids.tolist()[:8] == [*b"one", 256, *b"two", 256]
    assert ids.numel() == 8 + len(a.read_bytes()) + 1
    assert torch.equal(tokenize_files(tok, [str(b), str(a)], max_tokens=10), ids[:10])
    assert chunk(ids, 100).shape == (ids.numel() // 100, 100)
    with pytest.raises(DataError, match="does not exist"):
        tokenize_files(tok, [str(tmp_path / "nope.txt")])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="holds no text"):
        tokenize_files(tok, [str(tmp_path / "empty.txt")])
    with pytest.raises(DataError, match="fewer than one sequence of 64"):
        chunk(ids[:10], 64)
