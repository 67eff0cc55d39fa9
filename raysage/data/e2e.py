"""E2E NLG data for causal-LM fine-tuning: records, tokenizers, encoding.

A record is a meaning representation (MR) such as
``name[The Eagle], eatType[pub], area[riverside]`` and one human reference
sentence. For the LM each record becomes ``f"{mr} -> {ref}"`` followed by
EOS, and only the reference and EOS are scored: the MR is the prompt.

Without the real data, :func:`synthetic_e2e` renders random MRs through
varied templates, so MR -> text is learnable (every value is realised) but
not a lookup (phrasing, sentence split and order vary per record).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from pathlib import Path
from typing import NamedTuple, Protocol, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from raysage.errors import DataError

IGNORE_INDEX = -100
PROMPT_SEPARATOR = " ->"


class E2ERecord(NamedTuple):
    mr: str
    ref: str


# --------------------------------------------------------------------------
# Synthetic E2E
# --------------------------------------------------------------------------

# Slot order of E2E's MR strings.
SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area",
         "familyFriendly", "near")

SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "name": ("The Eagle", "The Mill", "Blue Spice", "The Punter", "Green Man", "The Olive Grove",
             "Cotto", "The Waterman", "Aromi", "The Phoenix", "Giraffe", "The Cricketers",
             "Fitzbillies", "The Golden Curry", "Alimentum", "Wildwood", "The Plough",
             "Loch Fyne", "Strada", "The Vaults"),
    "eatType": ("coffee shop", "pub", "restaurant"),
    "food": ("French", "Italian", "Chinese", "Japanese", "English", "Indian", "Thai", "Mexican"),
    "priceRange": ("cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "area": ("riverside", "city centre"),
    "familyFriendly": ("yes", "no"),
    "near": ("Burger King", "Café Rouge", "The Sorrento", "Express by Holiday Inn",
             "Raja Indian Cuisine", "All Bar One", "Crowne Plaza Hotel", "The Bakers",
             "Rainbow Vegetarian Café", "Clare Hall"),
}

# Verb phrases that follow a subject ("X" / "It"). Every phrase contains the
# slot value verbatim, except familyFriendly, whose "yes" phrases mention
# families/children/kids without "not" and whose "no" phrases add "not".
_PREDICATES: dict[str, tuple[str, ...]] = {
    "eatType": ("is a {v}", "is a popular {v}", "is a small {v}", "operates as a {v}"),
    "food": ("serves {v} food", "offers {v} dishes", "has a {v} menu", "specialises in {v} cuisine"),
    "priceRange": ("has a price range of {v}", "is in the {v} price range",
                   "has prices that are {v}", "costs {v} per person"),
    "customer rating": ("has a {v} customer rating", "is rated {v} by customers",
                        "has a customer rating of {v}", "has received {v} reviews"),
    "area": ("is in the {v}", "is located in the {v}", "can be found in the {v} area",
             "is situated in the {v}"),
    "near": ("is near {v}", "is close to {v}", "is located near {v}", "sits next to {v}"),
}
_FAMILY = {
    "yes": ("is family-friendly", "welcomes families", "is kid friendly",
            "is a good place for children"),
    "no": ("is not family-friendly", "does not welcome families", "is not kid friendly",
           "is not a place for children"),
}


def _predicate(rng: random.Random, slot: str, value: str) -> str:
    if slot == "familyFriendly":
        return rng.choice(_FAMILY[value])
    return rng.choice(_PREDICATES[slot]).format(v=value)


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _render(rng: random.Random, mr: dict[str, str]) -> str:
    name = mr["name"]
    rest = [s for s in SLOTS[1:] if s in mr]
    rng.shuffle(rest)
    eat, food = mr.get("eatType"), mr.get("food")
    # The opening sentence folds eatType (and sometimes food) into the noun
    # phrase in a few ways; whatever it used is not repeated afterwards.
    style = rng.randrange(4)
    if eat and food and style == 0:
        opening, used = f"{name} is a {food} {eat}", {"eatType", "food"}
    elif eat and style == 1:
        opening, used = f"There is a {eat} called {name} that", {"eatType"}
    elif eat and style == 2:
        opening, used = f"{name} is a {eat} which", {"eatType"}
    else:
        opening, used = name, set()
    rest = [s for s in rest if s not in used]
    if not rest:
        return opening.removesuffix(" that").removesuffix(" which") + "."
    if opening.endswith((" that", " which")) or opening == name:
        take = rng.randint(1, min(2, len(rest)))
        first = f"{opening} {_join([_predicate(rng, s, mr[s]) for s in rest[:take]])}"
        rest = rest[take:]
    else:
        first = opening
    sentences = [first]
    while rest:
        take = rng.randint(1, min(2, len(rest)))
        subject = rng.choice(["It", name, f"The {eat}" if eat else "This place"])
        sentences.append(f"{subject} {_join([_predicate(rng, s, mr[s]) for s in rest[:take]])}")
        rest = rest[take:]
    return " ".join(s + "." for s in sentences)


def format_mr(mr: dict[str, str]) -> str:
    return ", ".join(f"{s}[{mr[s]}]" for s in SLOTS if s in mr)


def parse_mr(text: str) -> dict[str, str]:
    """``name[X], area[Y]`` -> {"name": "X", "area": "Y"}."""
    return {m.group(1).strip(): m.group(2) for m in re.finditer(r"([^,\[\]]+)\[([^\]]*)\]", text)}


def synthetic_e2e(n: int, seed: int = 0, min_slots: int = 3,
                  max_slots: int = len(SLOTS)) -> list[E2ERecord]:
    """``n`` E2E-style records, the same for the same arguments.

    Each MR has ``name`` plus a random subset of the other slots, between
    ``min_slots`` and ``max_slots`` slots in all (E2E has 3 to 8).
    """
    if not isinstance(n, int) or n < 0:
        raise DataError(f"synthetic_e2e n={n!r} must be an integer >= 0")
    if not 1 <= min_slots <= max_slots <= len(SLOTS):
        raise DataError(f"synthetic_e2e slot counts min_slots={min_slots}, max_slots={max_slots} "
                        f"must satisfy 1 <= min_slots <= max_slots <= {len(SLOTS)}")
    rng = random.Random(f"synthetic-e2e-{seed}")
    records = []
    for _ in range(n):
        k = rng.randint(min_slots, max_slots)
        chosen = {"name"} | set(rng.sample(SLOTS[1:], k - 1))
        mr = {s: rng.choice(SLOT_VALUES[s]) for s in SLOTS if s in chosen}
        records.append(E2ERecord(format_mr(mr), _render(rng, mr)))
    return records


# --------------------------------------------------------------------------
# E2E CSV files
# --------------------------------------------------------------------------

_COLUMN_PAIRS = (("mr", "ref"), ("meaning_representation", "human_reference"))


def read_e2e_csv(path: str | os.PathLike) -> list[E2ERecord]:
    """Records of an E2E NLG CSV (columns mr/ref or meaning_representation/human_reference,
    any case); rows lacking either field are skipped."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if not columns:
                raise DataError(f"E2E CSV {path} is empty; expected a header with mr and ref columns")
            # Header case varies between copies of the data set (MR vs mr).
            reader.fieldnames = [c.lower() for c in columns]
            pair = next((p for p in _COLUMN_PAIRS if set(p) <= set(reader.fieldnames)), None)
            if pair is None:
                raise DataError(f"E2E CSV {path} has columns {columns}; expected mr and ref "
                                f"(or meaning_representation and human_reference)")
            records = [E2ERecord(row[pair[0]].strip(), row[pair[1]].strip())
                       for row in reader if row.get(pair[0]) and row.get(pair[1])]
    except FileNotFoundError:
        raise DataError(f"E2E CSV {path} not found; give the path of an E2E NLG csv file") from None
    except UnicodeDecodeError:
        raise DataError(f"E2E CSV {path} is not UTF-8 text; save it as UTF-8") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read E2E CSV {path}: {getattr(e, 'strerror', None) or e}") from None
    if not records:
        raise DataError(f"E2E CSV {path} has columns {columns} but no rows with both "
                        f"{pair[0]} and {pair[1]}")
    return records


