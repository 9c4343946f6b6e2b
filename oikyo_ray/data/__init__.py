"""Data stage: read, normalise, validate, filter, split and tokenise (core, Ray-free) + its Ray adapter.

paths (data.paths -> files) -> pieces (files -> byte ranges) -> per row in `curate`: readers (file ->
rows) -> formats (row -> messages + meta) -> validate -> quality (row filters, keys) -> split ->
tokenize; `dedupe` (duplicates, leakage; `exact` and `near` matches) over all rows; `prepare` runs
the stage and writes what `manifest` describes, reusing `cache`; `packing` packs the train split;
`prepared` reads a prepared split; `columns` holds the Arrow/numpy helpers.
Ray layer: `ray_data` (the stage on Ray Data tasks, splits as Ray Datasets); `cli` holds
`oikyo data prepare|inspect`.
"""
