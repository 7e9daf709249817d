"""Lifelong (sequential) editing: D4S running sums, AlphaEdit null-space projection, the edit ledger.

Modules import torch lazily from the caller's point of view: ``hparams`` is torch-free so the method
registry can import it cheaply; ``d4s``, ``alphaedit`` and ``ledger`` are imported on use.
"""
