"""Method layer: healing, a distillation fine-tune of a pruned model against its original."""
