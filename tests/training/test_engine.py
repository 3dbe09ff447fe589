"""The shared training loop pieces: seeding, one epoch, evaluation, resumable checkpoints, the
epoch loop with model selection, the device."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training import engine
from training.engine import (
    History,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    train_one_epoch,
)


def _data(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=4)


def test_seed_everything_repeats_random_draws():
    seed_everything(3)
    a = torch.randn(5)
    seed_everything(3)
    assert torch.equal(a, torch.randn(5))


def test_train_one_epoch_lowers_the_loss_and_evaluate_returns_everything():
    seed_everything(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()
    before = evaluate(model, loss_fn, _data(), progress=False)
    for epoch in range(1, 6):
        train_one_epoch(model, loss_fn, opt, _data(), epoch, progress=False)
    after = evaluate(model, loss_fn, _data(), progress=False)
    assert after.loss < before.loss
    assert after.outputs.shape == (16, 2) and after.targets.shape == (16,)


def test_checkpoint_round_trip_restores_states_and_history(tmp_path):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    train_one_epoch(model, nn.CrossEntropyLoss(), opt, _data(), 1, progress=False)
    sched.step()
    history = History()
    history.append(1, train_loss=0.5, val_loss=0.7)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(
        path,
        model=model,
        optimizer=opt,
        scheduler=sched,
        epoch=1,
        best_metric=0.8,
        history=history,
        extra={"preset": "x"},
    )

    model2 = nn.Linear(4, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, 0.5)
    state = load_checkpoint(path, model2, opt2, sched2)
    assert state.epoch == 1 and state.best_metric == 0.8 and state.extra == {"preset": "x"}
    assert state.history.column("val_loss") == [0.7]
    torch.testing.assert_close(model2.weight, model.weight)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_fit_keeps_the_selected_epoch_and_resumes_where_it_stopped(tmp_path: Path):
    engine.seed_everything(0)
    x = torch.randn(32, 4)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=8)
    scores = iter([0.5, 0.9, 0.7, 0.8])  # epoch 2 is the best; a resumed epoch 4 is not

    def setup() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = nn.Linear(4, 2)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    model, optimizer = setup()
    files = {"checkpoint": tmp_path / "checkpoint.pt", "best": tmp_path / "best.pt"}
    result = engine.fit(
        model, nn.CrossEntropyLoss(), optimizer, loader, epochs=3,
        validate=lambda m: {"val_score": next(scores)},
        selection=engine.Selection("val_score"), progress=False, **files,
    )  # fmt: skip
    assert (result.best_epoch, result.best_metric) == (2, 0.9)
    assert result.history.column("val_score") == [0.5, 0.9, 0.7]
    model, optimizer = setup()
    resumed = engine.fit(
        model, nn.CrossEntropyLoss(), optimizer, loader, epochs=4,
        validate=lambda m: {"val_score": next(scores)},
        selection=engine.Selection("val_score"), resume=files["checkpoint"], progress=False,
        **files,
    )  # fmt: skip
    assert [row["epoch"] for row in resumed.history.epochs] == [1, 2, 3, 4]
    assert resumed.best_epoch == 2  # the saved best still holds after the resume


def test_selection_on_a_loss_prefers_the_lower_value():
    assert engine.Selection("val_loss").is_better(0.3, 0.4)
    assert not engine.Selection("val_loss").is_better(0.5, 0.4)
    assert engine.Selection("val_macro_f1").is_better(0.5, 0.4)
    assert engine.Selection(None).is_better(0.0, 1.0)  # keep the last epoch


def test_device_auto_is_cuda_when_there_is_one_and_cuda_is_refused_without():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert engine.resolve_device("auto").type == expected
    assert engine.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        engine.resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            engine.resolve_device("cuda")


def test_evaluate_concatenates_tuple_outputs_and_targets():
    class TwoHeads(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.sum(1), x[:, :1]

    x = torch.randn(6, 3)
    batches = [(x[:4], (torch.arange(4), x[:4, :1])), (x[4:], (torch.arange(2), x[4:, :1]))]
    out = engine.evaluate(TwoHeads(), None, batches, progress=False)
    torch.testing.assert_close(out.outputs[0], x.sum(1))
    assert out.targets[0].tolist() == [0, 1, 2, 3, 0, 1] and out.targets[1].shape == (6, 1)
    assert np.isnan(out.loss)
