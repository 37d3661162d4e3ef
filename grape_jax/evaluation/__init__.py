"""Method layer: perplexity and multiple-choice scoring."""
