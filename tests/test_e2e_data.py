"""E2E records, tokenizers and causal-LM encoding; a smoke fine-tuning run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from raysage.data.e2e import (
    SLOT_VALUES,
    SLOTS,
    ByteTokenizer,
    E2ERecord,
    GPT2BPETokenizer,
    encode_records,
    load_e2e,
    parse_mr,
    read_e2e_csv,
    synthetic_e2e,
)
from raysage.errors import DataError
from raysage.models.gpt2 import gpt2_spec, gpt2_split


def _token_loss(logits, targets):
    """Mean cross-entropy per target token (the -100 positions carry none)."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             ignore_index=-100)


def test_synthetic_is_deterministic_and_seeded():
    a, b, c = synthetic_e2e(50, seed=1), synthetic_e2e(50, seed=1), synthetic_e2e(50, seed=2)
    assert a == b
    assert a != c
    assert all(isinstance(r, E2ERecord) and isinstance(r, tuple) for r in a)


def test_synthetic_references_realise_every_slot():
    records = synthetic_e2e(500, seed=0)
    refs = set()
    for record in records:
        mr = parse_mr(record.mr)
        assert "name" in mr and 3 <= len(mr) <= len(SLOTS)
        assert list(mr) == [s for s in SLOTS if s in mr]  # E2E slot order
        for slot, value in mr.items():
            assert value in SLOT_VALUES[slot]
            if slot == "familyFriendly":
                # "yes"/"no" are not said verbatim: families/children/kids are
                # mentioned, negated exactly when the value is "no".
                lowered = record.ref.lower()
                assert any(w in lowered for w in ("famil", "child", "kid")), record
                assert ("not" in lowered.split()) == (value == "no"), record
            else:
                assert value in record.ref, (slot, record)
        refs.add(record.ref)
    assert len(refs) == len(records)  # varied, not a lookup table
    # Several openings and phrasings are in use.
    assert sum(r.ref.startswith("There is a") for r in records) > 20
    assert len({r.ref.split(".")[0].split()[-1] for r in records}) > 20


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "name[Café Rouge] -> £20-25"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("ab") + [tok.eos_id, tok.pad_id]) == "ab"
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)


def test_targets_mask_prompt_and_padding():
    tok = ByteTokenizer()
    record = E2ERecord("a[b]", "cd")
    # prompt "a[b] ->" is 7 bytes; then " cd" and EOS: 11 tokens, 10 inputs.
    prompt = [97, 91, 98, 93, 32, 45, 62]
    full = prompt + [32, 99, 100, 256]
    out = encode_records([record], tok, seq_len=12)
    assert out["input_ids"].dtype == np.int64 and out["targets"].dtype == np.int64
    assert out["attention_mask"].dtype == np.uint8
    assert out["input_ids"][0].tolist() == full[:10] + [257, 257]
    assert out["attention_mask"][0].tolist() == [1] * 10 + [0, 0]
    # The last prompt position predicts the first reference token.
    assert out["targets"][0].tolist() == [-100] * 6 + [32, 99, 100, 256] + [-100, -100]

    cut = encode_records([record], tok, seq_len=8)  # reference tail and EOS lost
    assert cut["input_ids"][0].tolist() == full[:8]
    assert cut["targets"][0].tolist() == [-100] * 6 + [32, 99]
    just = encode_records([record], tok, seq_len=7)
    assert just["targets"][0].tolist() == [-100] * 6 + [32]


def test_overlong_prompts_are_dropped_or_refused():
    tok = ByteTokenizer()
    records = [E2ERecord("a[b]", "cd"), E2ERecord("long[" + "x" * 20 + "]", "y"), E2ERecord("c[d]", "e")]
    out = encode_records(records, tok, seq_len=10)
    assert out["kept"].tolist() == [0, 2]
    assert out["input_ids"].shape == (2, 10)
    with pytest.raises(DataError, match="record 1 has a 29-token prompt"):
        encode_records(records, tok, seq_len=10, drop_overlong=False)
    with pytest.raises(DataError, match="no record fits seq_len=5"):
        encode_records(records, tok, seq_len=5)


# --------------------------------------------------------------------------
# CSV and load_e2e
# --------------------------------------------------------------------------

def _csv(path, header, rows):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_read_e2e_csv_and_errors(tmp_path):
    rows = [("name[Aromi], area[riverside]", "Aromi is by the river, near £20."),
            ('name[Cotto], food["odd", quoted]', "Cotto, a place.")]
    assert read_e2e_csv(_csv(tmp_path / "a.csv", ["mr", "ref"], rows)) == [E2ERecord(*r) for r in rows]
    alt = _csv(tmp_path / "b.csv", ["Meaning_Representation", "human_reference"], rows)
    assert read_e2e_csv(alt)[1].ref == "Cotto, a place."

    with pytest.raises(DataError, match=r"missing\.csv not found"):
        read_e2e_csv(tmp_path / "missing.csv")
    bad = _csv(tmp_path / "c.csv", ["mr", "text"], rows)
    with pytest.raises(DataError, match=r"c\.csv has columns \['mr', 'text'\]; expected mr and ref"):
        read_e2e_csv(bad)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv is empty"):
        read_e2e_csv(tmp_path / "empty.csv")
    header_only = _csv(tmp_path / "d.csv", ["mr", "ref"], [])
    with pytest.raises(DataError, match="no rows"):
        read_e2e_csv(header_only)


