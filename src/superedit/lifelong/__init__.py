"""Lifelong (sequential) editing: the edit ledger (the one sequential loop, crash-safe, with undo), the
lifelong runner (many methods over one edit stream, checkpoints, resume), measured interference.

The methods themselves, D4S and AlphaEdit included, live in :mod:`superedit.editing.methods`.
Modules are imported on use.
"""
