"""Data stage: read, normalise, validate, filter, split and tokenise (core, Ray-free) + the Ray Data pipeline.

readers (file -> rows) -> formats (row -> messages + meta) -> validate -> quality (row filters, keys)
-> split -> tokenize, per row in `curate`; `quality.global_filter` (duplicates, leakage) over all rows;
`pipeline.prepare` runs it on Ray Data (`prepare_local` in-process) and writes what `manifest` describes;
`cli` holds `oikyo data prepare|inspect`.
"""
