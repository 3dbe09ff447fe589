"""The shared training loop pieces: seeding, one epoch, evaluation, resumable checkpoints."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
