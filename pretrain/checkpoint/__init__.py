"""Checkpoints: DCP step folders with auto-resume (manager.py, state.py, async_save.py), the checks a resume passes
first (resume.py: complete steps whose files match their checksums, integrity.py; made from this run's model,
tokenizer and data, provenance.py), the start of a fresh run from other weights (initial_load.py), the safe reading
of DCP metadata (safe_reader.py), and the Hugging Face and plain-torch formats (hf_io.py, convert.py:
`python -m pretrain.convert`)."""
