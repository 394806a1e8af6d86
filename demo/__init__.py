"""The ``make demo`` story (``python -m demo``): not part of any shipped package."""
