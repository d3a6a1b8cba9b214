# The copy-task evaluation: a small model trained with a plain torch loop learns the copied half far
# above chance, and copy_accuracy measures it on the validation stream with copy_task_mask.
from __future__ import annotations

import time

import torch

from mgt_scale.config import load_config
from mgt_scale.data import build_train_loader, build_valid_batches
from mgt_scale.data.synthetic import copy_task_mask
from mgt_scale.experiments.copy_eval import copy_accuracy, eval_loss
from mgt_scale.model import build_model, lm_loss


def test_small_model_learns_copy_task(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_config(None, ["data.synthetic=copy", "data.seq_len=8", "data.prefetch=0", "model.vocab_size=10",
                             "model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
                             "model.max_seq_len=16", "model.residual=mgt", "monitor.interval=0"])
    model = build_model(cfg.model, seed=0)
    valid = build_valid_batches(cfg.data, 8, 64, 2, 10)
    chance = 1 / 9
    assert copy_accuracy(model, valid) < 3 * chance
    loader = build_train_loader(cfg.data, seq_len=8, global_batch=32, micro_batch=32, dp_rank=0, dp_size=1,
                                vocab_size=10, prefetch=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tic = time.time()
    for step in range(300):
        (x, y), = loader.next_step()
        model.train()
        loss = lm_loss(model(x), y, copy_task_mask(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 49 and copy_accuracy(model, valid) > 0.9:
            break
        assert time.time() - tic < 60
    loader.close()
    acc = copy_accuracy(model, valid)
    assert acc > 5 * chance, acc
    assert eval_loss(model, valid, copy_task_mask) < 1.5
