"""Examples for jax_transducer (not part of the installed package): run them from the repository
root, e.g. `python -m examples.train_flax`."""