def test_load_e2e_sources(tmp_path):
    train, test = load_e2e("synthetic", n_train=30, n_test=10, seed=4)
    assert (len(train), len(test)) == (30, 10) and not set(train) & set(test)
    assert load_e2e("synthetic", n_train=30, n_test=10, seed=4) == (train, test)

    folder = tmp_path / "e2e"
    folder.mkdir()
    _csv(folder / "trainset.csv", ["mr", "ref"], [(r.mr, r.ref) for r in train])
    _csv(folder / "devset.csv", ["mr", "ref"], [(r.mr, r.ref) for r in test[:3]])
    _csv(folder / "testset_w_refs.csv", ["MR", "text"], [])  # the E2E file without refs
    with pytest.raises(DataError, match="testset_w_refs.csv has columns"):
        load_e2e(folder)
    (folder / "testset_w_refs.csv").unlink()
    data = load_e2e(folder, n_train=5)
    assert data.train == train[:5] and data.test == test[:3]

    single = load_e2e(folder / "trainset.csv", n_test=6, seed=1)
    assert len(single.test) == 6 and len(single.train) == 24
    assert sorted(single.train + single.test) == sorted(train)
    with pytest.raises(DataError, match="lacks a train CSV"):
        load_e2e(tmp_path)
    with pytest.raises(DataError, match="neither 'synthetic'"):
        load_e2e(tmp_path / "nope")


# --------------------------------------------------------------------------
# GPT-2 byte-level BPE
# --------------------------------------------------------------------------

