"""Methods stage: full fine-tuning against LoRA, DoRA and QLoRA on one dataset and one step budget,
in one table (table.py, Ray-free); each method a Ray Train run evaluated on the test split
(ray_methods.py, the stage's only Ray module). Command line: `oikyo compare-methods`."""
