"""The tree-replay service: a ZeroMQ front end over an LMDB store of Arrow subtrees. No torch here."""
