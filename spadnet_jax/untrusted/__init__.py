"""Readers for the files a user is handed (landmark pickles, .npz weights, images): data only.

Face-SR files travel as downloads from strangers. Nothing here reads a file in a way that
can run code, and every size a file declares is checked against a bound before memory is
allocated for it. Each refusal is a ValueError whose message names the file and what is
wrong with it, for a program to print as its one error line. These modules import only
NumPy and Pillow, so any program (and prepare's workers) may use them without JAX.
"""
