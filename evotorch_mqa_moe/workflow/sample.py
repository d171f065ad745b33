"""``sample``: text from the model a ``language`` run saved (``best_model.pt``).

The run's folder tells everything needed: ``best_model.pt`` holds the network,
``results.json`` the task options (which source, hence how tokens read as text).
Decoding uses the model's key/value cache
(:meth:`~evotorch_mqa_moe.model.MQAMoETransformer.generate`). A model sees at most
``max_seq_len`` positions, so a longer text is written window by window: when the
context is full, the last half of it becomes the next window's prompt (sliding
window), and generation goes on from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_float, check_int
from evotorch_mqa_moe.problems import make_task

from .model_file import load_model

__all__ = ["SAMPLE_TASKS", "load_run", "continue_tokens", "sample_run"]

SAMPLE_TASKS = ("language",)
"""Tasks whose models generate: causal next-token models over a vocabulary."""


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """``(model, task)`` of a finished run: ``best_model.pt`` and the task of ``results.json``.

    Raises ``FileNotFoundError`` naming a missing file and ``ValueError`` for a task
    that does not generate text.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {str(run_dir)!r}")
    for name in ("best_model.pt", "results.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} is missing: `sample` reads a finished "
                                    "run (best_model.pt and results.json are written at its end)")
    results = json.loads((run_dir / "results.json").read_text())
    task_name = results.get("task")
    if task_name not in SAMPLE_TASKS:
        raise ValueError(f"`sample` needs a run of {', '.join(SAMPLE_TASKS)}; {run_dir} is a "
                         f"run of task {task_name!r}")
    options = results.get("settings", {}).get("task_options", {})
    model = load_model(run_dir / "best_model.pt", device=device)
    model.eval()
    return model, make_task(task_name, **options)


def continue_tokens(model, prompt: Tensor, new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, greedy: bool = False,
                    generator: torch.Generator | None = None) -> Tensor:
    """``prompt`` (T0,) followed by ``new_tokens`` tokens, however many that is.

    Within ``max_seq_len`` positions this is one cached ``generate``; beyond, the
    context slides: each further window is prompted with the last half of the
    previous one (the prompt itself is cut to its last ``max_seq_len - 1`` tokens).
    """
    new_tokens = check_int("tokens", new_tokens, 1)
    limit = model.config.max_seq_len
    if limit < 2:
        raise ValueError(f"a model with max_seq_len={limit} cannot continue a prompt")
    out = [prompt]
    context = prompt[-(limit - 1):]
    left = new_tokens
    while left > 0:
        n = min(left, limit - context.shape[0])
        window = model.generate(context, n, temperature=temperature, top_k=top_k,
                                greedy=greedy, generator=generator)
        out.append(window[context.shape[0]:])
        left -= n
        context = window[-max(1, limit // 2):]
    return torch.cat(out)


def sample_run(run_dir: str | Path, *, prompt: str | None = None, tokens: int = 200,
               temperature: float = 0.8, top_k: int | None = None, greedy: bool = False,
               seed: int = 0, device: str | torch.device = "cpu") -> str:
    """The text (prompt included) the run's model writes: see :func:`continue_tokens`.

    ``prompt``: characters for text sources, space-separated token numbers for
    ``markov``; default: a newline (text) or token 0 (markov).
    """
    tokens = check_int("tokens", tokens, 1)
    temperature = check_float("temperature", temperature)
    model, task = load_run(run_dir, device)
    if prompt is None or prompt == "":
        prompt = "0" if task.source == "markov" else "\n"
    ids = task.encode(prompt).to(device)
    generator = torch.Generator(device=device).manual_seed(check_int("seed", seed, 0))
    with torch.no_grad():
        out = continue_tokens(model, ids, tokens, temperature=temperature, top_k=top_k,
                              greedy=greedy, generator=generator)
    return task.decode(out.cpu())
