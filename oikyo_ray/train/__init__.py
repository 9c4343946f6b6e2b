"""Train stage: the explicit training loop and what it needs (Ray-free core), and its Ray Train
driver and worker function (ray_train.py, the stage's only Ray module)."""
