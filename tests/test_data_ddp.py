"""Two real DDP ranks (gloo, CPU, in a subprocess): disjoint samples, identical batch counts, no hang."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    import lightning as L, torch
    from ldm_lightning.data import ShardDataModule

    class M(L.LightningModule):
        def __init__(self):
            super().__init__(); self.net = torch.nn.Linear(1024, 10); self.keys = []
        def training_step(self, batch, i):
            self.keys += batch["key"]
            return torch.nn.functional.cross_entropy(self.net(batch["image"].flatten(1)), batch["cls"])
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    shards, out = sys.argv[1], sys.argv[2]
    dm = ShardDataModule(shards, batch_size=50, num_workers=2, shuffle_buffer=100)
    m = M()
    t = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    t.fit(m, datamodule=dm)
    json.dump({"rank": t.global_rank, "len": t.num_training_batches, "keys": m.keys},
              open(f"{out}/rank{t.global_rank}.json", "w"))
''')


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_ranks_disjoint_equal(mnist_shards, tmp_path):
    script = tmp_path / "ddp_data.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), mnist_shards["train"], str(tmp_path)], capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{i}.json")) for i in (0, 1)]
    assert ranks[0]["len"] == ranks[1]["len"] == 20
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 1000
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert len(set(ranks[0]["keys"]) | set(ranks[1]["keys"])) == 2000