class E2EData(NamedTuple):
    train: list[E2ERecord]
    test: list[E2ERecord]


# Names in the E2E NLG release; testset.csv there has no references, so
# the referenced test file goes first and the dev set is the fallback.
TRAIN_FILES = ("trainset.csv", "train.csv")
TEST_FILES = ("testset_w_refs.csv", "testset.csv", "test.csv", "devset.csv")


def load_e2e(source: str | os.PathLike = "synthetic", *, n_train: int | None = None,
             n_test: int | None = None, seed: int = 0) -> E2EData:
    """Train and test records from one of:

    * ``"synthetic"``: :func:`synthetic_e2e` with ``n_train`` (default 2000)
      and ``n_test`` (default 200) records from disjoint streams of ``seed``.
    * a folder: train from the first of TRAIN_FILES, test from the first of
      TEST_FILES that exists (with references).
    * one CSV file: a seeded shuffle of it, the last ``n_test`` (default
      10%) records held out for test.

    For files, ``n_train``/``n_test`` keep only the first that many records.
    """
    if str(source) == "synthetic":
        n_train = 2000 if n_train is None else n_train
        n_test = 200 if n_test is None else n_test
        return E2EData(synthetic_e2e(n_train, seed=2 * seed), synthetic_e2e(n_test, seed=2 * seed + 1))
    path = Path(source)
    if path.is_dir():
        train_path = next((path / f for f in TRAIN_FILES if (path / f).exists()), None)
        test_path = next((path / f for f in TEST_FILES if (path / f).exists()), None)
        if train_path is None or test_path is None:
            raise DataError(f"E2E folder {path} lacks a {'train' if train_path is None else 'test'} "
                            f"CSV; expected one of {TRAIN_FILES if train_path is None else TEST_FILES}")
        train, test = read_e2e_csv(train_path), read_e2e_csv(test_path)
    elif path.is_file():
        records = read_e2e_csv(path)
        random.Random(f"e2e-split-{seed}").shuffle(records)
        held = max(1, len(records) // 10) if n_test is None else n_test
        if not 0 < held < len(records):
            raise DataError(f"cannot hold out n_test={held} of the {len(records)} records in {path}; "
                            f"pass a smaller n_test")
        train, test = records[:-held], records[-held:]
    else:
        raise DataError(f"E2E source {str(source)!r} is neither 'synthetic' nor an existing "
                        f"folder or CSV file")
    return E2EData(train[:n_train], test[:n_test])


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------

class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then EOS=256 and PAD=257."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE, run by Hugging Face ``tokenizers`` from local files.

    Built from GPT-2's ``vocab.json`` and ``merges.txt`` exactly as GPT-2
    tokenises: its pre-tokenisation pattern, its byte-to-character map, no
    prefix space. Nothing is downloaded. Text is encoded as plain text: a
    literal "<|endoftext|>" in it is not turned into EOS (append ``eos_id``
    instead), which is why EOS is not registered with the library as a
    special token. PAD is EOS; padding is masked out of attention and loss
    anyway.
    """

    EOS_TOKEN = "<|endoftext|>"

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], source: str = "vocab"):
        self.source = source
        if self.EOS_TOKEN not in vocab:
            raise DataError(f"{source} has no {self.EOS_TOKEN} token; use GPT-2's vocab.json")
        # Without an unknown token the library drops a byte it has no symbol
        # for, silently losing text; refuse such a vocabulary instead.
        missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
        if missing:
            raise DataError(f"{source} lacks {len(missing)} of the 256 byte symbols (such as "
                            f"{min(missing)!r}); it is not a byte-level BPE vocabulary like GPT-2's")
        try:
            model = models.BPE(vocab=vocab, merges=merges)
        except Exception as e:  # the library raises a bare Exception
            raise DataError(f"the merges do not belong to {source}: {' '.join(str(e).split())}; "
                            f"use the vocab.json and merges.txt of one tokenizer") from None
        self._tokenizer = HFTokenizer(model)
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                 use_regex=True)
        self._tokenizer.decoder = decoders.ByteLevel()
        self.eos_id = self.pad_id = vocab[self.EOS_TOKEN]
        self.vocab_size = max(vocab.values()) + 1

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> "GPT2BPETokenizer":
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise DataError(f"tokenizer file {p} not found; put GPT-2's vocab.json and "
                                f"merges.txt in {folder}")
        # The files are parsed here rather than by the library's reader so a
        # bad file gets a message naming it and the offending line.
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"cannot parse tokenizer vocab {vocab_path}: {e}") from None
        if not isinstance(vocab, dict) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
            raise DataError(f"tokenizer vocab {vocab_path} must map token strings to integer ids >= 0")
        try:
            lines = merges_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read tokenizer merges {merges_path}: {e}") from None
        merges = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip() or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DataError(f"tokenizer merges {merges_path} line {lineno} is {line!r}; "
                                f"expected two space-separated symbols")
            merges.append((parts[0], parts[1]))
        return cls(vocab, merges, source=str(vocab_path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        # The library skips ids it does not know; an unknown id is a bug upstream.
        unknown = next((i for i in ids if i < 0 or self._tokenizer.id_to_token(i) is None), None)
        if unknown is not None:
            raise DataError(f"token id {unknown} is not in {self.source}")
        return self._tokenizer.decode(ids, skip_special_tokens=False)


# --------------------------------------------------------------------------
# Causal-LM encoding
# --------------------------------------------------------------------------

def lm_token_ids(record: E2ERecord, tokenizer: Tokenizer) -> tuple[list[int], int]:
    """Ids of ``f"{mr} -> {ref}"`` + EOS and the length of the MR prompt.

    Prompt and reference are encoded apart so the boundary is exact; with
    GPT-2's pre-tokeniser " ->" and " ref..." never share a token anyway.
    """
    prompt = tokenizer.encode(record.mr + PROMPT_SEPARATOR)
    return prompt + tokenizer.encode(" " + record.ref) + [tokenizer.eos_id], len(prompt)


def encode_records(records: Sequence[E2ERecord], tokenizer: Tokenizer, seq_len: int,
                   drop_overlong: bool = True) -> dict[str, np.ndarray]:
    """Fixed-length causal-LM arrays.

    For token sequence x_0..x_m (prompt of length p, then reference, then
    EOS) position t holds input x_t and target x_{t+1}; targets are -100
    wherever x_{t+1} is still prompt or t is padding. A sequence therefore
    fills seq_len inputs with up to seq_len + 1 tokens (EOS is only ever a
    target). Longer sequences are cut at the end, losing the reference's
    tail (and EOS target). A record whose prompt alone exceeds seq_len would
    have no target: it is dropped (or DataError when drop_overlong=False).

    Returns ``input_ids`` (N, seq_len) int64 right-padded with pad_id,
    ``attention_mask`` (N, seq_len) uint8, ``targets`` (N, seq_len) int64,
    and ``kept`` (N,) int64, the indices of the records kept.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len={seq_len!r} must be a positive integer")
    rows, kept = [], []
    for index, record in enumerate(records):
        ids, p = lm_token_ids(record, tokenizer)
        if p > seq_len:
            if not drop_overlong:
                raise DataError(f"record {index} has a {p}-token prompt, longer than seq_len={seq_len}; "
                                f"raise seq_len or pass drop_overlong=True")
            continue
        rows.append((ids, p))
        kept.append(index)
    if not rows:
        raise DataError(f"no record fits seq_len={seq_len} with a target token "
                        f"(of {len(records)} records); raise seq_len")
    n = len(rows)
    input_ids = np.full((n, seq_len), tokenizer.pad_id, dtype=np.int64)
    attention_mask = np.zeros((n, seq_len), dtype=np.uint8)
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    for r, (ids, p) in enumerate(rows):
        length = min(len(ids) - 1, seq_len)
        input_ids[r, :length] = ids[:length]
        attention_mask[r, :length] = 1
        # Position t predicts ids[t+1]; the first scored one is the first
        # reference token, predicted from the last prompt position p-1.
        targets[r, p - 1:length] = ids[p:length + 1]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
            "kept": np.asarray(kept, dtype=np.int64)}


