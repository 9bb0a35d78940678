"""Text-to-image parts: frozen text encoders (``lpd.text.encoders``) and caption data
(``lpd.text.data``)."""
