"""One continual-learning step: a plain training loop plus small loss terms that plug into it."""
