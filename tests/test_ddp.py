"""Two-process DDP on CPU (gloo): `finetune` with the factored WASI rule keeps the replicas identical.

The same run from the command line::

    torchrun --nproc-per-node 2 .venv/bin/wasi-compress finetune builtin:mnist-vit --data digits \\
        --method wasi --update factored -o out/ddp.safetensors
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # two processes, a fine-tuning run each

WORKER = textwrap.dedent('''
    import sys

    import torch
    import torch.distributed as dist

    import wasi_compress  # noqa: F401
    from wasi_compress.finetune import FinetuneConfig, finetune

    folder, tests, budget, method = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    sys.path.insert(0, tests)
    torch.set_num_threads(1)
    rank = int(__import__("os").environ["RANK"])
    config = FinetuneConfig(model="vit_models:tiny_timm_vit", data="digits", method=method, update="factored",
                            epochs=1, batch_size=128, lr=0.1, measure_memory=rank == 0,
                            memory_budget=None if budget == "none" else int(budget),
                            output=f"{folder}/ddp.safetensors", json_path=f"{folder}/ddp.json")
    result = finetune(config)
    state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    torch.save({"state": state, "accuracy": result.doc["final"]["accuracy"]}, f"{folder}/rank{rank}.pt")
    # finetune() created the process group and tore it down itself: nothing is left to destroy here
    assert not dist.is_initialized()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("budget,method", [(None, "wasi"), (800_000, "wasi"), (None, "jactus")],
                         ids=["plain", "memory-budget", "jactus"])
def test_two_process_ddp_keeps_replicas_identical(tmp_path, vit_models, budget, method):
    """Also under --memory-budget: rank 0 plans, every process runs that plan (micro-batches included); and
    with --method jactus: every process calibrates on the same first training batches, so the bases agree."""
    (tmp_path / "worker.py").write_text(WORKER)
    tests = str(Path(vit_models.__file__).parent)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path), tests, str(budget or "none"), method]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        torch.testing.assert_close(r0["state"][key], r1["state"][key], rtol=0, atol=0, msg=key)
    assert r0["accuracy"] == r1["accuracy"]
    # it trained: the head moved away from its initial weights
    assert not torch.equal(r0["state"]["head.weight"], vit_models.tiny_timm_vit().head.weight)
    doc = json.loads((tmp_path / "ddp.json").read_text())
    assert doc["world_size"] == 2 and doc["method"] == method and doc["memory"]["peak_bytes"] > 0
    assert method == "jactus" or doc["update"] == "optimizer-step"
    assert method != "jactus" or doc["jactus"]["result_params"] <= 0.8 * doc["jactus"]["original_params"]
    assert (tmp_path / "ddp.safetensors").exists()
    if budget:
        assert doc["memory"]["peak_bytes"] <= budget and doc["memory_plan"]["budget_bytes"] == budget
