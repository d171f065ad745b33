"""The chunk choice against measured memory: peak RSS of one population pass in a fresh process.

``default_chunk_size`` picks how many individuals run at once from an estimate of
the activation bytes of the pass (``model.bytes_per_individual``: attention scores
and softmax ``B*H*T*T``, QKV, expert hidden units, ...). Here the pass runs in a
subprocess with glibc's mmap threshold fixed at 64 KiB, so every large tensor is
its own mapping and resident memory follows live tensors; the growth of the peak
resident set over the pass, less the outputs (``P*B*T*O``, twice while they are
concatenated), must lie within **0.75x to 1.25x of the memory budget**, for short
and for long sequences (where the ``T*T`` scores dominate).
"""

import json
import os
import subprocess
import sys

import pytest

from evotorch_mqa_moe import TransformerConfig
from evotorch_mqa_moe.model import bytes_per_individual, default_chunk_size

SCRIPT = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from evotorch_mqa_moe import TransformerConfig
from evotorch_mqa_moe.model import init_parameters, population_forward
spec = json.loads(sys.argv[1])
c = TransformerConfig(**spec["config"])
P, B, T = spec["popsize"], spec["batch"], spec["seq_len"]
params = init_parameters(c, P, generator=torch.Generator().manual_seed(0))
x = torch.randint(0, c.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    population_forward(c, params[:1], x[:1, :2])  # load the kernels in a tiny pass
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    try:  # reset the peak, so a transient peak before the pass (imports) does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    out = population_forward(c, params, x, memory_budget=spec["budget"])
with open("/proc/self/status") as f:
    hwm = [line for line in f if line.startswith("VmHWM:")]
peak = (int(hwm[0].split()[1]) * 1024 if hwm
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps({"growth": peak - base, "outputs": out.numel() * out.element_size()}))
"""

CONFIG = dict(vocab_size=16, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=1,
              expert_dim=128, num_experts=4, max_seq_len=1024)  # bench-a, longer sequences


def measure(popsize, batch, seq_len, budget):
    spec = dict(config=CONFIG, popsize=popsize, batch=batch, seq_len=seq_len, budget=budget)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc")
@pytest.mark.slow
@pytest.mark.parametrize("popsize,batch,seq_len,budget", [
    (20, 32, 16, 16 << 20),  # short: the expert hidden units dominate
    (8, 1, 512, 48 << 20),  # long: the (B, H, T, T) scores and softmax dominate
])
def test_measured_peak_of_the_default_chunk_is_within_the_budget(popsize, batch, seq_len,
                                                                  budget):
    config = TransformerConfig(**CONFIG)
    chunk = default_chunk_size(config, batch * seq_len, "cpu", memory_budget=budget,
                               seq_len=seq_len)
    assert 2 <= chunk < popsize  # several individuals per chunk, and several chunks
    got = measure(popsize, batch, seq_len, budget)
    activations = got["growth"] - 2 * got["outputs"]
    assert 0.75 * budget <= activations <= 1.25 * budget, (chunk, got)


def test_estimate_counts_the_attention_scores_of_the_actual_length():
    config = TransformerConfig(**CONFIG)
    rows = 512
    for seq_len in (16, 128, 512):
        batch = rows // seq_len
        scores = 2 * batch * config.num_heads * seq_len * seq_len * 4  # scores + softmax
        assert bytes_per_individual(config, rows, 4, seq_len) > scores
    # same rows, longer sequences: more memory, and a smaller chunk
    short, long = (bytes_per_individual(config, rows, 4, t) for t in (16, 512))
    assert long > 4 * short
    assert (default_chunk_size(config, rows, "cpu", memory_budget=64 << 20, seq_len=512)
            < default_chunk_size(config, rows, "cpu", memory_budget=64 << 20, seq_len=16))
    # without seq_len: the worst case for the rows (T = min(rows, max_seq_len))
    assert bytes_per_individual(config, rows, 4) == bytes_per_individual(config, rows, 4, 512)
