"""The embedded default corpus (see corpus.py and README.md in this folder)."""
