"""A lab's own model families, kept outside the pretrain package (tests/test_outside_family.py trains one)."""
