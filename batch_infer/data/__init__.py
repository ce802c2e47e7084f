"""The input side: listing and reading files, planning shards, Arrow columns <-> tensors."""