# --------------------------------------------------------------------------
# As a simulator dataset
# --------------------------------------------------------------------------

SYNTHETIC_TRAIN_PER_CLIENT = 100
SYNTHETIC_TEST = 200


def make_tokenizer(name: str, files_dir: str | None) -> Tokenizer:
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        if not files_dir:
            raise DataError("tokenizer 'gpt2' needs a folder with vocab.json and merges.txt; "
                            "pass --tokenizer-dir")
        return GPT2BPETokenizer.from_dir(files_dir)
    raise DataError(f"unknown tokenizer {name!r}; choose byte or gpt2")


def load_language_dataset(name: str, data_dir: str | None, tokenizer: Tokenizer, seq_len: int,
                          *, num_train: int | None, num_test: int | None, seed: int,
                          max_slots: int = len(SLOTS)):
    """E2E-style records as an :class:`~raysage.data.datasets.ArrayDataset` of tokens.

    ``x`` holds right-padded input ids (N, seq_len) and ``y`` the next-token
    targets (N, seq_len) with -100 where no loss is taken; ``num_classes`` is
    the vocabulary size.
    """
    from raysage.data.datasets import ArrayDataset, check_splits, out_of_memory_is_an_error

    with out_of_memory_is_an_error(name, num_train, num_test):
        if name == "e2e_synthetic":
            n_train = num_train or 2000
            n_test = num_test or SYNTHETIC_TEST
            data = E2EData(synthetic_e2e(n_train, 2 * seed, 3, max_slots),
                           synthetic_e2e(n_test, 2 * seed + 1, 3, max_slots))
        else:
            data = load_e2e(data_dir, n_train=num_train, n_test=num_test, seed=seed)
        splits = {}
        for split, records in (("train", data.train), ("test", data.test)):
            arrays = encode_records(records, tokenizer, seq_len)
            if len(arrays["kept"]) < len(records) / 2:
                raise DataError(f"seq_len = {seq_len} cuts {len(records) - len(arrays['kept'])} "
                                f"of the {len(records)} {split} records to nothing; raise "
                                "--seq-len")
            splits[split] = arrays
    dataset = ArrayDataset(name, splits["train"]["input_ids"], splits["train"]["targets"],
                           splits["test"]["input_ids"], splits["test"]["targets"],
                           tokenizer.vocab_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    check_splits(dataset, data_dir)
    return dataset
