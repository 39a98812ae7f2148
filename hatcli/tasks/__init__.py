"""Task kinds: what every family of one kind shares (loss, decoding, drawing, metric)."""
