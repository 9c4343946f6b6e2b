"""Evaluate stage: base vs fine-tuned on the same items and decoding — task metrics, forgetting
(general-text perplexity), safety/robustness probes, regression gates and the report (see README.md).

Ray-free core: compare, metrics, probes, gates, report, generate. Ray layer: distributed (Ray Data
actor pool). Command line: cli (`oikyo eval`, `oikyo runs compare`)."""
