"""Pixels and files: image decoding, storage URLs, labelled folders, leak-free splits, sample faces.

Nothing here reads settings or talks to a service: every function takes what it needs.
"""
