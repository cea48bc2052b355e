"""Process groups and tensor/sequence-parallel building blocks."""
