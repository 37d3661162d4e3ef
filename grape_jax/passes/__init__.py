"""Method layer: the one engine for streamed passes over token blocks, and resumable progress."""
