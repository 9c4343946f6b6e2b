"""Evaluate stage: base vs fine-tuned on the same items and decoding — task metrics, forgetting
(general-text perplexity), safety/robustness probes, regression gates and the report (see docs/eval.md).

Ray-free core: items, scoring, compare, metrics, probes, gates, report, generate. Ray layer:
ray_eval (Ray Data actor pool, backend choice). Command line: cli (`oikyo eval`)."""
