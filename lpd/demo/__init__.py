"""The CPU demo (``python -m lpd.demo``): digits, a judge, the ablation and editing."""
