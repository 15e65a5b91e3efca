"""The `.otab` bundle format, defined once: the bundler writes it, the agent reads it.

Imports only the standard library, zstandard and cryptography. The normative
description is docs/bundle-format.md; the constants here are the same numbers.
"""
