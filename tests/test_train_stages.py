"""The trainer's general mechanism for multi-stage methods: stages run in order with fresh
optimizers, each transition is recorded and checkpointed, and a kill in any stage resumes."""

from typing import Any, ClassVar

import pytest
import torch

from unified_embedding import checkpoint
from unified_embedding.embeddings import METHODS
from unified_embedding.embeddings.hashed import HashingTrickEmbedding
from unified_embedding.train import TrainConfig, Trainer

SMALL_MODEL = {"hidden": [16], "num_cross_layers": 1}


class PruneThenRetrain(HashingTrickEmbedding):
    """A toy two-stage method: train, then zero the weaker half of the rows and retrain."""

    name = "toy_staged"
    stages = ("search", "retrain")
    begun: ClassVar[list[str]] = []
    steps: ClassVar[int] = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("kept", torch.ones(self.weight.shape[0], 1))

    def forward(self, batch):
        with torch.no_grad():
            self.weight.mul_(self.kept)
        return super().forward(batch)

    def begin_stage(self, stage: str, validation_auc) -> dict[str, Any]:
        type(self).begun.append(stage)
        before = validation_auc()
        norms = self.weight.detach().norm(dim=1)
        self.kept.copy_((norms >= norms.median()).float().unsqueeze(1))
        return {"pruned_rows": int((self.kept == 0).sum()), "val_auc_before": before}

    def after_step(self) -> None:
        type(self).steps += 1


@pytest.fixture
def staged(monkeypatch):
    monkeypatch.setitem(METHODS, PruneThenRetrain.name, PruneThenRetrain)
    PruneThenRetrain.begun, PruneThenRetrain.steps = [], 0
    return PruneThenRetrain


def config(data_dir, **overrides) -> TrainConfig:
    values = {"dataset": "frappe", "method": "toy_staged", "model": "dcnv2", "budget": "0.1x", "epochs": 2, "patience": 0,
                  "batch_size": 2048, "data_dir": str(data_dir), "model_options": SMALL_MODEL, "max_rows": 20_000}  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def test_stages_run_in_order_and_are_recorded(data_dir, tmp_path, staged):
    run = Trainer(config(data_dir), tmp_path / "run.json", progress=False).run()
    assert staged.begun == ["retrain"]
    assert [stage["name"] for stage in run["stages"]] == ["search", "retrain"]
    retrain = run["stages"][1]
    assert retrain["result"]["pruned_rows"] > 0 and 0.5 < retrain["result"]["val_auc_before"] <= 1
    assert all(stage["epochs"] >= 1 and stage["seconds"] > 0 for stage in run["stages"])
    assert run["epochs_run"] == sum(stage["epochs"] for stage in run["stages"])
    assert {entry["stage"] for entry in run["history"]} == {"search", "retrain"}
    batches_per_epoch = -(-run["rows"]["train"] // 2048)
    assert staged.steps == run["epochs_run"] * batches_per_epoch
    # the final weights are the retrain stage's best: the pruned rows stay zero
    model = checkpoint.load(tmp_path / "run.pt")["model"]
    kept = model["embedding.kept"].squeeze(1)
    assert torch.all(model["embedding.weight"][kept == 0] == 0)


@pytest.mark.parametrize("kill_in", ["search", "retrain"])
def test_a_kill_in_any_stage_resumes_to_the_uninterrupted_result(data_dir, tmp_path, staged, monkeypatch, kill_in):
    reference = Trainer(config(data_dir), progress=False).run()
    output = tmp_path / "run.json"
    staged.begun = []
    real_after_step = PruneThenRetrain.after_step
    seen = {"steps": 0}

    def crash(self) -> None:
        real_after_step(self)
        seen["steps"] += 1
        in_retrain = bool(type(self).begun)
        if in_retrain == (kill_in == "retrain") and seen["steps"] > 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(PruneThenRetrain, "after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(data_dir, checkpoint_every=2), output, progress=False).run()
    monkeypatch.setattr(PruneThenRetrain, "after_step", real_after_step)
    begun_before_resume = list(staged.begun)
    resumed = Trainer(config(data_dir, checkpoint_every=2), output, progress=False).run(resume=True)
    # a transition already checkpointed is not redone on resume
    assert staged.begun == begun_before_resume + ([] if kill_in == "retrain" else ["retrain"])
    assert resumed["stages"][1]["result"]["pruned_rows"] == reference["stages"][1]["result"]["pruned_rows"]
    for key in ("val_auc", "test_auc", "test_logloss"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-12)
