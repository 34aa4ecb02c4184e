"""``platform/training/`` is imported as ``dinoforge.training``: the parts the training loop
(``dinoforge.train``) hands work to.

optim.py      AdamW parameter groups of the DINOv2 recipe, per-step lr / weight decay
schedules.py  cosine schedules and the recipe's per-step values (lr, wd, momentum, teacher temperature)
"""
