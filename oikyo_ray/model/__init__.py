"""Model stage: base model + tokenizer loading, the embedded tiny default, peft methods (Ray-free)."""
