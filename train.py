"""train.py: not implemented yet (see the project's open issues)."""
import sys

if __name__ == "__main__":
  sys.exit("train.py is not implemented yet: this release provides the model, ops and the "
           "official-weight converter (python -m spadnet_jax.convert).")
