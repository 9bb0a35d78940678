"""Text-to-image parts: frozen text encoders (``encoders``), caption data and caches (``data``,
``cache``), the caption prefix of a model (``model``), caption training data (``training``) and
sampling with prompts (``sampling``)."""
