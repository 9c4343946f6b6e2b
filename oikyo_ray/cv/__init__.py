"""Cross-validation stage: k folds over the pooled train and val rows, the test split untouched,
each metric as mean ± std (folds.py, Ray-free); each fold trained on Ray Train and evaluated
(ray_cv.py, the stage's only Ray module). Command line: cli (`oikyo cv`)."""
