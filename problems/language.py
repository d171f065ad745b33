"""``language``: next-character modelling with a causal model, in bits per character."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_choice, check_float, check_int
from evotorch_mqa_moe.model import TransformerConfig

from . import _corpus
from ._markov import MarkovSource
from ._ngram import ngram_bits_per_char
from ._scoring import IGNORE, accuracies, masked_cross_entropy
from ._synthetic import SyntheticTask, test_generator

__all__ = ["LanguageTask"]

LN2 = math.log(2)


class LanguageTask(SyntheticTask):
    """Predict every next character: inputs ``x[0:T]``, targets ``x[1:T+1]``, causal attention.

    Sources:

    * ``source="markov"``: a fixed random order-``k`` Markov chain over
      ``vocab_size`` tokens (:class:`~._markov.MarkovSource`, seeded by ``seed``),
      whose exact entropy rate (bits per character) is known: the limit no model
      can beat. The first ``k - 1`` targets of every sequence lack a full context
      and are not scored, so the true chain scores the entropy rate in expectation.
    * ``source="text"``: Python source code of a fixed list of standard-library
      modules, read at run time (no download; it depends on the Python version),
      as 97 character ids (newline, printable ASCII, one unknown id). Training
      windows are cut at random from the training modules; the test set is
      consecutive windows of held-out modules (:mod:`~._corpus`).
    * ``source="prose"``: English prose, the help topics of Python's documentation
      (``pydoc_data.topics``, standard library, no download; about 430k training and
      36k test characters on Python 3.11), in the same 97 character ids; every tenth
      topic (sorted by name) is held out for the test set (:mod:`~._corpus`).

    Outputs are logits ``(P, B, T, V)``. Fitness is ``-loss``, the mean
    cross-entropy in **nats** per character. Metrics: ``bits_per_char`` (lower is
    better), ``neg_bits_per_char`` (its negation, the target metric, since
    target metrics are higher-is-better), ``token_accuracy`` (next character
    right), and references that do not depend on the model, each repeated over
    ``(P,)``: ``unigram_bpc`` and ``bigram_bpc`` (add-one-smoothed counts on
    training text, evaluated on the test set) and, for ``markov``, ``entropy_rate``.
    Chance (uniform outputs): ``log2(V)`` bits per character.

    Options: ``source="markov"``; ``seq_len=32`` (T); for ``markov`` only:
    ``vocab_size=4``, ``order=2`` (``vocab_size ** order`` <= 65536),
    ``concentration=0.3`` (Dirichlet parameter of the transition rows: smaller
    is more predictable); ``batch_size=64``; ``test_size=512`` (sequences);
    ``seed=0`` (chain and test set).

    The ``markov`` defaults are sized so that the task measures search, not model
    capacity (``bench/learnability.py``, figures in ``docs/problems.md``): the
    chain's entropy rate is 1.055 bits/char against 1.52 for the bigram baseline (a
    model must use two tokens of context); Adam (lr 1e-2, batch 64) takes the
    default model to within 0.05 bits of the entropy rate in 200-300 steps, and
    PGPE (popsize 200) to 1.35 bits/char in 100k evaluations. With the former
    defaults (``vocab_size=8, concentration=0.5``: entropy rate 2.245, bigram 2.91),
    still available, Adam needs 350-750 steps and PGPE stayed at the bigram
    baseline (2.92 bits/char at 100k evaluations).
    """

    name = "language"
    target_metric = "neg_bits_per_char"

    def __init__(self, *, source: str = "markov", seq_len: int = 32,
                 vocab_size: int | None = None, order: int | None = None,
                 concentration: float | None = None, batch_size: int = 64,
                 test_size: int = 512, seed: int = 0):
        super().__init__(batch_size=batch_size, test_size=test_size, seed=seed)
        self.source = check_choice("source", source, ("markov", "text", "prose"))
        self.seq_len = check_int("seq_len", seq_len, 2, 4096)
        self._baselines: dict[str, float] | None = None
        if self.source == "markov":
            self.vocab_size = check_int("vocab_size", 4 if vocab_size is None else vocab_size,
                                        2, 256)
            self.order = check_int("order", 2 if order is None else order, 1, 8)
            self.concentration = check_float(
                "concentration", 0.3 if concentration is None else concentration)
            if self.order > self.seq_len:
                raise ValueError(f"seq_len must be >= order={self.order}, got {seq_len!r}")
            self.chain = MarkovSource(self.vocab_size, self.order, self.concentration, seed)
            self._train = None
        else:
            for option, value in (("vocab_size", vocab_size), ("order", order),
                                  ("concentration", concentration)):
                if value is not None:
                    raise ValueError(f"{option} applies only to source='markov', got "
                                     f"{option}={value!r} with source={self.source!r}")
            self.vocab_size = 1 + len(_corpus.CHARS)
            self._train = _corpus.load_split("train", self.corpus)
            available = (len(_corpus.load_split("test", self.corpus)) - 1) // self.seq_len
            if self.test_size > available:
                raise ValueError(f"test_size must be <= {available} windows of seq_len="
                                 f"{self.seq_len} held-out characters, got {test_size!r}")

    # --- data

    def _split(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T+1) tokens -> inputs (B, T), targets (B, T) with unscorable ones IGNORE."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        if self.source == "markov":
            targets[:, : self.order - 1] = IGNORE
        return inputs, targets

    def make_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """inputs (B, T) token ids in [0, V); targets (B, T) the next tokens (or IGNORE)."""
        T = self.seq_len
        if self.source == "markov":
            return self._split(self.chain.sample(batch_size, T + 1, generator))
        starts = torch.randint(len(self._train) - T, (batch_size, 1), generator=generator)
        return self._split(self._train[starts + torch.arange(T + 1)])

    def build_test_set(self) -> tuple[Tensor, Tensor]:
        """``test_size`` held-out sequences: chain samples from a test generator, or
        consecutive windows of the test modules (each character scored once)."""
        T = self.seq_len
        if self.source == "markov":
            return self.make_batch(self.test_size, test_generator(self.name, self.seed))
        text = _corpus.load_split("test", self.corpus)
        starts = torch.arange(self.test_size)[:, None] * T
        return self._split(text[starts + torch.arange(T + 1)])

    def training_text(self) -> Tensor:
        """(N, L) text the n-gram baselines are counted on: 1000 chain samples of 257
        tokens, or the whole training split (1, N)."""
        if self.source != "markov":
            return self._train.view(1, -1)
        generator = test_generator(f"{self.name}/train", self.seed)
        return self.chain.sample(1000, 257, generator)

    @property
    def corpus(self) -> str:
        """The :mod:`~._corpus` text of a text source: ``"code"`` or ``"prose"``."""
        return "prose" if self.source == "prose" else "code"

    def decode(self, tokens: Tensor) -> str:
        """Token ids (T,) -> text: characters for ``text``/``prose``, space-separated
        token numbers for ``markov``."""
        if self.source == "markov":
            return " ".join(str(t) for t in tokens.tolist())
        return _corpus.decode(tokens)

    def encode(self, text: str) -> Tensor:
        """Text -> token ids (T,) int64: characters for ``text``/``prose`` (unknown ones
        -> id 0), space-separated token numbers in ``[0, vocab_size)`` for ``markov``."""
        if self.source != "markov":
            return _corpus.encode(text)
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            ids = [-1]
        if not ids or any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"a markov prompt is space-separated token numbers in "
                             f"[0, {self.vocab_size}), got {text!r}")
        return torch.tensor(ids, dtype=torch.long)

    # --- scoring

    def baselines(self) -> dict[str, float]:
        """Reference bits per character on the test set (cached): ``unigram_bpc``,
        ``bigram_bpc``, ``uniform_bpc`` = log2 V and, for ``markov``, ``entropy_rate``."""
        if self._baselines is None:
            inputs, targets = self.test_set()
            train = self.training_text()
            self._baselines = {
                "uniform_bpc": math.log2(self.vocab_size),
                "unigram_bpc": ngram_bits_per_char(train, inputs, targets, self.vocab_size, 1),
                "bigram_bpc": ngram_bits_per_char(train, inputs, targets, self.vocab_size, 2),
            }
            if self.source == "markov":
                self._baselines["entropy_rate"] = self.chain.entropy_rate
        return self._baselines

    def score(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``bits_per_char``, ``neg_bits_per_char``, ``token_accuracy`` and the baselines,
        each (P,), of logits (P, B, T, V) against next tokens (B, T)."""
        bpc = masked_cross_entropy(outputs, targets) / LN2
        P = outputs.shape[0]
        references = {name: torch.full((P,), value, device=outputs.device, dtype=bpc.dtype)
                      for name, value in self.baselines().items() if name != "uniform_bpc"}
        return {"bits_per_char": bpc, "neg_bits_per_char": -bpc,
                "token_accuracy": accuracies(outputs, targets)["token_accuracy"], **references}

    def source_log_probs(self, inputs: Tensor) -> Tensor:
        """The true chain's next-token log-probabilities (B, T, V) (``markov`` only): the
        outputs of the best possible model."""
        if self.source != "markov":
            raise ValueError("source_log_probs needs source='markov' (the text source has no "
                             "known model)")
        return self.chain.log_probs(inputs)

    def default_config(self) -> TransformerConfig:
        """Causal, learned positions, 2 experts per layer. ``markov``: embed 16, 1 layer,
        2 query heads, experts of 32. ``text``/``prose``: embed 32, 1 layer, 4 query heads,
        experts of 64. One shared key/value head (MQA)."""
        small = self.source == "markov"
        return TransformerConfig(
            vocab_size=self.vocab_size, embed_dim=16 if small else 32, num_layers=1,
            num_heads=2 if small else 4, num_kv_heads=1, expert_dim=32 if small else 64,
            num_experts=2, max_seq_len=self.seq_len, causal=True, positional="learned",
        )

    def chance(self) -> dict[str, float]:
        """Uniform outputs: ``log V`` nats, ``log2 V`` bits per character."""
        return {"loss": math.log(self.vocab_size), "bits_per_char": math.log2(self.vocab_size)}

    def ceiling(self) -> dict[str, float | None]:
        """The best possible: the entropy rate for ``markov``; unknown (None) for text."""
        rate = self.chain.entropy_rate if self.source == "markov" else None
        return {"loss": None if rate is None else rate * LN2, "bits_per_char": rate}
