"""The CPU demo (``python -m lpd.demo``): digits, a palette tokenizer, a judge, the ablation and editing."""
