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

import torch

FACTORY = textwrap.dedent('''
    def tiny(num_classes=10, img_size=None):
        from wasi_compress import _compat  # noqa: F401
        import torch
        from timm.models.vision_transformer import VisionTransformer
        torch.manual_seed(0)
        model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=num_classes, embed_dim=32,
                                  depth=2, num_heads=2)
        model.pretrained_cfg = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,), "num_classes": num_classes}
        return model
''')


WORKER = textwrap.dedent('''
    import sys

    import torch
    import torch.distributed as dist

    import wasi_compress  # noqa: F401
    from wasi_compress.finetune import FinetuneConfig, finetune

    folder = sys.argv[1]
    sys.path.insert(0, folder)
    torch.set_num_threads(1)
    rank = int(__import__("os").environ["RANK"])
    config = FinetuneConfig(model="ddp_tiny_models:tiny", data="digits", method="wasi", update="factored",
                            epochs=1, batch_size=128, lr=0.1, measure_memory=rank == 0,
                            output=f"{folder}/ddp.safetensors", json_path=f"{folder}/ddp.json")
    result = finetune(config)
    state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    torch.save({"state": state, "accuracy": result.doc["final"]["accuracy"]}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    (tmp_path / "ddp_tiny_models.py").write_text(FACTORY)
    (tmp_path / "worker.py").write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path)]
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
    sys.path.insert(0, str(tmp_path))
    try:
        import ddp_tiny_models

        initial = ddp_tiny_models.tiny()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ddp_tiny_models", None)
    assert not torch.equal(r0["state"]["head.weight"], initial.head.weight)
    doc = json.loads((tmp_path / "ddp.json").read_text())
    assert doc["world_size"] == 2 and doc["update"] == "factored" and doc["memory"]["peak_bytes"] > 0
    assert (tmp_path / "ddp.safetensors").exists()
