"""``platform/training/`` is imported as ``dinoforge.training``: the parts the training loop
(``dinoforge.train``) hands work to.

build.py      the model a run trains (SSL or distillation, with its frozen teacher) from its config
optim.py      AdamW with the DINOv2 recipe's parameter groups, per-step lr / weight decay
schedules.py  cosine schedules and the recipe's per-step values (lr, wd, momentum, teacher temperature)
ema.py        the EMA update over a model's ``ema_pairs()``
state.py      TrainState: step, stream position, skip ledger, world size, config (``trainer.json``)
metrics.py    one fan-out of step and log-step metrics: metrics.jsonl, Prometheus, MLflow, progress bar
"""
