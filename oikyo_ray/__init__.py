"""oikyo: fine-tune, evaluate and serve language-model adapters on Ray, laptop to cluster.

Stages (one folder each): data/ -> train/ -> eval/ -> serve/, with sweep/ and runs/ beside them;
`config.py` holds the one typed config that flows through all of them. See README.md.
"""

__version__ = "0.1.0"