def _bpe_dir(folder, merges, extra=()):
    """vocab.json and merges.txt: the 256 byte symbols, every merge's result, EOS."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in [a + b for a, b in merges] + list(extra):
        vocab.setdefault(token, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab


def _tokens(tok, vocab, text):
    names = {i: t for t, i in vocab.items()}
    return [names[i] for i in tok.encode(text)]


TINY_MERGES = [("l", "o"), ("lo", "w"), ("e", "r"), ("Ġ", "low"), ("e", "s"), ("es", "t"),
               ("Ġ", "n")]


def test_bpe_tokenizer_merges_and_round_trips(tmp_path):
    vocab = _bpe_dir(tmp_path, TINY_MERGES)
    tok = GPT2BPETokenizer.from_dir(tmp_path)
    assert tok.eos_id == tok.pad_id == vocab["<|endoftext|>"] and tok.vocab_size == len(vocab)
    # "lower": l+o (rank 0), lo+w, e+r; " low" becomes one token by rank 3.
    assert _tokens(tok, vocab, "low lower newest") == ["low", "Ġlow", "er", "Ġn", "e", "w", "est"]
    # GPT-2's byte map: a space is "Ġ", a newline "Ċ", a tab "ĉ", "é" its two UTF-8 bytes.
    assert _tokens(tok, vocab, "a \n\té") == ["a", "Ġ", "Ċ", "ĉ", "Ã", "©"]
    for text in ("low lower newest", "Café Rouge £20-25\n\ttabs  and   spaces ", "日本 ok", ""):
        assert tok.decode(tok.encode(text)) == text
    out = encode_records([E2ERecord("name[low]", "lower")], tok, seq_len=32)
    assert out["targets"][0][out["targets"][0] >= 0].tolist()[-1] == tok.eos_id


def test_bpe_tokenizer_pre_tokenizes_exactly_as_gpt2(tmp_path):
    """GPT-2 splits text on letters (\\p{L}) and numbers (\\p{N}) before BPE.

    Merges across those boundaries exist in this vocabulary, so any other
    split shows up in the tokens. The stdlib-regex approximation this
    replaced grouped non-decimal numerics ("²", "½") with letters: it gave
    "x²" and " ½mile" as single words and " 5" apart from "²".
    """
    merges = [("Â", "²"), ("Â", "½"), ("x", "Â²"), ("Ġ", "Â½"), ("ĠÂ½", "m"), ("Ġ", "5"),
              ("Ġ5", "Â²"), ("m", "i"), ("mi", "l"), ("mil", "e"), ("Ġ", "h"), ("Ġh", "e"),
              ("'", "s"), ("'", "m"), ("'", "t"), ("Ġ", "Ġ")]
    vocab = _bpe_dir(tmp_path, merges)
    tok = GPT2BPETokenizer.from_dir(tmp_path)
    assert _tokens(tok, vocab, "x² ½mile 5²") == ["x", "Â²", "ĠÂ½", "mile", "Ġ5Â²"]
    # Lower-case contractions are their own words; "'S" is not one.
    assert _tokens(tok, vocab, "I'm he's don't HE'S") == [
        "I", "'m", "Ġhe", "'s", "Ġ", "d", "o", "n", "'t", "Ġ", "H", "E", "'", "S"]
    # A run of spaces leaves its last space to the next word; trailing ones stay together.
    assert _tokens(tok, vocab, "a   he  ") == ["a", "ĠĠ", "Ġhe", "ĠĠ"]
    text = "x² ½mile 5² I'm  he's\n\n  ok"
    assert tok.decode(tok.encode(text)) == text


def test_bpe_tokenizer_keeps_end_of_text_out_of_plain_text(tmp_path):
    vocab = _bpe_dir(tmp_path, TINY_MERGES)
    tok = GPT2BPETokenizer.from_dir(tmp_path)
    ids = tok.encode("low<|endoftext|>")
    assert tok.eos_id not in ids and _tokens(tok, vocab, "<|")[:2] == ["<", "|"]
    assert tok.decode(ids) == "low<|endoftext|>"
    # EOS is appended as an id; it decodes to its text.
    assert tok.decode(tok.encode("low") + [tok.eos_id]) == "low<|endoftext|>"


def test_bpe_tokenizer_errors(tmp_path):
    def error(match):
        with pytest.raises(DataError, match=match) as caught:
            GPT2BPETokenizer.from_dir(tmp_path)
        assert "\n" not in str(caught.value)

    error("vocab.json not found")
    vocab = _bpe_dir(tmp_path, TINY_MERGES)
    (tmp_path / "merges.txt").unlink()
    error("merges.txt not found")
    _bpe_dir(tmp_path, TINY_MERGES)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nl o\na b c\n")
    error(r"merges\.txt line 3 is 'a b c'; expected two space-separated symbols")
    (tmp_path / "merges.txt").write_bytes(b"l o\n\xff\xfe\n")
    error(r"cannot read tokenizer merges .*merges\.txt")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nl q\n")  # "lq" is not in the vocab
    error(r"merges do not belong to .*vocab\.json")

    _bpe_dir(tmp_path, TINY_MERGES)
    (tmp_path / "vocab.json").write_text("{not json")
    error(r"cannot parse tokenizer vocab .*vocab\.json")
    (tmp_path / "vocab.json").write_text(json.dumps({"a": "zero"}))
    error("must map token strings to integer ids")
    (tmp_path / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items()
                                                      if k != "<|endoftext|>"}))
    error(r"has no <\|endoftext\|> token")
    (tmp_path / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k != "Ġ"}))
    error("lacks 1 of the 256 byte symbols")

    _bpe_dir(tmp_path, TINY_MERGES)
    tok = GPT2BPETokenizer.from_dir(tmp_path)
    for bad in (len(vocab), -1):
        with pytest.raises(DataError, match=f"token id {bad} is not in"):
            tok.decode([0, bad])


# --------------------------------------------------------------------------
# Smoke fine-tuning
# --------------------------------------------------------------------------

def test_tiny_gpt2_learns_synthetic_e2e():
    """A few hundred Adam steps bring test loss far below uniform guessing.

    The bar (2.5 nats) is also below the ~3.1-nat unigram entropy of the
    target bytes, so the model must be using the MR and the prefix.
    """
    tok = ByteTokenizer()
    # Two-slot MRs keep byte sequences within 96 tokens.
    train = encode_records(synthetic_e2e(200, seed=0, min_slots=2, max_slots=2), tok, seq_len=96)
    test = encode_records(synthetic_e2e(50, seed=1, min_slots=2, max_slots=2), tok, seq_len=96)
    assert len(train["kept"]) == 200 and len(test["kept"]) == 50
    split = gpt2_split(gpt2_spec("tiny", vocab_size=tok.vocab_size, n_positions=96), cut=1,
                       aux_depth=1, lora_rank=0, seed=0)
    model = torch.nn.Sequential(split.make_client(), split.make_server())

    def logits(batch):
        hidden = model[0](batch["input_ids"], batch["attention_mask"])
        return model[1](hidden, batch["attention_mask"])

    as_t = {k: torch.from_numpy(v) for k, v in test.items()}

    def test_loss():
        model.eval()
        with torch.no_grad():
            return _token_loss(logits(as_t), as_t["targets"]).item()

    uniform = math.log(tok.vocab_size)
    assert abs(test_loss() - uniform) < 0.1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one thread is the fastest here
    try:
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        rng = np.random.default_rng(0)
        model.train()
        for _ in range(250):
            idx = rng.choice(200, 16, replace=False)
            batch = {k: torch.from_numpy(v[idx]) for k, v in train.items()}
            loss = _token_loss(logits(batch), batch["targets"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert test_loss() < 2.5 < uniform / 2
