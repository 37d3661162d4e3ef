"""App layer: text files to token blocks, and tokenizers."""
