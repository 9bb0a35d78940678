"""The web app: generate step by step, edit with a brush, explore orders (``python -m lpd.app``)."""
