"""Contracts shared by every role: turn trees, their Arrow encoding, the wire, config, logging.

common/ imports nothing else of the project and never imports torch.
"""
